"""The client services use to submit mails.

``submit`` returns once the broker confirmed the mail is stored in a quorum queue;
``submit_many`` keeps a window of publishes in flight and waits for their confirms
together, which is what makes bulk submission fast.
"""

from __future__ import annotations

import contextlib
import gc
import math
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, NoReturn

from rohrpost.shared.broker import BatchConfirm, Broker, Publication
from rohrpost.shared.container import MailContainer, encode_container, parse_container
from rohrpost.shared.errors import (
    BrokerError,
    ContainerError,
    DuplicateMail,
    NotConfirmed,
    RohrpostError,
    UnknownRoute,
)
from rohrpost.shared.idempotency import IdRegistry, Submission, Verdict, fingerprint
from rohrpost.shared.logs import get_logger
from rohrpost.shared.settings import Settings
from rohrpost.shared.state import SharedState
from rohrpost.shared.topology import Topology
from rohrpost.shared.wire import DUE_HEADER, mail_properties

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
        state: SharedState | None = None,
    ) -> None:
        """``broker``: an already started connection to share (then ``close`` leaves it open).

        ``state``: the shared state to record mail ids in (default: ``redis_url``'s).
        """
        self._settings = settings
        self._owns_state = state is None and settings.redis_url is not None
        if self._owns_state:
            assert settings.redis_url is not None
            state = SharedState(settings.redis_url.get_secret_value())
        self._state = state
        self._ids = IdRegistry(state, settings.namespace)
        self._topology = Topology.from_settings(settings)
        self._timeout = settings.publish_timeout.total_seconds()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._keeps: dict[tuple[str, str], int] = {}  # per route, see _keep_seconds
        # the validated user_id of every mail: who publishes it (the broker checks it)
        self._user = settings.broker_user
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
        self._ids.close()
        if self._broker is not None and self._owns_broker:
            self._broker.close()
            self._broker = None
        if self._owns_state and self._state is not None:
            self._state.close()

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
        mail, publication, _ = self._prepare(container, headers=headers, round=round)
        return mail, publication

    def _prepare(
        self,
        container: ContainerLike,
        *,
        headers: Mapping[str, Any] | None = None,
        round: int = 0,
    ) -> tuple[MailContainer, Publication, Submission]:
        """``prepare``, and what the id registry keeps of the mail: until its history is purged."""
        mail = parse_container(container)
        keep_seconds = self._keep_seconds(mail.tenant, mail.app)
        # Most bulk mails are due at once and never expire: no clock read for them.
        now = self._clock() if mail.not_before or mail.expires_at else None
        if mail.expires_at is not None and now is not None and mail.expires_at <= now:
            raise ContainerError(f"expires_at: {mail.expires_at.isoformat()} is already past")
        body = encode_container(mail)
        waits = (mail.not_before - now).total_seconds() if mail.not_before and now else 0.0
        if waits > 0 and mail.not_before is not None:
            # the worker that receives it early holds it on a timer until then
            due = math.ceil(mail.not_before.timestamp() * 1000)
            headers = {**(headers or {}), DUE_HEADER: due}
        properties = mail_properties(str(mail.id), round=round, headers=headers, user_id=self._user)
        seconds = self._topology.delay.release_seconds(waits) if waits > 0 else 0
        if seconds > 0:
            exchange = self._topology.schedule_exchange
            routing_key = self._topology.delayed_key(seconds, mail.tenant, mail.app, mail.priority)
        else:
            exchange = self._topology.submit_exchange
            routing_key = self._topology.route_key(mail.tenant, mail.app, mail.priority)
        ttl = int(max(0.0, waits)) + keep_seconds
        return (
            mail,
            Publication(exchange, routing_key, body, properties),
            Submission(mail.id, fingerprint(body), ttl),
        )

    def _keep_seconds(self, tenant: str, app: str) -> int:
        """How long tenant/app's history keeps a mail (a day more, to be sure); UnknownRoute
        when the route is not configured or disabled. Kept per route: asked for every mail."""
        keep = self._keeps.get((tenant, app))
        if keep is None:
            config = self._settings.app(tenant, app)
            if config is None:
                raise UnknownRoute(f"tenant/app {tenant}/{app} is not configured")
            if not config.enabled:
                raise UnknownRoute(f"tenant/app {tenant}/{app} is disabled")
            keep = self._keeps[(tenant, app)] = (config.retention_days + 1) * 86400
        return keep

    def submit(
        self, container: ContainerLike, *, headers: Mapping[str, Any] | None = None
    ) -> uuid.UUID:
        """Submit one mail; return its id once the broker confirmed it.

        Raises ContainerError / UnknownRoute before publishing, DuplicateMail when its
        id was submitted before (nothing is published), NotConfirmed when the broker
        nacked or could not route it or did not answer within ``publish_timeout``
        (then the id may be submitted again). ``headers`` travel with the message
        (operator tools record who submitted).
        """
        mail, publication, submission = self._prepare(container, headers=headers)
        verdict = self._ids.claim([submission])[0]
        if verdict in (Verdict.SAME, Verdict.DIFFERENT):
            raise DuplicateMail(mail.id, same_content=verdict is Verdict.SAME)
        try:
            self._wait(self._require_broker().publish(publication), mail.id)
        except BrokerError:
            self._ids.release([submission])
            raise
        log.debug("mail submitted", mail_id=str(mail.id), tenant=mail.tenant, app=mail.app)
        return mail.id

    def submit_many(
        self,
        containers: Iterable[ContainerLike],
        *,
        window: int = 4000,
        on_progress: Callable[[int], None] | None = None,
        on_duplicate: Callable[[int, uuid.UUID], None] | None = None,
    ) -> list[uuid.UUID]:
        """Submit many mails with up to ``window`` unconfirmed at once; return their ids.

        Mails are validated in chunks of ``window // 2`` before any of a chunk is
        published; while one chunk waits for its confirms the next is validated, so
        the broker is never idle. When a mail is invalid, nothing of its chunk is
        published, everything before is confirmed, and SubmitManyError names its
        position (the first mail is #1) and carries the confirmed ids. When the broker
        fails to confirm, later mails may or may not be queued.

        A mail whose id was submitted before stops the run the same way, unless
        ``on_duplicate`` is given and its content is the same: then it is skipped
        (not published, not among the returned ids) and ``on_duplicate(position,
        mail_id)`` is called (position from 1). A different mail under a used id always
        stops the run.
        """
        bulk = _Bulk(self._require_broker(), self._ids, self._timeout, on_progress)
        claimed: _Claimed | None = None  # its ids are being recorded; published next
        try:
            for start, chunk in _chunks(containers, max(1, window // 2)):
                publications, submissions, refused = self._prepare_chunk(chunk)
                if claimed is not None:
                    self._publish_claimed(claimed, bulk, on_duplicate)
                    claimed = None
                if refused is not None:
                    bulk.stop(start + len(publications) + 1, refused)
                verdicts = self._ids.claim_soon(submissions)
                claimed = _Claimed(start, publications, submissions, verdicts)
            if claimed is not None:
                self._publish_claimed(claimed, bulk, on_duplicate)
            bulk.settle_all()
        except NotConfirmed as exc:
            bulk.abandon()
            raise SubmitManyError(
                f"{exc} ({len(bulk.confirmed)} mails were confirmed before)", bulk.confirmed
            ) from exc
        return bulk.confirmed

    def _prepare_chunk(
        self, chunk: list[ContainerLike]
    ) -> tuple[list[Publication], list[Submission], ContainerError | UnknownRoute | None]:
        """The chunk's publications and id records up to its first refused mail, and why
        that one was refused. The validated mails are not kept: fewer objects alive."""
        publications: list[Publication] = []
        submissions: list[Submission] = []
        try:
            with _collector_paused():
                for container in chunk:
                    _, publication, submission = self._prepare(container)
                    publications.append(publication)
                    submissions.append(submission)
        except (ContainerError, UnknownRoute) as exc:
            return publications, submissions, exc
        return publications, submissions, None

    def _publish_claimed(
        self,
        claimed: _Claimed,
        bulk: _Bulk,
        on_duplicate: Callable[[int, uuid.UUID], None] | None,
    ) -> None:
        """Publish a chunk once its ids are recorded; stop at an id submitted before."""
        verdicts = claimed.verdicts.result()
        kept: list[tuple[Publication, Submission]] = []
        items = zip(claimed.publications, claimed.submissions, verdicts, strict=True)
        for offset, (publication, submission, verdict) in enumerate(items):
            position = claimed.start + offset + 1
            if verdict is Verdict.SAME and on_duplicate is not None:
                on_duplicate(position, submission.mail_id)
            elif verdict in (Verdict.SAME, Verdict.DIFFERENT):
                self._ids.release(
                    [s for s, v in zip(claimed.submissions, verdicts, strict=True) if _fresh(v)]
                )
                same = verdict is Verdict.SAME
                bulk.stop(position, DuplicateMail(submission.mail_id, same_content=same))
            else:
                kept.append((publication, submission))
        if kept:
            bulk.publish(kept)

    def _require_broker(self) -> Broker:
        if self._broker is None:
            self.connect()
        assert self._broker is not None
        return self._broker

    def _wait(self, future: Future[None], mail_id: uuid.UUID) -> None:
        try:
            future.result(timeout=self._timeout)
        except TimeoutError:
            broker = self._require_broker()
            why = broker.holding()
            if broker.withdraw(future):
                raise NotConfirmed(
                    f"mail {mail_id}: not submitted: {why} for {self._timeout:g}s; "
                    "nothing was published, submit it again later"
                ) from None
            blocked = f" ({why})" if broker.blocked else ""
            raise NotConfirmed(
                f"mail {mail_id}: no confirm from the broker within {self._timeout:g}s"
                f"{blocked}; it may or may not be queued"
            ) from None


@dataclass(frozen=True, slots=True)
class _Claimed:
    """A prepared chunk whose ids are being recorded (``verdicts``), to be published next."""

    start: int  # position of its first mail in the input, from 0
    publications: list[Publication]
    submissions: list[Submission]
    verdicts: Future[list[Verdict]]


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for one chunk's validation.

    Validating a chunk allocates some 20 containers a mail; with the collector on, it
    ran every ~70 mails and, with the caller's mails and the chunks in flight all
    alive, took ~20 µs a mail of ``submit_many`` (``gc.callbacks``, 20,000 mails). Paused,
    it runs once a chunk. Reference counting frees everything meanwhile; nothing here
    makes cycles. The pause is process-wide, and never longer than one chunk.
    """
    if not gc.isenabled():  # paused by the caller or by another thread's chunk
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _fresh(verdict: Verdict) -> bool:
    """The id was recorded by this call (so it is to be released if not published)."""
    return verdict is Verdict.NEW


class _Bulk:
    """The chunks of one ``submit_many`` in flight: published, awaiting confirms."""

    def __init__(
        self,
        broker: Broker,
        ids: IdRegistry,
        timeout: float,
        on_progress: Callable[[int], None] | None,
    ) -> None:
        self._broker = broker
        self._ids = ids
        self._timeout = timeout
        self._on_progress = on_progress
        self._in_flight: deque[tuple[list[Submission], BatchConfirm]] = deque()
        self.confirmed: list[uuid.UUID] = []

    def publish(self, items: list[tuple[Publication, Submission]]) -> None:
        """Publish one chunk, after the oldest of two chunks in flight is confirmed."""
        submissions = [submission for _, submission in items]
        if len(self._in_flight) >= 2:
            try:
                self._settle_oldest()
            except NotConfirmed:
                self._ids.release(submissions)  # recorded, but never to be published
                raise
        batch = self._broker.publish_many([publication for publication, _ in items])
        self._in_flight.append((submissions, batch))
        # Validate the next chunk while the broker confirms this one, but not while
        # the I/O thread still writes it: two busy threads would only fight over the GIL.
        batch.written.wait(self._timeout)

    def settle_all(self) -> None:
        """Wait for every chunk in flight to be confirmed."""
        while self._in_flight:
            self._settle_oldest()

    def stop(self, position: int, exc: RohrpostError) -> NoReturn:
        """End the run at mail #``position`` (from 1); what is in flight is confirmed first."""
        self.settle_all()
        raise SubmitManyError(
            f"mail #{position}: {exc} ({len(self.confirmed)} mails before it were "
            "confirmed; none after it was published)",
            self.confirmed,
            position=position,
            reason=str(exc),
        ) from exc

    def abandon(self) -> None:
        """Take back what was never written of the chunks still in flight; forget their ids.

        The run stopped: those mails will not be published later behind the caller's back.
        """
        while self._in_flight:
            submissions, batch = self._in_flight.popleft()
            withdrawn = self._broker.withdraw_batch(batch)
            self._ids.release([submissions[index] for index in withdrawn])

    def _settle_oldest(self) -> None:
        submissions, batch = self._in_flight.popleft()
        if not batch.wait(self._timeout):
            withdrawn = self._broker.withdraw_batch(batch)
            self._ids.release(submissions)
            if len(withdrawn) == batch.size:
                raise NotConfirmed(
                    f"{batch.size} mails (first {submissions[0].mail_id}) not submitted: "
                    f"{self._broker.holding()} for {self._timeout:g}s; "
                    "none of them was published"
                )
            blocked = f" ({self._broker.holding()})" if self._broker.blocked else ""
            raise NotConfirmed(
                f"no confirm from the broker within {self._timeout:g}s for {batch.size} mails "
                f"(first {submissions[0].mail_id}){blocked}; they may or may not be queued"
            )
        if batch.failures:
            self._ids.release([submissions[index] for index, _ in batch.failures])
            index, error = batch.failures[0]
            raise NotConfirmed(f"mail {submissions[index].mail_id}: {error}") from error
        self.confirmed.extend(submission.mail_id for submission in submissions)
        if self._on_progress is not None:
            self._on_progress(len(submissions))


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
