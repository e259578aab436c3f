"""The ``rohrpost`` command: every sub-command in one place."""

from __future__ import annotations

import io
import sys
from typing import NoReturn

import click

from rohrpost.commands.admin import demo, schema, topology
from rohrpost.commands.console import console
from rohrpost.commands.context import CliContext
from rohrpost.commands.dlq import dlq
from rohrpost.commands.history import history, store
from rohrpost.commands.operators import cancel, hold, pause, release, resend, resume, send_now
from rohrpost.commands.processes import history_consumer, run, worker
from rohrpost.commands.status import status
from rohrpost.commands.submit import submit
from rohrpost.commands.terminal import printable
from rohrpost.shared.errors import ConfigError, RohrpostError
from rohrpost.shared.logs import get_logger
from rohrpost.shared.preview import clip

log = get_logger(__name__)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config",
    "-c",
    type=click.Path(dir_okay=False),
    envvar="ROHRPOST_CONFIG",
    help="TOML configuration file  [default: ./rohrpost.toml if present]",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log from this level on  [default: log_level, info]",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "console"]),
    help="Log lines as JSON or for people; auto: console on a terminal  [default: log_format]",
)
@click.version_option(package_name="rohrpost")
@click.pass_context
def cli(
    ctx: click.Context, config: str | None, log_level: str | None, log_format: str | None
) -> None:
    """rohrpost: a mail queue for RabbitMQ.

    Services submit mails; workers hold them until due, render, send over the
    tenant's SMTP server, retry transient failures and dead-letter the rest; the
    history consumer archives every step.
    """
    ctx.obj = CliContext(config, log_level, log_format)


history.add_command(resend)
for command in (
    submit,
    run,
    worker,
    history_consumer,
    status,
    history,
    dlq,
    cancel,
    send_now,
    hold,
    release,
    pause,
    resume,
    store,
    topology,
    schema,
    demo,
    console,
):
    cli.add_command(command)


# Import names of the packages in the `server` extra (pyproject.toml; a test keeps them equal).
SERVER_MODULES = frozenset(
    {
        "jinja2",
        "prometheus_client",
        "aiosmtpd",
        "sqlalchemy",
        "alembic",
        "psycopg",
        "starlette",
        "uvicorn",
        "anyio",
    }
)


def main() -> None:
    """Entry point of the ``rohrpost`` console script."""
    for stream in (sys.stdout, sys.stderr):  # a terminal that is not UTF-8 gets escapes
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        _fail("error: aborted", 130)
    except click.ClickException as exc:
        _fail(f"error: {_usage_text(exc)}", exc.exit_code)
    except Exception as exc:
        _exit_for(exc)


def _usage_text(exc: click.ClickException) -> str:
    """click's message, begun like ours, with where to find help for a usage error."""
    text = exc.format_message()
    if text[:1].isupper() and not text[1:2].isupper():
        text = text[0].lower() + text[1:]  # "Missing argument" -> "missing argument"
    context = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and context is not None:
        text = f"{text.rstrip('.')} (see `{context.command_path} --help`)"
    return text


def _exit_for(exc: Exception) -> NoReturn:
    """One line on stderr and the exit status for ``exc``; never a traceback."""
    missing = (exc.name or "") if isinstance(exc, ModuleNotFoundError) else ""
    if missing.partition(".")[0] in SERVER_MODULES:
        _fail(
            f"error: this command needs rohrpost's server extra (module {missing!r} is "
            "missing): pip install 'rohrpost[server]'",
            2,
        )
    if isinstance(exc, ConfigError):
        _fail(f"error: {exc}", 2)
    if isinstance(exc, RohrpostError):
        _fail(f"error: {exc}", 1)
    # The last resort, for a bug: the traceback goes to the log at debug level.
    log.debug("the command failed unexpectedly", exc_info=exc)
    _fail(
        f"error: unexpected {type(exc).__name__}: {clip(str(exc), 500)} (a bug in rohrpost; "
        "`rohrpost --log-level debug …` logs the traceback)",
        1,
    )


def _fail(message: str, status: int) -> NoReturn:
    click.echo(printable(message), err=True)
    sys.exit(status)
