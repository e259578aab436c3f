"""The client services use to submit mails.

``submit`` returns once the broker confirmed the mail is stored in a quorum queue;
``submit_many`` keeps a window of publishes in flight and waits for their confirms
together, which is what makes bulk submission fast.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import structlog

from shared.broker import Broker, Publication
from shared.container import MailContainer, encode_container, parse_container
from shared.errors import ContainerError, NotConfirmed, RohrpostError, UnknownRoute
from shared.settings import Settings
from shared.topology import Topology
from shared.wire import mail_properties

log = structlog.get_logger(__name__)

ContainerLike = MailContainer | Mapping[str, Any]


class SubmitManyError(RohrpostError):
    """``submit_many`` stopped; ``submitted`` holds the ids the broker confirmed before."""

    def __init__(self, message: str, submitted: list[uuid.UUID]) -> None:
        super().__init__(message)
        self.submitted = submitted


class Producer:
    """Validates mails and publishes them to RabbitMQ with publisher confirms.

    Use as a context manager, or call ``connect()`` and ``close()``. Thread-safe.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], datetime] | None = None,
        broker: Broker | None = None,
    ) -> None:
        """``broker``: an already started connection to share (then ``close`` leaves it open)."""
        self._settings = settings
        self._topology = Topology.from_settings(settings)
        self._timeout = settings.publish_timeout.total_seconds()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._broker: Broker | None = broker
        self._owns_broker = broker is None

    def connect(self) -> Producer:
        """Open the connection; raise BrokerUnavailable when the broker cannot be reached."""
        if self._broker is None:
            broker = Broker(
                self._settings.broker_url.get_secret_value(),
                name=f"rohrpost-producer:{self._settings.namespace}",
            )
            broker.start()
            self._broker = broker
        return self

    def close(self) -> None:
        """Wait for outstanding confirms and close the connection."""
        if self._broker is not None and self._owns_broker:
            self._broker.close()
            self._broker = None

    def __enter__(self) -> Producer:
        return self.connect()

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    def prepare(
        self,
        container: ContainerLike,
        *,
        headers: Mapping[str, Any] | None = None,
        round: int = 0,
    ) -> tuple[MailContainer, Publication]:
        """Validate ``container`` for this installation and build its publication.

        Raises ContainerError or UnknownRoute naming the cause; publishes nothing.
        """
        mail = parse_container(container)
        app = self._settings.app(mail.tenant, mail.app)
        if app is None:
            raise UnknownRoute(f"tenant/app {mail.tenant}/{mail.app} is not configured")
        if not app.enabled:
            raise UnknownRoute(f"tenant/app {mail.tenant}/{mail.app} is disabled")
        now = self._clock()
        if mail.expires_at is not None and mail.expires_at <= now:
            raise ContainerError(f"expires_at: {mail.expires_at.isoformat()} is already past")
        body = encode_container(mail)
        properties = mail_properties(str(mail.id), round=round, headers=headers)
        delay = self._topology.delay
        seconds = delay.seconds(mail.not_before - now) if mail.not_before else 0
        routing_key = (
            delay.routing_key(seconds, mail.tenant, mail.app)
            if seconds > 0
            else self._topology.route_key(mail.tenant, mail.app)
        )
        return mail, Publication(self._topology.submit_exchange, routing_key, body, properties)

    def submit(
        self, container: ContainerLike, *, headers: Mapping[str, Any] | None = None
    ) -> uuid.UUID:
        """Submit one mail; return its id once the broker confirmed it.

        Raises ContainerError / UnknownRoute before publishing, NotConfirmed when the
        broker nacked or could not route it or did not answer within ``publish_timeout``.
        ``headers`` travel with the message (operator tools record who submitted).
        """
        mail, publication = self.prepare(container, headers=headers)
        self._wait(self._require_broker().publish(publication), mail.id)
        log.debug("mail submitted", mail_id=str(mail.id), tenant=mail.tenant, app=mail.app)
        return mail.id

    def submit_many(
        self,
        containers: Iterable[ContainerLike],
        *,
        window: int = 2000,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[uuid.UUID]:
        """Submit many mails with up to ``window`` unconfirmed at once; return their ids.

        Mails are validated in chunks of ``window`` before any of a chunk is published.
        When one is invalid, nothing of its chunk is published, everything before is
        confirmed, and SubmitManyError names its position and carries the confirmed
        ids. When the broker fails to confirm, later mails may or may not be queued.
        """
        broker = self._require_broker()
        confirms = _ConfirmWindow(window, self._wait, on_progress)
        chunk: list[tuple[uuid.UUID, Publication]] = []
        try:
            for position, container in enumerate(containers):
                try:
                    mail, publication = self.prepare(container)
                except (ContainerError, UnknownRoute) as exc:
                    confirms.finish()
                    raise SubmitManyError(
                        f"mail #{position}: {exc} ({len(confirms.confirmed)} mails before it "
                        "were confirmed; none after it was published)",
                        confirms.confirmed,
                    ) from exc
                chunk.append((mail.id, publication))
                if len(chunk) >= window:
                    confirms.publish(broker, chunk)
                    chunk.clear()
            confirms.publish(broker, chunk)
            confirms.finish()
        except NotConfirmed as exc:
            raise SubmitManyError(
                f"{exc} ({len(confirms.confirmed)} mails were confirmed before)",
                confirms.confirmed,
            ) from exc
        return confirms.confirmed

    def _require_broker(self) -> Broker:
        if self._broker is None:
            self.connect()
        assert self._broker is not None
        return self._broker

    def _wait(self, future: Future[None], mail_id: uuid.UUID) -> None:
        try:
            future.result(timeout=self._timeout)
        except TimeoutError:
            raise NotConfirmed(
                f"mail {mail_id}: no confirm from the broker within {self._timeout:g}s; "
                "it may or may not be queued"
            ) from None


class _ConfirmWindow:
    """Publishes while keeping at most ``size`` publishes unconfirmed."""

    def __init__(
        self,
        size: int,
        wait: Callable[[Future[None], uuid.UUID], None],
        on_progress: Callable[[int], None] | None,
    ) -> None:
        self._size = size
        self._wait = wait
        self._on_progress = on_progress
        self._in_flight: deque[tuple[uuid.UUID, Future[None]]] = deque()
        self.confirmed: list[uuid.UUID] = []

    def publish(self, broker: Broker, items: list[tuple[uuid.UUID, Publication]]) -> None:
        """Publish ``items``, waiting for the oldest confirms whenever the window is full."""
        for mail_id, publication in items:
            self._in_flight.append((mail_id, broker.publish(publication)))
            if len(self._in_flight) >= self._size:
                self._confirm_oldest()

    def finish(self) -> None:
        """Wait for every outstanding confirm."""
        while self._in_flight:
            self._confirm_oldest()

    def _confirm_oldest(self) -> None:
        mail_id, future = self._in_flight.popleft()
        self._wait(future, mail_id)
        self.confirmed.append(mail_id)
        if self._on_progress is not None:
            self._on_progress(1)
