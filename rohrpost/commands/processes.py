"""The long-running processes: ``worker``, ``history-consumer``, and ``run`` (both)."""

from __future__ import annotations

import sys

import click

from rohrpost.commands.context import CliContext, pass_context
from shared.settings import Settings

_PROCESSES = click.option(
    "--processes",
    "-p",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Send worker processes (threads share one core; processes use them all).",
)


def _check_secrets(settings: Settings) -> None:
    for server in settings.smtp.values():
        server.password()  # a missing password variable is a startup error, not a retry


@click.command()
@_PROCESSES
@click.option("--drain", is_flag=True, help="Exit once the send and delay queues are empty.")
@pass_context
def worker(ctx: CliContext, processes: int, drain: bool) -> None:
    """Send mails: consume every enabled send queue. SIGTERM finishes in-flight mails."""
    from consumer.supervisor import WORKER, Supervisor, run_worker

    settings = ctx.settings()
    _check_secrets(settings)
    if processes == 1:
        run_worker(settings, drain=drain)
    else:
        sys.exit(Supervisor(settings, [WORKER] * processes, drain=drain).run())


@click.command("history-consumer")
@click.option("--drain", is_flag=True, help="Exit once the history queue is empty.")
@pass_context
def history_consumer(ctx: CliContext, drain: bool) -> None:
    """Archive every event into the history store (migrates the store at start)."""
    from consumer.supervisor import run_history_consumer

    run_history_consumer(ctx.settings(), drain=drain)


@click.command()
@_PROCESSES
@click.option(
    "--drain",
    is_flag=True,
    help="Exit once every queued mail is sent (or failed) and archived.",
)
@pass_context
def run(ctx: CliContext, processes: int, drain: bool) -> None:
    """Run everything on one machine: send workers and the history consumer."""
    from consumer.supervisor import HISTORY, WORKER, Supervisor

    settings = ctx.settings()
    _check_secrets(settings)
    children = [WORKER] * processes + ([HISTORY] if settings.history_enabled else [])
    sys.exit(Supervisor(settings, children, drain=drain).run())
