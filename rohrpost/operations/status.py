"""The queue overview: ``rohrpost status`` and the console's overview page show this.

One call, ``overview(settings, store)``, gathers every figure an operator asks for
first (Postfix's ``postqueue -p`` and ``qshape``), per tenant/app and in total::

    from rohrpost.operations.status import overview
    from rohrpost.shared.store import HistoryStore

    store = HistoryStore.open(settings.store_url.get_secret_value())  # or None
    shown = overview(settings, store, tenant="acme")     # app=..., now=..., channel=...
    shown.routes[0].ready, shown.total.waiting_by_age, shown.model_dump(mode="json")

Where each figure comes from, and what ``None`` (shown as ``-``) means:

* the broker, by passive ``queue.declare`` (exact, at the moment of the call):
  ``ready`` (due mails in the route's send queues, every priority lane together;
  ``ready_by_priority`` per lane), ``consumers`` (of the send queue of normal
  mails; every worker consumes each lane of a route),
  ``held`` (the route's held queue), ``dead_lettered`` (its dead-letter queue), the
  delay levels' total and the history queue. None when the broker or the queue is
  missing (``broker`` / ``notes`` say why), or the app is disabled (no queues).
* RabbitMQ's management API (see ``rohrpost.operations.management``): ``in_flight``,
  the mails workers hold unacked, sampled every 5 s. None when it is off or does not
  answer (``management`` says why).
* the history store: ``scheduled``, ``retrying`` (statuses), ``waiting_by_age`` and
  ``oldest_waiting_seconds`` (mails due and not yet sent, qshape's buckets, age
  counted from when they became due), ``last_hour`` / ``last_day`` (sends, failed
  attempts, dead letters) and ``paused`` (the last pause or resume it recorded). It
  lags the broker by the history consumer's batch wait. None without a store
  (``history`` says why).

Nothing here changes anything: it reads queues (passive declares), the management
API and the store, and never creates a store file.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from rohrpost.operations.management import QueueCounts
from rohrpost.operations.queues import QueueReading, in_flight_counts, send_queues
from rohrpost.shared.container import PRIORITIES
from rohrpost.shared.errors import OperatorError, StoreError
from rohrpost.shared.settings import Settings
from rohrpost.shared.store import HistoryStore
from rohrpost.shared.store.figures import AGE_BUCKETS, RouteHistory, paused_scopes, route_history
from rohrpost.shared.topology import Topology

#: qshape's bucket names, youngest first: keys of ``waiting_by_age``.
AGE_BUCKET_NAMES = tuple(name for _, name in AGE_BUCKETS)


class Activity(BaseModel):
    """What happened in a window (last hour, last day), from the history."""

    model_config = ConfigDict(frozen=True)

    sent: int | None = None
    retried: int | None = None  # failed attempts that will be retried
    dead_lettered: int | None = None


class Figures(BaseModel):
    """The numbers of one tenant/app, or of all together; None is unknown (shown ``-``)."""

    model_config = ConfigDict(frozen=True)

    ready: int | None = None
    in_flight: int | None = None
    consumers: int | None = None
    scheduled: int | None = None
    retrying: int | None = None
    held: int | None = None
    dead_lettered: int | None = None
    oldest_waiting_seconds: float | None = None
    waiting_by_age: dict[str, int] | None = None
    last_hour: Activity = Activity()
    last_day: Activity = Activity()


class RouteStatus(Figures):
    """One tenant/app: its configuration, state and figures."""

    tenant: str
    app: str
    enabled: bool
    paused: bool | None  # None: unknown (no history store)
    smtp: str
    #: ``ready`` per priority lane (high, normal, bulk)
    ready_by_priority: dict[str, int | None] | None = None


class QueueFigure(BaseModel):
    """One queue, or a set of queues, outside any tenant/app."""

    model_config = ConfigDict(frozen=True)

    queues: int
    messages: int | None = None
    consumers: int | None = None
    in_flight: int | None = None


class Overview(BaseModel):
    """Everything ``rohrpost status`` shows; ``model_dump(mode="json")`` is its ``--json``."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    namespace: str
    routes: list[RouteStatus]
    total: Figures
    delay_levels: QueueFigure
    history_queue: QueueFigure | None  # None: history_enabled = false
    history_rejected: QueueFigure | None
    #: why a source's figures are missing (None: they are all there)
    broker: str | None = None
    management: str | None = None
    history: str | None = None
    notes: list[str] = []


def overview(
    settings: Settings,
    store: HistoryStore | None,
    *,
    tenant: str | None = None,
    app: str | None = None,
    now: datetime | None = None,
    channel: Any | None = None,
    history_problem: str | None = None,
) -> Overview:
    """The overview of every configured tenant/app (or only ``tenant`` / ``app``).

    ``store``: the history store, or None (then the history's figures are None and
    ``history_problem`` says why). ``channel``: a blocking pika channel to read the
    queues with (default: a few short-lived connections to ``broker_url``, at once). ``now``: the
    time ages and windows count from (default: the current time).
    """
    _require_scope(settings, tenant, app)
    now = now or datetime.now(UTC)
    topology = Topology.from_settings(settings)
    scope = [(t, a) for t, a in topology.routes if tenant in (None, t) and app in (None, a)]
    reading = QueueReading(topology, scope)
    # The three sources answer independently: asked at once, the overview takes as
    # long as the slowest of them, not as all three together.
    with ThreadPoolExecutor(2, thread_name_prefix="overview") as pool:
        asked_management = pool.submit(in_flight_counts, settings)
        asked_history = pool.submit(_history, store, now, tenant, app)
        if channel is not None:
            reading.read(channel)
        else:
            reading.read_from(settings.broker_url.get_secret_value())
        in_flight, management = asked_management.result()
        history, paused, store_problem = asked_history.result()
    history_problem = store_problem or history_problem
    sources = _Sources(topology, reading, in_flight, history, paused, now)
    routes = [
        _route(settings, sources, t, a)
        for t, config in sorted(settings.tenants.items())
        for a in sorted(config.apps)
        if tenant in (None, t) and app in (None, a)
    ]
    history_queue = history_rejected = None
    if topology.history:
        history_queue = _queue_figure(reading, topology.history_queue, in_flight)
        history_rejected = _queue_figure(reading, topology.history_rejected_queue, None)
    return Overview(
        at=now,
        namespace=settings.namespace,
        routes=routes,
        total=_total(routes),
        delay_levels=_delay_levels(reading, topology),
        history_queue=history_queue,
        history_rejected=history_rejected,
        broker=reading.problem,
        management=management,
        history=None if history is not None else history_problem or "no history store",
        notes=reading.notes,
    )


def _history(
    store: HistoryStore | None, now: datetime, tenant: str | None, app: str | None
) -> tuple[
    dict[tuple[str, str], RouteHistory] | None, set[tuple[str, str | None]] | None, str | None
]:
    """The history's figures and pauses, or None and why (the store could not be read)."""
    if store is None:
        return None, None, None
    try:
        return route_history(store, now, tenant=tenant, app=app), paused_scopes(store), None
    except StoreError as exc:  # the queues' figures are worth showing all the same
        return None, None, str(exc)


def _delay_levels(reading: QueueReading, topology: Topology) -> QueueFigure:
    names = topology.delay_queues()
    known = [count for name in names if (count := reading.messages(name)) is not None]
    return QueueFigure(queues=len(names), messages=sum(known) if known else None)


def _queue_figure(
    reading: QueueReading, name: str, in_flight: dict[str, QueueCounts] | None
) -> QueueFigure:
    held = in_flight.get(name) if in_flight is not None else None
    return QueueFigure(
        queues=1,
        messages=reading.messages(name),
        consumers=reading.consumers(name),
        in_flight=held.unacked if held is not None else None,
    )


def _require_scope(settings: Settings, tenant: str | None, app: str | None) -> None:
    if tenant is not None and tenant not in settings.tenants:
        raise OperatorError(f"tenant {tenant!r} is not configured")
    if app is not None and not any(
        app in config.apps for name, config in settings.tenants.items() if tenant in (None, name)
    ):
        where = f"tenant {tenant!r}" if tenant else "any tenant"
        raise OperatorError(f"{where} has no app {app!r}")


@dataclass(frozen=True)
class _Sources:
    """What the figures of every route are taken from."""

    topology: Topology
    reading: QueueReading
    in_flight: dict[str, QueueCounts] | None
    history: dict[tuple[str, str], RouteHistory] | None
    paused: set[tuple[str, str | None]] | None
    now: datetime


def _route(settings: Settings, sources: _Sources, tenant: str, app: str) -> RouteStatus:
    config = settings.tenants[tenant].apps[app]
    topology, reading, in_flight = sources.topology, sources.reading, sources.in_flight
    send = send_queues(topology, tenant, app)
    figures: dict[str, Any] = {}
    if config.enabled:
        figures = {
            "ready": reading.total(send),
            "ready_by_priority": {
                priority: reading.messages(queue)
                for priority, queue in zip(PRIORITIES, send, strict=True)
            },
            "consumers": reading.most_consumers(send),
            "held": reading.messages(topology.held_queue(tenant, app)),
            "dead_lettered": reading.messages(topology.dead_queue(tenant, app)),
            "in_flight": _unacked(in_flight, send),
        }
    if sources.history is not None:
        route = sources.history.get((tenant, app), RouteHistory())
        figures |= _history_figures(route, sources.now)
    paused = sources.paused
    return RouteStatus(
        tenant=tenant,
        app=app,
        enabled=config.enabled,
        paused=None if paused is None else bool({(tenant, None), (tenant, app)} & paused),
        smtp=config.smtp,
        **figures,
    )


def _unacked(in_flight: dict[str, QueueCounts] | None, queues: list[str]) -> int | None:
    """Unacked messages of ``queues`` together; None unless the management API told."""
    if in_flight is None:
        return None
    found = [counts.unacked for queue in queues if (counts := in_flight.get(queue)) is not None]
    return sum(found) if found else None


def _history_figures(route: RouteHistory, now: datetime) -> dict[str, Any]:
    oldest = route.oldest_due
    return {
        "scheduled": route.scheduled,
        "retrying": route.retrying,
        "waiting_by_age": dict(route.waiting_by_age),
        "oldest_waiting_seconds": None
        if oldest is None
        else max(0.0, (now - oldest).total_seconds()),
        "last_hour": Activity(**route.last_hour),
        "last_day": Activity(**route.last_day),
    }


def _sum(values: list[int | None]) -> int | None:
    return None if not values or any(v is None for v in values) else sum(v or 0 for v in values)


def _total(routes: list[RouteStatus]) -> Figures:
    """All routes together: a figure is unknown when it is unknown for an enabled route."""
    enabled = [r for r in routes if r.enabled]
    counted = ("ready", "in_flight", "consumers", "held", "dead_lettered")
    history = ("scheduled", "retrying")
    totals: dict[str, Any] = {name: _sum([getattr(r, name) for r in enabled]) for name in counted}
    totals |= {name: _sum([getattr(r, name) for r in routes]) for name in history}
    ages = [r.waiting_by_age for r in routes]
    if routes and all(age is not None for age in ages):
        totals["waiting_by_age"] = {
            name: sum((age or {}).get(name, 0) for age in ages) for name in AGE_BUCKET_NAMES
        }
    oldest = [r.oldest_waiting_seconds for r in routes if r.oldest_waiting_seconds is not None]
    totals["oldest_waiting_seconds"] = max(oldest) if oldest else None
    for window in ("last_hour", "last_day"):
        totals[window] = Activity(
            **{
                name: _sum([getattr(getattr(r, window), name) for r in routes])
                for name in Activity.model_fields
            }
        )
    return Figures(**totals)
