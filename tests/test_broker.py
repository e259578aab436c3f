"""The broker connection: confirms, topology errors, and recovery from a lost connection."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import pika
import pytest

from producer.client import Producer
from rohrpost.catcher import MailCatcher
from shared.broker import Broker, Publication
from shared.errors import NotConfirmed, TopologyMissing
from shared.settings import Settings
from tests.conftest import WorkerThread


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
