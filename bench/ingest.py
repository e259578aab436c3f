"""History ingest: the event stream of N mails, pre-loaded, archived by history consumers.

The stream is what the pipeline produces for a day of mail: every mail's container
(the ``submitted`` record, as the submit exchange delivers it), and the workers'
outcome batches (JSON arrays of events): most mails sent at the first attempt,
some after a failed one, some scheduled first, a few dead-lettered. It is published
straight into ``{ns}.history`` before any consumer runs, so the figure is the
consumer's own speed, not the workers'.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import psutil
from sqlalchemy import make_url, text

from bench.environment import Environment, environment
from bench.workload import APP, TENANT, mails
from rohrpost.consumer.events import BATCH_TYPE, batch_body
from rohrpost.shared.broker import BatchConfirm, Broker, Publication
from rohrpost.shared.container import encode_container, parse_container
from rohrpost.shared.events import EventKind, MailEvent
from rohrpost.shared.wire import mail_properties

#: Mails per outcome batch, as workers publish them (up to 200 events or 20 ms).
_BATCH = 200


def _outcomes(mail_id: uuid.UUID, created: datetime, i: int) -> list[MailEvent]:
    """The workers' events of mail ``i``: 85 % sent, 10 % after one failure, 5 % dead."""
    common: dict[str, Any] = {"mail_id": mail_id, "tenant": TENANT, "app": APP}
    sent_at = created + timedelta(seconds=2)
    if i % 20 == 19:
        return [
            MailEvent(
                kind=EventKind.DEAD_LETTERED,
                attempt=1,
                reason="rejected",
                error="550 5.1.1 <customer@example.com>: Recipient address rejected",
                at=sent_at,
                **common,
            )
        ]
    events = []
    attempt = 1
    if i % 10 == 3:
        events.append(
            MailEvent(
                kind=EventKind.ATTEMPT_FAILED,
                attempt=1,
                error="421 4.3.2 busy, try again later",
                retry_in_seconds=30,
                at=sent_at,
                **common,
            )
        )
        attempt, sent_at = 2, sent_at + timedelta(seconds=30)
    events.append(
        MailEvent(
            kind=EventKind.SENT,
            attempt=attempt,
            smtp_reply="250 2.0.0 Ok: queued as 4Xyz",
            message_id=f"<{mail_id}@acme.example>",
            subject=f"Your invoice {100_000 + i}",
            at=sent_at,
            **common,
        )
    )
    return events


def _stream(count: int, exchange: str, queue: str) -> Iterator[Publication]:
    """Every message of ``count`` mails' history, in the order the broker would hold them."""
    now = datetime.now(UTC)
    pending: list[MailEvent] = []
    for i, fields in enumerate(mails(count)):
        created = now + timedelta(milliseconds=i)
        extra = {"created_at": created.isoformat()}
        if i % 20 == 7:  # scheduled an hour ahead: `scheduled` comes with `submitted`
            extra["not_before"] = (created + timedelta(hours=1)).isoformat()
        mail = parse_container({**fields, **extra})
        properties = mail_properties(str(mail.id))
        yield Publication(exchange, queue, encode_container(mail), properties)
        pending += _outcomes(mail.id, created, i)
        if len(pending) >= _BATCH:
            yield _batch(exchange, queue, pending)
            pending = []
    if pending:
        yield _batch(exchange, queue, pending)


def _batch(exchange: str, queue: str, events: list[MailEvent]) -> Publication:
    properties = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=2,
        message_id=str(uuid.uuid4()),
        type=BATCH_TYPE,
    )
    return Publication(exchange, queue, batch_body(events), properties)


def _preload(env: Environment, count: int) -> int:
    """Publish the stream into ``{ns}.history`` (default exchange); return its events."""
    broker = Broker(env.settings.broker_url.get_secret_value(), name="bench-preload")
    broker.start()
    events = 0
    try:
        chunk: list[Publication] = []
        for publication in _stream(count, "", env.topology.history_queue):
            chunk.append(publication)
            if publication.properties.type == BATCH_TYPE:
                events += len(json.loads(publication.body))
            else:
                events += 2 if b'"not_before"' in publication.body else 1
            if len(chunk) == 2000:
                _confirmed(broker.publish_many(chunk))
                chunk = []
        _confirmed(broker.publish_many(chunk))
    finally:
        broker.close()
    return events


def _confirmed(batch: BatchConfirm) -> None:
    if not batch.wait(120) or batch.failures:
        raise RuntimeError(f"preloading the history queue failed: {batch.failures[:1]}")


@dataclass
class _Progress:
    """When the first mails were in the store (and the consumers' CPU then), and all."""

    first_at: float = 0.0
    first_mails: int = 0
    first_cpu: float = 0.0
    finished: float = 0.0


def _drained(env: Environment, count: int, timeout: float, cpu: Callable[[], float]) -> _Progress:
    """Wait until the store holds ``count`` mails in a final state; note the first ones.

    The consumers' start-up (imports, connecting) ends when the first mails are in
    the store: from then on is the steady rate, and the CPU ``cpu()`` says it took.
    """
    engine = env.store_engine()
    deadline = time.monotonic() + timeout
    progress = _Progress()
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                done = conn.execute(
                    text("SELECT count(*) FROM mails WHERE status IN ('sent', 'dead_lettered')")
                ).scalar_one()
            if done and not progress.first_mails:
                progress.first_at, progress.first_mails = time.perf_counter(), done
                progress.first_cpu = cpu()
            if done >= count:
                progress.finished = time.perf_counter()
                return progress
            time.sleep(0.05)
    finally:
        engine.dispose()
    raise TimeoutError(f"only {done} of {count} mails archived")


def _round(count: int, store: str, consumers: int) -> dict[str, float]:
    with environment(store) as env:
        env.rohrpost("store", "migrate")  # not part of the timed archiving
        for handle in env.processes:
            handle.wait(120)
        events = _preload(env, count)
        started = time.perf_counter()
        database = make_url(env.settings.store_url.get_secret_value()).database or ""
        services_at_start = _services_cpu(store, database)
        processes = [env.rohrpost("history-consumer") for _ in range(consumers)]
        cpu_at_start = sum(_cpu(p) for p in processes)
        progress = _drained(
            env, count, max(300, count / 200), lambda: sum(_cpu(p) for p in processes)
        )
        cpu_at_end = sum(_cpu(p) for p in processes)
        cpu = cpu_at_end - cpu_at_start
        services = {
            name: used - services_at_start.get(name, 0.0)
            for name, used in _services_cpu(store, database).items()
        }
        for process in processes:
            env.stop(process)
    steady = count - progress.first_mails
    return {
        "seconds": progress.finished - started,
        "events": events,
        "cpu": cpu,
        "steady_mails": steady,
        "steady_seconds": progress.finished - progress.first_at,
        "steady_cpu": cpu_at_end - progress.first_cpu,
        **services,
    }


def _cpu(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.Error:  # gone meanwhile (a database backend that closed)
        return 0.0
    return times.user + times.system


def _services_cpu(store: str, database: str) -> dict[str, float]:
    """CPU seconds used so far by the local broker and the run's database backends.

    They share the machine's cores with the consumers; what they spend per 1,000
    mails bounds the ingest rate whatever the consumer does. The broker's figure is
    all of its work (whatever else uses it meanwhile counts too); PostgreSQL's is
    the backends connected to the run's database (their WAL writing included, the
    server's shared background processes not). Backends that closed during the run
    are missed (the consumers' own stay connected throughout).
    """
    used = {"broker_cpu": 0.0}
    if store == "postgresql":
        used["database_cpu"] = 0.0
    backend = f" {database} "
    for process in psutil.process_iter(["name", "cmdline"]):
        name, command = process.info["name"], " ".join(process.info["cmdline"] or ())
        if name == "beam.smp":
            used["broker_cpu"] += _cpu(process)
        elif "database_cpu" in used and name == "postgres" and backend in command:
            used["database_cpu"] += _cpu(process)
    return used


def ingest(
    count: int, store: str = "sqlite", consumers: int = 1, rounds: int = 3
) -> dict[str, Any]:
    """Archive ``count`` mails' pre-loaded history with ``consumers`` history consumers.

    The consumers' start-up (imports, connecting) falls inside the timed window, as
    it does for a consumer that restarts behind a backlog; ``steady_*`` is the rate and
    CPU from the first archived mails on, without it.
    """
    runs = [_round(count, store, consumers) for _ in range(rounds)]
    middle = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    return {
        "mails": count,
        "events": int(middle["events"]),
        "consumers": consumers,
        "store": store,
        "seconds": round(middle["seconds"], 2),
        "mails_per_s": round(count / middle["seconds"]),
        "events_per_s": round(middle["events"] / middle["seconds"]),
        "consumer_cpu_s_per_1000_mails": round(middle["cpu"] / count * 1000, 3),
        "steady_mails_per_s": round(middle["steady_mails"] / middle["steady_seconds"]),
        "steady_consumer_cpu_s_per_1000_mails": round(
            middle["steady_cpu"] / middle["steady_mails"] * 1000, 3
        ),
        **{
            f"{name}_s_per_1000_mails": round(middle[name] / count * 1000, 3)
            for name in ("broker_cpu", "database_cpu")
            if name in middle
        },
        "mails_per_s_runs": [round(count / r["seconds"]) for r in runs],
        "median_of": len(runs),
        "spread": round(statistics.pstdev(count / r["seconds"] for r in runs)),
    }
