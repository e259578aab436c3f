"""The history store: mails, their recipients and tags, and their events.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from rohrpost.shared.store.tables import UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mails",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("app", sa.String(63), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("status_rank", sa.Integer, nullable=False),
        sa.Column("status_at", UtcDateTime, nullable=False),
        sa.Column("created_at", UtcDateTime),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.Column("not_before", UtcDateTime),
        sa.Column("expires_at", UtcDateTime),
        sa.Column("sent_at", UtcDateTime),
        sa.Column("sender", sa.Text),
        sa.Column("recipients", sa.Text),
        sa.Column("subject", sa.Text),
        sa.Column("template", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("reason", sa.String(40)),
        sa.Column("message_id", sa.Text),
        sa.Column("smtp_reply", sa.Text),
        sa.Column("history", sa.String(6)),
        sa.Column("container", sa.Text),
        sa.Column("content_deleted", sa.Boolean, nullable=False),
    )
    op.create_index("ix_mails_tenant_app_status", "mails", ["tenant", "app", "status"])
    op.create_index("ix_mails_created_at", "mails", ["created_at"])
    op.create_index("ix_mails_status_updated_at", "mails", ["status", "updated_at"])
    op.create_table(
        "mail_recipients",
        sa.Column(
            "mail_id", sa.Uuid, sa.ForeignKey("mails.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("address", sa.String(320), primary_key=True),
    )
    op.create_index("ix_mail_recipients_address", "mail_recipients", ["address"])
    op.create_table(
        "mail_tags",
        sa.Column(
            "mail_id", sa.Uuid, sa.ForeignKey("mails.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("tag", sa.String(64), primary_key=True),
    )
    op.create_index("ix_mail_tags_tag", "mail_tags", ["tag"])
    op.create_table(
        "events",
        sa.Column("event_id", sa.Uuid, primary_key=True),
        sa.Column(
            "mail_id", sa.Uuid, sa.ForeignKey("mails.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("at", UtcDateTime, nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer),
        sa.Column("reason", sa.String(40)),
        sa.Column("error", sa.Text),
        sa.Column("smtp_reply", sa.Text),
        sa.Column("message_id", sa.Text),
        sa.Column("actor", sa.Text),
        sa.Column("detail", sa.Text),
    )
    op.create_index("ix_events_mail_id", "events", ["mail_id"])


def downgrade() -> None:
    for table in ("events", "mail_tags", "mail_recipients", "mails"):
        op.drop_table(table)
