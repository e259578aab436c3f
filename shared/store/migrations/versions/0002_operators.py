"""Operator tools: re-sent mails link to their original; tenant-wide actions are recorded.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from rohrpost.shared.store.tables import UtcDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mails") as batch:
        batch.add_column(sa.Column("resend_of", sa.Uuid))
    op.create_table(
        "operator_actions",
        sa.Column("event_id", sa.Uuid, primary_key=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("at", UtcDateTime, nullable=False),
        sa.Column("actor", sa.Text),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("app", sa.String(63)),
        sa.Column("detail", sa.Text),
    )
    op.create_index("ix_operator_actions_tenant_at", "operator_actions", ["tenant", "at"])


def downgrade() -> None:
    op.drop_table("operator_actions")
    with op.batch_alter_table("mails") as batch:
        batch.drop_column("resend_of")
