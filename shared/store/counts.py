"""Outcome counts per tenant/app and 5-minute step: the overview's recent figures.

"Sent / retried / dead-lettered in the last hour and 24 h" for every route would
count hundreds of thousands of events in a busy store; the history writer keeps these
counts instead, in the same transaction as the events (a handful of rows per batch),
so the overview reads a few hundred rows per route. Figures are in whole 5-minute
steps: "the last hour" is the twelve steps up to now.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite

from rohrpost.shared.events import EventKind
from rohrpost.shared.store.tables import outcome_counts

STEP = timedelta(minutes=5)
#: What the counts are kept for (other events are not outcomes of an attempt).
COUNTED = frozenset(
    kind.value
    for kind in (
        EventKind.SUBMITTED,
        EventKind.SENT,
        EventKind.ATTEMPT_FAILED,
        EventKind.DEAD_LETTERED,
        EventKind.EXPIRED,
        EventKind.CANCELLED,
    )
)
#: How long counts are kept: the overview looks back a day.
KEEP = timedelta(days=7)

Key = tuple[str, str, str, datetime]


def step_of(at: datetime) -> datetime:
    """The start of the 5-minute step ``at`` falls in, in UTC."""
    at = at.astimezone(UTC)
    return at.replace(minute=at.minute - at.minute % 5, second=0, microsecond=0)


def tally(outcomes: Iterable[tuple[str, str | None, str, datetime]]) -> Counter[Key]:
    """(tenant, app, kind, at) of events → counts per (tenant, app, kind, step)."""
    return Counter(
        (tenant, app, kind, step_of(at))
        for tenant, app, kind, at in outcomes
        if app is not None and kind in COUNTED
    )


def add_counts(conn: Connection, counts: Counter[Key]) -> None:
    """Add ``counts`` to the stored ones (one statement; keys in order, so two
    history consumers adding to the same rows never deadlock)."""
    if not counts:
        return
    rows = [
        {"tenant": t, "app": a, "kind": k, "step": s, "count": n}
        for (t, a, k, s), n in sorted(counts.items())
    ]
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement: Any = dialect.insert(outcome_counts)
    statement = statement.on_conflict_do_update(
        index_elements=["tenant", "app", "kind", "step"],
        set_={"count": outcome_counts.c.count + statement.excluded.count},
    )
    conn.execute(statement, rows)


def recent_counts(
    conn: Connection, since: datetime, *, tenant: str | None = None, app: str | None = None
) -> dict[tuple[str, str], Counter[str]]:
    """Outcomes per (tenant, app) in the steps from ``since``'s step on."""
    query = (
        select(
            outcome_counts.c.tenant,
            outcome_counts.c.app,
            outcome_counts.c.kind,
            func.sum(outcome_counts.c.count),
        )
        .where(outcome_counts.c.step >= step_of(since))
        .group_by(outcome_counts.c.tenant, outcome_counts.c.app, outcome_counts.c.kind)
    )
    if tenant is not None:
        query = query.where(outcome_counts.c.tenant == tenant)
    if app is not None:
        query = query.where(outcome_counts.c.app == app)
    found: dict[tuple[str, str], Counter[str]] = {}
    for row_tenant, row_app, kind, total in conn.execute(query):
        found.setdefault((row_tenant, row_app), Counter())[kind] = int(total)
    return found


def forget_old_counts(conn: Connection, now: datetime) -> None:
    """Drop the steps older than KEEP."""
    conn.execute(delete(outcome_counts).where(outcome_counts.c.step < now - KEEP))
