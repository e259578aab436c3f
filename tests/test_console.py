"""The console in process (httpx through the ASGI app), on the real broker and store.

Every route and every role; CSRF, origin and login walls; hostile input; what a
viewer may not see or do; the store or broker down.
"""

from __future__ import annotations

import gc
import html
import json
import re
import signal
import socket
import subprocess
import sys
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import make_url

from rohrpost.catcher import MailCatcher, free_port
from rohrpost.console.app import create_app
from rohrpost.console.pages import READ_SECONDS
from rohrpost.console.passwords import hash_password, verify
from rohrpost.console.server import check_binding
from rohrpost.console.site import PAGES
from rohrpost.operations.service import OperatorService
from rohrpost.producer.client import Producer
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.errors import ConfigError
from rohrpost.shared.settings import Settings
from rohrpost.shared.store import HistoryStore
from rohrpost.shared.topology import Topology, queue_depths
from rohrpost.shared.wire import mail_properties
from tests.conftest import (
    WorkerThread,
    declare,
    drain,
    get,
    postgres_database,
    publish_raw,
    rohrpost_command,
    wait_until,
    write_config,
)
from tests.console_helpers import (
    GLOBEX,
    ORIGIN,
    PASSWORDS,
    ROLES,
    SECRET_KEY,
    TOKENS,
    _password_hash,
    archive,
    console_config,
    csrf_of,
    dead_letters_of,
    logged_in,
    mail,
)
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.anyio
BAD = "nobody@customer.example"
ACTIONS = [page for page in PAGES if "POST" in page.methods]
READS = [page for page in PAGES if page.methods == ("GET",)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def console_settings(
    make_settings: Callable[..., Settings], catcher: MailCatcher, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    monkeypatch.setenv("ROHRPOST_TEST_CONSOLE_KEY", SECRET_KEY)
    catcher.always(BAD, "550 5.1.1 <nobody@customer.example>: no such user", stage="rcpt")
    settings = make_settings(tenants=GLOBEX, console=console_config())
    declare(settings)
    HistoryStore.open(settings.store_url.get_secret_value(), migrate_schema=True).close()
    return settings


@pytest.fixture
def dead_id(console_settings: Settings) -> str:
    """One dead letter (rejected with 550), in its queue and in the store."""
    return dead_letters_of(console_settings, [mail(f"Nobody <{BAD}>")])[0]


@pytest.fixture
async def client(console_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(console_settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as opened:
        yield opened


def concrete(path: str, mail_id: str) -> str:
    """A page's path with real values in it."""
    return (
        path.replace("{mail_id}", mail_id)
        .replace("{letter_id}", str(uuid.uuid4()))
        .replace("{job_id}", "nojob")
        .replace("{tenant}", "acme")
        .replace("{app}", "billing")
    )


def dead_queue_depth(settings: Settings, tenant: str = "acme", app: str = "billing") -> int:
    queue = Topology.from_settings(settings).dead_queue(tenant, app)
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        return queue_depths(channel, [queue])[queue]


# Logging in


@pytest.mark.parametrize(
    "path",
    [
        "/overview",
        "/dead-letters",
        "/mails",
        "/tenants",
        "/audit",
        "/users",
        "/metrics",
        "/",
        "/nowhere",
    ],
)
async def test_every_page_sends_a_stranger_to_the_login(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=")


@pytest.mark.parametrize("path", ["/api/v1/dead-letters", "/api/v1/mails", "/api/v1/openapi.json"])
async def test_the_api_answers_a_stranger_401(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/login", "/healthz", "/static/console.css"])
async def test_the_login_page_health_and_static_files_need_no_login(
    client: httpx.AsyncClient, path: str
) -> None:
    assert (await client.get(path)).status_code == 200


@pytest.mark.parametrize(
    ("user", "password"),
    [("operator", "wrong"), ("operator", PASSWORDS["viewer"]), ("nobody", "x"), ("operator", "")],
)
async def test_a_wrong_password_is_refused(
    client: httpx.AsyncClient, user: str, password: str
) -> None:
    form = await client.get("/login")
    response = await client.post(
        "/login",
        data={"user": user, "password": password, "csrf": csrf_of(form.text)},
        headers={"origin": ORIGIN},
    )
    assert response.status_code == 401
    assert "rohrpost_session" not in response.cookies
    assert (await client.get("/dead-letters")).status_code == 303


async def test_a_login_without_the_csrf_token_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/login", data={"user": "admin", "password": PASSWORDS["admin"]}, headers={"origin": ORIGIN}
    )
    assert response.status_code == 403
    assert "rohrpost_session" not in response.cookies


@pytest.mark.parametrize(
    "target", ["https://evil.example/", "//evil.example/x", "javascript:alert(1)"]
)
async def test_login_never_sends_the_user_to_another_site(
    client: httpx.AsyncClient, target: str
) -> None:
    form = await client.get("/login")
    response = await client.post(
        "/login",
        data={
            "user": "admin",
            "password": PASSWORDS["admin"],
            "csrf": csrf_of(form.text),
            "next": target,
        },
        headers={"origin": ORIGIN},
    )
    assert response.headers["location"] == "/overview"


async def test_a_forged_session_cookie_is_not_a_login(client: httpx.AsyncClient) -> None:
    await logged_in(client, "viewer")
    payload, _, signature = client.cookies["rohrpost_session"].partition(".")
    client.cookies.set("rohrpost_session", f"{payload}.{signature[::-1]}")
    assert (await client.get("/dead-letters")).status_code == 303


@pytest.mark.parametrize("path", ["/login", "/dead-letters", "/api/v1/dead-letters", "/nowhere"])
async def test_every_answer_forbids_inline_script_framing_and_caching(
    client: httpx.AsyncClient, path: str
) -> None:
    await logged_in(client, "viewer")
    headers = (await client.get(path)).headers
    policy = headers["content-security-policy"]
    assert "script-src 'self';" in policy and "unsafe" not in policy
    assert "frame-ancestors 'none'" in policy
    assert headers["cache-control"] == "no-store"
    assert headers["x-content-type-options"] == "nosniff"


def test_no_template_carries_inline_script_or_style() -> None:
    folder = Path(create_app.__code__.co_filename).parent / "templates"
    for template in folder.glob("*.html"):
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), template.name
        assert "<style" not in text and " style=" not in text and " on" + "click" not in text


async def test_the_html_preview_runs_in_a_sandbox_of_its_own(
    client: httpx.AsyncClient, dead_id: str
) -> None:
    await logged_in(client, "viewer")
    page = (await client.get(f"/dead-letters/{dead_id}")).text
    assert 'sandbox=""' in page or "sandbox " in page or "<iframe" not in page
    preview = await client.get(f"/dead-letters/{dead_id}/preview.html")
    assert preview.status_code == 200
    assert "sandbox" in preview.headers["content-security-policy"]
    assert "default-src 'none'" in preview.headers["content-security-policy"]


# Every route, every role


@pytest.mark.parametrize("page", READS, ids=[p.path for p in READS])
async def test_every_role_reads_every_page_as_html_and_json(
    console_settings: Settings, dead_id: str, page: Any
) -> None:
    path = concrete(page.path, dead_id)
    found_or_not = {200, 404} if "{" in page.path and "mail_id" not in page.path else {200}
    for role in ROLES:
        transport = httpx.ASGITransport(app=create_app(console_settings))
        async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as client:
            await logged_in(client, role)
            allowed = page.action != "view-users" or role == "admin"
            html = await client.get(path)
            api = await client.get("/api/v1" + path) if page.api else html
            for response in (html, api):
                assert (
                    (response.status_code in found_or_not)
                    if allowed
                    else (response.status_code == 403)
                ), (role, response.status_code)
            if page.api and api.status_code == 200:
                assert isinstance(api.json(), dict)


@pytest.mark.parametrize("page", ACTIONS, ids=[p.path for p in ACTIONS])
async def test_a_viewer_gets_403_on_every_action_and_nothing_moves(
    client: httpx.AsyncClient, console_settings: Settings, dead_id: str, page: Any
) -> None:
    csrf = await logged_in(client, "viewer")
    fields = {"csrf": csrf, "scope": "filtered", "ids": f"mail:{dead_id}", "confirm": "1"}
    response = await client.post(
        concrete(page.path, dead_id), data=fields, headers={"origin": ORIGIN}
    )
    assert response.status_code == 403
    token = {"authorization": f"Bearer {TOKENS['viewer']}"}
    api = await client.post("/api/v1" + concrete(page.path, dead_id), json=fields, headers=token)
    assert api.status_code == 403
    assert dead_queue_depth(console_settings) == 1
    archive(console_settings)
    audit = await client.get("/api/v1/audit")
    assert audit.json()["entries"] == []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"origin": "https://evil.example"},
        {"origin": "null"},
        {"referer": "http://console.test.evil.example/x"},
    ],
)
async def test_a_post_from_a_foreign_origin_is_refused_and_changes_nothing(
    client: httpx.AsyncClient, console_settings: Settings, dead_id: str, headers: dict[str, str]
) -> None:
    csrf = await logged_in(client, "operator")
    response = await client.post(
        f"/dead-letters/{dead_id}/retry", data={"csrf": csrf}, headers=headers
    )
    assert response.status_code == 403
    assert dead_queue_depth(console_settings) == 1


@pytest.mark.parametrize("csrf", [None, "", "x" * 43, "forged"])
async def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(
    client: httpx.AsyncClient, console_settings: Settings, dead_id: str, csrf: str | None
) -> None:
    await logged_in(client, "operator")
    data = {} if csrf is None else {"csrf": csrf}
    response = await client.post(
        f"/dead-letters/{dead_id}/retry", data=data, headers={"origin": ORIGIN}
    )
    assert response.status_code == 403
    assert dead_queue_depth(console_settings) == 1


async def test_an_api_token_acts_without_csrf_and_is_recorded_as_the_actor(
    client: httpx.AsyncClient, console_settings: Settings, dead_id: str
) -> None:
    token = {"authorization": f"Bearer {TOKENS['operator']}"}
    response = await client.post(f"/api/v1/dead-letters/{dead_id}/retry", headers=token)
    assert response.status_code == 200, response.text
    assert dead_queue_depth(console_settings) == 0
    archive(console_settings)
    found = (await client.get(f"/api/v1/mails/{dead_id}", headers=token)).json()
    assert ("resubmitted", "token:operator-tool") in [
        (e["kind"], e["actor"]) for e in found["events"]
    ]


async def test_no_page_leaks_a_password_hash_or_secret(
    client: httpx.AsyncClient, console_settings: Settings, dead_id: str
) -> None:
    secrets = [
        SECRET_KEY,
        *PASSWORDS.values(),
        *TOKENS.values(),
        *(_password_hash(r) for r in ROLES),
    ]
    secrets += [s.split("$")[-1] for s in secrets if s.startswith("scrypt$")]
    await logged_in(client, "admin")
    paths = [concrete(p.path, dead_id) for p in READS] + [
        "/metrics",
        "/login",
        "/api/v1/openapi.json",
    ]
    for path in paths + [
        "/api/v1" + p for p in paths if not p.startswith(("/metrics", "/login", "/api"))
    ]:
        text = (await client.get(path)).text
        assert not [s for s in secrets if s in text], path


# Hostile input


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_20_mb_form_post_is_refused_early_with_413(
    client: httpx.AsyncClient, dead_id: str, chunked: bool
) -> None:
    csrf = await logged_in(client, "operator")
    body = ("csrf=" + csrf + "&raw=" + "x" * (20 * 1024 * 1024)).encode()

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    response = await client.post(
        f"/dead-letters/{dead_id}/edit",
        content=stream() if chunked else body,
        headers={"origin": ORIGIN, "content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 413


@pytest.mark.parametrize(
    "path",
    [
        "/mails/..%2F..%2F..%2Fetc%2Fpasswd",
        "/mails/../../etc/passwd",
        "/dead-letters/%2e%2e%2fconsole.py",
        "/static/..%2F..%2Fapp.py",
        "/static/../app.py",
        "/mails/6c0f%00",
        "/invalid-letters/..%5c..%5cwin.ini",
    ],
)
async def test_a_path_traversal_mail_id_finds_nothing(client: httpx.AsyncClient, path: str) -> None:
    await logged_in(client, "admin")
    response = await client.get(path)
    assert response.status_code == 404
    assert "root:" not in response.text and "import" not in response.text


@pytest.mark.parametrize("raw", ['{"to": ["a@b.example"]', "{", "[1, 2]", '"text"', "nul\x00"])
async def test_malformed_json_in_the_editor_is_shown_next_to_it_and_nothing_moves(
    client: httpx.AsyncClient, console_settings: Settings, dead_id: str, raw: str
) -> None:
    csrf = await logged_in(client, "operator")
    response = await client.post(
        f"/dead-letters/{dead_id}/edit",
        data={"csrf": csrf, "mode": "raw", "raw": raw, "step": "save"},
        headers={"origin": ORIGIN},
    )
    assert response.status_code == 422
    assert 'id="error-raw"' in response.text
    assert dead_queue_depth(console_settings) == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("to", "anna(at)example.com"),
        ("to", "a@b.example\nc@@d"),
        ("headers", "{not json"),
        ("headers", '{"Subject": "x"}'),
        ("max_attempts", "0"),
        ("not_before", "tomorrow"),
    ],
)
async def test_an_invalid_field_is_refused_next_to_that_field(
    client: httpx.AsyncClient, dead_id: str, field: str, value: str
) -> None:
    csrf = await logged_in(client, "operator")
    form = (await client.get(f"/api/v1/dead-letters/{dead_id}/edit")).json()["values"]
    form.update({field: value, "csrf": csrf, "mode": "form", "step": "save"})
    response = await client.post(
        f"/dead-letters/{dead_id}/edit", data=form, headers={"origin": ORIGIN}
    )
    assert response.status_code == 422
    assert f'id="error-{field}"' in response.text


async def test_the_api_names_the_field_of_an_invalid_container(
    client: httpx.AsyncClient, dead_id: str
) -> None:
    token = {"authorization": f"Bearer {TOKENS['operator']}"}
    found = (await client.get(f"/api/v1/mails/{dead_id}", headers=token)).json()["container"]
    found["to"] = ["anna(at)example.com"]
    response = await client.post(
        f"/api/v1/dead-letters/{dead_id}/edit", json={"container": found}, headers=token
    )
    assert response.status_code == 422
    assert "to.0" in response.json()["errors"]["raw"]


async def test_an_edit_is_previewed_then_saved_with_its_diff_and_user(
    client: httpx.AsyncClient, console_settings: Settings, dead_id: str
) -> None:
    csrf = await logged_in(client, "operator")
    form = (await client.get(f"/api/v1/dead-letters/{dead_id}/edit")).json()["values"]
    form.update(
        {"to": "Anna <anna@customer.example>", "csrf": csrf, "mode": "form", "step": "preview"}
    )
    preview = await client.post(
        f"/dead-letters/{dead_id}/edit", data=form, headers={"origin": ORIGIN}
    )
    assert preview.status_code == 200
    assert "anna@customer.example" in preview.text and 'value="save"' in preview.text
    save = {"csrf": csrf, "mode": "raw", "raw": _validated(preview.text), "step": "save"}
    saved = await client.post(
        f"/dead-letters/{dead_id}/edit", data=save, headers={"origin": ORIGIN}
    )
    assert saved.status_code == 303
    archive(console_settings)
    detail = (await client.get(f"/api/v1/mails/{dead_id}")).json()
    [edited] = [e for e in detail["events"] if e["kind"] == "edited"]
    assert edited["actor"] == "operator"
    assert edited["changes"]["to"] == [[f"Nobody <{BAD}>"], ["Anna <anna@customer.example>"]]
    assert detail["mail"]["recipients"] == ["Anna <anna@customer.example>"]
    assert detail["mail"]["status"] == "dead_lettered"


def _validated(page: str) -> str:
    found = re.search(r'name="raw" value="([^"]*)"', page)
    assert found
    return html.unescape(found.group(1))


@pytest.mark.parametrize(
    "hostile",
    ['<script>alert("x")</script>', '"><img src=x onerror=alert(1)>', "{{7*7}}", "\x1b[31mred"],
)
async def test_html_in_a_subject_or_name_is_escaped(
    client: httpx.AsyncClient, console_settings: Settings, hostile: str
) -> None:
    name = hostile.replace("\x1b", "").replace('"', "")
    [mail_id] = dead_letters_of(
        console_settings, [mail(f'"{name}" <{BAD}>', subject=hostile.replace("\x1b", "ESC"))]
    )
    await logged_in(client, "admin")
    for path in ("/dead-letters", f"/dead-letters/{mail_id}", f"/mails/{mail_id}", "/mails"):
        text = (await client.get(path)).text
        assert "<script>alert" not in text and "<img src=x" not in text, path


async def test_an_operator_resends_a_sent_mail_and_cancels_a_scheduled_one(
    client: httpx.AsyncClient, console_settings: Settings, catcher: MailCatcher
) -> None:
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    with Producer(console_settings) as producer:
        sent = str(producer.submit(mail("anna@example.com")))
        scheduled = str(producer.submit(mail("bob@example.com", not_before=later)))
    drain_sent(console_settings, catcher, 1)
    archive(console_settings)
    csrf = await logged_in(client, "operator")
    page = (await client.get(f"/mails/{scheduled}")).text
    assert "Resend" in page and ">Cancel<" in page
    cancelled = await client.post(
        f"/mails/{scheduled}/cancel", data={"csrf": csrf}, headers={"origin": ORIGIN}
    )
    assert cancelled.status_code == 303
    resent = await client.post(
        f"/mails/{sent}/resend", data={"csrf": csrf}, headers={"origin": ORIGIN}
    )
    assert resent.status_code == 303
    archive(console_settings)
    audit = (await client.get("/api/v1/audit")).json()["entries"]
    assert {(e["kind"], e["actor"]) for e in audit} >= {
        ("cancelled", "operator"),
        ("resent", "operator"),
    }
    again = await client.post(
        f"/mails/{sent}/cancel", data={"csrf": csrf}, headers={"origin": ORIGIN}
    )
    assert again.status_code == 409 and "only queued or scheduled" in again.text


async def test_a_mail_page_shows_a_priority_other_than_normal(
    client: httpx.AsyncClient, console_settings: Settings, catcher: MailCatcher
) -> None:
    with Producer(console_settings) as producer:
        high = str(producer.submit(mail("anna@example.com", priority="high")))
        normal = str(producer.submit(mail("bob@example.com")))
    drain_sent(console_settings, catcher, 2)
    archive(console_settings)
    await logged_in(client, "operator")
    assert "<dt>Priority</dt><dd>high</dd>" in (await client.get(f"/mails/{high}")).text
    assert "<dt>Priority</dt>" not in (await client.get(f"/mails/{normal}")).text


def drain_sent(settings: Settings, catcher: MailCatcher, count: int) -> None:
    """Run a worker until ``count`` mails reached the catcher (scheduled ones stay)."""
    worker = WorkerThread(settings).start()
    try:
        catcher.wait_for(lambda mails: len(mails) >= count)
    finally:
        worker.stop()


# A viewer with masked recipients


async def test_a_masked_viewer_sees_no_recipient_address(
    make_settings: Callable[..., Settings], catcher: MailCatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROHRPOST_TEST_CONSOLE_KEY", SECRET_KEY)
    catcher.always(BAD, "550 5.1.1 <nobody@customer.example>: no such user", stage="rcpt")
    settings = make_settings(console=console_config(mask_recipients_for_viewers=True))
    declare(settings)
    [mail_id] = dead_letters_of(settings, [mail(f"Nobody <{BAD}>")])
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as viewer:
        await logged_in(viewer, "viewer")
        for path in (
            "/dead-letters",
            f"/dead-letters/{mail_id}",
            f"/mails/{mail_id}",
            f"/api/v1/mails/{mail_id}",
            f"/dead-letters/{mail_id}/preview.html",
        ):
            text = (await viewer.get(path)).text
            assert BAD not in text and "nobody@" not in text, path
            assert "n…@customer.example" in text or path.endswith("preview.html"), path


# Dead letters that are no mail container


async def test_a_dead_letter_that_is_not_a_container_is_listed_with_its_bytes_escaped_then_purged(
    client: httpx.AsyncClient, console_settings: Settings
) -> None:
    body = b"\x1b[31m<script>alert(1)</script> \xff\xfe not json"
    topology = Topology.from_settings(console_settings)
    publish_raw(
        console_settings,
        topology.route_key("acme", "billing"),
        body,
        topology.submit_exchange,
        mail_properties("not-a-uuid"),
    )
    drain(console_settings)
    archive(console_settings)
    csrf = await logged_in(client, "operator")
    listed = (await client.get("/api/v1/dead-letters?reason=invalid")).json()
    [letter] = listed["letters"]
    page = (await client.get(letter["link"])).text
    assert "\\x1b[31m" in page and "\\xff\\xfe" in page
    assert "<script>alert(1)" not in page and "&lt;script&gt;" in page
    fields = {"csrf": csrf, "scope": "selected", "ids": letter["key"]}
    asked = await client.post("/dead-letters/purge", data=fields, headers={"origin": ORIGIN})
    assert "Purge 1" in asked.text
    started = await client.post(
        "/dead-letters/purge", data={**fields, "confirm": "1"}, headers={"origin": ORIGIN}
    )
    assert started.status_code == 303
    await _finished(client, started.headers["location"])
    assert dead_queue_depth(console_settings) == 0
    archive(console_settings)
    assert (await client.get("/api/v1/dead-letters")).json()["total"] == 0


async def _finished(client: httpx.AsyncClient, job_path: str) -> dict[str, Any]:
    for _ in range(300):
        job = (await client.get("/api/v1" + job_path)).json()["job"]
        if job["state"] != "running":
            assert job["state"] == "finished", job
            return job
        await anyio.sleep(0.1)
    raise TimeoutError(job_path)


# Bulk actions


async def test_the_filtered_set_is_retried_only_once_its_count_is_confirmed(
    client: httpx.AsyncClient, console_settings: Settings
) -> None:
    dead_letters_of(
        console_settings,
        [mail(f"n{i} <{BAD}>") for i in range(3)] + [mail(BAD, tenant="globex", app="shop")],
    )
    csrf = await logged_in(client, "operator")
    fields = {"csrf": csrf, "scope": "filtered", "tenant": "acme", "reason": "rejected"}
    asked = await client.post("/dead-letters/retry", data=fields, headers={"origin": ORIGIN})
    assert asked.status_code == 200 and "Retry 3" in asked.text
    assert dead_queue_depth(console_settings) == 3
    stale = await client.post(
        "/dead-letters/retry", data={**fields, "confirm": "2"}, headers={"origin": ORIGIN}
    )
    assert "changed" in stale.text and dead_queue_depth(console_settings) == 3
    started = await client.post(
        "/dead-letters/retry", data={**fields, "confirm": "3"}, headers={"origin": ORIGIN}
    )
    job = await _finished(client, started.headers["location"])
    assert job["done"] == 3
    assert dead_queue_depth(console_settings) == 0
    assert dead_queue_depth(console_settings, "globex", "shop") == 1


# Broker or store down


async def test_a_store_that_cannot_be_reached_shows_a_banner_not_a_500(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(
        store_url="postgresql+psycopg://rohrpost:hunter2-secret@127.0.0.1:9/none",
        broker_url="amqp://guest:guest@127.0.0.1:9/%2F",
    )
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as local:
        page = await local.get("/dead-letters")
        assert page.status_code == 503
        assert 'class="banner"' in page.text and "history store" in page.text
        assert "RabbitMQ cannot be reached" in page.text
        assert "hunter2-secret" not in page.text
        assert (await local.get("/api/v1/mails")).status_code == 503


@pytest.mark.timeout(300)
async def test_a_store_that_stopped_answering_is_a_banner_and_pages_end_with_503(
    make_settings: Callable[..., Settings], postgres_url: str
) -> None:
    """PostgreSQL behind a frozen link: the store's check never returns. Before, every
    page waited behind it (the banners' check held their lock) for as long as the link
    stayed frozen; now the banner says so after a few seconds and a page that reads the
    store ends with 503 within READ_SECONDS."""
    # The calls left behind (the check that hung, the read that became a 503) had
    # connections checked out while the banner's failure disposed of the engine: the old
    # pool takes them back and nobody closes them. Whenever they are collected (during
    # this test, or at its end below), that is no failure of this test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        with postgres_database(postgres_url) as database:
            HistoryStore.open(database, migrate_schema=True).close()
            url = make_url(database)
            with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
                proxied = url.set(host="127.0.0.1", port=proxy.port)
                settings = make_settings(store_url=proxied.render_as_string(hide_password=False))
                declare(settings)
                service = OperatorService(settings)
                transport = httpx.ASGITransport(app=create_app(settings, service))
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://127.0.0.1", timeout=None
                ) as local:
                    assert (
                        await local.get("/tenants")
                    ).status_code == 200  # the store's connection
                    proxy.freeze()
                    await anyio.sleep(6)  # the banners' last answer is no longer fresh
                    with anyio.fail_after(READ_SECONDS + 60):
                        page = await local.get("/tenants")
                    assert page.status_code == 503, page.text
                    assert "the history store has not answered for" in page.text
                    proxy.drop()  # its connections fail now: the page and the banner recover
                    with anyio.fail_after(60):
                        while True:
                            page = await local.get("/tenants")
                            if page.status_code == 200 and 'class="banner"' not in page.text:
                                break
                            await anyio.sleep(1)
                service.close()
        gc.collect()


# Local mode: no users, loopback only


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "console.example"])
def test_the_console_refuses_to_listen_beyond_loopback_without_users(
    make_settings: Callable[..., Settings], host: str
) -> None:
    with pytest.raises(ConfigError, match="no user is configured"):
        check_binding(make_settings(), host)


def test_the_command_refuses_a_public_address_without_users(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    config = write_config(make_settings(), tmp_path / "rohrpost.toml")
    result = subprocess.run(
        rohrpost_command(config, "console", "--host", "0.0.0.0", "--port", "0"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "no user is configured" in result.stderr


def test_a_console_port_in_use_is_one_error_line_that_names_it(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    config = write_config(make_settings(), tmp_path / "rohrpost.toml")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            rohrpost_command(config, "console", "--port", str(port)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the console cannot listen on 127.0.0.1:{port}: ")


def test_run_with_console_serves_it_as_a_supervised_child(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    port, metrics = free_port(), free_port()
    settings = make_settings(console={"port": port}, metrics_port=metrics)
    declare(settings)
    config = write_config(settings, tmp_path / "rohrpost.toml")
    process = subprocess.Popen(rohrpost_command(config, "run", "--console"))
    try:
        wait_until(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200)
        # 503 (a banner) until the history consumer has migrated the store
        page = wait_until(lambda: (r := get(f"http://127.0.0.1:{port}/tenants"))[0] == 200 and r)
        assert "acme" in page[1]
        wait_until(lambda: get(f"http://127.0.0.1:{metrics}/readyz")[0] == 200)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8025", "10.0.0.1"])
async def test_without_users_a_foreign_host_header_is_refused(
    make_settings: Callable[..., Settings], host: str
) -> None:
    transport = httpx.ASGITransport(app=create_app(make_settings()))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8025") as local:
        response = await local.get("/dead-letters", headers={"host": host})
        assert response.status_code == 421


def test_hash_password_reads_stdin_and_prints_a_verifiable_scrypt_hash(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rohrpost", "console", "hash-password"],
        input="s3cret password\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=tmp_path,
    )
    printed = result.stdout.strip()
    assert printed.startswith("scrypt$16384$8$1$")
    assert verify("s3cret password", printed) and not verify("s3cret passwort", printed)
    assert hash_password("same") != hash_password("same")


async def test_the_openapi_document_lists_every_api_route(client: httpx.AsyncClient) -> None:
    token = {"authorization": f"Bearer {TOKENS['viewer']}"}
    document = (await client.get("/api/v1/openapi.json", headers=token)).json()
    for page in PAGES:
        if not page.api:  # HTML only (the overview's renewed figures)
            assert "/api/v1" + page.path not in document["paths"]
            continue
        assert "/api/v1" + page.path in document["paths"]
        assert set(document["paths"]["/api/v1" + page.path]) == {m.lower() for m in page.methods}
    assert json.dumps(document)
