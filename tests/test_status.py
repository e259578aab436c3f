"""``rohrpost status``: the figures of real queues with known contents, and of the history."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rohrpost.producer.client import Producer
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.events import EventKind, MailEvent
from rohrpost.shared.settings import Settings
from rohrpost.shared.store import HistoryRecord
from rohrpost.shared.topology import Topology
from tests.conftest import declare, publish_raw, rohrpost_command, wait_until, write_config
from tests.test_operators import GLOBEX, archive, cli, fill_dead_letters, mail

NEWS = {"news": {"smtp": "catcher", "sender": "news@acme.example", "enabled": False}}


def management_answers(settings: Settings) -> bool:
    request = urllib.request.Request("http://127.0.0.1:15672/api/overview")
    request.add_unredirected_header("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")  # guest:guest
    try:
        with urllib.request.urlopen(request, timeout=3):
            return True
    except OSError:
        return False


@pytest.fixture
def installation(make_settings: Callable[..., Settings]) -> Settings:
    """acme/billing, a disabled acme/news, and globex/shop."""
    settings = make_settings(tenants={**GLOBEX, "acme": {"apps": NEWS}}, max_delay="2h")
    declare(settings)
    return settings


@pytest.fixture
def config(installation: Settings, tmp_path: Path) -> Path:
    return write_config(installation, tmp_path / "rohrpost.toml")


@pytest.fixture
def holding(installation: Settings) -> Iterator[Callable[[str, int], None]]:
    """Take messages from a send queue and keep them unacked (as a busy worker does)."""
    opened: list[Any] = []

    def hold(queue: str, count: int) -> None:
        context = admin_channel(installation.broker_url.get_secret_value())
        channel = context.__enter__()
        opened.append(context)
        channel.basic_qos(prefetch_count=count)
        received: list[int] = []
        channel.basic_consume(queue, lambda *a: received.append(1), auto_ack=False)
        while len(received) < count:
            channel.connection.process_data_events(time_limit=0.5)

    yield hold
    for context in opened:
        context.__exit__(None, None, None)


def event(kind: EventKind, mail_id: uuid.UUID, at: datetime, **fields: Any) -> HistoryRecord:
    return HistoryRecord(
        MailEvent(kind=kind, mail_id=mail_id, tenant="acme", app="billing", at=at, **fields)
    )


def test_status_json_shows_what_the_queues_and_the_history_hold(
    installation: Settings,
    config: Path,
    holding: Callable[[str, int], None],
) -> None:
    if not management_answers(installation):
        pytest.skip("in flight needs RabbitMQ's management API on 127.0.0.1:15672")
    settings = installation
    topology = Topology.from_settings(settings)
    now = datetime.now(UTC)
    with Producer(settings) as producer:
        # due, waiting since 7 minutes, 100 minutes and now
        waiting = [
            producer.submit(mail(f"w{age}@example.com", created_at=(now - age).isoformat()))
            for age in (timedelta(minutes=7), timedelta(minutes=100), timedelta(0))
        ]
        producer.submit(
            mail("later@example.com", not_before=(now + timedelta(hours=1)).isoformat())
        )
        for i in range(2):
            producer.submit({**mail(f"g{i}@example.com"), "tenant": "globex", "app": "shop"})
    fill_dead_letters(settings, "acme", "billing", 2)
    held = topology.held_queue("acme", "billing")
    publish_raw(settings, held, json.dumps(mail("held@example.com")).encode())
    cli(config, "pause", "globex")
    store = archive(settings)
    # what the workers did, as the history records it
    store.write(
        [
            event(EventKind.ATTEMPT_FAILED, waiting[0], now - timedelta(minutes=20), attempt=1),
            *[
                event(EventKind.SENT, uuid.uuid4(), now - ago, attempt=1)
                for ago in (timedelta(minutes=30), timedelta(minutes=31), timedelta(hours=5))
            ],
            event(EventKind.DEAD_LETTERED, uuid.uuid4(), now - timedelta(minutes=10), reason="x"),
        ]
    )
    store.close()
    holding(topology.send_queue("globex", "shop"), 2)

    def shown() -> dict[str, Any]:
        return json.loads(cli(config, "status", "--json").stdout)

    overview = wait_until(lambda: (o := shown())["total"]["in_flight"] == 2 and o, timeout=30)
    routes = {f"{r['tenant']}/{r['app']}": r for r in overview["routes"]}
    billing, news, shop = routes["acme/billing"], routes["acme/news"], routes["globex/shop"]
    assert {k: billing[k] for k in ("ready", "in_flight", "consumers", "held")} == {
        "ready": 3,
        "in_flight": 0,
        "consumers": 0,
        "held": 1,
    }
    assert (billing["dead_lettered"], billing["scheduled"], billing["retrying"]) == (2, 1, 1)
    assert billing["waiting_by_age"] == {
        "0-5m": 1,
        "5-10m": 1,
        "10-20m": 0,
        "20-40m": 0,
        "40-80m": 0,
        "80-160m": 1,
        "160m+": 0,
    }
    assert 6000 <= billing["oldest_waiting_seconds"] < 6300
    assert billing["last_hour"] == {"sent": 2, "retried": 1, "dead_lettered": 1}
    assert billing["last_day"] == {"sent": 3, "retried": 1, "dead_lettered": 1}
    assert (billing["enabled"], billing["paused"], billing["smtp"]) == (True, False, "catcher")
    assert {k: shop[k] for k in ("ready", "in_flight", "consumers", "paused")} == {
        "ready": 0,
        "in_flight": 2,
        "consumers": 1,
        "paused": True,
    }
    assert (news["enabled"], news["ready"], news["held"]) == (False, None, None)
    total = overview["total"]
    assert (total["ready"], total["in_flight"], total["held"], total["dead_lettered"]) == (
        3,
        2,
        1,
        2,
    )
    assert total["waiting_by_age"]["0-5m"] == 3  # billing's youngest and globex's two
    assert overview["delay_levels"] == {
        "queues": len(topology.delay_queues()),
        "messages": 1,
        "consumers": None,
        "in_flight": None,
    }
    assert overview["history_queue"]["messages"] == 0
    assert (overview["broker"], overview["management"], overview["history"]) == (None, None, None)

    table = cli(config, "status").stdout
    line = next(row for row in table.splitlines() if row.startswith("acme/billing")).split()
    assert line[:10] == ["acme/billing", "catcher", "active", "3", "0", "0", "1", "1", "1", "2"]
    assert line[10] == "1h" and line[11].endswith("m")  # the oldest: 1h 40m and counting
    assert line[12:] == ["2", "3", "1", "1"]
    assert next(r for r in table.splitlines() if r.startswith("globex/shop")).split()[2] == "paused"
    assert "acme/news                 catcher     disabled" in table


def test_status_says_which_figures_are_unknown_and_why(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(
        management_url="http://guest:guest@127.0.0.1:1",
        store_url=f"sqlite:///{tmp_path / 'nowhere.db'}",
    )
    declare(settings)
    config = write_config(settings, tmp_path / "rohrpost.toml")
    result = cli(config, "status")
    assert result.returncode == 0, result.stderr
    line = next(row for row in result.stdout.splitlines() if row.startswith("acme/billing"))
    assert line.split()[2:6] == ["-", "0", "-", "0"]  # state and in flight unknown
    assert (
        "in flight unknown (-): RabbitMQ's management API at http://guest:***@127.0.0.1:1 "
        "does not answer" in result.stdout
    )
    assert "history figures unknown (-): the history store" in result.stdout
    assert not (tmp_path / "nowhere.db").exists(), "status never creates a store"
    overview = json.loads(cli(config, "status", "--json").stdout)
    assert overview["routes"][0]["in_flight"] is None
    assert overview["routes"][0]["scheduled"] is None
    assert "guest:guest" not in result.stdout + result.stderr


def test_status_without_a_broker_shows_the_history_and_exits_1(
    settings: Settings, tmp_path: Path
) -> None:
    archive(settings).close()
    config = write_config(settings, tmp_path / "rohrpost.toml")
    config.write_text(
        config.read_text().replace(
            settings.broker_url.get_secret_value(), "amqp://guest:guest@127.0.0.1:1/%2F"
        )
    )
    result = cli(config, "status", check=False)
    assert result.returncode == 1
    line = next(row for row in result.stdout.splitlines() if row.startswith("acme/billing"))
    # ready, consumers, held and dead come from AMQP; in flight from the management API
    # (0 when it answers, - when it is not enabled), scheduled and retrying from the store
    state, ready, in_flight, consumers, scheduled, retrying, held, dead = line.split()[2:10]
    assert [state, ready, consumers, scheduled, retrying, held, dead] == [
        "active",
        "-",
        "-",
        "0",
        "0",
        "-",
        "-",
    ]
    assert in_flight in ("0", "-")
    assert "queues unknown (-): cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1" in (
        result.stdout
    )
    assert result.stderr.startswith("error: the broker could not be read: cannot reach RabbitMQ")


def test_status_of_an_unknown_tenant_is_an_error(config: Path) -> None:
    result = cli(config, "status", "--tenant", "initech", check=False)
    assert (result.returncode, result.stderr) == (1, "error: tenant 'initech' is not configured\n")


def test_status_watch_shows_the_figures_again_until_interrupted(config: Path) -> None:
    with subprocess.Popen(
        rohrpost_command(config, "status", "--watch", "--interval", "1s"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as watching:
        assert watching.stdout is not None
        frames = 0
        try:
            for line in watching.stdout:
                frames += line.startswith("namespace '")
                if frames == 2:
                    break
        finally:
            os.kill(watching.pid, signal.SIGINT)
            _, errors = watching.communicate(timeout=30)
    assert frames == 2
    assert (watching.returncode, errors) == (0, "")
