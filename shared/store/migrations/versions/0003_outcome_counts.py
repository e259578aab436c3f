"""Outcome counts per tenant/app and 5-minute step, for the overview.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

from rohrpost.shared.store.tables import UtcDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outcome_counts",
        sa.Column("tenant", sa.String(63), primary_key=True),
        sa.Column("app", sa.String(63), primary_key=True),
        sa.Column("kind", sa.String(20), primary_key=True),
        sa.Column("step", UtcDateTime, primary_key=True),
        sa.Column("count", sa.Integer, nullable=False),
    )
    op.create_index("ix_outcome_counts_step", "outcome_counts", ["step"])
    _backfill()


def _backfill() -> None:
    """Count the last day's outcomes already stored, so the overview starts right."""
    from rohrpost.shared.store.counts import add_step_counts, tally

    since = datetime.now(UTC) - timedelta(days=1)
    events = sa.table(
        "events", sa.column("mail_id"), sa.column("kind"), sa.column("at", UtcDateTime)
    )
    mails = sa.table("mails", sa.column("id"), sa.column("tenant"), sa.column("app"))
    query = (
        sa.select(mails.c.tenant, mails.c.app, events.c.kind, events.c.at)
        .select_from(events.join(mails, mails.c.id == events.c.mail_id))
        .where(events.c.at >= since)
    )
    conn = op.get_bind()
    add_step_counts(conn, tally((t, a, k, at) for t, a, k, at in conn.execute(query)))


def downgrade() -> None:
    op.drop_table("outcome_counts")
