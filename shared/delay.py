"""Delayed delivery from binary TTL levels: the routing key carries the delay.

Levels k = N-1 … 0 each have a topic exchange and a quorum queue whose messages
live ``2**k`` seconds, then dead-letter to level k-1 (level 0 to the send exchange).
A routing key is N words of ``0``/``1`` (bit N-1 first) followed by ``tenant.app``.
Level k's exchange keeps a message whose bit k is 1 (it waits 2**k s) and passes a
message whose bit k is 0 straight on, so a mail waits exactly its delay in seconds.
Every message in a level queue has the same TTL, so arrival order is expiry order:
no head-of-line blocking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class DelayLevels:
    """The delay levels of one namespace."""

    namespace: str
    count: int

    @property
    def max_seconds(self) -> int:
        """The longest delay one pass through the levels can hold."""
        return (1 << self.count) - 1

    @property
    def entry_exchange(self) -> str:
        """Where delayed messages are published: the highest level."""
        return self.exchange(self.count - 1)

    def exchange(self, level: int) -> str:
        """Name of level ``level``'s exchange."""
        return f"{self.namespace}.delay.{level}"

    def queue(self, level: int) -> str:
        """Name of level ``level``'s queue."""
        return f"{self.namespace}.delay.{level}"

    def ttl_ms(self, level: int) -> int:
        """How long a message waits in level ``level``'s queue, in milliseconds."""
        return 1000 << level

    def seconds(self, delay: timedelta | float) -> int:
        """Whole seconds to wait for ``delay``: rounded up (never early), capped at one pass."""
        raw = delay.total_seconds() if isinstance(delay, timedelta) else delay
        return min(self.max_seconds, max(0, math.ceil(raw)))

    def routing_key(self, seconds: int, tenant: str, app: str) -> str:
        """Routing key that delays a message ``seconds`` then delivers it to tenant/app."""
        if not 0 <= seconds <= self.max_seconds:
            raise ValueError(f"delay {seconds}s is outside 0..{self.max_seconds}s")
        bits = format(seconds, f"0{self.count}b")
        return ".".join([*bits, tenant, app])

    def keep_pattern(self, level: int) -> str:
        """Binding key on level ``level``'s exchange that keeps messages (bit is 1)."""
        return self._pattern(level, "1")

    def pass_pattern(self, level: int) -> str:
        """Binding key on level ``level``'s exchange that passes messages on (bit is 0)."""
        return self._pattern(level, "0")

    def _pattern(self, level: int, bit: str) -> str:
        return "*." * (self.count - 1 - level) + bit + ".#"

    def entry_pattern(self) -> str:
        """Binding key matching every delayed routing key: N bits plus tenant.app."""
        return ".".join(["*"] * (self.count + 2))

    def arrival_pattern(self, route_key: str) -> str:
        """Binding key matching every delayed routing key of ``route_key`` (tenant.app)."""
        return ".".join([*(["*"] * self.count), route_key])
