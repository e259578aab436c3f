"""Mails that reach a worker before they are due wait here on one timer, not on a sender.

Producers let a scheduled mail leave the delay levels ``RELEASE_LEAD_SECONDS`` before
it is due (``rohrpost.shared.delay``), marked with the time it is due
(``x-rohrpost-due``). The worker puts such a delivery here as it arrives; when it is
due, it goes on to the send claims, the rate limits and the sender threads like any
other. So a burst of scheduled mails is in the send queue and in the workers' prefetch
windows when it comes due, and waiting costs no sender thread: a held mail takes only
a place in its lane's prefetch window (a lane's due mails queued behind a window full
of held ones wait for them, at most the lead).

A worker that stops gives back what it still holds (the broker delivers it again,
still early, to a worker that holds it in turn).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from rohrpost.shared.delay import RELEASE_LEAD_SECONDS

T = TypeVar("T")

#: The earliest a marked mail may arrive and still be held: the lead, a second of
#: rounding, a second for clocks that differ. One that comes earlier (a clock far off,
#: a mark that lies) goes on at once, and the worker delays it again from its body.
LONGEST_HOLD_SECONDS = RELEASE_LEAD_SECONDS + 2.0


class DueHold(Generic[T]):
    """Holds items until their due time, then hands each to ``release`` (timer thread)."""

    def __init__(self, release: Callable[[T], None], clock: Callable[[], float] = time.time):
        self._release = release
        self._clock = clock
        self._heap: list[tuple[float, int, T]] = []
        self._order = itertools.count()  # equal due times leave in arrival order
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="due-hold", daemon=True)

    def start(self) -> None:
        """Start the timer thread."""
        self._thread.start()

    def __len__(self) -> int:
        with self._changed:
            return len(self._heap)

    def hold(self, item: T, due: float) -> bool:
        """Keep ``item`` until ``due`` (on ``clock``), then release it; False once closed."""
        with self._changed:
            if self._closed:
                return False
            heapq.heappush(self._heap, (due, next(self._order), item))
            if self._heap[0][2] is item:
                self._changed.notify()  # due before everything held: wait less
            return True

    def close(self) -> list[T]:
        """Stop releasing; what is still held, soonest due first."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join()
        with self._changed:
            held = [item for _, _, item in sorted(self._heap)]
            self._heap.clear()
        return held

    def _run(self) -> None:
        while (due := self._take_due()) is not None:
            for item in due:
                self._release(item)

    def _take_due(self) -> list[T] | None:
        """Wait until something is due and take all that is; None once closed."""
        with self._changed:
            while not self._closed:
                wait = self._heap[0][0] - self._clock() if self._heap else None
                if wait is not None and wait <= 0:
                    now = self._clock()
                    due = []
                    while self._heap and self._heap[0][0] <= now:
                        due.append(heapq.heappop(self._heap)[2])
                    return due
                self._changed.wait(wait)
            return None
