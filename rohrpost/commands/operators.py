"""Operator commands on mails and tenants: ``cancel``, ``send-now``, ``hold``, ``release``,
``pause``, ``resume``, ``history resend`` (``dlq`` has its own).

Every one of them records who acted (``--actor``, default: the OS user) in the history,
and takes a mail's id or a unique prefix of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from rohrpost.commands.context import MAIL_ID, CliContext, pass_context
from rohrpost.commands.terminal import printable

if TYPE_CHECKING:
    import uuid

    from rohrpost.operations import OperatorSession
    from rohrpost.shared.store import HistoryStore

ACTOR = click.option("--actor", help="Who is acting, for the history  [default: the OS user]")


@contextmanager
def session(ctx: CliContext, actor: str | None) -> Iterator[OperatorSession]:
    """An operator session on the configured broker."""
    from rohrpost.operations import OperatorSession

    with OperatorSession(ctx.settings(), actor) as opened:
        yield opened


@contextmanager
def optional_store(ctx: CliContext) -> Iterator[HistoryStore | None]:
    """The history store when history is enabled and reachable, else None (with a warning)."""
    from rohrpost.shared.errors import StoreError
    from rohrpost.shared.store import HistoryStore

    settings = ctx.settings()
    if not settings.history_enabled:
        yield None
        return
    try:
        store = HistoryStore.open(settings.store_url.get_secret_value())
    except StoreError as exc:
        click.echo(f"warning: going on without the history: {exc}", err=True)
        yield None
        return
    try:
        yield store
    finally:
        store.close()


def _resolve(ids: tuple[str, ...], store: HistoryStore | None) -> list[uuid.UUID]:
    """Every id as typed, resolved (prefixes through the history) before anything is done."""
    from rohrpost.operations.ids import resolve_mail_id

    return [resolve_mail_id(mail_id, store) for mail_id in ids]


Action = Callable[["OperatorSession", "uuid.UUID", "HistoryStore | None"], str]


def _act_on_mails(ctx: CliContext, ids: tuple[str, ...], actor: str | None, action: Action) -> None:
    with optional_store(ctx) as store:
        resolved = _resolve(ids, store)
        with session(ctx, actor) as opened:
            for mail_id in resolved:
                click.echo(printable(action(opened, mail_id, store)))  # may quote the history


MAIL_IDS = click.argument("mail_ids", nargs=-1, required=True, type=MAIL_ID)


@click.command()
@MAIL_IDS
@ACTOR
@pass_context
def cancel(ctx: CliContext, mail_ids: tuple[str, ...], actor: str | None) -> None:
    """Stop queued, scheduled, retrying or held mails from being sent.

    MAIL_IDS: ids, or their first digits (at least 4).
    """
    from rohrpost.operations.actions import cancel as cancel_mail

    _act_on_mails(ctx, mail_ids, actor, cancel_mail)


@click.command("send-now")
@MAIL_IDS
@ACTOR
@pass_context
def send_now(ctx: CliContext, mail_ids: tuple[str, ...], actor: str | None) -> None:
    """Send scheduled or retrying mails now, like `postqueue -i`.

    The copy still waiting in the delay levels is dropped when it comes due.
    MAIL_IDS: ids, or their first digits (at least 4).
    """
    from rohrpost.operations.actions import send_now as send_mail_now

    _act_on_mails(ctx, mail_ids, actor, send_mail_now)


@click.command()
@MAIL_IDS
@ACTOR
@pass_context
def hold(ctx: CliContext, mail_ids: tuple[str, ...], actor: str | None) -> None:
    """Hold mails, like `postsuper -h`: set aside when due, not sent until released.

    MAIL_IDS: ids, or their first digits (at least 4).
    """
    from rohrpost.operations.actions import hold as hold_mail

    _act_on_mails(ctx, mail_ids, actor, hold_mail)


@click.command()
@MAIL_IDS
@ACTOR
@pass_context
def release(ctx: CliContext, mail_ids: tuple[str, ...], actor: str | None) -> None:
    """Release held mails, like `postsuper -H`: they are sent (now, if they were due).

    MAIL_IDS: ids, or their first digits (at least 4).
    """
    from rohrpost.operations.actions import release as release_mail

    _act_on_mails(ctx, mail_ids, actor, release_mail)


def _scope(value: str) -> tuple[str, str | None]:
    tenant, _, app = value.partition("/")
    return tenant, app or None


@click.command()
@click.argument("scope", metavar="TENANT[/APP]")
@ACTOR
@pass_context
def pause(ctx: CliContext, scope: str, actor: str | None) -> None:
    """Hold a tenant's (or one app's) mails: they are queued but not sent until resumed."""
    from rohrpost.operations.actions import pause as pause_scope

    with session(ctx, actor) as opened:
        click.echo(pause_scope(opened, *_scope(scope)))


@click.command()
@click.argument("scope", metavar="TENANT[/APP]")
@ACTOR
@pass_context
def resume(ctx: CliContext, scope: str, actor: str | None) -> None:
    """Send again what `pause` held back."""
    from rohrpost.operations.actions import resume as resume_scope

    with session(ctx, actor) as opened:
        click.echo(resume_scope(opened, *_scope(scope)))


@click.command()
@click.argument("mail_id", type=MAIL_ID)
@ACTOR
@pass_context
def resend(ctx: CliContext, mail_id: str, actor: str | None) -> None:
    """Submit an archived mail again, as a new mail linked to the original.

    MAIL_ID: the id, or its first digits (at least 4).
    """
    from rohrpost.commands.history import open_store
    from rohrpost.operations.actions import resend as resend_mail
    from rohrpost.operations.ids import resolve_mail_id

    with open_store(ctx) as store:
        whole = resolve_mail_id(mail_id, store)
        with session(ctx, actor) as opened:
            new_id = resend_mail(opened, whole, store)
    click.echo(new_id)
