"""An operator's connection: confirmed publishes, history events and control messages."""

from __future__ import annotations

import getpass
import uuid
from concurrent.futures import Future
from types import TracebackType
from typing import Any

from rohrpost.producer.client import Producer
from rohrpost.shared.broker import Broker, Publication
from rohrpost.shared.control import ControlMessage
from rohrpost.shared.errors import NotConfirmed, OperatorError
from rohrpost.shared.events import EventKind, MailEvent
from rohrpost.shared.settings import Settings
from rohrpost.shared.topology import Topology


def default_actor() -> str:
    """Who is acting when ``--actor`` is not given: the OS user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


class OperatorSession:
    """Everything an operator action needs; use as a context manager.

    The broker connection opens on the first publish: read-only actions (listing
    dead letters browses through its own short-lived channel) never need it.
    """

    def __init__(self, settings: Settings, actor: str | None = None) -> None:
        self.settings = settings
        self.topology = Topology.from_settings(settings)
        self.actor = actor or default_actor()
        #: the broker user it connects as: the validated user_id of the mails it publishes
        self.user = settings.broker_user
        self._timeout = settings.publish_timeout.total_seconds()
        self._broker: Broker | None = None
        self._producer: Producer | None = None

    def __enter__(self) -> OperatorSession:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        if self._broker is not None:
            self._broker.close()
            self._broker = None
            self._producer = None

    def _connected(self) -> Broker:
        if self._broker is None:
            broker = Broker(
                self.settings.broker_url.get_secret_value(),
                name=f"rohrpost-operator:{self.settings.namespace}",
            )
            broker.start()
            self._broker = broker
        return self._broker

    @property
    def producer(self) -> Producer:
        """A producer on this session's connection."""
        if self._producer is None:
            self._producer = Producer(self.settings, broker=self._connected())
        return self._producer

    def publish(self, publication: Publication) -> Future[None]:
        """Publish with confirm; the future settles with the broker's answer."""
        return self._connected().publish(publication)

    def confirm(self, future: Future[None], what: str) -> None:
        """Wait for a confirm; raise NotConfirmed naming ``what`` when it does not come."""
        try:
            future.result(timeout=self._timeout)
        except TimeoutError:
            broker = self._connected()
            why = broker.holding()
            if broker.withdraw(future):
                raise NotConfirmed(
                    f"{what}: not done: {why} for {self._timeout:g}s; nothing was published"
                ) from None
            blocked = f" ({why})" if broker.blocked else ""
            raise NotConfirmed(f"{what}: no confirm within {self._timeout:g}s{blocked}") from None

    def record(
        self,
        kind: EventKind,
        *,
        tenant: str,
        app: str | None,
        mail_id: uuid.UUID | None = None,
        **fields: Any,
    ) -> MailEvent:
        """Publish an event carrying this session's actor, and wait for its confirm."""
        event = MailEvent(
            kind=kind, mail_id=mail_id, tenant=tenant, app=app, actor=self.actor, **fields
        )
        self.confirm(
            self.publish(
                Publication(
                    self.topology.events_exchange,
                    event.routing_key,
                    event.model_dump_json(exclude_none=True).encode(),
                    event.properties(),
                    mandatory=False,
                )
            ),
            f"recording {kind.value}",
        )
        return event

    def control(self, message: ControlMessage) -> None:
        """Append ``message`` to the control stream every worker follows."""
        self.confirm(
            self.publish(message.publication(self.topology.control_exchange, self.user)),
            f"{message.action} on the control stream",
        )

    def require_route(self, tenant: str, app: str | None) -> None:
        """OperatorError unless tenant (and app, if given) is configured."""
        config = self.settings.tenants.get(tenant)
        if config is None:
            raise OperatorError(f"tenant {tenant!r} is not configured")
        if app is not None and app not in config.apps:
            raise OperatorError(f"tenant {tenant!r} has no app {app!r}")
