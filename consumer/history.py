"""The history consumer: archives every event and every submitted mail into the store.

It reads ``{ns}.history`` (bound to the events exchange, and to the submit exchange
so each submitted mail arrives through the broker, without a second publish),
writes in batches — one transaction each — and acks a batch only after it is
committed. When the store is down it keeps the batch, stops acking, backs off and
tries again: the events wait in the queue, nothing is lost. Messages it cannot
read are rejected into ``{ns}.history.rejected``.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry
from pydantic import TypeAdapter, ValidationError

from rohrpost.consumer.events import BATCH_TYPE
from rohrpost.shared.broker import Broker, Delivery, admin_channel
from rohrpost.shared.container import decode_container
from rohrpost.shared.errors import ContainerError, StoreError
from rohrpost.shared.events import EventKind, MailEvent
from rohrpost.shared.logs import get_logger
from rohrpost.shared.metrics import Metrics
from rohrpost.shared.settings import Settings
from rohrpost.shared.startup import start_with_retries
from rohrpost.shared.store import HistoryRecord, HistoryStore
from rohrpost.shared.topology import Topology, queue_depths
from rohrpost.shared.wire import ACTOR_HEADER, round_of

log = get_logger(__name__)

_BACKOFF_SECONDS = (0.5, 1, 2, 5, 10, 30)
_EVENT_BATCH = TypeAdapter(list[MailEvent])
_EMPTY_POLLS_TO_DRAIN = 3


def records_from(delivery: Delivery, settings: Settings) -> list[HistoryRecord]:
    """The history records one message stands for; ValueError when it is unreadable."""
    kind = delivery.properties.type or ""
    if kind == BATCH_TYPE:
        return [HistoryRecord(event) for event in _EVENT_BATCH.validate_json(delivery.body)]
    if kind.startswith("rohrpost.event."):
        return [HistoryRecord(MailEvent.model_validate_json(delivery.body))]
    mail = decode_container(delivery.body)
    round_ = round_of(delivery.properties)
    common = {"mail_id": mail.id, "tenant": mail.tenant, "app": mail.app, "round": round_}
    actor = (delivery.properties.headers or {}).get(ACTOR_HEADER)
    submitted = MailEvent(
        event_id=uuid.uuid5(mail.id, f"submitted.{round_}"),
        kind=EventKind.SUBMITTED if round_ == 0 else EventKind.RESUBMITTED,
        at=mail.created_at if round_ == 0 else _published_at(delivery),
        actor=actor.decode() if isinstance(actor, bytes) else actor,
        **common,
    )
    app = settings.app(mail.tenant, mail.app)
    records = [HistoryRecord(submitted, mail, mail.from_ or (app.sender if app else None))]
    if mail.not_before is not None and mail.not_before > mail.created_at:
        scheduled = MailEvent(
            event_id=uuid.uuid5(mail.id, f"scheduled.{round_}"),
            kind=EventKind.SCHEDULED,
            at=mail.created_at,
            **common,
        )
        records.append(HistoryRecord(scheduled))
    return records


def _published_at(delivery: Delivery) -> datetime:
    # A re-submitted container keeps its first creation time; the publish time
    # (whole seconds, so never after what follows) places the re-submission.
    stamp = delivery.properties.timestamp
    return datetime.fromtimestamp(stamp, UTC) if isinstance(stamp, int) else datetime.now(UTC)


class HistoryConsumer:
    """Consumes the history queue into a HistoryStore."""

    def __init__(
        self,
        settings: Settings,
        store: HistoryStore | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self.metrics = metrics or Metrics(CollectorRegistry())
        self._broker: Broker | None = None
        self._store_error: str | None = "not started"
        self._topology = Topology.from_settings(settings)
        self._store = store
        self._inbox: queue.SimpleQueue[Delivery] = queue.SimpleQueue()
        self._stopping = False
        self._drain = False
        self._drain_when: Callable[[], bool] | None = None
        self._next_purge = 0.0
        self.written = 0

    def stop(self) -> None:
        """Finish the current batch (if the store takes it) and return; signal-safe."""
        self._stopping = True

    def readiness(self) -> str | None:
        """None when connected, consuming and able to write the store; else why not."""
        if self._broker is None or not self._broker.connected:
            return "not connected to the broker"
        return self._store_error

    def run(self, *, drain: bool = False, drain_when: Callable[[], bool] | None = None) -> None:
        """Consume until ``stop()``, or with ``drain`` until the history queue is empty.

        ``drain_when`` switches to drain mode once it returns true (used by
        ``rohrpost run --drain`` after the workers finished).
        """
        self._drain = drain
        self._drain_when = drain_when
        settings = self._settings
        started = start_with_retries(
            self._connect, stopping=lambda: self._stopping, what="history consumer"
        )
        if started is None:
            return  # stopped before the broker and the store were ready
        store, broker = started
        url = settings.broker_url.get_secret_value()
        self._broker = broker
        self._store_error = None
        self.metrics.ready.labels("history").set(1)
        broker.consume(
            self._topology.history_queue, settings.history_batch_size * 2, self._inbox.put
        )
        log.info("history consumer started", queue=self._topology.history_queue)
        try:
            with admin_channel(url) as probe:
                self._loop(broker, store, probe)
        finally:
            broker.cancel_consumers()
            broker.close()
            if self._store is None:
                store.close()
            log.info("history consumer stopped", events_written=self.written)

    def _connect(self) -> tuple[HistoryStore, Broker]:
        """Open (and migrate) the store, declare the topology and connect."""
        settings = self._settings
        store = self._store or HistoryStore.open(
            settings.store_url.get_secret_value(), migrate_schema=True
        )
        try:
            url = settings.broker_url.get_secret_value()
            with admin_channel(url) as channel:
                self._topology.declare(channel)
            broker = Broker(url, name=f"rohrpost-history:{settings.namespace}", republish=False)
            broker.start()
        except BaseException:
            if self._store is None:
                store.close()
            raise
        return store, broker

    def _loop(self, broker: Broker, store: HistoryStore, probe: object) -> None:
        empty_polls = 0
        while not self._stopping:
            batch = self._collect()
            if batch:
                empty_polls = 0
                if not self._archive(broker, store, batch):
                    return  # stopping while the store was down: the broker redelivers
            elif self._drain or (self._drain_when is not None and self._drain_when()):
                empty_polls = empty_polls + 1 if self._queue_empty(probe) else 0
                if empty_polls >= _EMPTY_POLLS_TO_DRAIN:
                    return
            self._purge_if_due(store)

    def _collect(self) -> list[Delivery]:
        batch: list[Delivery] = []
        try:
            batch.append(self._inbox.get(timeout=0.2))
        except queue.Empty:
            return batch
        deadline = time.monotonic() + self._settings.history_batch_wait.total_seconds()
        while len(batch) < self._settings.history_batch_size:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._inbox.get(timeout=max(0.0, remaining)))
            except queue.Empty:
                break
        return batch

    def _archive(self, broker: Broker, store: HistoryStore, batch: list[Delivery]) -> bool:
        records: list[HistoryRecord] = []
        readable: list[Delivery] = []
        for delivery in batch:
            try:
                records.extend(records_from(delivery, self._settings))
                readable.append(delivery)
            except (ContainerError, ValidationError, ValueError) as exc:
                log.warning("unreadable history message rejected", error=str(exc)[:500])
                broker.nack(delivery, requeue=False)
        if not readable:
            return True
        failures = 0
        while True:
            try:
                self._count(store.write_new(records))
                self._store_error = None
                break
            except StoreError as exc:
                self._store_error = f"history store: {exc}"
                self.metrics.history_write_errors.inc()
                delay = _BACKOFF_SECONDS[min(failures, len(_BACKOFF_SECONDS) - 1)]
                failures += 1
                log.error(
                    "history store write failed; retrying",
                    error=str(exc),
                    retry_in_seconds=delay,
                    failures=failures,
                    batch=len(batch),
                )
                if not self._sleep(delay):
                    return False
        # Everything before it is either in this batch or was rejected above.
        broker.ack(readable[-1], multiple=True)
        return True

    def _count(self, new: list[MailEvent]) -> None:
        self.written += len(new)
        metrics = self.metrics
        metrics.history_written.inc(len(new))
        metrics.history_last_write.set(time.time())
        for event in new:
            if event.kind == EventKind.SUBMITTED and event.app is not None:
                metrics.submitted.labels(event.tenant, event.app).inc()

    def _sleep(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._stopping:
                return False
            time.sleep(0.1)
        return True

    def _queue_empty(self, probe: object) -> bool:
        return not any(queue_depths(probe, [self._topology.history_queue]).values())

    def _purge_if_due(self, store: HistoryStore) -> None:
        now = time.monotonic()
        if now < self._next_purge:
            return
        self._next_purge = now + self._settings.purge_interval.total_seconds()
        for tenant, config in self._settings.tenants.items():
            for app, app_config in config.apps.items():
                cutoff = datetime.now(UTC) - timedelta(days=app_config.retention_days)
                try:
                    purged = store.purge(cutoff, tenant=tenant, app=app)
                except StoreError as exc:
                    log.warning("history purge failed; retrying later", error=str(exc))
                    return
                if purged:
                    log.info("history purged", tenant=tenant, app=app, mails=purged)
