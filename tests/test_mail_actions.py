"""Per-mail actions as an operator types them: send-now, hold, release, cancel, id prefixes."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rohrpost.catcher import MailCatcher
from rohrpost.producer.client import Producer
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.container import encode_container, parse_container
from rohrpost.shared.settings import Settings
from rohrpost.shared.topology import Topology, queue_depths
from rohrpost.shared.wire import REASON_HEADER, mail_properties
from tests.conftest import (
    EventLog,
    WorkerThread,
    declare,
    drain,
    publish_raw,
    wait_until,
    write_config,
)
from tests.test_operators import archive, cli, mail


@pytest.fixture
def config(settings: Settings, tmp_path: Path) -> Path:
    return write_config(settings, tmp_path / "rohrpost.toml")


def held_depth(settings: Settings) -> int:
    queue = Topology.from_settings(settings).held_queue("acme", "billing")
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        return queue_depths(channel, [queue])[queue]


def timeline(settings: Settings, mail_id: str) -> list[tuple[str, str | None, str | None]]:
    store = archive(settings)
    found = store.mail(uuid.UUID(mail_id))
    store.close()
    assert found is not None
    return [(e.kind, e.actor, e.reason) for e in found.events]


def test_send_now_sends_a_scheduled_mail_at_once_and_drops_the_waiting_copy(
    make_settings: Callable[..., Settings],
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
    tmp_path: Path,
) -> None:
    # Without shared state no send claim could drop the second copy: the control stream must.
    settings = make_settings(redis_url="")
    declare(settings)
    config = write_config(settings, tmp_path / "rohrpost.toml")
    events = EventLog(settings)
    try:
        worker_thread(settings)
        # due well after the send-now command surely ran: a CLI process took up to 25 s
        # to start and publish on a machine loaded by other suites
        due = datetime.now(UTC) + timedelta(seconds=40)
        with Producer(settings) as producer:
            mail_id = str(producer.submit(mail("soon@example.com", not_before=due.isoformat())))
        archive(settings).close()  # the history knows it as scheduled
        result = cli(config, "send-now", mail_id[:8], "--actor", "olga")
        assert result.stdout.strip() == f"sending {mail_id} now (acme/billing, was scheduled)"
        catcher.wait_for(lambda mails: len(mails) == 1)
        assert datetime.now(UTC) < due, "sent now, not when it was due"

        def dropped() -> bool:
            return any(e.kind == "duplicate" and str(e.mail_id) == mail_id for e in events.read())

        wait_until(dropped, timeout=90)  # the copy that waited in the delay levels
    finally:
        events.delete()
    assert len(catcher.mails) == 1
    assert timeline(settings, mail_id) == [
        ("submitted", None, None),
        ("scheduled", None, None),
        ("send_now", "olga", None),
        ("sent", None, None),
        ("duplicate", None, "superseded"),
    ]


def test_send_now_of_a_retrying_mail_counts_on_from_its_next_attempt(
    make_settings: Callable[..., Settings],
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
    tmp_path: Path,
) -> None:
    backoff = {"base": "1h", "factor": 1, "jitter": 0}
    settings = make_settings(tenants={"acme": {"apps": {"billing": {"backoff": backoff}}}})
    declare(settings)
    config = write_config(settings, tmp_path / "rohrpost.toml")
    catcher.script("busy@example.com", ["421 4.3.2 busy"])
    worker_thread(settings)
    with Producer(settings) as producer:
        mail_id = str(producer.submit(mail("busy@example.com")))
    wait_until(lambda: ("attempt_failed", None, None) in timeline(settings, mail_id))
    result = cli(config, "send-now", mail_id)
    assert "was retrying" in result.stdout
    catcher.wait_for(lambda mails: len(mails) == 1)
    store = archive(settings)
    found = store.mail(uuid.UUID(mail_id))
    store.close()
    assert found is not None and found.mail.status == "sent"
    assert found.mail.attempts == 2, "the next attempt, not a fresh first one"


def test_a_held_mail_is_set_aside_when_due_and_sent_after_release(
    settings: Settings,
    config: Path,
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
) -> None:
    with Producer(settings) as producer:
        mail_id = str(producer.submit(mail("held@example.com")))
        producer.submit(mail("sentinel@example.com"))
    archive(settings).close()
    held = cli(config, "hold", mail_id[:6], "--actor", "hanna")
    assert held.stdout.startswith(f"held {mail_id} (acme/billing, queued)")
    archive(settings).close()
    assert cli(config, "hold", mail_id).stdout == f"mail {mail_id} is already held\n"
    worker_thread(settings)  # learns the hold from the control stream, then consumes
    catcher.wait_for(lambda mails: len(mails) == 1)
    wait_until(lambda: held_depth(settings) == 1)
    assert [m.recipients for m in catcher.mails] == [("sentinel@example.com",)]
    assert "status      queued, held" in cli(config, "history", "show", mail_id).stdout

    released = cli(config, "release", mail_id[:6], "--actor", "hanna")
    assert released.stdout == f"released {mail_id} (acme/billing): moved back into its send queue\n"
    catcher.wait_for(lambda mails: len(mails) == 2)
    assert held_depth(settings) == 0
    kinds = timeline(settings, mail_id)
    assert kinds[1:] == [("held", "hanna", None), ("released", "hanna", None), ("sent", None, None)]


def test_a_mail_held_while_a_worker_runs_is_set_aside_when_it_comes_due(
    settings: Settings,
    config: Path,
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
) -> None:
    worker_thread(settings)
    due = datetime.now(UTC) + timedelta(seconds=20)
    with Producer(settings) as producer:
        mail_id = str(producer.submit(mail("later@example.com", not_before=due.isoformat())))
    archive(settings).close()
    cli(config, "hold", mail_id)
    wait_until(lambda: held_depth(settings) == 1, timeout=60)
    assert catcher.mails == []


def test_a_mail_released_before_it_was_due_is_sent_when_due(
    settings: Settings,
    config: Path,
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
) -> None:
    due = datetime.now(UTC) + timedelta(seconds=3)
    with Producer(settings) as producer:
        mail_id = str(producer.submit(mail("early@example.com", not_before=due.isoformat())))
    archive(settings).close()
    cli(config, "hold", mail_id)
    archive(settings).close()
    released = cli(config, "release", mail_id)
    assert "not set aside yet; sent when due" in released.stdout
    worker_thread(settings)  # started later: it replays both from the control stream
    catcher.wait_for(lambda mails: len(mails) == 1)
    assert held_depth(settings) == 0


def test_cancelling_a_held_mail_takes_it_out_of_the_held_queue(
    settings: Settings,
    config: Path,
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
) -> None:
    with Producer(settings) as producer:
        mail_id = str(producer.submit(mail("never@example.com")))
    archive(settings).close()
    cli(config, "hold", mail_id)
    worker_thread(settings)
    wait_until(lambda: held_depth(settings) == 1)
    archive(settings).close()
    assert cli(config, "cancel", mail_id).stdout == (
        f"cancelled {mail_id} (acme/billing, was queued)\n"
    )
    assert held_depth(settings) == 0
    store = archive(settings)
    found = store.mail(uuid.UUID(mail_id))
    store.close()
    assert found is not None and found.mail.status == "cancelled"
    assert catcher.mails == []


def test_actions_on_a_sent_mail_are_refused_saying_why(
    settings: Settings, config: Path, catcher: MailCatcher
) -> None:
    with Producer(settings) as producer:
        mail_id = str(producer.submit(mail()))
    drain(settings)
    archive(settings).close()
    for command, says in (
        ("send-now", "is already sent; nothing left to send"),
        ("hold", "is already sent; nothing left to hold"),
        ("release", "is not held (status sent)"),
        ("cancel", "is already sent"),
    ):
        result = cli(config, command, mail_id, check=False)
        assert result.returncode == 1, command
        assert result.stderr == f"error: mail {mail_id} {says}\n"


def test_send_now_of_a_queued_mail_says_it_is_already_due(settings: Settings, config: Path) -> None:
    with Producer(settings) as producer:
        mail_id = str(producer.submit(mail()))
    archive(settings).close()
    result = cli(config, "send-now", mail_id)
    assert "is already due (queued)" in result.stdout


def test_send_now_of_a_held_mail_asks_for_a_release_first(settings: Settings, config: Path) -> None:
    later = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    with Producer(settings) as producer:
        mail_id = str(producer.submit(mail(not_before=later)))
    archive(settings).close()
    cli(config, "hold", mail_id)
    archive(settings).close()
    refused = cli(config, "send-now", mail_id, check=False)
    assert refused.returncode == 1
    assert f"release it first: rohrpost release {mail_id}" in refused.stderr


# -- ids ---------------------------------------------------------------------------------

SHARED = "6c0f5d1e-0000-4000-8000-"


def submit_with_ids(settings: Settings, *ids: str) -> None:
    with Producer(settings) as producer:
        for mail_id in ids:
            producer.submit(mail(id=mail_id))


@pytest.mark.parametrize(
    "typed",
    [
        SHARED + "00000000000a",  # the whole id
        "6c0f5d1e00004000800000000000000a",  # without dashes
        "6C0F5D1E-0000-4000-8000-00000000000",  # a prefix, in capitals
        SHARED + "00000000000…",  # shortened as listings shorten ids
        SHARED + "0000000000...",
    ],
)
def test_a_unique_prefix_names_the_mail_in_history_commands(
    settings: Settings, config: Path, typed: str
) -> None:
    submit_with_ids(settings, SHARED + "00000000000a", SHARED + "10000000000b")
    archive(settings).close()
    shown = cli(config, "history", "show", typed)
    assert f"mail        {SHARED}00000000000a" in shown.stdout


def test_an_ambiguous_prefix_lists_the_candidates(settings: Settings, config: Path) -> None:
    submit_with_ids(settings, SHARED + "00000000000a", SHARED + "10000000000b")
    archive(settings).close()
    for argv in (["history", "show"], ["cancel"], ["send-now"]):
        result = cli(config, *argv, "6c0f5d", check=False)
        assert result.returncode == 1, argv
        assert result.stderr == (
            f"error: id prefix 6c0f5d fits several mails: {SHARED}00000000000a, "
            f"{SHARED}10000000000b; give more digits\n"
        )


@pytest.mark.parametrize(
    ("argv", "typed", "says"),
    [
        (["history", "show"], "6c0", "'6c0' is too short: give at least 4 hex digits of the id"),
        (["cancel"], "6c0g", "'6c0g' is not a mail id: give the id (a UUID) or its first 4"),
        (["dlq", "show"], "", "'' is not a mail id"),
        (["release"], "6c0f5d1e-0000-4000-8000-00000000000a0", "is not a mail id"),
    ],
)
def test_what_is_no_id_at_all_is_a_usage_error(
    config: Path, argv: list[str], typed: str, says: str
) -> None:
    result = cli(config, *argv, typed, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("error: invalid value for 'MAIL_ID")
    assert says in result.stderr


def test_a_prefix_nobody_has_says_where_to_look(settings: Settings, config: Path) -> None:
    archive(settings).close()
    result = cli(config, "cancel", "abcd", check=False)
    assert result.returncode == 1
    assert result.stderr == (
        "error: the history knows no mail whose id starts with abcd (mistyped, or too new "
        "to be archived yet?); check with `rohrpost history list`\n"
    )


def test_cancel_of_an_id_the_history_does_not_know_says_so_and_how_to_check(
    settings: Settings, config: Path
) -> None:
    archive(settings).close()
    unknown = "12345678-1234-4234-8234-123456789abc"
    result = cli(config, "cancel", unknown)
    assert result.stdout == (
        f"cancelled {unknown}; but the history does not know mail {unknown}: it may be too "
        "new (the history consumer archives a mail within seconds of its submit) or "
        f"mistyped; check with `rohrpost history show {unknown}` or `rohrpost history list`\n"
    )


def dead_letters_with_ids(settings: Settings, *ids: str) -> None:
    for mail_id in ids:
        container = parse_container(mail(id=mail_id))
        properties = mail_properties(mail_id, headers={REASON_HEADER: "rejected"})
        publish_raw(
            settings,
            "acme.billing",
            encode_container(container),
            Topology.from_settings(settings).dead_exchange,
            properties,
        )


def test_dlq_commands_take_a_prefix_of_a_dead_letter(settings: Settings, config: Path) -> None:
    first, second = "abcd0000-0000-4000-8000-000000000001", "abce0000-0000-4000-8000-000000000002"
    dead_letters_with_ids(settings, first, second)
    shown = cli(config, "dlq", "show", "abcd", "--json")
    assert json.loads(shown.stdout)["id"] == first
    edited = cli(config, "dlq", "edit", "abcd", "--set", "subject=Corrected")
    assert edited.stdout == 'subject: "Invoice" -> "Corrected"\n'
    purged = cli(config, "dlq", "purge", "abcd…", "--yes")
    assert purged.stdout == "purged 1 dead letter\n"
    left = json.loads(cli(config, "dlq", "list", "--json").stdout)
    assert [letter["id"] for letter in left] == [second]
    missing = cli(config, "dlq", "retry", "abcd", check=False)
    assert missing.returncode == 1 and missing.stderr.endswith("error: no dead letter abcd\n")


def test_a_dlq_prefix_that_fits_several_dead_letters_lists_them(
    settings: Settings, config: Path
) -> None:
    dead_letters_with_ids(settings, SHARED + "00000000000a", SHARED + "10000000000b")
    for argv in (["show"], ["edit", "--set", "subject=x"], ["retry"], ["purge", "--yes"]):
        result = cli(config, "dlq", argv[0], "6c0f5d1e", *argv[1:], check=False)
        assert result.returncode == 1, argv
        assert result.stderr.endswith(
            f"error: id prefix 6c0f5d1e fits several mails: {SHARED}00000000000a, "
            f"{SHARED}10000000000b; give more digits\n"
        )
    assert len(json.loads(cli(config, "dlq", "list", "--json").stdout)) == 2, "nothing moved"
