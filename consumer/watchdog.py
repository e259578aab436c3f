"""Stops a sender thread whose template render runs past its deadline.

A render is pure Python in the sender thread. A thread cannot be killed, but the
interpreter can be asked to raise an exception in it (``PyThreadState_SetAsyncExc``);
it is raised at the thread's next bytecode boundary. A C-level operation in progress
(``'x' * n``, a sort) runs to its end first, which is why the sandbox bounds those
(``rohrpost.consumer.sandbox``) and this watchdog only has to stop Python loops.
"""

from __future__ import annotations

import ctypes
import threading
import time
from types import TracebackType

#: How often the watchdog looks at the deadlines; a render ends at most this much late.
_POLL_SECONDS = 0.05


class RenderTimeout(BaseException):
    """Raised inside a sender thread whose render passed its deadline.

    A BaseException, so no ``except Exception`` in jinja2 swallows it (constant folding
    turns every Exception into "cannot fold").
    """


def _raise_in(ident: int, exc: type[BaseException] | None) -> None:
    """Ask the interpreter to raise ``exc`` in thread ``ident``; None withdraws a pending one."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(exc) if exc is not None else None
    )


class RenderWatchdog:
    """``with watchdog:`` runs its block with a deadline of ``timeout`` seconds.

    One daemon thread watches every sender thread. The exception is injected only
    while the thread is inside the block (both sides hold the lock), at most once
    per block, and one still pending when the block ends is withdrawn, so it can
    never surface later in unrelated code.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._deadlines: dict[int, float] = {}
        self._fired: set[int] = set()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, name="render-watchdog", daemon=True
                )
                self._thread.start()
            self._deadlines[threading.get_ident()] = time.monotonic() + self.timeout

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        ident = threading.get_ident()
        late = False
        while True:
            try:
                self._leave(ident)
                break
            except RenderTimeout:
                # The injection landed while leaving; it is the only one (the
                # watchdog forgets a thread it has fired at), so leaving again succeeds.
                late = True
        if late and exc_type is None:
            raise RenderTimeout

    def _leave(self, ident: int) -> None:
        with self._lock:
            self._deadlines.pop(ident, None)
            if ident in self._fired:
                self._fired.discard(ident)
                _raise_in(ident, None)

    def close(self) -> None:
        """Stop the watchdog thread (renders after this have no deadline)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._closed.wait(min(_POLL_SECONDS, self.timeout / 10)):
            now = time.monotonic()
            with self._lock:
                for ident, deadline in list(self._deadlines.items()):
                    if deadline <= now:
                        del self._deadlines[ident]
                        self._fired.add(ident)
                        _raise_in(ident, RenderTimeout)
