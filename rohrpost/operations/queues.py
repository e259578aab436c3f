"""Queue figures for the overview: depths and consumers over AMQP, unacked messages from
RabbitMQ's management API. Reading never changes a queue and never fails: what cannot
be read is None, with the reason.
"""

from __future__ import annotations

from typing import Any

import pika.exceptions

from rohrpost.operations.management import (
    ManagementApi,
    ManagementUnavailable,
    QueueCounts,
    broker_vhost,
    management_url,
)
from rohrpost.operations.passive import declare_passively
from rohrpost.shared.settings import Settings
from rohrpost.shared.topology import Topology


def send_queues(topology: Topology, tenant: str, app: str) -> list[str]:
    """The queues a route's due mails wait in: its lanes, high first; every figure of a
    route's send queues is read through this."""
    return topology.send_queues(tenant, app)


class QueueReading:
    """Queue depths and consumers read by passive declares; missing queues are noted.

    ``routes``: the (tenant, app) pairs to read the queues of (default: every enabled
    one); the delay levels and the history's queues are always read.
    """

    def __init__(self, topology: Topology, routes: list[tuple[str, str]] | None = None) -> None:
        self.topology = topology
        chosen = topology.routes if routes is None else routes
        self.names = [
            queue
            for tenant, app in chosen
            for queue in (
                *send_queues(topology, tenant, app),
                topology.dead_queue(tenant, app),
                topology.held_queue(tenant, app),
            )
        ]
        self.names += topology.delay_queues()
        if topology.history:
            self.names += [topology.history_queue, topology.history_rejected_queue]
        self.found: dict[str, tuple[int, int]] = {}
        self.notes: list[str] = []
        self.problem: str | None = None

    def read(self, channel: Any) -> None:
        """Read the queues on ``channel`` (a blocking pika channel)."""
        found, missing, self.problem = _declare_each(channel, self.names)
        self._take(found, missing)

    def read_from(self, url: str, *, timeout: float = 5) -> None:
        """Read the queues over one connection to ``url``, many at once."""
        answers = declare_passively(url, self.names, timeout=timeout)
        self.problem = answers.problem
        self._take(answers.found, answers.missing)

    def _take(self, found: dict[str, tuple[int, int]], missing: list[str]) -> None:
        self.found = found
        if missing:
            first = min(missing, key=self.names.index)
            self.notes.append(
                f"{len(missing)} of {len(self.names)} queues do not exist (first: {first}); "
                "run `rohrpost topology declare`"
            )

    def messages(self, name: str) -> int | None:
        """Messages ready in ``name``; None when it could not be read."""
        found = self.found.get(name)
        return None if found is None else found[0]

    def total(self, names: list[str]) -> int | None:
        """Messages ready in all of ``names`` together; None when one could not be read.

        A queue the broker does not have holds nothing (a lane an older version did
        not declare); ``notes`` names it.
        """
        if self.problem is not None or not any(name in self.found for name in names):
            return None
        return sum(self.found[name][0] for name in names if name in self.found)

    def consumers(self, name: str) -> int | None:
        """Consumers of ``name``; None when it could not be read."""
        found = self.found.get(name)
        return None if found is None else found[1]

    def most_consumers(self, names: list[str]) -> int | None:
        """The most consumers any of ``names`` has (a worker consumes each queue of its
        route, so summing would count it once per queue); None when none could be read."""
        counts = [count for name in names if (count := self.consumers(name)) is not None]
        return max(counts) if counts else None


def _declare_each(
    channel: Any, names: list[str]
) -> tuple[dict[str, tuple[int, int]], list[str], str | None]:
    """(ready messages, consumers) of each of ``names`` that exists, those that do not,
    and why the reading stopped (None: it did not)."""
    found: dict[str, tuple[int, int]] = {}
    missing: list[str] = []
    for name in names:
        try:
            method = channel.queue_declare(name, passive=True).method
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                return found, missing, f"the broker refused to show {name}: {exc.reply_text}"
            missing.append(name)
            channel = channel.connection.channel()
            continue
        except pika.exceptions.AMQPError as exc:
            why = str(exc) or type(exc).__name__
            return found, missing, f"lost the broker while reading the queues: {why}"
        found[name] = (method.message_count, method.consumer_count)
    return found, missing, None


def in_flight_counts(settings: Settings) -> tuple[dict[str, QueueCounts] | None, str | None]:
    """Unacked messages per queue of the namespace, from the management API; or None, and why."""
    url = management_url(settings)
    if url is None:
        return None, "management_url is off"
    try:
        queues = ManagementApi(url).queues(broker_vhost(settings), f"{settings.namespace}.")
    except ManagementUnavailable as exc:
        return None, str(exc)
    return queues, None
