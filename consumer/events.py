"""Publishing outcome events in batches: one message carries up to ``size`` events.

Every mail's outcome is an event, and one message per event was a quarter of the
broker's work per mail (a topic routing plus a quorum-queue append, ~200 µs here)
and as much again for the history consumer. The batcher gathers events for at most
``interval`` seconds, publishes them as one JSON array (type ``rohrpost.events.v1``,
routing key ``batch.{tenant}.{app}`` of its first event), and tells every event's
owner when the broker confirmed it — the worker acks a mail only then.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import pika

from rohrpost.shared.broker import Broker, Publication
from rohrpost.shared.events import MailEvent

BATCH_TYPE = "rohrpost.events.v1"
Done = Callable[[BaseException | None], None]


def batch_body(events: list[MailEvent]) -> bytes:
    """The wire form of a batch: a JSON array of events."""
    return b"[" + b",".join(e.model_dump_json(exclude_none=True).encode() for e in events) + b"]"


class EventBatcher:
    """Collects events from any thread; publishes a batch when full or ``interval`` old."""

    def __init__(
        self, broker: Broker, exchange: str, *, size: int = 200, interval: float = 0.02
    ) -> None:
        self._broker = broker
        self._exchange = exchange
        self._size = size
        self._interval = interval
        self._lock = threading.Lock()
        self._events: list[MailEvent] = []
        self._done: list[Done] = []
        self._generation = 0

    def add(self, event: MailEvent, done: Done) -> None:
        """Queue ``event``; ``done(error)`` runs once the broker confirmed (or refused) it."""
        with self._lock:
            self._events.append(event)
            self._done.append(done)
            first, full = len(self._events) == 1, len(self._events) >= self._size
            generation = self._generation
        if full:
            self.flush()
        elif first:
            self._broker.call_later(self._interval, lambda: self._flush_if(generation))

    def flush(self) -> None:
        """Publish what is queued now."""
        with self._lock:
            events, done = self._events, self._done
            self._events, self._done = [], []
            self._generation += 1
        if not events:
            return
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=str(uuid.uuid4()),
            type=BATCH_TYPE,
        )
        first = events[0]
        key = f"batch.{first.tenant}.{first.app or '_'}"
        # Events are idempotent (the store keeps each event_id once): after a lost
        # connection the batch is published again, so a mail that was sent keeps its
        # `sent` event even though its delivery can no longer be acked.
        future = self._broker.publish(
            Publication(
                self._exchange,
                key,
                batch_body(events),
                properties,
                mandatory=False,
                republish=True,
            )
        )

        def settle(_future: object) -> None:
            error = future.exception()
            for callback in done:
                callback(error)

        future.add_done_callback(settle)

    def _flush_if(self, generation: int) -> None:
        with self._lock:
            due = generation == self._generation
        if due:
            self.flush()
