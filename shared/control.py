"""Operator instructions every worker must know: cancel, hold, release or send a mail now,
pause or resume a tenant.

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

Action = Literal["cancel", "pause", "resume", "marker", "hold", "release", "send_now"]
#: Actions about one mail: they need ``mail_id``.
MAIL_ACTIONS = frozenset({"cancel", "hold", "release", "send_now"})


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
    round: int | None = Field(
        default=None, ge=0, description="send_now: the round whose older copies are dropped."
    )

    @model_validator(mode="after")
    def _check_target(self) -> ControlMessage:
        if self.action in MAIL_ACTIONS and self.mail_id is None:
            raise ValueError(f"{self.action} needs mail_id")
        if self.action == "send_now" and self.round is None:
            raise ValueError("send_now needs round")
        if self.action in ("pause", "resume") and self.tenant is None:
            raise ValueError(f"{self.action} needs tenant")
        if self.action == "marker" and self.token is None:
            raise ValueError("marker needs token")
        return self

    @property
    def mark(self) -> int:
        """When it was given, in milliseconds: the copy it makes carries this mark."""
        return int(self.at.timestamp() * 1000)

    def publication(self, exchange: str, user_id: str | None = None) -> Publication:
        """This message, ready to publish to the control exchange.

        ``user_id``: the publishing connection's user (``Settings.broker_user``), which the
        broker validates, so the stream shows who appended it.
        """
        return Publication(
            exchange,
            "",
            self.model_dump_json(exclude_none=True).encode(),
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=str(uuid.uuid4()),
                type=f"rohrpost.control.{self.action}",
                user_id=user_id,
            ),
        )


class ControlState:
    """What the control stream says so far: cancelled, held, sent-now mails; paused routes.

    Thread-safe.
    A copy of a mail made by ``send_now`` or ``release`` carries the instruction's mark
    (milliseconds, see ``ControlMessage.mark``) in a header, so a worker tells it from
    the copy it replaces even before the instruction reached it through the stream.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled: set[uuid.UUID] = set()
        self._held: dict[uuid.UUID, int] = {}
        self._sent_now: dict[tuple[uuid.UUID, int], int] = {}
        self._paused: set[tuple[str, str | None]] = set()
        self._markers: set[str] = set()
        self._seen_marker = threading.Condition(self._lock)

    def apply(self, message: ControlMessage) -> bool:
        """Record ``message``; return True when it changed which routes are paused."""
        with self._lock:
            if message.action in MAIL_ACTIONS:
                self._apply_to_mail(message)
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

    def _apply_to_mail(self, message: ControlMessage) -> None:
        mail_id = message.mail_id
        assert mail_id is not None  # validated
        if message.action == "cancel":
            self._cancelled.add(mail_id)
        elif message.action == "hold":
            self._held[mail_id] = message.mark
        elif message.action == "release":
            self._held.pop(mail_id, None)
        elif message.round is not None:  # send_now
            key = (mail_id, message.round)
            self._sent_now[key] = max(self._sent_now.get(key, 0), message.mark)

    def is_cancelled(self, mail_id: uuid.UUID) -> bool:
        """True when an operator cancelled ``mail_id``."""
        with self._lock:
            return mail_id in self._cancelled

    def is_held(self, mail_id: uuid.UUID, released: int | None = None) -> bool:
        """True when an operator holds ``mail_id`` and this copy was not released since.

        ``released``: the mark of the release a copy carries (moved out of the held queue).
        """
        with self._lock:
            held_at = self._held.get(mail_id)
        return held_at is not None and (released is None or released < held_at)

    def is_superseded(self, mail_id: uuid.UUID, round: int, mark: int | None) -> bool:
        """True when ``send_now`` made a newer copy of ``mail_id`` in ``round`` than this one.

        ``mark``: the send-now mark this copy carries (None: the copy that was waiting).
        """
        with self._lock:
            newest = self._sent_now.get((mail_id, round))
        return newest is not None and (mark is None or mark < newest)

    def is_paused(self, tenant: str, app: str) -> bool:
        """True when tenant/app, or the whole tenant, is paused."""
        with self._lock:
            return (tenant, None) in self._paused or (tenant, app) in self._paused

    def wait_for_marker(self, token: str, timeout: float) -> bool:
        """Block until the marker ``token`` was replayed; False after ``timeout`` seconds."""
        with self._lock:
            return self._seen_marker.wait_for(lambda: token in self._markers, timeout)
