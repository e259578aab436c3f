"""Each mail's tags in its own row, for searches by a frequent tag.

Without it a search for a tag carried by 2 % of 10,000,000 mails walked the newest
mails and probed ``mail_tags`` once per mail (p95 131 ms, ``python -m bench queries``);
with the tags in the row the walk checks each mail where it already is. Adding a
nullable column without a default rewrites nothing: mails archived before stay NULL
and are still checked through ``mail_tags``.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    tags = ARRAY(sa.String(64)).with_variant(sa.JSON(), "sqlite")
    op.add_column("mails", sa.Column("tags", tags, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mails") as batch:
        batch.drop_column("tags")
