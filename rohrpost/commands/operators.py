"""Operator commands: ``cancel``, ``pause``, ``resume``, ``history resend`` (``dlq`` has its own).

Every one of them records who acted (``--actor``, default: the OS user) in the history.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from rohrpost.commands.context import CliContext, pass_context
from rohrpost.commands.terminal import printable

if TYPE_CHECKING:
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
    """The history store when history is enabled and reachable, else None."""
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


@click.command()
@click.argument("mail_ids", nargs=-1, required=True, type=click.UUID)
@ACTOR
@pass_context
def cancel(ctx: CliContext, mail_ids: tuple[uuid.UUID, ...], actor: str | None) -> None:
    """Stop queued or scheduled mails from being sent."""
    from rohrpost.operations.actions import cancel as cancel_mail

    with session(ctx, actor) as opened, optional_store(ctx) as store:
        for mail_id in mail_ids:
            click.echo(printable(cancel_mail(opened, mail_id, store)))  # quotes the history


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
@click.argument("mail_id", type=click.UUID)
@ACTOR
@pass_context
def resend(ctx: CliContext, mail_id: uuid.UUID, actor: str | None) -> None:
    """Submit an archived mail again, as a new mail linked to the original."""
    from rohrpost.commands.history import open_store
    from rohrpost.operations.actions import resend as resend_mail

    with open_store(ctx) as store, session(ctx, actor) as opened:
        new_id = resend_mail(opened, mail_id, store)
    click.echo(new_id)
