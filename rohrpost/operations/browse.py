"""Reading quorum queues without consuming them, and removing exactly what was moved.

RabbitMQ queues cannot be browsed: a browse takes every message without acking it,
and closing the channel puts back everything not removed.

Removing is an ack, and acks are fire-and-forget. Quorum queues in RabbitMQ 3.10 to
3.13 sometimes drop acks sent just before the channel closes (rabbitmq-server
issue #10327; seen here when 1,000 dead letters were moved: 17 came back). So after
the channel is closed, the queues are browsed again and any message identical to
one that was removed (same id, round and body) is removed again, until a browse
finds none. Identical copies are redundant by definition; a mail that failed again
meanwhile has a newer round and is kept.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pika.exceptions

from rohrpost.shared.broker import admin_channel
from rohrpost.shared.errors import BrokerError, BrokerUnavailable, TopologyMissing
from rohrpost.shared.logs import get_logger
from rohrpost.shared.wire import round_of

log = get_logger(__name__)

_REPAIR_PASSES = 10


@dataclass(frozen=True)
class Message:
    """A message held (unacked) by a browse."""

    queue: str
    tag: int
    properties: Any
    body: bytes

    @property
    def identity(self) -> tuple[str, str | None, int, str]:
        """What makes two copies of a message the same message."""
        digest = hashlib.sha256(self.body).hexdigest()
        return (self.queue, self.properties.message_id, round_of(self.properties), digest)


class Browse:
    """Every message of some queues, held unacked; ``remove`` acks one."""

    def __init__(self, channel: Any, messages: list[Message]) -> None:
        self.channel = channel
        self.messages = messages
        self.removed: set[tuple[str, str | None, int, str]] = set()
        self._acked: set[int] = set()

    def remove(self, message: Message) -> None:
        """Take ``message`` out of its queue for good (ack)."""
        self.remove_many([message])

    def remove_many(self, messages: list[Message]) -> None:
        """Take ``messages`` out of their queues, with as few acks as the others allow.

        A ``multiple`` ack removes every unacked message up to its tag, so it serves the
        messages below the first one that stays (all of them, when a whole queue is
        moved: one ack per batch instead of one per message); the rest are acked singly.
        """
        doomed = {m.tag for m in messages} - self._acked
        staying = [m.tag for m in self.messages if m.tag not in doomed and m.tag not in self._acked]
        first_staying = min(staying, default=None)
        below = [t for t in doomed if first_staying is None or t < first_staying]
        if below:
            self.channel.basic_ack(max(below), multiple=True)
        for tag in sorted(doomed.difference(below)):
            self.channel.basic_ack(tag)
        self._acked |= doomed
        self.removed.update(m.identity for m in messages)


#: How long a browse waits while nothing at all arrives before it takes the queue as
#: read (messages another reader holds unacked never come). Counted from the last byte,
#: not the last whole message: a 15 MB dead letter on a busy broker takes seconds.
_QUIET_SECONDS = 3.0


def _take_all(channel: Any, queues: list[str]) -> list[Message]:
    """Every ready message of ``queues``, held unacked (consumed, not fetched one by one).

    A ``basic.get`` is a round trip per message (~2 ms: 10,000 dead letters took 20 s);
    a consumer without a prefetch limit gets them streamed. It reads as many as the
    queue said it held (or until it is quiet for a second), then cancels.
    """
    taken: list[Message] = []
    for queue in queues:
        try:
            taken += _consume_all(channel, queue)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                raise TopologyMissing(
                    f"queue {queue} does not exist (run `rohrpost topology declare`)"
                ) from exc
            raise BrokerError(f"reading {queue}: {exc.reply_text}") from exc
        except pika.exceptions.AMQPError as exc:
            raise BrokerUnavailable(f"lost RabbitMQ while reading {queue}: {exc!r}") from exc
    return taken


def _consume_all(channel: Any, queue: str) -> list[Message]:
    counts = channel.queue_declare(queue, passive=True).method
    if counts.consumer_count:
        # a dead-letter or held queue has no consumer but a browse: what it holds is not ready
        log.warning(
            "another reader holds messages of the queue; they are not shown",
            queue=queue,
            readers=counts.consumer_count,
        )
    expected = counts.message_count
    if not expected:
        return []
    taken: list[Message] = []
    channel.basic_qos(prefetch_count=0)

    def take(_channel: Any, method: Any, properties: Any, body: bytes) -> None:
        taken.append(Message(queue, method.delivery_tag, properties, body))

    tag = channel.basic_consume(queue, take, auto_ack=False)
    quiet_since = time.monotonic()
    while len(taken) < expected and time.monotonic() - quiet_since < _QUIET_SECONDS:
        before = _bytes_received(channel)
        channel.connection.process_data_events(time_limit=0.05)
        if _bytes_received(channel) != before:
            quiet_since = time.monotonic()
    channel.basic_cancel(tag)  # what arrives meanwhile stays unacked and goes back at close
    return taken


def _bytes_received(channel: Any) -> int:
    """What the channel's connection has read so far (pika counts it on its inner connection)."""
    return int(getattr(getattr(channel.connection, "_impl", None), "bytes_received", 0))


@contextmanager
def browse(url: str, queues: list[str]) -> Iterator[Browse]:
    """Hold every message of ``queues``; on exit put back all that were not removed."""
    with admin_channel(url) as channel:
        session = Browse(channel, _take_all(channel, queues))
        yield session
    if session.removed:
        _repair(url, queues, session.removed)


def _repair(url: str, queues: list[str], removed: set[tuple[str, str | None, int, str]]) -> None:
    for _ in range(_REPAIR_PASSES):
        with admin_channel(url) as channel:
            again = [m for m in _take_all(channel, queues) if m.identity in removed]
            for message in again:
                channel.basic_ack(message.tag)
        if not again:
            return
        log.info("removed copies the broker had put back (lost acks)", count=len(again))
    log.error("some removed messages keep coming back; they are duplicates", queues=queues)
