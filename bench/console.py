"""``python -m bench console``: the web console over a large history (PostgreSQL).

100 tenant/app routes, N mails in the history (default 1,000,000: written straight
into PostgreSQL with ``generate_series``, as the history consumer would have left
them, with the outcome counts of their last week and 20,000 of them still waiting)
and 10,000 dead letters (in their queues and in the store). Measured through a real
console on 127.0.0.1 over HTTP: the overview as served (the latest reading, renewed
behind the requests) and one full reading (every route's queues from the broker, the
in-flight counts from the management API, the history's figures from the store), the
dead-letter page and a history search by recipient (p50/p95 of repeated requests),
and a bulk retry of the 10,000 (the filtered set, confirmed, run as a job) in mails
per second.
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from bench.environment import Environment, environment
from rohrpost.console.server import ConsoleThread
from rohrpost.operations.service import OperatorService
from rohrpost.shared.broker import Broker, Publication
from rohrpost.shared.container import encode_container, parse_container
from rohrpost.shared.store import HistoryStore
from rohrpost.shared.wire import ATTEMPTS_HEADER, ERROR_HEADER, REASON_HEADER, mail_properties

TENANTS, APPS = 10, 10  # 100 routes
DEAD = 10_000
DEAD_TENANT = "t0"
REQUESTS = 200
READINGS = 40  # full readings of the overview, timed without the console
WAITING = 10_000  # queued (due, not yet sent) and as many scheduled

_FILL = """
INSERT INTO mails (id, tenant, app, status, round, status_rank, status_at, created_at,
                   updated_at, sent_at, sender, recipients, subject, attempts,
                   content_deleted, history, message_id, smtp_reply)
SELECT md5('mail' || i)::uuid, 't' || (i % 10), 'a' || ((i / 10) % 10), 'sent', 0, 3,
       now() - make_interval(secs => i), now() - make_interval(secs => i + 5),
       now() - make_interval(secs => i), now() - make_interval(secs => i),
       'shop@acme.example', 'r' || i || '@customer.example', 'Your order ' || i, 1,
       false, 'keep', '<' || i || '@acme.example>', '250 2.0.0 Ok: queued'
FROM generate_series(1, :count) AS i
"""
_FILL_RECIPIENTS = """
INSERT INTO mail_recipients (mail_id, address)
SELECT md5('mail' || i)::uuid, 'r' || i || '@customer.example' FROM generate_series(1, :count) AS i
"""


# Due mails not yet sent and mails scheduled for later: what the overview's ages count.
_FILL_WAITING = """
INSERT INTO mails (id, tenant, app, status, round, status_rank, status_at, created_at,
                   updated_at, not_before, sender, recipients, subject, attempts,
                   content_deleted, history)
SELECT md5('waiting' || i)::uuid, 't' || (i % 10), 'a' || ((i / 10) % 10),
       CASE WHEN i % 2 = 0 THEN 'queued' ELSE 'scheduled' END, 0, i % 2,
       now() - make_interval(secs => i), now() - make_interval(secs => i),
       now() - make_interval(secs => i),
       CASE WHEN i % 2 = 0 THEN NULL ELSE now() + make_interval(secs => i) END,
       'shop@acme.example', 'w' || i || '@customer.example', 'Waiting ' || i, 0, false, 'keep'
FROM generate_series(1, :count) AS i
"""
# The history writer keeps these beside the events: outcomes per route and 5-minute step.
_FILL_COUNTS = """
INSERT INTO outcome_counts (tenant, app, kind, step, count)
SELECT tenant, app, kind, step, count(*) FROM (
    SELECT tenant, app, 'sent' AS kind,
           date_bin('5 minutes', sent_at, TIMESTAMPTZ '2000-01-01') AS step
    FROM mails WHERE sent_at >= now() - interval '7 days'
    UNION ALL
    SELECT tenant, app, 'submitted', date_bin('5 minutes', created_at, TIMESTAMPTZ '2000-01-01')
    FROM mails WHERE created_at >= now() - interval '7 days'
) AS outcomes
GROUP BY tenant, app, kind, step
ON CONFLICT (tenant, app, kind, step) DO UPDATE SET count = outcome_counts.count + excluded.count
"""
_FILL_HOURLY = """
INSERT INTO outcome_counts_hourly (tenant, app, kind, hour, count)
SELECT tenant, app, kind, date_trunc('hour', step, 'UTC'), sum(count) FROM outcome_counts
GROUP BY tenant, app, kind, date_trunc('hour', step, 'UTC')
ON CONFLICT (tenant, app, kind, hour)
    DO UPDATE SET count = outcome_counts_hourly.count + excluded.count
"""


def _routes() -> dict[str, Any]:
    return {
        f"t{t}": {
            "apps": {f"a{a}": {"smtp": "sink", "sender": "shop@acme.example"} for a in range(APPS)}
        }
        for t in range(TENANTS)
    }


def _fill_history(env: Environment, count: int) -> float:
    started = time.perf_counter()
    engine = create_engine(env.settings.store_url.get_secret_value())
    with engine.begin() as conn:
        conn.execute(text(_FILL), {"count": count})
        conn.execute(text(_FILL_RECIPIENTS), {"count": count})
        conn.execute(text(_FILL_WAITING), {"count": 2 * WAITING})
        conn.execute(text(_FILL_COUNTS))
        conn.execute(text(_FILL_HOURLY))
    with engine.connect() as conn:
        conn.execute(text("ANALYZE"))
    engine.dispose()
    return time.perf_counter() - started


def _dead_letters(env: Environment) -> None:
    """DEAD dead letters of tenant t0 (spread over its apps): in their queues and in the store."""
    from rohrpost.shared.events import EventKind, MailEvent
    from rohrpost.shared.store import HistoryRecord

    broker = Broker(env.settings.broker_url.get_secret_value())
    broker.start()
    store = HistoryStore.open(env.settings.store_url.get_secret_value())
    records, futures = [], []
    try:
        for i in range(DEAD):
            app = f"a{i % APPS}"
            container = parse_container(
                {
                    "tenant": DEAD_TENANT,
                    "app": app,
                    "to": [f"dead{i}@customer.example"],
                    "subject": f"Dead {i}",
                    "text": "x",
                }
            )
            headers = {REASON_HEADER: "rejected", ERROR_HEADER: "550 no", ATTEMPTS_HEADER: 1}
            futures.append(
                broker.publish(
                    Publication(
                        env.topology.dead_exchange,
                        env.topology.route_key(DEAD_TENANT, app),
                        encode_container(container),
                        mail_properties(str(container.id), headers=headers),
                    )
                )
            )
            common = {"mail_id": container.id, "tenant": DEAD_TENANT, "app": app}
            records += [
                HistoryRecord(MailEvent(kind=EventKind.SUBMITTED, **common), container),
                HistoryRecord(
                    MailEvent(
                        kind=EventKind.DEAD_LETTERED,
                        reason="rejected",
                        error="550 no",
                        attempt=1,
                        **common,
                    )
                ),
            ]
        for future in futures:
            future.result(timeout=120)
        for start in range(0, len(records), 2000):
            store.write(records[start : start + 2000])
    finally:
        broker.close()
        store.close()


def _timed(client: httpx.Client, paths: list[str]) -> dict[str, float]:
    seconds = []
    for path in paths:
        started = time.perf_counter()
        response = client.get(path)
        seconds.append(time.perf_counter() - started)
        assert response.status_code == 200, (path, response.status_code)
    seconds.sort()
    return {
        "p50_ms": round(1000 * statistics.median(seconds), 1),
        "p95_ms": round(1000 * seconds[int(0.95 * len(seconds)) - 1], 1),
    }


def _overview_reading(env: Environment, count: int) -> dict[str, float]:
    """One full reading of the overview, as the console's first request (and each
    renewal behind the requests) makes it: p50/p95 of ``count``."""
    service = OperatorService(env.settings)
    seconds = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            shown = service.overview()
            seconds.append(time.perf_counter() - started)
            assert shown.broker is None and shown.history is None, shown
    finally:
        service.close()
    seconds.sort()
    return {
        "p50_ms": round(1000 * statistics.median(seconds), 1),
        "p95_ms": round(1000 * seconds[int(0.95 * len(seconds)) - 1], 1),
    }


def _overview_shows(client: httpx.Client) -> dict[str, Any]:
    """What the overview the timings fetched showed: that it read every source."""
    shown = client.get("/api/v1/overview").json()["overview"]
    total = shown["total"]
    return {
        "routes": len(shown["routes"]),
        "ready": total["ready"],
        "dead_lettered": total["dead_lettered"],
        "scheduled": total["scheduled"],
        "waiting_due": sum((total["waiting_by_age"] or {}).values()),
        "sent_24h": total["last_day"]["sent"],
        "unknown": {k: shown[k] for k in ("broker", "history", "management") if shown[k]},
    }


def _bulk_retry(client: httpx.Client) -> tuple[float, dict[str, Any]]:
    page = client.get("/dead-letters")
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    origin = {"origin": str(client.base_url).rstrip("/")}
    fields = {"csrf": csrf, "scope": "filtered", "tenant": DEAD_TENANT, "confirm": str(DEAD)}
    started = time.perf_counter()
    response = client.post("/dead-letters/retry", data=fields, headers=origin)
    assert response.status_code == 303, response.text[:500]
    job_path = "/api/v1" + response.headers["location"]
    while True:
        job = client.get(job_path).json()["job"]
        if job["state"] != "running":
            return time.perf_counter() - started, job
        time.sleep(0.1)


def console(count: int, store: str = "postgresql") -> dict[str, Any]:
    """Figures of the console over ``count`` mails in the history and 10,000 dead letters."""
    with environment(store, tenants=_routes(), metrics_port=0) as env:
        HistoryStore.open(env.settings.store_url.get_secret_value(), migrate_schema=True).close()
        fill_seconds = _fill_history(env, count)
        _dead_letters(env)
        served = ConsoleThread(env.settings).start()
        try:
            with httpx.Client(base_url=served.url.rstrip("/"), timeout=300) as client:
                client.get("/dead-letters")  # warm: connections, templates
                client.get("/overview")
                pages = [f"/dead-letters?page={1 + i % 20}" for i in range(REQUESTS)]
                filtered = [
                    f"/dead-letters?tenant={DEAD_TENANT}&app=a{i % APPS}" for i in range(REQUESTS)
                ]
                searches = [
                    f"/mails?to=r{(i * 7919) % count + 1}@customer.example" for i in range(REQUESTS)
                ]
                figures: dict[str, Any] = {
                    "routes": TENANTS * APPS,
                    "mails_in_history": count,
                    "dead_letters": DEAD,
                    "history_fill_seconds": round(fill_seconds, 1),
                    "overview": _timed(client, ["/overview"] * REQUESTS),
                    "overview_figures": _timed(client, ["/overview/figures"] * REQUESTS),
                    "overview_api": _timed(client, ["/api/v1/overview"] * REQUESTS),
                    "overview_shows": _overview_shows(client),
                    "overview_reading": _overview_reading(env, READINGS),
                    "dead_letter_page": _timed(client, pages),
                    "dead_letter_page_filtered": _timed(client, filtered),
                    "history_search_by_recipient": _timed(client, searches),
                }
                seconds, job = _bulk_retry(client)
        finally:
            served.stop()
    figures["bulk_retry"] = {
        "mails": job["done"],
        "seconds": round(seconds, 2),
        "mails_per_s": round(job["done"] / seconds),
        "message": job["message"],
    }
    figures["at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return json.loads(json.dumps(figures))
