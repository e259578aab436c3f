"""A dead letter as an operator sees it, read from whatever message is in the queue.

A dead-letter queue holds what no worker could send, so anything: bodies that are
not JSON or not UTF-8, JSON nested 100,000 levels deep, megabytes of text, header
values of any type. Reading never fails: what is not a mail container is kept as
bytes with the reason, header values become text, impossible times become None.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rohrpost.shared.container import MAX_DATA_DEPTH
from rohrpost.shared.jsonvalue import nesting_exceeds
from rohrpost.shared.preview import BRIEF, Limits, clip, compact, preview
from rohrpost.shared.wire import (
    ATTEMPTS_HEADER,
    DEAD_AT_HEADER,
    EDITED_BY_HEADER,
    ERROR_HEADER,
    REASON_HEADER,
    round_of,
)

#: Why a mail was dead-lettered: a worker's x-rohrpost-reason, or the broker's
#: x-first-death-reason after x-delivery-limit deliveries.
REASONS = (
    "invalid",
    "misrouted",
    "forbidden",
    "template_error",
    "rejected",
    "unencodable",
    "max_attempts",
    "delivery_limit",
)


@dataclass(frozen=True)
class DeadLetter:
    """One message in a dead-letter queue, as an operator sees it."""

    mail_id: str | None
    tenant: str
    app: str
    queue: str
    reason: str
    error: str | None
    attempts: int | None
    dead_at: datetime | None
    round: int
    edited_by: str | None
    container: dict[str, Any] | None  # None when the body is not a mail container …
    problem: str | None  # … and this says why
    body: bytes
    headers: dict[str, Any]

    @property
    def digest(self) -> str:
        """SHA-256 of the body: what names a letter that is not a mail container."""
        return hashlib.sha256(self.body).hexdigest()

    @property
    def recipients(self) -> list[str]:
        """to, cc and bcc of the container (whatever they hold, as text)."""
        data = self.container or {}
        found = []
        for field in ("to", "cc", "bcc"):
            value = data.get(field)
            items = value if isinstance(value, list) else [] if value is None else [value]
            found += [item if isinstance(item, str) else compact(item) for item in items]
        return found

    @property
    def subject(self) -> str | None:
        """The subject, or ``template: name`` for template mails."""
        data = self.container or {}
        if data.get("subject"):
            return _text(data["subject"])
        return f"template: {compact(data['template'])}" if "template" in data else None

    def summary(self) -> dict[str, Any]:
        """What ``dlq list --json`` prints: plain JSON, each value of bounded size."""
        shown: dict[str, Any] = preview(
            {
                "id": self.mail_id,
                "tenant": self.tenant,
                "app": self.app,
                "recipients": self.recipients,
                "subject": self.subject,
                "reason": self.reason,
                "attempts": self.attempts,
                "error": self.error,
                "dead_at": self.dead_at.isoformat() if self.dead_at else None,
                "edited_by": self.edited_by,
                "problem": self.problem,
            },
            _SUMMARY,
        )
        return shown


_SUMMARY = Limits(text=1000, items=100, depth=3)
#: Deeper than any valid container (its ``data`` nests at most MAX_DATA_DEPTH levels):
#: a body nested more is not taken as a container, so nothing below recurses into it.
MAX_LETTER_DEPTH = MAX_DATA_DEPTH + 16
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number"}


def read_body(body: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The mail container a dead letter's body holds; or None, and why it holds none."""
    try:
        data = json.loads(body.decode("utf-8"))  # the wire is UTF-8: no guessing UTF-16
    except RecursionError:
        return None, "its JSON nests too deeply to read"
    except UnicodeDecodeError:
        return None, "it is not UTF-8 text"
    except ValueError as exc:  # not JSON, or a number of more than 4,300 digits
        return None, f"it is not JSON ({clip(str(exc), 200)})"
    if not isinstance(data, dict):
        kind = _JSON_KINDS.get(type(data), "JSON " + json.dumps(data))
        return None, f"it is {kind}, not a JSON object"
    if nesting_exceeds(data, MAX_LETTER_DEPTH):
        return None, f"its JSON nests deeper than {MAX_LETTER_DEPTH} levels"
    return data, None


def read_letter(tenant: str, app: str, queue: str, properties: Any, body: bytes) -> DeadLetter:
    """What an operator sees of a message, whatever its body and headers hold."""
    headers = properties.headers if isinstance(properties.headers, dict) else {}
    container, problem = read_body(body)
    reason = _text(headers.get(REASON_HEADER)) or _text(headers.get("x-first-death-reason"))
    return DeadLetter(
        mail_id=_text(properties.message_id),
        tenant=tenant,
        app=app,
        queue=queue,
        reason=reason or "unknown",
        error=_text(headers.get(ERROR_HEADER)),
        attempts=_count(headers.get(ATTEMPTS_HEADER)),
        dead_at=_moment(headers.get(DEAD_AT_HEADER)) or _moment(properties.timestamp),
        round=round_of(properties),
        edited_by=_text(headers.get(EDITED_BY_HEADER)),
        container=container,
        problem=problem,
        body=body,
        headers=headers,
    )


def _text(value: Any) -> str | None:
    """A header or field value as text: strings as they are, anything else previewed."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):  # pika leaves strings that are not UTF-8 as bytes
        return value.decode("utf-8", "backslashreplace")
    return compact(value, BRIEF)


def _count(value: Any) -> int | None:
    return int(value) if type(value) is not bool and isinstance(value, int) else None


def _moment(value: Any) -> datetime | None:
    """Unix seconds (or an AMQP timestamp) as a time; None when absent or impossible."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if type(value) is bool or not isinstance(value, int):
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        return None
