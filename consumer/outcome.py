"""What became of one delivery, and the messages that record it.

The worker acks a delivery only after the mail's own publication (into the delay
levels, or to the dead-letter queue) and its event are confirmed: a crash in
between leaves a duplicate, never a loss.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass

from rohrpost.shared.broker import Delivery, Publication
from rohrpost.shared.container import DEFAULT_PRIORITY, MailContainer
from rohrpost.shared.events import INVALID_BODY, EventKind, MailEvent
from rohrpost.shared.preview import as_text
from rohrpost.shared.topology import Topology
from rohrpost.shared.wire import (
    ATTEMPTS_HEADER,
    DEAD_AT_HEADER,
    ERROR_HEADER,
    LIMITED_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    THROTTLED_HEADER,
    carried_headers,
    header_text,
    mail_properties,
    round_of,
    throttled_of,
)


@dataclass(frozen=True, slots=True)
class Sent:
    """The SMTP server accepted the mail."""

    reply: str
    message_id: str
    subject: str


@dataclass(frozen=True, slots=True)
class Retry:
    """A transient failure; try again after ``delay_seconds``."""

    delay_seconds: int
    error: str


#: Why a mail is delayed again without an attempt: a rate limit's turn is further
#: off than a worker waits (rohrpost.consumer.limits), or the server throttled it.
RATE_LIMITED = "rate_limited"
THROTTLED = "throttled"


@dataclass(frozen=True, slots=True)
class Redelay:
    """Not to be sent now; back into the delay levels, same attempt.

    It arrived before its ``not_before`` (clock skew, or a delay longer than one
    pass), another worker is sending a copy of it right now, its turn under a rate
    limit is further off (``RATE_LIMITED``), or the server throttled it
    (``THROTTLED``, with the reply as ``error``).
    """

    delay_seconds: int
    why: str = "early"
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Expired:
    """Past ``expires_at``: not sent."""


@dataclass(frozen=True, slots=True)
class Cancelled:
    """An operator cancelled it: not sent."""


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Sent before in this round (another copy of it): dropped, not sent again.

    ``reason`` ``superseded``: an operator's ``send-now`` made a newer copy of it.
    """

    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Held:
    """An operator holds it: set aside in its route's held queue until released."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Will not be sent: moved to the dead-letter queue with the reason."""

    reason: str
    error: str


Outcome = Sent | Retry | Redelay | Expired | Cancelled | Duplicate | Held | DeadLetter


@dataclass(frozen=True, slots=True)
class Processed:
    """A delivery, the mail in it (None if unreadable), its attempt number and outcome."""

    delivery: Delivery
    mail: MailContainer | None
    attempt: int
    outcome: Outcome
    tenant: str
    app: str
    render_seconds: float | None = None
    send_seconds: float | None = None
    #: "4xx", "5xx" or "connection" when the SMTP transaction failed.
    smtp_error: str | None = None

    @property
    def round(self) -> int:
        """How often an operator re-submitted this mail."""
        return round_of(self.delivery.properties)


def mail_publication(
    topology: Topology, processed: Processed, user_id: str | None = None
) -> Publication | None:
    """The mail itself, moved on: into the delay levels, or to the dead-letter queue.

    ``user_id``: the worker's own broker user, which its publishes carry (validated by
    the broker): a tenant that names its ``publishers`` accepts it back.
    """
    outcome = processed.outcome
    delivery = processed.delivery
    mail_id = str(processed.mail.id) if processed.mail else delivery.properties.message_id
    headers: dict[str, object] = {**carried_headers(delivery.properties)}
    attempt = processed.attempt
    match outcome:
        case Retry(delay, error):
            headers[ERROR_HEADER] = header_text(error)
            attempt += 1
            target = _delayed(topology, processed, delay)
        case Redelay(delay, why):
            if why in (RATE_LIMITED, THROTTLED):
                headers[LIMITED_HEADER] = 1  # it waited its turn: not behind those waiting
            if why == THROTTLED:
                headers[THROTTLED_HEADER] = throttled_of(delivery.properties) + 1
            target = _delayed(topology, processed, delay)
        case Held():
            target = ("", topology.held_queue(processed.tenant, processed.app))
        case DeadLetter(reason, error):
            headers = {
                REASON_HEADER: reason,
                ERROR_HEADER: header_text(error),
                ATTEMPTS_HEADER: processed.attempt,
                DEAD_AT_HEADER: int(time.time()),
                QUEUE_HEADER: delivery.queue,
            }
            target = (topology.dead_exchange, topology.route_key(processed.tenant, processed.app))
        case _:
            return None
    properties = mail_properties(
        mail_id, attempt=attempt, round=processed.round, headers=headers, user_id=user_id
    )
    return Publication(*target, delivery.body, properties)


def _delayed(topology: Topology, processed: Processed, delay: int) -> tuple[str, str]:
    """Exchange and routing key that bring the mail back into its own lane after ``delay``."""
    priority = processed.mail.priority if processed.mail else DEFAULT_PRIORITY
    return (
        topology.delay.entry_exchange,
        topology.delayed_key(delay, processed.tenant, processed.app, priority),
    )


#: How much of a dead letter that is not a mail container its event carries (characters).
INVALID_BODY_SHOWN = 64 * 1024


def invalid_body(delivery: Delivery) -> dict[str, object]:
    """What the history keeps of a message that is not a mail container: its start, size, hash.

    The whole message stays in the dead-letter queue; the hash names it there.
    """
    message_id = delivery.properties.message_id
    return {
        INVALID_BODY: hashlib.sha256(delivery.body).hexdigest(),
        "body_size": len(delivery.body),
        "body": as_text(delivery.body, INVALID_BODY_SHOWN),
        "message_id": message_id if isinstance(message_id, str) else None,
    }


def cancelled_event_id(mail_id: uuid.UUID, round: int) -> uuid.UUID:
    """The one id of a mail's ``cancelled`` event in a round, whoever records it."""
    return uuid.uuid5(mail_id, f"cancelled.{round}")


def outcome_event(processed: Processed) -> MailEvent | None:
    """The event recording ``processed``'s outcome (none for an early arrival)."""
    outcome = processed.outcome
    common = {
        "mail_id": processed.mail.id if processed.mail else None,
        "tenant": processed.tenant,
        "app": processed.app,
        "attempt": processed.attempt,
        "round": processed.round,
    }
    match outcome:
        case Sent(reply, message_id, subject):
            return MailEvent(
                kind=EventKind.SENT,
                smtp_reply=reply,
                message_id=message_id,
                subject=subject,
                **common,
            )
        case Retry(delay, error):
            return MailEvent(
                kind=EventKind.ATTEMPT_FAILED, error=error, retry_in_seconds=delay, **common
            )
        case Cancelled():
            # The same id as the event `rohrpost cancel` recorded, so it is stored once.
            assert processed.mail is not None
            return MailEvent(
                kind=EventKind.CANCELLED,
                event_id=cancelled_event_id(processed.mail.id, processed.round),
                **common,
            )
        case DeadLetter(reason, error):
            detail = None if processed.mail else invalid_body(processed.delivery)
            return MailEvent(
                kind=EventKind.DEAD_LETTERED, reason=reason, error=error, detail=detail, **common
            )
        case Expired() | Duplicate():
            duplicate = isinstance(outcome, Duplicate)
            return MailEvent(
                kind=EventKind.DUPLICATE if duplicate else EventKind.EXPIRED,
                reason=outcome.reason if isinstance(outcome, Duplicate) else None,
                **common,
            )
    return None  # delayed again, or held: the operator recorded the hold
