"""Starting a long-running process against a broker (or store) that is not ready yet.

Right after a broker node (re)starts, connections are refused, or RabbitMQ answers
``coordinator_unavailable`` for the control stream until its cluster has quorum
again. Exiting on that made supervisors respawn processes every second (18 restarts
and 34 tracebacks in 20 s, measured). A process therefore retries its start-up with
backoff, one log line per attempt, until it starts or is asked to stop; only errors
that waiting cannot fix (a queue declared with other arguments) end it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

from rohrpost.shared.errors import BrokerError, StoreUnavailable, TopologyConflict
from rohrpost.shared.logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")

#: Waits between start-up attempts, the last one repeated.
START_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0)


def start_with_retries(
    start: Callable[[], T],
    *,
    stopping: Callable[[], bool],
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    failed: Callable[[Exception], None] | None = None,
) -> T | None:
    """``start()``'s result, retried while it fails for a reason that may pass.

    Returns None when ``stopping()`` became true first. TopologyConflict and errors
    that are no broker or store outage propagate. ``failed`` hears of each failed
    attempt (the reason ``/readyz`` gives meanwhile).
    """
    failures = 0
    while not stopping():
        try:
            return start()
        except TopologyConflict:
            raise
        except (BrokerError, StoreUnavailable) as exc:
            delay = START_DELAYS[min(failures, len(START_DELAYS) - 1)]
            failures += 1
            if failed is not None:
                failed(exc)
            log.warning(
                f"{what} cannot start yet; retrying",
                error=str(exc),
                attempt=failures,
                retry_in_seconds=delay,
            )
            _wait(delay, stopping, sleep)
    return None


def _wait(seconds: float, stopping: Callable[[], bool], sleep: Callable[[float], None]) -> None:
    """Sleep ``seconds`` in steps of 0.1 s, returning early once ``stopping()``."""
    for _ in range(math.ceil(seconds / 0.1)):
        if stopping():
            return
        sleep(0.1)
