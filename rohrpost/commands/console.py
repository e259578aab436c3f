"""``rohrpost console``: the web console, and the hashes its configuration holds."""

from __future__ import annotations

import sys

import click

from rohrpost.commands.context import CliContext


@click.group(invoke_without_command=True)
@click.option("--host", help="Address to listen on  [default: console.host, 127.0.0.1]")
@click.option("--port", type=click.IntRange(0, 65535), help="[default: console.port, 8025]")
@click.pass_context
def console(click_ctx: click.Context, host: str | None, port: int | None) -> None:
    """Serve the operators' web console (dead letters, history, tenants, audit, JSON API)."""
    if click_ctx.invoked_subcommand is not None:
        return
    from rohrpost.console.server import serve

    ctx = click_ctx.find_object(CliContext)
    assert ctx is not None
    serve(ctx.settings(), host=host, port=port)


def _read_password() -> str:
    if sys.stdin.isatty():
        password: str = click.prompt("password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise click.UsageError("the password is empty")
    return password


@console.command("hash-password")
def hash_password() -> None:
    """Read a password from stdin (asked twice on a terminal); print its hash.

    Put the hash into the configuration as [console.users.NAME] password_hash.
    """
    from rohrpost.console.passwords import hash_password as make_hash

    click.echo(make_hash(_read_password()))


@console.command("new-token")
def new_token() -> None:
    """Print a new random API token and, on stderr, the hash to configure for it.

    Put the hash into the configuration as [console.tokens.NAME] token_hash; give the
    token to the tool that calls the API (Authorization: Bearer TOKEN).
    """
    from rohrpost.console.passwords import hash_token
    from rohrpost.console.passwords import new_token as make_token

    token = make_token()
    click.echo(token)
    click.echo(f"token_hash = {hash_token(token)!r}", err=True)
