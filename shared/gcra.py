"""Rate limits as GCRA reservations, lowered by throttling replies (AIMD).

The algorithm, written once in Python (a worker process's own limits while the
shared state is unreachable) and once in Lua (``rohrpost.shared.ratelimit``, atomic
in Redis for every process at once); a test keeps the two equal.

GCRA (the generic cell rate algorithm, as in ATM and in redis-cell) keeps one time
per limit, the *theoretical arrival time* ``tat``: a mail may go at ``tat - tau``,
after which ``tat`` moves on by the emission interval ``T = 1 / rate``. ``tau``
bounds bursts: at most ``1 + tau / T`` mails at once after an idle time, so over any
minute a limit lets through at most ``60 s · rate + 1 + tau / T`` (20/s: 1,206 of
1,200). A mail is *reserved* a slot when it falls within ``horizon`` (it waits in
the worker, then goes); a later one is *deferred*: it is told roughly when its
turn comes and waits in the delay levels meanwhile. The deferred queue has its own
time per limit, ``btat``, so each deferred mail gets a turn of its own instead of
all coming back at once. New mails queue behind it; a mail coming back from it
takes a slot within the horizon if there is one, else goes to its end again.

AIMD: a throttling reply (421/451/454 rate limit) multiplies a server's effective
rate by ``BETA``; from there it grows back linearly, to the old rate in
``RECOVERY_SECONDS``, and on as long as replies stay clean (up to the configured
rate; without one, up to twice the rate before the cut, and the lowering is
forgotten after ``MEMORY_SECONDS`` without a throttling reply). Only one cut per
round: replies to mails whose slot was reserved before the last cut are ignored,
as TCP cuts its window once per round trip.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

#: How far mails may run ahead of the rate after an idle time (GCRA's tau).
BURST_MS = 250.0
#: A throttling reply multiplies the effective rate by this.
BETA = 0.8
#: Seconds the effective rate takes to climb back to where it was cut.
RECOVERY_SECONDS = 10.0
#: Lowest effective rate throttling leads to (mails per second), unless the configured is lower.
FLOOR_PER_SECOND = 0.1
#: A lowering of a server without a configured rate is forgotten after this long.
MEMORY_SECONDS = 600.0
#: Turns taken ahead for mails still to come fall within this (see ``Group.prefetch``).
PREFETCH_MS = 100.0
#: Idle limits are forgotten this long after their last reserved or deferred mail.
IDLE_MS = 60_000.0


@dataclass(frozen=True, slots=True)
class Params:
    """One limit as the algorithm sees it: its configured rate (0: none) and whether it adapts.

    ``shares``: how many processes keep to a share of the limit each (``per_second`` is
    one share). Mails deferred by any of them come back spread over all, so the
    deferred queue moves at the whole limit's pace, ``shares`` times a share's.
    """

    name: str
    per_second: float
    adaptive: bool = False
    shares: int = 1


@dataclass(frozen=True, slots=True)
class Group:
    """``count`` mails that pass the limits numbered ``limits`` (indexes into the params).

    ``prefetch``: not mails yet but turns taken ahead, as long as each falls within
    ``PREFETCH_MS`` (and no deferred queue waits); the slots hold only those taken.
    """

    limits: tuple[int, ...]
    count: int
    returning: bool = False
    prefetch: bool = False


@dataclass(frozen=True, slots=True)
class Slot:
    """One mail's turn: go after ``wait_ms`` (reserved), or come back then (deferred).

    ``made_at_ms``: when the turn was reserved, on the limiter's clock (0: at the
    decision's ``now_ms``); a throttling reply to the mail names it.
    """

    reserved: bool
    wait_ms: float
    made_at_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    """What one call decided: the clock it used, each limit's effective rate, each turn."""

    now_ms: float
    rates: tuple[float, ...]  # per second; 0 for a limit that does not bind now
    slots: tuple[tuple[Slot, ...], ...]  # per group


@dataclass
class _Adapted:
    rate: float
    slope: float
    at: float
    cap: float


def adapted_rate(adapted: _Adapted, now_ms: float) -> float:
    """The effective rate at ``now_ms`` after a cut: climbing linearly, up to its cap."""
    return min(adapted.rate + adapted.slope * (now_ms - adapted.at) / 1000.0, adapted.cap)


def cut(current: float, configured: float, now_ms: float) -> _Adapted:
    """The state after a throttling reply cut ``current`` (configured: 0 when none).

    The rate climbs back to ``new / BETA`` (where it was cut, unless the floor held it)
    in ``RECOVERY_SECONDS``, and on up to the configured rate, or without one up to
    twice that.
    """
    floor = min(configured, FLOOR_PER_SECOND) if configured > 0 else FLOOR_PER_SECOND
    new = max(floor, current * BETA)
    cap = configured if configured > 0 else 2 * new / BETA
    return _Adapted(new, new * (1 / BETA - 1) / RECOVERY_SECONDS, now_ms, cap)


@dataclass
class LocalRates:
    """The algorithm in one process, for when the shared state is unreachable; thread-safe."""

    _tat: dict[str, float] = field(default_factory=dict)
    _btat: dict[str, float] = field(default_factory=dict)
    _adapted: dict[str, _Adapted] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def decide(
        self, params: list[Params], groups: list[Group], now_ms: float, horizon_ms: float
    ) -> Decision:
        """Reserve or defer every mail of ``groups``, in order (the Lua script's twin)."""
        with self._lock:
            rates = [self._rate(p, now_ms) for p in params]
            intervals = [1000.0 / r if r > 0 else 0.0 for r in rates]
            tat = [self._tat.get(p.name, 0.0) for p in params]
            btat = [self._btat.get(p.name, 0.0) for p in params]
            slots = []
            for group in groups:
                bound = [k for k in group.limits if intervals[k] > 0]
                turns = []
                for _ in range(group.count):
                    go = max([now_ms, *(tat[k] - BURST_MS for k in bound)])
                    queued = max([now_ms, *(btat[k] for k in bound)])
                    behind = not group.returning and queued - now_ms > horizon_ms
                    if group.prefetch and (go - now_ms > PREFETCH_MS or behind):
                        break
                    if go - now_ms <= horizon_ms and not behind:
                        for k in bound:
                            tat[k] = max(tat[k], go) + intervals[k]
                        turns.append(Slot(True, go - now_ms))
                    else:
                        position = max(go, queued)
                        for k in bound:
                            btat[k] = max(btat[k], position) + intervals[k] / params[k].shares
                        turns.append(Slot(False, position - now_ms))
                slots.append(tuple(turns))
            for p, t, b in zip(params, tat, btat, strict=True):
                self._tat[p.name], self._btat[p.name] = t, b
            return Decision(now_ms, tuple(rates), tuple(slots))

    def throttled(self, limit: Params, made_at_ms: float, seed: float, now_ms: float) -> float:
        """A throttling reply to a mail reserved at ``made_at_ms``; the effective rate after."""
        with self._lock:
            adapted = self._adapted.get(limit.name)
            if adapted is not None and made_at_ms < adapted.at:
                return adapted_rate(adapted, now_ms)  # sent before the last cut took effect
            if adapted is not None:
                current = adapted_rate(adapted, now_ms)
            else:
                current = limit.per_second if limit.per_second > 0 else seed
            self._adapted[limit.name] = cut(current, limit.per_second, now_ms)
            return self._adapted[limit.name].rate

    def forget(self) -> None:
        """Drop every limit's times and cuts (the shared state answers again)."""
        with self._lock:
            self._tat.clear()
            self._btat.clear()
            self._adapted.clear()

    def adapting(self, name: str, now_ms: float) -> bool:
        """Whether a cut of ``name`` is still remembered."""
        with self._lock:
            adapted = self._adapted.get(name)
            if adapted is not None and now_ms - adapted.at > MEMORY_SECONDS * 1000:
                del self._adapted[name]
                return False
            return adapted is not None

    def _rate(self, params: Params, now_ms: float) -> float:
        adapted = self._adapted.get(params.name) if params.adaptive else None
        if adapted is None or now_ms - adapted.at > MEMORY_SECONDS * 1000:
            return params.per_second
        return adapted_rate(adapted, now_ms)
