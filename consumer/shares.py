"""How many worker processes share a limit: the consumers of the send queues it applies to.

While the shared state is unreachable each process keeps to its share of every
limit: the limit divided by this number. Every worker process consumes every send
queue that is not paused, so a queue's consumer count (which a passive
``queue.declare`` returns) is the number of worker processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from rohrpost.shared.broker import admin_channel
from rohrpost.shared.logs import get_logger
from rohrpost.shared.ratelimit import Limit
from rohrpost.shared.settings import Settings

log = get_logger(__name__)

#: Consumer counts are read again after this long.
REFRESH_SECONDS = 30.0


class QueueShares:
    """Consumer counts of the send queues, read from the broker at most every 30 s."""

    def __init__(
        self,
        settings: Settings,
        send_queue: Callable[[str, str], str],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``send_queue(tenant, app)``: the name of a route's send queue."""
        self._url = settings.broker_url.get_secret_value()
        self._clock = clock
        self._queues: dict[str, list[str]] = {}
        for tenant, app in settings.routes():
            config = settings.app(tenant, app)
            assert config is not None
            queue = send_queue(tenant, app)
            self._queues[f"app:{tenant}:{app}"] = [queue]
            self._queues.setdefault(f"smtp:{config.smtp}", []).append(queue)
        self._counts: dict[str, int] = {}
        self._read_at: float | None = None
        self._lock = threading.Lock()

    def __call__(self, limit: Limit) -> int:
        """How many processes share ``limit`` (at least 1)."""
        return self.of(limit.name)

    def server(self, name: str) -> int:
        """How many processes share the limits of SMTP server ``name`` (at least 1)."""
        return self.of(f"smtp:{name}")

    def of(self, name: str) -> int:
        """How many processes share the limit called ``name`` (``smtp:S``, ``app:T:A``)."""
        with self._lock:
            if self._read_at is None or self._clock() - self._read_at > REFRESH_SECONDS:
                self._read()
            counts = [self._counts.get(queue, 0) for queue in self._queues.get(name, [])]
        return max([1, *counts])

    def _read(self) -> None:
        self._read_at = self._clock()
        queues = sorted({q for named in self._queues.values() for q in named})
        try:
            with admin_channel(self._url, timeout=3) as channel:
                for queue in queues:
                    method = channel.queue_declare(queue, passive=True).method
                    self._counts[queue] = int(method.consumer_count)
        except Exception as exc:  # a share from 30 s ago beats a worker that stops
            log.warning("cannot read consumer counts; keeping the last ones", error=str(exc))
