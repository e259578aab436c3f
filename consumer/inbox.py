"""Where a worker's deliveries wait for a sender thread: by priority, then routes in turn.

A worker consumes every lane (send queue) of every route, each with a prefetch window
of its own, so a backlog fills at most its own window of this process. What the
windows let in is not served first come, first served, but

* high before normal before bulk: a password reset waits behind no newsletter mail
  the process already holds, only behind what its sender threads are sending;
* within a priority, tenant/app routes take turns, one mail each: a tenant with
  50,000 queued mails has a prefetch window of them here, and another tenant's mail
  waits behind at most one of them per turn instead of behind the whole window.

A mail that has waited here longer than ``patience`` (a minute) goes before the
higher lanes all the same. Without that, a bulk mail prefetched while normal mail
keeps coming could wait unacknowledged past RabbitMQ's ``consumer_timeout`` (30
minutes by default), and the broker would close the channel and deliver everything
this process holds again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from rohrpost.shared.container import PRIORITIES, Priority
from rohrpost.shared.topology import Lane

T = TypeVar("T")
Route = tuple[str, str]

#: How long a mail waits for the higher lanes before it goes first.
PATIENCE_SECONDS = 60.0


class _Turns(Generic[T]):
    """Items of one priority per route, with their arrival times; routes take turns."""

    def __init__(self) -> None:
        self._waiting: dict[Route, deque[tuple[float, T]]] = {}
        self._turns: deque[Route] = deque()  # routes with items, the next one first

    def __bool__(self) -> bool:
        return bool(self._turns)

    def add(self, route: Route, item: T, arrived: float) -> None:
        waiting = self._waiting.get(route)
        if waiting is None:
            waiting = self._waiting[route] = deque()
            self._turns.append(route)
        waiting.append((arrived, item))

    def oldest(self) -> float:
        """When the item that waits longest arrived (items of a route arrive in order)."""
        return min(waiting[0][0] for waiting in self._waiting.values())

    def take(self) -> T:
        """The next route's first item; that route's next one comes after every other's."""
        route = self._turns.popleft()
        item = self._take_from(route)
        if route in self._waiting:
            self._turns.append(route)
        return item

    def take_oldest(self) -> T:
        """The item that waits longest; the turns stay as they are."""
        route = min(self._waiting, key=lambda r: self._waiting[r][0][0])
        item = self._take_from(route)
        if route not in self._waiting:
            self._turns.remove(route)
        return item

    def _take_from(self, route: Route) -> T:
        waiting = self._waiting[route]
        _, item = waiting.popleft()
        if not waiting:
            del self._waiting[route]
        return item


class Inbox(Generic[T]):
    """A thread-safe queue that serves high before normal before bulk, routes in turn."""

    def __init__(
        self,
        *,
        patience: float = PATIENCE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._changed = threading.Condition()
        self._lanes: dict[Priority, _Turns[T]] = {p: _Turns() for p in PRIORITIES}
        self._patience = patience
        self._clock = clock
        self._count = 0
        self._closed = False

    def __len__(self) -> int:
        return self._count

    def put(self, item: T, lane: Lane) -> None:
        """Add ``item``, a delivery from ``lane``."""
        with self._changed:
            self._lanes[lane.priority].add(lane.route, item, self._clock())
            self._count += 1
            self._changed.notify()

    def get(self) -> T | None:
        """The next item to send, waiting for one; None once closed and empty."""
        with self._changed:
            while not self._count:
                if self._closed:
                    return None
                self._changed.wait()
            self._count -= 1
            return self._next()

    def close(self) -> None:
        """No more items come: ``get`` returns None to every caller once all are taken."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _next(self) -> T:
        """The first non-empty lane's next item, unless a lower lane's waited too long."""
        first: _Turns[T] | None = None
        now = self._clock()
        for priority in PRIORITIES:
            turns = self._lanes[priority]
            if not turns:
                continue
            if first is None:
                first = turns
            elif now - turns.oldest() > self._patience:
                return turns.take_oldest()
        assert first is not None  # called with items waiting
        return first.take()
