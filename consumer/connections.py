"""Connections to a server with ``max_connections``: one pool per worker process, on permits.

Without the limit every sender thread keeps its own connection to each server. With
it, the process's connections to that server are pooled: a sender thread borrows
one for a transaction and returns it. Each open connection stands on a *permit*, a
lease from the installation-wide semaphore (``rohrpost.shared.leases``); the flow
control lets a mail through to the sender threads only when a permit is free for
it (``take``), so a mail waiting for a connection never blocks a sender thread.

A connection idle for ``IDLE_SECONDS`` is closed and its permit given back. When
another process waits for a permit of the server, permits held longer than
``ROTATE_SECONDS`` are given back after their next transaction, and none is taken
for ``BACK_OFF_SECONDS``, so that a busy process cannot keep a server to itself.
"""

from __future__ import annotations

import contextlib
import smtplib
import threading
import time
from collections.abc import Callable

from rohrpost.shared.leases import ConnectionLeases, Lease

#: An idle pooled connection is closed, and its permit given back, after this.
IDLE_SECONDS = 1.0
#: A permit another process waits for is given back after this much use ...
ROTATE_SECONDS = 10.0
#: ... and the process does not take one again for this long.
BACK_OFF_SECONDS = 0.5


def _close(connection: smtplib.SMTP) -> None:
    with contextlib.suppress(OSError, smtplib.SMTPException):
        connection.close()


class ServerSlots:
    """One process's permits and pooled connections for one server; thread-safe."""

    def __init__(
        self,
        server: str,
        limit: int,
        leases: ConnectionLeases,
        *,
        most: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``limit``: the installation's; ``most``: the most this process takes (its threads)."""
        self.server = server
        self.limit = limit
        self._threads = limit if most is None else most
        self._most = min(limit, self._threads)
        self._leases = leases
        self._clock = clock
        self._lock = threading.Lock()
        self._held: list[tuple[Lease, float]] = []  # permits, with when they were taken
        self._busy = 0  # mails let through, not finished
        self._lent = 0  # connections a sender thread is using (or opening)
        self._idle: list[tuple[smtplib.SMTP, float]] = []  # open and free, since when
        self._rotate = False  # another process waits for a permit
        self._quiet_until = 0.0
        self._full_at = 0.0  # when every permit was last in use

    # -- the flow control's side ---------------------------------------------------------

    def take(self) -> bool:
        """Count one more mail in flight if a permit is free for it (taking one if need be)."""
        with self._lock:
            if self._busy < len(self._held):
                self._busy += 1
                return True
            self._full_at = self._clock()
            if len(self._held) >= self._most or self._full_at < self._quiet_until:
                return False
        lease = self._leases.acquire(self.server, self.limit)
        if lease is None:
            return False
        with self._lock:
            self._held.append((lease, self._clock()))
            self._busy += 1
        return True

    def short(self) -> bool:
        """Whether this process holds fewer permits than it has sender threads.

        Mails that wait while it does not wait for a free sender thread, not a permit.
        """
        with self._lock:
            return len(self._held) < self._threads

    def finished(self) -> None:
        """A mail counted by ``take`` is done, whatever became of it."""
        with self._lock:
            if self._busy >= len(self._held):
                self._full_at = self._clock()
            self._busy -= 1

    def held(self) -> list[Lease]:
        """The permits held now (to be renewed)."""
        with self._lock:
            return [lease for lease, _ in self._held]

    def renewed(self, lost: list[Lease], wanted: bool) -> None:
        """After renewing: forget ``lost`` permits; ``wanted``: another process waits."""
        closing: list[smtplib.SMTP] = []
        with self._lock:
            self._held = [(lease, at) for lease, at in self._held if lease not in lost]
            self._rotate = wanted
            while self._idle and len(self._idle) + self._lent > len(self._held):
                closing.append(self._idle.pop(0)[0])
        for connection in closing:
            _close(connection)

    def tend(self, waiting: bool) -> None:
        """Close idle connections and give back permits nobody needs (none while ``waiting``)."""
        if waiting:
            return
        now = self._clock()
        with self._lock:
            stale = [c for c, since in self._idle if now - since > IDLE_SECONDS]
            self._idle = [(c, since) for c, since in self._idle if now - since <= IDLE_SECONDS]
            surplus = len(self._held) - max(self._busy, self._lent + len(self._idle))
            if now - self._full_at <= IDLE_SECONDS:
                surplus = 0  # all were in use a moment ago: likely again soon
            released = [self._held.pop()[0] for _ in range(max(0, surplus))]
        for connection in stale:
            _close(connection)
        for lease in released:
            self._leases.release(lease)

    def close(self) -> None:
        """Close every idle connection and give back every permit (the worker stops)."""
        with self._lock:
            idle, self._idle = self._idle, []
            held, self._held = self._held, []
        for connection, _ in idle:
            _close(connection)
        for lease, _ in held:
            self._leases.release(lease)

    # -- the sender threads' side (rohrpost.consumer.smtp.SmtpTransport) -----------------

    def checkout(self) -> smtplib.SMTP | None:
        """An idle connection to use, or None: then the caller opens one (a permit is free)."""
        with self._lock:
            self._lent += 1
            return self._idle.pop()[0] if self._idle else None

    def checkin(self, connection: smtplib.SMTP) -> None:
        """A borrowed connection is free again (after a transaction that left it usable)."""
        release: Lease | None = None
        with self._lock:
            self._lent -= 1
            now = self._clock()
            oldest = min(self._held, key=lambda held: held[1], default=None)
            if len(self._idle) + self._lent + 1 > len(self._held):
                keep = False  # a permit was lost meanwhile
            elif self._rotate and oldest is not None and now - oldest[1] > ROTATE_SECONDS:
                self._held.remove(oldest)
                release, keep = oldest[0], False
                self._quiet_until = now + BACK_OFF_SECONDS
            else:
                keep = True
                self._idle.append((connection, now))
        if not keep:
            _close(connection)
        if release is not None:
            self._leases.release(release)

    def discard(self) -> None:
        """A borrowed connection was closed (it failed), or none could be opened."""
        with self._lock:
            self._lent -= 1
