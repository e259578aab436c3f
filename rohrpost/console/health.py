"""Is the broker there, is the store there: banners on every page, checked every few seconds."""

from __future__ import annotations

import asyncio
import time

from starlette.concurrency import run_in_threadpool

from rohrpost.operations.service import OperatorService

_FRESH_SECONDS = 5.0


class Health:
    """The last answer of the broker and the store, renewed when older than a few seconds."""

    def __init__(self, service: OperatorService) -> None:
        self._service = service
        self._checked = 0.0
        self._banners: list[str] = []
        self._lock = asyncio.Lock()

    async def banners(self) -> list[str]:
        """What is down right now, one sentence each (empty when all is well)."""
        async with self._lock:
            if time.monotonic() - self._checked > _FRESH_SECONDS:
                found = [
                    await run_in_threadpool(self._service.broker_problem),
                    await run_in_threadpool(self._service.store_problem),
                ]
                self._banners = [problem for problem in found if problem]
                self._checked = time.monotonic()
            return list(self._banners)
