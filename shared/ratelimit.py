"""Rate limits every worker process of an installation keeps together, in Redis.

``RateLimiter.reserve`` asks, in one atomic Lua script and one round trip for a
whole batch of mails, when each may go (``rohrpost.shared.gcra`` describes the
algorithm; the script is its twin and runs on Redis's clock, so the machines'
clocks do not matter). ``RateLimiter.throttled`` reports a throttling reply, which
cuts the server's effective rate for every process at once.

Keys (``{ns}`` the namespace): ``{ns}:limit:smtp:NAME`` and ``{ns}:limit:app:T:A``
hold a limit's GCRA times and vanish a minute after its last mail;
``{ns}:limit:smtp:NAME:aimd`` holds a server's cut rate and vanishes ten minutes
after the last throttling reply.

When Redis is unreachable every process keeps to its *share* of each limit (the
limit divided by the number of consumers of its send queue, which the caller
supplies), logs that once, and keeps sending; the limits are global again as soon
as Redis answers.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from rohrpost.shared.gcra import (
    BETA,
    BURST_MS,
    FLOOR_PER_SECOND,
    IDLE_MS,
    MEMORY_SECONDS,
    PREFETCH_MS,
    RECOVERY_SECONDS,
    Decision,
    Group,
    LocalRates,
    Params,
    Slot,
)
from rohrpost.shared.logs import get_logger
from rohrpost.shared.rate import Rate
from rohrpost.shared.state import SharedState, StateUnavailable

__all__ = ["Decision", "Group", "Limit", "RateLimiter", "Slot"]

log = get_logger(__name__)

# KEYS: per limit i, KEYS[2i-1] its GCRA hash and KEYS[2i] its AIMD hash.
# ARGV: horizon_ms, burst_ms, idle_ms, prefetch_ms, n, then per limit: per_second (0: none),
# adaptive; then the number of groups, and per group: count, kind (0 new mails, 1 mails
# coming back, 2 turns taken ahead), m, then m limit numbers. Returns Redis's clock (ms),
# each limit's effective rate (mails per 1000 s) and, per mail, 1 and the wait (µs) when
# reserved, 0 and the wait until its turn when deferred, 2 and 0 for a turn not taken.
_RESERVE = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local horizon, burst, idle, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local interval, tat, btat, touched = {}, {}, {}, {}
local out = {tostring(now)}
local a = 6
for i = 1, n do
  local rate, adaptive = tonumber(ARGV[a]), ARGV[a + 1] == '1'
  a = a + 2
  if adaptive then
    local h = redis.call('HMGET', KEYS[2 * i], 'rate', 'slope', 'at', 'cap')
    if h[1] then
      rate = math.min(tonumber(h[1]) + tonumber(h[2]) * (now - tonumber(h[3])) / 1000,
        tonumber(h[4]))
    end
  end
  interval[i] = rate > 0 and 1000 / rate or 0
  local g = redis.call('HMGET', KEYS[2 * i - 1], 'tat', 'btat')
  tat[i], btat[i] = tonumber(g[1]) or 0, tonumber(g[2]) or 0
  out[#out + 1] = math.floor(rate * 1000 + 0.5)
end
local groups = tonumber(ARGV[a])
a = a + 1
for _ = 1, groups do
  local count, kind, m = tonumber(ARGV[a]), ARGV[a + 1], tonumber(ARGV[a + 2])
  local returning, prefetch, stopped = kind == '1', kind == '2', false
  local bound = {}
  for j = 1, m do
    local k = tonumber(ARGV[a + 2 + j])
    if interval[k] > 0 then bound[#bound + 1] = k end
  end
  a = a + 3 + m
  for _ = 1, count do
    local go, queued = now, now
    for _, k in ipairs(bound) do
      go = math.max(go, tat[k] - burst)
      queued = math.max(queued, btat[k])
    end
    if prefetch and (stopped or go - now > window or queued - now > horizon) then
      stopped = true
      out[#out + 1] = 2
      out[#out + 1] = 0
    elseif go - now <= horizon and (returning or queued - now <= horizon) then
      for _, k in ipairs(bound) do
        tat[k] = math.max(tat[k], go) + interval[k]
        touched[k] = true
      end
      out[#out + 1] = 1
      out[#out + 1] = math.floor((go - now) * 1000 + 0.5)
    else
      local position = math.max(go, queued)
      for _, k in ipairs(bound) do
        btat[k] = math.max(btat[k], position) + interval[k]
        touched[k] = true
      end
      out[#out + 1] = 0
      out[#out + 1] = math.floor((position - now) * 1000 + 0.5)
    end
  end
end
for k, _ in pairs(touched) do
  redis.call('HSET', KEYS[2 * k - 1], 'tat', string.format('%.3f', tat[k]),
    'btat', string.format('%.3f', btat[k]))
  redis.call('PEXPIRE', KEYS[2 * k - 1], math.ceil(math.max(tat[k], btat[k]) - now + idle))
end
return out
"""

# KEYS[1]: a server's AIMD hash. ARGV: made_at_ms, configured per_second (0: none),
# seed per_second, beta, recovery_s, floor per_second, memory_ms.
# Returns the effective rate after the reply, in mails per 1000 s.
_THROTTLED = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local made, configured, seed = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local beta, recovery, floor = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local h = redis.call('HMGET', KEYS[1], 'rate', 'slope', 'at', 'cap')
local current
if h[1] then
  current = math.min(tonumber(h[1]) + tonumber(h[2]) * (now - tonumber(h[3])) / 1000,
    tonumber(h[4]))
  if made < tonumber(h[3]) then return math.floor(current * 1000 + 0.5) end
elseif configured > 0 then
  current = configured
else
  current = seed
end
if configured > 0 then floor = math.min(floor, configured) end
local new = math.max(floor, current * beta)
local cap = configured > 0 and configured or 2 * new / beta
redis.call('HSET', KEYS[1], 'rate', string.format('%.6f', new),
  'slope', string.format('%.9f', new * (1 / beta - 1) / recovery),
  'at', string.format('%.3f', now), 'cap', string.format('%.6f', cap))
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return math.floor(new * 1000 + 0.5)
"""


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit mails pass: ``smtp:NAME`` (adaptive) or ``app:TENANT:APP``."""

    name: str
    rate: Rate | None
    adaptive: bool = False

    @property
    def per_second(self) -> float:
        """The configured rate in mails per second; 0 when none is configured."""
        return self.rate.per_second if self.rate is not None else 0.0


#: Most turns taken ahead for one set of limits in one round trip.
_MOST_AHEAD = 256

#: How many processes share a limit while Redis is unreachable (at least 1).
Shares = Callable[[Limit], int]


class RateLimiter:
    """Reserves turns under every limit a mail passes; global in Redis, else per process."""

    def __init__(
        self,
        state: SharedState | None,
        namespace: str,
        shares: Shares,
        *,
        horizon: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``horizon``: longest wait (seconds) for which a turn is reserved rather than deferred."""
        self._state = state
        self._prefix = f"{namespace}:limit:"
        self._shares = shares
        self._horizon_ms = horizon * 1000
        self._clock = clock
        self._reserve = state.script(_RESERVE) if state else None
        self._throttled = state.script(_THROTTLED) if state else None
        self._local = LocalRates()
        self._lock = threading.Lock()
        self._global: bool | None = None  # as last logged
        self._known: dict[str, Limit] = {}
        # when the turns this process reserved fall due (its clock, ms), per limit
        self._pending: dict[str, deque[float]] = {}
        self._pending_lock = threading.Lock()
        # turns taken ahead per set of limits: (when, on this clock in ms; made at, Redis)
        self._credits: dict[tuple[str, ...], deque[tuple[float, float]]] = {}
        self._pace: dict[tuple[str, ...], deque[tuple[float, int]]] = {}
        self._rates: dict[str, float] = {}

    @property
    def is_global(self) -> bool:
        """False while each process keeps to its own share (no shared state, or unreachable)."""
        return bool(self._global) if self._global is not None else self._state is not None

    def reserve(self, limits: Sequence[Limit], groups: Sequence[Group]) -> Decision:
        """Turns for ``groups`` of mails passing ``limits`` (each group names its limits).

        Turns taken ahead serve first; Redis is asked only for the rest, and then also
        for turns ahead: as many as a tenth of a second brings at the recent pace of
        each set of limits, provided they fall within that tenth (so they never hold
        back a limit that binds). A limit that never binds thus costs one round trip
        per such tenth, not one per batch.
        """
        for limit in limits:
            self._known[limit.name] = limit
        now = self._clock() * 1000
        sets = [tuple(limits[k].name for k in group.limits) for group in groups]
        served = []
        for names, group in zip(sets, groups, strict=True):
            self._count_pace(names, group.count, now)
            served.append(self._credits_for(names, group.count, now))
        rest = [
            Group(group.limits, group.count - len(taken), group.returning, group.prefetch)
            for group, taken in zip(groups, served, strict=True)
        ]
        if not any(group.count for group in rest):
            rates = tuple(self._rates.get(limit.name, 0.0) for limit in limits)
            return Decision(now, rates, tuple(tuple(taken) for taken in served))
        ahead = self._ahead(sets, rest, now)
        decision = self._reserve_global(limits, rest + ahead)
        if decision is None:
            params = [self._local_params(limit) for limit in limits]
            decision = self._local.decide(params, rest, now, self._horizon_ms)
            ahead = []
        self._note(limits, rest + ahead, decision, now)
        for limit, rate in zip(limits, decision.rates, strict=True):
            self._rates[limit.name] = rate
        for group, turns in zip(ahead, decision.slots[len(rest) :], strict=True):
            names = tuple(limits[k].name for k in group.limits)
            credits = self._credits.setdefault(names, deque())
            credits.extend((now + turn.wait_ms, decision.now_ms) for turn in turns)
        slots = tuple(
            (*taken, *turns)
            for taken, turns in zip(served, decision.slots[: len(rest)], strict=True)
        )
        return Decision(decision.now_ms, decision.rates, slots)

    def _credits_for(self, names: tuple[str, ...], count: int, now: float) -> list[Slot]:
        """Up to ``count`` turns taken ahead for this set of limits, and not gone stale."""
        credits = self._credits.get(names)
        taken: list[Slot] = []
        while credits and len(taken) < count:
            at, made = credits.popleft()
            if at >= now - BURST_MS:  # older ones would add to a burst: dropped
                taken.append(Slot(True, max(0.0, at - now), made))
        return taken

    def _count_pace(self, names: tuple[str, ...], count: int, now: float) -> None:
        """Count mails asking for turns under a set of limits, over the last second."""
        pace = self._pace.setdefault(names, deque())
        pace.append((now, count))
        while pace and pace[0][0] < now - 1000:
            pace.popleft()

    def _ahead(self, sets: list[tuple[str, ...]], rest: list[Group], now: float) -> list[Group]:
        """Groups of turns to take ahead, one per set of limits, sized by the recent pace."""
        if self._state is None or self._global is False:
            return []  # per process, turns cost nothing to reserve
        ahead: list[Group] = []
        for names, group in zip(sets, rest, strict=True):
            pace = self._pace.get(names, ())
            wanted = math.ceil(sum(n for _, n in pace) * PREFETCH_MS / 1000)
            if wanted >= 2 and not any(a.limits == group.limits for a in ahead):
                ahead.append(Group(group.limits, min(wanted, _MOST_AHEAD), prefetch=True))
        return ahead

    def _reserve_global(self, limits: Sequence[Limit], groups: Sequence[Group]) -> Decision | None:
        """The decision of Redis; None when it cannot be asked."""
        if self._reserve is None or self._state is None:
            return None
        script = self._reserve
        try:
            if self._global is False:
                # Back from shares: first the turns this process reserved meanwhile.
                carried, counts = self._pending_groups()
                if carried:
                    ckeys, cargs = self._reserve_arguments(carried, counts)
                    self._state.run(lambda c: script(keys=ckeys, args=cargs, client=c))
            keys, args = self._reserve_arguments(limits, groups)
            reply = self._state.run(lambda c: script(keys=keys, args=args, client=c))
        except StateUnavailable as exc:
            self._switch(global_=False, error=str(exc))
            return None
        self._switch(global_=True)
        return _decision(reply, len(limits), groups)

    def _note(
        self, limits: Sequence[Limit], groups: Sequence[Group], decision: Decision, now: float
    ) -> None:
        """Remember when this process's reserved turns fall due, to carry them on a switch."""
        with self._pending_lock:
            for group, slots in zip(groups, decision.slots, strict=True):
                dues = [now + slot.wait_ms for slot in slots if slot.reserved]
                for k in group.limits:
                    pending = self._pending.get(limits[k].name)
                    if pending is None:
                        pending = self._pending[limits[k].name] = deque(maxlen=100_000)
                    pending.extend(dues)

    def _pending_groups(self) -> tuple[list[Limit], list[Group]]:
        """The turns reserved and not yet due, one group per limit."""
        now = self._clock() * 1000
        limits: list[Limit] = []
        groups: list[Group] = []
        with self._pending_lock:
            for name, pending in self._pending.items():
                while pending and pending[0] <= now:
                    pending.popleft()
                waiting = sum(1 for due in pending if due > now)
                if waiting:
                    groups.append(Group((len(limits),), waiting, returning=True))
                    limits.append(self._known[name])
        return limits, groups

    def throttled(self, limit: Limit, made_at_ms: float, seed: float) -> float:
        """A throttling reply to a mail reserved at ``made_at_ms``; the server's rate after it.

        ``seed``: the rate this process saw accepted lately times the processes sharing
        the server, the starting point for a server without a configured rate.
        """
        if self._throttled is not None and self._state is not None and self.is_global:
            script = self._throttled
            keys = [f"{self._prefix}{limit.name}:aimd"]
            args = [
                made_at_ms,
                limit.per_second,
                seed,
                BETA,
                RECOVERY_SECONDS,
                FLOOR_PER_SECOND,
                int(MEMORY_SECONDS * 1000),
            ]
            try:
                reply = self._state.run(lambda c: script(keys=keys, args=args, client=c))
            except StateUnavailable as exc:
                self._switch(global_=False, error=str(exc))
            else:
                return int(reply) / 1000
        share = self._shares(limit)
        local = self._local_params(limit)
        return self._local.throttled(local, made_at_ms, seed / share, self._clock() * 1000)

    def adapting(self, limits: Sequence[Limit]) -> list[bool]:
        """For each limit, whether a throttling reply still holds its rate down."""
        if self._state is not None and self.is_global:
            keys = [f"{self._prefix}{limit.name}:aimd" for limit in limits]

            def exist(client: redis.Redis) -> list[int]:
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.exists(key)
                return list(pipe.execute())

            try:
                return [bool(found) for found in self._state.run(exist)]
            except StateUnavailable as exc:
                self._switch(global_=False, error=str(exc))
        now = self._clock() * 1000
        return [self._local.adapting(limit.name, now) for limit in limits]

    def _local_params(self, limit: Limit) -> Params:
        shares = self._shares(limit)
        return Params(limit.name, limit.per_second / shares, limit.adaptive, shares)

    def _reserve_arguments(
        self, limits: Sequence[Limit], groups: Sequence[Group]
    ) -> tuple[list[str], list[str | float | int]]:
        keys: list[str] = []
        args: list[str | float | int] = [
            self._horizon_ms,
            BURST_MS,
            IDLE_MS,
            PREFETCH_MS,
            len(limits),
        ]
        for limit in limits:
            keys += [f"{self._prefix}{limit.name}", f"{self._prefix}{limit.name}:aimd"]
            args += [limit.per_second, int(limit.adaptive)]
        args.append(len(groups))
        for group in groups:
            kind = 2 if group.prefetch else int(group.returning)
            args += [group.count, kind, len(group.limits)]
            args += [k + 1 for k in group.limits]
        return keys, args

    def _switch(self, *, global_: bool, error: str = "") -> None:
        """Log once when the limits stop being global, and once when they are again."""
        with self._lock:
            if self._global is global_:
                return
            was, self._global = self._global, global_
        if global_:
            self._local.forget()
            if was is False:
                log.warning("rate limits are global again (shared state reachable)")
        else:
            # The turns reserved in Redis and not yet due count against this process's share.
            limits, groups = self._pending_groups()
            params = [self._local_params(limit) for limit in limits]
            self._local.decide(params, groups, self._clock() * 1000, math.inf)
            log.warning(
                "rate limits: shared state unreachable; this process keeps to its share of "
                "each limit (the limit divided by its send queue's consumers) until it is back",
                error=error,
            )


def _decision(reply: list[bytes | int], limits: int, groups: Sequence[Group]) -> Decision:
    now = float(reply[0])
    rates = tuple(int(r) / 1000 for r in reply[1 : 1 + limits])
    turns = reply[1 + limits :]
    slots: list[tuple[Slot, ...]] = []
    at = 0
    for group in groups:
        chunk = turns[at : at + 2 * group.count]
        at += 2 * group.count
        slots.append(
            tuple(
                Slot(int(chunk[i]) == 1, int(chunk[i + 1]) / 1000)
                for i in range(0, len(chunk), 2)
                if int(chunk[i]) != 2  # a turn not taken ahead
            )
        )
    return Decision(now, rates, tuple(slots))
