"""No message stops the history: what cannot be read or stored is set aside, alone.

Every test puts bad messages on ``{ns}.history`` ahead of good events of another
tenant, and checks that the good ones are archived, the bad ones end in
``{ns}.history.rejected`` with their reason (or are archived with what no store can
hold replaced), and the consumer keeps running.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pytest
from pydantic import ValidationError
from sqlalchemy import create_engine, insert, make_url, text

from rohrpost.consumer.events import BATCH_TYPE
from rohrpost.consumer.history import HistoryConsumer
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.container import parse_container
from rohrpost.shared.errors import ContainerError
from rohrpost.shared.events import EventKind, MailEvent
from rohrpost.shared.settings import Settings
from rohrpost.shared.store import HistoryRecord, HistoryStore
from rohrpost.shared.store.tables import mails
from rohrpost.shared.topology import Topology
from rohrpost.shared.wire import ACTOR_HEADER, ERROR_HEADER, REASON_HEADER, ROUND_HEADER
from tests.conftest import declare, postgres_database, publish_raw, wait_until

GLOBEX = {"globex": {"apps": {"shop": {"smtp": "catcher", "sender": "shop@globex.example"}}}}
Rejected = tuple[pika.BasicProperties, bytes]
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def container(**fields: Any) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "app": "billing",
        "to": ["anna@example.com"],
        "subject": "Invoice",
        "text": "x",
        **fields,
    }


def event(**fields: Any) -> dict[str, Any]:
    return {
        "kind": "sent",
        "event_id": str(uuid.uuid4()),
        "mail_id": str(uuid.uuid4()),
        "tenant": "acme",
        "app": "billing",
        "attempt": 1,
        **fields,
    }


def event_message(body: dict[str, Any] | bytes) -> tuple[pika.BasicProperties, bytes]:
    """A single event as operator tools publish it."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return pika.BasicProperties(type="rohrpost.event.sent", delivery_mode=2), raw


def mail_message(
    body: dict[str, Any] | bytes, **properties: Any
) -> tuple[pika.BasicProperties, bytes]:
    """A submitted container as the submit exchange delivers it."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return pika.BasicProperties(type="rohrpost.mail.v1", delivery_mode=2, **properties), raw


def batch_message(items: list[Any] | bytes) -> tuple[pika.BasicProperties, bytes]:
    """Events batched as workers publish them."""
    raw = items if isinstance(items, bytes) else json.dumps(items).encode()
    return pika.BasicProperties(type=BATCH_TYPE, delivery_mode=2), raw


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def deep_json(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.fixture
def history_settings(make_settings: Callable[..., Settings], store_url: str) -> Settings:
    settings = make_settings(store_url=store_url, tenants=GLOBEX)
    declare(settings)
    return settings


@pytest.fixture
def store(history_settings: Settings) -> Iterator[HistoryStore]:
    opened = HistoryStore.open(history_settings.store_url.get_secret_value(), migrate_schema=True)
    yield opened
    opened.close()


class RunningConsumer:
    """A history consumer in a thread; records whatever ended it."""

    def __init__(self, settings: Settings, store: HistoryStore) -> None:
        self.consumer = HistoryConsumer(settings, store)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-history")

    def _run(self) -> None:
        try:
            self.consumer.run()
        except BaseException as exc:
            self.error = exc

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and self.consumer.readiness() is None

    def __enter__(self) -> RunningConsumer:
        self._thread.start()
        wait_until(lambda: self.running or self.error, timeout=30)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.consumer.stop()
        self._thread.join(30)


def publish(settings: Settings, messages: Iterable[tuple[pika.BasicProperties, bytes]]) -> None:
    queue = Topology.from_settings(settings).history_queue
    for properties, body in messages:
        publish_raw(settings, queue, body, properties=properties)


def good_events(count: int = 3) -> list[MailEvent]:
    return [
        MailEvent(
            kind=EventKind.SENT,
            mail_id=uuid.uuid4(),
            tenant="globex",
            app="shop",
            attempt=1,
            smtp_reply="250 2.0.0 Ok",
        )
        for _ in range(count)
    ]


def as_messages(events: list[MailEvent]) -> list[tuple[pika.BasicProperties, bytes]]:
    return [(e.properties(), e.model_dump_json(exclude_none=True).encode()) for e in events]


def archived(store: HistoryStore, events: list[MailEvent]) -> bool:
    return all(store.mail(e.mail_id) is not None for e in events if e.mail_id)


class RejectedQueue:
    """What the consumer set aside, read (and removed) from ``{ns}.history.rejected``."""

    def __init__(self, settings: Settings) -> None:
        self._url = settings.broker_url.get_secret_value()
        self._queue = Topology.from_settings(settings).history_rejected_queue
        self.messages: list[Rejected] = []

    def read(self) -> list[Rejected]:
        with admin_channel(self._url) as channel:
            while (got := channel.basic_get(self._queue, auto_ack=True))[0] is not None:
                self.messages.append((got[1], got[2]))
        return self.messages

    def wait_for(self, count: int) -> list[Rejected]:
        return wait_until(lambda: len(self.read()) >= count and self.messages, timeout=30)


def reason_of(properties: pika.BasicProperties) -> tuple[Any, str]:
    headers = properties.headers or {}
    error = headers.get(ERROR_HEADER)
    return headers.get(REASON_HEADER), error.decode() if isinstance(error, bytes) else error


def run_with_poison(
    settings: Settings,
    store: HistoryStore,
    poison: list[tuple[pika.BasicProperties, bytes]],
    *,
    rejected: int,
) -> tuple[RunningConsumer, list[Rejected]]:
    """Good events of globex around the poison; return the consumer and what it set aside."""
    before, after = good_events(), good_events()
    publish(settings, [*as_messages(before), *poison, *as_messages(after)])
    queue = RejectedQueue(settings)
    with RunningConsumer(settings, store) as consumer:
        wait_until(lambda: archived(store, before + after), timeout=30)
        found = queue.wait_for(rejected) if rejected else []
        assert consumer.running, f"the consumer stopped: {consumer.error!r}"
    assert consumer.error is None
    assert len(queue.read()) == rejected
    return consumer, found


UNREADABLE = {
    "NUL in an event's tenant": (event_message(event(tenant="glo\u0000bex")), "tenant"),
    "a 70-bit round": (event_message(event(round=2**70)), "round"),
    "a 33-bit attempt": (event_message(event(attempt=2**33)), "attempt"),
    "a negative attempt": (event_message(event(attempt=-1)), "attempt"),
    "a tenant longer than the column": (event_message(event(tenant="t" * 100)), "tenant"),
    "year 1 shifted before the calendar": (
        event_message(event(at="0001-01-01T00:30:00+05:00")),
        "at",
    ),
    "year 9999 shifted past the calendar": (
        event_message(event(at="9999-12-31T23:00:00-05:00")),
        "at",
    ),
    "before 1970": (event_message(event(at="1969-12-31T23:59:59Z")), "at"),
    "not_before in year 9999 with a timezone": (
        mail_message(container(not_before="9999-12-31T23:30:00-02:00")),
        "not_before",
    ),
    "created_at in year 1": (
        mail_message(container(created_at="0001-01-01T00:00:00+01:00")),
        "created_at",
    ),
    "expires_at at the epoch's eve": (
        mail_message(container(expires_at="1969-12-31T00:00:00Z")),
        "expires_at",
    ),
    "invalid UTF-8": (event_message(b'{"kind": "sent", "tenant": "ac\xffme"}'), "JSON"),
    "a lone surrogate": (event_message(b'{"kind": "sent", "tenant": "a", "error": "\\ud800"}'), ""),
    "deeply nested template data": (
        mail_message(
            f'{{"tenant": "acme", "app": "billing", "to": ["a@example.com"], '
            f'"template": "t", "data": {deep_json(5000)}}}'.encode()
        ),
        "recursion limit",  # the JSON reader's own limit: the history reads no data
    ),
    "deeply nested event detail": (
        event_message(
            f'{{"kind": "edited", "tenant": "acme", "detail": {deep_json(5000)}}}'.encode()
        ),
        "recursion",
    ),
    "a batch that is no array": (batch_message(json.dumps(event()).encode()), "array"),
    "a batch that is not UTF-8": (batch_message(b"[\xff\xfe]"), ""),
    "a batch nested too deep": (batch_message(("[" * 100_000 + "]" * 100_000).encode()), ""),
}


@pytest.mark.parametrize(("poison", "field"), UNREADABLE.values(), ids=UNREADABLE.keys())
def test_an_unreadable_message_is_set_aside_with_its_reason_and_others_are_archived(
    history_settings: Settings, store: HistoryStore, poison: Any, field: str
) -> None:
    _, [(properties, body)] = run_with_poison(history_settings, store, [poison], rejected=1)
    assert body == poison[1], "set aside as it came"
    reason, error = reason_of(properties)
    assert reason == "unreadable"
    assert field.lower() in error.lower()
    assert properties.type == poison[0].type


STORABLE = {
    "error": "421 busy\u0000now",
    "smtp_reply": "250 ok\u0000",
    "subject": "Invoice\u00007",
    "actor": "ca\u0000rol",
    "message_id": "<a\u0000b@example.com>",
}


@pytest.mark.parametrize(("field", "value"), STORABLE.items(), ids=STORABLE.keys())
def test_nul_in_an_events_text_is_archived_as_a_replacement_character(
    history_settings: Settings, store: HistoryStore, field: str, value: str
) -> None:
    poison = event(**{field: value})
    run_with_poison(history_settings, store, [event_message(poison)], rejected=0)
    found = store.mail(uuid.UUID(poison["mail_id"]))
    assert found is not None and found.mail.status == "sent"
    [sent] = found.events
    stored = getattr(sent, field) if field != "subject" else found.mail.subject
    assert stored == value.replace("\u0000", "\ufffd")


def test_absurd_lengths_and_numbers_in_what_is_not_stored_are_archived(
    history_settings: Settings, store: HistoryStore
) -> None:
    long_error = event(kind="attempt_failed", error="4" * 1_000_000, retry_in_seconds=2**70)
    run_with_poison(history_settings, store, [event_message(long_error)], rejected=0)
    found = store.mail(uuid.UUID(long_error["mail_id"]))
    assert found is not None and found.mail.status == "retrying"
    assert found.mail.last_error is not None and len(found.mail.last_error) == 10_000


def test_template_data_holding_nul_is_archived_intact(
    history_settings: Settings, store: HistoryStore
) -> None:
    mail = parse_container(
        container(subject=None, text=None, template="t", data={"k": "a\u0000b", "n": [None]})
    )
    body = mail.model_dump_json(by_alias=True, exclude_none=True).encode()
    run_with_poison(history_settings, store, [mail_message(body)], rejected=0)
    found = store.mail(mail.id)
    assert found is not None and found.container is not None
    assert found.container["data"] == {"k": "a\u0000b", "n": [None]}


def test_a_resubmission_stamped_in_milliseconds_is_archived_at_its_arrival(
    history_settings: Settings, store: HistoryStore
) -> None:
    mail = parse_container(container())
    body = mail.model_dump_json(by_alias=True, exclude_none=True).encode()
    now = datetime.now(UTC)
    stamped = mail_message(
        body, timestamp=int(now.timestamp() * 1000), headers={ROUND_HEADER: 1, ACTOR_HEADER: 5}
    )
    run_with_poison(history_settings, store, [stamped], rejected=0)
    found = store.mail(mail.id)
    assert found is not None and [e.kind for e in found.events] == ["resubmitted"]
    assert abs(found.events[0].at - now) < timedelta(minutes=5)


def test_a_round_header_beyond_any_column_counts_as_the_first_round(
    history_settings: Settings, store: HistoryStore
) -> None:
    mail = parse_container(container())
    body = mail.model_dump_json(by_alias=True, exclude_none=True).encode()
    huge = mail_message(body, headers={ROUND_HEADER: 2**63 - 1})
    run_with_poison(history_settings, store, [huge], rejected=0)
    found = store.mail(mail.id)
    assert found is not None and [(e.kind, e.round) for e in found.events] == [("submitted", 0)]


def test_bad_events_in_a_workers_batch_are_set_aside_alone(
    history_settings: Settings, store: HistoryStore
) -> None:
    good = [event(tenant="globex", app="shop"), event(), event(tenant="globex", app="shop")]
    bad = [event(round=2**70), event(at="9999-12-31T23:00:00-05:00")]
    items = [good[0], bad[0], good[1], bad[1], good[2]]
    _, found = run_with_poison(history_settings, store, [batch_message(items)], rejected=2)
    assert all(store.mail(uuid.UUID(e["mail_id"])) is not None for e in good)
    set_aside = [json.loads(body) for _, body in found]
    assert all(len(items) == 1 for items in set_aside), "each bad event alone"
    assert sorted(items[0]["event_id"] for items in set_aside) == sorted(b["event_id"] for b in bad)
    assert {reason_of(p)[0] for p, _ in found} == {"unreadable"}
    assert {p.type for p, _ in found} == {BATCH_TYPE}


def refuse_poison_in_the_database(url: str) -> None:
    """Make the real store refuse any event whose actor is "poison" (a data error)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        if make_url(url).get_backend_name() == "sqlite":
            conn.execute(
                text(
                    "CREATE TRIGGER refuse_poison BEFORE INSERT ON events "
                    "WHEN NEW.actor = 'poison' BEGIN SELECT RAISE(ABORT, 'poison refused'); END"
                )
            )
        else:
            conn.execute(
                text(
                    "ALTER TABLE events ADD CONSTRAINT poison_refused "
                    "CHECK (actor IS DISTINCT FROM 'poison')"
                )
            )
    engine.dispose()


class OverflowingStore(HistoryStore):
    """A store whose writer meets an unexpected exception on "poison" (what SQLAlchemy
    raised for a date past the calendar before events were validated)."""

    def write_new(self, records: Iterable[HistoryRecord]) -> list[MailEvent]:
        records = list(records)
        if any(r.event.actor == "poison" for r in records):
            raise OverflowError("date value out of range")
        return super().write_new(records)


@pytest.mark.parametrize("refusal", ["the database refuses", "the writer raises"])
def test_values_the_store_refuses_are_found_by_splitting_and_set_aside_alone(
    history_settings: Settings, store: HistoryStore, refusal: str
) -> None:
    url = history_settings.store_url.get_secret_value()
    if refusal == "the database refuses":
        refuse_poison_in_the_database(url)
        target = store
    else:
        target = OverflowingStore(store.engine)
    single = event(actor="poison")
    mail = parse_container(container())
    resubmitted = mail_message(
        mail.model_dump_json(by_alias=True, exclude_none=True).encode(),
        headers={ROUND_HEADER: 1, ACTOR_HEADER: "poison"},
        user_id=history_settings.broker_user,  # an operator tool's: its actor is believed
    )
    neighbours = [event(tenant="globex", app="shop") for _ in range(3)]
    in_batch = event(kind="cancelled", actor="poison")
    batch = batch_message([neighbours[0], in_batch, neighbours[1]])
    poison = [event_message(single), resubmitted, batch, event_message(neighbours[2])]
    _, found = run_with_poison(history_settings, target, poison, rejected=3)
    assert all(store.mail(uuid.UUID(e["mail_id"])) is not None for e in neighbours)
    assert {reason_of(p)[0] for p, _ in found} == {"unstorable"}
    bodies = {p.type: body for p, body in found}
    assert bodies["rohrpost.event.sent"] == poison[0][1]
    assert bodies["rohrpost.mail.v1"] == resubmitted[1]
    assert [e["event_id"] for e in json.loads(bodies[BATCH_TYPE])] == [in_batch["event_id"]]
    if refusal == "the database refuses":
        assert all("poison" in reason_of(p)[1] for p, _ in found)


def test_a_value_beyond_a_postgresql_limit_is_set_aside_not_retried_forever(
    make_settings: Callable[..., Settings], postgres_url: str
) -> None:
    with postgres_database(postgres_url) as url:
        settings = make_settings(store_url=url, tenants=GLOBEX)
        declare(settings)
        store = HistoryStore.open(url, migrate_schema=True)
        try:
            with store.engine.begin() as conn:  # an index an operator added, say
                conn.execute(text("CREATE INDEX ix_events_error ON events (error)"))
            poison = event(
                kind="attempt_failed", error="".join(uuid.uuid4().hex for _ in range(300))
            )
            _, [(properties, _)] = run_with_poison(
                settings, store, [event_message(poison)], rejected=1
            )
        finally:
            store.close()
    reason, error = reason_of(properties)
    assert reason == "unstorable" and "index row" in error


def test_a_collision_with_another_writer_is_retried_not_set_aside(
    make_settings: Callable[..., Settings], postgres_url: str
) -> None:
    with postgres_database(postgres_url) as url:
        settings = make_settings(store_url=url, tenants=GLOBEX)
        declare(settings)
        store = HistoryStore.open(url, migrate_schema=True)
        sent = good_events(1)
        # Another history consumer is storing the same new mail, not yet committed.
        other = store.engine.connect()
        writing = other.begin()
        other.execute(
            insert(mails).values(
                id=sent[0].mail_id,
                tenant="globex",
                app="shop",
                status="queued",
                round=0,
                status_rank=0,
                status_at=T0,
                updated_at=T0,
                attempts=0,
                content_deleted=False,
            )
        )
        try:
            publish(settings, as_messages(sent))
            with RunningConsumer(settings, store) as consumer:
                wait_until(lambda: waiting_for_a_lock(store), timeout=30)
                writing.commit()
                wait_until(lambda: (found := store.mail(sent[0].mail_id)) and found.events)
                assert consumer.running
            assert RejectedQueue(settings).read() == []
            found = store.mail(sent[0].mail_id)
            assert found is not None and found.mail.status == "sent"
        finally:
            other.close()
            store.close()


def waiting_for_a_lock(store: HistoryStore) -> bool:
    with store.engine.connect() as conn:
        query = (
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        return bool(conn.execute(text(query)).scalar_one())


def test_a_message_that_kills_the_consumer_is_dead_lettered_after_the_delivery_limit(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(delivery_limit=3, tenants=GLOBEX)
    topology = declare(settings)
    properties, body = event_message(event())
    publish_raw(settings, topology.history_queue, body, properties=properties)
    url = settings.broker_url.get_secret_value()
    deliveries = 0
    rejected = RejectedQueue(settings)
    # Each "crash": a consumer takes the message and dies holding it (its channel closes).
    for _ in range(100):
        if rejected.read():
            break
        with admin_channel(url) as channel:
            method, _, _ = channel.basic_get(topology.history_queue, auto_ack=False)
        deliveries += method is not None
    [(dead, dead_body)] = rejected.wait_for(1)
    assert dead_body == body
    assert (dead.headers or {}).get("x-first-death-reason") == "delivery_limit"
    assert deliveries == 4, "the broker gives it 3 redeliveries after the first"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tenant": "acme\u0000"}, "tenant"),
        ({"app": "x" * 64}, "app"),
        ({"round": 2**31}, "round"),
        ({"attempt": 2**70}, "attempt"),
        ({"at": datetime(1, 1, 1, tzinfo=UTC)}, "at"),
        ({"at": "9999-12-31T23:59:59-00:01"}, "at"),
    ],
)
def test_an_event_refuses_values_no_store_can_hold(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        MailEvent.model_validate(event(**fields))
    assert [e["loc"][0] for e in caught.value.errors()] == [field]


@pytest.mark.parametrize(
    ("field", "value", "stored"),
    [
        ("error", "a\u0000b\ud800", "a\ufffdb\ufffd"),
        ("actor", "\udcff", "\ufffd"),
        ("reason", "r" * 50, "r" * 39 + "…"),
        ("smtp_reply", "2" * 20_000, "2" * 9_999 + "…"),
    ],
)
def test_an_events_free_text_is_made_storable_not_refused(
    field: str, value: str, stored: str
) -> None:
    assert getattr(MailEvent.model_validate(event(**{field: value})), field) == stored


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("not_before", "9999-12-31T23:00:00-05:00"),
        ("expires_at", "0001-01-01T00:00:00+00:30"),
        ("created_at", "1969-07-20T20:17:00Z"),
    ],
)
def test_a_container_refuses_dates_outside_1970_to_9999_naming_the_field(
    field: str, value: str
) -> None:
    with pytest.raises(ContainerError, match=f"^{field}: must lie between the years 1970 and 9999"):
        parse_container(container(**{field: value}))


def test_another_tenant_naming_a_mails_id_does_not_change_its_history(
    history_settings: Settings, store: HistoryStore
) -> None:
    # Mail ids are chosen by clients and go out in Message-ID. Whatever globex
    # publishes under acme's id leaves acme's mail as it was; what would have changed
    # it is set aside with the reason.
    due = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    acme = parse_container(container(not_before=due, subject="acme's"))
    run_with_poison(
        history_settings,
        store,
        [mail_message(acme.model_dump_json(by_alias=True, exclude_none=True).encode())],
        rejected=0,
    )
    taken = str(acme.id)
    globex = {"tenant": "globex", "app": "shop"}
    invalid = {"body_sha256": "0" * 64, "body_size": 2, "body": "{}", "message_id": taken}
    poison = [
        batch_message([event(mail_id=taken, subject="globex's", **globex)]),
        event_message(event(kind="dead_lettered", mail_id=None, detail=invalid, **globex)),
    ]
    settings = history_settings
    topology = Topology.from_settings(settings)
    # acme's container with another subject, published for globex's route
    forged = container(id=taken, subject="forged", not_before=due)
    publish_raw(settings, "globex.shop", json.dumps(forged).encode(), topology.submit_exchange)
    _, found = run_with_poison(settings, store, poison, rejected=2)
    reasons = sorted((reason_of(p)[0], p.type) for p, _ in found)
    assert reasons == [("unreadable", None), ("unstorable", BATCH_TYPE)]
    mail = store.mail(acme.id)
    assert mail is not None
    assert (mail.mail.status, mail.mail.subject) == ("scheduled", "acme's")
    assert [e.kind for e in mail.events] == ["submitted", "scheduled"]
