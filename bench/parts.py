"""The benchmark's parts; each returns its figures as a flat dict."""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import statistics
import subprocess
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil
from sqlalchemy import select, text

from bench import baseline, ceiling
from bench.environment import BROKER_URL, Environment, environment
from bench.workload import APP, TENANT, mails
from rohrpost.catcher import free_port
from rohrpost.producer.client import Producer
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.logs import configure_logging
from rohrpost.shared.settings import Settings
from rohrpost.shared.store import tables
from rohrpost.shared.topology import queue_depths


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def _children(run: psutil.Process) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(workers, history consumer) of a ``rohrpost run``: the history child starts last."""
    children = sorted(
        (
            c
            for c in run.children()
            if "multiprocessing.resource_tracker" not in " ".join(c.cmdline())
        ),
        key=lambda c: c.create_time(),
    )
    return children[:-1], children[-1:]


def _wait_archived(env: Environment, count: int, timeout: float) -> float:
    """Wait until the store has ``count`` sent mails; return when that was seen."""
    engine = env.store_engine()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                done = conn.execute(
                    text("SELECT count(*) FROM mails WHERE status = 'sent'")
                ).scalar_one()
            if done >= count:
                return time.perf_counter()
            time.sleep(0.1)
    finally:
        engine.dispose()
    raise TimeoutError(f"only {done} of {count} mails were sent and archived")


def _submit_share(settings: Settings, start: int, count: int, go: Any, done: Any) -> None:
    """In a child process: submit mails ``start`` .. ``start + count`` once ``go`` is set."""
    configure_logging("warning")
    batch = list(itertools.islice(mails(start + count), start, None))
    with Producer(settings) as producer:
        go.wait()
        producer.submit_many(batch)
        done.put(time.perf_counter())


def _parallel_submit(settings: Settings, count: int, processes: int) -> float:
    """Mails per second of ``processes`` producer processes sharing ``count`` mails."""
    context = multiprocessing.get_context("spawn")
    go, done = context.Event(), context.Queue()
    share = count // processes
    children = [
        context.Process(target=_submit_share, args=(settings, i * share, share, go, done))
        for i in range(processes)
    ]
    for child in children:
        child.start()
    time.sleep(5)  # started, connected, mails built
    started = time.perf_counter()
    go.set()
    finished = max(done.get(timeout=300) for _ in children)
    for child in children:
        child.join(30)
    return share * processes / (finished - started)


def submit(count: int, store: str = "sqlite", rounds: int = 3) -> dict[str, Any]:
    """Bulk submit with submit_many, beside the raw pika ceiling, alternating ``rounds`` times.

    This machine's broker varies by a third from run to run, so ceiling and submit
    alternate and the medians are compared. Each round also submits the same number
    of mails from two producer processes at once (one submit_many each): one
    process is bounded by its GIL, and that is how a bulk load uses both cores.
    """
    ceilings, rates, same_route, parallel = [], [], [], []
    batch = list(mails(count))
    for _ in range(rounds):
        ceilings.append(ceiling.measure(BROKER_URL, count))
        with environment(store) as env, Producer(env.settings) as producer:
            started = time.perf_counter()
            producer.submit_many(batch)
            rates.append(count / (time.perf_counter() - started))
            body = producer.prepare(batch[0])[1].body
        with environment(store) as env:
            parallel.append(_parallel_submit(env.settings, count, processes=2))
        with environment(store) as env:
            same_route.append(
                ceiling.measure(
                    BROKER_URL,
                    count,
                    exchange=env.topology.submit_exchange,
                    routing_key=env.topology.route_key(TENANT, APP),
                    body=body,
                )
            )
    rate, ceiling_rate = statistics.median(rates), statistics.median(ceilings)
    route_rate = statistics.median(same_route)
    return {
        "mails": count,
        "rounds": rounds,
        "submit_mails_per_s": round(rate),
        "ceiling_msgs_per_s": round(ceiling_rate),
        "ratio_to_ceiling": round(rate / ceiling_rate, 3),
        "submit_runs": [round(r) for r in rates],
        "ceiling_runs": [round(c) for c in ceilings],
        # raw pika again, but on rohrpost's route: mail-sized bodies into the submit
        # exchange, which stores each in the send queue and the history queue
        "same_route_msgs_per_s": round(route_rate),
        "ratio_to_same_route": round(rate / route_rate, 3),
        # the same mails from two producer processes at once
        "two_processes_mails_per_s": round(statistics.median(parallel)),
        "two_processes_ratio_to_ceiling": round(statistics.median(parallel) / ceiling_rate, 3),
        "two_processes_runs": [round(r) for r in parallel],
    }


def _rohrpost_e2e(
    count: int, processes: int, store: str, *, with_baseline: bool = False, **overrides: Any
) -> dict[str, float]:
    """One run: submit ``count`` mails while ``rohrpost run`` works, until all are archived.

    ``with_baseline``: then the plain-process baseline sends as many to the same sink.
    """
    with environment(store, **overrides) as env:
        port = free_port()
        run = env.rohrpost("run", "--processes", str(processes), metrics_port=port)
        workers, history = _children(run)
        cpu_before = _cpu_seconds(workers), _cpu_seconds(history)
        batch = list(mails(count))
        started = time.perf_counter()
        with Producer(env.settings) as producer:
            producer.submit_many(batch)
        finished = _wait_archived(env, count, timeout=max(120, count / 50))
        worker_cpu = _cpu_seconds(workers) - cpu_before[0]
        history_cpu = _cpu_seconds(history) - cpu_before[1]
        env.stop(run)
        port = env.settings.smtp["sink"].port
        return {
            "seconds": finished - started,
            "rate": count / (finished - started),
            "worker_cpu": worker_cpu,
            "history_cpu": history_cpu,
            "baseline": baseline.measure(port, count) if with_baseline else 0.0,
        }


def _e2e_round(count: int, processes: int, store: str, *, sqlite_first: bool) -> dict[str, float]:
    """rohrpost, the plain-process baseline, and rohrpost without shared state, in turn.

    ``sqlite_first``: when ``store`` is not SQLite, the SQLite run comes first in this
    round instead of last (rounds alternate, so neither store always runs on a broker
    still busy with the run before).
    """
    sqlite_rate = None
    if store != "sqlite" and sqlite_first:
        sqlite_rate = _rohrpost_e2e(count, processes, "sqlite")["rate"]
    run = _rohrpost_e2e(count, processes, store, with_baseline=True)
    # Without Redis: no duplicate checks at submit, no send claims in the workers.
    unchecked = _rohrpost_e2e(count, processes, store, redis_url="")
    run["unchecked_rate"] = unchecked["rate"]
    run["unchecked_worker_cpu"] = unchecked["worker_cpu"]
    if store != "sqlite":  # production's store against the default one, same round
        if sqlite_rate is None:
            sqlite_rate = _rohrpost_e2e(count, processes, "sqlite")["rate"]
        run["sqlite_rate"] = sqlite_rate
    return run


def e2e(count: int, processes: int, store: str = "sqlite", rounds: int = 3) -> dict[str, Any]:
    """Submit while ``rohrpost run`` works, until every mail is sent and archived.

    Beside each round, the plain-process baseline sends the same mails, and rohrpost
    runs once more without the shared state (the cost of the idempotency checks) and,
    when ``store`` is not SQLite, once more on SQLite (the production store's cost).
    This machine's speed varies by a third between minutes, so rounds alternate and
    the medians of the per-round ratios are reported.
    """
    runs = [_e2e_round(count, processes, store, sqlite_first=i % 2 == 1) for i in range(rounds)]
    middle = sorted(runs, key=lambda r: r["rate"] / r["baseline"])[len(runs) // 2]
    checked = [r["rate"] / r["unchecked_rate"] for r in runs]
    return {
        "mails": count,
        "seconds": round(middle["seconds"], 2),
        "mails_per_s": round(middle["rate"]),
        "baseline_mails_per_s": round(middle["baseline"]),
        "ratio_to_baseline": round(middle["rate"] / middle["baseline"], 3),
        "ratios": [round(r["rate"] / r["baseline"], 3) for r in runs],
        "processes": processes,
        "worker_cpu_s_per_1000": round(middle["worker_cpu"] / count * 1000, 3),
        "history_cpu_s_per_1000": round(middle["history_cpu"] / count * 1000, 3),
        # idempotency: rohrpost with Redis against rohrpost without, same round
        "unchecked_mails_per_s": round(statistics.median(r["unchecked_rate"] for r in runs)),
        "ratio_to_unchecked": round(statistics.median(checked), 3),
        "ratios_to_unchecked": [round(c, 3) for c in checked],
        "unchecked_worker_cpu_s_per_1000": round(
            statistics.median(r["unchecked_worker_cpu"] for r in runs) / count * 1000, 3
        ),
        "store": store,
        **_against_sqlite(runs),
    }


def _against_sqlite(runs: list[dict[str, float]]) -> dict[str, Any]:
    """With another store: the same round's rate on SQLite, and the ratios to it."""
    if "sqlite_rate" not in runs[0]:
        return {}
    ratios = [r["rate"] / r["sqlite_rate"] for r in runs]
    return {
        "sqlite_mails_per_s": round(statistics.median(r["sqlite_rate"] for r in runs)),
        "ratio_to_sqlite": round(statistics.median(ratios), 3),
        "ratios_to_sqlite": [round(r, 3) for r in ratios],
    }


def _lateness(env: Environment) -> list[float]:
    """Seconds between each sent mail's not_before and its ``sent`` event."""
    mail_rows, events = tables.mails, tables.events
    query = (
        select(mail_rows.c.not_before, events.c.at)
        .join(events, events.c.mail_id == mail_rows.c.id)
        .where(events.c.kind == "sent")
    )
    engine = env.store_engine()
    try:
        with engine.connect() as conn:
            return [(at - not_before).total_seconds() for not_before, at in conn.execute(query)]
    finally:
        engine.dispose()


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "p50": round(cuts[49], 3),
        "p99": round(cuts[98], 3),
        "max": round(ordered[-1], 3),
        "early": sum(1 for v in ordered if v < 0),
    }


def _release(env: Environment, count: int, due: datetime) -> dict[str, float]:
    """Poll the send queue (no worker consumes) to see when the delay levels release mails."""
    queue = env.topology.send_queue(TENANT, APP)
    arrivals: list[tuple[float, int]] = []
    with admin_channel(BROKER_URL) as channel:
        while not arrivals or arrivals[-1][1] < count:
            depth = queue_depths(channel, [queue])[queue]
            arrivals.append((time.time(), depth))
            if arrivals[-1][0] > due.timestamp() + 300:
                raise TimeoutError(f"only {depth} of {count} mails were released")
            time.sleep(0.05)

    def when(share: float) -> float:
        needed = math.ceil(count * share)
        return next(t for t, depth in arrivals if depth >= needed) - due.timestamp()

    early = max((depth for t, depth in arrivals if t < due.timestamp()), default=0)
    return {
        "p50": round(when(0.5), 3),
        "p99": round(when(0.99), 3),
        "max": round(when(1), 3),
        "early": early,
    }


def punctuality(count: int, processes: int, store: str = "sqlite") -> dict[str, Any]:
    """``count`` mails due in the same second 20 s ahead; then 200 spread over 60 s.

    The burst is measured twice: when the delay levels release the mails into the
    send queue (no worker running, so nothing else counts), and when they are sent
    (workers running; sending ``count`` mails takes count / throughput seconds, so
    that figure is bounded by the end-to-end rate, not by the scheduler).
    """
    with environment(store) as env:
        due = (datetime.now(UTC) + timedelta(seconds=20)).replace(microsecond=0)
        with Producer(env.settings) as producer:
            producer.submit_many(mails(count, not_before=due))
        release = _release(env, count, due)
    with environment(store) as env:
        env.rohrpost("run", "--processes", str(processes), metrics_port=free_port())
        due = (datetime.now(UTC) + timedelta(seconds=20)).replace(microsecond=0)
        with Producer(env.settings) as producer:
            producer.submit_many(mails(count, not_before=due))
        _wait_archived(env, count, timeout=max(180, count / 50))
        burst = _percentiles(_lateness(env))
    with environment(store) as env:
        env.rohrpost("run", "--processes", str(processes), metrics_port=free_port())
        start = datetime.now(UTC) + timedelta(seconds=5)
        with Producer(env.settings) as producer:
            for i, mail in enumerate(mails(200)):
                mail["not_before"] = (start + timedelta(seconds=i * 0.3)).isoformat()
                producer.submit(mail)
        _wait_archived(env, 200, timeout=180)
        spread = _percentiles(_lateness(env))
    return {
        "mails": count,
        "burst_release_p50_s": release["p50"],
        "burst_release_p99_s": release["p99"],
        "burst_release_max_s": release["max"],
        "burst_released_early": release["early"],
        "burst_sent_p50_s": burst["p50"],
        "burst_sent_p99_s": burst["p99"],
        "burst_sent_max_s": burst["max"],
        "burst_sent_early": burst["early"],
        "spread_sent_p99_s": spread["p99"],
        "spread_sent_max_s": spread["max"],
        "spread_sent_early": spread["early"],
    }


def _broker_memory() -> int:
    status = subprocess.run(
        ["rabbitmqctl", "status", "--formatter", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(json.loads(status.stdout)["memory"]["total"]["rss"])


def scale(count: int, store: str = "sqlite") -> dict[str, Any]:
    """``count`` mails scheduled an hour ahead: submit time, broker memory, worker RSS."""
    with environment(store, history_enabled=False) as env:
        worker = env.rohrpost("worker", metrics_port=free_port())
        rss_before = worker.memory_info().rss
        memory_before = _broker_memory()
        due = datetime.now(UTC) + timedelta(hours=1)
        with Producer(env.settings) as producer:
            started = time.perf_counter()
            producer.submit_many(mails(count, not_before=due))
            elapsed = time.perf_counter() - started
        time.sleep(5)  # let the worker settle before reading its memory
        rss_after = worker.memory_info().rss
        memory_after = _broker_memory()
        env.stop(worker)
    return {
        "mails": count,
        "submit_seconds": round(elapsed, 1),
        "submit_mails_per_s": round(count / elapsed),
        "broker_rss_mib_before": round(memory_before / 2**20),
        "broker_rss_mib_after": round(memory_after / 2**20),
        "worker_rss_mib_before": round(rss_before / 2**20, 1),
        "worker_rss_mib_after": round(rss_after / 2**20, 1),
        "worker_rss_change": round(rss_after / rss_before - 1, 3),
    }
