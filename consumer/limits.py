"""Flow control in the worker: each mail passes its rate and connection limits first.

It sits between the claimer thread and the sender threads (``SendWorker``). For
the mails that just arrived it asks the rate limiter (``rohrpost.shared.ratelimit``,
one round trip for the batch) when each may go:

* now: on to the sender threads;
* within ``HORIZON_SECONDS``: it waits in this process, parked until its turn (a
  heap ordered by due time, served by the ``flow-control`` thread);
* later: it is delayed through the delay levels (``Redelay``, same attempt) to come
  back shortly before its turn.

A mail to a server with ``max_connections`` then waits in that server's queue until
a connection permit is free (``rohrpost.consumer.connections``). A waiting mail
never occupies a sender thread, so mails of other servers and apps keep flowing.
Mails without any limit pass straight through, without a round trip.

Outcomes come back through ``on_outcome`` (an observer): a throttling reply cuts
the server's rate (AIMD) and, for a server without ``max_rate``, starts limiting
it from the rate it accepted lately.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from rohrpost.consumer.connections import ServerSlots
from rohrpost.consumer.outcome import THROTTLED, Processed, Redelay, Sent
from rohrpost.consumer.shares import QueueShares
from rohrpost.shared.broker import Delivery
from rohrpost.shared.idempotency import Claim
from rohrpost.shared.leases import ConnectionLeases
from rohrpost.shared.logs import get_logger
from rohrpost.shared.metrics import Metrics
from rohrpost.shared.ratelimit import Group, Limit, RateLimiter
from rohrpost.shared.settings import Settings
from rohrpost.shared.state import SharedState
from rohrpost.shared.wire import LIMITED_HEADER

log = get_logger(__name__)

#: Longest wait for a turn spent in the worker; a later turn is waited for in the delay levels.
HORIZON_SECONDS = 5.0
#: How often the flow-control thread tends connections and asks which servers adapt.
_TICK_SECONDS = 0.25
_RENEW_SECONDS = 2.0
#: How often a mail waiting for a connection permit asks for one.
_PERMIT_POLL_SECONDS = 0.1
#: Mails let through later than this after they arrived count as having waited.
_WAITED_SECONDS = 0.002
#: Sends accepted over this window estimate the rate a throttling server took.
_ACCEPTED_WINDOW_SECONDS = 2.0

Item = tuple[Delivery, Claim | None]


@dataclass(frozen=True)
class _Route:
    """What limits the mails of one send queue."""

    tenant: str
    app: str
    server: str
    app_limit: Limit | None
    server_limit: Limit  # adaptive; its rate None when the server has no max_rate
    pooled: bool  # the server has max_connections

    def limits(self, adapting: set[str]) -> tuple[Limit, ...]:
        """The rate limits that apply now (a server without max_rate: once it throttled)."""
        found = [] if self.app_limit is None else [self.app_limit]
        if self.server_limit.rate is not None or self.server in adapting:
            found.append(self.server_limit)
        return tuple(found)


@dataclass(frozen=True, slots=True)
class _Ticket:
    """A mail let through: its route, when its turn was reserved, since when it waited."""

    route: _Route
    made_at: float
    since: float


@dataclass(order=True)
class _Parked:
    due: float
    seq: int
    item: Item = field(compare=False)
    ticket: _Ticket = field(compare=False)


class FlowControl:
    """Lets each mail through to the sender threads when every limit it passes allows."""

    def __init__(
        self,
        settings: Settings,
        route_of: Callable[[str], tuple[str, str]],
        send_queue: Callable[[str, str], str],
        *,
        state: SharedState | None,
        metrics: Metrics,
        dispatch: Callable[[Item], None],
        defer: Callable[[Item, int], None],
        urgent: Callable[[str], bool] = lambda _queue: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``dispatch``: hand a mail to the sender threads; ``defer``: delay it (seconds).

        ``urgent(queue)``: whether mails of that send queue (the high lane) take the
        next free turn without queueing behind mails deferred through the delay levels.
        """
        self._urgent = urgent
        self._settings = settings
        self._route_of = route_of
        self._metrics = metrics
        self._dispatch = dispatch
        self._defer = defer
        self._clock = clock
        self._shares = QueueShares(settings, send_queue)
        namespace = settings.namespace
        self._limiter = RateLimiter(state, namespace, self._shares, horizon=HORIZON_SECONDS)
        self._leases = ConnectionLeases(state, settings.namespace, self._shares.server)
        # No process uses more connections to a server than it has sender threads.
        self.pools: dict[str, ServerSlots] = {
            name: ServerSlots(name, server.max_connections, self._leases, most=settings.threads)
            for name, server in settings.smtp.items()
            if server.max_connections is not None
        }
        self._routes: dict[str, _Route] = {}
        self._adapting: set[str] = set()  # servers without max_rate a throttling reply cut
        self._accepted: dict[str, deque[float]] = {}
        self._shown: dict[str | None, float] = {}  # gauge values last set
        self._tickets: dict[int, _Ticket] = {}
        self._parked: list[_Parked] = []
        # per server with max_connections: mails waiting for a permit, since when
        self._waiting: dict[str, deque[tuple[Item, _Ticket, float]]] = {
            n: deque() for n in self.pools
        }
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="flow-control", daemon=True)
        for name, server in settings.smtp.items():
            if server.max_rate is not None:
                metrics.effective_rate.labels(name).set(server.max_rate.per_second)

    def start(self) -> None:
        """Start the thread that lets parked and waiting mails go."""
        self._metrics.limits_global.set(1 if self._limiter.is_global else 0)
        settings = self._settings
        apps = [settings.app(tenant, app) for tenant, app in settings.routes()]
        limited = bool(self.pools) or any(
            config is not None and config.max_rate is not None
            for config in [*settings.smtp.values(), *apps]
        )
        if limited and not self._limiter.is_global:
            log.warning(
                "rate limits without shared state (redis_url is empty): each worker process "
                "keeps to its share of each limit"
            )
        self._thread.start()

    # -- the claimer thread --------------------------------------------------------------

    def admit(self, items: Iterable[Item]) -> None:
        """Let ``items`` through now, park them until their turn, or defer them."""
        groups: dict[tuple[_Route, bool], list[Item]] = {}
        now = self._clock()
        for item in items:
            route = self._route(item[0].queue)
            if not route.limits(self._adapting):
                self._through(item, _Ticket(route, 0.0, now))
                continue
            headers = item[0].properties.headers or {}
            ahead = LIMITED_HEADER in headers or self._urgent(item[0].queue)
            groups.setdefault((route, ahead), []).append(item)
        if groups:
            self._reserve(groups, now)

    def close(self) -> None:
        """Stop the thread; delay every mail still waiting by a second (the worker stops)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        with self._cond:
            left = [p.item for p in self._parked]
            for waiting in self._waiting.values():
                left += [item for item, _, _ in waiting]
                waiting.clear()
            self._parked.clear()
        for item in left:
            self._defer(item, 1)

    def release(self) -> None:
        """Close pooled connections and give back their permits (after the sender threads)."""
        for slots in self.pools.values():
            slots.close()

    def _reserve(self, groups: dict[tuple[_Route, bool], list[Item]], now: float) -> None:
        applying = {key: key[0].limits(self._adapting) for key in groups}
        limits = list({lim.name: lim for found in applying.values() for lim in found}.values())
        index = {limit.name: i for i, limit in enumerate(limits)}
        requests = [
            Group(tuple(index[lim.name] for lim in applying[key]), len(items), key[1])
            for key, items in groups.items()
        ]
        decision = self._limiter.reserve(limits, requests)
        self._show_rates(limits, decision.rates)
        for ((route, _), items), slots in zip(groups.items(), decision.slots, strict=True):
            for item, slot in zip(items, slots, strict=True):
                ticket = _Ticket(route, slot.made_at_ms or decision.now_ms, now)
                if slot.reserved and slot.wait_ms <= 1:
                    self._through(item, ticket)
                    continue
                self._count(route, "rate")
                if slot.reserved:
                    self._park(item, ticket, now + slot.wait_ms / 1000)
                else:
                    wait = slot.wait_ms / 1000
                    self._metrics.rate_limit_wait.labels(route.tenant, route.app).observe(wait)
                    self._defer(item, max(1, math.floor(wait - HORIZON_SECONDS / 2)))

    def _show_rates(self, limits: list[Limit], rates: tuple[float, ...]) -> None:
        shared = self._limiter.is_global
        shown: list[tuple[str | None, float]] = [(None, 1.0 if shared else 0.0)]
        for limit, rate in zip(limits, rates, strict=True):
            if limit.adaptive:
                shown.append((limit.name, rate if shared else rate * self._shares(limit)))
        for name, value in shown:
            if self._shown.get(name) == value:
                continue  # a gauge written to a file per process (multiprocess mode): only news
            self._shown[name] = value
            if name is None:
                self._metrics.limits_global.set(value)
            else:
                self._metrics.effective_rate.labels(name.removeprefix("smtp:")).set(value)

    def _park(self, item: Item, ticket: _Ticket, due: float) -> None:
        with self._cond:
            heapq.heappush(self._parked, _Parked(due, next(self._seq), item, ticket))
            if self._parked[0].due == due:
                self._cond.notify()

    def _route(self, queue: str) -> _Route:
        route = self._routes.get(queue)
        if route is None:
            tenant, app = self._route_of(queue)
            config = self._settings.app(tenant, app)
            assert config is not None  # only configured routes are consumed
            server = self._settings.smtp[config.smtp]
            app_limit = None
            if config.max_rate is not None:
                app_limit = Limit(f"app:{tenant}:{app}", config.max_rate)
            server_limit = Limit(f"smtp:{config.smtp}", server.max_rate, adaptive=True)
            pooled = config.smtp in self.pools
            route = _Route(tenant, app, config.smtp, app_limit, server_limit, pooled)
            self._routes[queue] = route
        return route

    def _count(self, route: _Route, limit: str) -> None:
        self._metrics.rate_limited.labels(route.tenant, route.app, route.server, limit).inc()

    # -- any thread ----------------------------------------------------------------------

    def _through(self, item: Item, ticket: _Ticket) -> None:
        """On to the sender threads, or to its server's queue for a connection permit."""
        server = ticket.route.server
        if ticket.route.pooled and (self._waiting[server] or not self.pools[server].take()):
            with self._cond:
                self._waiting[server].append((item, ticket, self._clock()))
                self._cond.notify()
        else:
            self._send(item, ticket)

    def _send(self, item: Item, ticket: _Ticket) -> None:
        self._tickets[id(item[0])] = ticket
        route = ticket.route
        waited = self._clock() - ticket.since
        if waited > _WAITED_SECONDS:
            self._metrics.rate_limit_wait.labels(route.tenant, route.app).observe(waited)
        self._dispatch(item)

    # -- the sender threads: outcomes ----------------------------------------------------

    def on_outcome(self, processed: Processed) -> None:
        """Give back the mail's connection permit; learn from throttling replies."""
        ticket = self.put_back(processed.delivery)
        if ticket is None:
            return  # deferred here, never let through
        route = ticket.route
        match processed.outcome:
            case Sent() if route.server_limit.rate is None:
                accepted = self._accepted.setdefault(route.server, deque(maxlen=10_000))
                accepted.append(self._clock())
            case Redelay(_, why) if why == THROTTLED:
                self._throttled(ticket)

    def put_back(self, delivery: Delivery) -> _Ticket | None:
        """A mail let through is done with (or given back unsent): free its permit."""
        ticket = self._tickets.pop(id(delivery), None)
        if ticket is not None and ticket.route.pooled:
            self.pools[ticket.route.server].finished()
            self._serve(ticket.route.server)  # the permit goes to the next mail waiting
        return ticket

    def _throttled(self, ticket: _Ticket) -> None:
        route = ticket.route
        self._count(route, "throttled")
        seed = self._accepted_rate(route.server) * self._shares(route.server_limit)
        was_adapting = route.server in self._adapting
        rate = self._limiter.throttled(route.server_limit, ticket.made_at, seed)
        self._adapting.add(route.server)
        self._show_rates([route.server_limit], (rate,))
        if not was_adapting and route.server_limit.rate is None:
            log.info("smtp server throttles; limiting its rate", server=route.server, rate=rate)

    def _accepted_rate(self, server: str) -> float:
        """Mails per second this process saw the server accept lately."""
        accepted = self._accepted.get(server)
        now = self._clock()
        recent = [t for t in list(accepted or ()) if now - t <= _ACCEPTED_WINDOW_SECONDS]
        if not recent:
            return 0.0
        window = min(_ACCEPTED_WINDOW_SECONDS, max(0.5, now - recent[0]))
        return len(recent) / window

    # -- the flow-control thread ---------------------------------------------------------

    def _run(self) -> None:
        next_tick = next_renewal = 0.0
        while (due := self._wait_for_work(next_tick)) is not None:
            for parked in due:
                self._through(parked.item, parked.ticket)
            now = self._clock()
            try:
                self._serve_waiting()
                if now >= next_tick:
                    next_tick = now + _TICK_SECONDS
                    self._tend()
                if now >= next_renewal:
                    next_renewal = now + _RENEW_SECONDS
                    self._renew()
            except Exception:  # never let a waiting mail be stranded by a bug here
                log.exception("flow control failed; going on")

    def _wait_for_work(self, next_tick: float) -> list[_Parked] | None:
        """Sleep until a parked mail is due, a permit may be free, or the next tick.

        The parked mails now due; None once closing.
        """
        with self._cond:
            if self._closing:
                return None
            now = self._clock()
            wake = next_tick
            if self._parked:
                wake = min(wake, self._parked[0].due)
            if any(self._waiting.values()):
                wake = min(wake, now + _PERMIT_POLL_SECONDS)
            if wake > now:
                self._cond.wait(wake - now)
            due = []
            now = self._clock()
            while self._parked and self._parked[0].due <= now:
                due.append(heapq.heappop(self._parked))
            return due

    def _serve_waiting(self) -> None:
        for server in self.pools:
            self._serve(server)

    def _serve(self, server: str) -> None:
        """Let mails waiting for a permit of ``server`` through while permits are free."""
        slots, waiting = self.pools[server], self._waiting[server]
        while waiting and slots.take():
            with self._cond:
                if not waiting:  # another thread let it through meanwhile
                    slots.finished()
                    return
                item, ticket, since = waiting.popleft()
            now = self._clock()
            if now - since > _PERMIT_POLL_SECONDS / 2 and slots.short():
                self._count(ticket.route, "connections")
            elif not ticket.made_at:
                ticket = _Ticket(ticket.route, ticket.made_at, now)  # it waited for a thread
            self._send(item, ticket)

    def _tend(self) -> None:
        for server, slots in self.pools.items():
            slots.tend(waiting=bool(self._waiting[server]))

    def _renew(self) -> None:
        held = [lease for slots in self.pools.values() for lease in slots.held()]
        renewal = self._leases.renew(held)
        for server, slots in self.pools.items():
            lost = [lease for lease in renewal.lost if lease.server == server]
            slots.renewed(lost, server in renewal.wanted)
        unconfigured = {
            route.server: route.server_limit
            for route in list(self._routes.values())
            if route.server_limit.rate is None
        }
        if unconfigured:
            limits = list(unconfigured.values())
            found = self._limiter.adapting(limits)
            for limit, adapting in zip(limits, found, strict=True):
                name = limit.name.removeprefix("smtp:")
                if adapting:
                    self._adapting.add(name)
                elif name in self._adapting:
                    self._adapting.discard(name)
                    self._shown[limit.name] = 0.0
                    self._metrics.effective_rate.labels(name).set(0)
