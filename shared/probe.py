"""Queue depths for processes that drain: read over a channel that outlives its node."""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any

import pika.exceptions

from rohrpost.shared.amqp import admin_channel
from rohrpost.shared.errors import BrokerUnavailable
from rohrpost.shared.topology import queue_depths

# What a lost connection raises on a blocking channel (a queue that is missing closes
# the channel with 404 instead, and that is no reason to reconnect).
_LOST = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ConnectionWrongStateError,
    pika.exceptions.ChannelWrongStateError,
)


class QueueProbe:
    """Ready messages of queues, asked every few seconds by a worker or history consumer
    that drains; use as a context manager.

    The channel opens on the first question, so a process that never drains holds no
    idle connection (the broker would close it for missed heartbeats), and it is
    opened again, on whichever node answers, after its connection was lost.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._session: contextlib.ExitStack | None = None
        self._channel: Any = None

    def __enter__(self) -> QueueProbe:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    def depths(self, queues: list[str]) -> dict[str, int]:
        """Ready messages per queue; BrokerUnavailable when no node answers."""
        try:
            return queue_depths(self._open(), queues)
        except _LOST:
            self.close()  # its node went away: ask whichever node answers now
        try:
            return queue_depths(self._open(), queues)
        except _LOST as exc:
            self.close()
            raise BrokerUnavailable(f"lost RabbitMQ while reading queues: {exc!r}") from exc

    def close(self) -> None:
        """Close the channel's connection, if open."""
        session, self._session, self._channel = self._session, None, None
        if session is not None:
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                session.close()

    def _open(self) -> Any:
        if self._channel is None:
            session = contextlib.ExitStack()
            self._channel = session.enter_context(admin_channel(self._url))
            self._session = session
        return self._channel
