"""What each message on ``{ns}.history`` stands for: history records, or why it cannot.

Three kinds arrive: a submitted mail (its container, from the submit and schedule
exchanges), one event (operator tools), and a batch of events (workers, many tenants
in one message). A batch is read in one pass; only when that fails is it read event
by event, so one bad event is set aside alone, not with the events batched with it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import pika
from pydantic import TypeAdapter, ValidationError

from rohrpost.consumer.events import BATCH_TYPE, batch_body
from rohrpost.shared.archive import ArchivedMail, read_archived
from rohrpost.shared.broker import Delivery
from rohrpost.shared.container import (
    DEFAULT_PRIORITY,
    PRIORITIES,
    describe_validation_error,
    parse_container,
)
from rohrpost.shared.errors import ContainerError
from rohrpost.shared.events import EventKind, MailEvent
from rohrpost.shared.settings import Settings
from rohrpost.shared.storable import storable_text, timestamp_datetime
from rohrpost.shared.store import HistoryRecord
from rohrpost.shared.wire import (
    ACTOR_HEADER,
    ERROR_HEADER,
    REASON_HEADER,
    header_text,
    publisher_refused,
    round_of,
    user_id_of,
)

#: Why a message was set aside: it could not be read, or the store refused it.
UNREADABLE = "unreadable"
UNSTORABLE = "unstorable"

_EVENT_BATCH = TypeAdapter(list[MailEvent])
_OCTAL_DIGITS = frozenset("01234567")
#: What follows tenant.app in a routing key, per lane (see Topology.route_key).
_LANE_WORDS = tuple([] if p == DEFAULT_PRIORITY else [p] for p in PRIORITIES)


@dataclass(frozen=True, slots=True)
class Part:
    """The records of one message, or of some events of one batch message."""

    delivery: Delivery
    records: list[HistoryRecord]
    batched: bool = False

    def split(self) -> list[Part]:
        """One part per event of a batch message; any other message stays whole."""
        if not self.batched or len(self.records) < 2:
            return [self]
        return [Part(self.delivery, [record], batched=True) for record in self.records]

    def body(self) -> bytes:
        """The message to set aside when the store refuses these records."""
        if self.batched:
            return batch_body([record.event for record in self.records])
        return self.delivery.body


@dataclass(frozen=True, slots=True)
class Rejection:
    """A message, or one event of a batch, set aside: why, and the store's or parser's words."""

    delivery: Delivery
    body: bytes
    reason: str
    error: str

    def properties(self) -> pika.BasicProperties:
        """The original's properties, with ``x-rohrpost-reason`` and ``x-rohrpost-error``.

        Not its expiration (it would expire while kept) nor its user id (the broker
        refuses a publish whose user id is not the connection's).
        """
        original = self.delivery.properties
        headers = original.headers if isinstance(original.headers, dict) else {}
        return pika.BasicProperties(
            content_type=original.content_type,
            content_encoding=original.content_encoding,
            headers={**headers, REASON_HEADER: self.reason, ERROR_HEADER: self.error},
            delivery_mode=2,
            correlation_id=original.correlation_id,
            message_id=original.message_id,
            timestamp=original.timestamp,
            type=original.type,
            app_id=original.app_id,
        )


def describe(exc: BaseException) -> str:
    """One storable line naming what is wrong (the field, for validation errors)."""
    if isinstance(exc, ValidationError):
        text = describe_validation_error(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return header_text(storable_text(text))


def read(delivery: Delivery, settings: Settings) -> tuple[list[Part], list[Rejection]]:
    """The parts ``delivery`` stands for, and what of it cannot be read; never raises."""
    try:
        if delivery.properties.type == BATCH_TYPE:
            return _read_batch(delivery)
        return [Part(delivery, records_from(delivery, settings))], []
    except Exception as exc:  # whatever a message holds, it is set aside, never fatal
        return [], [Rejection(delivery, delivery.body, UNREADABLE, describe(exc))]


def _read_batch(delivery: Delivery) -> tuple[list[Part], list[Rejection]]:
    try:
        events = _EVENT_BATCH.validate_json(delivery.body)
        return [Part(delivery, [HistoryRecord(e) for e in events], batched=True)], []
    except ValidationError:
        pass  # read it event by event below
    items = json.loads(delivery.body)
    if not isinstance(items, list):
        raise ValueError("a batch of events must be a JSON array")
    records, rejections = [], []
    for item in items:
        try:
            records.append(HistoryRecord(MailEvent.model_validate(item)))
        except ValidationError as exc:
            body = json.dumps([item]).encode()
            rejections.append(Rejection(delivery, body, UNREADABLE, describe(exc)))
    parts = [Part(delivery, records, batched=True)] if records else []
    return parts, rejections


def records_from(delivery: Delivery, settings: Settings) -> list[HistoryRecord]:
    """The records a submitted mail or a single event stands for; raises when unreadable."""
    kind = delivery.properties.type or ""
    if kind.startswith("rohrpost.event."):
        return [_event_record(MailEvent.model_validate_json(delivery.body), settings)]
    mail, text = read_archived(delivery.body)
    _require_own_route(delivery, mail, settings)
    _require_publisher(delivery, mail, settings)
    if mail.created_at is None:
        mail = mail.model_copy(update={"created_at": _published_at(delivery)})
    assert mail.created_at is not None
    round_ = round_of(delivery.properties)
    common = {"mail_id": mail.id, "tenant": mail.tenant, "app": mail.app, "round": round_}
    submitted = MailEvent(
        event_id=uuid.uuid5(mail.id, f"submitted.{round_}"),
        kind=EventKind.SUBMITTED if round_ == 0 else EventKind.RESUBMITTED,
        at=mail.created_at if round_ == 0 else _published_at(delivery),
        actor=_actor(delivery, settings),
        **common,
    )
    app = settings.app(mail.tenant, mail.app)
    sender = mail.from_ or (app.sender if app else None)
    records = [HistoryRecord(submitted, mail, sender, container_json=text)]
    if mail.not_before is not None and mail.not_before > mail.created_at:
        scheduled = MailEvent(
            event_id=uuid.uuid5(mail.id, f"scheduled.{round_}"),
            kind=EventKind.SCHEDULED,
            at=mail.created_at,
            **common,
        )
        records.append(HistoryRecord(scheduled))
    return records


def _require_own_route(delivery: Delivery, mail: ArchivedMail, settings: Settings) -> None:
    """ContainerError unless a submitted container came by its own route's routing key.

    Through the submit exchange the key is ``tenant.app[.lane]``, through the schedule
    exchange the delay's digits come first. A worker dead-letters such a mail
    ``misrouted``; archived under the tenant it names, it would be another tenant's
    mail in the history. One put on the queue by hand (its name as key) is not checked.
    """
    key = delivery.routing_key
    if key == f"{settings.namespace}.history":
        return
    words = key.split(".")
    for lane in _LANE_WORDS:
        route = [mail.tenant, mail.app, *lane]
        delay = words[: len(words) - len(route)]
        # the delay's digits are not counted: they depend on max_delay, read elsewhere
        if words[len(delay) :] == route and all(d in _OCTAL_DIGITS for d in delay):
            return
    raise ContainerError(
        f"tenant/app: a mail for {mail.tenant}/{mail.app} published with routing key {key!r}"
    )


def _require_publisher(delivery: Delivery, mail: ArchivedMail, settings: Settings) -> None:
    """ContainerError for a submitted container its tenant does not accept from the broker
    user that published it (the tenant names its ``publishers``): the worker dead-letters
    it ``forbidden``; archived, a forger knowing a mail's id could give it new content."""
    why = publisher_refused(delivery.properties, settings.publishers(mail.tenant), mail.tenant)
    if why is not None:
        raise ContainerError(f"tenant: {why}")


def _event_record(event: MailEvent, settings: Settings) -> HistoryRecord:
    """An operator's event; an edit carries the corrected container, kept as the mail's content."""
    detail = dict(event.detail or {})
    content = detail.pop("container", None)
    if event.kind != EventKind.EDITED or not isinstance(content, dict):
        return HistoryRecord(event)
    try:
        mail = parse_container(content)
    except ContainerError:
        return HistoryRecord(event.model_copy(update={"detail": detail}))
    app = settings.app(mail.tenant, mail.app)
    return HistoryRecord(
        event.model_copy(update={"detail": detail}),
        mail,
        mail.from_ or (app.sender if app else None),
    )


def _published_at(delivery: Delivery) -> datetime:
    # A re-submitted container keeps its first creation time; the publish time
    # (whole seconds, so never after what follows) places the re-submission. A
    # client stamping milliseconds (or nonsense) gets the time it arrived instead.
    return timestamp_datetime(delivery.properties.timestamp) or datetime.now(UTC)


def _actor(delivery: Delivery, settings: Settings) -> str | None:
    """The operator a re-submitted container names, believed only from rohrpost's own
    tools: they publish as the installation's broker user (RabbitMQ validates user_id),
    while a tenant's service could otherwise stamp "resubmitted by <anyone>" on its mails."""
    if user_id_of(delivery.properties) != settings.broker_user:
        return None
    actor = (delivery.properties.headers or {}).get(ACTOR_HEADER)
    if isinstance(actor, bytes):
        return actor.decode(errors="replace")
    return actor if isinstance(actor, str) else None
