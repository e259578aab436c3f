"""Operators: dead letters edited and retried, bulk retries, cancel, pause/resume, resend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rohrpost.catcher import MailCatcher
from rohrpost.consumer.history import HistoryConsumer
from rohrpost.operations import OperatorSession
from rohrpost.operations.actions import pause, resume
from rohrpost.producer.client import Producer
from rohrpost.shared.broker import Broker, Publication, admin_channel
from rohrpost.shared.container import encode_container, parse_container
from rohrpost.shared.settings import Settings
from rohrpost.shared.store import HistoryStore
from rohrpost.shared.topology import Topology, queue_depths
from rohrpost.shared.wire import ATTEMPTS_HEADER, REASON_HEADER, mail_properties
from tests.conftest import (
    EventLog,
    WorkerThread,
    declare,
    drain,
    rohrpost_command,
    wait_until,
    write_config,
)

GLOBEX = {"globex": {"apps": {"shop": {"smtp": "catcher", "sender": "shop@globex.example"}}}}


def mail(recipient: str = "anna@example.com", **fields: Any) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "app": "billing",
        "to": [recipient],
        "subject": "Invoice",
        "text": "x",
        **fields,
    }


@pytest.fixture
def two_tenants(make_settings: Callable[..., Settings]) -> Settings:
    settings = make_settings(tenants=GLOBEX)
    declare(settings)
    return settings


@pytest.fixture
def config(two_tenants: Settings, tmp_path: Path) -> Path:
    return write_config(two_tenants, tmp_path / "rohrpost.toml")


def cli(config: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        rohrpost_command(config, *argv), capture_output=True, text=True, timeout=120, check=False
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def archive(settings: Settings) -> HistoryStore:
    store = HistoryStore.open(settings.store_url.get_secret_value(), migrate_schema=True)
    HistoryConsumer(settings, store).run(drain=True)
    return store


def queue_ids(settings: Settings, queue: str) -> list[str]:
    """Message ids in ``queue``, read and put back."""
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        ids = []
        while (got := channel.basic_get(queue, auto_ack=False))[0] is not None:
            ids.append(got[1].message_id)
        return ids


def fill_dead_letters(settings: Settings, tenant: str, app: str, count: int) -> list[str]:
    """Put ``count`` dead letters straight into tenant/app's dead-letter queue."""
    topology = Topology.from_settings(settings)
    broker = Broker(settings.broker_url.get_secret_value())
    broker.start()
    ids, futures = [], []
    try:
        for i in range(count):
            container = parse_container({**mail(f"r{i}@example.com"), "tenant": tenant, "app": app})
            props = mail_properties(
                str(container.id),
                headers={
                    REASON_HEADER: "max_attempts",
                    ATTEMPTS_HEADER: 3,
                    "x-rohrpost-error": "421 busy",
                },
            )
            futures.append(
                broker.publish(
                    Publication(
                        topology.dead_exchange,
                        f"{tenant}.{app}",
                        encode_container(container),
                        props,
                    )
                )
            )
            ids.append(str(container.id))
        for future in futures:
            future.result(timeout=60)
    finally:
        broker.close()
    return ids


def test_a_bad_recipient_is_edited_retried_and_sent_with_the_whole_story_in_history(
    two_tenants: Settings, config: Path, catcher: MailCatcher
) -> None:
    settings = two_tenants
    catcher.always("anna@exmaple.com", "550 5.1.2 bad destination domain", stage="rcpt")
    with Producer(settings) as producer:
        mail_id = str(producer.submit(mail("Anna <anna@exmaple.com>")))
    drain(settings)

    listed = json.loads(cli(config, "dlq", "list", "--tenant", "acme", "--json").stdout)
    assert [(d["id"], d["reason"]) for d in listed] == [(mail_id, "rejected")]
    assert "550 5.1.2" in listed[0]["error"]
    assert json.loads(cli(config, "dlq", "list", "--json").stdout) == listed, "list removes nothing"

    refused = cli(config, "dlq", "edit", mail_id, "--set", "to=not-an-address", check=False)
    assert refused.returncode == 1 and "to.0:" in refused.stderr
    shown = json.loads(cli(config, "dlq", "show", mail_id, "--json").stdout)
    assert shown["container"]["to"] == ["Anna <anna@exmaple.com>"], "a refused edit moves nothing"

    edited = cli(
        config,
        "dlq",
        "edit",
        mail_id,
        "--set",
        "to=Anna <anna@example.com>",
        "--set",
        "subject=Invoice (corrected)",
        "--actor",
        "carol",
    )
    assert 'to: ["Anna <anna@exmaple.com>"] -> ["Anna <anna@example.com>"]' in edited.stdout
    cli(config, "dlq", "retry", mail_id, "--actor", "carol")
    assert queue_ids(settings, Topology.from_settings(settings).dead_queue("acme", "billing")) == []
    drain(settings)
    [sent] = catcher.mails
    assert sent.recipients == ("anna@example.com",)
    assert sent.parsed()["Subject"] == "Invoice (corrected)"

    store = archive(settings)
    found = store.mail(uuid.UUID(mail_id))
    store.close()
    assert found is not None and found.mail.status == "sent"
    assert [e.kind for e in found.events] == [
        "submitted",
        "dead_lettered",
        "edited",
        "resubmitted",
        "sent",
    ]
    edit, retry = found.events[2], found.events[3]
    assert edit.actor == "carol" and retry.actor == "carol"
    assert edit.detail == {
        "changes": {
            "subject": ["Invoice", "Invoice (corrected)"],
            "to": [["Anna <anna@exmaple.com>"], ["Anna <anna@example.com>"]],
        }
    }
    assert found.container is not None and found.container["to"] == ["Anna <anna@example.com>"]
    # The new round's outcome replaces the last one's; the timeline keeps both.
    assert (found.mail.reason, found.mail.last_error) == (None, None)
    assert found.mail.subject == "Invoice (corrected)"
    summary, timeline = cli(config, "history", "show", mail_id).stdout.split("timeline (UTC)")
    assert "status      sent\n" in summary and "rejected" not in summary
    assert "subject     Invoice (corrected)\n" in summary
    assert "rejected; RCPT TO: 550 5.1.2 bad destination domain" in timeline


def test_retry_all_for_a_tenant_moves_exactly_its_dead_letters(
    two_tenants: Settings, config: Path
) -> None:
    settings = two_tenants
    topology = Topology.from_settings(settings)
    acme = fill_dead_letters(settings, "acme", "billing", 1000)
    globex = fill_dead_letters(settings, "globex", "shop", 50)
    dry = cli(config, "dlq", "retry", "--all", "--tenant", "acme", "--dry-run")
    assert dry.stdout.count("would re-submit") == 1000
    result = cli(config, "dlq", "retry", "--all", "--tenant", "acme")
    assert "re-submitted 1000, skipped 0" in result.stderr
    assert sorted(queue_ids(settings, topology.send_queue("acme", "billing"))) == sorted(acme)
    assert queue_ids(settings, topology.dead_queue("acme", "billing")) == []
    assert sorted(queue_ids(settings, topology.dead_queue("globex", "shop"))) == sorted(globex)
    assert queue_ids(settings, topology.send_queue("globex", "shop")) == []


def test_a_retry_killed_halfway_loses_no_dead_letter(two_tenants: Settings, config: Path) -> None:
    settings = two_tenants
    topology = Topology.from_settings(settings)
    ids = fill_dead_letters(settings, "acme", "billing", 2000)
    retry = subprocess.Popen(
        rohrpost_command(config, "dlq", "retry", "--all", "--tenant", "acme", "--window", "10"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    send_queue = topology.send_queue("acme", "billing")
    try:
        with admin_channel(settings.broker_url.get_secret_value()) as channel:
            while not queue_depths(channel, [send_queue])[send_queue]:
                assert retry.poll() is None, "the retry finished before it could be killed"
                time.sleep(0.005)
    finally:
        os.kill(retry.pid, signal.SIGKILL)
        retry.wait()
    moved = queue_ids(settings, send_queue)
    still_dead = queue_ids(settings, topology.dead_queue("acme", "billing"))
    assert 0 < len(moved) < 2000, "killed halfway"
    assert set(moved) | set(still_dead) == set(ids), "every dead letter is somewhere"


def test_purge_removes_dead_letters_and_records_who(two_tenants: Settings, config: Path) -> None:
    settings = two_tenants
    topology = Topology.from_settings(settings)
    ids = fill_dead_letters(settings, "acme", "billing", 3)
    assert cli(config, "dlq", "purge", "--tenant", "acme", check=False).returncode == 2
    result = cli(config, "dlq", "purge", "--tenant", "acme", "--actor", "dave", "--yes")
    assert "purged 3 dead letters" in result.stdout
    assert queue_ids(settings, topology.dead_queue("acme", "billing")) == []
    store = archive(settings)
    found = store.mail(uuid.UUID(ids[0]))
    store.close()
    assert found is not None
    assert [(e.kind, e.actor) for e in found.events] == [("purged", "dave")]


def test_a_mail_scheduled_a_minute_ahead_and_cancelled_is_never_sent(
    two_tenants: Settings,
    config: Path,
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
) -> None:
    settings = two_tenants
    due = datetime.now(UTC) + timedelta(minutes=1)
    with Producer(settings) as producer:
        cancelled = str(producer.submit(mail("gone@example.com", not_before=due.isoformat())))
        sentinel = producer.submit(
            mail("sentinel@example.com", not_before=(due + timedelta(seconds=1)).isoformat())
        )
    archive(settings).close()  # the history knows the mail as scheduled
    first = cli(config, "cancel", cancelled, cancelled, "--actor", "erin")
    assert first.stdout.count(f"cancelled {cancelled} (acme/billing, was scheduled)") == 2
    archive(settings).close()
    again = cli(config, "cancel", cancelled)
    assert f"mail {cancelled} was already cancelled" in again.stdout
    # A worker started after the cancellation learns it from the control stream.
    worker_thread(settings)
    catcher.wait_for(lambda mails: len(mails) == 1, timeout=120)  # the sentinel, due 1 s later
    assert [m.recipients for m in catcher.mails] == [("sentinel@example.com",)]
    store = archive(settings)
    found = store.mail(uuid.UUID(cancelled))
    store.close()
    assert found is not None and found.mail.status == "cancelled"
    assert [(e.kind, e.actor) for e in found.events][-1] == ("cancelled", "erin")
    assert str(sentinel)


def test_cancel_reaches_a_running_worker_and_refuses_a_sent_mail(
    two_tenants: Settings,
    config: Path,
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
) -> None:
    settings = two_tenants
    # acme/billing stays paused until after the cancel: the resume follows the cancel on
    # the control stream, so the running worker knows of the cancel before it takes any
    # acme mail, however long the CLI process takes. Without the pause, a mail due 8 s
    # ahead came due before a CLI on a busy machine had even published the cancel (it
    # took 8-25 s there), and was rightly sent.
    with OperatorSession(settings, "test") as operator:
        pause(operator, "acme", "billing")
    worker_thread(settings)  # starts paused: it replays the pause
    events = EventLog(settings)
    try:
        with Producer(settings) as producer:
            sent = str(
                producer.submit({**mail("globex@example.com"), "tenant": "globex", "app": "shop"})
            )
            catcher.wait_for(lambda mails: len(mails) == 1)  # the worker runs
            soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
            doomed = str(producer.submit(mail("doomed@example.com", not_before=soon)))
            cli(config, "cancel", doomed)
            producer.submit(mail("after@example.com", not_before=soon))
        with OperatorSession(settings, "test") as operator:
            resume(operator, "acme", "billing")
        catcher.wait_for(lambda mails: len(mails) >= 2)

        def outcomes() -> list[str]:
            return [e.kind for e in events.read() if str(e.mail_id) == doomed]

        assert wait_until(outcomes) == ["cancelled"]  # dropped by the worker, not sent
    finally:
        events.delete()
    assert "doomed@example.com" not in [r for m in catcher.mails for r in m.recipients]
    archive(settings).close()
    refused = cli(config, "cancel", sent, check=False)
    assert refused.returncode == 1 and "already sent" in refused.stderr


def test_a_paused_tenant_is_held_and_everything_is_sent_after_resume(
    two_tenants: Settings,
    config: Path,
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
) -> None:
    settings = two_tenants
    assert "paused tenant acme" in cli(config, "pause", "acme", "--actor", "frank").stdout
    worker_thread(settings)  # starts paused: it replays the pause
    with Producer(settings) as producer:
        held = {str(producer.submit(mail(f"held{i}@example.com"))) for i in range(10)}
        # globex is not paused: its mail, submitted after acme's, goes out first
        producer.submit({**mail("globex@example.com"), "tenant": "globex", "app": "shop"})
    catcher.wait_for(lambda mails: len(mails) == 1)
    assert catcher.mails[0].recipients == ("globex@example.com",)
    send_queue = Topology.from_settings(settings).send_queue("acme", "billing")
    assert sorted(queue_ids(settings, send_queue)) == sorted(held), "queued, not sent"

    assert "resumed tenant acme" in cli(config, "resume", "acme", "--actor", "frank").stdout
    catcher.wait_for(lambda mails: len(mails) == 11)
    store = archive(settings)
    actions = [(a.kind, a.tenant, a.actor) for a in reversed(store.actions("acme"))]
    store.close()
    assert actions == [("paused", "acme", "frank"), ("resumed", "acme", "frank")]


def test_pausing_one_app_and_an_unknown_tenant(
    two_tenants: Settings,
    config: Path,
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
) -> None:
    settings = two_tenants
    unknown = cli(config, "pause", "initech", check=False)
    assert unknown.returncode == 1 and "tenant 'initech' is not configured" in unknown.stderr
    handle = worker_thread(settings)  # running: the pause reaches it live
    cli(config, "pause", "acme/billing")
    with Producer(settings) as producer:
        producer.submit(mail("held@example.com"))
        producer.submit({**mail("globex@example.com"), "tenant": "globex", "app": "shop"})
    catcher.wait_for(lambda mails: len(mails) == 1)
    assert catcher.mails[0].recipients == ("globex@example.com",)
    cli(config, "resume", "acme/billing")
    catcher.wait_for(lambda mails: len(mails) == 2)
    handle.stop()


def test_resend_from_history_links_both_timelines(
    two_tenants: Settings, config: Path, catcher: MailCatcher
) -> None:
    settings = two_tenants
    with Producer(settings) as producer:
        original = str(producer.submit(mail(subject="Receipt")))
    drain(settings)
    archive(settings).close()
    new_id = cli(config, "history", "resend", original, "--actor", "grace").stdout.strip()
    drain(settings)
    assert [m.parsed()["Subject"] for m in catcher.mails] == ["Receipt", "Receipt"]
    store = archive(settings)
    first, second = store.mail(uuid.UUID(original)), store.mail(uuid.UUID(new_id))
    store.close()
    assert first is not None and second is not None
    assert [e.kind for e in first.events] == ["submitted", "sent", "resent"]
    assert first.events[-1].detail == {"new_mail_id": new_id}
    assert first.events[-1].actor == "grace"
    assert second.mail.resend_of == uuid.UUID(original)
    assert [(e.kind, e.actor) for e in second.events] == [("submitted", "grace"), ("sent", None)]
    shown = cli(config, "history", "show", new_id).stdout
    assert f"resend of   {original}" in shown


def test_a_delete_mail_cannot_be_resent(
    two_tenants: Settings, config: Path, catcher: MailCatcher
) -> None:
    with Producer(two_tenants) as producer:
        original = str(producer.submit(mail(history="delete")))
    drain(two_tenants)
    archive(two_tenants).close()
    refused = cli(config, "history", "resend", original, check=False)
    assert refused.returncode == 1 and "deleted after sending" in refused.stderr
