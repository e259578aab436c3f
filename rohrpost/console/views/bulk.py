"""Retry and purge: one dead letter, a selection, or exactly the filtered set.

A set is named by the history store (mail ids, or the SHA-256 of letters that are no
mail container) and shown with its count; the action runs only when the request
confirms that count, and again asks when the set changed meanwhile. It then runs
as a job whose progress the page polls. Each letter is moved publish-with-confirm
first, ack second, by ``DeadLetterQueue``.
"""

from __future__ import annotations

import uuid
from typing import Any

from rohrpost.console.jobs import Job
from rohrpost.console.pages import Problem, ViewContext
from rohrpost.console.views.deadletters import FILTERS, found_dead_letter, letter_query
from rohrpost.shared.store import DeadLetterQuery

Keys = list[tuple[str, str, str]]


def _selection(ctx: ViewContext) -> DeadLetterQuery:
    mail_ids: set[uuid.UUID] = set()
    letter_ids: set[uuid.UUID] = set()
    for key in ctx.inputs.getlist("ids"):
        kind, _, text = key.partition(":")
        try:
            value = uuid.UUID(text)
        except ValueError:
            raise Problem(400, f"ids: {key[:80]!r} is not mail:ID or letter:ID") from None
        if kind not in ("mail", "letter"):
            raise Problem(400, f"ids: {key[:80]!r} is not mail:ID or letter:ID")
        (mail_ids if kind == "mail" else letter_ids).add(value)
    if not mail_ids and not letter_ids:
        raise Problem(400, "ids: select at least one dead letter")
    return DeadLetterQuery(mail_ids=frozenset(mail_ids), letter_ids=frozenset(letter_ids))


def _named_set(ctx: ViewContext) -> tuple[str, DeadLetterQuery, dict[str, Any]]:
    scope = ctx.inputs.get("scope", "selected")
    if scope == "filtered":
        values = {name: ctx.inputs.get(name) for name in FILTERS}
        return scope, letter_query(ctx, values), {"filters": values}
    if scope != "selected":
        raise Problem(400, "scope: selected or filtered")
    return scope, _selection(ctx), {"ids": ctx.inputs.getlist("ids")}


def _work(ctx: ViewContext, action: str, keys: Keys) -> Any:
    service, actor = ctx.console.service, ctx.actor.audit_name

    def retry(job: Job) -> str:
        done, skipped = service.retry(actor, keys, job.progress)
        job.skipped = [
            {"id": letter.mail_id or letter.digest, "reason": why} for letter, why in skipped
        ]
        missing = len(keys) - len(done) - len(skipped)
        gone = f", {missing} no longer in their queue" if missing else ""
        return f"re-submitted {len(done)}, skipped {len(skipped)}{gone}"

    def purge(job: Job) -> str:
        count = service.purge(actor, keys, job.progress)
        job.done = count
        return f"purged {count}"

    return retry if action == "retry" else purge


async def bulk(ctx: ViewContext, action: str) -> dict[str, Any]:
    """Ask to confirm the count of the named set; once confirmed, start the job."""
    ctx.require(action)
    scope, query, named = _named_set(ctx)
    keys = await ctx.call(ctx.console.service.dead_letter_keys, query)
    if not keys:
        raise Problem(409, "no dead letter matches")
    confirmed = ctx.inputs.get("confirm")
    if confirmed != str(len(keys)):
        return {
            "action": action,
            "scope": scope,
            "count": len(keys),
            "changed": bool(confirmed),
            "needs_confirmation": True,
            **named,
        }
    job = ctx.console.jobs.start(action, ctx.actor.audit_name, len(keys), _work(ctx, action, keys))
    return {
        "redirect": f"/jobs/{job.id}",
        "message": f"{action} of {len(keys)} started",
        "job": job.view(),
    }


async def bulk_retry(ctx: ViewContext) -> dict[str, Any]:
    """Re-submit a selection or the filtered set of dead letters."""
    return await bulk(ctx, "retry")


async def bulk_purge(ctx: ViewContext) -> dict[str, Any]:
    """Delete a selection or the filtered set of dead letters for good."""
    return await bulk(ctx, "purge")


async def retry_one(ctx: ViewContext) -> dict[str, Any]:
    """Re-submit one dead letter now (as edited, or as it is)."""
    found = await found_dead_letter(ctx)
    ctx.require("retry", found.mail.tenant)
    key = (found.mail.tenant, found.mail.app, str(found.mail.id))
    done, skipped = await ctx.call(ctx.console.service.retry, ctx.actor.audit_name, [key])
    if skipped:
        raise Problem(409, f"not re-submitted: {skipped[0][1]}")
    if not done:
        raise Problem(409, f"mail {found.mail.id} is no longer in its dead-letter queue")
    return {
        "redirect": f"/mails/{found.mail.id}",
        "message": "re-submitted",
        "mail_id": found.mail.id,
    }


async def job_detail(ctx: ViewContext) -> dict[str, Any]:
    """A bulk action's progress."""
    job = ctx.console.jobs.get(str(ctx.params["job_id"]))
    if job is None:
        raise Problem(404, "no such job (jobs are kept by the console process that ran them)")
    return {"job": job.view()}
