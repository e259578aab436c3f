"""``rohrpost status``: the queues at a glance, like Postfix's ``postqueue -p`` and ``qshape``.

The figures come from ``rohrpost.operations.status.overview``, which the console's
overview shows too; this module only lays them out.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from rohrpost.commands.context import CliContext, pass_context, plural, short_time
from rohrpost.commands.terminal import printable, printable_json
from rohrpost.shared.timeparse import parse_duration

if TYPE_CHECKING:
    from rohrpost.operations.status import Figures, Overview, RouteStatus
    from rohrpost.shared.store import HistoryStore

_COLUMNS = (
    ("ready", "ready"),
    ("in flight", "in_flight"),
    ("consumers", "consumers"),
    ("scheduled", "scheduled"),
    ("retrying", "retrying"),
    ("held", "held"),
    ("dead", "dead_lettered"),
)


@click.command()
@click.option("--tenant", help="Only this tenant's apps.")
@click.option("--app", help="Only apps of this name.")
@click.option("--json", "as_json", is_flag=True, help="The figures as one JSON object.")
@click.option(
    "--watch", is_flag=True, help="Show the figures again every --interval, until Ctrl-C."
)
@click.option(
    "--interval",
    default="2s",
    show_default=True,
    help="How often --watch shows the figures again: 1s, 10s, 1m.",
)
@pass_context
def status(
    ctx: CliContext,
    /,
    *,
    tenant: str | None,
    app: str | None,
    as_json: bool,
    watch: bool,
    interval: str,
) -> None:
    """Show the queues of every tenant/app at a glance, like postqueue -p and qshape.

    Per tenant/app: mails ready, in flight, scheduled, retrying, held and
    dead-lettered, consumers, paused or not, the oldest waiting mail, what was sent
    and retried, and the waiting mails by age. Unknown figures are shown as -.
    """
    try:
        seconds = parse_duration(interval).total_seconds()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--interval") from exc
    with _history(ctx) as (store, problem):
        if watch:
            _watch(ctx, store, problem, tenant, app, as_json=as_json, seconds=seconds)
            return
        shown = _overview(ctx, store, problem, tenant, app)
        click.echo(_as_json(shown) if as_json else render(shown))
    if shown.broker is not None:
        raise click.ClickException(f"the broker could not be read: {shown.broker}")


def _watch(
    ctx: CliContext,
    store: HistoryStore | None,
    problem: str | None,
    tenant: str | None,
    app: str | None,
    *,
    as_json: bool,
    seconds: float,
) -> None:
    """Show the figures every ``seconds`` until Ctrl-C, which ends it normally (exit 0)."""
    try:
        while True:
            shown = _overview(ctx, store, problem, tenant, app)
            if sys.stdout.isatty():
                click.clear()
            click.echo(_as_json(shown) if as_json else render(shown))
            time.sleep(max(0.5, seconds))
            click.echo("")
    except KeyboardInterrupt:
        return


def _overview(
    ctx: CliContext,
    store: HistoryStore | None,
    problem: str | None,
    tenant: str | None,
    app: str | None,
) -> Overview:
    from rohrpost.operations.status import overview

    return overview(ctx.settings(), store, tenant=tenant, app=app, history_problem=problem)


@contextmanager
def _history(ctx: CliContext) -> Iterator[tuple[HistoryStore | None, str | None]]:
    """The store to read (never created here), or None and why there is none."""
    from rohrpost.shared.errors import StoreError
    from rohrpost.shared.store import HistoryStore

    settings = ctx.settings()
    if not settings.history_enabled:
        yield None, "history_enabled is false"
        return
    try:
        store = HistoryStore.open(settings.store_url.get_secret_value())
    except StoreError as exc:
        yield None, str(exc)
        return
    try:
        yield store, None
    finally:
        store.close()


def _as_json(shown: Overview) -> str:
    return printable_json(json.dumps(shown.model_dump(mode="json"), indent=2))


def age(seconds: float | None) -> str:
    """``45s``, ``12m 3s``, ``3h 5m``, ``2d 4h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    for unit, size, smaller, small_size in (
        ("d", 86400, "h", 3600),
        ("h", 3600, "m", 60),
        ("m", 60, "s", 1),
    ):
        if whole >= size:
            return f"{whole // size}{unit} {whole % size // small_size}{smaller}"
    return f"{whole}s"


def _figure(value: int | None) -> str:
    return "-" if value is None else str(value)


def _state(route: RouteStatus) -> str:
    if not route.enabled:
        return "disabled"
    return {None: "-", True: "paused", False: "active"}[route.paused]


def _line(name: str, smtp: str, state: str, figures: Figures) -> str:
    counts = "".join(f"  {_figure(getattr(figures, key)):>{len(head)}}" for head, key in _COLUMNS)
    return (
        f"{printable(name):24}  {printable(smtp):10}  {state:8}{counts}  "
        f"{age(figures.oldest_waiting_seconds):>8}  {_figure(figures.last_hour.sent):>7}  "
        f"{_figure(figures.last_day.sent):>8}  {_figure(figures.last_hour.retried):>10}  "
        f"{_figure(figures.last_hour.dead_lettered):>7}"
    )


def render(shown: Overview) -> str:
    """The overview as tables for a terminal."""
    from rohrpost.operations.status import AGE_BUCKET_NAMES

    heads = "".join(f"  {head}" for head, _ in _COLUMNS)
    lines = [
        f"namespace '{shown.namespace}' at {short_time(shown.at)} UTC",
        "",
        f"{'tenant/app':24}  {'smtp':10}  {'state':8}{heads}  {'oldest':>8}  {'sent 1h':>7}  "
        f"{'sent 24h':>8}  {'retried 1h':>10}  {'dead 1h':>7}",
    ]
    for route in shown.routes:
        lines.append(_line(f"{route.tenant}/{route.app}", route.smtp, _state(route), route))
    lines.append(_line("total", "", "", shown.total))
    lines += ["", "waiting mails by age, since due (qshape)"]
    lines.append(
        f"{'tenant/app':24}  {'total':>6}" + "".join(f"  {n:>7}" for n in AGE_BUCKET_NAMES)
    )
    for name, figures in [(f"{r.tenant}/{r.app}", r) for r in shown.routes] + [
        ("total", shown.total)
    ]:
        ages = figures.waiting_by_age
        counts = [ages.get(n) if ages is not None else None for n in AGE_BUCKET_NAMES]
        total = sum(c or 0 for c in counts) if ages is not None else None
        lines.append(
            f"{printable(name):24}  {_figure(total):>6}"
            + "".join(f"  {_figure(c):>7}" for c in counts)
        )
    lines += ["", _queues(shown), *_problems(shown)]
    return "\n".join(lines)


def _queues(shown: Overview) -> str:
    delay = shown.delay_levels
    parts = [f"delay levels: {_mails(delay.messages)} in {plural(delay.queues, 'queue')}"]
    if shown.history_queue is not None:
        queue = shown.history_queue
        consumers = "-" if queue.consumers is None else plural(queue.consumers, "consumer")
        parts.append(f"history queue: {_events(queue.messages)}, {consumers}")
    if shown.history_rejected is not None:
        parts.append(f"history set aside: {_figure(shown.history_rejected.messages)}")
    return " · ".join(parts)


def _mails(count: int | None) -> str:
    return "- mails" if count is None else plural(count, "mail")


def _events(count: int | None) -> str:
    return "- events" if count is None else plural(count, "event")


def _problems(shown: Overview) -> list[str]:
    found = [
        (what, why)
        for what, why in (
            ("queues", shown.broker),
            ("in flight", shown.management),
            ("history figures", shown.history),
        )
        if why is not None
    ]
    return [f"{what} unknown (-): {printable(why)}" for what, why in found] + [
        printable(note) for note in shown.notes
    ]
