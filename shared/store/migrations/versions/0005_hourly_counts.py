"""Outcome counts per hour beside those per 5-minute step: the overview's last 24 h.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections import Counter

import sqlalchemy as sa
from alembic import op

from rohrpost.shared.store.tables import UtcDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outcome_counts_hourly",
        sa.Column("tenant", sa.String(63), primary_key=True),
        sa.Column("app", sa.String(63), primary_key=True),
        sa.Column("kind", sa.String(20), primary_key=True),
        sa.Column("hour", UtcDateTime, primary_key=True),
        sa.Column("count", sa.Integer, nullable=False),
    )
    op.create_index("ix_outcome_counts_hourly_hour", "outcome_counts_hourly", ["hour"])
    _backfill()


def _backfill() -> None:
    """The hours of the steps already counted (a week at most)."""
    from rohrpost.shared.store.counts import Key, hour_of, upsert_counts
    from rohrpost.shared.store.tables import outcome_counts_hourly

    steps = sa.table(
        "outcome_counts",
        sa.column("tenant"),
        sa.column("app"),
        sa.column("kind"),
        sa.column("step", UtcDateTime),
        sa.column("count"),
    )
    conn = op.get_bind()
    hourly: Counter[Key] = Counter()
    for tenant, app, kind, step, count in conn.execute(sa.select(steps)):
        hourly[(tenant, app, kind, hour_of(step))] += count
    upsert_counts(conn, outcome_counts_hourly, "hour", hourly)


def downgrade() -> None:
    op.drop_table("outcome_counts_hourly")
