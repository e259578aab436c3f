"""Turns one delivery into an outcome: the single place that decides send, retry or dead-letter."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from rohrpost.consumer.addresses import envelope_address
from rohrpost.consumer.mime import build_message, message_id
from rohrpost.consumer.outcome import (
    THROTTLED,
    Cancelled,
    DeadLetter,
    Duplicate,
    Expired,
    Held,
    Outcome,
    Processed,
    Redelay,
    Retry,
    Sent,
)
from rohrpost.consumer.render import TemplateRenderer
from rohrpost.consumer.smtp import Transport
from rohrpost.shared.broker import Delivery
from rohrpost.shared.container import MailContainer, decode_container
from rohrpost.shared.control import ControlState
from rohrpost.shared.errors import (
    ContainerError,
    DeliveryError,
    PermanentDeliveryError,
    RenderError,
    ThrottledDeliveryError,
    TransientDeliveryError,
    UnencodableMail,
)
from rohrpost.shared.idempotency import Claim, ClaimState, SendClaims
from rohrpost.shared.logs import get_logger
from rohrpost.shared.settings import AppConfig, Settings
from rohrpost.shared.topology import Topology
from rohrpost.shared.wire import (
    FORBIDDEN,
    RELEASED_HEADER,
    SEND_NOW_HEADER,
    attempt_of,
    mark_of,
    publisher_refused,
    round_of,
    throttled_of,
)

log = get_logger(__name__)

#: A copy that another worker is sending right now is looked at again after this.
BUSY_RETRY_SECONDS = 5
#: A mail the server throttled comes back after this, then waits for a turn at the
#: server's lowered rate (rohrpost.consumer.limits).
THROTTLED_RETRY_SECONDS = 1
#: Throttling replies a mail may get without spending attempts; after that each one
#: counts, so a server that throttles forever still ends in a dead letter.
THROTTLE_BUDGET = 20
#: A mail that arrives at most this early is held until it is due, on the sender thread;
#: one that arrives earlier is delayed again. Scheduled mails that say when they are due
#: wait on the worker's timer instead (``rohrpost.consumer.due``); this is for the rest:
#: mails published without the mark, clocks that differ.
HOLD_SECONDS = 2.0


class MailProcessor:
    """Validates, checks timing, renders and sends one delivery; never raises for a bad mail."""

    def __init__(
        self,
        settings: Settings,
        topology: Topology,
        renderer: TemplateRenderer,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        control: ControlState | None = None,
        claims: SendClaims | None = None,
    ) -> None:
        """``control``: the operators' instructions (cancel, hold, send now) so far.

        ``claims``: where workers agree that a mail is sent once per round (None: nowhere).
        """
        self._claims = claims or SendClaims(None, settings.namespace)
        self._control = control or ControlState()
        self._settings = settings
        self._topology = topology
        self._renderer = renderer
        self._now = clock
        self._rng = rng or random.Random()
        self._queue_routes = {queue: lane.route for queue, lane in topology.lanes().items()}
        # who may publish into each send queue, for the tenants that name their publishers
        self._queue_publishers = {
            queue: allowed
            for queue, (tenant, _) in self._queue_routes.items()
            if (allowed := settings.publishers(tenant)) is not None
        }

    def route_of(self, queue: str) -> tuple[str, str]:
        """(tenant, app) of a send queue (any of its lanes)."""
        return self._queue_routes[queue]

    def forbidden(self, delivery: Delivery) -> DeadLetter | None:
        """The dead letter for a delivery its route's tenant does not accept from its
        publisher: the tenant names its ``publishers``, and the broker-validated
        ``user_id`` is none of them (nor this installation's own user), or is missing."""
        allowed = self._queue_publishers.get(delivery.queue)
        tenant = self._queue_routes[delivery.queue][0]
        why = publisher_refused(delivery.properties, allowed, tenant)
        return None if why is None else DeadLetter(FORBIDDEN, why)

    def claim_key(self, delivery: Delivery) -> str | None:
        """The send-claim key the delivery's properties name (mail id and round), if any.

        None for a delivery that is to be dead-lettered ``forbidden``: it takes no claim.
        """
        mail_id = delivery.properties.message_id
        if not isinstance(mail_id, str) or not mail_id or self.forbidden(delivery) is not None:
            return None
        route = self._queue_routes[delivery.queue]
        return self._claims.key(route, mail_id, round_of(delivery.properties))

    def process(
        self, delivery: Delivery, transport: Transport, claim: Claim | None = None
    ) -> Processed:
        """Decide what to do with ``delivery``, sending it if it is due.

        ``claim``: the send claim taken for it on arrival (else it is taken here).
        """
        tenant, app = self._queue_routes[delivery.queue]
        attempt = attempt_of(delivery.properties)
        structlog.contextvars.bind_contextvars(
            mail_id=delivery.properties.message_id, tenant=tenant, app=app, attempt=attempt
        )
        # Before any claim, template or server: a mail the tenant does not accept from its
        # publisher. One that was claimed on arrival passed this check in ``claim_key``.
        if claim is None and (forbidden := self.forbidden(delivery)) is not None:
            return Processed(delivery, _readable(delivery), attempt, forbidden, tenant, app)
        try:
            mail = decode_container(delivery.body)
        except ContainerError as exc:
            self._claims.release(claim)
            return Processed(delivery, None, attempt, DeadLetter("invalid", str(exc)), tenant, app)
        structlog.contextvars.bind_contextvars(mail_id=str(mail.id))
        measured = _Measured()
        try:
            job = _Job(
                mail,
                attempt,
                tenant,
                app,
                round_of(delivery.properties),
                send_now=mark_of(delivery.properties, SEND_NOW_HEADER),
                released=mark_of(delivery.properties, RELEASED_HEADER),
                throttled=throttled_of(delivery.properties),
            )
            outcome = self._decide(job, _Sending(transport, measured), claim)
        except Exception as exc:
            # A bug or an unforeseen environment failure: never crash the worker, never
            # spin on the message; treat it like a transient failure.
            log.exception("unexpected error while processing a mail")
            outcome = self._transient(mail, attempt, tenant, app, f"{type(exc).__name__}: {exc}")
        return Processed(
            delivery,
            mail,
            attempt,
            outcome,
            tenant,
            app,
            render_seconds=measured.render,
            send_seconds=measured.send,
            smtp_error=measured.smtp_error,
        )

    def _decide(self, job: _Job, transport: _Sending, claim: Claim | None) -> Outcome:
        mail, tenant, app = job.mail, job.tenant, job.app
        config = self._settings.app(tenant, app)
        assert config is not None  # we only consume queues of configured apps
        stop: Outcome | None = None
        if (mail.tenant, mail.app) != (tenant, app):
            stop = DeadLetter("misrouted", f"mail for {mail.tenant}/{mail.app} in {tenant}/{app}")
        if stop is not None or (stop := self._not_now(job)) is not None:
            self._claims.release(claim)
            return stop
        if claim is None or not claim.is_for(self._claims.key((tenant, app), mail.id, job.round)):
            # none taken on arrival, or the properties named another id than the mail
            self._claims.release(claim)
            claim = self._claims.claim((tenant, app), mail.id, job.round)
        if claim.state is ClaimState.SENT:
            return Duplicate()
        if claim.state is ClaimState.BUSY:
            return Redelay(BUSY_RETRY_SECONDS, "being sent by another worker")
        if self._control.is_cancelled(mail.id):  # read while the claim was being taken
            self._claims.release(claim)
            return Cancelled()
        try:
            outcome = self._attempt(job, config, transport)
        except BaseException:
            self._claims.release(claim)
            raise
        if isinstance(outcome, Sent):
            self._claims.sent(claim, (config.retention_days + 1) * 86400)
        else:
            self._claims.release(claim)
        return outcome

    def _attempt(self, job: _Job, config: AppConfig, transport: _Sending) -> Outcome:
        """Render and send the mail once; the outcome of this attempt."""
        mail, attempt, tenant, app = job.mail, job.attempt, job.tenant, job.app
        try:
            return self._send(mail, config, transport)
        except ThrottledDeliveryError as exc:
            if job.throttled >= THROTTLE_BUDGET:
                return self._transient(mail, attempt, tenant, app, str(exc))
            # The server's limit, not the mail's fault: not an attempt.
            return Redelay(THROTTLED_RETRY_SECONDS, THROTTLED, str(exc))
        except TransientDeliveryError as exc:
            return self._transient(mail, attempt, tenant, app, str(exc))
        except (RenderError, PermanentDeliveryError, UnencodableMail, UnicodeError) as exc:
            return _permanent(exc)

    def _not_now(self, job: _Job) -> Outcome | None:
        """Why the job's mail is not to be sent now, if it is not.

        A mail due within HOLD_SECONDS is waited for on this sender thread, then looked
        at again (an operator may have cancelled it meanwhile); one due later is
        delayed again.
        """
        stop, early = self._stopped(job), self._early(job.mail)
        if stop is None and 0 < early <= HOLD_SECONDS:
            time.sleep(early)
            stop, early = self._stopped(job), self._early(job.mail)
        if stop is not None:
            return stop
        return Redelay(math.ceil(early)) if early > 0 else None

    def _stopped(self, job: _Job) -> Outcome | None:
        """Why the job's mail is not to be sent at all, if it is not."""
        mail, control = job.mail, self._control
        if control.is_cancelled(mail.id):
            return Cancelled()
        if control.is_superseded(mail.id, job.round, job.send_now):
            return Duplicate("superseded")
        if control.is_held(mail.id, job.released):
            return Held()
        if mail.expires_at is not None and mail.expires_at.timestamp() <= self._now():
            return Expired()
        return None

    def _early(self, mail: MailContainer) -> float:
        """Seconds until ``mail`` is due (none or negative: it is due)."""
        return mail.not_before.timestamp() - self._now() if mail.not_before else 0.0

    def _transient(
        self, mail: MailContainer, attempt: int, tenant: str, app: str, error: str
    ) -> Outcome:
        config = self._settings.app(tenant, app)
        assert config is not None
        if attempt >= (mail.max_attempts or config.max_attempts):
            return DeadLetter("max_attempts", error)
        delay = config.backoff.delay(attempt, self._rng)
        return Retry(self._topology.delay.seconds(delay), error)

    def _send(self, mail: MailContainer, config: AppConfig, sending: _Sending) -> Sent:
        started = time.perf_counter()
        rendered = self._renderer.render(mail)
        sender = mail.from_ or config.sender
        msg_id = message_id(mail, sender)
        message = build_message(mail, rendered, sender=sender, msg_id=msg_id)
        sending.measured.render = time.perf_counter() - started
        recipients = list(dict.fromkeys(envelope_address(r) for r in mail.recipients))
        reply = sending.send(config.smtp, envelope_address(sender), recipients, message)
        return Sent(reply, msg_id, rendered.subject)


def _readable(delivery: Delivery) -> MailContainer | None:
    """The mail in ``delivery``, if it holds one; else None."""
    try:
        return decode_container(delivery.body)
    except ContainerError:
        return None


def _permanent(exc: Exception) -> DeadLetter:
    """The dead letter for a failure that retrying cannot mend."""
    match exc:
        case RenderError():
            return DeadLetter("template_error", str(exc))
        case PermanentDeliveryError():
            return DeadLetter("rejected", str(exc))
        case UnencodableMail():
            return DeadLetter("unencodable", str(exc))
    # A UnicodeError that escaped translation: how a text encodes does not change.
    return DeadLetter("unencodable", f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True, slots=True)
class _Job:
    """One delivery's mail, with where and how often it was tried."""

    mail: MailContainer
    attempt: int
    tenant: str
    app: str
    round: int
    #: operator marks the copy carries (ms): made by send-now, moved back by release
    send_now: int | None = None
    released: int | None = None
    #: how often the server throttled it before (not counted as attempts)
    throttled: int = 0


@dataclass
class _Measured:
    render: float | None = None
    send: float | None = None
    smtp_error: str | None = None


@dataclass
class _Sending:
    """A transport that times the transaction and notes the class of a failure."""

    transport: Transport
    measured: _Measured

    def send(self, server: str, sender: str, recipients: list[str], message: bytes) -> str:
        started = time.perf_counter()
        try:
            return self.transport.send(server, sender, recipients, message)
        except DeliveryError as exc:
            code = exc.code
            self.measured.smtp_error = f"{code // 100}xx" if code else "connection"
            raise
        finally:
            self.measured.send = time.perf_counter() - started
