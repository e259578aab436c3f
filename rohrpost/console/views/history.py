"""The history: search mails (indexed filters only), one mail's timeline, and the actions on
one mail: resend, cancel, send now, hold and release."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from rohrpost.console.pages import Problem, ViewContext
from rohrpost.console.views.common import (
    STATUSES,
    check,
    choice,
    mail_id_param,
    route_filter,
    safe_text,
    when,
)
from rohrpost.operations.actions import is_held
from rohrpost.shared.container import bare_address
from rohrpost.shared.store import EventEntry, MailFilter, MailHistory

PAGE_SIZE = 50
SEARCH = ("to", "tenant", "app", "status", "tag", "id", "since", "until")
_PREFIX = re.compile(r"^[0-9a-fA-F-]{1,36}$")
CANCELLABLE = ("queued", "scheduled", "retrying")
#: Statuses of a mail waiting in the delay levels, which ``send-now`` fetches out of them.
DELAYED = ("scheduled", "retrying")


def _search(ctx: ViewContext) -> tuple[MailFilter, dict[str, str]]:
    values = {name: ctx.query.get(name, "").strip() for name in SEARCH}
    errors: dict[str, str] = {}
    tenant, app = route_filter(values, ctx.console.routes, errors)
    status = choice(values, "status", STATUSES, errors)
    since, until = when(values, "since", errors), when(values, "until", errors)
    prefix = values["id"] or None
    if prefix is not None and not _PREFIX.match(prefix):
        errors["id"] = "a mail id or its start: hex digits and dashes"
    to = bare_address(values["to"]).lower() if values["to"] else None
    if to is not None and len(to) > 320:
        errors["to"] = "at most 320 characters"
    if len(values["tag"]) > 64:
        errors["tag"] = "at most 64 characters"
    after = _cursor(ctx.query.get("after", ""), errors)
    check(errors, {"filters": values, "mails": [], "statuses": STATUSES})
    criteria = MailFilter(
        tenant=tenant,
        app=app,
        status=status,
        to=to,
        tag=values["tag"] or None,
        since=since,
        until=until,
        id_prefix=prefix,
        after=after,
        limit=PAGE_SIZE,
    )
    return criteria, values


def _cursor(text: str, errors: dict[str, str]) -> tuple[datetime, uuid.UUID] | None:
    if not text:
        return None
    at, _, mail_id = text.partition("|")
    try:
        return datetime.fromisoformat(at), uuid.UUID(mail_id)
    except ValueError:
        errors["after"] = "not a page of this list"
        return None


async def mail_list(ctx: ViewContext) -> dict[str, Any]:
    """Mails matching the search, newest change first, a page at a time."""
    criteria, values = _search(ctx)
    found = await ctx.call(ctx.console.service.mails, criteria)
    last = found[-1] if len(found) == PAGE_SIZE else None
    return {
        "filters": values,
        "mails": [
            {
                **mail.model_dump(mode="json"),
                "last_error": safe_text((mail.last_error or "")[:300]),
            }
            for mail in found
        ],
        "next": f"{last.updated_at.isoformat()}|{last.id}" if last else None,
        "statuses": STATUSES,
        "tenants": sorted({t for t, _ in ctx.console.routes}),
    }


async def _found(ctx: ViewContext) -> MailHistory:
    mail_id = mail_id_param(ctx)
    found = await ctx.call(ctx.console.service.mail, mail_id)
    if found is None:
        raise Problem(404, f"the history knows no mail {mail_id}")
    return found


def _event(event: EventEntry) -> dict[str, Any]:
    shown: dict[str, Any] = event.model_dump(mode="json")
    shown["error"] = safe_text(event.error)
    shown["smtp_reply"] = safe_text(event.smtp_reply)
    changes = (event.detail or {}).get("changes")
    shown["changes"] = changes if isinstance(changes, dict) else None
    return shown


async def mail_detail(ctx: ViewContext) -> dict[str, Any]:
    """One mail: its state, rendered subject, timeline (attempts, replies, who acted)."""
    found = await _found(ctx)
    mail = found.mail
    held = is_held(found) and mail.status in CANCELLABLE
    return {
        "mail": {**mail.model_dump(mode="json"), "last_error": safe_text(mail.last_error)},
        "held": held,
        "container": found.container,
        "events": [_event(event) for event in found.events],
        "can": {
            "resend": ctx.may("resend", mail.tenant) and found.container is not None,
            "cancel": ctx.may("cancel", mail.tenant) and mail.status in CANCELLABLE,
            "send_now": ctx.may("send-now", mail.tenant) and mail.status in DELAYED and not held,
            "hold": ctx.may("hold", mail.tenant) and mail.status in CANCELLABLE and not held,
            "release": ctx.may("release", mail.tenant) and held,
            "dead_letter": mail.status == "dead_lettered",
        },
    }


async def resend_mail(ctx: ViewContext) -> dict[str, Any]:
    """Submit an archived mail again as a new mail linked to it."""
    found = await _found(ctx)
    ctx.require("resend", found.mail.tenant)
    new_id = await ctx.call(ctx.console.service.resend, ctx.actor.audit_name, found.mail.id)
    return {
        "redirect": f"/mails/{found.mail.id}",
        "message": f"re-sent as {new_id}",
        "new_mail_id": new_id,
    }


async def cancel_mail(ctx: ViewContext) -> dict[str, Any]:
    """Stop a queued or scheduled mail."""
    found = await _found(ctx)
    ctx.require("cancel", found.mail.tenant)
    if found.mail.status not in CANCELLABLE:
        raise Problem(
            409,
            f"mail {found.mail.id} is {found.mail.status}: only queued or scheduled mails "
            "can be cancelled",
        )
    message = await ctx.call(ctx.console.service.cancel, ctx.actor.audit_name, found.mail.id)
    return {"redirect": f"/mails/{found.mail.id}", "message": message}


async def _act_on_mail(
    ctx: ViewContext, action: str, function: Callable[[str, uuid.UUID], str]
) -> dict[str, Any]:
    found = await _found(ctx)
    ctx.require(action, found.mail.tenant)
    message = await ctx.call(function, ctx.actor.audit_name, found.mail.id)
    return {"redirect": f"/mails/{found.mail.id}", "message": message}


async def send_now_mail(ctx: ViewContext) -> dict[str, Any]:
    """Send a scheduled or retrying mail now (``rohrpost send-now``)."""
    return await _act_on_mail(ctx, "send-now", ctx.console.service.send_now)


async def hold_mail(ctx: ViewContext) -> dict[str, Any]:
    """Hold a waiting mail: set aside when due, until released (``rohrpost hold``)."""
    return await _act_on_mail(ctx, "hold", ctx.console.service.hold)


async def release_mail(ctx: ViewContext) -> dict[str, Any]:
    """Release a held mail (``rohrpost release``)."""
    return await _act_on_mail(ctx, "release", ctx.console.service.release)
