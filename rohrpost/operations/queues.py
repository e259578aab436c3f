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
from rohrpost.shared.settings import Settings
from rohrpost.shared.topology import Topology


class QueueReading:
    """Queue depths and consumers read by passive declares; missing queues are noted."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.found: dict[str, tuple[int, int]] = {}
        self.notes: list[str] = []
        self.problem: str | None = None

    def read(self, channel: Any) -> None:
        """Read every queue of the topology on ``channel`` (a blocking pika channel)."""
        topology = self.topology
        names = [
            queue
            for tenant, app in topology.routes
            for queue in (
                *topology.send_queues(tenant, app),
                topology.dead_queue(tenant, app),
                topology.held_queue(tenant, app),
            )
        ]
        names += topology.delay_queues()
        if topology.history:
            names += [topology.history_queue, topology.history_rejected_queue]
        missing = []
        for name in names:
            try:
                method = channel.queue_declare(name, passive=True).method
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    self.problem = f"the broker refused to show {name}: {exc.reply_text}"
                    return
                missing.append(name)
                channel = channel.connection.channel()
                continue
            except pika.exceptions.AMQPError as exc:
                why = str(exc) or type(exc).__name__
                self.problem = f"lost the broker while reading the queues: {why}"
                return
            self.found[name] = (method.message_count, method.consumer_count)
        if missing:
            self.notes.append(
                f"{len(missing)} of {len(names)} queues do not exist (first: {missing[0]}); "
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
