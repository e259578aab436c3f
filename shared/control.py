"""Operator instructions every worker must know: cancel a mail, pause or resume a tenant.

They are appended to ``{ns}.control``, a RabbitMQ *stream*: a durable, replicated
log that every worker reads from the start, so a worker started tomorrow knows
today's cancellations as well as one running now. A worker publishes a marker and
replays the log up to it before it consumes any send queue, so it never sends a
mail whose cancellation was recorded before the worker started.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from typing import Literal

import pika
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from rohrpost.shared.amqp import Publication
from rohrpost.shared.container import Name

Action = Literal["cancel", "pause", "resume", "marker"]


class ControlMessage(BaseModel):
    """One instruction on the control stream."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    action: Action
    at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    actor: str | None = None
    mail_id: uuid.UUID | None = None
    tenant: Name | None = None
    app: Name | None = None
    token: str | None = Field(default=None, description="Identifies a worker's marker.")

    @model_validator(mode="after")
    def _check_target(self) -> ControlMessage:
        if self.action == "cancel" and self.mail_id is None:
            raise ValueError("cancel needs mail_id")
        if self.action in ("pause", "resume") and self.tenant is None:
            raise ValueError(f"{self.action} needs tenant")
        if self.action == "marker" and self.token is None:
            raise ValueError("marker needs token")
        return self

    def publication(self, exchange: str) -> Publication:
        """This message, ready to publish to the control exchange."""
        return Publication(
            exchange,
            "",
            self.model_dump_json(exclude_none=True).encode(),
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=str(uuid.uuid4()),
                type=f"rohrpost.control.{self.action}",
            ),
        )


class ControlState:
    """What the control stream says so far: cancelled mails and paused routes. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled: set[uuid.UUID] = set()
        self._paused: set[tuple[str, str | None]] = set()
        self._markers: set[str] = set()
        self._seen_marker = threading.Condition(self._lock)

    def apply(self, message: ControlMessage) -> bool:
        """Record ``message``; return True when it changed which routes are paused."""
        with self._lock:
            if message.action == "cancel" and message.mail_id is not None:
                self._cancelled.add(message.mail_id)
            elif message.action == "marker" and message.token is not None:
                self._markers.add(message.token)
                self._seen_marker.notify_all()
            elif message.tenant is not None:
                scope = (message.tenant, message.app)
                pause = message.action == "pause"
                changed = (scope in self._paused) != pause
                if pause:
                    self._paused.add(scope)
                else:
                    self._paused.discard(scope)
                return changed
            return False

    def is_cancelled(self, mail_id: uuid.UUID) -> bool:
        """True when an operator cancelled ``mail_id``."""
        with self._lock:
            return mail_id in self._cancelled

    def is_paused(self, tenant: str, app: str) -> bool:
        """True when tenant/app, or the whole tenant, is paused."""
        with self._lock:
            return (tenant, None) in self._paused or (tenant, app) in self._paused

    def wait_for_marker(self, token: str, timeout: float) -> bool:
        """Block until the marker ``token`` was replayed; False after ``timeout`` seconds."""
        with self._lock:
            return self._seen_marker.wait_for(lambda: token in self._markers, timeout)
