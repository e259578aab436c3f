"""The console's overview and the per-mail actions (send now, hold, release), in process.

The overview must show what ``rohrpost status --json`` shows for the same state (one
implementation behind both), renew its figures without a full page, and show a broker
or store that cannot be reached as a banner, never as an error page.
"""

from __future__ import annotations

import html
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from rohrpost.catcher import MailCatcher
from rohrpost.console.app import create_app
from rohrpost.console.snapshots import OverviewSnapshots
from rohrpost.operations.passive import declare_passively
from rohrpost.operations.queues import QueueReading
from rohrpost.operations.service import OperatorService
from rohrpost.operations.status import Overview
from rohrpost.producer.client import Producer
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.events import EventKind, MailEvent
from rohrpost.shared.settings import ConsoleSettings, Settings
from rohrpost.shared.store import HistoryRecord, HistoryStore
from rohrpost.shared.topology import Topology
from tests.conftest import WorkerThread, declare, publish_raw, wait_until, write_config
from tests.console_helpers import (
    GLOBEX,
    ORIGIN,
    SECRET_KEY,
    TOKENS,
    archive,
    console_config,
    csrf_of,
    logged_in,
    mail,
)
from tests.test_operators import cli, fill_dead_letters

pytestmark = pytest.mark.anyio
NEWS = {"news": {"smtp": "catcher", "sender": "news@acme.example", "enabled": False}}
VIEWER = {"authorization": f"Bearer {TOKENS['viewer']}"}
OPERATOR = {"authorization": f"Bearer {TOKENS['operator']}"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def installation(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """acme/billing, a disabled acme/news and globex/shop, users of every role."""
    monkeypatch.setenv("ROHRPOST_TEST_CONSOLE_KEY", SECRET_KEY)
    settings = make_settings(
        tenants={**GLOBEX, "acme": {"apps": NEWS}}, max_delay="2h", console=console_config()
    )
    declare(settings)
    HistoryStore.open(settings.store_url.get_secret_value(), migrate_schema=True).close()
    return settings


def client_of(settings: Settings, base_url: str = ORIGIN) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(settings)), base_url=base_url
    )


@pytest.fixture
async def client(installation: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(installation) as opened:
        yield opened


def event(kind: EventKind, at: datetime, **fields: Any) -> HistoryRecord:
    return HistoryRecord(
        MailEvent(kind=kind, mail_id=uuid.uuid4(), tenant="acme", app="billing", at=at, **fields)
    )


def known_state(settings: Settings) -> None:
    """Mails waiting, scheduled, dead-lettered and held; outcomes the history recorded."""
    now = datetime.now(UTC)
    with Producer(settings) as producer:
        for age in (timedelta(minutes=7), timedelta(minutes=100), timedelta(0)):
            created = (now - age).isoformat()
            producer.submit(mail(f"w{age.seconds}@example.com", created_at=created))
        producer.submit(
            mail("later@example.com", not_before=(now + timedelta(hours=1)).isoformat())
        )
        for i in range(2):
            producer.submit(mail(f"g{i}@example.com", tenant="globex", app="shop"))
    fill_dead_letters(settings, "acme", "billing", 2)
    held = Topology.from_settings(settings).held_queue("acme", "billing")
    publish_raw(settings, held, json.dumps(mail("held@example.com")).encode())
    store = HistoryStore.open(settings.store_url.get_secret_value())
    try:
        store.write(
            [
                *[
                    event(EventKind.SENT, now - ago, attempt=1)
                    for ago in (timedelta(minutes=30), timedelta(minutes=31), timedelta(hours=5))
                ],
                event(EventKind.ATTEMPT_FAILED, now - timedelta(minutes=20), attempt=1),
                event(EventKind.DEAD_LETTERED, now - timedelta(minutes=10), reason="x"),
            ]
        )
    finally:
        store.close()


def without_time(overview: dict[str, Any]) -> dict[str, Any]:
    """The overview with what changes by the second (its time, ages) taken out."""
    shown = json.loads(json.dumps(overview))
    del shown["at"]
    for figures in [*shown["routes"], shown["total"]]:
        seconds = figures.pop("oldest_waiting_seconds")
        figures["oldest_minutes"] = None if seconds is None else int(seconds // 60)
    return shown


def row(page: str, route: str) -> dict[str, str]:
    """The cells of ``route``'s row in the overview (``tenant-app`` or ``total``), by class."""
    found = re.search(rf'<tr id="route-{route}".*?</tr>', page, re.S)
    assert found, f"no row {route}"
    cells = re.findall(r'<td class="num ([a-z_]+)[^"]*">(.*?)</td>', found.group(0), re.S)
    return {name: html.unescape(re.sub(r"<[^>]+>", "", text)).strip() for name, text in cells}


def banner_of(page: str, source: str) -> re.Match[str] | None:
    """The alarm banner about ``source`` (broker, history) in the overview's figures."""
    return re.search(
        rf'<div class="banner" data-source="{source}" role="alert">(.*?)</div>', page, re.S
    )


# The figures


async def test_the_overview_shows_what_rohrpost_status_json_shows(
    client: httpx.AsyncClient, installation: Settings, tmp_path: Path
) -> None:
    known_state(installation)
    paused = await client.post("/api/v1/tenants/globex/pause", headers=OPERATOR)
    assert paused.status_code == 200, paused.text
    archive(installation)
    # the command needs no users (their hashes do not survive model_dump)
    without_users = installation.model_copy(update={"console": ConsoleSettings()})
    config = write_config(without_users, tmp_path / "rohrpost.toml")
    status = json.loads(cli(config, "status", "--json").stdout)
    answer = await client.get("/api/v1/overview", headers=VIEWER)
    assert answer.status_code == 200
    shown = answer.json()["overview"]
    assert without_time(shown) == without_time(status)
    routes = {f"{r['tenant']}/{r['app']}": r for r in shown["routes"]}
    billing, shop = routes["acme/billing"], routes["globex/shop"]
    assert (billing["ready"], billing["held"], billing["dead_lettered"]) == (3, 1, 2)
    assert (billing["scheduled"], billing["last_hour"]["sent"], billing["last_day"]["sent"]) == (
        1,
        2,
        3,
    )
    assert (shop["ready"], shop["paused"]) == (2, True)
    assert (routes["acme/news"]["enabled"], routes["acme/news"]["ready"]) == (False, None)
    assert shown["delay_levels"]["messages"] == 1
    assert shown["broker"] is None and shown["history"] is None


async def test_the_overview_counts_every_priority_lane_and_names_them_on_hover(
    client: httpx.AsyncClient, installation: Settings
) -> None:
    with Producer(installation) as producer:
        for priority, count in (("high", 1), ("normal", 2), ("bulk", 3)):
            for n in range(count):
                producer.submit(mail(f"{priority}{n}@example.com", priority=priority))
    await logged_in(client, "viewer")
    page = (await client.get("/overview")).text
    assert row(page, "acme-billing")["ready"] == "6"
    assert 'title="high 1 · normal 2 · bulk 3"' in page


async def test_the_overview_page_shows_each_route_with_links_into_its_mails(
    client: httpx.AsyncClient, installation: Settings
) -> None:
    known_state(installation)
    archive(installation)
    await logged_in(client, "viewer")
    page = (await client.get("/overview")).text
    billing = row(page, "acme-billing")
    assert {k: billing[k] for k in ("ready", "held", "dead_lettered", "scheduled")} == {
        "ready": "3",
        "held": "1",
        "dead_lettered": "2",
        "scheduled": "1",
    }
    assert (billing["sent_hour"], billing["sent_day"], billing["dead_hour"]) == ("2", "3", "1")
    assert re.fullmatch(r"1h 4\dm", billing["oldest"]), billing["oldest"]
    assert row(page, "globex-shop")["ready"] == "2"
    assert row(page, "total")["ready"] == "5"
    assert 'class="status disabled">disabled' in page  # acme/news
    assert 'href="/dead-letters?tenant=acme&amp;app=billing"' in page
    assert 'href="/mails?tenant=acme&amp;app=billing&amp;status=scheduled"' in page
    assert 'href="/mails?tenant=acme&amp;app=billing&amp;status=sent&amp;since=-1h"' in page
    delay = re.search(r'<tr id="delay-levels">.*?class="num messages">(\d+)<', page, re.S)
    assert delay and delay.group(1) == "1"
    assert re.search(r'<tr id="history-queue">.*?class="num messages">\d+<', page, re.S)
    linked = await client.get("/dead-letters?tenant=acme&app=billing")
    assert linked.status_code == 200


async def test_the_figures_renew_themselves_without_the_page(
    client: httpx.AsyncClient, installation: Settings
) -> None:
    await logged_in(client, "viewer")
    page = (await client.get("/overview?tenant=acme")).text
    section = re.search(r'<section id="overview"[^>]*>', page)
    assert section
    assert 'hx-get="/overview/figures?tenant=acme"' in section.group(0)
    assert 'hx-trigger="every 5s"' in section.group(0)
    assert 'hx-swap="outerHTML"' in section.group(0)
    before = (await client.get("/overview/figures?tenant=acme")).text
    assert row(before, "acme-billing")["ready"] == "0"
    with Producer(installation) as producer:
        producer.submit_many([mail(f"r{i}@example.com") for i in range(2)])
    # asked as the page asks, until a reading after the submit is shown (a reading
    # older than RENEW_AFTER is renewed behind the request that finds it)
    for _ in range(60):
        after = (await client.get("/overview/figures?tenant=acme")).text
        if row(after, "acme-billing")["ready"] == "2":
            break
        await anyio.sleep(0.5)
    assert row(after, "acme-billing")["ready"] == "2"
    assert after.lstrip().startswith('<section id="overview"')
    assert "<html" not in after and "<header" not in after and "<h1" not in after
    assert "globex" not in after  # the filter carries over


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def snapshots(installation: Settings) -> Iterator[tuple[OverviewSnapshots, Clock, list[str]]]:
    """Overview snapshots over the real operator API, on a clock the test moves."""
    service = OperatorService(installation)
    reads: list[str] = []

    def read(tenant: str | None, app: str | None) -> Overview:
        reads.append(f"{tenant}/{app}")
        return service.overview(tenant, app)

    clock = Clock()
    kept = OverviewSnapshots(read, renew_after=4, max_age=15, clock=clock)
    yield kept, clock, reads
    kept.close()
    service.close()


def test_a_reading_is_served_again_until_it_is_old_then_renewed_behind_the_request(
    snapshots: tuple[OverviewSnapshots, Clock, list[str]], installation: Settings
) -> None:
    kept, clock, reads = snapshots
    first = kept.get("acme", None)
    assert kept.get("acme", None) is first and len(reads) == 1
    with Producer(installation) as producer:
        producer.submit(mail())
    clock.now += 4  # old enough to renew: this request still gets the first reading
    assert kept.get("acme", None) is first
    wait_until(lambda: len(reads) == 2)
    renewed = wait_until(lambda: (o := kept.get("acme", None)) is not first and o)
    assert (renewed.routes[0].ready, first.routes[0].ready) == (1, 0)
    assert len(reads) == 2 and kept.get(None, None) is not renewed and len(reads) == 3


def test_a_reading_too_old_to_show_is_replaced_before_the_answer(
    snapshots: tuple[OverviewSnapshots, Clock, list[str]],
) -> None:
    kept, clock, reads = snapshots
    first = kept.get("acme", "billing")
    clock.now += 15
    again = kept.get("acme", "billing")
    assert again is not first and again.at > first.at and len(reads) == 2


def test_requests_at_the_same_time_share_one_reading(
    snapshots: tuple[OverviewSnapshots, Clock, list[str]],
) -> None:
    kept, _clock, reads = snapshots
    with ThreadPoolExecutor(6) as pool:
        shown = list(pool.map(lambda _: kept.get(None, None), range(6)))
    assert reads == ["None/None"] and all(o is shown[0] for o in shown)


async def test_an_unknown_tenant_or_app_is_named_next_to_its_filter(
    client: httpx.AsyncClient,
) -> None:
    await logged_in(client, "viewer")
    for query, field in (("tenant=initech", "tenant"), ("tenant=globex&app=billing", "app")):
        page = await client.get(f"/overview?{query}")
        assert page.status_code == 422
        assert f'id="error-{field}"' in page.text
    assert (await client.get("/api/v1/overview?tenant=initech", headers=VIEWER)).status_code == 422


# Sources that cannot be asked


async def test_a_broker_that_cannot_be_reached_is_a_banner_and_the_history_still_shows(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(
        broker_url="amqp://guest:hunter2-secret@127.0.0.1:9/%2F", management_url="off"
    )
    store = HistoryStore.open(settings.store_url.get_secret_value(), migrate_schema=True)
    store.write([event(EventKind.SENT, datetime.now(UTC) - timedelta(minutes=5), attempt=1)])
    store.close()
    async with client_of(settings, "http://127.0.0.1") as local:
        for path in ("/overview", "/overview/figures"):
            page = await local.get(path)
            assert page.status_code == 200, path
            banner = banner_of(page.text, "broker")
            assert banner and "cannot reach RabbitMQ" in banner.group(1), path
            assert "hunter2-secret" not in page.text
            billing = row(page.text, "acme-billing")
            assert (billing["ready"], billing["dead_lettered"], billing["sent_hour"]) == (
                "-",
                "-",
                "1",
            )
        api = (await local.get("/api/v1/overview")).json()
        assert api["overview"]["broker"].startswith("cannot reach RabbitMQ")
        assert [p["source"] for p in api["problems"] if p["alarm"]] == ["broker"]


async def test_a_store_that_cannot_be_reached_is_a_banner_and_the_queues_still_show(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        store_url="postgresql+psycopg://rohrpost:hunter2-secret@127.0.0.1:9/none",
        management_url="off",
    )
    declare(settings)
    with Producer(settings) as producer:
        producer.submit(mail())
    async with client_of(settings, "http://127.0.0.1") as local:
        page = await local.get("/overview")
        assert page.status_code == 200
        banner = banner_of(page.text, "history")
        assert banner and "history figures unknown" in banner.group(1)
        assert "hunter2-secret" not in page.text
        billing = row(page.text, "acme-billing")
        assert (billing["ready"], billing["sent_hour"], billing["scheduled"]) == ("1", "-", "-")
        assert 'class="status unknown"' in page.text  # paused or not: only the history knows


# Reading the queues


def test_queues_read_on_many_channels_at_once_give_what_one_channel_gives(
    installation: Settings,
) -> None:
    known_state(installation)
    topology = Topology.from_settings(installation)
    url = installation.broker_url.get_secret_value()
    with admin_channel(url) as channel:
        channel.queue_delete(topology.held_queue("globex", "shop"))
        one = QueueReading(topology)
        one.read(channel)
    several = QueueReading(topology)
    several.read_from(url)
    assert several.found == one.found and several.problem is None
    assert several.messages(topology.send_queue("acme", "billing")) == 3
    assert several.messages(topology.held_queue("acme", "billing")) == 1
    assert (
        several.notes
        == one.notes
        == [
            f"1 of {len(one.names)} queues do not exist (first: "
            f"{topology.held_queue('globex', 'shop')}); run `rohrpost topology declare`"
        ]
    )


def test_queues_are_read_from_the_first_node_that_answers(installation: Settings) -> None:
    topology = Topology.from_settings(installation)
    names = [topology.send_queue("acme", "billing"), topology.dead_queue("globex", "shop")]
    real = installation.broker_url.get_secret_value()
    answers = declare_passively(f"amqp://guest:hunter2@127.0.0.1:1/%2F,{real}", names)
    assert (answers.found.keys(), answers.problem) == (set(names), None)
    nowhere = declare_passively("amqp://guest:hunter2@127.0.0.1:1/%2F,amqp://127.0.0.1:9/", names)
    assert nowhere.found == {} and nowhere.problem is not None
    assert nowhere.problem.startswith("cannot reach any RabbitMQ node: amqp://guest:***@")
    assert "hunter2" not in nowhere.problem


def test_an_overview_of_one_tenant_reads_only_its_queues(installation: Settings) -> None:
    topology = Topology.from_settings(installation)
    reading = QueueReading(topology, [("globex", "shop")])
    assert topology.dead_queue("globex", "shop") in reading.names
    assert not [name for name in reading.names if ".acme." in name]


# Who may see it


async def test_the_overview_is_the_landing_page_and_needs_a_login(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/overview")).headers["location"] == "/login?next=%2Foverview"
    assert (await client.get("/api/v1/overview")).status_code == 401
    await logged_in(client, "viewer")
    landing = await client.get("/")
    assert (landing.status_code, landing.headers["location"]) == (303, "/overview")
    page = await client.get("/overview")
    assert page.status_code == 200 and 'href="/overview" class="here"' in page.text


async def test_renewing_the_figures_after_the_session_ended_leads_the_page_to_the_login(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get(
        "/overview/figures?tenant=acme",
        headers={"hx-request": "true", "hx-current-url": f"{ORIGIN}/overview?tenant=acme"},
    )
    assert response.status_code == 401
    assert response.headers["hx-redirect"] == "/login?next=%2Foverview%3Ftenant%3Dacme"
    assert "<form" not in response.text


@pytest.mark.parametrize("role", ["viewer", "operator", "admin"])
async def test_every_role_sees_the_overview_in_html_and_json(
    installation: Settings, role: str
) -> None:
    async with client_of(installation) as opened:
        await logged_in(opened, role)
        for path in ("/overview", "/overview/figures", "/api/v1/overview"):
            assert (await opened.get(path)).status_code == 200, path
    token = {"authorization": f"Bearer {TOKENS[role]}"}
    async with client_of(installation) as api:
        assert (await api.get("/api/v1/overview", headers=token)).status_code == 200


async def test_the_openapi_document_has_the_overview_and_the_mail_actions(
    client: httpx.AsyncClient,
) -> None:
    paths = (await client.get("/api/v1/openapi.json", headers=VIEWER)).json()["paths"]
    assert set(paths["/api/v1/overview"]) == {"get"}
    assert "/api/v1/overview/figures" not in paths  # HTML for the page only
    for action in ("send-now", "hold", "release"):
        assert set(paths[f"/api/v1/mails/{{mail_id}}/{action}"]) == {"post"}


# Send now, hold, release


def scheduled_mail(settings: Settings, recipient: str = "later@example.com") -> str:
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    with Producer(settings) as producer:
        mail_id = str(producer.submit(mail(recipient, not_before=later)))
    archive(settings)
    return mail_id


async def test_an_operator_sends_a_scheduled_mail_now_from_its_page(
    client: httpx.AsyncClient, installation: Settings, catcher: MailCatcher
) -> None:
    mail_id = scheduled_mail(installation)
    csrf = await logged_in(client, "operator")
    page = (await client.get(f"/mails/{mail_id}")).text
    assert ">Send now<" in page and ">Hold<" in page and ">Release<" not in page
    sent = await client.post(
        f"/mails/{mail_id}/send-now", data={"csrf": csrf}, headers={"origin": ORIGIN}
    )
    assert (sent.status_code, sent.headers["location"]) == (303, f"/mails/{mail_id}")
    worker = WorkerThread(installation).start()
    try:
        catcher.wait_for(lambda mails: len(mails) == 1)
    finally:
        worker.stop()
    assert catcher.mails[0].recipients == ("later@example.com",)
    archive(installation)
    events = (await client.get(f"/api/v1/mails/{mail_id}")).json()["events"]
    assert ("send_now", "operator") in [(e["kind"], e["actor"]) for e in events]


async def test_an_operator_holds_and_releases_a_mail_and_both_are_in_its_timeline(
    client: httpx.AsyncClient, installation: Settings
) -> None:
    mail_id = scheduled_mail(installation)
    csrf = await logged_in(client, "operator")
    held = await client.post(
        f"/mails/{mail_id}/hold", data={"csrf": csrf}, headers={"origin": ORIGIN}
    )
    assert held.status_code == 303
    archive(installation)
    page = (await client.get(f"/mails/{mail_id}")).text
    assert 'class="status held">held' in page
    assert ">Release<" in page and ">Hold<" not in page and ">Send now<" not in page
    released = await client.post(f"/api/v1/mails/{mail_id}/release", headers=OPERATOR)
    assert released.status_code == 200
    assert released.json()["message"].startswith(f"released {mail_id}")
    archive(installation)
    events = (await client.get(f"/api/v1/mails/{mail_id}")).json()["events"]
    assert [(e["kind"], e["actor"]) for e in events if e["kind"] in ("held", "released")] == [
        ("held", "operator"),
        ("released", "token:operator-tool"),
    ]
    again = await client.post(f"/api/v1/mails/{mail_id}/release", headers=OPERATOR)
    assert again.status_code == 409 and "is not held" in again.json()["error"]


async def test_a_viewer_is_offered_no_mail_action_and_moves_nothing(
    client: httpx.AsyncClient, installation: Settings
) -> None:
    mail_id = scheduled_mail(installation)
    csrf = await logged_in(client, "viewer")
    page = (await client.get(f"/mails/{mail_id}")).text
    assert '<form method="post" action="/mails/' not in page
    for action in ("send-now", "hold", "release"):
        refused = await client.post(
            f"/mails/{mail_id}/{action}", data={"csrf": csrf}, headers={"origin": ORIGIN}
        )
        assert refused.status_code == 403
        assert (
            await client.post(f"/api/v1/mails/{mail_id}/{action}", headers=VIEWER)
        ).status_code == 403
    archive(installation)
    kinds = [e["kind"] for e in (await client.get(f"/api/v1/mails/{mail_id}")).json()["events"]]
    assert not {"send_now", "held", "released"} & set(kinds)


async def test_a_mail_action_without_the_csrf_token_is_refused(
    client: httpx.AsyncClient, installation: Settings
) -> None:
    mail_id = scheduled_mail(installation)
    await logged_in(client, "operator")
    refused = await client.post(f"/mails/{mail_id}/hold", data={}, headers={"origin": ORIGIN})
    assert refused.status_code == 403
    foreign = await client.post(
        f"/mails/{mail_id}/hold",
        data={"csrf": csrf_of((await client.get("/tenants")).text)},
        headers={"origin": "https://evil.example"},
    )
    assert foreign.status_code == 403
    archive(installation)
    kinds = [e["kind"] for e in (await client.get(f"/api/v1/mails/{mail_id}")).json()["events"]]
    assert "held" not in kinds


async def test_sending_now_a_mail_already_sent_is_refused_with_the_reason(
    client: httpx.AsyncClient, installation: Settings, catcher: MailCatcher
) -> None:
    with Producer(installation) as producer:
        mail_id = str(producer.submit(mail()))
    worker = WorkerThread(installation).start()
    try:
        catcher.wait_for(lambda mails: len(mails) == 1)
    finally:
        worker.stop()
    archive(installation)
    refused = await client.post(f"/api/v1/mails/{mail_id}/send-now", headers=OPERATOR)
    assert refused.status_code == 409
    assert refused.json()["error"] == f"mail {mail_id} is already sent; nothing left to send"
