"""Is the broker there, is the store there: banners on every page, checked every few seconds.

Each source is checked on a daemon thread of its own, one check at a time, and a page
waits at most ``ANSWER_SECONDS`` for it: a store behind a frozen link never answers
(its ping waits as long as TCP lets it), and then says so in its banner instead of
holding every page behind the check.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future

from rohrpost.operations.service import OperatorService
from rohrpost.shared.background import BackgroundWorker

_FRESH_SECONDS = 5.0
#: How long a page waits for a check; one that has not answered by then is a banner.
ANSWER_SECONDS = 3.0


class _Check:
    """One source's check: never two at once, a page waits for it a few seconds at most."""

    def __init__(self, check: Callable[[], str | None], source: str) -> None:
        self._check = check
        self._source = source
        self._worker: BackgroundWorker | None = None
        self._running: Future[str | None] | None = None
        self._since = 0.0

    async def problem(self) -> str | None:
        """The source's problem (None: none), or that its check has not answered yet."""
        if self._running is None:
            if self._worker is None:
                self._worker = BackgroundWorker(f"console-health-{self._source}")
            self._running = self._worker.submit(self._check)
            self._since = time.monotonic()
        running = self._running
        left = self._since + ANSWER_SECONDS - time.monotonic()
        if left > 0 and not running.done():
            await asyncio.wait([asyncio.wrap_future(running)], timeout=left)
        if not running.done():
            waited = time.monotonic() - self._since
            return f"{self._source} has not answered for {waited:.0f} s"
        self._running = None
        return running.result()


class Health:
    """The last answer of the broker and the store, renewed when older than a few seconds."""

    def __init__(self, service: OperatorService) -> None:
        self._service = service
        self._checked = 0.0
        self._banners: list[str] = []
        self._lock = asyncio.Lock()
        self._checks = [
            _Check(service.broker_problem, "RabbitMQ"),
            _Check(service.store_problem, "the history store"),
        ]

    async def banners(self) -> list[str]:
        """What is down right now, one sentence each (empty when all is well)."""
        async with self._lock:
            if time.monotonic() - self._checked > _FRESH_SECONDS:
                found = await asyncio.gather(*(check.problem() for check in self._checks))
                self._banners = [problem for problem in found if problem]
                self._checked = time.monotonic()
            return list(self._banners)
