"""``rohrpost submit``: one mail from flags, or many from a file."""

from __future__ import annotations

import base64
import json
import mimetypes
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from rohrpost.commands.context import CliContext, pass_context, when_option
from rohrpost.commands.mailfile import MailFile, read_mail_file
from rohrpost.shared.container import DEFAULT_PRIORITY, MAX_DATA_DEPTH, PRIORITIES

if TYPE_CHECKING:
    from rohrpost.producer.client import Producer


def _attachment(path: str) -> dict[str, str]:
    file = Path(path)
    content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return {
        "filename": file.name,
        "content_type": content_type,
        "content": base64.b64encode(file.read_bytes()).decode(),
    }


def _read_file(path: str) -> MailFile:
    if path == "-":
        return read_mail_file("stdin", sys.stdin.buffer.read())
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise click.BadParameter(
            f"cannot read {path}: {exc.strerror}", param_hint="--file"
        ) from exc
    return read_mail_file(path, raw)


def _submit_file(producer: Producer, mails: MailFile) -> None:
    """Submit every mail of the file; print each id once confirmed; refusals name the line."""
    from rohrpost.producer.client import SubmitManyError

    skipped: list[str] = []

    def on_duplicate(position: int, mail_id: uuid.UUID) -> None:
        skipped.append(
            f"duplicate: {mails.where(position)} ({mail_id}) was submitted before with the "
            "same content; not submitted again"
        )

    try:
        with click.progressbar(length=len(mails.mails), label="submitting", file=sys.stderr) as bar:
            ids = producer.submit_many(
                mails.mails, on_progress=bar.update, on_duplicate=on_duplicate
            )
    except SubmitManyError as exc:
        for mail_id in exc.submitted:
            click.echo(mail_id)
        if exc.position is None:
            raise
        raise SubmitManyError(
            f"{mails.where(exc.position)}: {exc.reason} ({len(exc.submitted)} mails before it "
            "were confirmed, their ids are printed; none after it was published)",
            exc.submitted,
            position=exc.position,
            reason=exc.reason,
        ) from exc
    for line in skipped:
        click.echo(line, err=True)
    for mail_id in ids:
        click.echo(mail_id)


def _from_flags(flags: dict[str, Any]) -> dict[str, Any]:
    if not flags["tenant"] or not flags["app"] or not flags["to"]:
        raise click.UsageError("--tenant, --app and --to are required (or use --file)")
    data: dict[str, Any] = {
        "tenant": flags["tenant"],
        "app": flags["app"],
        "to": list(flags["to"]),
        "cc": list(flags["cc"]),
        "bcc": list(flags["bcc"]),
        "reply_to": list(flags["reply_to"]),
        "tags": list(flags["tag"]),
        "history": flags["history"],
        "priority": flags["priority"],
        "attachments": [_attachment(p) for p in flags["attach"]],
    }
    for key, flag in (
        ("from", "sender"),
        ("subject", "subject"),
        ("text", "text"),
        ("html", "html"),
        ("template", "template"),
        ("max_attempts", "max_attempts"),
    ):
        if flags[flag] is not None:
            data[key] = flags[flag]
    if flags["data"] is not None:
        try:
            data["data"] = json.loads(flags["data"])
        except RecursionError:
            raise click.BadParameter(
                f"nested deeper than {MAX_DATA_DEPTH} levels (the limit)", param_hint="--data"
            ) from None
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--data") from exc
    for key, flag in (("not_before", "not_before"), ("expires_at", "expires")):
        moment = when_option(flags[flag], f"--{flag.replace('_', '-')}")
        if moment is not None:
            data[key] = moment.isoformat()
    return data


@click.command()
@click.option("--tenant", help="Tenant the mail belongs to.")
@click.option("--app", help="Application of the tenant.")
@click.option("--to", multiple=True, help="Recipient (repeatable).")
@click.option("--cc", multiple=True, help="Cc recipient (repeatable).")
@click.option("--bcc", multiple=True, help="Bcc recipient (repeatable).")
@click.option("--reply-to", multiple=True, help="Reply-To address (repeatable).")
@click.option("--from", "sender", help="Sender  [default: the app's sender]")
@click.option("--subject", help="Subject of a finished mail.")
@click.option("--text", help="Plain-text body of a finished mail.")
@click.option("--html", help="HTML body of a finished mail.")
@click.option(
    "--template", help="Template name, rendered at send time instead of --subject/--text."
)
@click.option("--data", help="Template data as a JSON object.")
@click.option(
    "--attach",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Attach a file (repeatable).",
)
@click.option("--not-before", help="Earliest send time: ISO 8601 or +30s/+2h/+3d.")
@click.option("--expires", help="Do not send after: ISO 8601 or +30s/+2h/+3d.")
@click.option("--max-attempts", type=click.IntRange(1, 100), help="[default: the app's]")
@click.option("--tag", multiple=True, help="Tag for searching history (repeatable).")
@click.option(
    "--history",
    type=click.Choice(["keep", "delete"]),
    default="keep",
    show_default=True,
    help="delete: once sent, the history keeps only the outcome, not the content.",
)
@click.option(
    "--priority",
    type=click.Choice(PRIORITIES),
    default=DEFAULT_PRIORITY,
    show_default=True,
    help="high: credentials, resets, one-time codes (sent first); bulk: newsletters.",
)
@click.option(
    "--file",
    "file_",
    type=click.Path(exists=True, allow_dash=True, dir_okay=False),
    help="Submit many mails: a JSON array or JSON lines of containers ('-' = stdin).",
)
@pass_context
def submit(ctx: CliContext, /, file_: str | None, **flags: Any) -> None:
    """Submit mails; print each mail's id once the broker confirmed it.

    A mail whose id was submitted before is not submitted again: with the same
    content it is reported on stderr and skipped (exit 0); with other content it is
    an error (exit 1).
    """
    from rohrpost.producer.client import Producer
    from rohrpost.shared.errors import DuplicateMail

    settings = ctx.settings()
    mails = _read_file(file_) if file_ is not None else None  # refuse a bad file before connecting
    with Producer(settings) as producer:
        if mails is not None:
            _submit_file(producer, mails)
            return
        try:
            click.echo(producer.submit(_from_flags(flags)))
        except DuplicateMail as exc:
            if not exc.same_content:
                raise
            click.echo(f"duplicate: {exc}", err=True)
