"""The ``rohrpost`` command: every sub-command in one place."""

from __future__ import annotations

import sys

import click

from rohrpost.commands.admin import demo, schema, topology
from rohrpost.commands.context import CliContext
from rohrpost.commands.dlq import dlq
from rohrpost.commands.history import history, store
from rohrpost.commands.operators import cancel, pause, resend, resume
from rohrpost.commands.processes import history_consumer, run, worker
from rohrpost.commands.submit import submit
from rohrpost.shared.errors import ConfigError, RohrpostError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config",
    "-c",
    type=click.Path(dir_okay=False),
    envvar="ROHRPOST_CONFIG",
    help="TOML configuration file  [default: ./rohrpost.toml if present]",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]))
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
    history,
    dlq,
    cancel,
    pause,
    resume,
    store,
    topology,
    schema,
    demo,
):
    cli.add_command(command)


# Import names of the packages in the `server` extra (pyproject.toml; a test keeps them equal).
SERVER_MODULES = frozenset(
    {"jinja2", "prometheus_client", "aiosmtpd", "sqlalchemy", "alembic", "psycopg"}
)


def main() -> None:
    """Entry point of the ``rohrpost`` console script."""
    try:
        cli(standalone_mode=False)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in SERVER_MODULES:
            raise
        click.echo(
            f"error: this command needs rohrpost's server extra (module {exc.name!r} is "
            "missing): pip install 'rohrpost[server]'",
            err=True,
        )
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        sys.exit(2)
    except RohrpostError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
