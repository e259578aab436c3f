"""AMQP building blocks: connection parameters, a blocking admin channel, publications,
deliveries, and confirm tracking. ``rohrpost.shared.broker.Broker`` puts them to work.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from rohrpost.shared.errors import BrokerUnavailable, NotConfirmed, Unroutable
from rohrpost.shared.headers import use_tolerant_properties
from rohrpost.shared.logs import get_logger
from rohrpost.shared.nodes import redact_url, split_nodes

log = get_logger(__name__)


def connection_parameters(url: str, *, timeout: float = 10.0, name: str = "rohrpost") -> Any:
    """pika parameters for one node's ``url`` with bounded connect and socket timeouts."""
    use_tolerant_properties()  # before any connection reads a message
    params = pika.URLParameters(url)
    params.socket_timeout = timeout
    params.stack_timeout = timeout
    params.blocked_connection_timeout = None
    params.connection_attempts = 1
    params.client_properties = {"connection_name": name}
    return params


def unavailable(url: str, exc: BaseException) -> BrokerUnavailable:
    """A BrokerUnavailable naming the broker (without its password) and the cause."""
    # pika wraps the cause: AMQPConnectionError(AMQPConnectorSocketConnectError(
    # ConnectionRefusedError(111, ...))) prints as an empty string.
    while not str(exc) and exc.args and isinstance(exc.args[0], BaseException):
        exc = exc.args[0]
    return BrokerUnavailable(f"cannot reach RabbitMQ at {redact_url(url)}: {_cause(exc)}")


def lost(url: str, exc: BaseException) -> BrokerUnavailable:
    """A BrokerUnavailable saying the connection to ``url`` was lost, and why."""
    return BrokerUnavailable(f"lost the connection to RabbitMQ at {redact_url(url)}: {_cause(exc)}")


def unreachable(failures: list[tuple[str, BaseException]]) -> BrokerUnavailable:
    """A BrokerUnavailable naming every node tried (without passwords) and why each failed."""
    if len(failures) == 1:
        return unavailable(*failures[0])
    tried = "; ".join(f"{redact_url(node)}: {_cause(exc)}" for node, exc in failures)
    return BrokerUnavailable(f"cannot reach any RabbitMQ node: {tried}")


def _cause(exc: BaseException) -> str:
    """The innermost cause pika wrapped: AMQPConnectionError(AMQPConnectorSocketConnectError(
    ConnectionRefusedError(111, ...))) prints as an empty string, and the asynchronous
    adapter reports AMQPConnectionWorkflowFailed with the attempts' errors inside."""
    while True:
        attempts = getattr(exc, "exceptions", None)
        inner = getattr(exc, "exception", None)  # pika's AMQPConnectorPhaseErrorBase
        if attempts:
            exc = attempts[-1]
        elif isinstance(inner, BaseException):
            exc = inner
        elif exc.args and isinstance(exc.args[0], BaseException):
            exc = exc.args[0]
        else:
            return str(exc) or repr(exc)


def _open_blocking(url: str, timeout: float) -> Any:
    """A blocking connection to the first of ``url``'s nodes that answers, in their order.

    Its own loop rather than pika's list of parameters: pika reports only the last
    node's error, and this names every node tried.
    """
    failures: list[tuple[str, BaseException]] = []
    for node in split_nodes(url) or [url]:
        try:
            connection = pika.BlockingConnection(
                connection_parameters(node, timeout=timeout, name="rohrpost-admin")
            )
        except (pika.exceptions.AMQPError, AMQPConnectorException, OSError) as exc:
            # A broker that accepts the socket but not the handshake (overloaded, out of
            # file descriptors) surfaces as pika's AMQPConnectorStackTimeout, no AMQPError.
            failures.append((node, exc))
            continue
        if failures:
            log.info(
                "broker node unreachable; connected to another",
                node=redact_url(node),
                unreachable=str(unreachable(failures)),
            )
        return connection
    raise unreachable(failures) from failures[-1][1]


@contextlib.contextmanager
def admin_channel(url: str, *, timeout: float = 10.0) -> Iterator[Any]:
    """A blocking channel on a short-lived connection, for declarations and probes.

    ``url`` is one node's URL or a cluster's (comma-separated): the first node that
    answers serves the channel, each tried for up to ``timeout`` seconds.
    """
    connection = _open_blocking(url, timeout)
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                connection.close()


@dataclass(frozen=True, slots=True)
class Publication:
    """One message to publish."""

    exchange: str
    routing_key: str
    body: bytes
    properties: Any
    mandatory: bool = True
    #: Publish again on the next connection if this one is lost before the confirm,
    #: even on a broker that fails other unconfirmed publishes (for idempotent messages).
    republish: bool = False


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message received from a queue; ack or nack it through its Broker."""

    tag: int
    generation: int
    queue: str
    routing_key: str
    properties: Any
    body: bytes
    redelivered: bool


class BatchConfirm:
    """The confirms of a batch of publishes (``Broker.publish_many``)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.failures: list[tuple[int, BaseException]] = []
        self._remaining = size
        self._done = threading.Event()
        #: Set once the I/O thread has handed every publish of the batch to the socket.
        self.written = threading.Event()
        if size == 0:
            self._done.set()

    def settle(self, index: int, error: BaseException | None) -> None:
        """Record the broker's answer for publish ``index`` (called on the I/O thread)."""
        if error is not None:
            self.failures.append((index, error))
        self._remaining -= 1
        if self._remaining == 0:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every publish of the batch is settled; False on timeout."""
        return self._done.wait(timeout)


@dataclass(slots=True, eq=False)  # compared by identity: a publish is itself
class Pending:
    """One publish awaiting its confirm; settles a Future or one slot of a batch."""

    publication: Publication
    future: Future[None] | None = None
    batch: BatchConfirm | None = None
    index: int = 0
    returned: str | None = None
    settled: bool = False
    nacks: int = 0  # how often the broker nacked it and it was published again
    written: bool = False  # handed to the socket once: it may be queued

    def settle(self, error: BaseException | None) -> None:
        if self.settled:
            return
        self.settled = True
        if self.future is not None:
            if error is None:
                self.future.set_result(None)
            else:
                self.future.set_exception(error)
        elif self.batch is not None:
            self.batch.settle(self.index, error)


class ConfirmTracker:
    """Publishes awaiting the broker's confirm on one channel, by sequence number.

    Owned by the broker's I/O thread. A ``mandatory`` publish the broker could not
    route comes back as basic.return before its ack; it is matched by message id.
    A nacked publish is settled as NotConfirmed, unless ``retry_nacked`` says it is
    to be published again: then ``confirmed`` hands it back.
    """

    def __init__(self, retry_nacked: Callable[[Pending], bool] | None = None) -> None:
        self._retry_nacked = retry_nacked
        self._next_seq = 1
        self._unconfirmed: OrderedDict[int, Pending] = OrderedDict()
        self._by_message_id: dict[str, deque[int]] = {}

    def __len__(self) -> int:
        return len(self._unconfirmed)

    def restart(self) -> None:
        """A new channel numbers its publishes from 1 again."""
        self._next_seq = 1

    def track(self, pending: Pending) -> None:
        """Record ``pending`` as the next publish of the channel."""
        seq = self._next_seq
        self._next_seq += 1
        self._unconfirmed[seq] = pending
        pub = pending.publication
        if pub.mandatory and pub.properties.message_id:
            self._by_message_id.setdefault(pub.properties.message_id, deque()).append(seq)

    def returned(self, message_id: str | None, reply: str) -> None:
        """The broker returned a mandatory publish: its ack will say so."""
        seqs = self._by_message_id.get(message_id) if message_id else None
        while seqs:
            pending = self._unconfirmed.get(seqs.popleft())
            if pending is not None:
                pending.returned = reply
                return

    def confirmed(self, tag: int, *, multiple: bool, acked: bool) -> list[Pending]:
        """Settle the publishes an ack or nack covers; return the nacked ones to retry."""
        if multiple:
            settled = []
            while self._unconfirmed and next(iter(self._unconfirmed)) <= tag:
                settled.append(self._unconfirmed.popitem(last=False))
        else:
            one = self._unconfirmed.pop(tag, None)
            settled = [(tag, one)] if one is not None else []
        again = []
        for seq, pending in settled:
            self._forget(seq, pending)
            if not acked and self._retry_nacked is not None and self._retry_nacked(pending):
                pending.nacks += 1
                again.append(pending)
            else:
                pending.settle(_verdict(pending, acked))
        return again

    def take_all(self) -> list[Pending]:
        """Every unconfirmed publish, oldest first; the tracker is empty afterwards."""
        taken = list(self._unconfirmed.values())
        self._unconfirmed.clear()
        self._by_message_id.clear()
        return taken

    def _forget(self, seq: int, pending: Pending) -> None:
        message_id = pending.publication.properties.message_id
        seqs = self._by_message_id.get(message_id) if message_id else None
        if seqs is None:
            return
        if seq in seqs:  # not there when a basic.return already took it
            seqs.remove(seq)
        if not seqs:
            del self._by_message_id[message_id]


def _verdict(pending: Pending, acked: bool) -> BaseException | None:
    pub = pending.publication
    if not acked:
        times = f" {pending.nacks + 1} times" if pending.nacks else ""
        return NotConfirmed(
            f"broker nacked the publish to {pub.exchange} ({pub.routing_key}){times}: a queue "
            "it routes to refused it (full: x-max-length with reject-publish) or was unavailable"
        )
    if pending.returned is not None:
        return Unroutable(
            f"no queue is bound for {pub.routing_key!r} on {pub.exchange} "
            f"({pending.returned}); is the tenant/app declared? Run `rohrpost topology declare`"
        )
    return None
