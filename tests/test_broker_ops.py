"""What happens on the broker while rohrpost runs: resource alarms, deleted queues.

The alarms are raised on a RabbitMQ node of the test's own (``tests.ownnode``), never
on the shared broker; queues are deleted in the test's own namespace.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pika.exceptions
import pytest

from rohrpost.catcher import MailCatcher
from rohrpost.producer.client import Producer, SubmitManyError
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.errors import NotConfirmed
from rohrpost.shared.settings import Settings
from rohrpost.shared.topology import Topology, queue_depths
from tests.conftest import (
    WorkerThread,
    dead_letters,
    declare,
    get,
    rohrpost_command,
    stop_process,
    wait_until,
    write_config,
)
from tests.ownnode import OwnNode, own_node, why_not


def mail(i: int = 0, to: str = "") -> dict[str, object]:
    return {
        "tenant": "acme",
        "app": "billing",
        "to": [to or f"r{i}@example.com"],
        "subject": f"#{i}",
        "text": "x",
    }


def depth(settings: Settings, queue: str) -> int | None:
    """Messages ready in ``queue``; None when it does not exist."""
    try:
        with admin_channel(settings.broker_url.get_secret_value()) as channel:
            return queue_depths(channel, [queue])[queue]
    except pika.exceptions.ChannelClosedByBroker:
        return None


# -- queues deleted while the processes run (the shared broker, this test's namespace) --


def test_a_worker_declares_and_consumes_its_send_queue_again_after_it_was_deleted(
    settings: Settings, worker_thread: Callable[..., WorkerThread], catcher: MailCatcher
) -> None:
    handle = worker_thread(settings)
    wait_until(lambda: handle.worker.readiness() is None)
    queue = Topology.from_settings(settings).send_queue("acme", "billing")
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        channel.queue_delete(queue)
    # it says why it is not ready, then repairs the topology by itself
    wait_until(lambda: handle.worker.readiness() is None and depth(settings, queue) == 0)
    with Producer(settings) as producer:
        producer.submit(mail(1))
    catcher.wait_for(lambda mails: len(mails) == 1, timeout=60)


def test_a_dead_letter_reaches_its_queue_after_an_operator_deleted_it(
    settings: Settings, worker_thread: Callable[..., WorkerThread], catcher: MailCatcher
) -> None:
    catcher.always("gone@example.com", "550 5.1.1 no such user", stage="rcpt")
    handle = worker_thread(settings)
    wait_until(lambda: handle.worker.readiness() is None)
    dead = Topology.from_settings(settings).dead_queue("acme", "billing")
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        channel.queue_delete(dead)
    with Producer(settings) as producer:
        producer.submit(mail(to="gone@example.com"))
    letters = wait_until(lambda: depth(settings, dead) and dead_letters(settings), timeout=90)
    assert len(letters) == 1
    # not straight back into the server again and again while the queue was missing
    assert len(catcher.attempts) <= 3


# -- resource alarms (a node of the test's own) ----------------------------------------------


@pytest.fixture(scope="module")
def node() -> Iterator[OwnNode]:
    reason = why_not()
    if reason is not None:
        pytest.skip(reason)
    with own_node() as started:
        yield started


@pytest.fixture
def alarm(node: OwnNode) -> Iterator[Callable[[bool], None]]:
    """``alarm(True)`` raises the node's memory alarm, ``alarm(False)`` clears it."""

    def switch(on: bool) -> None:
        node.ctl("set_vm_memory_high_watermark", "0.0001" if on else "0.4")

    yield switch
    switch(False)


@pytest.fixture
def node_settings(node: OwnNode, make_settings: Callable[..., Settings]) -> Iterator[Settings]:
    settings = make_settings(broker_url=node.url, publish_timeout="3s")
    declare(settings)
    yield settings
    with admin_channel(node.url) as channel:
        Topology.from_settings(settings).delete(channel)


pytestmark = pytest.mark.xdist_group("own-rabbitmq-node")


def test_a_submit_under_a_memory_alarm_fails_naming_it_and_publishes_nothing_more(
    node_settings: Settings, alarm: Callable[[bool], None]
) -> None:
    queue = Topology.from_settings(node_settings).send_queue("acme", "billing")
    with Producer(node_settings) as producer:
        alarm(True)
        # RabbitMQ says it blocks a connection only once it published during the alarm
        with pytest.raises(NotConfirmed) as first:
            producer.submit(mail(1))
        with pytest.raises(NotConfirmed) as second:
            producer.submit(mail(2))
        with pytest.raises(SubmitManyError) as many:
            producer.submit_many([mail(i) for i in range(10)])
        alarm(False)
        wait_until(lambda: producer._require_broker().blocked is None)
        time.sleep(1)  # anything held back would be published now
        assert depth(node_settings, queue) == 1  # the first, written before the broker said so
        producer.submit(mail(3))  # and it submits again
    assert "RabbitMQ blocks publishing (low on memory" in str(first.value)
    assert "may or may not be queued" in str(first.value)
    text = str(second.value)
    assert "not submitted: RabbitMQ blocks publishing (low on memory" in text
    assert "nothing was published" in text
    assert "none of them was published" in str(many.value)
    assert many.value.submitted == []
    assert depth(node_settings, queue) == 2


@pytest.fixture
def slow(
    node: OwnNode, make_settings: Callable[..., Settings]
) -> Iterator[tuple[Settings, MailCatcher]]:
    """Settings for the own node whose SMTP server takes 0.3 s a mail: mails are in flight."""
    with MailCatcher(latency=0.3) as slow:
        settings = make_settings(
            broker_url=node.url, smtp={"catcher": {"port": slow.port}}, threads=2, prefetch=4
        )
        declare(settings)
        yield settings, slow
        with admin_channel(node.url) as channel:
            Topology.from_settings(settings).delete(channel)


def test_a_worker_stops_taking_mails_under_an_alarm_says_so_and_resumes_after_it(
    slow: tuple[Settings, MailCatcher],
    alarm: Callable[[bool], None],
    worker_thread: Callable[..., WorkerThread],
) -> None:
    slow_settings, catcher = slow
    handle = worker_thread(slow_settings)
    wait_until(lambda: handle.worker.readiness() is None)
    with Producer(slow_settings) as producer:
        producer.submit_many([mail(i) for i in range(40)])
    catcher.wait_for(lambda mails: len(mails) >= 4, timeout=60)
    alarm(True)
    reason = wait_until(handle.worker.readiness)
    assert "RabbitMQ blocks publishing (low on memory" in reason
    assert handle.worker.metrics.broker_blocked._value.get() == 1
    time.sleep(3)  # what it held is finished; then nothing more is taken
    held = len(catcher.mails)
    time.sleep(3)
    assert len(catcher.mails) == held < 40
    alarm(False)
    wait_until(lambda: handle.worker.readiness() is None)
    assert handle.worker.metrics.broker_blocked._value.get() == 0
    catcher.wait_for(lambda mails: len(mails) == 40, timeout=120)
    time.sleep(2)
    assert sorted(m.recipients[0] for m in catcher.mails) == sorted(
        f"r{i}@example.com" for i in range(40)
    )


def test_rohrpost_run_under_an_alarm_is_not_ready_and_ends_on_sigterm(
    slow: tuple[Settings, MailCatcher], alarm: Callable[[bool], None], tmp_path: Path
) -> None:
    from rohrpost.catcher import free_port

    slow_settings, catcher = slow
    port = free_port()
    config = write_config(
        slow_settings.model_copy(update={"metrics_port": port}), tmp_path / "c.toml"
    )
    with Producer(slow_settings) as producer:
        producer.submit_many([mail(i) for i in range(200)])
    process = subprocess.Popen(
        rohrpost_command(config, "run"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        catcher.wait_for(lambda mails: len(mails) >= 4, timeout=90)
        alarm(True)
        _status, body = wait_until(
            lambda: (r := get(f"http://127.0.0.1:{port}/readyz"))[0] == 503 and r, timeout=60
        )
        assert "processes ready" in body  # the children say why in their log
        metrics = get(f"http://127.0.0.1:{port}/metrics")[1]
        assert "rohrpost_broker_blocked{" in metrics
        started = time.monotonic()
    finally:
        _, stderr = stop_process(process, timeout=120)
    took = time.monotonic() - started
    assert process.returncode == 0, stderr[-2000:]
    # publish_timeout (20 s in the tests) for the last outcomes, then the dropped close
    assert took < 60, took
    assert "the broker blocks publishing" in stderr


def test_dead_letters_are_refused_not_dropped_by_a_full_dead_letter_queue(
    node: OwnNode,
    node_settings: Settings,
    worker_thread: Callable[..., WorkerThread],
    catcher: MailCatcher,
) -> None:
    catcher.always("gone@example.com", "550 5.1.1 no such user", stage="rcpt")
    namespace = node_settings.namespace
    # an operator's policy: a length limit, and no overflow (RabbitMQ drops the oldest)
    node.ctl(
        "set_policy",
        "--apply-to",
        "queues",
        f"{namespace}-len",
        rf"^{namespace}\.dead\.",
        '{"max-length": 1}',
    )
    try:
        handle = worker_thread(node_settings)
        wait_until(lambda: handle.worker.readiness() is None)
        with Producer(node_settings) as producer:
            for i in range(4):
                producer.submit(mail(i, to="gone@example.com"))
        time.sleep(10)  # more than the queue takes: it refuses, the worker keeps them
        found: list[object] = []
        wait_until(lambda: found.extend(dead_letters(node_settings)) or len(found) >= 4, 90)
        assert len(found) == 4
    finally:
        node.ctl("clear_policy", f"{namespace}-len")


def test_a_producer_closes_at_once_while_the_broker_blocks_it(
    node_settings: Settings, alarm: Callable[[bool], None]
) -> None:
    producer = Producer(node_settings).connect()
    alarm(True)
    with pytest.raises(NotConfirmed, match="RabbitMQ blocks publishing"):
        producer.submit(mail(1))  # publish_timeout 3 s
    started = time.monotonic()
    producer.close()  # no confirm and no close-ok come from a blocked connection
    took = time.monotonic() - started
    # before: 10 s waiting for the confirm, then 5 s for the close handshake
    assert took < 10, took
