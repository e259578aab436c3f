"""AMQP properties and headers of mail messages, shared by producer, worker and tools."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pika

from rohrpost.shared.storable import MAX_INTEGER

#: Which attempt the next delivery of this message is (1-based).
ATTEMPT_HEADER = "x-rohrpost-attempt"
#: How often an operator re-submitted this mail (0 = never); orders its history.
ROUND_HEADER = "x-rohrpost-round"
#: Operator actions (retry, resend): who did it.
ACTOR_HEADER = "x-rohrpost-actor"
#: Dead letters edited by an operator: who, and when (Unix seconds).
EDITED_BY_HEADER = "x-rohrpost-edited-by"
EDITED_AT_HEADER = "x-rohrpost-edited-at"
#: Dead letters: why (``invalid``, ``forbidden``, ``rejected``, ``max_attempts``,
#: ``template_error`` …).
REASON_HEADER = "x-rohrpost-reason"
#: Dead letters and retries: the last SMTP reply or exception.
ERROR_HEADER = "x-rohrpost-error"
#: Dead letters: how many attempts were made.
ATTEMPTS_HEADER = "x-rohrpost-attempts"
#: Dead letters: when (Unix seconds).
DEAD_AT_HEADER = "x-rohrpost-dead-at"
#: Dead letters: the send queue the mail came from.
QUEUE_HEADER = "x-rohrpost-queue"
#: A copy made by ``rohrpost send-now``: the instruction's mark (ms), see ControlState.
SEND_NOW_HEADER = "x-rohrpost-send-now"
#: A copy moved out of the held queue by ``rohrpost release``: the release's mark (ms).
RELEASED_HEADER = "x-rohrpost-released"
#: A mail a rate limit (or a throttling server) sent through the delay levels to wait
#: for its turn: it does not queue behind the mails waiting likewise.
LIMITED_HEADER = "x-rohrpost-limited"
#: How often the SMTP server throttled this mail (not counted as attempts, up to a budget).
THROTTLED_HEADER = "x-rohrpost-throttled"
#: A scheduled mail: when it is due (Unix ms, rounded up). A worker that receives it
#: early holds it on a timer until then, without reading its body.
DUE_HEADER = "x-rohrpost-due"
#: Headers a mail keeps when a worker moves it on (retry, delayed again, held).
_CARRIED = (SEND_NOW_HEADER, RELEASED_HEADER, THROTTLED_HEADER)

MAIL_CONTENT_TYPE = "application/json"
_MAX_HEADER_TEXT = 2000
#: 9999-12-31T23:59:59.999Z, the last moment a container's datetime can name.
_LAST_MS = 253_402_300_799_999


def mail_properties(
    mail_id: str | None,
    *,
    attempt: int = 1,
    round: int = 0,
    headers: Mapping[str, Any] | None = None,
    user_id: str | None = None,
) -> pika.BasicProperties:
    """Properties for a mail message: persistent, JSON, ``message_id`` = mail id.

    ``user_id``: the user name of the publishing connection (``Settings.broker_user``).
    RabbitMQ refuses a publish whose ``user_id`` is another user's, so a worker can tell
    who submitted a mail, for tenants that name their ``publishers``.

    Headers are built fresh, never copied: brokers before 4.0.1 drop a message whose
    ``x-death`` shows it already expired from the same queue, so a republished mail
    must not carry the old ``x-death`` / ``x-first-death-*`` headers.
    """
    table = dict(headers or {})
    # Defaults are left out: pika encodes a header table in pure Python, per message.
    if attempt != 1:
        table[ATTEMPT_HEADER] = attempt
    if round != 0:
        table[ROUND_HEADER] = round
    return pika.BasicProperties(
        content_type=MAIL_CONTENT_TYPE,
        delivery_mode=2,
        message_id=mail_id,
        timestamp=int(time.time()),
        type="rohrpost.mail.v1",
        user_id=user_id,
        headers=table or None,
    )


def user_id_of(properties: Any) -> str | None:
    """The validated user name a delivered mail was published by; None when it names none."""
    user_id = properties.user_id
    return user_id if isinstance(user_id, str) else None


#: The dead-letter reason of a mail its tenant does not accept from its publisher.
FORBIDDEN = "forbidden"


def publisher_refused(properties: Any, allowed: frozenset[str] | None, tenant: str) -> str | None:
    """Why ``tenant`` does not accept a mail published with ``properties``: it names its
    publishers (``allowed``, see ``Settings.publishers``; None: anyone) and the
    broker-validated ``user_id`` is none of them, or missing. None when it accepts it."""
    if allowed is None:
        return None
    user_id = user_id_of(properties)
    if user_id in allowed:
        return None
    who = f"user {user_id!r}" if user_id is not None else "no user_id"
    return f"published with {who}, not a publisher of {tenant}"


def attempt_of(properties: Any) -> int:
    """The attempt number a delivered mail carries (1 when absent, malformed or absurd)."""
    return _int_header(properties, ATTEMPT_HEADER, 1)


def round_of(properties: Any) -> int:
    """The re-submission round a delivered mail carries (0 when absent, malformed or absurd)."""
    return _int_header(properties, ROUND_HEADER, 0)


def throttled_of(properties: Any) -> int:
    """How often the server throttled a delivered mail so far (0 when absent or malformed)."""
    return _int_header(properties, THROTTLED_HEADER, 0)


def mark_of(properties: Any, name: str) -> int | None:
    """The mark (ms) header ``name`` of a delivered mail; None when absent or not a number."""
    headers = properties.headers if isinstance(properties.headers, dict) else {}
    value = headers.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def due_of(properties: Any) -> float | None:
    """When a delivered mail says it is due (Unix seconds); None when absent or absurd."""
    mark = mark_of(properties, DUE_HEADER)
    return mark / 1000 if mark is not None and 0 < mark <= _LAST_MS else None


def carried_headers(properties: Any) -> dict[str, int]:
    """The operator marks (and the throttling count) a mail keeps wherever a worker moves it."""
    return {name: mark for name in _CARRIED if (mark := mark_of(properties, name)) is not None}


def _int_header(properties: Any, name: str, default: int) -> int:
    headers = properties.headers if isinstance(properties.headers, dict) else {}
    value = headers.get(name, default)
    # Bounded: the next round or attempt must still fit the store's and the header's integer.
    valid = isinstance(value, int) and not isinstance(value, bool)
    return value if valid and default <= value <= MAX_INTEGER else default


def header_text(value: object) -> str:
    """A value made safe for an AMQP header: one line, bounded length."""
    text = " ".join(str(value).split())
    return text if len(text) <= _MAX_HEADER_TEXT else text[: _MAX_HEADER_TEXT - 1] + "…"
