"""``rohrpost history …`` and ``rohrpost store …``: read, purge and migrate the history."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from rohrpost.commands.context import (
    MAIL_ID,
    YES,
    CliContext,
    confirm,
    pass_context,
    plural,
    short_time,
    when_option,
)
from rohrpost.commands.terminal import cell, printable, printable_json
from rohrpost.shared.timeparse import parse_duration

if TYPE_CHECKING:  # the store (SQLAlchemy) is imported only by commands that use it
    from rohrpost.shared.store import HistoryStore, MailHistory, MailSummary

STATUSES = ["queued", "scheduled", "retrying", "sent", "expired", "dead_lettered", "cancelled"]


@contextmanager
def open_store(ctx: CliContext) -> Iterator[HistoryStore]:
    """The configured store, closed afterwards."""
    from rohrpost.shared.store import HistoryStore

    store = HistoryStore.open(ctx.settings().store_url.get_secret_value())
    try:
        yield store
    finally:
        store.close()


@click.group()
def history() -> None:
    """Search the history, show one mail's timeline, purge old mails."""


@history.command("list")
@click.option("--tenant", help="Only this tenant's mails.")
@click.option("--app", help="Only this app's mails.")
@click.option("--status", type=click.Choice(STATUSES), help="Only mails in this status.")
@click.option(
    "--to", help="A recipient (to, cc or bcc): anna@example.com or Anna <anna@example.com>."
)
@click.option("--tag", help="Only mails with this tag.")
@click.option("--since", help="Last change at or after: ISO 8601 or -2h, -7d.")
@click.option("--until", help="Last change before: ISO 8601 or -2h, -7d.")
@click.option(
    "--limit",
    type=click.IntRange(1, 100_000),
    default=100,
    show_default=True,
    help="Show at most this many mails.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
@pass_context
def list_(
    ctx: CliContext, /, as_json: bool, since: str | None, until: str | None, **criteria: object
) -> None:
    """List mails, newest change first; scheduled mails with the time they are due."""
    from rohrpost.shared.store import MailFilter

    mail_filter = MailFilter.model_validate(
        {**criteria, "since": when_option(since, "--since"), "until": when_option(until, "--until")}
    )
    with open_store(ctx) as store:
        found = store.list_mails(mail_filter)
    if as_json:
        click.echo(printable_json(json.dumps([m.model_dump(mode="json") for m in found], indent=2)))
        return
    due = criteria.get("status") == "scheduled"
    when = "due (UTC)" if due else "last change (UTC)"
    click.echo(f"{'id':36}  {'status':13}  {when:19}  {'tenant/app':20}  {'to':28}  subject")
    for mail in found:
        click.echo(_row(mail, due=due))
    click.echo(f"({plural(len(found), 'mail')})", err=True)


def _row(mail: MailSummary, *, due: bool) -> str:
    when = mail.not_before if due else mail.updated_at
    return (
        f"{mail.id}  {mail.status:13}  {short_time(when):19}  "
        f"{cell(f'{mail.tenant}/{mail.app}', 20):20}  {cell(', '.join(mail.recipients), 28):28}  "
        f"{cell(mail.subject, 40)}"
    )


@history.command("show")
@click.argument("mail_id", type=MAIL_ID)
@click.option("--json", "as_json", is_flag=True, help="The mail and its timeline as JSON.")
@pass_context
def show(ctx: CliContext, mail_id: str, as_json: bool) -> None:
    """Show one mail and its whole timeline (MAIL_ID: the id or its first digits)."""
    from rohrpost.operations.actions import is_held
    from rohrpost.operations.ids import resolve_mail_id

    with open_store(ctx) as store:
        whole = resolve_mail_id(mail_id, store)
        found = store.mail(whole)
    if found is None:
        raise click.ClickException(
            f"the history has no mail {whole} (too new to be archived yet, or mistyped? "
            "`rohrpost history list` shows what it has)"
        )
    if as_json:
        click.echo(printable_json(found.model_dump_json(indent=2)))
    else:
        click.echo(_describe(found, held=is_held(found)))


def _describe(found: MailHistory, *, held: bool) -> str:
    mail = found.mail
    status = mail.status + (f" ({mail.reason})" if mail.reason else "")
    if held and mail.status not in ("sent", "expired", "dead_lettered", "cancelled"):
        status += ", held (rohrpost release sends it)"
    lines = [
        f"mail        {mail.id}",
        f"status      {status}",
        f"tenant/app  {mail.tenant}/{mail.app}",
        f"from        {mail.sender or '-'}",
        f"to          {', '.join(mail.recipients) or '-'}",
        f"subject     {mail.subject or '-'}",
        f"attempts    {mail.attempts}",
    ]
    if mail.template:
        lines.append(f"template    {mail.template}")
    if mail.resend_of:
        lines.append(f"resend of   {mail.resend_of}")
    if mail.not_before:
        lines.append(f"not before  {short_time(mail.not_before)} UTC")
    if mail.message_id:
        lines.append(f"message-id  {mail.message_id}")
    if mail.content_deleted:
        lines.append("content     deleted after sending (history = delete)")
    lines.append("")
    lines.append("timeline (UTC)")
    for event in found.events:
        details = [
            f"attempt {event.attempt}" if event.attempt else "",
            event.reason or "",
            event.error or "",
            event.smtp_reply or "",
            f"by {event.actor}" if event.actor else "",
            json.dumps(event.detail) if event.detail else "",
        ]
        text = "; ".join(d for d in details if d)
        lines.append(f"  {short_time(event.at)}  {event.kind:15} {text}".rstrip())
    return "\n".join(printable(line) for line in lines)  # one line each, whatever they quote


@history.command("actions")
@click.option("--tenant", help="Only this tenant's pauses and resumes.")
@click.option(
    "--limit",
    type=click.IntRange(1, 100_000),
    default=100,
    show_default=True,
    help="Show at most this many actions.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of lines.")
@pass_context
def actions(ctx: CliContext, tenant: str | None, limit: int, as_json: bool) -> None:
    """List operator actions on whole tenants and apps (pause, resume), newest first."""
    with open_store(ctx) as store:
        found = store.actions(tenant, limit)
    if as_json:
        click.echo(json.dumps([a.model_dump(mode="json") for a in found], indent=2))
        return
    for action in found:
        scope = f"{action.tenant}/{action.app}" if action.app else action.tenant
        click.echo(
            f"{short_time(action.at)}  {action.kind:8} {printable(scope):24} "
            f"by {printable(action.actor or '-')}"
        )


@history.command("purge")
@click.option("--older-than", required=True, help="Age of the last change, e.g. 30d.")
@click.option("--tenant", help="Only this tenant's mails.")
@click.option("--app", help="Only this app's mails.")
@YES
@pass_context
def purge(ctx: CliContext, older_than: str, tenant: str | None, app: str | None, yes: bool) -> None:
    """Delete finished mails whose last change is older than --older-than, for good.

    Finished: sent, expired, dead-lettered or cancelled. Asks first, unless --yes.
    """
    try:
        cutoff = datetime.now(UTC) - parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from exc
    scope = " of " + "/".join(x for x in (tenant, app) if x) if tenant or app else ""
    with open_store(ctx) as store:
        confirm(
            yes,
            f"this deletes every finished mail{scope} last changed before "
            f"{short_time(cutoff)} UTC from the history",
        )
        count = store.purge(cutoff, tenant=tenant, app=app, on_progress=_PurgeProgress())
    click.echo(f"purged {plural(count, 'mail')} last changed before {short_time(cutoff)} UTC")


class _PurgeProgress:
    """Tells on stderr, at most once a second, how far a purge has come (it runs in batches)."""

    def __init__(self) -> None:
        self._next = time.monotonic() + 1

    def __call__(self, purged: int) -> None:
        if time.monotonic() >= self._next:
            self._next = time.monotonic() + 1
            click.echo(f"purging: {plural(purged, 'mail')} so far", err=True)


@click.group()
def store() -> None:
    """Manage the history store's schema."""


@store.command("migrate")
@pass_context
def migrate(ctx: CliContext) -> None:
    """Create or upgrade the store's schema to this version (idempotent)."""
    from rohrpost.shared.settings import redact_url
    from rohrpost.shared.store.database import create_store_engine
    from rohrpost.shared.store.database import migrate as run_migrations

    url = ctx.settings().store_url.get_secret_value()
    engine = create_store_engine(url)
    try:
        revision = run_migrations(engine)
    finally:
        engine.dispose()
    click.echo(f"history store {redact_url(url)} is at schema {revision}")
