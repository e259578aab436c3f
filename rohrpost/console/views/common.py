"""What several views share: reading filters and ids, and showing times and text safely."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

from rohrpost.commands.terminal import printable
from rohrpost.console.pages import Invalid, Problem, ViewContext
from rohrpost.shared.timeparse import parse_when

REASONS = [
    "invalid",
    "misrouted",
    "forbidden",
    "template_error",
    "rejected",
    "unencodable",
    "max_attempts",
    "delivery_limit",
]
STATUSES = [
    "queued",
    "scheduled",
    "retrying",
    "sent",
    "expired",
    "dead_lettered",
    "cancelled",
    "purged",
]
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def mail_id_param(ctx: ViewContext, name: str = "mail_id") -> uuid.UUID:
    """The path's mail id; 404 when it is not one (whatever it holds)."""
    try:
        return uuid.UUID(str(ctx.params[name]))
    except ValueError:
        raise Problem(404, "not a mail id") from None


def name_param(ctx: ViewContext, name: str) -> str:
    """A tenant or app name from the path; 404 when it cannot be one."""
    value = str(ctx.params[name])
    if not _NAME.match(value):
        raise Problem(404, f"no {name} of that name")
    return value


def when(values: dict[str, str], name: str, errors: dict[str, str]) -> datetime | None:
    """A time filter (ISO 8601 or -2h); its error is noted under ``name``."""
    text = values.get(name, "").strip()
    if not text:
        return None
    try:
        return parse_when(text)
    except ValueError as exc:
        errors[name] = str(exc)
        return None


def choice(values: dict[str, str], name: str, allowed: list[str], errors: dict[str, str]) -> Any:
    """A filter that must be one of ``allowed`` (or empty)."""
    value = values.get(name, "").strip()
    if not value:
        return None
    if value not in allowed:
        errors[name] = f"must be one of {', '.join(allowed)}"
        return None
    return value


def route_filter(
    values: dict[str, str], routes: list[tuple[str, str]], errors: dict[str, str]
) -> tuple[str | None, str | None]:
    """tenant and app filters, which must name a configured tenant and app."""
    tenant = values.get("tenant", "").strip() or None
    app = values.get("app", "").strip() or None
    if tenant is not None and tenant not in {t for t, _ in routes}:
        errors["tenant"] = "no such tenant"
    if app is not None and app not in {a for t, a in routes if tenant in (None, t)}:
        errors["app"] = "no such app" + (f" of {tenant}" if tenant else "")
    return tenant, app


def page_number(values: dict[str, str]) -> int:
    """The 1-based page asked for (1 when absent or odd)."""
    text = values.get("page", "1")
    return max(1, min(int(text), 100_000)) if text.isdigit() else 1


def check(errors: dict[str, str], data: dict[str, Any]) -> None:
    """Invalid with ``errors`` (and the page's data) when there are any."""
    if errors:
        raise Invalid(errors, data)


def safe_text(text: str | None) -> str | None:
    """Text with control and reordering characters shown as escapes, line breaks kept."""
    if text is None:
        return None
    return "\n".join(printable(line) for line in text.split("\n"))
