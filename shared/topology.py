"""Every exchange, queue and binding of one namespace, and how to declare them.

    producer ─► {ns}.submit (direct, "T.A[.P]") ─────────────────────► {ns}.send.T.A[.P]
       │                   └─────────────────────────────────────────► {ns}.history
       └──────► {ns}.schedule (topic, "D.T.A[.P]") ┬─► queue {ns}.delay.{highest digit}
                                                   └─► {ns}.history          │ TTL
         queue {ns}.delay.{j} ◄── exchange {ns}.delay.{k} (dead-letter of queue k)
                                        └── no digit left ─────────► {ns}.send.T.A[.P]
    worker (retry) ─► {ns}.delay (topic, like schedule without history)
    worker (dead-letter), x-delivery-limit ─► {ns}.dead (direct, "T.A") ─► {ns}.dead.T.A
    worker (a mail an operator holds) ─► {ns}.held.T.A ─► (release) {ns}.send.T.A
    worker (every outcome) ─► {ns}.events ─► {ns}.history
    history consumer (unreadable, unstorable), x-delivery-limit ─► {ns}.history.rejected

(T.A is tenant.app; "D" is the delay in seconds as N octal digits, one word each, see
rohrpost.shared.delay; a message waits in one queue per nonzero digit. ".P" is the
priority lane, ".high" or ".bulk"; a normal mail has none, so the keys and queues of
earlier versions are the normal lane. Quorum queues have no message priorities, so
each priority is a send queue of its own, and workers serve high before normal before
bulk; the dead-letter and held queues are one per route.)
Due mails take direct exchanges only: RabbitMQ 3.10 spends ~70 µs routing a message
through a direct exchange here, 125-200 µs through a topic exchange, and the direct
path is the hot one.

Every queue is a durable quorum queue. Delay and send queues dead-letter with the
``at-least-once`` strategy (which needs ``x-overflow=reject-publish``), so a message
moving between queues is held by the source until the target confirmed it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions

from rohrpost.shared.broker import admin_channel
from rohrpost.shared.container import DEFAULT_PRIORITY, PRIORITIES, Priority
from rohrpost.shared.delay import DelayLevels
from rohrpost.shared.errors import BrokerError, BrokerUnavailable, TopologyConflict
from rohrpost.shared.logs import get_logger
from rohrpost.shared.settings import Settings

log = get_logger(__name__)

#: AMQP reply code for a declaration whose arguments differ from the existing ones.
PRECONDITION_FAILED = 406

_SAFE_DEAD_LETTERING = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
#: A queue at a length limit (an operator's policy: ``max-length``) refuses what comes,
#: and the sender keeps it, instead of dropping its oldest message (RabbitMQ's default,
#: which a policy without ``overflow`` leaves in place): no dead letter, held mail or
#: set-aside history message vanishes. The argument wins over a policy's ``overflow``.
_REFUSE_WHEN_FULL = {"x-overflow": "reject-publish"}


@dataclass(frozen=True)
class Queue:
    """A queue (quorum unless said otherwise) and its arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    kind: str = "quorum"
    #: An earlier version declared it with fewer arguments: if it exists so, it is used
    #: as it is, with a warning saying how to add them (a policy), instead of stopping.
    upgradable: bool = False


#: Dead letters are read by taking and returning them, which counts a delivery each
#: time; RabbitMQ 4 drops a quorum queue's message after 20 deliveries unless the
#: queue says otherwise, and a dead-letter queue has nowhere to dead-letter to.
NO_DELIVERY_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Binding:
    """``source`` exchange routes ``pattern`` to the queue ``destination``."""

    source: str
    destination: str
    pattern: str


@dataclass(frozen=True, slots=True)
class Lane:
    """One send queue: the mails of ``priority`` for tenant/app."""

    tenant: str
    app: str
    priority: Priority

    @property
    def route(self) -> tuple[str, str]:
        """(tenant, app)."""
        return (self.tenant, self.app)


@dataclass(frozen=True)
class Topology:
    """The broker objects of one namespace for a set of (tenant, app) routes."""

    namespace: str
    routes: tuple[tuple[str, str], ...]
    delay: DelayLevels
    delivery_limit: int = 20
    history: bool = True
    control_retention_seconds: int = 400 * 86400

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        """The topology for every enabled route of ``settings``."""
        return cls(
            namespace=settings.namespace,
            routes=tuple(settings.routes()),
            delay=DelayLevels.covering(settings.namespace, settings.max_delay.total_seconds()),
            delivery_limit=settings.delivery_limit,
            history=settings.history_enabled,
            control_retention_seconds=int(settings.control_retention.total_seconds()),
        )

    @property
    def submit_exchange(self) -> str:
        """Where producers publish due mails (direct, key ``tenant.app``)."""
        return f"{self.namespace}.submit"

    @property
    def schedule_exchange(self) -> str:
        """Where producers publish future mails (topic, key ``digits.tenant.app``)."""
        return f"{self.namespace}.schedule"

    @property
    def dead_exchange(self) -> str:
        """Routes ``…tenant.app`` to that pair's dead-letter queue."""
        return f"{self.namespace}.dead"

    @property
    def events_exchange(self) -> str:
        """Every state change of a mail, key ``{kind}.{tenant}.{app}``."""
        return f"{self.namespace}.events"

    @property
    def control_exchange(self) -> str:
        """Where operator tools publish cancel / pause / resume (fanout)."""
        return f"{self.namespace}.control"

    @property
    def control_stream(self) -> str:
        """The stream every worker replays: every cancel, pause and resume."""
        return f"{self.namespace}.control"

    @property
    def history_queue(self) -> str:
        """Every event and every submitted mail, for the history consumer."""
        return f"{self.namespace}.history"

    @property
    def history_rejected_queue(self) -> str:
        """History messages the consumer could not read or store, kept for inspection."""
        return f"{self.namespace}.history.rejected"

    def send_queue(self, tenant: str, app: str, priority: Priority = DEFAULT_PRIORITY) -> str:
        """The queue workers consume for tenant/app's mails of ``priority`` (its lane)."""
        return f"{self.namespace}.send.{self.route_key(tenant, app, priority)}"

    def send_queues(self, tenant: str, app: str) -> list[str]:
        """Every lane of tenant/app: its send queues, high first."""
        return [self.send_queue(tenant, app, priority) for priority in PRIORITIES]

    def lanes(self) -> dict[str, Lane]:
        """Every send queue of every route, high lanes first within a route."""
        return {
            self.send_queue(tenant, app, priority): Lane(tenant, app, priority)
            for tenant, app in self.routes
            for priority in PRIORITIES
        }

    def dead_queue(self, tenant: str, app: str) -> str:
        """The dead-letter queue of tenant/app."""
        return f"{self.namespace}.dead.{tenant}.{app}"

    def held_queue(self, tenant: str, app: str) -> str:
        """Where workers set aside the mails of tenant/app an operator holds."""
        return f"{self.namespace}.held.{tenant}.{app}"

    def route_key(self, tenant: str, app: str, priority: Priority = DEFAULT_PRIORITY) -> str:
        """Routing key that sends a mail for tenant/app without delay into its lane."""
        return f"{tenant}.{app}" if priority == DEFAULT_PRIORITY else f"{tenant}.{app}.{priority}"

    def delayed_key(
        self, seconds: int, tenant: str, app: str, priority: Priority = DEFAULT_PRIORITY
    ) -> str:
        """Routing key that delays a mail ``seconds``, then sends it into its lane."""
        key = self.delay.routing_key(seconds, tenant, app)
        return key if priority == DEFAULT_PRIORITY else f"{key}.{priority}"

    def exchanges(self) -> list[tuple[str, str]]:
        """Every exchange and its type."""
        levels = [(self.delay.exchange(k), "topic") for k in reversed(range(self.delay.count))]
        return [
            (self.submit_exchange, "direct"),
            (self.schedule_exchange, "topic"),
            (self.delay.entry_exchange, "topic"),
            (self.dead_exchange, "direct"),
            (self.events_exchange, "topic"),
            (self.control_exchange, "fanout"),
            *levels,
        ]

    def queues(self) -> list[Queue]:
        """Every queue: delay levels, then per route its lanes, dead-letter and held queue."""
        queues = [
            Queue(
                self.delay.queue(level, digit),
                {
                    "x-message-ttl": self.delay.ttl_ms(level, digit),
                    "x-dead-letter-exchange": self.delay.exchange(level),
                    **_SAFE_DEAD_LETTERING,
                },
            )
            for level, digit in self.delay.queues()
        ]
        for tenant, app in self.routes:
            queues += [
                Queue(
                    send,
                    {
                        "x-delivery-limit": self.delivery_limit,
                        "x-dead-letter-exchange": self.dead_exchange,
                        # mails arrive with "digits.tenant.app[.lane]" keys too; the dead
                        # exchange is direct and knows only "tenant.app": every lane
                        # dead-letters into the route's one dead-letter queue
                        "x-dead-letter-routing-key": self.route_key(tenant, app),
                        **_SAFE_DEAD_LETTERING,
                    },
                )
                for send in self.send_queues(tenant, app)
            ]
            queues.append(
                Queue(
                    self.dead_queue(tenant, app),
                    {"x-delivery-limit": NO_DELIVERY_LIMIT, **_REFUSE_WHEN_FULL},
                    upgradable=True,
                )
            )
            # read like dead letters (taken and put back), so no delivery limit either
            queues.append(
                Queue(
                    self.held_queue(tenant, app),
                    {"x-delivery-limit": NO_DELIVERY_LIMIT, **_REFUSE_WHEN_FULL},
                    upgradable=True,
                )
            )
        if self.history:
            queues.append(
                Queue(
                    self.history_queue,
                    {
                        # The consumer sets aside what it cannot read or store; this
                        # removes a message that kills the consumer process itself.
                        "x-delivery-limit": self.delivery_limit,
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": self.history_rejected_queue,
                        **_SAFE_DEAD_LETTERING,
                    },
                    upgradable=True,
                )
            )
            queues.append(Queue(self.history_rejected_queue, _REFUSE_WHEN_FULL, upgradable=True))
        queues.append(
            Queue(
                self.control_stream, {"x-max-age": f"{self.control_retention_seconds}s"}, "stream"
            )
        )
        return queues

    def delay_queues(self) -> list[str]:
        """Names of the delay level queues."""
        return [self.delay.queue(level, digit) for level, digit in self.delay.queues()]

    def bindings(self) -> list[Binding]:
        """Every binding, in the order they must be declared."""
        delay = self.delay
        bindings = [
            Binding(entry, delay.queue(level, digit), delay.first_stop_pattern(level, digit))
            for entry in (self.schedule_exchange, delay.entry_exchange)
            for level, digit in delay.queues()
        ]
        for after in range(delay.count):
            bindings += [
                Binding(
                    delay.exchange(after),
                    delay.queue(level, digit),
                    delay.next_stop_pattern(after, level, digit),
                )
                for level, digit in delay.queues()
                if level < after
            ]
            # No nonzero digit left: straight into the send queue, one routing step.
            bindings += [
                Binding(
                    delay.exchange(after),
                    queue,
                    delay.done_pattern(after, self.route_key(lane.tenant, lane.app, lane.priority)),
                )
                for queue, lane in self.lanes().items()
            ]
        for queue, lane in self.lanes().items():
            key = self.route_key(lane.tenant, lane.app, lane.priority)
            bindings.append(Binding(self.submit_exchange, queue, key))
        for tenant, app in self.routes:
            key = self.route_key(tenant, app)
            bindings.append(Binding(self.dead_exchange, self.dead_queue(tenant, app), key))
        bindings.append(Binding(self.control_exchange, self.control_stream, ""))
        if self.history:
            bindings.append(Binding(self.events_exchange, self.history_queue, "#"))
            # A submitted mail reaches the history through the broker: one publish, two
            # queues. Bound per route, so a mail for an undeclared route stays unroutable
            # (and the producer's mandatory publish fails) instead of reaching history only.
            for lane in self.lanes().values():
                key = self.route_key(lane.tenant, lane.app, lane.priority)
                bindings.append(Binding(self.submit_exchange, self.history_queue, key))
                bindings.append(
                    Binding(
                        self.schedule_exchange, self.history_queue, self.delay.arrival_pattern(key)
                    )
                )
        return bindings

    def declare(self, channel: Any) -> None:
        """Declare everything on a blocking channel; idempotent.

        Raises TopologyConflict when a queue or exchange exists with other arguments
        (the broker refuses to change them; delete it or use a policy) — except for a
        queue an earlier version declared with fewer arguments, which is used as it is
        with a warning. BrokerError when the broker refuses for another reason (e.g.
        ``coordinator_unavailable`` while a cluster regains quorum), BrokerUnavailable
        when the connection is lost meanwhile.
        """
        what = "exchanges"
        try:
            for name, kind in self.exchanges():
                channel.exchange_declare(name, exchange_type=kind, durable=True)
            for queue in self.queues():
                what = f"queue {queue.name} with arguments {queue.arguments}"
                channel = _declare_queue(channel, queue)
            what = "bindings"
            for binding in self.bindings():
                channel.queue_bind(binding.destination, binding.source, binding.pattern)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == PRECONDITION_FAILED:
                raise TopologyConflict(f"declaring {what}: {exc.reply_text}") from exc
            raise BrokerError(f"declaring {what}: {exc.reply_text}") from exc
        except pika.exceptions.AMQPError as exc:
            raise BrokerUnavailable(f"declaring {what}: lost the connection: {exc!r}") from exc

    def delete(self, channel: Any) -> None:
        """Delete every queue and exchange of this topology, messages included."""
        for queue in self.queues():
            channel.queue_delete(queue.name)
        for name, _kind in self.exchanges():
            channel.exchange_delete(name)


def declare_topology(settings: Settings) -> Topology:
    """Declare the topology for ``settings`` on its broker and return it."""
    topology = Topology.from_settings(settings)
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        topology.declare(channel)
    return topology


def _declare_queue(channel: Any, queue: Queue) -> Any:
    """Declare ``queue``; the channel to go on with (a new one after a tolerated refusal)."""
    arguments = {"x-queue-type": queue.kind, **queue.arguments}
    try:
        channel.queue_declare(queue.name, durable=True, arguments=arguments)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if not (queue.upgradable and exc.reply_code == PRECONDITION_FAILED):
            raise
        policy = {k.removeprefix("x-"): v for k, v in queue.arguments.items()}
        log.warning(
            "queue declared by an earlier version without its new arguments; used as it is",
            queue=queue.name,
            arguments=queue.arguments,
            hint="add them with a policy: rabbitmqctl set_policy --apply-to queues "
            f"<name> '^{re.escape(queue.name)}$' '{json.dumps(policy)}'",
        )
        channel = channel.connection.channel()
    return channel


def queue_depths(channel: Any, names: list[str]) -> dict[str, int]:
    """Ready messages in each queue (passive declare)."""
    return {name: channel.queue_declare(name, passive=True).method.message_count for name in names}
