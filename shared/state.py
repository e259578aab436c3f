"""Shared state of an installation: a Redis that every producer and worker reaches.

It holds what processes on different machines must agree on at once: which mail ids
were submitted, which mail is being sent right now or was sent (see
``rohrpost.shared.idempotency``). Redis answers in well under a millisecond, runs
Lua scripts atomically and expires keys by itself.

rohrpost never stops because Redis is away: a call that fails marks Redis down for
``retry_after`` seconds, during which calls are not even tried (no timeout per mail)
and callers go on without the shared answer, as the caller documents. One warning
is logged when it goes down and one line when it is back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.exceptions

from rohrpost.shared.logs import get_logger
from rohrpost.shared.settings import redact_url

log = get_logger(__name__)

T = TypeVar("T")

#: A Redis that does not answer within this is treated as down.
_SOCKET_TIMEOUT = 0.5


class StateUnavailable(Exception):
    """Redis did not answer (or is marked down); the caller goes on without it."""


class SharedState:
    """A thread-safe Redis client that fails fast while Redis is down."""

    def __init__(self, url: str, *, retry_after: float = 5.0) -> None:
        self._url = url
        self._retry_after = retry_after
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down = False
        self._local = threading.local()
        # Bumped when Redis fails: every thread then opens a fresh connection, instead of
        # each finding its own stale one (after a Redis restart) and marking Redis down
        # again, one thread after the other.
        self._generation = 0

    @property
    def available(self) -> bool:
        """False while Redis is marked down."""
        return not self._down or time.monotonic() >= self._down_until

    def run(self, call: Callable[[redis.Redis], T]) -> T:
        """``call(client)``; StateUnavailable when Redis is down or fails."""
        if self._down and time.monotonic() < self._down_until:
            raise StateUnavailable("shared state marked down")
        try:
            result = call(self._thread_client())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self._mark_down(exc)
            raise StateUnavailable(str(exc)) from exc
        except redis.exceptions.RedisError as exc:
            # e.g. a read-only replica or OOM: as good as down for our purposes
            self._mark_down(exc)
            raise StateUnavailable(str(exc)) from exc
        if self._down:
            with self._lock:
                if self._down:
                    self._down = False
                    log.warning("shared state reachable again", redis=redact_url(self._url))
        return result

    def script(self, source: str) -> Any:
        """A Lua script registered on the client (loaded on first use)."""
        return self._pool_client().register_script(source)

    def forget_namespace(self, namespace: str) -> int:
        """Delete every key of ``namespace`` (``rohrpost topology delete``); how many."""

        def delete(client: redis.Redis) -> int:
            deleted = 0
            batch: list[bytes] = []
            for key in client.scan_iter(match=f"{namespace}:*", count=5000):
                batch.append(key)
                if len(batch) == 5000:
                    deleted += int(client.delete(*batch))
                    batch = []
            if batch:
                deleted += int(client.delete(*batch))
            return deleted

        return self.run(delete)

    def close(self) -> None:
        """Close every connection."""
        if self._client is not None:
            self._client.close()
            self._client.connection_pool.disconnect()

    def _pool_client(self) -> redis.Redis:
        with self._lock:
            if self._client is None:
                self._client = redis.Redis.from_url(
                    self._url,
                    socket_timeout=_SOCKET_TIMEOUT,
                    socket_connect_timeout=_SOCKET_TIMEOUT,
                    health_check_interval=30,
                )
            return self._client

    def _thread_client(self) -> redis.Redis:
        # A connection per thread: the pool's checkout costs ~10 µs a call, and a
        # sender thread makes one call per mail.
        client: redis.Redis | None = getattr(self._local, "client", None)
        if client is not None and getattr(self._local, "generation", None) != self._generation:
            client.close()
            client = None
        if client is None:
            pool = self._pool_client().connection_pool
            client = redis.Redis(connection_pool=pool, single_connection_client=True)
            self._local.client = client
            self._local.generation = self._generation
        return client

    def _mark_down(self, exc: BaseException) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self._retry_after
            self._generation += 1
            if not self._down:
                self._down = True
                log.warning(
                    "shared state unreachable; going on without it",
                    redis=redact_url(self._url),
                    error=str(exc),
                    retry_in_seconds=self._retry_after,
                )
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None


def forget_namespace_keys(redis_url: str | None, namespace: str) -> int | None:
    """Delete every key of ``namespace`` in the Redis at ``redis_url``; how many.

    None when there is no Redis (``redis_url`` empty) or it cannot be reached: the keys
    then expire by themselves (each has the retention of its app).
    """
    if not redis_url:
        return None
    state = SharedState(redis_url)
    try:
        return state.forget_namespace(namespace)
    except StateUnavailable:
        return None
    finally:
        state.close()
