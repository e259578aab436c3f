"""Connection permits for SMTP servers with ``max_connections``, shared by every process.

A permit is a *lease*: a member of the sorted set ``{ns}:conn:NAME`` whose score is
when it expires (Redis's clock). Taking one first drops the expired members, so the
permits of a worker killed with SIGKILL come back once their lease ran out
(``ttl``, 15 s); a live worker renews its leases every few seconds. While Redis is
unreachable each process keeps to its share of the permits (the limit divided by
the number of processes, at least one), counted in the process.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from rohrpost.shared.state import SharedState, StateUnavailable

# KEYS[1]: the server's set. ARGV: limit, token, ttl_ms, waiting_ms. 1 when taken; else 0,
# and KEYS[1]:waiting says for waiting_ms that a process waits for a permit.
_ACQUIRE = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1] .. ':waiting', '1', 'PX', ARGV[4])
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: sets, ARGV[1]: ttl_ms, ARGV[i + 1]: the token in KEYS[i]. Per token 1 when still held,
# 2 when held and some process waits for a permit of that server.
_RENEW = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local expires = redis.call('ZSCORE', key, ARGV[i + 1])
  if expires and tonumber(expires) > now then
    redis.call('ZADD', key, now + ttl, ARGV[i + 1])
    redis.call('PEXPIRE', key, ttl)
    out[i] = 1 + redis.call('EXISTS', key .. ':waiting')
  else
    out[i] = 0
  end
end
return out
"""


#: How long a refused request for a permit counts as a process waiting for one.
_WAITING_MS = 3000


@dataclass(frozen=True, slots=True)
class Lease:
    """One connection permit for ``server``; ``shared``: held in Redis, else in this process."""

    server: str
    token: str
    shared: bool


@dataclass(frozen=True, slots=True)
class Renewal:
    """Leases no longer held, and servers whose permits another process waits for."""

    lost: list[Lease]
    wanted: set[str]


class ConnectionLeases:
    """Take, renew and give back connection permits; thread-safe."""

    def __init__(
        self,
        state: SharedState | None,
        namespace: str,
        shares: Callable[[str], int],
        *,
        ttl: float = 15.0,
    ) -> None:
        """``shares(server)``: how many processes share the server's permits (at least 1)."""
        self._state = state
        self._prefix = f"{namespace}:conn:"
        self._shares = shares
        self._ttl_ms = int(ttl * 1000)
        self._acquire = state.script(_ACQUIRE) if state else None
        self._renew = state.script(_RENEW) if state else None
        self._base = uuid.uuid4().hex[:12]
        self._tokens = itertools.count()
        self._held_locally: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def ttl(self) -> float:
        """Seconds a lease lasts without renewal."""
        return self._ttl_ms / 1000

    def acquire(self, server: str, limit: int) -> Lease | None:
        """A permit for one more connection to ``server``, or None when all are taken."""
        token = f"{self._base}:{next(self._tokens)}"
        if self._state is not None and self._acquire is not None:
            script, key = self._acquire, f"{self._prefix}{server}"
            args = [limit, token, self._ttl_ms, _WAITING_MS]
            try:
                taken = self._state.run(lambda c: script(keys=[key], args=args, client=c))
            except StateUnavailable:
                pass
            else:
                return Lease(server, token, shared=True) if int(taken) else None
        share = max(1, limit // max(1, self._shares(server)))
        with self._lock:
            if self._held_locally[server] >= share:
                return None
            self._held_locally[server] += 1
        return Lease(server, token, shared=False)

    def renew(self, leases: list[Lease]) -> Renewal:
        """Extend the leases; say which are lost and for which servers others wait.

        Lost are shared leases that expired (or Redis lost them) and, once Redis
        answers again, the ones counted in this process while it did not: their
        connections are to be closed.
        """
        if not leases or self._state is None or self._renew is None:
            return Renewal([], set())
        shared = [lease for lease in leases if lease.shared]
        script = self._renew
        keys = [f"{self._prefix}{lease.server}" for lease in shared]
        args: list[str | int] = [self._ttl_ms, *(lease.token for lease in shared)]
        try:
            held = self._state.run(lambda c: script(keys=keys, args=args, client=c))
        except StateUnavailable:
            return Renewal([], set())  # kept until Redis answers, or their lease runs out there
        lost = [lease for lease, ok in zip(shared, held, strict=True) if not int(ok)]
        lost += [lease for lease in leases if not lease.shared]
        wanted = {lease.server for lease, ok in zip(shared, held, strict=True) if int(ok) == 2}
        return Renewal(lost, wanted)

    def release(self, lease: Lease) -> None:
        """Give the permit back."""
        if not lease.shared:
            with self._lock:
                self._held_locally[lease.server] -= 1
            return
        if self._state is None:
            return
        key = f"{self._prefix}{lease.server}"
        with contextlib.suppress(StateUnavailable):  # else it expires by itself
            self._state.run(lambda c: c.zrem(key, lease.token))
