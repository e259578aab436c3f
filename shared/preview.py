"""Any value as plain JSON of bounded size, for showing to an operator.

Dead letters hold whatever a client sent: bytes that are not UTF-8, strings of
megabytes, JSON nested thousands of levels deep, header tables with timestamps and
decimals. A preview keeps the shape and the start of everything, cuts the rest with
a note saying how much was left out, and recurses at most ``depth`` levels, so
printing it as JSON (or as text) can neither fail nor flood a terminal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from rohrpost.shared.jsonvalue import INT64_MAX, INT64_MIN


@dataclass(frozen=True)
class Limits:
    """How much of a value a preview keeps."""

    text: int = 2000  # characters of one string
    items: int = 100  # entries of one object or list
    depth: int = 70  # levels of objects and lists: deeper than any valid container


SHOW = Limits()
#: For one field of a table row or a list entry.
BRIEF = Limits(text=200, items=20, depth=4)


def clip(text: str, limit: int) -> str:
    """``text``, cut to ``limit`` characters with a note of how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit:,} more characters]"


def as_text(value: bytes, limit: int) -> str:
    """Bytes as text (UTF-8; other bytes as ``\\xNN``), cut to ``limit`` characters."""
    text = value[: limit * 4].decode("utf-8", "backslashreplace")  # 4 bytes per character at most
    if len(text) > limit or len(value) > limit * 4:
        return f"{text[:limit]}… [{len(value):,} bytes in all]"
    return text


def preview(value: Any, limits: Limits = SHOW) -> Any:
    """``value`` as JSON-serialisable data within ``limits``; never raises."""
    return _preview(value, limits, limits.depth)


def _preview(value: Any, limits: Limits, depth: int) -> Any:
    if value is None or isinstance(value, bool | str | int | float):
        return _scalar(value, limits)
    if isinstance(value, bytes | bytearray):
        return as_text(bytes(value), limits.text)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Mapping | list | tuple):
        if depth <= 0:
            return f"… [{type(value).__name__} nested deeper than {limits.depth} levels]"
        return _container(value, limits, depth)
    return clip(f"<{type(value).__name__}> {_safe_str(value)}", limits.text)


def _scalar(value: Any, limits: Limits) -> Any:
    if isinstance(value, str):
        return clip(value, limits.text)
    if isinstance(value, int) and not isinstance(value, bool):
        # int() drops pika's ``long`` subclass; huge ints would not convert to text at all.
        return int(value) if INT64_MIN <= value <= INT64_MAX else f"<{value.bit_length()}-bit int>"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def _container(
    value: Mapping[Any, Any] | list[Any] | tuple[Any, ...], limits: Limits, depth: int
) -> Any:
    if isinstance(value, Mapping):
        shown: dict[str, Any] = {}
        for index, (key, item) in enumerate(value.items()):
            if index == limits.items:
                shown["…"] = f"{len(value) - index:,} more entries"
                break
            name = key if isinstance(key, str) else _preview(key, BRIEF, 1)
            shown[clip(str(name), limits.text)] = _preview(item, limits, depth - 1)
        return shown
    items = [_preview(item, limits, depth - 1) for item in value[: limits.items]]
    if len(value) > limits.items:
        items.append(f"… {len(value) - limits.items:,} more items")
    return items


def _safe_str(value: Any) -> str:
    try:
        return str(value)[:10_000]
    except Exception:  # an odd object's __str__ may fail in any way
        return "?"


def compact(value: Any, limits: Limits = BRIEF) -> str:
    """A one-line JSON preview of ``value`` (strings as they are)."""
    shown = preview(value, limits)
    return shown if isinstance(shown, str) else json.dumps(shown, ensure_ascii=False)
