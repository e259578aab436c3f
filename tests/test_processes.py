"""Worker processes: killed with SIGKILL they lose nothing; SIGTERM finishes in-flight mails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import pytest
from pydantic import SecretStr
from sqlalchemy import make_url

from rohrpost.catcher import MailCatcher, free_port
from rohrpost.consumer.history import STOP_WAIT_SECONDS, WRITE_STALL_SECONDS, HistoryConsumer
from rohrpost.producer.client import Producer
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.settings import Settings
from rohrpost.shared.store import HistoryStore
from rohrpost.shared.topology import Topology
from tests.conftest import (
    declare,
    drain,
    get,
    postgres_database,
    rohrpost_command,
    stop_process,
    wait_until,
    write_config,
)
from tests.tcpproxy import TcpProxy, node_url


def mails(count: int) -> list[dict[str, object]]:
    return [
        {
            "tenant": "acme",
            "app": "billing",
            "to": [f"r{i}@example.com"],
            "subject": f"#{i}",
            "text": "hello",
        }
        for i in range(count)
    ]


def readyz(command: str, metrics_port: int) -> str:
    """The /readyz of a ``rohrpost`` process (a history consumer's is on metrics_port + 1)."""
    return f"http://127.0.0.1:{metrics_port + (command == 'history-consumer')}/readyz"


def message_ids(catcher: MailCatcher) -> list[str]:
    return [str(mail.parsed()["Message-ID"]) for mail in catcher.mails]


def test_a_worker_killed_with_sigkill_mid_run_loses_no_mail(
    make_settings: Callable[..., Settings], catcher: MailCatcher, tmp_path: Path
) -> None:
    settings = make_settings(prefetch=100, threads=4)
    declare(settings)
    config = write_config(settings, tmp_path / "rohrpost.toml")
    catcher.latency = 0.02
    with Producer(settings) as producer:
        ids = producer.submit_many(mails(200))
    worker = subprocess.Popen(rohrpost_command(config, "worker"), stderr=subprocess.DEVNULL)
    try:
        catcher.wait_for(lambda got: len(got) >= 20)
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    sent_before_kill = len(catcher.mails)
    assert sent_before_kill < 200, "the kill must hit while mails are in flight"

    restarted = subprocess.run(
        rohrpost_command(config, "worker", "--drain"),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert restarted.returncode == 0, restarted.stderr.decode()[-2000:]
    received = message_ids(catcher)
    missing = {f"<{mail_id}@acme.example>" for mail_id in ids} - set(received)
    assert not missing, f"{len(missing)} mails lost"
    # At least once: a mail sent but not yet acked at the kill may arrive twice.
    assert len(received) >= 200


def test_sigterm_finishes_in_flight_mails_and_exits_cleanly(
    make_settings: Callable[..., Settings], catcher: MailCatcher, tmp_path: Path
) -> None:
    settings = make_settings(prefetch=10, threads=2)
    declare(settings)
    config = write_config(settings, tmp_path / "rohrpost.toml")
    catcher.latency = 0.05
    with Producer(settings) as producer:
        producer.submit_many(mails(60))
    worker = subprocess.Popen(rohrpost_command(config, "worker"), stderr=subprocess.PIPE)
    catcher.wait_for(lambda got: len(got) >= 3)
    worker.send_signal(signal.SIGTERM)
    _, stderr = worker.communicate(timeout=30)
    assert worker.returncode == 0, stderr.decode()[-2000:]
    stopped = [json.loads(line) for line in stderr.splitlines() if b'"worker stopped"' in line]
    assert len(stopped) == 1
    sent = message_ids(catcher)
    assert len(sent) == len(set(sent)), "nothing was sent twice"
    # Every mail the worker had taken was sent before it exited.
    assert stopped[0]["received"] == len(sent)
    assert stopped[0]["in_flight"] == 0
    # The rest is still queued. Deliveries the broker had on the wire when the
    # consumer was cancelled are handed back by pika (basic.reject, requeue), so a few
    # may come back flagged as redelivered — at most one prefetch window.
    queue = Topology.from_settings(settings).send_queue("acme", "billing")
    left = []
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        while (got := channel.basic_get(queue, auto_ack=True))[0] is not None:
            left.append(got[0].redelivered)
    assert len(sent) + len(left) == 60
    assert sum(left) <= 10


def test_several_worker_processes_drain_the_queue_together(
    make_settings: Callable[..., Settings], catcher: MailCatcher, tmp_path: Path
) -> None:
    settings = make_settings()
    declare(settings)
    config = write_config(settings, tmp_path / "rohrpost.toml")
    with Producer(settings) as producer:
        ids = producer.submit_many(mails(100))
    result = subprocess.run(
        rohrpost_command(config, "worker", "--processes", "2", "--drain"),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert sorted(message_ids(catcher)) == sorted(f"<{i}@acme.example>" for i in ids)
    pids = {line for line in result.stderr.decode().splitlines() if '"worker started"' in line}
    assert len(pids) == 2, "two worker processes ran"


def test_a_worker_waits_for_a_broker_that_is_not_up_yet_and_then_sends(
    broker_url: str, make_settings: Callable[..., Settings], catcher: MailCatcher, tmp_path: Path
) -> None:
    settings = make_settings()
    declare(settings)
    port = free_port()
    parts = urlsplit(broker_url)
    later = node_url(broker_url, port)
    config = write_config(
        settings.model_copy(update={"broker_url": SecretStr(later)}), tmp_path / "rohrpost.toml"
    )
    worker = subprocess.Popen(rohrpost_command(config, "worker"), stderr=subprocess.PIPE, text=True)
    lines: list[dict[str, object]] = []
    try:
        assert worker.stderr is not None
        while len([x for x in lines if x.get("event") == "worker cannot start yet; retrying"]) < 2:
            lines.append(json.loads(worker.stderr.readline()))
        assert worker.poll() is None, "the worker waits instead of exiting"
        with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672, port=port):
            with Producer(settings) as producer:
                mail_id = producer.submit(mails(1)[0])
            catcher.wait_for(lambda got: len(got) == 1, timeout=60)
            worker.send_signal(signal.SIGTERM)
            _, rest = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, rest[-2000:]
    assert message_ids(catcher) == [f"<{mail_id}@acme.example>"]
    retries = [x for x in lines if x.get("event") == "worker cannot start yet; retrying"]
    assert [x["retry_in_seconds"] for x in retries] == [0.5, 1.0]
    assert "Traceback" not in rest and "exception" not in json.dumps(lines)


def test_a_child_that_cannot_start_is_restarted_with_growing_waits_and_no_tracebacks(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    topology = Topology.from_settings(settings)
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        # a classic queue where rohrpost declares a quorum queue: no worker can start
        channel.queue_declare(topology.send_queue("acme", "billing"), durable=True)
    config = write_config(settings, tmp_path / "rohrpost.toml")
    supervisor = subprocess.Popen(
        rohrpost_command(config, "worker", "--processes", "2"), stderr=subprocess.PIPE, text=True
    )
    died: list[dict[str, object]] = []
    try:
        assert supervisor.stderr is not None
        while len(died) < 6:
            line = json.loads(supervisor.stderr.readline())
            if line["event"] == "process died; restarting":
                died.append(line)
        supervisor.send_signal(signal.SIGTERM)
        _, rest = supervisor.communicate(timeout=30)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.communicate()
    assert "Traceback" not in rest
    for slot in {line["slot"] for line in died}:
        delays = [line["restart_in_seconds"] for line in died if line["slot"] == slot]
        assert delays == [1.0, 2.0, 4.0][: len(delays)]


@pytest.mark.parametrize("command", ["worker", "history-consumer"])
def test_sigterm_stops_a_process_whose_broker_stopped_answering(
    command: str,
    broker_url: str,
    make_settings: Callable[..., Settings],
    catcher: MailCatcher,
    tmp_path: Path,
) -> None:
    """A frozen link (a hung node, a dead network path) never answers the close: the
    process drops the connection after a few seconds instead of waiting for heartbeats
    (before: it hung in the interpreter's exit, the I/O thread waiting for a close-ok)."""
    parts = urlsplit(broker_url)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:
        proxied = node_url(broker_url, proxy.port)
        port = free_port()
        settings = make_settings(broker_url=proxied, metrics_port=port)
        declare(settings)
        config = write_config(settings, tmp_path / "rohrpost.toml")
        with Producer(settings) as producer:
            producer.submit(mails(1)[0])
        process = subprocess.Popen(
            rohrpost_command(config, command), stderr=subprocess.PIPE, text=True
        )
        try:
            ready = readyz(command, port)
            wait_until(lambda: get(ready)[0] == 200, timeout=60)
            if command == "worker":
                catcher.wait_for(lambda got: len(got) == 1, timeout=60)
            proxy.freeze()
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=90)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert process.returncode == 0, stderr[-2000:]
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert "the broker did not answer the close; dropping the connection" in events
    assert "Traceback" not in stderr


def _lines_until(stream: IO[str], event: str) -> list[dict[str, object]]:
    """JSON log lines read from ``stream`` up to the first whose event is ``event``."""
    lines: list[dict[str, object]] = []
    while not lines or lines[-1].get("event") != event:
        line = stream.readline()
        assert line, f"the process ended before logging {event!r}: {lines[-5:]}"
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


@pytest.mark.parametrize("processes", [1, 2])
def test_a_second_ctrl_c_stops_at_once_and_what_was_in_hand_is_sent_later(
    processes: int, make_settings: Callable[..., Settings], catcher: MailCatcher, tmp_path: Path
) -> None:
    """The first Ctrl-C finishes the mails in hand (a slow server: seconds each); the
    second cuts that short, as an operator at a terminal expects, and loses nothing."""
    catcher.latency = 3.0
    settings = make_settings(prefetch=6, threads=2)
    declare(settings)
    config = write_config(settings, tmp_path / "rohrpost.toml")
    with Producer(settings) as producer:
        ids = [producer.submit(mail) for mail in mails(6)]
    command = rohrpost_command(config, "worker", "--processes", str(processes))
    worker = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stderr is not None
        started = _lines_until(worker.stderr, "worker started")
        children = [int(str(x["pid"])) for x in started if x["event"] == "process started"]
        assert len(children) == (processes if processes > 1 else 0)
        catcher.wait_for(lambda got: len(got) >= 1, timeout=60)  # sending, 3 s a mail
        worker.send_signal(signal.SIGINT)  # only the process named: no terminal's group
        _lines_until(
            worker.stderr,
            "stopping; Ctrl-C again stops at once, unfinished mails back to the queue",
        )
        worker.send_signal(signal.SIGINT)
        _, rest = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 128 + signal.SIGINT
    assert "second Ctrl-C: stopping at once" in rest
    assert '"worker stopped"' not in rest  # it did not wait for the slow server
    for pid in children:  # the supervisor killed its children before it went

        def gone(pid: int = pid) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        assert wait_until(gone, timeout=30)
    catcher.latency = 0.0
    drain(settings)  # another worker: the mails the first one held were not lost
    assert {f"<{i}@acme.example>" for i in ids} <= set(message_ids(catcher))


@pytest.mark.timeout(300)
def test_a_history_consumer_whose_store_stopped_answering_says_so_and_stops_on_sigterm(
    make_settings: Callable[..., Settings], postgres_url: str, tmp_path: Path
) -> None:
    """PostgreSQL behind a frozen link (or a server that hangs: its kernel still answers
    keepalives): a write never returns. /readyz says so, and SIGTERM leaves the batch
    unacknowledged within seconds (before: ready throughout, and no exit at all, the
    writer thread joined at exit). Nothing is lost: the next consumer archives it."""
    with postgres_database(postgres_url) as database:
        url = make_url(database)
        with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
            proxied = url.set(host="127.0.0.1", port=proxy.port)
            port = free_port()
            settings = make_settings(
                store_url=proxied.render_as_string(hide_password=False), metrics_port=port
            )
            declare(settings)
            config = write_config(settings, tmp_path / "rohrpost.toml")
            process = subprocess.Popen(
                rohrpost_command(config, "history-consumer"),
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            ready = readyz("history-consumer", port)
            try:
                wait_until(lambda: get(ready)[0] == 200, timeout=60)
                store = HistoryStore.open(database)
                with Producer(settings) as producer:
                    first = producer.submit(mails(1)[0])
                    wait_until(lambda: store.mail(first), timeout=60)
                    proxy.freeze()
                    second = producer.submit(mails(1)[0])
                _, body = wait_until(
                    lambda: (answer := get(ready))[0] == 503 and answer,
                    timeout=WRITE_STALL_SECONDS + 60,
                )
                assert "history store: a write has not returned for" in body
                started = time.monotonic()
                _, stderr = stop_process(process, timeout=90)
                took = time.monotonic() - started
            finally:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.communicate()
        assert process.returncode == 0, stderr[-2000:]
        # the write's grace, then the broker's close
        assert took < STOP_WAIT_SECONDS + 30, took
        events = [json.loads(line)["event"] for line in stderr.splitlines() if line[:1] == "{"]
        assert any(event.startswith("the history store did not finish") for event in events)
        assert "Traceback" not in stderr
        # The proxy is gone; the batch waited in the history queue for the next consumer.
        HistoryConsumer(settings.model_copy(update={"store_url": SecretStr(database)})).run(
            drain=True
        )
        try:
            assert store.mail(second) is not None
        finally:
            store.close()


@pytest.mark.parametrize("command", ["worker", "history-consumer"])
def test_readyz_says_why_the_broker_connection_is_gone(
    command: str, broker_url: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """An operator reading /readyz learns the cause (here: nothing listens any more;
    as well a user refused, a vhost deleted), not just "not connected"."""
    parts = urlsplit(broker_url)
    port = free_port()
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:
        proxied = node_url(broker_url, proxy.port)
        settings = make_settings(broker_url=proxied, metrics_port=port)
        declare(settings)
        config = write_config(settings, tmp_path / "rohrpost.toml")
        process = subprocess.Popen(
            rohrpost_command(config, command), stderr=subprocess.PIPE, text=True
        )
        try:
            ready = readyz(command, port)
            wait_until(lambda: get(ready)[0] == 200, timeout=60)
            proxy.kill()  # the node is gone: connections dropped, new ones refused
            _, body = wait_until(
                lambda: (answer := get(ready))[0] == 503 and "refused" in answer[1] and answer,
                timeout=60,
            )
        finally:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=60)
    assert body.startswith("not ready: not connected to the broker: cannot reach RabbitMQ at ")
    assert "Connection refused" in body and "***" in body  # the URL without its password
