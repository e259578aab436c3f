"""Administrative commands: topology, schema, demo."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from rohrpost.commands.context import YES, CliContext, confirm, pass_context, plural
from rohrpost.shared.settings import redact_url


@click.group()
def topology() -> None:
    """Declare or delete the exchanges and queues."""


@topology.command("declare")
@pass_context
def topology_declare(ctx: CliContext) -> None:
    """Declare every exchange, queue and binding (idempotent)."""
    from rohrpost.shared.topology import declare_topology

    settings = ctx.settings()
    declared = declare_topology(settings)
    click.echo(
        f"declared {plural(len(declared.exchanges()), 'exchange')}, "
        f"{plural(len(declared.queues()), 'queue')}, "
        f"{plural(len(declared.bindings()), 'binding')} in namespace '{settings.namespace}' "
        f"on {redact_url(settings.broker_url.get_secret_value())}"
    )


@topology.command("delete")
@YES
@pass_context
def topology_delete(ctx: CliContext, yes: bool) -> None:
    """Delete every exchange and queue of the namespace, messages included.

    Asks first, unless --yes.
    """
    from rohrpost.shared.broker import admin_channel
    from rohrpost.shared.state import forget_namespace_keys
    from rohrpost.shared.topology import Topology

    settings = ctx.settings()
    confirm(
        yes,
        f"this deletes every queue and exchange of namespace '{settings.namespace}' on "
        f"{redact_url(settings.broker_url.get_secret_value())}, with every mail in them",
    )
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        Topology.from_settings(settings).delete(channel)
    forgotten = ""
    if settings.redis_url is not None:
        keys = forget_namespace_keys(settings.redis_url.get_secret_value(), settings.namespace)
        forgotten = (
            " (its shared-state keys in Redis were not reachable; they expire)"
            if keys is None
            else f" and its {plural(keys, 'shared-state key')}"
        )
    click.echo(f"deleted namespace '{settings.namespace}'{forgotten}")


@click.command()
@click.option(
    "--broker-url",
    envvar="ROHRPOST_BROKER_URL",
    default="amqp://guest:guest@127.0.0.1:5672/%2F",
    show_default=True,
    help="RabbitMQ to run the demo on.",
)
@click.option(
    "--keep", is_flag=True, help="Keep running after the report (with the console) until Ctrl-C."
)
@click.option(
    "--console-port",
    type=click.IntRange(0, 65535),
    default=8025,
    show_default=True,
    help="Port of the web console the demo serves on 127.0.0.1 (another free one if taken).",
)
def demo(broker_url: str, keep: bool, console_port: int) -> None:
    """Run the whole pipeline once on a local SMTP catcher and report each mail's fate."""
    from rohrpost.demo import run_demo

    sys.exit(run_demo(broker_url, keep=keep, console_port=console_port))


@click.command()
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False),
    default=".",
    show_default=True,
    help="Directory to write the schema files into (created if missing).",
)
def schema(output: str) -> None:
    """Write the JSON Schemas of the mail container and the events, one file each.

    The same files are committed in the repository's shared/schema/; regenerate
    them there with `rohrpost schema -o shared/schema`.
    """
    from rohrpost.shared.schema_export import write_schemas

    for path in write_schemas(Path(output)):
        click.echo(path)
