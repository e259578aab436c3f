"""Mail events: every state change of a mail, published on ``{namespace}.events``."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

import pika
from pydantic import BaseModel, ConfigDict, Field

from rohrpost.shared.container import Name
from rohrpost.shared.storable import StoredDatetime, StoredInt, clipped

EVENT_SCHEMA_VERSION = 1
#: In the detail of an event about a dead letter that is not a mail container: the
#: SHA-256 of its bytes (dead_lettered, purged), or of the bytes an edit replaced.
INVALID_BODY = "body_sha256"
REPLACED_BODY = "replaces_body_sha256"

# Free text in an event records what happened (an SMTP reply, an exception): it is
# made storable and clipped, never refused, so a worker can always record an outcome.
_Code = Annotated[str, clipped(40)]  # the store's reason column holds 40
_Line = Annotated[str, clipped(2000)]
_Text = Annotated[str, clipped(10_000)]


class EventKind(StrEnum):
    """What happened to a mail (or, for pause/resume, to a tenant)."""

    SUBMITTED = "submitted"
    SCHEDULED = "scheduled"
    ATTEMPT_FAILED = "attempt_failed"
    SENT = "sent"
    EXPIRED = "expired"
    DEAD_LETTERED = "dead_lettered"
    RESUBMITTED = "resubmitted"
    CANCELLED = "cancelled"
    #: a copy of a mail already sent in its round was dropped, not sent again
    DUPLICATE = "duplicate"
    # operator actions: who did what
    EDITED = "edited"
    RESENT = "resent"
    PURGED = "purged"
    PAUSED = "paused"
    RESUMED = "resumed"
    #: an operator held the mail (set aside when due) / released it / sent it now
    HELD = "held"
    RELEASED = "released"
    SEND_NOW = "send_now"


class MailEvent(BaseModel):
    """One state change of one mail."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="MailEvent")

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4, description="Idempotency key.")
    schema_version: Literal[1] = 1
    kind: EventKind
    mail_id: uuid.UUID | None = Field(
        default=None, description="None when the mail was unreadable, or for tenant-wide actions."
    )
    tenant: Name
    app: Name | None = Field(default=None, description="None for actions on a whole tenant.")
    at: StoredDatetime = Field(
        default_factory=lambda: datetime.now(UTC), description="Between 1970 and 9999 (UTC)."
    )
    round: StoredInt = Field(
        default=0, description="Re-submissions of the mail before this event (0 = first)."
    )
    attempt: StoredInt | None = None
    reason: _Code | None = Field(default=None, description="Why it was dead-lettered.")
    error: _Text | None = Field(default=None, description="The SMTP reply or exception.")
    smtp_reply: _Text | None = Field(default=None, description="The server's reply when sent.")
    subject: _Line | None = Field(default=None, description="The subject as sent (rendered).")
    message_id: _Line | None = Field(default=None, description="The Message-ID header sent.")
    retry_in_seconds: int | None = Field(default=None, description="Wait before the next attempt.")
    actor: _Line | None = Field(default=None, description="Who did it, for operator actions.")
    detail: dict[str, Any] | None = Field(
        default=None, description="What changed (edits: field → [old, new]), links to mails."
    )

    @property
    def routing_key(self) -> str:
        """``{kind}.{tenant}.{app}`` (app ``_`` for tenant-wide actions)."""
        return f"{self.kind.value}.{self.tenant}.{self.app or '_'}"

    def properties(self) -> pika.BasicProperties:
        """AMQP properties for publishing this event."""
        return pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=str(self.event_id),
            type=f"rohrpost.event.{self.kind.value}",
        )
