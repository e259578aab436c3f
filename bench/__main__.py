"""``python -m bench submit|e2e|punctuality|scale|history|console|limits|all``, and ``cluster``."""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import ingest, parts
from rohrpost.shared.logs import configure_logging

RESULTS = Path(__file__).parent / "results"
DEFAULTS = {
    "submit": 20_000,
    "e2e": 20_000,
    "punctuality": 20_000,
    "scale": 1_000_000,
    "history": 50_000,
    "console": 1_000_000,  # mails in the history (PostgreSQL); 10,000 dead letters
    "queries": 10_000_000,  # mails in the history (PostgreSQL), kept between runs
    "limits": 20_000,  # per run; 3 rounds of a run without and one with limits
}


def machine() -> str:
    """What the figures were measured on."""
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, Python {platform.python_version()}"


def table(name: str, figures: dict[str, Any]) -> str:
    """The figures of one part as an aligned two-column table."""
    width = max(len(key) for key in figures)
    lines = [f"== {name} =="] + [f"  {key:<{width}}  {value}" for key, value in figures.items()]
    return "\n".join(lines)


def run_part(
    name: str,
    mails: int | None,
    processes: int,
    store: str,
    *,
    consumers: int = 1,
    rounds: int = 3,
) -> dict[str, Any]:
    count = mails or DEFAULTS[name]
    simple: dict[str, Callable[[], dict[str, Any]]] = {
        "history": lambda: ingest.ingest(count, store, consumers, rounds),
        "submit": lambda: parts.submit(count, store, rounds),
        "e2e": lambda: parts.e2e(count, processes, store, rounds),
        "punctuality": lambda: parts.punctuality(count, processes, store),
        "scale": lambda: parts.scale(count, store),
    }
    if name == "console":
        from bench.console import console

        return console(count, "postgresql")  # the production store; SQLite is not the question
    if name == "limits":
        from bench import limits

        return limits.measure(count, processes, store)
    if name == "queries":
        from bench import queries

        return queries.measure(count)
    return simple[name]()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("part", choices=[*DEFAULTS, "all", "cluster"])
    parser.add_argument("--mails", type=int, help="mails per part (default: the part's own)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--consumers", type=int, default=1, help="history consumers (part history; default 1)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds, alternating with the reference (parts history, submit, e2e; default 3)",
    )
    parser.add_argument(
        "--drop", action="store_true", help="part queries: only drop its kept database"
    )
    cluster = parser.add_argument_group("cluster (needs root and a local RabbitMQ installation)")
    cluster.add_argument("--rate", type=float, default=120, help="mails submitted per second")
    cluster.add_argument("--down", type=float, default=5, help="seconds a killed node stays down")
    cluster.add_argument("--port", type=int, default=5681, help="AMQP port of the first node")
    cluster.add_argument("--teardown", action="store_true", help="only remove a cluster left over")
    args = parser.parse_args()
    configure_logging("warning")
    if args.drop:
        from bench import queries

        queries.drop()
        print(f"dropped the database {queries.DATABASE}")
        return
    if args.part == "cluster":
        from bench import cluster as scenario

        args.mails = args.mails or 10_000
        from bench.cluster_figures import failures

        figures = scenario.run(args)
        print(table("cluster", figures), flush=True)
        print(json.dumps(figures, default=str))
        failed = failures(figures)
        print("FAILED: " + "; ".join(failed) if failed else "passed")
        raise SystemExit(1 if failed else 0)
    names = list(DEFAULTS) if args.part == "all" else [args.part]
    results: dict[str, Any] = {}
    for name in names:
        figures = run_part(
            name,
            args.mails,
            args.processes,
            args.store,
            consumers=args.consumers,
            rounds=args.rounds,
        )
        print(table(name, figures), flush=True)
        results[name] = figures
    if args.part == "all":
        results["machine"] = machine()
        results["at"] = datetime.now(UTC).isoformat(timespec="seconds")
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"written to {path}")
    print(json.dumps(results if args.part == "all" else results[args.part]))


if __name__ == "__main__":
    main()
