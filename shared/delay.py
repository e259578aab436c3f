"""Delayed delivery from TTL levels: the routing key carries the delay, in base 8.

There are N levels, k = N-1 … 0, each with 7 quorum queues: queue (k, d) keeps a
message ``d * 8**k`` seconds. A routing key is the delay in seconds as N octal
digits (most significant first), one word each, followed by ``tenant.app``; a mail
waits in one queue per nonzero digit, highest first, so it waits its delay exactly.
Every message in one queue has the same TTL, so arrival order is expiry order: no
head-of-line blocking.

Routing skips zero digits in one step. The entry exchange sends a key straight to
the queue of its highest nonzero digit; a message leaving level k is dead-lettered
to exchange ``{ns}.delay.{k}``, which sends it straight to the queue of the next
nonzero digit below k or, when none is left, into the send queue of its tenant/app.

Why base 8 and not binary (the NServiceBus / Celery layout): RabbitMQ's topic
routing costs grow with the number of words in the key, and every hop between
levels is one routing. Measured here (20,000 mails due in the same second): binary
levels for the default 90 days (25-word keys, a chain of pass-through exchanges)
released the last mail 5.2 s late; 23 binary levels with direct hops, 3.3 s at
15 words; octal keys are 10 words for 90 days and need fewer hops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

BASE = 8
DIGITS = range(1, BASE)
#: A scheduled mail leaves the delay levels this many seconds (and up to one more: whole
#: seconds round down) before it is due; the worker that receives it holds it on a timer,
#: without a sender thread, until it is due (``rohrpost.consumer.due``). The hops take
#: their time for a burst: the last hop lets 20,000 mails due in one second into their
#: send queue at 4,000-8,500 a second here (bounded by RabbitMQ's dead-letter workers),
#: so with a lead of one second the last of them arrived 3-5 s late; released this early,
#: they wait in the send queue when they are due.
RELEASE_LEAD_SECONDS = 5


def _power(level: int) -> int:
    return int(BASE**level)


@dataclass(frozen=True)
class DelayLevels:
    """The delay levels of one namespace."""

    namespace: str
    count: int

    @classmethod
    def covering(cls, namespace: str, max_seconds: float) -> DelayLevels:
        """Just enough levels for one pass to hold ``max_seconds``."""
        count = 1
        while _power(count) - 1 < max_seconds:
            count += 1
        return cls(namespace, count)

    @property
    def max_seconds(self) -> int:
        """The longest delay one pass through the levels can hold."""
        return _power(self.count) - 1

    @property
    def entry_exchange(self) -> str:
        """Where delayed messages enter (workers' retries; producers use the schedule)."""
        return f"{self.namespace}.delay"

    def exchange(self, level: int) -> str:
        """Name of the exchange a message leaving level ``level`` is dead-lettered to."""
        return f"{self.namespace}.delay.{level}"

    def queue(self, level: int, digit: int) -> str:
        """Name of the queue holding messages ``digit * 8**level`` seconds."""
        return f"{self.namespace}.delay.{level}.{digit}"

    def queues(self) -> list[tuple[int, int]]:
        """Every (level, digit), highest level first."""
        return [(level, digit) for level in reversed(range(self.count)) for digit in DIGITS]

    def ttl_ms(self, level: int, digit: int) -> int:
        """How long a message waits in queue (level, digit), in milliseconds."""
        return digit * _power(level) * 1000

    def seconds(self, delay: timedelta | float) -> int:
        """Whole seconds to wait for ``delay``: rounded up (never early), capped at one pass."""
        raw = delay.total_seconds() if isinstance(delay, timedelta) else delay
        return min(self.max_seconds, max(0, math.ceil(raw)))

    def release_seconds(self, until_due: timedelta | float) -> int:
        """Whole seconds a mail due in ``until_due`` waits in the levels; capped at one pass.

        ``RELEASE_LEAD_SECONDS`` less than its whole seconds rounded down: it reaches its
        send queue that much (up to a second more) before it is due, and the worker holds
        it until then — it is never sent early, and a burst's passage through the last hop
        happens before it is due instead of after. A mail due sooner goes straight to its
        send queue.
        """
        raw = until_due.total_seconds() if isinstance(until_due, timedelta) else until_due
        return min(self.max_seconds, max(0, math.floor(raw) - RELEASE_LEAD_SECONDS))

    def digits(self, seconds: int) -> list[int]:
        """``seconds`` as ``count`` base-8 digits, most significant first."""
        if not 0 <= seconds <= self.max_seconds:
            raise ValueError(f"delay {seconds}s is outside 0..{self.max_seconds}s")
        return [(seconds // _power(level)) % BASE for level in reversed(range(self.count))]

    def routing_key(self, seconds: int, tenant: str, app: str) -> str:
        """Routing key that delays a message ``seconds`` then delivers it to tenant/app."""
        return ".".join([*(str(d) for d in self.digits(seconds)), tenant, app])

    def _pattern(self, skipped: int, zeros: int, last: str) -> str:
        """``skipped`` digits of any value, ``zeros`` zero digits, then ``last``."""
        return ".".join([*(["*"] * skipped), *(["0"] * zeros), last])

    def first_stop_pattern(self, level: int, digit: int) -> str:
        """Entry binding to queue (level, digit): every higher digit 0, this one ``digit``."""
        return self._pattern(0, self.count - 1 - level, f"{digit}.#")

    def next_stop_pattern(self, after: int, level: int, digit: int) -> str:
        """Binding from the exchange after level ``after`` to queue (level, digit) below it."""
        return self._pattern(self.count - after, after - 1 - level, f"{digit}.#")

    def done_pattern(self, after: int, route_key: str) -> str:
        """Binding from the exchange after level ``after`` to the send queue of ``route_key``."""
        return self._pattern(self.count - after, after, route_key)

    def arrival_pattern(self, route_key: str) -> str:
        """Binding key matching every delayed routing key of ``route_key`` (tenant.app)."""
        return ".".join([*(["*"] * self.count), route_key])
