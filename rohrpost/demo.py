"""``rohrpost demo``: the whole pipeline once, on a throwaway namespace, in one process.

Starts a local SMTP catcher that misbehaves on purpose, a send worker, submits four
mails (due now, scheduled a few seconds ahead, one the server refuses once with 421,
one it rejects with 550), and prints each mail's timeline as the history consumer
archived it in a SQLite store. Then deletes everything it created.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from rohrpost.catcher import MailCatcher
from rohrpost.console.server import ConsoleThread
from rohrpost.consumer.history import HistoryConsumer
from rohrpost.consumer.worker import SendWorker
from rohrpost.producer.client import Producer
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.errors import BrokerUnavailable
from rohrpost.shared.logs import configure_logging
from rohrpost.shared.settings import Settings, redact_url, settings_from_mapping
from rohrpost.shared.state import forget_namespace_keys
from rohrpost.shared.store import HistoryStore, MailHistory
from rohrpost.shared.topology import Topology

TEMPLATES = Path(__file__).parent / "demo_templates"
FINAL = {"sent", "dead_lettered", "expired"}
_TIMEOUT_SECONDS = 60

_HOW_TO_START = """\
error: no RabbitMQ answers at {url}
Start one, then run the demo again:
  * Debian/Ubuntu:  sudo apt-get install rabbitmq-server && sudo rabbitmq-server -detached
  * Docker:         docker run -d --name rabbitmq -p 5672:5672 rabbitmq:3.13
  * elsewhere:      rohrpost demo --broker-url amqp://user:password@host:5672/%2F
                    (or set ROHRPOST_BROKER_URL)
"""


@dataclass(frozen=True)
class _Tracked:
    label: str
    asked: str
    expect: str


def _order(customer: str, number: int) -> dict[str, Any]:
    items: list[dict[str, Any]] = [
        {"name": "Teapot", "qty": 1, "price": 24.9},
        {"name": "Green tea", "qty": 3, "price": 6.5},
    ]
    total = sum(i["qty"] * i["price"] for i in items)
    return {"customer": customer, "order": {"number": number, "lines": items, "total": total}}


def _mails(now: datetime) -> list[tuple[dict[str, Any], _Tracked]]:
    base = {"tenant": "acme", "app": "shop", "template": "order"}
    return [
        (
            {**base, "to": ["Anna Schmidt <anna@customer.example>"], "data": _order("Anna", 1001)},
            _Tracked("order confirmation", "send now", "sent"),
        ),
        (
            {
                **base,
                "to": ["bob@customer.example"],
                "data": _order("Bob", 1002),
                "not_before": (now + timedelta(seconds=4)).isoformat(),
            },
            _Tracked("scheduled reminder", "send in 4 s", "sent"),
        ),
        (
            {**base, "to": ["flaky@customer.example"], "data": _order("Flaky", 1003)},
            _Tracked("server busy once (421)", "send now", "sent"),
        ),
        (
            {**base, "to": ["nobody@customer.example"], "data": _order("Nobody", 1004)},
            _Tracked("unknown recipient (550)", "send now", "dead_lettered"),
        ),
    ]


def _settings(broker_url: str, workdir: Path, smtp_port: int) -> Settings:
    return settings_from_mapping(
        {
            "broker_url": broker_url,
            "namespace": f"demo-{uuid.uuid4().hex[:8]}",
            "templates_dir": str(workdir / "templates"),
            "store_url": f"sqlite:///{workdir / 'history.db'}",
            "history_batch_wait": "50ms",
            "max_delay": "1h",
            "threads": 2,
            "smtp": {"catcher": {"host": "127.0.0.1", "port": smtp_port}},
            "tenants": {
                "acme": {
                    "apps": {
                        "shop": {
                            "smtp": "catcher",
                            "sender": "Acme Shop <shop@acme.example>",
                            "max_attempts": 3,
                            "backoff": {"base": "2s", "jitter": 0},
                        }
                    }
                }
            },
        }
    )


def _describe(found: MailHistory | None, started: float) -> list[str]:
    if found is None:
        return ["not in the history yet"]
    lines = []
    for event in found.events:
        at = event.at.timestamp() - started
        detail = "; ".join(
            text
            for text in (
                f"attempt {event.attempt}" if event.attempt else "",
                event.reason or "",
                event.error or "",
                event.smtp_reply or "",
            )
            if text
        )
        lines.append(f"+{at:5.1f}s  {event.kind:14} {detail}".rstrip())
    return lines


def _wait_for_outcomes(store: HistoryStore, tracked: dict[uuid.UUID, _Tracked]) -> None:
    deadline = time.monotonic() + _TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        finals = [store.mail(mail_id) for mail_id in tracked]
        if all(f is not None and f.mail.status in FINAL for f in finals):
            return
        time.sleep(0.2)


def run_demo(broker_url: str, *, keep: bool = False, console_port: int = 8025) -> int:
    """Run the demo; return the process exit code (``keep``: wait for Ctrl-C before cleaning up)."""
    configure_logging("error", "console")
    try:
        with admin_channel(broker_url, timeout=5):
            pass
    except BrokerUnavailable:
        click.echo(_HOW_TO_START.format(url=redact_url(broker_url)), err=True)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="rohrpost-demo-"))
    shutil.copytree(TEMPLATES, workdir / "templates")
    with MailCatcher() as catcher:
        catcher.script("flaky@customer.example", ["421 4.3.2 busy, try again later"])
        catcher.always("nobody@customer.example", "550 5.1.1 no such user here", stage="rcpt")
        settings = _settings(broker_url, workdir, catcher.port)
        try:
            return _run(settings, catcher, keep=keep, console_port=console_port)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _console(settings: Settings, port: int) -> ConsoleThread | None:
    """The web console on the demo's store, on ``port`` (or any free port when it is taken)."""
    for attempt in (port, 0):
        try:
            return ConsoleThread(settings, port=attempt).start()
        except OSError:
            continue
    return None


def _hold(keep: bool, console: ConsoleThread | None) -> None:
    if not keep:
        return
    where = f" (the console stays at {console.url})" if console else ""
    click.echo(f"\nthe demo keeps running{where}; Ctrl-C ends it and deletes everything")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        click.echo("")


def _run(settings: Settings, catcher: MailCatcher, *, keep: bool, console_port: int) -> int:
    url = settings.broker_url.get_secret_value()
    topology = Topology.from_settings(settings)
    store = HistoryStore.open(settings.store_url.get_secret_value(), migrate_schema=True)
    worker = SendWorker(settings)
    history = HistoryConsumer(settings, store)
    threads = [
        threading.Thread(target=worker.run, name="demo-worker"),
        threading.Thread(target=history.run, name="demo-history"),
    ]
    console = None
    try:
        with admin_channel(url) as channel:
            topology.declare(channel)
        click.echo(f"rohrpost demo: namespace {settings.namespace!r} on {redact_url(url)}")
        click.echo(
            f"  SMTP catcher on 127.0.0.1:{catcher.port}, a send worker, a history "
            "consumer (SQLite)\n"
        )
        for thread in threads:
            thread.start()
        console = _console(settings, console_port)
        if console is not None:
            click.echo(f"  the web console: {console.url}  (open while the demo runs; --keep)\n")
        started = time.time()
        tracked = {}
        with Producer(settings) as producer:
            for container, info in _mails(datetime.now(UTC)):
                tracked[producer.submit(container)] = info
                click.echo(f"  submitted {info.label:<26} ({info.asked})")
        click.echo("\nwaiting for every mail to reach a final state …\n")
        _wait_for_outcomes(store, tracked)
        code = _report(store, tracked, started, catcher, topology)
        _hold(keep, console)
        return code
    finally:
        if console is not None:
            console.stop()
        worker.stop()
        history.stop()
        for thread in threads:
            if thread.is_alive():
                thread.join()
        store.close()
        with admin_channel(url) as channel:
            topology.delete(channel)
        redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
        forget_namespace_keys(redis_url, settings.namespace)  # the mail ids and send claims


def _report(
    store: HistoryStore,
    tracked: dict[uuid.UUID, _Tracked],
    started: float,
    catcher: MailCatcher,
    topology: Topology,
) -> int:
    ok = True
    for mail_id, info in tracked.items():
        found = store.mail(mail_id)
        as_expected = found is not None and found.mail.status == info.expect
        ok = ok and as_expected
        status = found.mail.status if found else "unknown"
        click.echo(f"{'ok ' if as_expected else '!! '} {info.label}: {status}  [{mail_id}]")
        for line in _describe(found, started):
            click.echo(f"       {line}")
    dead = topology.dead_queue("acme", "shop")
    click.echo(f"\nthe SMTP catcher received {len(catcher.mails)} mails:")
    for mail in catcher.mails:
        message = mail.parsed()
        click.echo(f"  To: {message['To']}  Subject: {message['Subject']}")
    click.echo(f"the refused mail waits in the dead-letter queue {dead}")
    click.echo(
        "\nall mails ended as expected (timelines read back from the history store)"
        if ok
        else "\nsome mails did not end as expected"
    )
    return 0 if ok else 1
