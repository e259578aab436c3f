"""``python -m bench limits``: what rate and connection limits cost when none of them binds.

Each round runs the end-to-end part twice on fresh namespaces: once without limits,
once with ``max_rate`` on the SMTP server and the app and ``max_connections`` on the
server, all far above what this machine sends (so every mail takes the limited
path: a reservation in Redis per batch, a connection permit per pooled connection,
the flow-control thread). This machine's speed varies by a third between minutes,
so the two alternate for ``rounds`` rounds and the medians of the per-round ratios
are reported; worker CPU per mail varies less than throughput and is reported too.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.parts import _rohrpost_e2e

#: Limits no run on this machine reaches: the worker processes send ~1,000 mails/s.
NEVER_BINDING = {
    "smtp": {"max_rate": "100000/s", "max_connections": 64},
    "app": {"max_rate": "100000/s"},
}


def measure(count: int, processes: int, store: str = "sqlite", rounds: int = 3) -> dict[str, Any]:
    """Throughput and worker CPU with limits that never bind against none, alternating."""
    plain: list[dict[str, float]] = []
    limited: list[dict[str, float]] = []
    for _ in range(rounds):
        plain.append(_rohrpost_e2e(count, processes, store))
        limited.append(_rohrpost_e2e(count, processes, store, limits=NEVER_BINDING))
    rate_ratios = [lim["rate"] / p["rate"] for p, lim in zip(plain, limited, strict=True)]
    cpu_ratios = [
        lim["worker_cpu"] / p["worker_cpu"] for p, lim in zip(plain, limited, strict=True)
    ]
    overhead = 1 - statistics.median(rate_ratios)
    return {
        "mails": count,
        "rounds": rounds,
        "processes": processes,
        "no_limits_mails_per_s": round(statistics.median(r["rate"] for r in plain)),
        "limits_mails_per_s": round(statistics.median(r["rate"] for r in limited)),
        "no_limits_runs": [round(r["rate"]) for r in plain],
        "limits_runs": [round(r["rate"]) for r in limited],
        "throughput_ratios": [round(r, 3) for r in rate_ratios],
        "throughput_overhead": round(overhead, 3),
        "no_limits_worker_cpu_s_per_1000": round(
            statistics.median(r["worker_cpu"] for r in plain) / count * 1000, 3
        ),
        "limits_worker_cpu_s_per_1000": round(
            statistics.median(r["worker_cpu"] for r in limited) / count * 1000, 3
        ),
        "worker_cpu_ratios": [round(r, 3) for r in cpu_ratios],
        "worker_cpu_overhead": round(statistics.median(cpu_ratios) - 1, 3),
        "target": "<= 0.03",
        "store": store,
    }
