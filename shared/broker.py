"""One RabbitMQ connection on its own I/O thread: confirmed publishes, manual-ack consumes.

pika connections are not thread-safe and pika's blocking adapter waits for every
confirm (~1,200 msg/s here) and services heartbeats only while it is called. So the
connection runs a ``SelectConnection`` on a private thread; other threads hand it work
through ``add_callback_threadsafe`` (the only thread-safe pika call) and get a
``Future`` per publish, resolved when the broker acks, nacks or returns the message.
Windowed asynchronous confirms of 1 KiB messages into one quorum queue measure
15,000 to 19,000 msg/s here (``python -m bench submit``, the raw pika ceiling).

While RabbitMQ blocks the connection (``connection.blocked``: a memory or disk alarm)
publishes are held here, not written. RabbitMQ sends ``connection.blocked`` only once a
connection published during the alarm, and from then on reads nothing more from it
(acks, cancels, its close) until the alarm clears; what is held is written once the
broker unblocks, and a caller that gives up first can ``withdraw`` it, and then knows it
was never published.

When the broker cancels a consumer (its queue was deleted), the consumer is set
aside and named by ``cancelled_queues``; ``resume_cancelled`` consumes it again once
whoever owns the topology declared the queue again.

pika does not reconnect by itself. After a lost connection this class reconnects with
backoff, re-opens consumers and, if asked to, re-publishes whatever was unconfirmed
(at-least-once). Deliveries from an earlier connection can no longer be acked; the
broker redelivers them.

Given the nodes of a cluster, it connects to the first that answers, in the order
listed, and after losing its node it tries the others first, starting with the next
one: every node of a cluster serves every queue, and the node just lost is the one
most likely to be gone (a node that is gone from the network costs a connect
timeout). pika can try a list of parameters itself, but reports only the last
node's error and starts from the first node again on every attempt.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop

from rohrpost.shared.amqp import (
    BatchConfirm,
    ConfirmTracker,
    Delivery,
    Pending,
    Publication,
    admin_channel,
    connection_parameters,
    lost,
    unavailable,
    unreachable,
)
from rohrpost.shared.errors import BrokerError, BrokerUnavailable, NotConfirmed, TopologyMissing
from rohrpost.shared.framing import PublishFramer
from rohrpost.shared.logs import get_logger
from rohrpost.shared.nodes import redact_url, split_nodes

__all__ = [
    "BatchConfirm",
    "Broker",
    "Delivery",
    "Publication",
    "admin_channel",
    "connection_parameters",
    "connection_problem",
    "unavailable",
]

log = get_logger(__name__)

_RECONNECT_DELAYS = (0.5, 1, 2, 5, 10, 15)
#: How long start() waits for each node by default (pika's connect and handshake timeout).
_CONNECT_TIMEOUT = 10.0
#: Pauses before a nacked publish goes out again, where publishes are republished.
#: RabbitMQ nacks a publish when a queue it was routed to is unavailable for a moment
#: (a node just died), even if the other queues took it (rabbitmq-server #4888):
#: 1,100 of 10,000 mails in one run of `python -m bench cluster`.
_NACK_DELAYS = (0.5, 1.0, 2.0, 4.0)
#: How long close() waits for the broker to answer the connection's close before it
#: drops the connection: a frozen link or a hung node never answers, and the process
#: would not exit until heartbeats gave up on it (a minute or more).
CLOSE_HANDSHAKE_SECONDS = 5.0


_WRITE_CHUNK = 256 * 1024


def _coalesce_output(connection: Any) -> None:
    """Join the frames pika has queued for the socket into few large writes.

    pika sends every AMQP frame with its own ``send()``: three per published message
    (method, header, body) and one per ack. Profiled, ``submit_many`` of 20,000 mails
    spent 3.1 s of its I/O thread's ~5 s in 60,012 ``send`` calls (``python -m
    bench.profile``). Called after each round of handed-over operations, before the
    loop gets to write; the bytes and their order stay the same.
    """
    transport = getattr(connection, "_transport", None)
    buffers = getattr(transport, "_tx_buffers", None)
    if buffers is None or len(buffers) < 2:
        return
    chunks: list[bytes] = []
    parts: list[bytes] = []
    size = 0
    for frame in buffers:
        parts.append(frame)
        size += len(frame)
        if size >= _WRITE_CHUNK:
            chunks.append(b"".join(parts))
            parts, size = [], 0
    if parts:
        chunks.append(b"".join(parts))
    buffers.clear()
    buffers.extend(chunks)


@dataclass(slots=True)
class _Consumer:
    queue: str
    prefetch: int
    handler: Callable[[Delivery], None]
    arguments: dict[str, Any] | None = None
    tag: str | None = None
    cancelled: bool = False  # by the broker: its queue was deleted


@dataclass
class _State:
    """Owned by the I/O thread."""

    connection: Any = None
    channel: Any = None
    framer: PublishFramer | None = None
    generation: int = 0
    unconfirmed: ConfirmTracker = field(default_factory=ConfirmTracker)
    waiting: deque[Pending] = field(default_factory=deque)
    consumers: list[_Consumer] = field(default_factory=list)
    cancelling: Future[None] | None = None
    failures: int = 0
    nacked: set[Pending] = field(default_factory=set)  # to be published again soon
    blocked: str | None = None  # why the broker blocks this connection's publishes
    disconnected: str | None = None  # why the last connection (attempt) failed, until one works
    missing: str | None = None  # the broker closed the channel: something to use is gone


def connection_problem(broker: Broker | None) -> str | None:
    """For ``/readyz``: None while ``broker`` is connected, else that it is not, and why."""
    if broker is not None and broker.connected:
        return None
    why = broker.disconnected if broker is not None else None
    return f"not connected to the broker: {why}" if why else "not connected to the broker"


class Broker:
    """A RabbitMQ connection with a thread-safe API.

    ``republish`` decides what happens to unconfirmed publishes when the connection is
    lost: sent again on the next connection (producers), or failed with
    BrokerUnavailable (workers, whose source message the broker redelivers anyway) —
    except publications marked ``republish`` themselves (events, which are idempotent),
    which are always sent again. The same publishes are sent again after a nack, up
    to four times over 7.5 s (every consumer of rohrpost drops the copy that may make).

    ``url`` is one node's AMQP URL or a cluster's nodes, comma-separated (as
    ``settings.broker_url`` holds them).
    """

    def __init__(
        self,
        url: str,
        *,
        name: str = "rohrpost",
        republish: bool = True,
        on_blocked: Callable[[str | None], None] | None = None,
    ) -> None:
        """``on_blocked(reason)`` runs on the I/O thread when the broker blocks the
        connection's publishes, and ``on_blocked(None)`` when it unblocks them (or the
        connection is lost)."""
        self._url = url
        self._on_blocked_change = on_blocked
        self._nodes = split_nodes(url) or [url]
        self._node = 0  # index of the node connected to, or to be tried next
        self._missed: list[tuple[str, BaseException]] = []  # nodes that failed in a row
        self._name = name
        self._republish = republish
        self._ioloop = IOLoop()
        self._state = _State(unconfirmed=ConfirmTracker(self._may_publish_again))
        self._ops: deque[Callable[[], None]] = deque()
        self._ops_lock = threading.Lock()
        self._wake_pending = False
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Connect to the first node that answers and open a confirming channel.

        Raises BrokerUnavailable naming every node tried when none answers within
        ``timeout`` (default: 10 s per node).
        """
        if timeout is None:
            timeout = _CONNECT_TIMEOUT * len(self._nodes)
        # A daemon: close() ends it; one left running (close() never called, or a node
        # that hangs even the dropped connection) must not keep the process from exiting.
        # Whoever needs a publish confirmed waits for its future.
        self._thread = threading.Thread(target=self._run_loop, name=f"{self._name}/io", daemon=True)
        self._ioloop.add_callback_threadsafe(self._connect)
        self._thread.start()
        if not self._ready.wait(timeout) or self._start_error is not None:
            error = self._start_error or TimeoutError(f"no connection within {timeout:g}s")
            self._stop_loop()
            if isinstance(error, BrokerUnavailable):
                raise error
            raise unavailable(self._url, error)

    def _run_loop(self) -> None:
        try:
            self._ioloop.start()
        finally:
            self._ioloop.close()

    def close(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout``) for outstanding confirms, then close the connection.

        The broker then has ``CLOSE_HANDSHAKE_SECONDS`` seconds to answer the close; if it does
        not (a frozen link, a hung node), the connection is dropped, so the I/O thread
        always ends and the process can exit. Publishes still unconfirmed fail with
        BrokerUnavailable either way.
        """
        thread = self._thread
        if thread is None:
            return
        if self._state.blocked is not None:
            # RabbitMQ reads nothing from a blocked connection until the alarm clears: no
            # confirm and no close-ok will come, so waiting for them only delays the exit.
            log.warning(
                "closing a connection the broker blocks; what it did not confirm fails",
                reason=self._state.blocked,
                unconfirmed=self.pending(),
            )
        else:
            done = threading.Event()

            def check() -> None:
                state = self._state
                if not state.unconfirmed and not state.waiting and not state.nacked:
                    done.set()
                elif not self._closing:
                    self._ioloop.call_later(0.02, check)

            self._call(check)
            done.wait(timeout)
            self._call(self._shutdown)
            thread.join(CLOSE_HANDSHAKE_SECONDS)
            if thread.is_alive():
                log.warning(
                    "the broker did not answer the close; dropping the connection",
                    node=redact_url(self._nodes[self._node]),
                    waited_seconds=CLOSE_HANDSHAKE_SECONDS,
                )
        if thread.is_alive():
            self._ioloop.add_callback_threadsafe(self._drop)
            thread.join(CLOSE_HANDSHAKE_SECONDS)
        self._thread = None

    @property
    def connected(self) -> bool:
        """True while a channel is open."""
        channel = self._state.channel
        return channel is not None and channel.is_open

    @property
    def node(self) -> str | None:
        """The URL of the node connected to, without its password; None while not connected."""
        return redact_url(self._nodes[self._node]) if self.connected else None

    @property
    def disconnected(self) -> str | None:
        """Why the connection was lost or the last attempt to reconnect failed (the node
        refused the user, a vhost is gone, nothing listens); None while connected."""
        return None if self.connected else self._state.disconnected

    @property
    def blocked(self) -> str | None:
        """Why the broker blocks publishing on this connection (``low on memory``, ``low
        on disk``); None while it does not."""
        return self._state.blocked

    @property
    def missing(self) -> str | None:
        """Why the broker last closed the channel for a queue or exchange that is gone
        (404); None once the channel works again."""
        return self._state.missing

    def holding(self) -> str:
        """Why a publish not yet written is held here: blocked, or not connected."""
        blocked = self._state.blocked
        if blocked is not None:
            return f"RabbitMQ blocks publishing ({blocked}: a memory or disk alarm)"
        return "no connection to RabbitMQ"

    def cancelled_queues(self) -> list[str]:
        """Queues whose consumer the broker cancelled (the queue was deleted)."""
        return [consumer.queue for consumer in list(self._state.consumers) if consumer.cancelled]

    def pending(self) -> int:
        """Publishes not yet confirmed (approximate when read from another thread)."""
        state = self._state
        return len(state.unconfirmed) + len(state.waiting) + len(state.nacked)

    # -- thread-safe API ---------------------------------------------------------------

    def publish(self, publication: Publication) -> Future[None]:
        """Publish with confirm; the future fails with NotConfirmed if nacked or returned."""
        future: Future[None] = Future()
        pending = Pending(publication, future=future)
        self._call(lambda: self._publish(pending))
        return future

    def publish_many(self, publications: Sequence[Publication]) -> BatchConfirm:
        """Publish a batch with confirms, in one hand-over to the I/O thread.

        Cheaper than ``publish`` per message (no Future, one wake-up): what bulk
        submission uses. ``BatchConfirm.failures`` names the publishes not confirmed.
        """
        batch = BatchConfirm(len(publications))
        pendings = [Pending(pub, batch=batch, index=i) for i, pub in enumerate(publications)]

        def publish_all() -> None:
            for pending in pendings:
                self._publish(pending)
            batch.written.set()

        self._call(publish_all)
        return batch

    def withdraw(self, future: Future[None]) -> bool:
        """Take back the publish of ``future`` if it was never written to the broker.

        True: it was still held here (the connection blocked or lost), will never be
        published, and ``future`` fails with NotConfirmed. False: it went out (or
        settled) and may be queued.
        """
        return bool(self._withdraw(lambda pending: pending.future is future))

    def withdraw_batch(self, batch: BatchConfirm) -> list[int]:
        """Take back the publishes of ``batch`` never written to the broker; their indexes."""
        return self._withdraw(lambda pending: pending.batch is batch)

    def _withdraw(self, match: Callable[[Pending], bool]) -> list[int]:
        taken: list[int] = []
        done = threading.Event()

        def take() -> None:
            state = self._state
            kept: deque[Pending] = deque()
            for pending in state.waiting:
                if match(pending) and not pending.written:
                    taken.append(pending.index)
                    pending.settle(NotConfirmed("withdrawn before it was published"))
                else:
                    kept.append(pending)
            state.waiting = kept
            done.set()

        self._call(take)
        # An I/O thread that does not answer (closed) cannot say: nothing is withdrawn.
        return taken if done.wait(CLOSE_HANDSHAKE_SECONDS) else []

    def resume_cancelled(self) -> None:
        """Consume again the queues whose consumer the broker cancelled, and forget what
        was ``missing``: to be called once the topology is declared again."""

        def resume() -> None:
            self._state.missing = None
            for consumer in self._state.consumers:
                if consumer.cancelled and self.connected:
                    consumer.cancelled = False
                    self._start_consumer(consumer)
                    log.info("consuming again", queue=consumer.queue, connection=self._name)

        self._call(resume)

    def consume(
        self,
        queue: str,
        prefetch: int,
        handler: Callable[[Delivery], None],
        arguments: dict[str, Any] | None = None,
    ) -> None:
        """Consume ``queue`` with manual acks; ``handler`` runs on the I/O thread.

        The consumer is re-opened after every reconnect, with the same ``arguments``
        (a stream consumer with ``x-stream-offset: first`` replays from the start).
        """
        consumer = _Consumer(queue, prefetch, handler, arguments)

        def add() -> None:
            self._state.consumers.append(consumer)
            if self.connected:
                self._start_consumer(consumer)

        self._call(add)

    def cancel_consumer(self, queue: str) -> Future[None]:
        """Stop consuming ``queue``; the future resolves once the broker confirmed it."""
        return self.cancel_consumers(lambda consumer: consumer.queue == queue)

    def cancel_consumers(self, which: Callable[[_Consumer], bool] | None = None) -> Future[None]:
        """Stop every consumer (or ``which``); resolves once the broker confirmed it."""
        future: Future[None] = Future()

        def cancel() -> None:
            state = self._state
            chosen = [which is None or which(c) for c in state.consumers]
            consumers = [c for c, pick in zip(state.consumers, chosen, strict=True) if pick]
            state.consumers = [
                c for c, pick in zip(state.consumers, chosen, strict=True) if not pick
            ]
            tags = [c.tag for c in consumers if c.tag is not None]
            if not tags or not self.connected:
                future.set_result(None)
                return
            if self._state.blocked is not None:
                # A blocked connection is not read until the alarm clears: no cancel-ok
                # comes. pika rejects (requeues) what is delivered to the tags from now on.
                future.set_result(None)
            remaining = set(tags)

            def on_cancel_ok(frame: Any) -> None:
                remaining.discard(frame.method.consumer_tag)
                if not remaining and not future.done():
                    future.set_result(None)

            for tag in tags:
                self._state.channel.basic_cancel(tag, callback=on_cancel_ok)

        self._call(cancel)
        return future

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the I/O thread after ``delay`` seconds; thread-safe."""
        self._call(lambda: self._ioloop.call_later(delay, callback))

    def ack(self, delivery: Delivery, *, multiple: bool = False) -> None:
        """Acknowledge ``delivery`` (with ``multiple``, every earlier one of its channel too).

        Ignored if its connection is gone: the broker redelivers it.
        """
        self._call(lambda: self._settle(delivery, ack=True, requeue=False, multiple=multiple))

    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        """Reject ``delivery``; with ``requeue`` the broker delivers it again."""
        self._call(lambda: self._settle(delivery, ack=False, requeue=requeue))

    # -- I/O thread --------------------------------------------------------------------

    def _call(self, op: Callable[[], None]) -> None:
        with self._ops_lock:
            self._ops.append(op)
            if self._wake_pending:
                return
            self._wake_pending = True
        self._ioloop.add_callback_threadsafe(self._run_ops)

    def _run_ops(self) -> None:
        with self._ops_lock:
            self._wake_pending = False
            ops, self._ops = self._ops, deque()
        for op in ops:
            try:
                op()
            except Exception:
                log.exception("broker operation failed")
        _coalesce_output(self._state.connection)

    def _connect(self) -> None:
        params = connection_parameters(self._nodes[self._node], name=self._name)
        self._state.connection = pika.SelectConnection(
            params,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self._ioloop,
        )
        self._state.connection.add_on_connection_blocked_callback(self._on_blocked)
        self._state.connection.add_on_connection_unblocked_callback(self._on_unblocked)

    def _on_blocked(self, _connection: Any, frame: Any) -> None:
        reason = str(getattr(frame.method, "reason", "") or "no reason given")
        self._state.blocked = reason
        log.warning(
            "the broker blocks publishing (a resource alarm); publishes wait",
            reason=reason,
            node=redact_url(self._nodes[self._node]),
            connection=self._name,
        )
        if self._on_blocked_change is not None:
            self._on_blocked_change(reason)

    def _on_unblocked(self, _connection: Any, _frame: Any) -> None:
        state = self._state
        if state.blocked is None:
            return
        state.blocked = None
        log.info(
            "the broker takes publishes again",
            node=redact_url(self._nodes[self._node]),
            connection=self._name,
            waiting=len(state.waiting),
        )
        if self._on_blocked_change is not None:
            self._on_blocked_change(None)
        if self.connected:
            self._publish_waiting()

    def _publish_waiting(self) -> None:
        waiting, self._state.waiting = self._state.waiting, deque()
        for pending in waiting:
            self._publish(pending)

    def _on_connection_open(self, connection: Any) -> None:
        node = redact_url(self._nodes[self._node])
        if self._missed or self._ready.is_set():  # a failover or a reconnect
            missed = str(unreachable(self._missed)) if self._missed else None
            log.info("connected to broker", node=node, connection=self._name, unreachable=missed)
        else:
            log.debug("connected to broker", node=node, connection=self._name)
        self._missed.clear()
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_error(self, _connection: Any, error: BaseException) -> None:
        """A node did not answer: try the next one at once, or wait once all failed."""
        self._state.connection = None
        self._missed.append((self._nodes[self._node], error))
        self._node = (self._node + 1) % len(self._nodes)
        if len(self._missed) % len(self._nodes):
            self._ioloop.call_later(0, self._connect)
            return
        failed = unreachable(self._missed[-len(self._nodes) :])
        del self._missed[: -len(self._nodes)]
        if not self._ready.is_set():
            self._start_error = failed
            self._ready.set()
            return
        self._schedule_reconnect(failed)

    def _on_connection_closed(self, _connection: Any, reason: BaseException) -> None:
        state = self._state
        state.connection = state.channel = None
        state.generation += 1
        if state.blocked is not None:  # the next connection hears of an alarm anew
            state.blocked = None
            if self._on_blocked_change is not None:
                self._on_blocked_change(None)
        if self._closing:
            self._fail_all(BrokerUnavailable("connection closed"))
            self._ioloop.stop()
            return
        node = self._nodes[self._node]
        log.warning("broker connection lost", reason=str(reason), node=redact_url(node))
        self._requeue_unconfirmed(unavailable(node, reason))
        # The node may be gone: the others are tried first, starting with the next.
        self._node = (self._node + 1) % len(self._nodes)
        self._schedule_reconnect(lost(node, reason))

    def _next_delay(self) -> float:
        """The next wait before reconnecting: longer after each failure in a row."""
        delay = _RECONNECT_DELAYS[min(self._state.failures, len(_RECONNECT_DELAYS) - 1)]
        self._state.failures += 1
        return delay

    def _schedule_reconnect(self, reason: BaseException) -> None:
        self._state.disconnected = str(reason) or repr(reason)
        delay = self._next_delay()
        log.info("reconnecting to broker", in_seconds=delay, reason=str(reason))
        self._ioloop.call_later(delay, self._connect)

    def _on_channel_open(self, channel: Any) -> None:
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.add_on_cancel_callback(self._on_consumer_cancelled)
        channel.confirm_delivery(
            self._on_confirm, callback=lambda _: self._on_channel_ready(channel)
        )

    def _on_channel_ready(self, channel: Any) -> None:
        state = self._state
        state.channel = channel
        state.framer = PublishFramer(channel.channel_number, state.connection.params.frame_max)
        state.unconfirmed.restart()
        state.failures = 0
        state.disconnected = None
        for consumer in state.consumers:
            if not consumer.cancelled:  # its queue is gone: resume_cancelled, once declared
                self._start_consumer(consumer)
        self._publish_waiting()
        self._ready.set()

    def _on_consumer_cancelled(self, frame: Any) -> None:
        """The broker cancelled a consumer: its queue was deleted (or lost its leader)."""
        tag = frame.method.consumer_tag
        for consumer in self._state.consumers:
            if consumer.tag == tag:
                consumer.tag = None
                consumer.cancelled = True
                log.error(
                    "the broker cancelled the consumer of a queue (was it deleted?)",
                    queue=consumer.queue,
                    connection=self._name,
                )

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        state = self._state
        if channel is not state.channel:
            return
        state.channel = None
        state.generation += 1
        connection = state.connection
        if self._closing or connection is None or not connection.is_open:
            return
        error = self._channel_error(reason)
        if isinstance(error, TopologyMissing):
            state.missing = str(reason)
        log.error("broker closed the channel", reason=str(reason))
        # A channel closes for an error of ours (a missing exchange, …): publishing the
        # same again would fail the same way, so nothing is republished.
        self._fail_unconfirmed(error)
        self._ioloop.call_later(
            self._next_delay(),
            lambda: (
                connection.is_open and connection.channel(on_open_callback=self._on_channel_open)
            ),
        )

    @staticmethod
    def _channel_error(reason: BaseException) -> BrokerError:
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker) and reason.reply_code == 404:
            return TopologyMissing(
                f"{reason.reply_text}; declare the topology with `rohrpost topology declare`"
            )
        return BrokerError(f"channel closed by broker: {reason}")

    def _start_consumer(self, consumer: _Consumer) -> None:
        channel = self._state.channel
        generation = self._state.generation

        def on_message(_ch: Any, method: Any, properties: Any, body: bytes) -> None:
            consumer.handler(
                Delivery(
                    tag=method.delivery_tag,
                    generation=generation,
                    queue=consumer.queue,
                    routing_key=method.routing_key,
                    properties=properties,
                    body=body,
                    redelivered=method.redelivered,
                )
            )

        channel.basic_qos(prefetch_count=consumer.prefetch)
        consumer.tag = channel.basic_consume(
            consumer.queue, on_message, auto_ack=False, arguments=consumer.arguments
        )

    def _publish(self, pending: Pending) -> None:
        state = self._state
        if pending.settled:
            return
        if not self.connected or state.blocked is not None:
            if self._closing:
                pending.settle(BrokerUnavailable("broker connection is closing"))
            else:
                state.waiting.append(pending)  # until connected, or unblocked
            return
        pending.written = True
        state.unconfirmed.track(pending)
        # One buffer per message instead of pika's three; _run_ops joins them further.
        framer = state.framer
        assert framer is not None  # set with the channel
        state.connection._output_marshaled_frames([framer.frames(pending.publication)])

    def _on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        reply = f"{method.reply_code} {method.reply_text}"
        self._state.unconfirmed.returned(properties.message_id, reply)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        nacked = self._state.unconfirmed.confirmed(
            method.delivery_tag,
            multiple=method.multiple,
            acked=isinstance(method, pika.spec.Basic.Ack),
        )
        for pending in nacked:
            self._publish_again_later(pending)

    def _may_publish_again(self, pending: Pending) -> bool:
        republish = self._republish or pending.publication.republish
        return republish and pending.nacks < len(_NACK_DELAYS) and not self._closing

    def _publish_again_later(self, pending: Pending) -> None:
        delay = _NACK_DELAYS[pending.nacks - 1]
        publication = pending.publication
        log.debug(
            "broker nacked a publish; publishing it again",
            exchange=publication.exchange,
            routing_key=publication.routing_key,
            nacks=pending.nacks,
            in_seconds=delay,
        )
        self._state.nacked.add(pending)

        def again() -> None:
            if pending in self._state.nacked:  # not yet failed by a close
                self._state.nacked.discard(pending)
                self._publish(pending)

        self._ioloop.call_later(delay, again)

    def _settle(
        self, delivery: Delivery, *, ack: bool, requeue: bool, multiple: bool = False
    ) -> None:
        if delivery.generation != self._state.generation or not self.connected:
            return
        if ack:
            self._state.channel.basic_ack(delivery.tag, multiple=multiple)
        else:
            self._state.channel.basic_nack(delivery.tag, requeue=requeue)

    def _requeue_unconfirmed(self, error: BaseException) -> None:
        """After a lost channel: publish again what may be, fail the rest with ``error``."""
        again: list[Pending] = []
        for pending in self._state.unconfirmed.take_all():
            if self._republish or pending.publication.republish:
                again.append(pending)
            else:
                pending.settle(error)
        self._state.waiting.extendleft(reversed(again))

    def _fail_unconfirmed(self, error: BaseException) -> None:
        for pending in self._state.unconfirmed.take_all():
            pending.settle(error)

    def _fail_all(self, error: BaseException) -> None:
        self._fail_unconfirmed(error)
        state = self._state
        waiting, state.waiting, nacked, state.nacked = state.waiting, deque(), state.nacked, set()
        for pending in [*waiting, *nacked]:
            pending.settle(error)

    def _shutdown(self) -> None:
        self._closing = True
        connection = self._state.connection
        if connection is not None and connection.is_open:
            connection.close()
        elif connection is not None and connection.is_closing:
            return
        else:
            self._fail_all(BrokerUnavailable("broker connection closed"))
            self._ioloop.stop()

    def _drop(self) -> None:
        """Cut the connection without the broker's answer (as a missed heartbeat does)."""
        self._closing = True
        connection = self._state.connection
        if connection is not None and not connection.is_closed:
            # pika's own way to end a connection whose peer went silent: the stream
            # closes and _on_connection_closed stops the loop.
            connection._terminate_stream(BrokerUnavailable("the broker did not answer the close"))
        else:
            self._fail_all(BrokerUnavailable("broker connection closed"))
            self._ioloop.stop()

    def _stop_loop(self) -> None:
        self._closing = True
        self._ioloop.add_callback_threadsafe(self._shutdown)
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
