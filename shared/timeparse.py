"""Durations (``30s``, ``2h``, ``90d``) and points in time (ISO 8601 or ``+30s``)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")


def parse_duration(value: str | float | timedelta) -> timedelta:
    """Parse ``90d``, ``2h``, ``30s``, ``1500ms`` or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return timedelta(seconds=value)
    match = _DURATION.match(value)
    if not match:
        raise ValueError(
            f"{value!r} is not a duration; use a number with a unit: 1500ms, 30s, 5m, 2h, 3d, 1w"
        )
    number, unit = match.groups()
    return timedelta(seconds=float(number) * _UNITS[unit or "s"])


def parse_when(value: str, now: datetime | None = None) -> datetime:
    """Parse an ISO 8601 time (naive means UTC), or ``+DURATION`` / ``-DURATION`` from now."""
    now = now or datetime.now(UTC)
    text = value.strip()
    if text.startswith("+"):
        return now + parse_duration(text[1:])
    if text.startswith("-"):
        return now - parse_duration(text[1:])
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{value!r} is neither an ISO 8601 time (2026-12-24T18:00:00+01:00) "
            "nor a relative time (+30s, +2h, -3d)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
