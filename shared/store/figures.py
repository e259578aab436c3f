"""What the history says about each tenant/app right now, for ``rohrpost status``.

Every query is bounded by an index, whatever the store holds: mails still waiting are
found through ``status`` (``ix_mails_tenant_app_status``), the last hour's and day's
outcomes in the outcome counts (``rohrpost.shared.store.counts``: 5-minute steps),
pauses in the small ``operator_actions`` table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select

from rohrpost.shared.store.counts import recent_counts
from rohrpost.shared.store.database import translate_errors
from rohrpost.shared.store.history import HistoryStore
from rohrpost.shared.store.tables import mails

#: qshape's age buckets (Postfix): lower bound in seconds and name, oldest last.
AGE_BUCKETS: tuple[tuple[int, str], ...] = (
    (0, "0-5m"),
    (300, "5-10m"),
    (600, "10-20m"),
    (1200, "20-40m"),
    (2400, "40-80m"),
    (4800, "80-160m"),
    (9600, "160m+"),
)
#: The statuses of mails not yet finished.
WAITING = ("queued", "scheduled", "retrying")
_COUNTED = {"sent": "sent", "attempt_failed": "retried", "dead_lettered": "dead_lettered"}
_NAMES = [name for _, name in AGE_BUCKETS]


@dataclass
class RouteHistory:
    """One tenant/app as the history sees it."""

    scheduled: int = 0
    retrying: int = 0
    #: mails due and not yet sent, by AGE_BUCKETS name; oldest due time
    waiting_by_age: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_NAMES, 0))
    oldest_due: datetime | None = None
    last_hour: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTED.values(), 0))
    last_day: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTED.values(), 0))


Route = tuple[str, str]


def _scoped(condition: ColumnElement[bool], tenant: str | None, app: str | None) -> Any:
    if tenant is not None:
        condition = and_(condition, mails.c.tenant == tenant)
    if app is not None:
        condition = and_(condition, mails.c.app == app)
    return condition


def route_history(
    store: HistoryStore, now: datetime, *, tenant: str | None = None, app: str | None = None
) -> dict[Route, RouteHistory]:
    """Per tenant/app: scheduled and retrying mails, waiting mails by age, last hour/day."""
    found: dict[Route, RouteHistory] = {}
    with translate_errors(), store.engine.connect() as conn:
        waiting = _scoped(mails.c.status.in_(WAITING), tenant, app)
        for t, a, status, index, count, oldest in conn.execute(_waiting(waiting, now)):
            route = found.setdefault((t, a), RouteHistory())
            if status in ("scheduled", "retrying"):
                setattr(route, status, getattr(route, status) + count)
            if index is None:  # not due yet
                continue
            route.waiting_by_age[_NAMES[index]] += count
            if oldest is not None and (route.oldest_due is None or oldest < route.oldest_due):
                route.oldest_due = oldest
        _count_events(conn, found, now, tenant, app)
    return found


def _waiting(waiting: Any, now: datetime) -> Any:
    """Mails not yet finished, counted by status and, once due, by age bucket (None
    while not due), with the oldest due time: one pass over the ``status`` index."""
    # due: the later of submission and not_before (a retry keeps its first due time)
    due = case(
        (
            and_(
                mails.c.not_before.is_not(None),
                or_(mails.c.created_at.is_(None), mails.c.not_before > mails.c.created_at),
            ),
            mails.c.not_before,
        ),
        else_=func.coalesce(mails.c.created_at, mails.c.status_at),
    )
    younger_than = [
        (due > now - timedelta(seconds=low), index)
        for index, (low, _) in enumerate(AGE_BUCKETS[1:])
    ]
    bucket = case((due > now, None), *younger_than, else_=len(AGE_BUCKETS) - 1)
    rows = select(
        mails.c.tenant,
        mails.c.app,
        mails.c.status,
        bucket.label("bucket"),
        due.label("due"),
    ).where(waiting)
    found = rows.subquery()
    return select(
        found.c.tenant,
        found.c.app,
        found.c.status,
        found.c.bucket,
        func.count(),
        func.min(found.c.due),
    ).group_by(found.c.tenant, found.c.app, found.c.status, found.c.bucket)


def _count_events(
    conn: Any, found: dict[Route, RouteHistory], now: datetime, tenant: str | None, app: str | None
) -> None:
    """Sent, retried and dead-lettered in the last hour and day: the outcome counts."""
    for since, window in (
        (now - timedelta(hours=1), "last_hour"),
        (now - timedelta(days=1), "last_day"),
    ):
        counted = recent_counts(conn, since, tenant=tenant, app=app, kinds=_COUNTED)
        for route_key, counts in counted.items():
            figures = getattr(found.setdefault(route_key, RouteHistory()), window)
            for kind, name in _COUNTED.items():
                figures[name] = counts.get(kind, 0)


def paused_scopes(store: HistoryStore) -> set[tuple[str, str | None]]:
    """Tenants (app None) and apps whose last pause or resume was a pause."""
    return set(store.paused())
