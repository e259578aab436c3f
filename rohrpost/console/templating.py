"""Filters the templates use: times, JSON, query strings."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import jinja2


def when(value: Any) -> str:
    """A time (or its ISO text) as ``YYYY-MM-DD HH:MM:SS`` UTC; ``-`` when absent."""
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def pretty(value: Any) -> str:
    """``value`` as indented JSON (the template escapes it)."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def query(values: dict[str, Any], **changes: Any) -> str:
    """A query string of ``values`` with ``changes``, without empty ones."""
    merged = {**values, **changes}
    return urlencode({k: v for k, v in merged.items() if v not in (None, "")})


def configure(env: jinja2.Environment) -> None:
    """Add the console's filters to ``env``."""
    env.filters["when"] = when
    env.filters["pretty"] = pretty
    env.globals["query"] = query
