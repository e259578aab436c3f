"""The client services use to submit mails.

``submit`` returns once the broker confirmed the mail is stored in a quorum queue;
``submit_many`` keeps a window of publishes in flight and waits for their confirms
together, which is what makes bulk submission fast.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from rohrpost.shared.broker import BatchConfirm, Broker, Publication
from rohrpost.shared.container import MailContainer, encode_container, parse_container
from rohrpost.shared.errors import ContainerError, NotConfirmed, RohrpostError, UnknownRoute
from rohrpost.shared.logs import get_logger
from rohrpost.shared.settings import Settings
from rohrpost.shared.topology import Topology
from rohrpost.shared.wire import mail_properties

log = get_logger(__name__)

ContainerLike = MailContainer | Mapping[str, Any]


class SubmitManyError(RohrpostError):
    """``submit_many`` stopped; ``submitted`` holds the ids the broker confirmed before.

    When one mail was refused, ``position`` is its place in the input (the first
    mail is 1) and ``reason`` what was wrong with it (``field: message``).
    """

    def __init__(
        self,
        message: str,
        submitted: list[uuid.UUID],
        *,
        position: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.submitted = submitted
        self.position = position
        self.reason = reason


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
        if seconds > 0:
            exchange = self._topology.schedule_exchange
            routing_key = delay.routing_key(seconds, mail.tenant, mail.app)
        else:
            exchange = self._topology.submit_exchange
            routing_key = self._topology.route_key(mail.tenant, mail.app)
        return mail, Publication(exchange, routing_key, body, properties)

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
        window: int = 4000,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[uuid.UUID]:
        """Submit many mails with up to ``window`` unconfirmed at once; return their ids.

        Mails are validated in chunks of ``window // 2`` before any of a chunk is
        published; while one chunk waits for its confirms the next is validated, so
        the broker is never idle. When a mail is invalid, nothing of its chunk is
        published, everything before is confirmed, and SubmitManyError names its
        position (the first mail is #1) and carries the confirmed ids. When the broker
        fails to confirm, later mails may or may not be queued.
        """
        broker = self._require_broker()
        chunk_size = max(1, window // 2)
        confirmed: list[uuid.UUID] = []
        in_flight: deque[tuple[list[uuid.UUID], BatchConfirm]] = deque()

        def settle_oldest() -> None:
            ids, batch = in_flight.popleft()
            self._wait_batch(batch, ids)
            confirmed.extend(ids)
            if on_progress is not None:
                on_progress(len(ids))

        try:
            for start, chunk in _chunks(containers, chunk_size):
                prepared = []
                try:
                    for container in chunk:
                        prepared.append(self.prepare(container))
                except (ContainerError, UnknownRoute) as exc:
                    while in_flight:
                        settle_oldest()
                    position = start + len(prepared) + 1
                    raise SubmitManyError(
                        f"mail #{position}: {exc} ({len(confirmed)} mails before it were "
                        "confirmed; none after it was published)",
                        confirmed,
                        position=position,
                        reason=str(exc),
                    ) from exc
                if len(in_flight) >= 2:
                    settle_oldest()
                batch = broker.publish_many([publication for _, publication in prepared])
                in_flight.append(([mail.id for mail, _ in prepared], batch))
                # Validate the next chunk while the broker confirms this one, but not
                # while the I/O thread still writes it: two busy threads would only
                # fight over the GIL.
                batch.written.wait(self._timeout)
            while in_flight:
                settle_oldest()
        except NotConfirmed as exc:
            raise SubmitManyError(
                f"{exc} ({len(confirmed)} mails were confirmed before)", confirmed
            ) from exc
        return confirmed

    def _wait_batch(self, batch: BatchConfirm, ids: list[uuid.UUID]) -> None:
        if not batch.wait(self._timeout):
            raise NotConfirmed(
                f"no confirm from the broker within {self._timeout:g}s for {batch.size} mails "
                f"(first {ids[0]}); they may or may not be queued"
            )
        if batch.failures:
            index, error = batch.failures[0]
            raise NotConfirmed(f"mail {ids[index]}: {error}") from error

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


def _chunks(items: Iterable[ContainerLike], size: int) -> Iterator[tuple[int, list[ContainerLike]]]:
    """(position of the first, chunk) for consecutive chunks of ``size`` items."""
    chunk: list[ContainerLike] = []
    start = 0
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield start, chunk
            start += size
            chunk = []
    if chunk:
        yield start, chunk
