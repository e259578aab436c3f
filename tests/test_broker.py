"""The broker connection: confirms, topology errors, and recovery from a lost connection."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from urllib.parse import urlsplit

import pika
import pytest
from pika import frame, spec
from pydantic import SecretStr

from rohrpost.catcher import MailCatcher
from rohrpost.producer.client import Producer
from rohrpost.shared.amqp import ConfirmTracker, Pending
from rohrpost.shared.broker import Broker, Publication, admin_channel
from rohrpost.shared.errors import NotConfirmed, TopologyConflict, TopologyMissing
from rohrpost.shared.events import EventKind
from rohrpost.shared.framing import PublishFramer
from rohrpost.shared.settings import Settings
from rohrpost.shared.topology import Topology, queue_depths
from tests.conftest import EventLog, WorkerThread, declare, wait_until
from tests.tcpproxy import TcpProxy


def mail(i: int = 0) -> dict[str, object]:
    return {
        "tenant": "acme",
        "app": "billing",
        "to": [f"r{i}@example.com"],
        "subject": f"#{i}",
        "text": "x",
    }


def close_connections(name: str) -> int:
    """Close, from the broker's side, every connection called ``name``; return how many."""
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    pids = [line.split("\t")[0] for line in listing.splitlines() if f'"{name}"' in line]
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pid, "test: connection lost"],
            check=True,
            capture_output=True,
            timeout=30,
        )
    return len(pids)


needs_rabbitmqctl = pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None, reason="closing connections needs a local rabbitmqctl"
)


def test_the_confirm_tracker_settles_returns_and_forgets_what_it_settled() -> None:
    tracker = ConfirmTracker()
    props = pika.BasicProperties(message_id="same", delivery_mode=2)
    pendings = [Pending(Publication("ex", f"k{i}", b"x", props), future=Future()) for i in range(3)]
    for pending in pendings:
        tracker.track(pending)
    tracker.returned("same", "312 NO_ROUTE")  # the first of the three came back
    tracker.confirmed(2, multiple=True, acked=True)
    tracker.confirmed(3, multiple=False, acked=False)
    with pytest.raises(NotConfirmed, match="no queue is bound"):
        pendings[0].future.result(timeout=0)  # type: ignore[union-attr]
    assert pendings[1].future.result(timeout=0) is None  # type: ignore[union-attr]
    with pytest.raises(NotConfirmed, match="nacked"):
        pendings[2].future.result(timeout=0)  # type: ignore[union-attr]
    assert len(tracker) == 0
    # nothing of a settled publish stays behind: a worker publishes millions
    assert tracker._by_message_id == {}


def test_the_publish_framer_writes_what_pika_decodes() -> None:
    framer = PublishFramer(channel_number=3, frame_max=4096)
    body = bytes(range(256)) * 40  # 10,240 bytes: three body frames of at most 4,088
    props = pika.BasicProperties(message_id="m1", delivery_mode=2, headers={"h": 1})
    data = framer.frames(Publication("ex", "acme.billing", body, props, mandatory=True))
    decoded, offset = [], 0
    while offset < len(data):
        consumed, value = frame.decode_frame(data[offset:])
        assert consumed > 0
        decoded.append(value)
        offset += consumed
    method, header, *bodies = decoded
    assert {f.channel_number for f in decoded} == {3}
    assert isinstance(method.method, spec.Basic.Publish)
    assert (method.method.exchange, method.method.routing_key) == ("ex", "acme.billing")
    assert method.method.mandatory is True
    assert header.body_size == len(body)
    assert header.properties.message_id == "m1"
    assert header.properties.headers == {"h": 1}
    assert [len(b.fragment) for b in bodies] == [4088, 4088, 2064]
    assert b"".join(b.fragment for b in bodies) == body
    # an empty body has no body frame
    empty = framer.frames(Publication("ex", "acme.billing", b"", props, mandatory=True))
    consumed, _ = frame.decode_frame(empty)
    consumed_header, header_frame = frame.decode_frame(empty[consumed:])
    assert header_frame.body_size == 0
    assert consumed + consumed_header == len(empty)


def _pika_frames(publication: Publication, channel: int, frame_max: int) -> bytes:
    """A publish as pika's own ``basic_publish`` frames it."""
    publish = spec.Basic.Publish(
        exchange=publication.exchange,
        routing_key=publication.routing_key,
        mandatory=publication.mandatory,
    )
    body, most = publication.body, frame_max - spec.FRAME_HEADER_SIZE - spec.FRAME_END_SIZE
    parts = [
        frame.Method(channel, publish).marshal(),
        frame.Header(channel, len(body), publication.properties).marshal(),
    ]
    parts += [frame.Body(channel, body[i : i + most]).marshal() for i in range(0, len(body), most)]
    return b"".join(parts)


def test_the_publish_framer_writes_pikas_bytes_for_every_shape_of_properties() -> None:
    """Headers made from a template are pika's, whatever the id, timestamp and body size."""
    framer = PublishFramer(channel_number=2, frame_max=4096)
    mail_id = str(uuid.uuid4())

    def mail(message_id: str | None, **extra: object) -> pika.BasicProperties:
        return pika.BasicProperties(
            content_type="application/json", delivery_mode=2, message_id=message_id, **extra
        )

    shapes = [
        *(mail(str(uuid.uuid4()), timestamp=1_700_000_000 + i, type="m") for i in range(3)),
        mail(str(uuid.uuid4())),  # no timestamp
        mail("short", timestamp=2**40),  # another id length
        mail(mail_id, correlation_id=mail_id, timestamp=5),  # the id twice in the header
        mail("grüße", timestamp=7),  # not ASCII: never templated
        mail(str(uuid.uuid4()), headers={"x-rohrpost-attempt": 2}, timestamp=9),  # a table
        mail(None, timestamp=3),
    ]
    for size in (0, 1, 637, 4088, 10_000):
        for properties in [*shapes, *shapes]:  # the second time from the templates
            publication = Publication("ex", "acme.billing", b"b" * size, properties)
            assert framer.frames(publication) == _pika_frames(publication, 2, 4096)


def test_batched_publishes_arrive_intact_and_in_order(broker_url: str, settings: Settings) -> None:
    """Frames of many publishes are joined into few writes; bodies above frame_max too."""
    topology = Topology.from_settings(settings)
    bodies = [f"small {i}".encode() for i in range(500)]
    bodies.insert(250, bytes(range(256)) * 2000)  # 512,000 bytes, several frames
    broker = Broker(broker_url, name="rohrpost-test")
    broker.start()
    try:
        batch = broker.publish_many(
            [
                Publication(
                    topology.submit_exchange,
                    topology.route_key("acme", "billing"),
                    body,
                    pika.BasicProperties(message_id=str(i), delivery_mode=2),
                )
                for i, body in enumerate(bodies)
            ]
        )
        assert batch.wait(30)
        assert batch.failures == []
    finally:
        broker.close()
    received = []
    with admin_channel(broker_url) as channel:
        while True:
            method, props, body = channel.basic_get(topology.send_queue("acme", "billing"))
            if method is None:
                break
            received.append((props.message_id, body))
            channel.basic_ack(method.delivery_tag)
    assert received == [(str(i), body) for i, body in enumerate(bodies)]


def test_a_publish_to_a_missing_exchange_fails_and_the_connection_recovers(
    broker_url: str, settings: Settings
) -> None:
    broker = Broker(broker_url, name="rohrpost-test")
    broker.start()
    try:
        props = pika.BasicProperties(message_id="m1", delivery_mode=2)
        missing = broker.publish(Publication("no-such-exchange-xyz", "k", b"x", props))
        with pytest.raises(TopologyMissing, match="no exchange 'no-such-exchange-xyz'"):
            missing.result(timeout=10)
        routed = broker.publish(
            Publication(f"{settings.namespace}.submit", "acme.billing", b"{}", props)
        )
        routed.result(timeout=20)
    finally:
        broker.close()


def test_an_unroutable_mandatory_publish_is_not_confirmed(
    broker_url: str, settings: Settings
) -> None:
    broker = Broker(broker_url, name="rohrpost-test")
    broker.start()
    try:
        props = pika.BasicProperties(message_id="m2", delivery_mode=2)
        future = broker.publish(
            Publication(f"{settings.namespace}.submit", "nobody.here", b"x", props)
        )
        with pytest.raises(NotConfirmed, match="no queue is bound"):
            future.result(timeout=10)
    finally:
        broker.close()


@needs_rabbitmqctl
def test_the_producer_reconnects_after_losing_its_connection(
    settings: Settings, catcher: MailCatcher, worker_thread: Callable[..., WorkerThread]
) -> None:
    worker_thread(settings)
    with Producer(settings) as producer:
        producer.submit(mail(0))
        assert close_connections(f"rohrpost-producer:{settings.namespace}") == 1
        producer.submit(mail(1))  # waits for the reconnect, then is confirmed
    catcher.wait_for(lambda got: len(got) == 2)


@needs_rabbitmqctl
def test_a_worker_keeps_consuming_after_losing_its_connection(
    settings: Settings, catcher: MailCatcher, worker_thread: Callable[..., WorkerThread]
) -> None:
    worker_thread(settings)
    with Producer(settings) as producer:
        producer.submit(mail(0))
        catcher.wait_for(lambda got: len(got) == 1)
        assert close_connections(f"rohrpost-worker:{settings.namespace}") == 1
        producer.submit(mail(1))
    catcher.wait_for(lambda got: len(got) == 2, timeout=30)


def test_every_delivery_keeps_its_sent_event_when_the_worker_loses_its_connection(
    broker_url: str,
    make_settings: Callable[..., Settings],
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
) -> None:
    settings = make_settings()
    declare(settings)
    event_log = EventLog(settings)
    catcher.latency = 0.002
    total = 300
    parts = urlsplit(broker_url)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:
        proxied = settings.model_copy(
            update={
                "broker_url": SecretStr(
                    parts._replace(
                        netloc=f"{parts.netloc.rpartition('@')[0]}@127.0.0.1:{proxy.port}"
                    ).geturl()
                )
            }
        )
        with Producer(settings) as producer:
            ids = producer.submit_many([mail(i) for i in range(total)])
        worker = worker_thread(proxied)
        for fraction in (0.2, 0.5):
            catcher.wait_for(lambda got, n=total * fraction: len(got) >= n, timeout=60)
            # The connection freezes as if the broker node died: the worker keeps sending
            # the mails it holds, and their `sent` events never reach the broker.
            proxy.freeze()
            time.sleep(0.3)
            proxy.drop()
        catcher.wait_for(lambda got: len({m.recipients for m in got}) == total, timeout=90)
        worker.stop()
    try:
        deliveries = Counter(
            m.parsed()["Message-ID"].split("@")[0].lstrip("<") for m in catcher.mails
        )
        assert set(deliveries) == {str(i) for i in ids}

        def sent_events() -> dict[str, set[uuid.UUID]]:
            by_mail: dict[str, set[uuid.UUID]] = defaultdict(set)
            for event in event_log.read():
                if event.kind == EventKind.SENT:
                    by_mail[str(event.mail_id)].add(event.event_id)
            return by_mail

        # Each SMTP delivery published its own `sent` event, and every one reached the
        # events exchange, also those whose batch was unconfirmed when the connection
        # was lost.
        wait_until(
            lambda: all(len(sent_events()[m]) >= n for m, n in deliveries.items()), timeout=30
        )
        assert {m: len(e) for m, e in sent_events().items()} == dict(deliveries)
    finally:
        event_log.delete()


def test_queues_an_earlier_version_declared_with_fewer_arguments_are_used_with_a_warning(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rohrpost")
    topology = Topology.from_settings(settings)
    old = [topology.history_queue, topology.dead_queue("acme", "billing")]
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        for name in old:
            channel.queue_delete(name)
            channel.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
        topology.declare(channel)  # no TopologyConflict
    warned = {
        r.queue: r.hint
        for r in caplog.records
        if r.getMessage().startswith("queue declared by an earlier version")
    }
    assert set(warned) == set(old)
    assert all("rabbitmqctl set_policy --apply-to queues" in h for h in warned.values())
    # everything after them was declared: a mail still reaches its send queue and history
    with Producer(settings) as producer:
        producer.submit(mail(0))
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        depth = queue_depths(channel, [topology.send_queue("acme", "billing"), old[0]])
    assert list(depth.values()) == [1, 1]


def test_a_send_queue_with_other_arguments_is_still_a_conflict(settings: Settings) -> None:
    topology = Topology.from_settings(settings)
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        channel.queue_delete(topology.send_queue("acme", "billing"))
        channel.queue_declare(topology.send_queue("acme", "billing"), durable=True)
        with pytest.raises(TopologyConflict, match=r"send\.acme\.billing"):
            topology.declare(channel)
