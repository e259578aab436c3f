"""Per-tenant publishers: only the broker users a tenant names may submit its mails.

RabbitMQ validates a publish's ``user_id`` against the connection's user, so a worker
can refuse a mail of a tenant that names its ``publishers`` when it came from anyone
else (dead letter ``forbidden``), while rohrpost's own re-publishes stay accepted.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from pika import frame
from pydantic import SecretStr

from rohrpost.catcher import MailCatcher
from rohrpost.consumer.history import HistoryConsumer
from rohrpost.consumer.outcome import Processed, Retry, mail_publication
from rohrpost.operations import DeadLetterFilter, DeadLetterQueue, OperatorSession
from rohrpost.producer.client import Producer
from rohrpost.shared.amqp import Delivery
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.control import ControlMessage
from rohrpost.shared.errors import ConfigError
from rohrpost.shared.events import EventKind, MailEvent
from rohrpost.shared.framing import PublishFramer
from rohrpost.shared.nodes import broker_addresses
from rohrpost.shared.nodes import broker_user as user_of
from rohrpost.shared.settings import Settings, settings_from_mapping
from rohrpost.shared.store import HistoryStore
from rohrpost.shared.topology import Topology, queue_depths
from rohrpost.shared.wire import (
    ACTOR_HEADER,
    ERROR_HEADER,
    REASON_HEADER,
    ROUND_HEADER,
    mail_properties,
)
from tests.conftest import (
    Permissions,
    WorkerThread,
    base_config,
    dead_letters,
    declare,
    wait_until,
)


def mail(**fields: Any) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "app": "billing",
        "to": ["anna@example.com"],
        "subject": "Hi",
        "text": "Hello",
        **fields,
    }


def publisher_permissions(namespace: str) -> Permissions:
    """What the README recommends for a tenant's publisher: write the two submit exchanges."""
    return ("^$", f"^{namespace}\\.(submit|schedule)$", "^$")


def as_user(settings: Settings, url: str) -> Settings:
    """``settings`` for a process that connects as another broker user."""
    return settings.model_copy(update={"broker_url": SecretStr(url)})


def dead_letter_count(settings: Settings) -> int:
    queue = Topology.from_settings(settings).dead_queue("acme", "billing")
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        return queue_depths(channel, [queue])[queue] or 0


def publish_as(url: str, exchange: str, key: str, body: bytes, **properties: Any) -> None:
    """Publish with confirms as the user of ``url``, with the properties given."""
    with admin_channel(url) as channel:
        channel.confirm_delivery()
        channel.basic_publish(
            exchange,
            key,
            body,
            pika.BasicProperties(delivery_mode=2, message_id=str(uuid.uuid4()), **properties),
            mandatory=True,
        )


@pytest.fixture
def publishers(
    make_settings: Callable[..., Settings], namespace: str, broker_user: Callable[..., str]
) -> tuple[Settings, str, str]:
    """Settings whose tenant acme names one publisher; (settings, its URL, another's URL)."""
    permissions = publisher_permissions(namespace)
    allowed, other = broker_user("pw-allowed", permissions), broker_user("pw-other", permissions)
    settings = make_settings(tenants={"acme": {"publishers": [user_of(allowed)]}})
    declare(settings)
    return settings, allowed, other


def test_a_tenants_publisher_submits_and_anyone_else_is_dead_lettered_forbidden(
    publishers: tuple[Settings, str, str],
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
) -> None:
    settings, allowed, other = publishers
    handle = worker_thread(settings)
    topology = Topology.from_settings(settings)
    forged = json.dumps(mail(subject="forged")).encode()
    # another service with the same write permissions: with its own (validated) user_id,
    # and without one
    publish_as(other, topology.submit_exchange, "acme.billing", forged, user_id=user_of(other))
    publish_as(other, topology.submit_exchange, "acme.billing.high", forged)
    # it cannot claim to be the publisher: the broker refuses that publish
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="user_id"):
        publish_as(
            other, topology.submit_exchange, "acme.billing", forged, user_id=user_of(allowed)
        )
    with Producer(as_user(settings, allowed)) as producer:
        producer.submit(mail(subject="due now"))
        soon = datetime.now(UTC) + timedelta(seconds=2)
        producer.submit(mail(subject="scheduled", not_before=soon.isoformat()))
    catcher.wait_for(lambda mails: len(mails) == 2)
    wait_until(lambda: dead_letter_count(settings) == 2)
    handle.stop()
    assert sorted(m.parsed()["Subject"] for m in catcher.mails) == ["due now", "scheduled"]
    letters = dead_letters(settings)
    assert [p.headers[REASON_HEADER] for p, _ in letters] == ["forbidden", "forbidden"]
    errors = sorted(p.headers[ERROR_HEADER] for p, _ in letters)
    assert f"user {user_of(other)!r}" in errors[1] and "no user_id" in errors[0]
    assert all(body == forged for _, body in letters)


def test_a_mail_retried_through_the_delay_levels_is_still_accepted(
    publishers: tuple[Settings, str, str],
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
) -> None:
    settings, allowed, _ = publishers
    catcher.script("anna@example.com", ["451 4.3.0 try again", "451 4.3.0 try again"])
    handle = worker_thread(settings)
    with Producer(as_user(settings, allowed)) as producer:
        producer.submit(mail())
    catcher.wait_for(lambda mails: len(mails) == 1)
    handle.stop()
    assert len(catcher.attempts) == 3
    assert dead_letters(settings) == []


def test_an_operator_retry_of_a_dead_letter_is_accepted(
    publishers: tuple[Settings, str, str],
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
) -> None:
    settings, allowed, _ = publishers
    catcher.script("anna@example.com", ["550 5.1.1 no such user"])
    handle = worker_thread(settings)
    with Producer(as_user(settings, allowed)) as producer:
        mail_id = producer.submit(mail())
    wait_until(lambda: dead_letter_count(settings) == 1)
    with OperatorSession(settings, actor="ops") as session:
        done, skipped = DeadLetterQueue(session).retry(DeadLetterFilter(ids={str(mail_id)}))
    assert [letter.mail_id for letter in done] == [str(mail_id)] and skipped == []
    catcher.wait_for(lambda mails: len(mails) == 1)
    handle.stop()
    assert dead_letters(settings) == []


def _header_properties(data: bytes) -> Any:
    """The properties of the content header among a publish's frames."""
    consumed, _ = frame.decode_frame(data)
    _, header = frame.decode_frame(data[consumed:])
    return header.properties


def test_every_mail_rohrpost_publishes_carries_its_own_user_on_the_wire(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(broker_url="amqp://acme%2Dsvc:pw@127.0.0.1:5672/%2F")
    assert settings.broker_user == "acme-svc"
    framer = PublishFramer(channel_number=1, frame_max=4096)
    producer = Producer(settings)
    for _ in range(2):  # the second from the framer's header template
        _, publication = producer.prepare(mail(id=str(uuid.uuid4())))
        assert _header_properties(framer.frames(publication)).user_id == "acme-svc"
    delivery = Delivery(
        tag=1,
        generation=0,
        queue="q",
        routing_key="acme.billing",
        properties=publication.properties,
        body=publication.body,
        redelivered=False,
    )
    moved = mail_publication(
        Topology.from_settings(settings),
        Processed(delivery, None, 1, Retry(1, "busy"), "acme", "billing"),
        settings.broker_user,
    )
    assert moved is not None and _header_properties(framer.frames(moved)).user_id == "acme-svc"
    control = ControlMessage(action="pause", tenant="acme", actor="ops")
    assert control.publication("x", "acme-svc").properties.user_id == "acme-svc"
    assert mail_properties("m", user_id="acme-svc").user_id == "acme-svc"


def test_publishers_are_validated_and_include_the_installations_own_user(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        tenants={"acme": {"publishers": ["acme-svc", "acme.batch@example", "ünï"]}}
    )
    assert settings.publishers("acme") == frozenset(
        {"acme-svc", "acme.batch@example", "ünï", "guest"}
    )
    assert make_settings().publishers("acme") is None  # none named: anyone
    assert make_settings(tenants={"acme": {"publishers": []}}).publishers("acme") is None
    assert settings.publishers("globex") is None


@pytest.mark.parametrize(
    ("publishers", "message"),
    [
        ([""], "not empty"),
        ([" acme"], "surrounding spaces"),
        (["acme\n"], "surrounding spaces"),
        (["ac\x00me"], "control characters"),
        (["x" * 256], "at most 255 bytes"),
        (["é" * 128], "at most 255 bytes"),
        (["acme", "acme"], "'acme' listed twice"),
        ("acme", "tuple"),
        ([1], "string"),
    ],
)
def test_a_bad_publisher_name_is_refused_naming_the_tenant(
    publishers: Any, message: str, tmp_path: Path
) -> None:
    config = base_config("amqp://127.0.0.1", "ns", tmp_path, 25)
    config["tenants"]["acme"]["publishers"] = publishers
    with pytest.raises(ConfigError, match=f"tenants.acme.publishers.*{message}"):
        settings_from_mapping(config)


def test_the_broker_user_is_read_as_pika_reads_it_and_the_same_on_every_node() -> None:
    assert user_of("amqp://127.0.0.1:5672/%2F") == "guest"
    assert user_of("amqp://acme%40svc:p%3Aw@rabbit:5672/%2F") == "acme@svc"
    assert user_of("amqp://a:x@rabbit-1/%2F,amqp://a:y@rabbit-2/%2F") == "a"
    with pytest.raises(ValueError, match="user 'b', but address 1 names 'a'"):
        broker_addresses(["amqp://a:x@rabbit-1/%2F", "amqp://b:x@rabbit-2/%2F"])


def test_a_forger_knowing_a_mails_id_changes_nothing_of_its_history(
    publishers: tuple[Settings, str, str], store_url: str, store: HistoryStore
) -> None:
    # Ids go out in Message-ID. Another broker user publishes a container under a real
    # mail's id, as a new round with other content; the worker dead-letters it forbidden
    # (its event names the id). The mail's history stays the publisher's mail.
    settings, allowed, other = publishers
    settings = settings.model_copy(update={"store_url": SecretStr(store_url)})
    topology = Topology.from_settings(settings)
    due = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    with Producer(as_user(settings, allowed)) as producer:
        mail_id = producer.submit(mail(subject="the real one", not_before=due))
    forged = json.dumps(mail(id=str(mail_id), subject="forged")).encode()
    publish_as(
        other,
        topology.submit_exchange,
        "acme.billing",
        forged,
        user_id=user_of(other),
        type="rohrpost.mail.v1",
        headers={ROUND_HEADER: 1},
    )
    refused = MailEvent(
        kind=EventKind.DEAD_LETTERED,
        mail_id=mail_id,
        tenant="acme",
        app="billing",
        round=1,
        attempt=1,
        reason="forbidden",
        error=f"published with user {user_of(other)!r}, not a publisher of acme",
    )
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        channel.basic_publish("", topology.history_queue, *refused_message(refused))
    consumer = HistoryConsumer(settings, store)
    thread = threading.Thread(target=consumer.run, kwargs={"drain": True})
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    history = store.mail(mail_id)
    assert history is not None
    assert (history.mail.status, history.mail.subject) == ("scheduled", "the real one")
    assert [e.kind for e in history.events] == ["submitted", "scheduled", "dead_lettered"]
    rejected = topology.history_rejected_queue
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        _, properties, body = channel.basic_get(rejected, auto_ack=True)
    assert body == forged
    assert "not a publisher of acme" in str((properties.headers or {}).get(ERROR_HEADER))


def refused_message(event: MailEvent) -> tuple[bytes, pika.BasicProperties]:
    """The worker's ``forbidden`` event, as one event message (a worker batches it)."""
    body = event.model_dump_json().encode()
    return body, pika.BasicProperties(type="rohrpost.event.dead_lettered", delivery_mode=2)


def test_only_rohrposts_own_user_names_who_resubmitted_a_mail(
    make_settings: Callable[..., Settings],
    namespace: str,
    broker_user: Callable[..., str],
    store_url: str,
    store: HistoryStore,
) -> None:
    # A tenant's service could stamp x-rohrpost-actor on its own mails, and their
    # timelines would say an operator re-submitted them.
    tenant = broker_user("pw-tenant", publisher_permissions(namespace))
    settings = make_settings(store_url=store_url)
    declare(settings)
    topology = Topology.from_settings(settings)
    stamped = {"tenant's service": tenant, "operator tool": settings.broker_url.get_secret_value()}
    ids = {}
    for who, url in stamped.items():
        ids[who] = uuid.uuid4()
        publish_as(
            url,
            topology.submit_exchange,
            "acme.billing",
            json.dumps(mail(id=str(ids[who]))).encode(),
            user_id=user_of(url),
            type="rohrpost.mail.v1",
            headers={ROUND_HEADER: 1, ACTOR_HEADER: "ops-admin"},
        )
    consumer = HistoryConsumer(settings, store)
    thread = threading.Thread(target=consumer.run, kwargs={"drain": True})
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    actors = {}
    for who, mail_id in ids.items():
        history = store.mail(mail_id)
        assert history is not None
        actors[who] = [(e.kind, e.actor) for e in history.events]
    assert actors == {
        "tenant's service": [("resubmitted", None)],
        "operator tool": [("resubmitted", "ops-admin")],
    }
