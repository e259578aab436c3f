"""`rohrpost status`: events are counted by kind over the last hour and day.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_events_kind_at", "events", ["kind", "at"])


def downgrade() -> None:
    op.drop_index("ix_events_kind_at", table_name="events")
