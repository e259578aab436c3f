"""Values the history store can hold, checked where a container or an event is made.

PostgreSQL refuses NUL in text, no UTF-8 encoder takes a lone surrogate, an
``INTEGER`` column holds 32 bits, and a datetime near year 1 or 9999 overflows when
it is converted to UTC (and one before 1970 cannot be an AMQP timestamp). Such a
value is refused by the models (or, in free text, replaced), never met deep in the
history writer, where it stopped the history of every tenant.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, Field

#: The largest value of an ``INTEGER`` column (PostgreSQL: 32 bits, signed).
MAX_INTEGER = 2**31 - 1
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(value: str) -> str:
    """``value`` with NUL and lone surrogates replaced by U+FFFD (the rest unchanged)."""
    if _UNSTORABLE.search(value) is None:
        return value
    return _UNSTORABLE.sub("\ufffd", value)


def check_datetime(value: datetime) -> datetime:
    """``value`` unchanged when it lies in 1970..9999 in UTC; else ValueError."""
    try:
        in_range = EARLIEST <= value.astimezone(UTC) <= LATEST
    except (OverflowError, ValueError):  # year 1 or 9999 pushed past the calendar's edge
        in_range = False
    if not in_range:
        raise ValueError("must lie between the years 1970 and 9999 (in UTC)")
    return value


def timestamp_datetime(seconds: object) -> datetime | None:
    """The UTC datetime of a Unix time in seconds, or None when it is none or out of range."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return None
    if not EARLIEST.timestamp() <= seconds <= LATEST.timestamp():
        return None  # e.g. milliseconds where seconds were meant
    return datetime.fromtimestamp(seconds, UTC)


#: A counter the store keeps in an ``INTEGER`` column.
StoredInt = Annotated[int, Field(ge=0, le=MAX_INTEGER)]
#: An aware datetime between 1970 and 9999 in UTC.
StoredDatetime = Annotated[AwareDatetime, AfterValidator(check_datetime)]


def clipped(limit: int) -> AfterValidator:
    """A validator making free text storable: unstorable characters replaced, ``limit`` long."""

    def clip(value: str) -> str:
        text = storable_text(value)
        return text if len(text) <= limit else text[: limit - 1] + "…"

    return AfterValidator(clip)
