"""Broker failover: every client connects to the first node that answers and moves on
to another when its node dies, publishing again what was unconfirmed.

The "nodes" are TCP proxies in front of the one test broker: a proxy that is killed
drops its connections and refuses new ones, as a dead node does. The real three-node
cluster, with nodes killed by SIGKILL, is `python -m bench cluster` (README).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pika
import pytest

from rohrpost.catcher import MailCatcher, free_port
from rohrpost.consumer.history import HistoryConsumer
from rohrpost.producer.client import Producer
from rohrpost.shared.broker import Broker, Publication, admin_channel
from rohrpost.shared.errors import BrokerUnavailable, NotConfirmed
from rohrpost.shared.events import EventKind
from rohrpost.shared.settings import Settings, redact_url
from rohrpost.shared.store import HistoryStore, MailFilter
from rohrpost.shared.topology import Topology
from tests.conftest import EventLog, WorkerThread, rohrpost_command, wait_until, write_config
from tests.tcpproxy import TcpProxy, node_url


def mail(i: int) -> dict[str, object]:
    return {
        "tenant": "acme",
        "app": "billing",
        "to": [f"r{i}@example.com"],
        "subject": f"#{i}",
        "text": "x",
    }


def password_shown(text: str, url: str) -> bool:
    password = urlsplit(url).password
    return password is not None and f":{password}@" in text


@pytest.fixture
def nodes(broker_url: str) -> Iterator[tuple[TcpProxy, TcpProxy]]:
    """Two "nodes": proxies to the test broker, each of which can be killed."""
    parts = urlsplit(broker_url)
    target = (parts.hostname or "127.0.0.1", parts.port or 5672)
    with TcpProxy(*target) as first, TcpProxy(*target) as second:
        yield first, second


def urls(broker_url: str, *proxies: TcpProxy) -> list[str]:
    return [node_url(broker_url, proxy.port) for proxy in proxies]


def refused(broker_url: str) -> str:
    """The URL of a node that refuses connections (nothing listens on its port)."""
    return node_url(broker_url, free_port())


# -- connecting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dead_first", "level"),
    [(0, logging.DEBUG), (1, logging.INFO), (2, logging.INFO)],
    ids=["first answers", "first dead", "two dead"],
)
def test_a_broker_connects_to_the_first_node_that_answers_and_says_which(
    broker_url: str,
    nodes: tuple[TcpProxy, TcpProxy],
    caplog: pytest.LogCaptureFixture,
    dead_first: int,
    level: int,
) -> None:
    caplog.set_level(logging.DEBUG, logger="rohrpost")
    dead = [refused(broker_url) for _ in range(dead_first)]
    first, second = urls(broker_url, *nodes)
    broker = Broker(",".join([*dead, first, second]), name="rohrpost-test")
    broker.start()
    try:
        assert broker.node == redact_url(first)
        assert (nodes[0].connections, nodes[1].connections) == (1, 0)
    finally:
        broker.close()
    [line] = [r for r in caplog.records if r.getMessage() == "connected to broker"]
    assert line.levelno == level  # INFO when a node had to be skipped
    assert line.node == redact_url(first)
    assert all(redact_url(url) in line.unreachable for url in dead)
    assert not any(password_shown(str(vars(record)), broker_url) for record in caplog.records)


def test_the_admin_channel_uses_the_first_node_that_answers(
    broker_url: str, nodes: tuple[TcpProxy, TcpProxy], settings: Settings
) -> None:
    first, _ = urls(broker_url, *nodes)
    with admin_channel(f"{refused(broker_url)},{first}", timeout=3) as channel:
        channel.queue_declare(Topology.from_settings(settings).history_queue, passive=True)
    assert nodes[0].connections == 1


def _start_broker(url: str) -> None:
    broker = Broker(url, name="rohrpost-test")
    broker.start()
    broker.close()


def _open_admin_channel(url: str) -> None:
    with admin_channel(url, timeout=3):
        pass


@pytest.mark.parametrize("connect", [_start_broker, _open_admin_channel])
@pytest.mark.parametrize("count", [1, 3])
def test_when_no_node_answers_the_error_names_each_without_its_password(
    broker_url: str, connect: Callable[[str], None], count: int
) -> None:
    dead = [refused(broker_url) for _ in range(count)]
    with pytest.raises(BrokerUnavailable) as caught:
        connect(",".join(dead))
    message = str(caught.value)
    assert all(redact_url(url) in message for url in dead)
    assert not password_shown(message, broker_url)


# -- failing over ----------------------------------------------------------------------


def test_publishes_unconfirmed_when_the_node_dies_are_confirmed_by_the_next_node(
    broker_url: str, nodes: tuple[TcpProxy, TcpProxy], settings: Settings
) -> None:
    topology = Topology.from_settings(settings)
    first, second = urls(broker_url, *nodes)
    broker = Broker(f"{first},{second}", name="rohrpost-test")  # republishes, as producers do
    broker.start()
    try:
        nodes[0].freeze()  # the node stops answering: nothing published now is confirmed
        futures = [
            broker.publish(
                Publication(
                    topology.submit_exchange,
                    topology.route_key("acme", "billing"),
                    json.dumps(mail(i)).encode(),
                    pika.BasicProperties(message_id=str(i), delivery_mode=2),
                )
            )
            for i in range(50)
        ]
        assert not any(future.done() for future in futures)
        nodes[0].kill()
        for future in futures:
            future.result(timeout=30)
        assert broker.node == redact_url(second)
    finally:
        broker.close()
    queued = Counter[str]()
    with admin_channel(broker_url) as channel:
        while (got := channel.basic_get(topology.send_queue("acme", "billing"), auto_ack=True))[0]:
            queued[got[1].message_id] += 1
    assert set(queued) == {str(i) for i in range(50)}


def test_the_producer_submits_through_another_node_once_its_node_died(
    broker_url: str,
    nodes: tuple[TcpProxy, TcpProxy],
    *,
    settings: Settings,
    make_settings: Callable[..., Settings],
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
) -> None:
    worker_thread(settings)
    across = make_settings(broker_url=urls(broker_url, *nodes))
    with Producer(across) as producer:
        before = producer.submit(mail(0))
        nodes[0].kill()
        after = producer.submit(mail(1))
    catcher.wait_for(lambda got: len(got) == 2)
    sent = {m.parsed()["Message-ID"].split("@")[0].lstrip("<") for m in catcher.mails}
    assert sent == {str(before), str(after)}
    assert nodes[1].connections == 1


def test_a_worker_fails_over_sends_every_mail_once_and_keeps_every_sent_event(
    broker_url: str,
    nodes: tuple[TcpProxy, TcpProxy],
    *,
    settings: Settings,
    make_settings: Callable[..., Settings],
    event_log: EventLog,
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="rohrpost")
    total = 200
    catcher.latency = 0.002
    with Producer(settings) as producer:
        ids = producer.submit_many([mail(i) for i in range(total)])
    first, second = urls(broker_url, *nodes)
    worker = worker_thread(make_settings(broker_url=[first, second]))
    catcher.wait_for(lambda got: len(got) >= total // 4, timeout=60)
    nodes[0].freeze()  # the worker keeps sending what it holds; acks and events go nowhere
    frozen_at = len(catcher.mails)
    wait_until(lambda: len(catcher.mails) > frozen_at)
    nodes[0].kill()
    catcher.wait_for(lambda got: len({m.recipients for m in got}) == total, timeout=90)
    worker.stop()
    deliveries = Counter(m.parsed()["Message-ID"].split("@")[0].lstrip("<") for m in catcher.mails)
    assert set(deliveries) == {str(i) for i in ids}
    # the send claims in Redis drop the copies the broker redelivered after the failover
    assert max(deliveries.values()) == 1
    sent = wait_until(
        lambda: (
            found
            if len(found := {e.mail_id for e in event_log.read() if e.kind == EventKind.SENT})
            == total
            else None
        ),
        timeout=30,
    )
    assert sent == set(ids)
    started = [r for r in caplog.records if r.getMessage() == "worker started"]
    assert [r.node for r in started] == [redact_url(first)]
    assert any(
        r.getMessage() == "connected to broker" and r.node == redact_url(second)
        for r in caplog.records
    )


def test_the_history_consumer_fails_over_and_archives_every_mail(
    broker_url: str,
    nodes: tuple[TcpProxy, TcpProxy],
    settings: Settings,
    make_settings: Callable[..., Settings],
) -> None:
    across = make_settings(broker_url=urls(broker_url, *nodes))
    store = HistoryStore.open(settings.store_url.get_secret_value(), migrate_schema=True)
    consumer = HistoryConsumer(across, store)

    def stored() -> int:
        return len(store.list_mails(MailFilter(limit=1000)))

    thread = threading.Thread(target=consumer.run)
    thread.start()
    try:
        with Producer(settings) as producer:
            producer.submit_many([mail(i) for i in range(50)])
            wait_until(lambda: stored() == 50, timeout=30)
            nodes[0].kill()
            producer.submit_many([mail(i) for i in range(50, 100)])
        wait_until(lambda: stored() == 100, timeout=60)
    finally:
        consumer.stop()
        thread.join(30)
        store.close()
    assert nodes[1].connections >= 1


# -- operator tools and the command line -----------------------------------------------


@pytest.mark.parametrize("form", ["comma-separated", "JSON array"])
def test_commands_read_a_node_list_from_the_environment_and_skip_a_dead_node(
    broker_url: str, settings: Settings, tmp_path: Path, form: str
) -> None:
    addresses = [refused(broker_url), broker_url]
    value = ",".join(addresses) if form == "comma-separated" else json.dumps(addresses)
    config = write_config(settings, tmp_path / "rohrpost.toml")
    env = {**os.environ, "ROHRPOST_BROKER_URL": value}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            rohrpost_command(config, *argv),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )

    submitted = run(
        "submit", "--tenant", "acme", "--app", "billing", "--to", "a@example.com",
        "--subject", "s", "--text", "t",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    uuid.UUID(submitted.stdout.strip())
    for argv in (("dlq", "list"), ("pause", "acme"), ("resume", "acme")):
        result = run(*argv)
        assert result.returncode == 0, (argv, result.stderr)
    assert not password_shown(submitted.stderr, broker_url)


# -- nacks -----------------------------------------------------------------------------


@pytest.fixture
def full_queue(broker_url: str, namespace: str) -> Iterator[str]:
    """A quorum queue over its length limit: the broker nacks what is published to it."""
    name = f"{namespace}.full"
    with admin_channel(broker_url) as channel:
        arguments = {"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "reject-publish"}
        channel.queue_declare(name, durable=True, arguments=arguments)
        channel.confirm_delivery()
        for body in (b"first", b"second"):  # a quorum queue refuses once over its limit
            channel.basic_publish("", name, body, pika.BasicProperties(delivery_mode=2))
    yield name
    with admin_channel(broker_url) as channel:
        channel.queue_delete(name)


def _to(queue: str, body: bytes, *, republish: bool = False) -> Publication:
    properties = pika.BasicProperties(message_id=body.decode(), delivery_mode=2)
    return Publication("", queue, body, properties, republish=republish)


def test_a_producer_publishes_a_nacked_message_again_until_the_queue_takes_it(
    broker_url: str, full_queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="rohrpost.shared.broker")
    broker = Broker(broker_url, name="rohrpost-test")  # republishes, as producers do
    broker.start()
    try:
        future = broker.publish(_to(full_queue, b"third"))
        wait_until(lambda: "broker nacked a publish; publishing it again" in caplog.messages)
        with admin_channel(broker_url) as channel:  # the queue takes messages again
            channel.queue_purge(full_queue)
        future.result(timeout=30)
    finally:
        broker.close()
    with admin_channel(broker_url) as channel:
        assert channel.basic_get(full_queue, auto_ack=True)[2] == b"third"


@pytest.mark.parametrize(
    ("republish_all", "republish_this", "expected"),
    [
        (False, False, r"nacked the publish to  \([^)]*\): a queue it"),  # a worker's move
        (False, True, "nacked the publish to  .* 5 times: a queue it"),  # a worker's event batch
        (True, False, "nacked the publish to  .* 5 times: a queue it"),  # a producer's mail
    ],
)
def test_a_nacked_publish_is_published_again_at_most_four_times_where_that_is_safe(
    broker_url: str, full_queue: str, republish_all: bool, republish_this: bool, expected: str
) -> None:
    broker = Broker(broker_url, name="rohrpost-test", republish=republish_all)
    broker.start()
    try:
        future = broker.publish(_to(full_queue, b"third", republish=republish_this))
        with pytest.raises(NotConfirmed, match=expected):
            future.result(timeout=30)
    finally:
        broker.close()
