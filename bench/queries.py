"""``python -m bench queries``: the history's searches over a store of millions of mails.

A PostgreSQL database is filled straight with ``generate_series`` (the rows the
history consumer would have left for N mails: 100 tenant/app routes over 30 days,
90 % sent, 1 % dead-lettered, the rest waiting; two events a mail, a retry for one
in ten; one recipient and one tag each; outcome counts in 5-minute steps). The
database is kept between runs (``--mails`` decides its size; it is rebuilt when the
size differs) and dropped with ``--drop``; the mails the timed purge takes are put
back afterwards. Each search runs through rohrpost's own
code, ``REPEAT`` times with varying arguments; p50/p95 are reported with its plan
(``EXPLAIN``), which must use indexes, not scan a big table. The store's size per
million mails is measured from PostgreSQL's relation sizes.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import create_engine, event, make_url, text
from sqlalchemy.engine import Engine

from bench.environment import POSTGRES_URL
from rohrpost.shared.store import HistoryStore, MailFilter
from rohrpost.shared.store.database import create_store_engine, migrate
from rohrpost.shared.store.letters import DeadLetterQuery

DATABASE = "rohrpost_bench_queries"
REPEAT = 50
ROUTES = [(f"t{t}", f"a{a}") for t in range(10) for a in range(10)]
TAGS = 50
SPAN = timedelta(days=30)
BIG_TABLES = ("mails", "events", "mail_recipients", "mail_tags")

# i = 1..N; mail i: route i % 100, created SPAN * (1 - i/N) ago (the newest last),
# status by i % 100: 0 dead_lettered, 1 retrying, 2 scheduled, 3 queued, else sent.
_MAILS = """
INSERT INTO mails (id, tenant, app, status, round, status_rank, status_at, created_at,
                   updated_at, not_before, sent_at, sender, recipients, subject, template,
                   attempts, last_error, reason, message_id, smtp_reply, history, container,
                   content_deleted, tags)
SELECT md5('m' || i)::uuid, 't' || (i % 100 / 10), 'a' || (i % 10),
       s.status, 0, s.rank, c.at + interval '2 seconds', c.at, c.at + interval '2 seconds',
       CASE WHEN s.status = 'scheduled' THEN c.at + interval '1 day' END,
       CASE WHEN s.status = 'sent' THEN c.at + interval '2 seconds' END,
       'shop@acme.example', 'customer' || i || '@example' || (i % 1000) || '.com',
       'Your invoice ' || i, 'invoice', CASE WHEN s.status = 'sent' THEN 1 ELSE 0 END,
       CASE WHEN s.status IN ('dead_lettered', 'retrying')
            THEN '550 5.1.1 <customer' || i || '@example.com>: Recipient address rejected' END,
       CASE WHEN s.status = 'dead_lettered' THEN 'rejected' END,
       '<' || md5('m' || i)::uuid || '@acme.example>', '250 2.0.0 Ok: queued', 'keep',
       '{"tenant":"t' || (i % 100 / 10) || '","app":"a' || (i % 10) ||
       '","template":"invoice","to":["customer' || i || '@example' || (i % 1000) ||
       '.com"],"data":{"customer":"Customer ' || i || '","number":' || i ||
       ',"lines":[{"name":"Article","items": 2,"price": 4.5}],"total": 9.0}}',
       false, ARRAY['campaign-' || (i % :tags)]
FROM generate_series(CAST(:start AS integer), CAST(:stop AS integer)) AS i,
     LATERAL (SELECT now() - :span * (1 - i::float8 / :count) AS at) AS c,
     LATERAL (SELECT CASE i % 100 WHEN 0 THEN 'dead_lettered' WHEN 1 THEN 'retrying'
                     WHEN 2 THEN 'scheduled' WHEN 3 THEN 'queued' ELSE 'sent' END AS status,
                     CASE i % 100 WHEN 0 THEN 3 WHEN 1 THEN 2 WHEN 2 THEN 1 WHEN 3 THEN 0
                     ELSE 3 END AS rank) AS s
ON CONFLICT DO NOTHING
"""
_EVENTS = """
INSERT INTO events (event_id, mail_id, kind, at, round, attempt, error, smtp_reply, message_id)
SELECT md5('e' || e.n || '.' || i)::uuid, md5('m' || i)::uuid, e.kind,
       now() - :span * (1 - i::float8 / :count) + e.after, 0, e.attempt, e.error, e.reply,
       e.message_id
FROM generate_series(CAST(:start AS integer), CAST(:stop AS integer)) AS i,
     LATERAL (VALUES
        (1, 'submitted', interval '0', NULL::int, NULL::text, NULL::text, NULL::text),
        (2, CASE WHEN i % 100 = 0 THEN 'dead_lettered' WHEN i % 100 = 1 THEN 'attempt_failed'
                 ELSE 'sent' END, interval '2 seconds', 1,
            CASE WHEN i % 100 IN (0, 1) THEN '550 5.1.1 rejected' END,
            CASE WHEN i % 100 > 3 THEN '250 2.0.0 Ok: queued' END,
            CASE WHEN i % 100 > 3 THEN '<' || i || '@acme.example>' END),
        (3, CASE WHEN i % 10 = 5 THEN 'attempt_failed' END, interval '1 second', 1,
            '421 4.3.2 busy', NULL, NULL)
     ) AS e(n, kind, after, attempt, error, reply, message_id)
WHERE e.kind IS NOT NULL AND NOT (i % 100 IN (2, 3) AND e.n = 2)
ON CONFLICT DO NOTHING
"""
_RECIPIENTS = """
INSERT INTO mail_recipients (mail_id, address)
SELECT md5('m' || i)::uuid, 'customer' || i || '@example' || (i % 1000) || '.com'
FROM generate_series(CAST(:start AS integer), CAST(:stop AS integer)) AS i
ON CONFLICT DO NOTHING
"""
_TAGS = """
INSERT INTO mail_tags (mail_id, tag)
SELECT md5('m' || i)::uuid, 'campaign-' || (i % :tags)
FROM generate_series(CAST(:start AS integer), CAST(:stop AS integer)) AS i
ON CONFLICT DO NOTHING
"""
_COUNTS = """
INSERT INTO outcome_counts (tenant, app, kind, step, count)
SELECT m.tenant, m.app, e.kind,
       date_trunc('hour', e.at) + floor(extract(minute FROM e.at) / 5) * interval '5 minutes',
       count(*)
FROM events e JOIN mails m ON m.id = e.mail_id
WHERE e.at >= now() - interval '2 days'
GROUP BY 1, 2, 3, 4
"""
_CHUNK = 1_000_000


def _database_url() -> str:
    return make_url(POSTGRES_URL).set(database=DATABASE).render_as_string(hide_password=False)


def _admin() -> Engine:
    return create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")


def drop() -> None:
    """Drop the benchmark's database."""
    admin = _admin()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'))
    admin.dispose()


def _filled_with(engine: Engine) -> int:
    with engine.connect() as conn:
        try:
            return int(conn.execute(text("SELECT count(*) FROM mails")).scalar_one())
        except Exception:
            return -1


def build(count: int) -> dict[str, Any]:
    """The database with ``count`` mails (kept if it already has them); build figures."""
    admin = _admin()
    with admin.connect() as conn:
        exists = conn.execute(
            text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": DATABASE}
        ).first()
        if not exists:
            conn.execute(text(f'CREATE DATABASE "{DATABASE}"'))
    admin.dispose()
    engine = create_store_engine(_database_url())
    try:
        if _filled_with(engine) == count:
            return {"built": False}
        drop()
        admin = _admin()
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{DATABASE}"'))
        admin.dispose()
        engine.dispose()
        engine = create_store_engine(_database_url())
        migrate(engine)
        started = time.perf_counter()
        _fill(engine, count)
        return {"built": True, "build_seconds": round(time.perf_counter() - started)}
    finally:
        engine.dispose()


def _fill(engine: Engine, count: int) -> None:
    for start in range(1, count + 1, _CHUNK):
        stop = _make_mails(engine, count, start, _CHUNK)[1]
        print(f"  filled {stop:,} of {count:,} mails", flush=True)
    with engine.begin() as conn:
        conn.execute(text(_COUNTS), _arguments(count))
    _vacuum(engine)


def _arguments(count: int) -> dict[str, Any]:
    return {"count": count, "span": SPAN, "tags": TAGS}


def _make_mails(engine: Engine, count: int, start: int, size: int) -> tuple[int, int]:
    """Mails ``start`` .. (at most ``size``) with their rows, those not there yet, in
    one transaction; how many mails it made, and the last one's number."""
    chunk = {**_arguments(count), "start": start, "stop": min(count, start + size - 1)}
    with engine.begin() as conn:
        made = conn.execute(text(_MAILS), chunk).rowcount
        for statement in (_EVENTS, _RECIPIENTS, _TAGS):
            conn.execute(text(statement), chunk)
    return made, chunk["stop"]


def _vacuum(engine: Engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))


def _timed(run: Callable[[int], Any]) -> dict[str, float]:
    run(0)  # warm the cache as a running console would have it
    times = []
    for n in range(1, REPEAT + 1):
        started = time.perf_counter()
        run(n)
        times.append((time.perf_counter() - started) * 1000)
    cuts = statistics.quantiles(times, n=20, method="inclusive")
    return {"p50_ms": round(statistics.median(times), 1), "p95_ms": round(cuts[18], 1)}


def _scan(line: str) -> str:
    """``Index Scan using ix_x on mails`` out of a plan line."""
    return line.strip().removeprefix("->").strip().split("  (cost")[0]


def _scans_a_big_table(plan: list[str]) -> bool:
    return any(f"Seq Scan on {table} " in line for line in plan for table in BIG_TABLES)


def measure(count: int) -> dict[str, Any]:
    """Build (or reuse) the store of ``count`` mails and time every search on it."""
    figures: dict[str, Any] = {"mails": count, **build(count)}
    store = HistoryStore(create_store_engine(_database_url()))
    rng = random.Random(7)
    now = datetime.now(UTC)

    def mail(n: int) -> int:
        return rng.randint(1, count)

    searches: dict[str, Callable[[int], Any]] = {
        "by_recipient": lambda n: store.list_mails(
            MailFilter(to=f"customer{(i := mail(n))}@example{i % 1000}.com", limit=50)
        ),
        "by_tenant_status_time": lambda n: store.list_mails(
            MailFilter(
                tenant=f"t{n % 10}",
                status="sent",
                since=now - timedelta(days=1 + n % 5),
                until=now - timedelta(days=n % 5),
                limit=50,
            )
        ),
        "by_tag": lambda n: store.list_mails(MailFilter(tag=f"campaign-{n % TAGS}", limit=50)),
        "by_id_prefix": lambda n: store.list_mails(
            MailFilter(id_prefix=uuid.uuid4().hex[:4], limit=50)
        ),
        "dead_letters_of_a_tenant": lambda n: store.dead_letters(
            DeadLetterQuery(tenant=f"t{n % 10}", limit=50)
        ),
        "overview_counts_hour": lambda n: store.recent_counts(now - timedelta(hours=1)),
        "overview_counts_day": lambda n: store.recent_counts(now - timedelta(days=1)),
    }
    plans = {}
    for name, run in searches.items():
        figures[name] = _timed(run)
        plans[name] = _plans_of(store.engine, lambda run=run: run(0))
    figures["plans_use_indexes"] = {
        name: not any(_scans_a_big_table(plan) for plan in found) for name, found in plans.items()
    }
    # the scans each search's plans use (index names), to read with the figures
    figures["scans"] = {
        name: sorted({_scan(line) for plan in found for line in plan if "Scan" in line})
        for name, found in plans.items()
    }
    figures["mib_per_million_mails"] = _size_per_million(store.engine, count)
    figures["purge"] = _purge(store, now - SPAN * 0.9)  # the oldest tenth: expired
    figures["purge"]["restored_seconds"] = _restore(store.engine, count)
    store.close()
    return figures


def _restore(engine: Engine, count: int) -> float:
    """Put the purged mails back (the same rows), so the next run finds the store whole.

    The purge took the oldest finished mails (the lowest ``i``); the rows are made
    again chunk by chunk from ``i = 1`` until a chunk finds every mail still there.
    """
    started = time.perf_counter()
    chunk_size = 100_000
    for start in range(1, count + 1, chunk_size):
        if not _make_mails(engine, count, start, chunk_size)[0]:
            break
    _vacuum(engine)
    return round(time.perf_counter() - started, 1)


def _purge(store: HistoryStore, cutoff: datetime) -> dict[str, Any]:
    """Purge the mails finished before ``cutoff`` as retention does: batches and their times.

    The history consumer purges one batch between its batches of ingest, so the
    longest batch is the longest ingest waits. The store is rebuilt on the next run.
    """
    moments = [time.perf_counter()]
    purged = store.purge(cutoff, on_progress=lambda _done: moments.append(time.perf_counter()))
    batches = [later - earlier for earlier, later in itertools.pairwise(moments)]
    total = moments[-1] - moments[0]
    return {
        "mails": purged,
        "seconds": round(total, 1),
        "mails_per_s": round(purged / total) if total else 0,
        "batches": len(batches),
        "longest_batch_s": round(max(batches, default=0.0), 3),
        "batch_p95_s": round(statistics.quantiles(batches, n=20)[18], 3) if len(batches) > 1 else 0,
    }


def _plans_of(engine: Engine, run: Callable[[], Any]) -> list[list[str]]:
    """The plans (``EXPLAIN``) of every statement ``run`` sends, with its parameters."""
    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        run()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    plans = []
    with engine.connect() as conn:
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        for statement, parameters in sent:
            if statement.lstrip().upper().startswith("SELECT"):
                cursor.execute(f"EXPLAIN {statement}", parameters)
                plans.append([row[0] for row in cursor.fetchall()])
    return plans


def _size_per_million(engine: Engine, count: int) -> dict[str, float]:
    sizes = {}
    with engine.connect() as conn:
        for table in (*BIG_TABLES, "outcome_counts"):
            total = conn.execute(
                text("SELECT pg_total_relation_size(:t)"), {"t": table}
            ).scalar_one()
            sizes[table] = round(total / 2**20 / (count / 1_000_000), 1)
    sizes["all"] = round(sum(sizes.values()), 1)
    return sizes
