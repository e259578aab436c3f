"""The history consumer: archives a real run, survives SIGKILL and store outages."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pika
import pytest
from sqlalchemy import create_engine, make_url, text

from rohrpost.catcher import MailCatcher
from rohrpost.consumer.history import HistoryConsumer
from rohrpost.producer.client import Producer
from rohrpost.shared.broker import Broker, Publication, admin_channel
from rohrpost.shared.events import EventKind, MailEvent
from rohrpost.shared.settings import Settings
from rohrpost.shared.store import HistoryRecord, HistoryStore, MailFilter
from rohrpost.shared.topology import Topology
from tests.conftest import (
    declare,
    drain,
    publish_raw,
    rohrpost_command,
    wait_until,
    write_config,
)


def mail(recipient: str = "anna@example.com", **fields: Any) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "app": "billing",
        "to": [recipient],
        "subject": "Hello",
        "text": "x",
        **fields,
    }


@pytest.fixture
def history_settings(make_settings: Callable[..., Settings], store_url: str) -> Settings:
    settings = make_settings(store_url=store_url)
    declare(settings)
    return settings


def archive(settings: Settings) -> HistoryStore:
    """Run the history consumer until the history queue is empty; return the store."""
    store = HistoryStore.open(settings.store_url.get_secret_value(), migrate_schema=True)
    HistoryConsumer(settings, store).run(drain=True)
    return store


class ConsumerThread:
    def __init__(self, settings: Settings) -> None:
        self.consumer = HistoryConsumer(settings)
        self.thread = threading.Thread(target=self.consumer.run)

    def __enter__(self) -> ConsumerThread:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.consumer.stop()
        self.thread.join(30)


def test_a_mixed_run_gives_each_mail_its_ordered_timeline_and_final_status(
    history_settings: Settings, catcher: MailCatcher, tmp_path: Path
) -> None:
    settings = history_settings
    catcher.script("flaky@example.com", ["421 4.3.2 busy"])
    catcher.always("gone@example.com", "550 5.1.1 no such user", stage="rcpt")
    # "late" is refused once; its retry (1 s backoff) comes after it expired.
    catcher.script("late@example.com", ["451 4.3.0 try later"])
    soon = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    with Producer(settings) as producer:
        ids = {
            "sent": producer.submit(mail()),
            "retried": producer.submit(mail("flaky@example.com")),
            "expired": producer.submit(mail("late@example.com", expires_at=soon)),
            "dead": producer.submit(mail("gone@example.com", tags=["x"])),
        }
    drain(settings)
    store = archive(settings)
    kinds = {name: [e.kind for e in store.mail(i).events] for name, i in ids.items()}  # type: ignore[union-attr]
    statuses = {name: store.mail(i).mail.status for name, i in ids.items()}  # type: ignore[union-attr]
    store.close()
    assert kinds["sent"] == ["submitted", "sent"]
    assert kinds["retried"] == ["submitted", "attempt_failed", "sent"]
    assert kinds["dead"] == ["submitted", "dead_lettered"]
    # On a slow machine the first attempt may already come after the expiry.
    assert kinds["expired"] in (
        ["submitted", "attempt_failed", "expired"],
        ["submitted", "expired"],
    )
    assert statuses == {
        "sent": "sent",
        "retried": "sent",
        "expired": "expired",
        "dead": "dead_lettered",
    }
    assert not [m for m in catcher.mails if "late@example.com" in m.recipients]
    # `history show` prints the same timeline
    config = write_config(settings, tmp_path / "rohrpost.toml")
    shown = subprocess.run(
        rohrpost_command(config, "history", "show", str(ids["retried"]), "--json"),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    timeline = json.loads(shown.stdout)
    assert timeline["mail"]["status"] == "sent"
    assert [e["kind"] for e in timeline["events"]] == ["submitted", "attempt_failed", "sent"]
    assert "421 4.3.2 busy" in timeline["events"][1]["error"]


def test_an_expired_mail_ends_as_expired_in_the_history(
    history_settings: Settings, catcher: MailCatcher
) -> None:
    with Producer(history_settings) as producer:
        mail_id = producer.submit(
            mail(expires_at=(datetime.now(UTC) + timedelta(seconds=30)).isoformat())
        )
    drain(history_settings, clock=lambda: time.time() + 60)
    store = archive(history_settings)
    found = store.mail(mail_id)
    store.close()
    assert found is not None and found.mail.status == "expired"
    assert [e.kind for e in found.events] == ["submitted", "expired"]


def test_a_scheduled_mail_shows_as_scheduled_until_it_is_sent(
    history_settings: Settings,
) -> None:
    with Producer(history_settings) as producer:
        mail_id = producer.submit(
            mail(not_before=(datetime.now(UTC) + timedelta(minutes=1)).isoformat())
        )
    store = archive(history_settings)
    found = store.mail(mail_id)
    store.close()
    assert found is not None and found.mail.status == "scheduled"


def test_a_delete_mail_leaves_no_content_after_a_real_send(
    history_settings: Settings, catcher: MailCatcher
) -> None:
    with Producer(history_settings) as producer:
        mail_id = producer.submit(mail(history="delete", tags=["secret"]))
    drain(history_settings)
    store = archive(history_settings)
    found = store.mail(mail_id)
    by_address = store.list_mails(MailFilter(to="anna@example.com"))
    store.close()
    assert len(catcher.mails) == 1
    assert found is not None and found.mail.status == "sent" and found.mail.content_deleted
    assert found.container is None and found.mail.recipients == []
    assert by_address == []


def test_unreadable_history_messages_are_set_aside_not_lost(
    history_settings: Settings,
) -> None:
    topology = Topology.from_settings(history_settings)
    props = pika.BasicProperties(type="rohrpost.event.sent", message_id="bad", delivery_mode=2)
    publish_raw(history_settings, topology.history_queue, b"{not json", properties=props)
    archive(history_settings).close()
    with admin_channel(history_settings.broker_url.get_secret_value()) as channel:
        method, _, body = channel.basic_get(topology.history_rejected_queue, auto_ack=True)
    assert method is not None and body == b"{not json"


def test_events_redelivered_after_sigkill_leave_no_duplicates(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(history_batch_size=50)
    declare(settings)
    config = write_config(settings, tmp_path / "rohrpost.toml")
    with Producer(settings) as producer:
        ids = producer.submit_many([mail(f"r{i}@example.com") for i in range(3000)])
    engine = create_engine(settings.store_url.get_secret_value())

    def archived() -> int:
        try:
            with engine.connect() as conn:
                return int(conn.execute(text("SELECT count(*) FROM events")).scalar_one())
        except Exception:
            return 0  # not migrated yet

    consumer = subprocess.Popen(
        rohrpost_command(config, "history-consumer"), stderr=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: archived() >= 200)
    finally:
        os.kill(consumer.pid, signal.SIGKILL)
        consumer.wait()
    at_kill = archived()
    assert at_kill < 3000, "the kill must land mid-run"
    subprocess.run(
        rohrpost_command(config, "history-consumer", "--drain"),
        check=True,
        capture_output=True,
        timeout=120,
    )
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM events")).scalar_one() == 3000
        assert conn.execute(text("SELECT count(*) FROM mails")).scalar_one() == 3000
        assert (
            conn.execute(text("SELECT count(*) FROM mails WHERE status = 'queued'")).scalar_one()
            == 3000
        )
    engine.dispose()
    assert len(set(ids)) == 3000


@contextlib.contextmanager
def store_outage(url: str) -> Iterator[Callable[[], None]]:
    """Make the store unwritable; the yielded function brings it back."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        # Root ignores file modes, so a read-only file would not stop us; a writer
        # holding the database's exclusive lock does.
        blocker = sqlite3.connect(str(parsed.database), isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        yield lambda: blocker.execute("ROLLBACK")
        blocker.close()
        return
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    name = parsed.database
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false'))
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )

    def restore() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true'))

    try:
        yield restore
    finally:
        restore()
        admin.dispose()


def test_no_event_is_lost_while_the_store_is_unavailable(
    history_settings: Settings, catcher: MailCatcher, caplog: pytest.LogCaptureFixture
) -> None:
    settings = history_settings
    caplog.set_level(logging.WARNING, logger="rohrpost")
    url = settings.store_url.get_secret_value()
    HistoryStore.open(url, migrate_schema=True).close()
    reader = create_engine(url)

    def mails_archived() -> int:
        with reader.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM mails")).scalar_one())

    with ConsumerThread(settings), Producer(settings) as producer:
        producer.submit_many([mail(f"a{i}@example.com") for i in range(20)])
        wait_until(lambda: mails_archived() == 20)
        with store_outage(url) as bring_back:
            producer.submit_many([mail(f"b{i}@example.com") for i in range(30)])
            wait_until(
                lambda: any(
                    r.getMessage().startswith("history store write failed") for r in caplog.records
                )
            )
            bring_back()
            reader.dispose()
            wait_until(lambda: mails_archived() == 50, timeout=60)
    reader.dispose()


def test_ten_thousand_events_take_well_under_a_second_per_thousand(
    history_settings: Settings, record_property: Callable[[str, object], None]
) -> None:
    settings = history_settings
    topology = Topology.from_settings(settings)
    store = HistoryStore.open(settings.store_url.get_secret_value(), migrate_schema=True)
    broker = Broker(settings.broker_url.get_secret_value())
    broker.start()
    try:
        futures = []
        for i in range(5000):
            mail_id = uuid.uuid4()
            container = Publication(
                "",
                topology.history_queue,
                json.dumps({**mail(f"r{i}@example.com"), "id": str(mail_id)}).encode(),
                pika.BasicProperties(message_id=str(mail_id), delivery_mode=2),
            )
            sent = MailEvent(
                kind=EventKind.SENT,
                mail_id=mail_id,
                tenant="acme",
                app="billing",
                attempt=1,
                smtp_reply="250 2.0.0 Ok",
                message_id=f"<{mail_id}@x>",
            )
            event = Publication(
                "",
                topology.history_queue,
                sent.model_dump_json(exclude_none=True).encode(),
                sent.properties(),
            )
            futures += [broker.publish(container), broker.publish(event)]
        for future in futures:
            future.result(timeout=60)
    finally:
        broker.close()
    consumer = HistoryConsumer(settings, store)
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    consumer.run(drain=True)
    cpu = time.process_time() - cpu_before
    wall = time.perf_counter() - wall_before
    backend = make_url(settings.store_url.get_secret_value()).get_backend_name()
    record_property(
        "figure",
        f"history consumer on {backend}: 10,000 events in {wall:.2f}s wall, {cpu:.2f}s CPU "
        f"= {cpu / 10:.3f}s CPU per 1,000 events",
    )
    assert consumer.written == 10_000
    assert len(store.list_mails(MailFilter(status="sent", limit=100_000))) == 5000
    store.close()
    assert cpu / 10 < 1.0, "well under a second per 1,000 events was the promise"


def test_the_consumer_purges_by_each_apps_retention(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(tenants={"acme": {"apps": {"billing": {"retention_days": 7}}}})
    declare(settings)
    store = HistoryStore.open(settings.store_url.get_secret_value(), migrate_schema=True)
    now = datetime.now(UTC)
    ids = {}
    for name, age in (("old", 8), ("young", 6)):
        mail_id = uuid.uuid4()
        ids[name] = mail_id
        store.write(
            [
                HistoryRecord(
                    MailEvent(
                        kind=EventKind.SENT,
                        mail_id=mail_id,
                        tenant="acme",
                        app="billing",
                        at=now - timedelta(days=age),
                    )
                )
            ]
        )
    HistoryConsumer(settings, store).run(drain=True)  # purges once at start
    assert store.mail(ids["old"]) is None
    assert store.mail(ids["young"]) is not None
    store.close()


def test_ingest_goes_on_while_a_purge_batch_takes_long(
    history_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = history_settings
    store = HistoryStore.open(settings.store_url.get_secret_value(), migrate_schema=True)
    purging, release = threading.Event(), threading.Event()
    purge_batch = store.purge_batch

    def slow_purge_batch(*args: Any, **kwargs: Any) -> int:
        purging.set()
        release.wait(60)  # a purge batch that takes a minute
        return purge_batch(*args, **kwargs)

    monkeypatch.setattr(store, "purge_batch", slow_purge_batch)
    consumer = HistoryConsumer(settings, store)
    thread = threading.Thread(target=consumer.run)
    thread.start()
    try:
        assert purging.wait(30), "the consumer purges at start"
        with Producer(settings) as producer:
            producer.submit_many([mail(f"r{i}@example.com") for i in range(50)])
        postgresql = store.engine.dialect.name == "postgresql"
        if postgresql:  # the purge runs beside ingest: the mails are archived meanwhile
            wait_until(lambda: consumer.written >= 50, timeout=30)
            assert not release.is_set()
        else:  # SQLite has one writer: ingest waits for the purge batch
            time.sleep(2)
            assert consumer.written == 0
        release.set()
        wait_until(lambda: consumer.written >= 50, timeout=30)
    finally:
        release.set()
        consumer.stop()
        thread.join(30)
        store.close()


def test_a_purge_that_breaks_is_logged_and_archiving_goes_on(
    history_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = history_settings
    caplog.set_level(logging.WARNING, logger="rohrpost")
    store = HistoryStore.open(settings.store_url.get_secret_value(), migrate_schema=True)
    calls = []

    def broken_purge_batch(*args: Any, **kwargs: Any) -> int:
        calls.append(args)
        raise RuntimeError("a bug in the purge")

    monkeypatch.setattr(store, "purge_batch", broken_purge_batch)
    with Producer(settings) as producer:
        producer.submit_many([mail(f"r{i}@example.com") for i in range(20)])
    consumer = HistoryConsumer(settings, store)
    consumer.run(drain=True)
    store.close()
    assert consumer.written == 20
    assert len(calls) == 1, "tried again only at the next purge interval"
    assert any("history purge failed" in r.getMessage() for r in caplog.records)


def test_run_drain_sends_and_archives_everything_with_two_worker_processes(
    history_settings: Settings, catcher: MailCatcher, tmp_path: Path
) -> None:
    config = write_config(history_settings, tmp_path / "rohrpost.toml")
    with Producer(history_settings) as producer:
        ids = producer.submit_many([mail(f"r{i}@example.com") for i in range(60)])
    result = subprocess.run(
        rohrpost_command(config, "run", "--processes", "2", "--drain"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(catcher.mails) == 60
    listed = subprocess.run(
        rohrpost_command(
            config, "history", "list", "--status", "sent", "--limit", "1000", "--json"
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert {uuid.UUID(m["id"]) for m in json.loads(listed.stdout)} == set(ids)
