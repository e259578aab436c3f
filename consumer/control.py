"""Following the control stream: cancellations, holds and pauses, replayed before any sending.

A worker reads the stream from its start when it starts (the instructions of the past
are its state, logged at debug level only) and again after every reconnect (then what
it has already applied is skipped by offset), so only instructions given while it runs
are logged as news.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from rohrpost.shared.broker import Broker, Delivery
from rohrpost.shared.control import ControlMessage, ControlState
from rohrpost.shared.errors import BrokerError
from rohrpost.shared.logs import get_logger
from rohrpost.shared.topology import Topology

log = get_logger(__name__)

_PREFETCH = 1000
#: RabbitMQ tells each delivery's place in a stream in this header.
_OFFSET_HEADER = "x-stream-offset"


class ControlFollower:
    """Keeps a ControlState in step with ``{ns}.control`` over a Broker connection."""

    def __init__(
        self,
        broker: Broker,
        topology: Topology,
        state: ControlState,
        on_pause_change: Callable[[], None],
    ) -> None:
        self._broker = broker
        self._topology = topology
        self._state = state
        self._on_pause_change = on_pause_change
        self._token = uuid.uuid4().hex
        self._live = False  # once our own marker came by: what follows is news
        self._last_offset = -1

    def start(self, timeout: float = 30.0) -> None:
        """Replay the stream from its start up to a marker of our own, then keep following."""
        self._broker.consume(
            self._topology.control_stream,
            _PREFETCH,
            self._receive,
            arguments={"x-stream-offset": "first"},
        )
        marker = ControlMessage(action="marker", token=self._token)
        self._broker.publish(marker.publication(self._topology.control_exchange)).result(timeout)
        if not self._state.wait_for_marker(self._token, timeout):
            raise BrokerError(f"the control stream did not replay within {timeout:g}s")

    def _receive(self, delivery: Delivery) -> None:
        try:
            offset = _offset(delivery.properties)
            if offset is not None:
                if offset <= self._last_offset:
                    return  # replayed after a reconnect: applied before
                self._last_offset = offset
            self._apply(delivery.body)
        finally:
            # A stream is not consumed by acks; they only grant credit for more.
            self._broker.ack(delivery)

    def _apply(self, body: bytes) -> None:
        try:
            message = ControlMessage.model_validate_json(body)
        except ValidationError as exc:
            log.warning("unreadable control message ignored", error=str(exc)[:300])
            return
        if message.action == "marker" and message.token == self._token:
            self._live = True
        if not self._state.apply(message):
            return
        fields = {
            "action": message.action,
            "tenant": message.tenant,
            "app": message.app,
            "actor": message.actor,
            "at": message.at.isoformat(),
        }
        if self._live:
            log.info("pause state changed", **fields)
        else:
            log.debug("pause state replayed from the control stream", **fields)
        self._on_pause_change()


def _offset(properties: Any) -> int | None:
    headers = properties.headers if isinstance(properties.headers, dict) else {}
    value = headers.get(_OFFSET_HEADER)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
