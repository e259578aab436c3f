"""What the console asks of the history store, on SQLite and PostgreSQL: dead letters
without the queues, id prefixes, keyset pages, recipient lookups, the audit."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest

from rohrpost.shared.events import EventKind, MailEvent
from rohrpost.shared.store import DeadLetterQuery, HistoryRecord, HistoryStore, MailFilter
from rohrpost.shared.store import history as history_module
from tests.test_store import T0, container, event, submitted


def dead(store: HistoryStore, count: int = 1, **fields: Any) -> list[uuid.UUID]:
    """``count`` mails dead-lettered ``rejected``, a second apart."""
    ids = []
    for i in range(count):
        mail = container(to=[f"r{i}@example.com"], **fields)
        at = T0 + timedelta(seconds=i)
        store.write(
            [
                submitted(mail, at),
                event(
                    mail, EventKind.DEAD_LETTERED, at, reason="rejected", error="550 no such user"
                ),
            ]
        )
        ids.append(mail.id)
    return ids


def test_dead_letters_are_listed_newest_first_with_their_count(store: HistoryStore) -> None:
    ids = dead(store, 5)
    rows, total = store.dead_letters(DeadLetterQuery(limit=2, offset=1))
    assert total == 5
    assert [r.mail_id for r in rows] == [ids[3], ids[2]]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"text": "R3@EXAMPLE"}, 1),
        ({"text": "550 no such"}, 4),
        ({"text": "100%_"}, 0),
        ({"reason": "max_attempts"}, 0),
        ({"tenant": "acme", "app": "billing", "reason": "rejected"}, 4),
        ({"since": T0 + timedelta(seconds=2)}, 2),
        ({"until": T0 + timedelta(seconds=2)}, 2),
    ],
)
def test_dead_letters_are_filtered(
    store: HistoryStore, query: dict[str, Any], expected: int
) -> None:
    dead(store, 4)
    assert store.dead_letters(DeadLetterQuery(**query))[1] == expected


def test_an_edit_makes_the_corrected_container_the_mails_content(store: HistoryStore) -> None:
    [mail_id] = dead(store)
    fixed = container(id=str(mail_id), to=["anna@example.com"])
    edit = MailEvent(
        kind=EventKind.EDITED,
        mail_id=mail_id,
        tenant="acme",
        app="billing",
        at=T0 + timedelta(minutes=1),
        actor="erin",
        reason="rejected",
        detail={"changes": {"to": [["r0@example.com"], ["anna@example.com"]]}},
    )
    store.write([HistoryRecord(edit, fixed, "billing@acme.example")])
    found = store.mail(mail_id)
    assert found is not None and found.mail.status == "dead_lettered"
    assert found.mail.recipients == ["anna@example.com", "bob@example.com"]
    assert store.dead_letters(DeadLetterQuery(text="anna@"))[1] == 1
    assert store.list_mails(MailFilter(to="anna@example.com"))[0].id == mail_id


def test_a_purged_dead_letter_is_no_longer_listed_and_is_terminal(store: HistoryStore) -> None:
    [mail_id] = dead(store)
    mail = container(id=str(mail_id))
    store.write([event(mail, EventKind.PURGED, T0 + timedelta(minutes=1), actor="erin")])
    assert store.dead_letters(DeadLetterQuery())[1] == 0
    found = store.mail(mail_id)
    assert found is not None and found.mail.status == "purged"
    assert store.purge(T0 + timedelta(days=1)) == 1


def test_a_letter_that_is_no_container_is_kept_with_its_bytes_until_purged(
    store: HistoryStore,
) -> None:
    detail = {"body_sha256": "ab" * 32, "body_size": 9, "body": "not\x00json", "message_id": "x"}
    letter = MailEvent(
        kind=EventKind.DEAD_LETTERED,
        tenant="acme",
        app="billing",
        reason="invalid",
        error="not JSON",
        detail=detail,
        at=T0,
    )
    store.write([HistoryRecord(letter), HistoryRecord(letter)])
    rows, total = store.dead_letters(DeadLetterQuery(reason="invalid"))
    assert total == 1 and rows[0].letter_id == letter.event_id and rows[0].body_size == 9
    kept = store.invalid_letter(letter.event_id)
    assert kept is not None and kept["body"] == "not\ufffdjson"
    assert store.dead_letter_keys(DeadLetterQuery()) == [("acme", "billing", "ab" * 32)]
    purged = MailEvent(
        kind=EventKind.PURGED, tenant="acme", app="billing", detail={"body_sha256": "ab" * 32}
    )
    store.write([HistoryRecord(purged)])
    assert store.dead_letters(DeadLetterQuery())[1] == 0


@pytest.mark.parametrize("length", [1, 4, 8, 13, 36])
def test_a_mail_id_prefix_finds_exactly_the_mails_that_start_with_it(
    store: HistoryStore, length: int
) -> None:
    ids = dead(store, 20)
    prefix = str(ids[7])[:length]
    found = {m.id for m in store.list_mails(MailFilter(id_prefix=prefix, limit=100))}
    assert found == {i for i in ids if str(i).startswith(prefix)}


def test_pages_after_a_cursor_list_every_mail_once_newest_first(store: HistoryStore) -> None:
    ids = dead(store, 7)
    seen: list[uuid.UUID] = []
    after = None
    while page := store.list_mails(MailFilter(limit=3, after=after)):
        seen += [m.id for m in page]
        after = (page[-1].updated_at, page[-1].id)
    assert seen == ids[::-1]


@pytest.mark.parametrize("candidates", [2, 5000])
def test_a_recipient_search_finds_the_same_mails_however_many_the_recipient_has(
    store: HistoryStore, monkeypatch: pytest.MonkeyPatch, candidates: int
) -> None:
    monkeypatch.setattr(history_module, "_CANDIDATES", candidates)
    ids = dead(store, 4, cc=["often@example.com"])
    found = store.list_mails(MailFilter(to="Often@Example.com", tag="invoice", limit=3))
    assert [m.id for m in found] == ids[::-1][:3]
    assert store.list_mails(MailFilter(to="never@example.com")) == []


def test_the_audit_lists_operator_actions_on_mails_and_tenants_newest_first(
    store: HistoryStore,
) -> None:
    [mail_id] = dead(store)
    mail = container(id=str(mail_id))
    pause = MailEvent(
        kind=EventKind.PAUSED, tenant="acme", actor="erin", at=T0 + timedelta(minutes=2)
    )
    store.write(
        [
            event(mail, EventKind.RESUBMITTED, T0 + timedelta(minutes=1), actor="frank", round=1),
            HistoryRecord(pause),
        ]
    )
    audit = store.audit()
    assert [(a.kind, a.actor, a.mail_id) for a in audit] == [
        ("paused", "erin", None),
        ("resubmitted", "frank", mail_id),
    ]
    assert store.audit(tenant="globex") == []
    assert store.paused()[("acme", None)].actor == "erin"
