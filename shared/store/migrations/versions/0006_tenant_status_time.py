"""An index for a tenant's mails of one status, newest first (dead letters of a tenant).

Without it PostgreSQL read all of a tenant's dead letters (``ix_mails_tenant_app_status``)
and sorted them to show the newest 50: 1.6 s at p95 over 10,000,000 mails
(``python -m bench queries``).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_mails_tenant_status_updated_at", "mails", ["tenant", "status", "updated_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_mails_tenant_status_updated_at", table_name="mails")
