"""Calls into a dependency that may stop answering, on a thread a process can leave behind.

A store behind a frozen link, or one waiting on a lock, holds a call for as long as
TCP lets it, and that can be for ever: the peer's kernel answers PostgreSQL's
keepalives while the server process does not. ``concurrent.futures`` joins its
threads when the interpreter exits, so one such call kept a history consumer from
exiting on SIGTERM at all. A ``BackgroundWorker`` runs calls on a daemon thread, and
``wait_bounded`` waits for one until the process is asked to stop and then only a
little longer: the process stops in bounded time whatever its dependencies do, and
the stuck call is left behind (its thread ends with the process).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_Call = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class BackgroundWorker:
    """One daemon thread running the calls handed to it, in order; thread-safe."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, function: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``function(*args)`` after the calls before it; its future."""
        future: Future[T] = Future()
        self._calls.put((future, function, args))
        return future

    def close(self) -> None:
        """End the thread after the calls handed over so far; does not wait for them."""
        self._calls.put(None)

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            future, function, args = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args))
            except BaseException as exc:  # the caller's to judge, through the future
                future.set_exception(exc)


def wait_bounded(
    future: Future[Any],
    *,
    deadline: Callable[[], float | None],
    tick: Callable[[], None] | None = None,
    poll: float = 0.2,
) -> bool:
    """Wait until ``future`` is done (True), or until ``time.monotonic()`` reaches
    ``deadline()`` (False: it is left running). ``deadline()`` is None while there is
    none (until the process is asked to stop, say); it is asked again every ``poll``
    seconds, and ``tick`` runs as often (to report a stall).
    """
    while True:
        end = deadline()
        wait = poll if end is None else min(poll, end - time.monotonic())
        try:
            future.exception(timeout=max(0.0, wait))
        except TimeoutError:
            pass
        else:
            return True
        if end is not None and time.monotonic() >= end:
            return False
        if tick is not None:
            tick()
