"""``rohrpost submit``: one mail from flags, or many from a file."""

from __future__ import annotations

import base64
import json
import mimetypes
import sys
import uuid
from pathlib import Path
from typing import Any

import click

from rohrpost.commands.context import CliContext, pass_context, when_option


def _attachment(path: str) -> dict[str, str]:
    file = Path(path)
    content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return {
        "filename": file.name,
        "content_type": content_type,
        "content": base64.b64encode(file.read_bytes()).decode(),
    }


def _read_file(path: str) -> list[dict[str, Any]]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    items: Any
    try:
        if text.lstrip().startswith("["):
            items = json.loads(text)
        else:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{path}: not JSON or JSON lines: {exc}") from exc
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise click.BadParameter(f"{path}: every entry must be a JSON object (a mail container)")
    return items


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
        except json.JSONDecodeError as exc:
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
@click.option("--history", type=click.Choice(["keep", "delete"]), default="keep", show_default=True)
@click.option(
    "--file",
    "file_",
    type=click.Path(allow_dash=True, dir_okay=False),
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
    with Producer(settings) as producer:
        if file_ is None:
            try:
                click.echo(producer.submit(_from_flags(flags)))
            except DuplicateMail as exc:
                if not exc.same_content:
                    raise
                click.echo(f"duplicate: {exc}", err=True)
            return
        items = _read_file(file_)
        skipped: list[str] = []

        def on_duplicate(position: int, mail_id: uuid.UUID) -> None:
            skipped.append(
                f"duplicate: mail #{position + 1} ({mail_id}) was submitted before "
                "with the same content; not submitted again"
            )

        with click.progressbar(length=len(items), label="submitting", file=sys.stderr) as bar:
            ids = producer.submit_many(items, on_progress=bar.update, on_duplicate=on_duplicate)
        for line in skipped:
            click.echo(line, err=True)
        for mail_id in ids:
            click.echo(mail_id)
