"""The long-running processes: ``worker``, ``history-consumer``, and ``run`` (both)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import click

from rohrpost.commands.context import CliContext, pass_context
from rohrpost.shared.settings import Settings

FC = TypeVar("FC", bound=Callable[..., object])

_PROCESSES = click.option(
    "--processes",
    "-p",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Send worker processes (threads share one core; processes use them all).",
)


def _metrics_port(default: str) -> Callable[[FC], FC]:
    return click.option(
        "--metrics-port",
        type=click.IntRange(0, 65535),
        help=f"Serve /metrics, /healthz, /readyz here; 0 = off  [default: {default}]",
    )


_METRICS_PORT = _metrics_port("metrics_port, 9750")


def _check_secrets(settings: Settings) -> None:
    for server in settings.smtp.values():
        server.password()  # a missing password variable is a startup error, not a retry


@click.command()
@_PROCESSES
@click.option("--drain", is_flag=True, help="Exit once the send and delay queues are empty.")
@_METRICS_PORT
@pass_context
def worker(ctx: CliContext, processes: int, drain: bool, metrics_port: int | None) -> None:
    """Send mails: consume every enabled send queue. SIGTERM finishes in-flight mails."""
    from rohrpost.consumer.supervisor import WORKER, Supervisor, run_worker

    settings = ctx.settings()
    _check_secrets(settings)
    port = settings.metrics_port if metrics_port is None else metrics_port
    if processes == 1:
        run_worker(settings, drain=drain, metrics_port=port)
    else:
        supervisor = Supervisor(settings, [WORKER] * processes, drain=drain, metrics_port=port)
        sys.exit(supervisor.run())


@click.command("history-consumer")
@click.option("--drain", is_flag=True, help="Exit once the history queue is empty.")
@_metrics_port("metrics_port + 1, 9751")
@pass_context
def history_consumer(ctx: CliContext, drain: bool, metrics_port: int | None) -> None:
    """Archive every event into the history store (migrates the store at start)."""
    from rohrpost.consumer.supervisor import run_history_consumer

    settings = ctx.settings()
    port = (
        (settings.metrics_port and settings.metrics_port + 1)
        if metrics_port is None
        else (metrics_port)
    )
    run_history_consumer(settings, drain=drain, metrics_port=port)


@click.command()
@_PROCESSES
@click.option(
    "--drain",
    is_flag=True,
    help="Exit once every queued mail is sent (or failed) and archived.",
)
@_METRICS_PORT
@click.option(
    "--console",
    "with_console",
    is_flag=True,
    help="Also serve the web console (console.host, console.port) as a child process.",
)
@pass_context
def run(
    ctx: CliContext, processes: int, drain: bool, metrics_port: int | None, with_console: bool
) -> None:
    """Run everything on one machine: send workers and the history consumer."""
    from rohrpost.consumer.supervisor import HISTORY, WORKER, Child, Supervisor

    settings = ctx.settings()
    _check_secrets(settings)
    children = [WORKER] * processes + ([HISTORY] if settings.history_enabled else [])
    if with_console:
        from rohrpost.console.server import check_binding, console_main

        check_binding(settings, settings.console.host)  # refused at once, not in a restart loop
        children.append(Child("console", console_main, follows_workers=True))
    port = settings.metrics_port if metrics_port is None else metrics_port
    sys.exit(Supervisor(settings, children, drain=drain, metrics_port=port).run())
