"""The history store, on SQLite and on PostgreSQL: schema, idempotent writes, queries, purge."""

from __future__ import annotations

import socket
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select

from rohrpost.shared.container import MailContainer, parse_container
from rohrpost.shared.errors import StoreError, StoreUnavailable
from rohrpost.shared.events import EventKind, MailEvent
from rohrpost.shared.store import HistoryRecord, HistoryStore, MailFilter
from rohrpost.shared.store.database import (
    POSTGRESQL_DEFAULTS,
    create_store_engine,
    head_revision,
    migrate,
)
from rohrpost.shared.store.history import PurgeBatches
from rohrpost.shared.store.tables import events, mail_recipients, mail_tags, mails, metadata

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def container(**fields: Any) -> MailContainer:
    return parse_container(
        {
            "tenant": "acme",
            "app": "billing",
            "to": ["Anna <Anna@Example.com>"],
            "cc": ["bob@example.com"],
            "subject": "Invoice 7",
            "text": "x",
            "tags": ["invoice"],
            "created_at": T0.isoformat(),
            **fields,
        }
    )


def submitted(mail: MailContainer, at: datetime = T0) -> HistoryRecord:
    event = MailEvent(
        event_id=uuid.uuid5(mail.id, "submitted.0"),
        kind=EventKind.SUBMITTED,
        mail_id=mail.id,
        tenant=mail.tenant,
        app=mail.app,
        at=at,
    )
    return HistoryRecord(event, mail, "billing@acme.example")


def resubmitted(corrected: MailContainer, at: datetime, **fields: Any) -> HistoryRecord:
    """An operator's re-submission (round 1) of a mail, with its corrected container."""
    event = MailEvent(
        event_id=uuid.uuid5(corrected.id, "submitted.1"),
        kind=EventKind.RESUBMITTED,
        mail_id=corrected.id,
        tenant=corrected.tenant,
        app=corrected.app,
        at=at,
        round=1,
        **fields,
    )
    return HistoryRecord(event, corrected, "billing@acme.example")


def event(mail: MailContainer, kind: EventKind, at: datetime, **fields: Any) -> HistoryRecord:
    return HistoryRecord(
        MailEvent(kind=kind, mail_id=mail.id, tenant=mail.tenant, app=mail.app, at=at, **fields)
    )


def retried_then_sent(mail: MailContainer) -> list[HistoryRecord]:
    return [
        submitted(mail),
        event(
            mail,
            EventKind.ATTEMPT_FAILED,
            T0 + timedelta(seconds=1),
            attempt=1,
            error="DATA: 421 4.3.2 busy",
            retry_in_seconds=30,
        ),
        event(
            mail,
            EventKind.SENT,
            T0 + timedelta(seconds=31),
            attempt=2,
            smtp_reply="250 2.0.0 queued as ABC",
            message_id=f"<{mail.id}@acme.example>",
        ),
    ]


def count(store: HistoryStore, table: Any, **where: Any) -> int:
    query = select(func.count()).select_from(table)
    for column, value in where.items():
        query = query.where(table.c[column] == value)
    with store.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def test_migrations_create_exactly_the_declared_schema(store: HistoryStore) -> None:
    with store.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    assert differences == []


def test_migrating_again_changes_nothing(store_url: str) -> None:
    engine = create_store_engine(store_url)
    try:
        assert migrate(engine) == head_revision()
        assert migrate(engine) == head_revision()
    finally:
        engine.dispose()


def test_an_unmigrated_store_is_refused_with_the_fix(store_url: str) -> None:
    with pytest.raises(StoreError, match="rohrpost store migrate"):
        HistoryStore.open(store_url)


def test_a_mail_and_its_timeline_are_stored_in_order(store: HistoryStore) -> None:
    mail = container()
    assert store.write(retried_then_sent(mail)) == 3
    found = store.mail(mail.id)
    assert found is not None
    assert found.mail.status == "sent"
    assert found.mail.attempts == 2
    assert found.mail.sender == "billing@acme.example"
    assert found.mail.recipients == ["Anna <Anna@Example.com>", "bob@example.com"]
    assert found.mail.sent_at == T0 + timedelta(seconds=31)
    assert found.mail.message_id == f"<{mail.id}@acme.example>"
    assert [e.kind for e in found.events] == ["submitted", "attempt_failed", "sent"]
    assert found.events[1].error == "DATA: 421 4.3.2 busy"
    assert found.container is not None and found.container["subject"] == "Invoice 7"


def test_writing_the_same_events_again_changes_nothing(store: HistoryStore) -> None:
    mail = container()
    records = retried_then_sent(mail)
    store.write(records)
    before = store.mail(mail.id)
    assert store.write(records) == 0
    assert store.write(records[1:] + records[:1]) == 0
    assert store.mail(mail.id) == before
    assert count(store, events) == 3


def test_events_arriving_out_of_order_end_in_the_right_status(store: HistoryStore) -> None:
    mail = container()
    records = retried_then_sent(mail)
    store.write([records[2]])
    store.write([records[1]])
    store.write([records[0]])
    found = store.mail(mail.id)
    assert found is not None and found.mail.status == "sent"
    assert found.mail.subject == "Invoice 7" and found.mail.recipients is not None


def test_a_worker_clock_behind_the_producer_cannot_make_a_sent_mail_look_queued(
    store: HistoryStore,
) -> None:
    mail = container()
    store.write(
        [
            submitted(mail, at=T0),
            event(mail, EventKind.SENT, T0 - timedelta(seconds=5), attempt=1, smtp_reply="250"),
        ]
    )
    found = store.mail(mail.id)
    assert found is not None and found.mail.status == "sent"


def test_a_future_not_before_is_scheduled(store: HistoryStore) -> None:
    mail = container(not_before=(T0 + timedelta(hours=1)).isoformat())
    store.write(
        [
            submitted(mail),
            HistoryRecord(
                MailEvent(
                    event_id=uuid.uuid5(mail.id, "scheduled.0"),
                    kind=EventKind.SCHEDULED,
                    mail_id=mail.id,
                    tenant="acme",
                    app="billing",
                    at=T0,
                )
            ),
        ]
    )
    found = store.mail(mail.id)
    assert found is not None and found.mail.status == "scheduled"


def test_list_filters_by_every_criterion(store: HistoryStore) -> None:
    sent = container()
    dead = container(to=["carol@example.com"], cc=[], tags=["reminder"], app="billing")
    other = container(tenant="globex", to=["anna@example.com"], cc=[], tags=[])
    store.write(
        [
            *retried_then_sent(sent),
            submitted(dead),
            submitted(other),
            event(
                dead,
                EventKind.DEAD_LETTERED,
                T0 + timedelta(hours=2),
                attempt=1,
                reason="rejected",
                error="550 no such user",
            ),
        ]
    )

    def ids(**criteria: Any) -> set[uuid.UUID]:
        return {m.id for m in store.list_mails(MailFilter(**criteria))}

    assert ids() == {sent.id, dead.id, other.id}
    assert ids(tenant="acme") == {sent.id, dead.id}
    assert ids(tenant="globex", app="billing") == {other.id}
    assert ids(status="dead_lettered") == {dead.id}
    assert ids(to="ANNA@example.com") == {sent.id, other.id}
    assert ids(to="bob@example.com") == {sent.id}
    assert ids(tag="reminder") == {dead.id}
    assert ids(since=T0 + timedelta(hours=1)) == {dead.id}
    assert ids(until=T0 + timedelta(hours=1)) == {sent.id, other.id}
    assert len(store.list_mails(MailFilter(limit=2))) == 2
    assert store.list_mails()[0].id == dead.id, "newest change first"


@pytest.mark.parametrize("frequent", [False, True], ids=["rare tag", "frequent tag"])
def test_a_tag_search_finds_every_tagged_mail_archived_before_or_after_migration_0007(
    store: HistoryStore, frequent: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if frequent:  # the walk through the newest mails, each checked by its row's tags
        monkeypatch.setattr("rohrpost.shared.store.history._CANDIDATES", 0)
    old = container(tags=["promo"])
    new = container(tags=["promo", "june"])
    untagged = container(tags=[])
    retagged = container(tags=["promo"])
    store.write([submitted(old), submitted(new), submitted(untagged), submitted(retagged)])
    with store.engine.begin() as conn:  # archived before the column: its tags are NULL
        conn.execute(mails.update().where(mails.c.id == old.id).values(tags=None))
    corrected = container(id=str(retagged.id), tags=["autumn"])
    store.write([resubmitted(corrected, T0 + timedelta(minutes=1))])

    def ids(tag: str) -> set[uuid.UUID]:
        return {m.id for m in store.list_mails(MailFilter(tag=tag))}

    assert ids("promo") == {old.id, new.id}
    assert ids("june") == {new.id}
    assert ids("autumn") == {retagged.id}
    assert ids("none") == set()
    odd = ['say "hi"', "back\\slash", "NULL", "{a,b}", "comma, space", "ünï €"]
    oddly = container(tags=odd)
    store.write([submitted(oddly)])
    for tag in odd:
        assert ids(tag) == {oddly.id}, tag
    with store.engine.connect() as conn:
        row = conn.execute(select(mails.c.tags).where(mails.c.id == oddly.id)).scalar_one()
    assert list(row) == odd


def test_a_delete_mail_leaves_no_content_after_it_was_sent(store: HistoryStore) -> None:
    mail = container(history="delete")
    records = retried_then_sent(mail)
    store.write(records)
    found = store.mail(mail.id)
    assert found is not None
    assert found.mail.status == "sent" and found.mail.content_deleted
    assert found.container is None
    assert (found.mail.sender, found.mail.recipients, found.mail.subject) == (None, [], None)
    assert found.mail.last_error is None
    assert all(e.error is None and e.smtp_reply is None for e in found.events)
    assert count(store, mail_recipients) == 0 and count(store, mail_tags) == 0
    assert store.list_mails(MailFilter(to="anna@example.com")) == []
    # A redelivered submission does not bring the content back.
    store.write([submitted(mail)])
    again = store.mail(mail.id)
    assert again is not None and again.container is None and again.mail.recipients == []


def test_a_delete_mail_that_failed_keeps_its_content_for_operators(store: HistoryStore) -> None:
    mail = container(history="delete")
    store.write(
        [
            submitted(mail),
            event(mail, EventKind.DEAD_LETTERED, T0, attempt=1, reason="rejected", error="550"),
        ]
    )
    found = store.mail(mail.id)
    assert found is not None and found.container is not None and not found.mail.content_deleted


def test_purge_removes_exactly_the_finished_mails_older_than_the_limit(
    store: HistoryStore,
) -> None:
    now = datetime.now(UTC)
    old_sent, old_dead, old_pending, new_sent, other_app = (
        container(created_at=(now - timedelta(days=d)).isoformat(), app=app)
        for d, app in (
            (40, "billing"),
            (35, "billing"),
            (45, "billing"),
            (5, "billing"),
            (50, "shop"),
        )
    )
    records = []
    for mail, kind, age in (
        (old_sent, EventKind.SENT, 40),
        (old_dead, EventKind.DEAD_LETTERED, 35),
        (new_sent, EventKind.SENT, 5),
        (other_app, EventKind.SENT, 50),
    ):
        records += [
            submitted(mail, at=mail.created_at),
            event(mail, kind, now - timedelta(days=age), attempt=1),
        ]
    records.append(submitted(old_pending, at=old_pending.created_at))  # still queued
    store.write(records)
    assert store.purge(now - timedelta(days=30), tenant="acme", app="billing") == 2
    remaining = {m.id for m in store.list_mails()}
    assert remaining == {old_pending.id, new_sent.id, other_app.id}
    assert count(store, events, mail_id=old_sent.id) == 0, "events go with their mail"
    assert count(store, mail_recipients, mail_id=old_dead.id) == 0


def edited_retried_and_sent(mail: MailContainer) -> list[HistoryRecord]:
    """Dead-lettered, corrected by an operator, re-submitted (round 1) and sent."""
    corrected = container(
        id=str(mail.id), subject="Invoice 7 (corrected)", to=["anna@example.org"], cc=[]
    )
    return [
        submitted(mail),
        event(
            mail,
            EventKind.DEAD_LETTERED,
            T0 + timedelta(seconds=1),
            attempt=3,
            reason="rejected",
            error="550 5.1.2 bad destination domain",
        ),
        event(
            mail,
            EventKind.EDITED,
            T0 + timedelta(minutes=10),
            actor="carol",
            detail={"changes": {"subject": ["Invoice 7", "Invoice 7 (corrected)"]}},
        ),
        resubmitted(corrected, T0 + timedelta(minutes=11), actor="carol"),
        event(
            mail,
            EventKind.SENT,
            T0 + timedelta(minutes=12),
            round=1,
            attempt=1,
            smtp_reply="250 2.0.0 queued as XYZ",
            subject="Invoice 7 (corrected)",
        ),
    ]


def test_a_new_round_replaces_the_last_rounds_outcome_and_content(store: HistoryStore) -> None:
    mail = container()
    store.write(edited_retried_and_sent(mail))
    found = store.mail(mail.id)
    assert found is not None
    summary = found.mail
    assert (summary.status, summary.reason, summary.last_error) == ("sent", None, None)
    assert summary.subject == "Invoice 7 (corrected)"
    assert summary.recipients == ["anna@example.org"] and summary.attempts == 1
    assert found.container is not None and found.container["to"] == ["anna@example.org"]
    assert store.list_mails(MailFilter(to="anna@example.com")) == []
    assert [m.id for m in store.list_mails(MailFilter(to="anna@example.org"))] == [mail.id]
    # the timeline keeps the first round's story
    kinds = [(e.kind, e.reason, e.error) for e in found.events]
    assert kinds[:2] == [
        ("submitted", None, None),
        ("dead_lettered", "rejected", "550 5.1.2 bad destination domain"),
    ]
    assert [e.kind for e in found.events[2:]] == ["edited", "resubmitted", "sent"]


@pytest.mark.parametrize(
    "order", [(4, 3, 2, 1, 0), (4, 0, 1, 3, 2), (3, 0, 4, 1, 2), (0, 3, 1, 4, 2)]
)
def test_a_new_rounds_outcome_wins_whatever_order_the_events_arrive_in(
    store: HistoryStore, order: tuple[int, ...]
) -> None:
    mail = container()
    records = edited_retried_and_sent(mail)
    for index in order:
        store.write([records[index]])
    found = store.mail(mail.id)
    assert found is not None
    summary = found.mail
    assert (summary.status, summary.reason, summary.last_error, summary.attempts) == (
        "sent",
        None,
        None,
        1,
    )
    assert (summary.subject, summary.recipients) == ("Invoice 7 (corrected)", ["anna@example.org"])
    assert found.container is not None and found.container["subject"] == "Invoice 7 (corrected)"


def test_a_new_round_that_fails_again_shows_only_its_own_error(store: HistoryStore) -> None:
    mail = container()
    records = edited_retried_and_sent(mail)[:4]
    records.append(
        event(
            mail,
            EventKind.ATTEMPT_FAILED,
            T0 + timedelta(minutes=12),
            round=1,
            attempt=1,
            error="421 4.3.2 busy",
        )
    )
    store.write(records)
    found = store.mail(mail.id)
    assert found is not None
    summary = found.mail
    assert (summary.status, summary.reason, summary.last_error, summary.attempts) == (
        "retrying",
        None,
        "421 4.3.2 busy",
        1,
    )


def test_text_a_column_cannot_hold_is_stored_as_a_replacement_character(
    store: HistoryStore,
) -> None:
    # Built without validation: whatever the container model lets through, the writer
    # never hands PostgreSQL a NUL (the container JSON keeps it, escaped).
    valid = container(tags=["a"], data={})
    mail = MailContainer.model_construct(
        **{**dict(valid), "subject": "In\x00voice", "tags": ("t\x00ag", "t\ufffdag")}
    )
    store.write([submitted(mail)])
    found = store.mail(mail.id)
    assert found is not None and found.mail.subject == "In\ufffdvoice"
    assert found.container is not None and found.container["subject"] == "In\x00voice"
    assert count(store, mail_tags, mail_id=mail.id) == 1
    # A search holding such text (a NUL, invalid UTF-8 on a command line) asks for it as
    # the store keeps it: found, not an error from the database or the encoder.
    assert [m.id for m in store.list_mails(MailFilter(tag="t\x00ag"))] == [mail.id]
    assert store.list_mails(MailFilter(tag="\udcff", to="\x00@x", tenant="a\x00")) == []


def test_a_purge_deletes_in_batches_and_reports_its_progress(store: HistoryStore) -> None:
    now = datetime.now(UTC)
    old = [container(created_at=(now - timedelta(days=40)).isoformat()) for _ in range(7)]
    fresh = container(created_at=now.isoformat())
    records = []
    for mail, age in [*((m, 40) for m in old), (fresh, 0)]:
        records += [
            submitted(mail, at=mail.created_at),
            event(mail, EventKind.SENT, now - timedelta(days=age), attempt=1),
        ]
    store.write(records)
    progress: list[int] = []
    batches = PurgeBatches(size=3, most=3)
    purged = store.purge(now - timedelta(days=30), batches=batches, on_progress=progress.append)
    assert (purged, progress) == (7, [3, 6, 7])
    assert {m.id for m in store.list_mails()} == {fresh.id}
    assert count(store, events) == 2, "only the fresh mail's events are left"


def test_outcomes_are_counted_per_route_once_each_in_five_minute_steps(
    store: HistoryStore,
) -> None:
    now = datetime.now(UTC)
    mails = [container(created_at=now.isoformat()) for _ in range(3)]
    other = container(app="shop", created_at=now.isoformat())
    records = [submitted(m, at=now) for m in [*mails, other]]
    records += [event(mails[0], EventKind.ATTEMPT_FAILED, now, attempt=1)]
    records += [event(m, EventKind.SENT, now, attempt=1) for m in mails[:2]]
    records += [event(mails[2], EventKind.DEAD_LETTERED, now - timedelta(hours=3), attempt=1)]
    store.write(records)
    store.write(records)  # redelivered: counted once
    last_hour = store.recent_counts(now - timedelta(hours=1))
    assert last_hour[("acme", "billing")] == {"submitted": 3, "attempt_failed": 1, "sent": 2}
    assert last_hour[("acme", "shop")] == {"submitted": 1}
    day = store.recent_counts(now - timedelta(days=1), tenant="acme", app="billing")
    assert list(day) == [("acme", "billing")]
    assert day[("acme", "billing")]["dead_lettered"] == 1
    store.forget_old_counts(now + timedelta(days=8))
    assert store.recent_counts(now - timedelta(days=30)) == {}


@pytest.mark.parametrize("minute", [0, 5, 37])
def test_a_window_of_counts_is_what_its_five_minute_steps_hold_read_from_hours_and_steps(
    store: HistoryStore, minute: int
) -> None:
    from rohrpost.shared.store.counts import step_of

    now = T0.replace(minute=minute, second=12)
    ats = [now - timedelta(minutes=m) for m in range(0, 25 * 60, 7)]
    mail = container()
    store.write([event(mail, EventKind.ATTEMPT_FAILED, at, attempt=1) for at in ats])
    for window in (timedelta(hours=1), timedelta(days=1), timedelta(hours=3, minutes=2)):
        since = now - window
        expected = sum(1 for at in ats if step_of(at) >= step_of(since))
        counts = store.recent_counts(since)[("acme", "billing")]
        assert counts == {"attempt_failed": expected}, window


def test_upgrading_counts_the_last_days_outcomes_already_stored(store_url: str) -> None:
    from alembic import command

    from rohrpost.shared.store.database import _alembic_config

    engine = create_store_engine(store_url)
    now = datetime.now(UTC)
    mail_id = uuid.uuid4()
    try:
        config = _alembic_config()
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "0002")  # before outcome counts existed
            conn.execute(
                mails.insert().values(
                    id=mail_id,
                    tenant="acme",
                    app="billing",
                    status="sent",
                    round=0,
                    status_rank=3,
                    status_at=now,
                    updated_at=now,
                    attempts=1,
                    content_deleted=False,
                )
            )
            conn.execute(
                events.insert(),
                [
                    {"event_id": uuid.uuid4(), "mail_id": mail_id, "kind": k, "at": at, "round": 0}
                    for k, at in (
                        ("submitted", now),
                        ("sent", now),
                        ("sent", now - timedelta(days=3)),
                    )
                ],
            )
        migrate(engine)
        store = HistoryStore(engine)
        counts = store.recent_counts(now - timedelta(days=1))
        assert counts == {("acme", "billing"): {"submitted": 1, "sent": 1}}
    finally:
        engine.dispose()


def test_purge_batches_shrink_after_a_slow_batch_and_grow_after_quick_ones() -> None:
    batches = PurgeBatches(size=1000, most=5000, least=50)
    batches.took(2.0)
    assert batches.size == 500
    for _ in range(20):
        batches.took(3.0)
    assert batches.size == 50
    batches.took(0.1)
    assert batches.size == 62
    batches.took(0.4)  # between a quarter and a half second: kept
    assert batches.size == 62
    for _ in range(50):
        batches.took(0.01)
    assert batches.size == 5000


def test_a_postgresql_store_gets_bounded_connect_and_dead_peer_timeouts(postgres_url: str) -> None:
    """libpq's defaults wait for a silent server or a vanished host for hours."""
    defaults = create_store_engine(postgres_url)
    chosen = create_store_engine(f"{postgres_url}?keepalives_idle=5&connect_timeout=3")
    try:
        with defaults.connect() as conn:
            parameters = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
        for name, value in POSTGRESQL_DEFAULTS.items():
            assert parameters[name] == str(value), name
        with chosen.connect() as conn:
            parameters = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
        assert (parameters["keepalives_idle"], parameters["connect_timeout"]) == ("5", "3")
        assert parameters["tcp_user_timeout"] == "60000"  # the others keep their defaults
    finally:
        defaults.dispose()
        chosen.dispose()


def test_a_postgresql_server_that_accepts_but_never_answers_is_unavailable_not_a_hang() -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody answers
    port = silent.getsockname()[1]
    try:
        with pytest.raises(StoreUnavailable):
            HistoryStore.open(f"postgresql+psycopg://rohrpost@127.0.0.1:{port}/history")
    finally:
        silent.close()
