"""Where a worker's deliveries wait for a sender thread: by priority, then routes in turn.

A worker consumes every lane (send queue) of every route, each with a prefetch window
of its own, so a backlog fills at most its own window of this process. What the
windows let in is not served first come, first served, but

* high before normal before bulk, always: a password reset waits behind no
  newsletter mail the process already holds, only behind what its sender threads
  are sending at that moment;
* within a priority, tenant/app routes take turns, one mail each: a tenant with
  50,000 queued mails has a prefetch window of them here, and another tenant's mail
  waits behind at most one of them per turn instead of behind the whole window.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

from rohrpost.shared.container import PRIORITIES, Priority
from rohrpost.shared.topology import Lane

T = TypeVar("T")
Route = tuple[str, str]


class _Turns(Generic[T]):
    """Items of one priority per route; the routes with items take turns."""

    def __init__(self) -> None:
        self._waiting: dict[Route, deque[T]] = {}
        self._turns: deque[Route] = deque()  # routes with items, the next one first

    def __bool__(self) -> bool:
        return bool(self._turns)

    def add(self, route: Route, item: T) -> None:
        waiting = self._waiting.get(route)
        if waiting is None:
            waiting = self._waiting[route] = deque()
            self._turns.append(route)
        waiting.append(item)

    def take(self) -> T:
        route = self._turns.popleft()
        waiting = self._waiting[route]
        item = waiting.popleft()
        if waiting:
            self._turns.append(route)  # its next item after every other route's
        else:
            del self._waiting[route]
        return item


class Inbox(Generic[T]):
    """A thread-safe queue that serves high before normal before bulk, routes in turn."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._lanes: dict[Priority, _Turns[T]] = {p: _Turns() for p in PRIORITIES}
        self._count = 0
        self._closed = False

    def __len__(self) -> int:
        return self._count

    def put(self, item: T, lane: Lane) -> None:
        """Add ``item``, a delivery from ``lane``."""
        with self._changed:
            self._lanes[lane.priority].add(lane.route, item)
            self._count += 1
            self._changed.notify()

    def get(self) -> T | None:
        """The next item to send, waiting for one; None once closed and empty."""
        with self._changed:
            while True:
                for priority in PRIORITIES:
                    turns = self._lanes[priority]
                    if turns:
                        self._count -= 1
                        return turns.take()
                if self._closed:
                    return None
                self._changed.wait()

    def close(self) -> None:
        """No more items come: ``get`` returns None to every caller once all are taken."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
