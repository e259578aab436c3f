"""Following the control stream: cancellations and pauses, replayed before any sending."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from pydantic import ValidationError

from rohrpost.shared.broker import Broker, Delivery
from rohrpost.shared.control import ControlMessage, ControlState
from rohrpost.shared.errors import BrokerError
from rohrpost.shared.logs import get_logger
from rohrpost.shared.topology import Topology

log = get_logger(__name__)

_PREFETCH = 1000


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

    def start(self, timeout: float = 30.0) -> None:
        """Replay the stream from its start up to a marker of our own, then keep following."""
        self._broker.consume(
            self._topology.control_stream,
            _PREFETCH,
            self._receive,
            arguments={"x-stream-offset": "first"},
        )
        token = uuid.uuid4().hex
        marker = ControlMessage(action="marker", token=token)
        self._broker.publish(marker.publication(self._topology.control_exchange)).result(timeout)
        if not self._state.wait_for_marker(token, timeout):
            raise BrokerError(f"the control stream did not replay within {timeout:g}s")

    def _receive(self, delivery: Delivery) -> None:
        try:
            message = ControlMessage.model_validate_json(delivery.body)
        except ValidationError as exc:
            log.warning("unreadable control message ignored", error=str(exc)[:300])
        else:
            if self._state.apply(message):
                log.info(
                    "pause state changed",
                    action=message.action,
                    tenant=message.tenant,
                    app=message.app,
                    actor=message.actor,
                )
                self._on_pause_change()
        finally:
            # A stream is not consumed by acks; they only grant credit for more.
            self._broker.ack(delivery)
