"""Dead letters: the list (from the history store, never from the queues) and one letter."""

from __future__ import annotations

import uuid
from typing import Any

from rohrpost.console.pages import Problem, ViewContext
from rohrpost.console.views.common import (
    REASONS,
    check,
    choice,
    mail_id_param,
    page_number,
    route_filter,
    safe_text,
    when,
)
from rohrpost.operations.preview import MailPreview
from rohrpost.shared.store import DeadLetterQuery, DeadLetterRow, MailHistory
from rohrpost.shared.wire import (
    ATTEMPTS_HEADER,
    DEAD_AT_HEADER,
    EDITED_BY_HEADER,
    ERROR_HEADER,
    REASON_HEADER,
)

PAGE_SIZE = 50
FILTERS = ("tenant", "app", "reason", "since", "until", "q")


def letter_query(ctx: ViewContext, values: dict[str, str], **extra: Any) -> DeadLetterQuery:
    """The dead letters ``values`` (tenant, app, reason, since, until, q) ask for."""
    errors: dict[str, str] = {}
    tenant, app = route_filter(values, ctx.console.routes, errors)
    reason = choice(values, "reason", REASONS, errors)
    since, until = when(values, "since", errors), when(values, "until", errors)
    text = values.get("q", "").strip() or None
    if text is not None and len(text) > 200:
        errors["q"] = "at most 200 characters"
    check(errors, {"filters": _filters(values), "letters": [], "total": 0, **_choices(ctx)})
    return DeadLetterQuery(
        tenant=tenant, app=app, reason=reason, since=since, until=until, text=text, **extra
    )


def _filters(values: dict[str, str]) -> dict[str, str]:
    return {name: values.get(name, "") for name in FILTERS}


def _choices(ctx: ViewContext) -> dict[str, Any]:
    return {
        "reasons": REASONS,
        "tenants": sorted({t for t, _ in ctx.console.routes}),
        "apps": sorted({a for _, a in ctx.console.routes}),
        "can": {action: ctx.may(action) for action in ("retry", "purge", "edit")},
    }


def row(letter: DeadLetterRow) -> dict[str, Any]:
    """One dead letter of a list."""
    if letter.mail_id is not None:
        key, link = f"mail:{letter.mail_id}", f"/dead-letters/{letter.mail_id}"
    else:
        key, link = f"letter:{letter.letter_id}", f"/invalid-letters/{letter.letter_id}"
    return {
        "key": key,
        "link": link,
        "mail_id": letter.mail_id,
        "tenant": letter.tenant,
        "app": letter.app,
        "reason": letter.reason,
        "attempts": letter.attempts,
        "dead_at": letter.dead_at,
        "recipients": letter.recipients,
        "subject": letter.subject or (f"template {letter.template}" if letter.template else None),
        "error": safe_text((letter.error or "")[:300]),
        "body_size": letter.body_size,
    }


async def dead_letter_list(ctx: ViewContext) -> dict[str, Any]:
    """Dead letters matching the filters, newest first, a page at a time."""
    page = page_number(ctx.query)
    query = letter_query(ctx, ctx.query, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    letters, total = await ctx.call(ctx.console.service.dead_letters, query)
    return {
        "filters": _filters(ctx.query),
        "letters": [row(letter) for letter in letters],
        "total": total,
        "page": page,
        "pages": max(1, -(-total // PAGE_SIZE)),
        **_choices(ctx),
    }


async def found_dead_letter(ctx: ViewContext) -> MailHistory:
    """The mail of the path's id, which must be a dead letter now."""
    mail_id = mail_id_param(ctx)
    found = await ctx.call(ctx.console.service.mail, mail_id)
    if found is None:
        raise Problem(404, f"the history knows no mail {mail_id}")
    if found.mail.status != "dead_lettered":
        raise Problem(
            404,
            f"mail {mail_id} is not a dead letter (it is {found.mail.status})",
        )
    return found


def preview_data(preview: MailPreview | None) -> dict[str, Any] | None:
    """A dry run as the page shows it."""
    if preview is None:
        return None
    return {
        "subject": preview.subject,
        "text": preview.text,
        "html": preview.html,
        "headers": safe_text(preview.headers),
        "error": safe_text(preview.error),
        "error_line": preview.error_line,
    }


def _headers(found: MailHistory) -> dict[str, Any]:
    mail = found.mail
    edits = [e for e in found.events if e.kind == "edited" and e.round == _round(found)]
    return {
        REASON_HEADER: mail.reason,
        ERROR_HEADER: mail.last_error,
        ATTEMPTS_HEADER: mail.attempts,
        DEAD_AT_HEADER: mail.updated_at,
        EDITED_BY_HEADER: edits[-1].actor if edits else None,
    }


def _round(found: MailHistory) -> int:
    return max((e.round for e in found.events), default=0)


async def dead_letter_detail(ctx: ViewContext) -> dict[str, Any]:
    """One dead letter: container, dead-letter headers, last SMTP reply, and a dry run."""
    found = await found_dead_letter(ctx)
    preview = None
    if found.container is not None:
        preview = await ctx.call(ctx.console.service.preview, found.container)
    replies = [e.smtp_reply or e.error for e in found.events if e.smtp_reply or e.error]
    return {
        "mail": found.mail.model_dump(mode="json"),
        "headers": {k: v for k, v in _headers(found).items() if v is not None},
        "last_reply": safe_text(replies[-1]) if replies else None,
        "container": found.container,
        "preview": preview_data(preview),
        "round": _round(found),
        **_choices(ctx),
    }


async def invalid_letter_detail(ctx: ViewContext) -> dict[str, Any]:
    """A dead letter that is not a mail container: the start of its bytes, shown safely."""
    letter_id = mail_id_param(ctx, "letter_id")
    letter = await ctx.call(ctx.console.service.invalid_letter, letter_id)
    if letter is None:
        raise Problem(404, f"no such dead letter {letter_id} (purged, or replaced by an edit)")
    return {
        "letter": {
            "key": f"letter:{letter_id}",
            "id": str(uuid.UUID(str(letter["event_id"]))),
            "tenant": letter["tenant"],
            "app": letter["app"],
            "dead_at": letter["at"],
            "reason": "invalid",
            "error": safe_text(letter["error"]),
            "message_id": safe_text(letter["message_id"]),
            "body_sha256": letter["body_sha256"],
            "body_size": letter["body_size"],
            "body": safe_text(letter["body"]),
        },
        **_choices(ctx),
    }
