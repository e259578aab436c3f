"""``rohrpost demo``: the whole pipeline once, on a throwaway namespace, in one process.

Starts a local SMTP catcher that misbehaves on purpose, a send worker, submits four
mails (due now, scheduled a few seconds ahead, one the server refuses once with 421,
one it rejects with 550), follows their events and prints what became of each. Then
deletes everything it created.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from consumer.worker import SendWorker
from producer.client import Producer
from rohrpost.catcher import MailCatcher
from shared.broker import admin_channel
from shared.errors import BrokerUnavailable
from shared.events import EventKind, MailEvent
from shared.logs import configure_logging
from shared.settings import Settings, redact_url, settings_from_mapping
from shared.topology import Topology

TEMPLATES = Path(__file__).parent / "demo_templates"
TERMINAL = {EventKind.SENT, EventKind.DEAD_LETTERED, EventKind.EXPIRED}
_TIMEOUT_SECONDS = 60

_HOW_TO_START = """\
No RabbitMQ answers at {url}.
Start one, then run the demo again:
  * Debian/Ubuntu:  sudo apt-get install rabbitmq-server && sudo rabbitmq-server -detached
  * Docker:         docker run -d --name rabbitmq -p 5672:5672 rabbitmq:3.13
  * elsewhere:      set ROHRPOST_BROKER_URL=amqp://user:password@host:5672/%2F
"""


@dataclass
class _Tracked:
    label: str
    asked: str
    expect: EventKind
    events: list[MailEvent] = field(default_factory=list)

    @property
    def final(self) -> MailEvent | None:
        return next((e for e in self.events if e.kind in TERMINAL), None)


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
            _Tracked("order confirmation", "send now", EventKind.SENT),
        ),
        (
            {
                **base,
                "to": ["bob@customer.example"],
                "data": _order("Bob", 1002),
                "not_before": (now + timedelta(seconds=4)).isoformat(),
            },
            _Tracked("scheduled reminder", "send in 4 s", EventKind.SENT),
        ),
        (
            {**base, "to": ["flaky@customer.example"], "data": _order("Flaky", 1003)},
            _Tracked("server busy once (421)", "send now", EventKind.SENT),
        ),
        (
            {**base, "to": ["nobody@customer.example"], "data": _order("Nobody", 1004)},
            _Tracked("unknown recipient (550)", "send now", EventKind.DEAD_LETTERED),
        ),
    ]


def _settings(broker_url: str, templates: Path, smtp_port: int) -> Settings:
    return settings_from_mapping(
        {
            "broker_url": broker_url,
            "namespace": f"demo-{uuid.uuid4().hex[:8]}",
            "templates_dir": str(templates),
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


def _describe(tracked: _Tracked, started: float) -> str:
    parts = []
    for event in tracked.events:
        at = event.at.timestamp() - started
        if event.kind == EventKind.ATTEMPT_FAILED:
            parts.append(
                f"attempt {event.attempt} failed at +{at:.1f}s ({event.error}), "
                f"retry in {event.retry_in_seconds}s"
            )
        elif event.kind == EventKind.SENT:
            parts.append(f"sent at +{at:.1f}s on attempt {event.attempt} ({event.smtp_reply})")
        elif event.kind == EventKind.DEAD_LETTERED:
            parts.append(f"dead-lettered at +{at:.1f}s: {event.reason} ({event.error})")
        else:
            parts.append(f"{event.kind.value} at +{at:.1f}s")
    return "; ".join(parts) or "no outcome"


def _follow(settings: Settings, queue: str, tracked: dict[str, _Tracked]) -> None:
    deadline = time.monotonic() + _TIMEOUT_SECONDS
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        for method, _props, body in channel.consume(queue, inactivity_timeout=0.5):
            if method is not None:
                event = MailEvent.model_validate_json(body)
                if event.mail_id is not None and str(event.mail_id) in tracked:
                    tracked[str(event.mail_id)].events.append(event)
                channel.basic_ack(method.delivery_tag)
            if all(t.final for t in tracked.values()) or time.monotonic() > deadline:
                break
        channel.cancel()


def run_demo(broker_url: str) -> int:
    """Run the demo; return the process exit code."""
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
        settings = _settings(broker_url, workdir / "templates", catcher.port)
        try:
            return _run(settings, catcher)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(settings: Settings, catcher: MailCatcher) -> int:
    topology = Topology.from_settings(settings)
    observer = f"{settings.namespace}.demo-events"
    url = settings.broker_url.get_secret_value()
    worker = SendWorker(settings)
    thread = threading.Thread(target=worker.run, name="demo-worker")
    try:
        with admin_channel(url) as channel:
            topology.declare(channel)
            channel.queue_declare(observer, durable=True, arguments={"x-queue-type": "quorum"})
            channel.queue_bind(observer, topology.events_exchange, "#")
        click.echo(f"rohrpost demo: namespace {settings.namespace!r} on {redact_url(url)}")
        click.echo(f"  SMTP catcher on 127.0.0.1:{catcher.port}, one send worker\n")
        thread.start()
        started = time.time()
        tracked = {}
        with Producer(settings) as producer:
            for container, info in _mails(datetime.now(UTC)):
                tracked[str(producer.submit(container))] = info
                click.echo(f"  submitted {info.label:<26} ({info.asked})")
        click.echo("\nwaiting for every mail to reach a final state …\n")
        _follow(settings, observer, tracked)
        return _report(tracked, started, catcher)
    finally:
        worker.stop()
        if thread.is_alive():
            thread.join()
        with admin_channel(url) as channel:
            channel.queue_delete(observer)
            topology.delete(channel)


def _report(tracked: dict[str, _Tracked], started: float, catcher: MailCatcher) -> int:
    ok = True
    for mail_id, info in tracked.items():
        final = info.final
        as_expected = final is not None and final.kind == info.expect
        ok = ok and as_expected
        mark = "ok " if as_expected else "!! "
        click.echo(f"{mark} {info.label} [{mail_id}]\n      {_describe(info, started)}")
    click.echo(f"\nthe SMTP catcher received {len(catcher.mails)} mails:")
    for mail in catcher.mails:
        message = mail.parsed()
        click.echo(f"  To: {message['To']}  Subject: {message['Subject']}")
    click.echo("\nall mails ended as expected" if ok else "\nsome mails did not end as expected")
    return 0 if ok else 1
