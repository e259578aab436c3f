"""The history store's tables (SQLAlchemy Core), for SQLite and PostgreSQL alike.

The schema on disk is created and changed only by migrations (``migrations/``);
a test checks that the migrated schema matches these definitions.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend (SQLite stores naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use an aware one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JsonText(TypeDecorator[dict[str, Any]]):
    """A JSON object kept as text (portable: SQLite and PostgreSQL read the same)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: dict[str, Any] | None, dialect: Dialect) -> str | None:
        return json.dumps(value) if value is not None else None

    def process_result_value(self, value: Any, dialect: Dialect) -> dict[str, Any] | None:
        return json.loads(value) if value else None


metadata = MetaData()

#: A list of tags: an array on PostgreSQL, JSON text on SQLite.
TAGS = ARRAY(String(64)).with_variant(JSON(), "sqlite")

#: One row per mail: its current state, and its content unless history = "delete".
mails = Table(
    "mails",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant", String(63), nullable=False),
    Column("app", String(63), nullable=False),
    Column("status", String(20), nullable=False),
    # (round, status_rank, status_at) orders state changes; see rohrpost.shared.store.writer.
    Column("round", Integer, nullable=False),
    Column("status_rank", Integer, nullable=False),
    Column("status_at", UtcDateTime, nullable=False),
    Column("created_at", UtcDateTime),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("not_before", UtcDateTime),
    Column("expires_at", UtcDateTime),
    Column("sent_at", UtcDateTime),
    Column("sender", Text),
    Column("recipients", Text),
    Column("subject", Text),
    Column("template", Text),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text),
    Column("reason", String(40)),
    Column("message_id", Text),
    Column("smtp_reply", Text),
    Column("history", String(6)),
    Column("container", Text),
    Column("content_deleted", Boolean, nullable=False),
    Column("resend_of", Uuid),
    # The mail's tags again, beside ``mail_tags``: a search for a frequent tag walks the
    # newest mails and checks each row here instead of probing ``mail_tags`` per mail
    # (see ``rohrpost.shared.store.history``). NULL: archived before migration 0007.
    Column("tags", TAGS),
    Index("ix_mails_tenant_app_status", "tenant", "app", "status"),
    Index("ix_mails_created_at", "created_at"),
    Index("ix_mails_status_updated_at", "status", "updated_at"),
    Index("ix_mails_tenant_status_updated_at", "tenant", "status", "updated_at"),
    # History searches without a status filter list newest first (the console's pages).
    Index("ix_mails_updated_at", "updated_at"),
)

#: Every recipient of a mail (to, cc, bcc), lower-cased, for ``--to`` searches.
mail_recipients = Table(
    "mail_recipients",
    metadata,
    Column("mail_id", Uuid, ForeignKey("mails.id", ondelete="CASCADE"), primary_key=True),
    Column("address", String(320), primary_key=True),
    # mail_id too: a recipient's mails are listed from the index alone (index-only scan).
    Index("ix_mail_recipients_address_mail", "address", "mail_id"),
)

#: Every tag of a mail, for ``--tag`` searches.
mail_tags = Table(
    "mail_tags",
    metadata,
    Column("mail_id", Uuid, ForeignKey("mails.id", ondelete="CASCADE"), primary_key=True),
    Column("tag", String(64), primary_key=True),
    Index("ix_mail_tags_tag_mail", "tag", "mail_id"),
)

#: Every event of every mail, once (event_id is the idempotency key).
events = Table(
    "events",
    metadata,
    Column("event_id", Uuid, primary_key=True),
    Column("mail_id", Uuid, ForeignKey("mails.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(20), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("round", Integer, nullable=False),
    Column("attempt", Integer),
    Column("reason", String(40)),
    Column("error", Text),
    Column("smtp_reply", Text),
    Column("message_id", Text),
    Column("actor", Text),
    Column("detail", JsonText),
    Index("ix_events_mail_id", "mail_id"),
    # The audit: operator actions (events with an actor), newest first, without a scan.
    Index(
        "ix_events_actor_at",
        "at",
        postgresql_where=text("actor IS NOT NULL"),
        sqlite_where=text("actor IS NOT NULL"),
    ),
)

#: Operator actions on a whole tenant or app (pause, resume), with who and when.
operator_actions = Table(
    "operator_actions",
    metadata,
    Column("event_id", Uuid, primary_key=True),
    Column("kind", String(20), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("actor", Text),
    Column("tenant", String(63), nullable=False),
    Column("app", String(63)),
    Column("detail", JsonText),
    Index("ix_operator_actions_tenant_at", "tenant", "at"),
)

#: How many mails reached each outcome, per tenant/app and 5-minute step (the step's
#: start), kept by the history writer: the overview's "in the last hour / 24 h"
#: figures read a few hundred rows per route instead of counting millions of events.
outcome_counts = Table(
    "outcome_counts",
    metadata,
    Column("tenant", String(63), primary_key=True),
    Column("app", String(63), primary_key=True),
    Column("kind", String(20), primary_key=True),
    Column("step", UtcDateTime, primary_key=True),
    Column("count", Integer, nullable=False),
    Index("ix_outcome_counts_step", "step"),
)

#: The same counts per hour: "the last 24 h" reads 24 of these and at most 11 steps per
#: route and outcome, not 288 steps (100 busy routes: 57,000 rows, ~300 ms in PostgreSQL).
outcome_counts_hourly = Table(
    "outcome_counts_hourly",
    metadata,
    Column("tenant", String(63), primary_key=True),
    Column("app", String(63), primary_key=True),
    Column("kind", String(20), primary_key=True),
    Column("hour", UtcDateTime, primary_key=True),
    Column("count", Integer, nullable=False),
    Index("ix_outcome_counts_hourly_hour", "hour"),
)

#: Dead letters that are not mail containers (reason ``invalid``): no mail row can hold
#: them, so each is kept here with the start of its raw bytes, until it is purged.
invalid_letters = Table(
    "invalid_letters",
    metadata,
    Column("event_id", Uuid, primary_key=True),
    Column("tenant", String(63), nullable=False),
    Column("app", String(63), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("error", Text),
    Column("message_id", Text),
    Column("body_sha256", String(64), nullable=False),
    Column("body_size", Integer, nullable=False),
    Column("body", Text, nullable=False),
    Index("ix_invalid_letters_at", "at"),
    Index("ix_invalid_letters_body", "tenant", "app", "body_sha256"),
)
