"""``python -m bench.profile [--mails N] [--top K]``: where bulk submit spends its CPU.

Bulk submit is bounded by the submitting process's CPU (the broker has the other
core). This measures, for ``submit_many`` and for the raw pika ceiling, the client's
CPU per message, split by thread: the caller's thread (validation, serialization,
hand-over) and the I/O thread (AMQP framing, socket writes, confirms). Then it
profiles both threads of one ``submit_many`` with cProfile and prints the functions
that cost the most. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench import ceiling
from bench.environment import BROKER_URL, environment
from bench.workload import mails
from rohrpost.producer.client import Producer
from rohrpost.shared.broker import Broker
from rohrpost.shared.logs import configure_logging


@contextmanager
def _io_thread_watch(profile: bool) -> Iterator[dict[str, Any]]:
    """Record the CPU time (and optionally a cProfile) of every Broker I/O thread."""
    seen: dict[str, Any] = {"cpu": 0.0, "profiles": []}
    original: Callable[[Broker], None] = Broker._run_loop

    def watched(self: Broker) -> None:
        profiler = cProfile.Profile() if profile else None
        started = time.thread_time()
        try:
            if profiler is not None:
                profiler.runcall(original, self)
            else:
                original(self)
        finally:
            seen["cpu"] += time.thread_time() - started
            if profiler is not None:
                seen["profiles"].append(profiler)

    Broker._run_loop = watched  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        Broker._run_loop = original  # type: ignore[method-assign]


def _top(profiler: cProfile.Profile, count: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(count)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    return "\n".join(lines[start : start + count + 1])


def measure_submit(batch: list[dict[str, Any]]) -> dict[str, float]:
    """CPU µs per mail of one submit_many, by thread, without a profiler attached."""
    count = len(batch)
    with (
        environment("sqlite") as env,
        _io_thread_watch(profile=False) as io_thread,
        Producer(env.settings) as producer,
    ):
        wall, cpu, main = time.perf_counter(), time.process_time(), time.thread_time()
        producer.submit_many(batch)
        wall = time.perf_counter() - wall
        main = time.thread_time() - main
        cpu = time.process_time() - cpu
        prepare = time.thread_time()
        for mail in batch:
            producer.prepare(mail)
        prepare = time.thread_time() - prepare
    return {
        "mails_per_s": round(count / wall),
        "process_cpu_us": round(cpu / count * 1e6, 1),
        "caller_thread_cpu_us": round(main / count * 1e6, 1),
        "prepare_cpu_us": round(prepare / count * 1e6, 1),
        "io_thread_cpu_us": round(io_thread["cpu"] / count * 1e6, 1),
        "cpu_share_of_wall": round(cpu / wall, 2),
    }


def measure_ceiling(count: int) -> dict[str, float]:
    """CPU µs per message of the raw pika ceiling (one thread)."""
    wall, cpu = time.perf_counter(), time.process_time()
    rate = ceiling.measure(BROKER_URL, count)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "msgs_per_s": round(rate),
        "process_cpu_us": round(cpu / count * 1e6, 1),
        "cpu_share_of_wall": round(cpu / wall, 2),
    }


def profile_submit(batch: list[dict[str, Any]], top: int) -> tuple[str, str]:
    """cProfile of both threads of one submit_many: (caller thread, I/O thread)."""
    with (
        environment("sqlite") as env,
        _io_thread_watch(profile=True) as io_thread,
        Producer(env.settings) as producer,
    ):
        caller = cProfile.Profile()
        caller.runcall(producer.submit_many, batch)
    return _top(caller, top), _top(io_thread["profiles"][0], top)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--mails", type=int, default=20_000, help="mails per run (20000)")
    parser.add_argument("--top", type=int, default=15, help="functions shown per thread (15)")
    args = parser.parse_args()
    configure_logging("warning")
    batch = list(mails(args.mails))
    raw = measure_ceiling(args.mails)
    submit = measure_submit(batch)
    print("== client CPU per message (µs) ==")
    print(f"  raw pika ceiling   {raw['process_cpu_us']:>7}   ({raw['msgs_per_s']} msgs/s)")
    print(f"  submit_many        {submit['process_cpu_us']:>7}   ({submit['mails_per_s']} mails/s)")
    print(f"    caller thread    {submit['caller_thread_cpu_us']:>7}")
    print(f"      of it prepare  {submit['prepare_cpu_us']:>7}   (validate + serialize)")
    print(f"    I/O thread       {submit['io_thread_cpu_us']:>7}   (pika framing, confirms)")
    caller, io_thread = profile_submit(batch, args.top)
    print("\n== caller thread, by own time ==")
    print(caller)
    print("\n== I/O thread, by own time ==")
    print(io_thread)
    print(json.dumps({"mails": args.mails, "raw_pika": raw, "submit_many": submit}))


if __name__ == "__main__":
    main()
