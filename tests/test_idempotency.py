"""The mail id is an idempotency key: submitted once, sent at most once per round."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pytest

from rohrpost.catcher import MailCatcher
from rohrpost.producer.client import Producer, SubmitManyError
from rohrpost.shared.errors import BrokerError, DuplicateMail
from rohrpost.shared.events import EventKind, MailEvent
from rohrpost.shared.idempotency import FINGERPRINT_CHARS, fingerprint
from rohrpost.shared.settings import Settings
from rohrpost.shared.topology import Topology
from rohrpost.shared.wire import mail_properties
from tests.conftest import (
    EventLog,
    WorkerThread,
    declare,
    publish_raw,
    rohrpost_command,
    wait_until,
    write_config,
)


def mail(mail_id: uuid.UUID, to: str = "anna@example.com", **fields: Any) -> dict[str, Any]:
    return {
        "id": str(mail_id),
        "tenant": "acme",
        "app": "billing",
        "to": [to],
        "subject": "s",
        "text": "t",
        **fields,
    }


def queued_ids(settings: Settings) -> list[str]:
    """Message ids in acme/billing's send queue (taken out)."""
    queue = Topology.from_settings(settings).send_queue("acme", "billing")
    with pika.BlockingConnection(pika.URLParameters(settings.broker_url.get_secret_value())) as c:
        channel = c.channel()
        ids = []
        while (got := channel.basic_get(queue, auto_ack=True))[0] is not None:
            ids.append(got[1].message_id)
        return ids


def message_ids(catcher: MailCatcher) -> Counter[str]:
    return Counter(str(m.parsed()["Message-ID"]).split("@")[0].lstrip("<") for m in catcher.mails)


def _earlier_fingerprint(body: bytes) -> str:
    """How earlier versions fingerprinted a body (their records live for months in Redis)."""
    stripped = re.sub(rb'"created_at":"[^"]*",?', b"", body)
    return hashlib.blake2b(stripped, digest_size=FINGERPRINT_CHARS // 2).hexdigest()


@pytest.mark.parametrize(
    "body",
    [
        b'{"id":"1","created_at":"2026-11-28T08:00:00Z","resend_of":"2"}',
        b'{"id":"1","created_at":"2026-11-28T08:00:00Z"}',
        b'{"data":{"created_at":"x","b":1},"created_at":"y","z":0}',  # also inside data
        b'{"created_at":"a\\"b","c":1}',  # an escaped quote ends the value early, as before
        b'{"created_at":"unterminated',
        b'{"created_at":"","created_at":""}',
        b'{"text":"no such field"}',
        b"",
    ],
)
def test_fingerprints_match_those_earlier_versions_recorded(body: bytes) -> None:
    assert fingerprint(body) == _earlier_fingerprint(body)


def test_a_fingerprint_ignores_when_the_mail_was_created_only() -> None:
    first = b'{"id":"1","created_at":"2026-11-28T08:00:00Z","subject":"a"}'
    again = b'{"id":"1","created_at":"2026-11-29T09:30:00Z","subject":"a"}'
    other = b'{"id":"1","created_at":"2026-11-28T08:00:00Z","subject":"b"}'
    assert fingerprint(first) == fingerprint(again) != fingerprint(other)


def test_a_second_submit_of_an_id_is_a_duplicate_and_publishes_nothing(settings: Settings) -> None:
    mail_id = uuid.uuid4()
    with Producer(settings) as producer:
        assert producer.submit(mail(mail_id)) == mail_id
        with pytest.raises(DuplicateMail, match="same content") as same:
            producer.submit(mail(mail_id))
        with pytest.raises(DuplicateMail, match="different mail") as different:
            producer.submit(mail(mail_id, to="bert@example.com"))
    assert (same.value.same_content, different.value.same_content) == (True, False)
    assert same.value.mail_id == different.value.mail_id == mail_id
    assert queued_ids(settings) == [str(mail_id)]


def test_another_producer_process_sees_the_id_too(settings: Settings, tmp_path: Path) -> None:
    mail_id = uuid.uuid4()
    with Producer(settings) as producer:
        producer.submit(mail(mail_id))
    config = write_config(settings, tmp_path / "rohrpost.toml")
    (tmp_path / "mails.jsonl").write_text(json.dumps(mail(mail_id)) + "\n")
    again = subprocess.run(
        rohrpost_command(config, "submit", "--file", str(tmp_path / "mails.jsonl")),
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "submitted before with the same content" in again.stderr
    (tmp_path / "other.jsonl").write_text(json.dumps(mail(mail_id, subject="other")) + "\n")
    other = subprocess.run(
        rohrpost_command(config, "submit", "--file", str(tmp_path / "other.jsonl")),
        capture_output=True,
        text=True,
        check=False,
    )
    assert other.returncode == 1
    assert "submitted before for a different mail" in other.stderr
    assert queued_ids(settings) == [str(mail_id)]


def test_submit_many_skips_repeated_mails_when_asked_and_stops_at_a_different_one(
    settings: Settings,
) -> None:
    first = [uuid.uuid4() for _ in range(5)]
    new = [uuid.uuid4() for _ in range(3)]
    skipped: list[tuple[int, uuid.UUID]] = []
    with Producer(settings) as producer:
        producer.submit_many([mail(i) for i in first])
        again = producer.submit_many(
            [mail(i) for i in first[:2] + new], on_duplicate=lambda *d: skipped.append(d)
        )
        assert again == new
        assert [mail_id for _, mail_id in skipped] == first[:2]
        with pytest.raises(SubmitManyError, match="submitted before"):
            producer.submit_many([mail(first[0])])
        fresh = uuid.uuid4()
        with pytest.raises(SubmitManyError, match="different mail") as stopped:
            producer.submit_many([mail(fresh), mail(first[1], subject="changed")])
        assert stopped.value.submitted == []
        # the refused run published nothing, so its fresh id is free again
        assert producer.submit(mail(fresh)) == fresh
    assert sorted(queued_ids(settings)) == sorted(str(i) for i in first + new + [fresh])


def test_an_id_whose_publish_was_not_confirmed_may_be_submitted_again(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()  # topology not declared: the publish fails
    mail_id = uuid.uuid4()
    with Producer(settings) as producer:
        with pytest.raises(BrokerError):  # the exchange does not exist yet
            producer.submit(mail(mail_id))
        declare(settings)
        assert producer.submit(mail(mail_id)) == mail_id
    assert queued_ids(settings) == [str(mail_id)]


def test_without_redis_mails_are_submitted_and_sent_unchecked(
    make_settings: Callable[..., Settings], catcher: MailCatcher
) -> None:
    settings = make_settings(redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    declare(settings)
    mail_id = uuid.uuid4()
    with Producer(settings) as producer:
        producer.submit(mail(mail_id))
        producer.submit(mail(mail_id))  # not checked: accepted twice
    worker = WorkerThread(settings).start()
    try:
        catcher.wait_for(lambda got: len(got) == 2)
    finally:
        worker.stop()


def _publish_twice(settings: Settings, ids: list[uuid.UUID]) -> None:
    """Each mail published twice onto its send queue, as two copies of one delivery."""
    queue = Topology.from_settings(settings).send_queue("acme", "billing")
    for mail_id in ids:
        body = json.dumps(mail(mail_id, to=f"{mail_id.hex[:8]}@example.com")).encode()
        for _ in range(2):
            publish_raw(settings, queue, body, properties=mail_properties(str(mail_id)))


def test_two_copies_consumed_by_two_workers_at_the_same_moment_are_sent_once(
    settings: Settings, catcher: MailCatcher, event_log: EventLog
) -> None:
    catcher.latency = 0.05  # both copies are in flight at once
    ids = [uuid.uuid4() for _ in range(40)]
    _publish_twice(settings, ids)
    workers = [WorkerThread(settings).start() for _ in range(2)]
    try:

        def all_decided() -> list[MailEvent]:
            found = event_log.read()
            return found if sum(e.kind == EventKind.DUPLICATE for e in found) == 40 else []

        events = wait_until(all_decided, timeout=90)
    finally:
        for worker in workers:
            worker.stop()
    assert message_ids(catcher) == Counter({str(i): 1 for i in ids})
    sent = Counter(str(e.mail_id) for e in events if e.kind == EventKind.SENT)
    assert sent == Counter({str(i): 1 for i in ids})


def test_worker_processes_send_each_copied_mail_once(
    settings: Settings, catcher: MailCatcher, tmp_path: Path
) -> None:
    ids = [uuid.uuid4() for _ in range(100)]
    _publish_twice(settings, ids)
    config = write_config(settings, tmp_path / "rohrpost.toml")
    result = subprocess.run(
        rohrpost_command(config, "worker", "--processes", "2", "--drain"),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert message_ids(catcher) == Counter({str(i): 1 for i in ids})
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert sum(line.get("outcome") == "duplicate" for line in lines) == 100
