"""The ``rohrpost`` command: every sub-command in one place."""

from __future__ import annotations

import base64
import json
import mimetypes
import sys
from pathlib import Path
from typing import Any

import click

from shared.errors import ConfigError, RohrpostError
from shared.logs import configure_logging
from shared.settings import Settings, load_settings, redact_url
from shared.timeparse import parse_when


class _Context:
    def __init__(self, config: str | None, log_level: str | None, log_format: str | None) -> None:
        self.config = config
        self.overrides = {
            key: value
            for key, value in (("log_level", log_level), ("log_format", log_format))
            if value is not None
        }
        self._settings: Settings | None = None

    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config, **self.overrides)
            configure_logging(
                self._settings.log_level, self._settings.log_format, self._settings.secrets()
            )
        return self._settings


pass_context = click.make_pass_decorator(_Context)


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
    tenant's SMTP server, retry transient failures and dead-letter the rest.
    """
    ctx.obj = _Context(config, log_level, log_format)


# -- submit ---------------------------------------------------------------------------


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
        if flags[flag] is not None:
            try:
                data[key] = parse_when(flags[flag]).isoformat()
            except ValueError as exc:
                raise click.BadParameter(
                    str(exc), param_hint=f"--{flag.replace('_', '-')}"
                ) from exc
    return data


@cli.command()
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
def submit(ctx: _Context, /, file_: str | None, **flags: Any) -> None:
    """Submit mails; print each mail's id once the broker confirmed it."""
    from producer.client import Producer

    settings = ctx.settings()
    with Producer(settings) as producer:
        if file_ is None:
            click.echo(producer.submit(_from_flags(flags)))
            return
        items = _read_file(file_)
        with click.progressbar(length=len(items), label="submitting", file=sys.stderr) as bar:
            ids = producer.submit_many(items, on_progress=bar.update)
        for mail_id in ids:
            click.echo(mail_id)


# -- topology -------------------------------------------------------------------------


@cli.group()
def topology() -> None:
    """Declare or delete the exchanges and queues."""


@topology.command("declare")
@pass_context
def topology_declare(ctx: _Context) -> None:
    """Declare every exchange, queue and binding (idempotent)."""
    from shared.topology import declare_topology

    settings = ctx.settings()
    declared = declare_topology(settings)
    click.echo(
        f"declared {len(declared.exchanges())} exchanges, {len(declared.queues())} queues, "
        f"{len(declared.bindings())} bindings in namespace {settings.namespace!r} "
        f"on {redact_url(settings.broker_url.get_secret_value())}"
    )


@topology.command("delete")
@click.option("--yes", is_flag=True, help="Really delete, with every mail in the queues.")
@pass_context
def topology_delete(ctx: _Context, yes: bool) -> None:
    """Delete every exchange and queue of the namespace, messages included."""
    from shared.broker import admin_channel
    from shared.topology import Topology

    if not yes:
        raise click.UsageError("this deletes queued mails; pass --yes to confirm")
    settings = ctx.settings()
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        Topology.from_settings(settings).delete(channel)
    click.echo(f"deleted namespace {settings.namespace!r}")


# -- worker ---------------------------------------------------------------------------


@cli.command()
@click.option(
    "--processes",
    "-p",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Worker processes (threads share one core; processes use them all).",
)
@click.option("--drain", is_flag=True, help="Exit once send and delay queues are empty.")
@pass_context
def worker(ctx: _Context, processes: int, drain: bool) -> None:
    """Consume every enabled send queue and send the mails; SIGTERM finishes in-flight mails."""
    from consumer.supervisor import WorkerSupervisor, run_worker

    settings = ctx.settings()
    for server in settings.smtp.values():
        server.password()  # a missing password variable is a startup error, not a retry
    if processes == 1:
        run_worker(settings, drain=drain)
    else:
        sys.exit(WorkerSupervisor(settings, processes, drain=drain).run())


# -- demo -----------------------------------------------------------------------------


@cli.command()
@click.option(
    "--broker-url",
    envvar="ROHRPOST_BROKER_URL",
    default="amqp://guest:guest@127.0.0.1:5672/%2F",
    show_default=True,
    help="RabbitMQ to run the demo on.",
)
def demo(broker_url: str) -> None:
    """Run the whole pipeline once on a local SMTP catcher and report each mail's fate."""
    from rohrpost.demo import run_demo

    sys.exit(run_demo(broker_url))


# -- schema ---------------------------------------------------------------------------


@cli.command()
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory to write into  [default: the package's shared/schema]",
)
def schema(output: str | None) -> None:
    """Write the JSON Schemas of the mail container and the events."""
    from shared.schema_export import write_schemas

    for path in write_schemas(Path(output) if output else None):
        click.echo(path)


def main() -> None:
    """Entry point of the ``rohrpost`` console script."""
    try:
        cli(standalone_mode=False)
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
