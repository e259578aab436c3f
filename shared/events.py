"""Mail events: every state change of a mail, published on ``{namespace}.events``."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

import pika
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

EVENT_SCHEMA_VERSION = 1


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


class MailEvent(BaseModel):
    """One state change of one mail."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="MailEvent")

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4, description="Idempotency key.")
    schema_version: Literal[1] = 1
    kind: EventKind
    mail_id: uuid.UUID | None = Field(
        default=None, description="None when the mail was unreadable, or for tenant-wide actions."
    )
    tenant: str
    app: str | None = Field(default=None, description="None for actions on a whole tenant.")
    at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    round: int = Field(
        default=0, ge=0, description="Re-submissions of the mail before this event (0 = first)."
    )
    attempt: int | None = None
    reason: str | None = Field(default=None, description="Why it was dead-lettered.")
    error: str | None = Field(default=None, description="The SMTP reply or exception.")
    smtp_reply: str | None = Field(default=None, description="The server's reply when sent.")
    subject: str | None = Field(default=None, description="The subject as sent (rendered).")
    message_id: str | None = Field(default=None, description="The Message-ID header sent.")
    retry_in_seconds: int | None = None
    actor: str | None = Field(default=None, description="Who did it, for operator actions.")
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
