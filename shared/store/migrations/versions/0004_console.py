"""The console: invalid dead letters kept with their bytes; indexes for its pages and audit.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from rohrpost.shared.store.tables import UtcDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_WITH_ACTOR = sa.text("actor IS NOT NULL")


def upgrade() -> None:
    op.create_table(
        "invalid_letters",
        sa.Column("event_id", sa.Uuid, primary_key=True),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("app", sa.String(63), nullable=False),
        sa.Column("at", UtcDateTime, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("message_id", sa.Text),
        sa.Column("body_sha256", sa.String(64), nullable=False),
        sa.Column("body_size", sa.Integer, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
    )
    op.create_index("ix_invalid_letters_at", "invalid_letters", ["at"])
    op.create_index("ix_invalid_letters_body", "invalid_letters", ["tenant", "app", "body_sha256"])
    op.create_index("ix_mails_updated_at", "mails", ["updated_at"])
    op.create_index(
        "ix_events_actor_at",
        "events",
        ["at"],
        postgresql_where=_WITH_ACTOR,
        sqlite_where=_WITH_ACTOR,
    )


def downgrade() -> None:
    op.drop_index("ix_events_actor_at", "events")
    op.drop_index("ix_mails_updated_at", "mails")
    op.drop_table("invalid_letters")
