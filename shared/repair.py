"""Declaring a running process's topology again once a queue of it turned out to be gone.

An operator who deletes a send queue, the history queue or a dead-letter queue while
workers run (by mistake, or to throw its messages away) leaves them consuming
nothing, or moving mails to a queue that is no longer there. RabbitMQ says so: it
cancels the consumers of a deleted queue (``basic.cancel``), and returns a mandatory
publish no queue is bound for. Every process declares the topology when it starts;
this declares it again then, with the start-up's backoff, and the process consumes the
queue again.
"""

from __future__ import annotations

import threading
import time

from rohrpost.shared.broker import Broker, admin_channel
from rohrpost.shared.errors import BrokerError
from rohrpost.shared.logs import get_logger
from rohrpost.shared.startup import START_DELAYS
from rohrpost.shared.topology import Topology

log = get_logger(__name__)


class TopologyRepair:
    """Notices a lost queue of ``topology`` and declares the topology again."""

    def __init__(self, topology: Topology, broker_url: str) -> None:
        self._topology = topology
        self._url = broker_url
        self._lock = threading.Lock()
        self._lost: str | None = None  # why the topology is to be declared again
        self._next = 0.0  # monotonic time of the next attempt
        self._failures = 0

    def lost(self, why: str) -> None:
        """Say that a queue of the topology is gone (thread-safe)."""
        with self._lock:
            self._lost = self._lost or why

    def reason(self, broker: Broker | None) -> str | None:
        """Why the topology is incomplete (for ``/readyz``); None when it is not known to be."""
        why = self._why(broker) if broker is not None else None
        return f"{why}; declaring the topology again" if why else None

    def _why(self, broker: Broker) -> str | None:
        cancelled = broker.cancelled_queues()
        if cancelled:
            return (
                f"not consuming {', '.join(cancelled)}: the broker cancelled the consumer "
                "(queue deleted?)"
            )
        if broker.missing is not None:
            return f"the broker closed the channel: {broker.missing}"
        with self._lock:
            return self._lost

    def check(self, broker: Broker) -> bool:
        """Declare the topology again if a queue of it is gone and the backoff allows.

        True when it was declared again (and cancelled consumers resumed).
        """
        why = self._why(broker)
        if why is None:
            return False
        now = time.monotonic()
        if now < self._next:
            return False
        try:
            with admin_channel(self._url) as channel:
                self._topology.declare(channel)
        except BrokerError as exc:
            delay = START_DELAYS[min(self._failures, len(START_DELAYS) - 1)]
            self._failures += 1
            self._next = now + delay
            log.error(
                "declaring the topology again failed; retrying",
                cause=why,
                error=str(exc),
                retry_in_seconds=delay,
            )
            return False
        with self._lock:
            self._lost = None
        self._failures = 0
        self._next = now + 1.0  # the broker resumes the consumers meanwhile
        log.warning("topology declared again", cause=why)
        broker.resume_cancelled()
        return True
