"""``rohrpost dlq …``: inspect, correct, re-submit and purge dead letters."""

from __future__ import annotations

import contextlib
import json
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any

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
from rohrpost.commands.operators import ACTOR, session
from rohrpost.commands.terminal import cell, json_text, printable
from rohrpost.shared.preview import BRIEF, SHOW, as_text, preview

if TYPE_CHECKING:
    from rohrpost.operations import DeadLetter, DeadLetterFilter, DeadLetterQueue, OperatorSession


def _filter(ids: tuple[str, ...] = (), **given: Any) -> DeadLetterFilter:
    from rohrpost.operations import DeadLetterFilter

    since = when_option(given.pop("since", None), "--since")
    return DeadLetterFilter(since=since, ids=frozenset(ids) if ids else None, **given)


def _filters(command: Any) -> Any:
    for option in reversed(
        (
            click.option("--tenant", help="Only this tenant's dead letters."),
            click.option("--app", help="Only this app's dead letters."),
            click.option(
                "--reason",
                help=(
                    "Only this reason: invalid, misrouted, forbidden, template_error, rejected, "
                    "unencodable, max_attempts, delivery_limit."
                ),
            ),
            click.option("--since", help="Dead-lettered at or after: ISO 8601 or -2h, -7d."),
        )
    ):
        command = option(command)
    return command


@click.group()
def dlq() -> None:
    """Inspect, correct, re-submit and purge dead letters."""


def _queue(opened: OperatorSession) -> DeadLetterQueue:
    from rohrpost.operations import DeadLetterQueue

    return DeadLetterQueue(opened)


@dlq.command("list")
@_filters
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
@pass_context
def dlq_list(ctx: CliContext, /, as_json: bool, **given: Any) -> None:
    """List dead letters without removing any."""
    with session(ctx, None) as opened:
        letters = _queue(opened).letters(_filter(**given))
    if as_json:
        click.echo(json.dumps([letter.summary() for letter in letters], indent=2))
        return
    click.echo(
        f"{'id':36}  {'tenant/app':20}  {'reason':14}  {'att':>3}  {'dead at (UTC)':19}  "
        "to / subject / last error"
    )
    for letter in letters:
        click.echo(_row(letter))
    click.echo(f"({plural(len(letters), 'dead letter')})", err=True)


def _row(letter: DeadLetter) -> str:
    when = short_time(letter.dead_at)
    everyone = letter.recipients
    recipients = ", ".join(everyone[:3]) + (f" (+{len(everyone) - 3})" if len(everyone) > 3 else "")
    parts = [recipients, letter.subject, letter.error]
    if letter.problem:
        parts = [f"not a mail container: {letter.problem}", letter.error]
    what = " / ".join(part[: BRIEF.text] for part in parts if part)
    attempts = "-" if letter.attempts is None else letter.attempts
    return (
        f"{cell(letter.mail_id, 36):36}  {cell(letter.tenant + '/' + letter.app, 20):20}  "
        f"{cell(letter.reason, 14):14}  {cell(attempts, 3):>3}  {when:19}  {cell(what, 90)}"
    )


@dlq.command("show")
@click.argument("mail_id", type=MAIL_ID)
@click.option("--tenant", help="Look only in this tenant's dead-letter queues.")
@click.option("--json", "as_json", is_flag=True, help="The dead letter as JSON.")
@pass_context
def dlq_show(ctx: CliContext, mail_id: str, tenant: str | None, as_json: bool) -> None:
    """Show one dead letter: its container and its dead-letter headers.

    MAIL_ID: the id, or its first digits (at least 4). Long values are cut with a
    note of how much was left out.
    """
    with session(ctx, None) as opened:
        letter = _queue(opened).get(mail_id, tenant=tenant)
    shown = {
        **letter.summary(),
        "round": letter.round,
        "size": len(letter.body),
        "headers": letter.headers,
        "container": letter.container,
    }
    if letter.container is None:
        shown["body"] = as_text(letter.body, SHOW.text)
    click.echo(json.dumps(preview(shown), indent=2) if as_json else _pretty(shown))


def _human(key: str, value: Any) -> str:
    """A value of ``dlq show`` for people: lists joined, times to the second, rounds from 1."""
    if isinstance(value, list):
        return ", ".join(str(item) for item in value)
    if key == "dead_at" and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return f"{short_time(datetime.fromisoformat(value))} UTC"
    if key == "size" and isinstance(value, int):
        return plural(value, "byte")
    if key == "round" and isinstance(value, int):
        again = "once" if value == 1 else f"{value} times"
        return f"{value + 1} (" + ("the first" if value == 0 else f"re-submitted {again}") + ")"
    return str(value)


def _pretty(shown: dict[str, Any]) -> str:
    lines = [
        f"{key.replace('_', ' '):10}  {printable(_human(key, value))}"
        for key, value in shown.items()
        if key not in ("headers", "container", "body") and value not in (None, [])
    ]
    lines.append("headers")
    lines += [
        f"  {printable(key)}: {json_text(value, BRIEF, indent=None)}"
        for key, value in preview(shown["headers"]).items()
    ]
    if shown["container"] is not None:
        lines += ["container", json_text(shown["container"])]
    else:
        lines += ["body", printable(shown["body"])]
    return "\n".join(lines)


@dlq.command("edit")
@click.argument("mail_id", type=MAIL_ID)
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="PATH=VALUE",
    help="Set a field: to=a@b.example, data.name=Anna, max_attempts=3 (JSON values "
    "are parsed; repeatable).",
)
@click.option("--unset", "removals", multiple=True, metavar="PATH", help="Remove a field.")
@click.option("--editor", is_flag=True, help="Edit the whole container as JSON in $EDITOR.")
@click.option("--tenant", help="Look only in this tenant's dead-letter queues.")
@ACTOR
@pass_context
def dlq_edit(
    ctx: CliContext,
    /,
    *,
    mail_id: str,
    assignments: tuple[str, ...],
    removals: tuple[str, ...],
    editor: bool,
    tenant: str | None,
    actor: str | None,
) -> None:
    """Correct a dead letter; it stays in the dead-letter queue until `dlq retry`.

    MAIL_ID: the id, or its first digits (at least 4).
    """
    if not (assignments or removals or editor):
        raise click.UsageError("say what to change: --set, --unset or --editor")
    with session(ctx, actor) as opened:
        queue = _queue(opened)
        replacement = None
        if editor:
            replacement = _edited(queue.get(mail_id, tenant=tenant))
            if replacement is None:
                click.echo("nothing changed")
                return
        changes = queue.edit(
            mail_id,
            assignments=assignments,
            removals=removals,
            replacement=replacement,
            tenant=tenant,
        )
    if not changes:
        click.echo("nothing changed")
    for path, (old, new) in changes.items():
        old_text, new_text = (json_text(v, BRIEF, indent=None) for v in (old, new))
        click.echo(f"{printable(path)}: {old_text} -> {new_text}")


def _edited(letter: DeadLetter) -> dict[str, Any] | None:
    """The container as corrected in $EDITOR; None when the editor saved nothing."""
    text = (
        json.dumps(letter.container, indent=2, ensure_ascii=False)
        if (letter.container is not None)
        else letter.body.decode("utf-8", "replace")
    )
    edited = click.edit(text, extension=".json")
    if edited is None:
        return None
    try:
        replacement = json.loads(edited)
    except RecursionError:
        raise click.ClickException("the edited text nests too deeply to read") from None
    except ValueError as exc:
        raise click.ClickException(f"the edited text is not JSON: {exc}") from exc
    if not isinstance(replacement, dict):
        raise click.ClickException("the edited text must be one JSON object (a mail container)")
    return replacement


@dlq.command("retry")
@click.argument("mail_ids", nargs=-1, type=MAIL_ID)
@click.option("--all", "all_", is_flag=True, help="Every dead letter matching the filters.")
@_filters
@click.option("--dry-run", is_flag=True, help="Say what would be re-submitted; move nothing.")
@click.option(
    "--window",
    type=click.IntRange(1, 10_000),
    default=200,
    show_default=True,
    help="Dead letters moved per confirm round.",
)
@ACTOR
@pass_context
def dlq_retry(
    ctx: CliContext,
    /,
    *,
    mail_ids: tuple[str, ...],
    all_: bool,
    dry_run: bool,
    window: int,
    actor: str | None,
    **given: Any,
) -> None:
    """Re-submit dead letters (as edited, or as they are) with the attempt counter reset.

    MAIL_IDS: ids, or their first digits (at least 4).
    """
    if bool(mail_ids) == all_:
        raise click.UsageError("give mail ids, or --all (with filters)")
    criteria = _filter(mail_ids, **given)
    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label="re-submitting", file=sys.stderr)
        bar.update(1)

    with session(ctx, actor) as opened:
        ready, skipped = _queue(opened).retry(
            criteria, dry_run=dry_run, window=window, on_progress=progress
        )
    if bar is not None:
        bar.render_finish()
    verb = "would re-submit" if dry_run else "re-submitted"
    for letter in ready:
        click.echo(f"{verb} {printable(letter.mail_id)}")
    for letter, why in skipped:
        click.echo(f"skipped {printable(letter.mail_id or '-')}: {printable(why)}", err=True)
    click.echo(f"{verb} {len(ready)}, skipped {len(skipped)}", err=True)
    if missing := criteria.unmatched([*ready, *(letter for letter, _ in skipped)]):
        raise click.ClickException(f"no dead letter {', '.join(missing)}")
    if skipped:
        sys.exit(1)


@dlq.command("purge")
@click.argument("mail_ids", nargs=-1, type=MAIL_ID)
@_filters
@YES
@ACTOR
@pass_context
def dlq_purge(
    ctx: CliContext, /, mail_ids: tuple[str, ...], yes: bool, actor: str | None, **given: Any
) -> None:
    """Delete dead letters for good: these ids, or all matching the filters.

    MAIL_IDS: ids, or their first digits (at least 4). Each is recorded in its mail's
    history. Anything in a dead-letter queue can be purged, also what is not a mail
    container. Asks first, unless --yes.
    """
    criteria = _filter(mail_ids, **given)
    chosen = [f"--{k} {v}" for k, v in given.items() if v is not None]
    which = (
        f"the dead letters {', '.join(mail_ids)}"
        if mail_ids
        else "every dead letter" + (f" matching {' '.join(chosen)}" if chosen else "")
    )
    confirm(yes, f"this deletes {which} for good")
    with session(ctx, actor) as opened:
        count = _queue(opened).purge(criteria)
    click.echo(f"purged {plural(count, 'dead letter')}")
