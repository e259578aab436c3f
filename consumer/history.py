"""The history consumer: archives every event and every submitted mail into the store.

It reads ``{ns}.history`` (bound to the events exchange, and to the submit exchange
so each submitted mail arrives through the broker, without a second publish),
writes in batches — one transaction each — and acks a batch only after it is
committed. When the store is down (``StoreUnavailable``) it keeps the batch, stops
acking, backs off and tries again: the events wait in the queue, nothing is lost.

No message stops it. One it cannot read, or whose values the store refuses (any
other error of a write: the batch is split until the bad part stands alone), is
moved into ``{ns}.history.rejected`` with headers ``x-rohrpost-reason``
(``unreadable`` / ``unstorable``) and ``x-rohrpost-error``; the rest is written. A
message that kills the process itself is dead-lettered there by the broker after
``delivery_limit`` deliveries.
"""

from __future__ import annotations

import gc
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry

from rohrpost.consumer.history_messages import UNSTORABLE, Part, Rejection, describe, read
from rohrpost.shared.background import BackgroundWorker, wait_bounded
from rohrpost.shared.broker import (
    Broker,
    Delivery,
    Publication,
    admin_channel,
    connection_problem,
)
from rohrpost.shared.errors import BrokerUnavailable, StoreError, StoreUnavailable
from rohrpost.shared.events import EventKind, MailEvent
from rohrpost.shared.logs import get_logger
from rohrpost.shared.metrics import Metrics
from rohrpost.shared.probe import QueueProbe
from rohrpost.shared.repair import TopologyRepair
from rohrpost.shared.settings import Settings
from rohrpost.shared.startup import start_with_retries
from rohrpost.shared.store import HistoryRecord, HistoryStore
from rohrpost.shared.store.history import PurgeBatches
from rohrpost.shared.topology import Topology

log = get_logger(__name__)

_BACKOFF_SECONDS = (0.5, 1, 2, 5, 10, 30)
_EMPTY_POLLS_TO_DRAIN = 3
#: Allocations between two young-generation collections (CPython's default: 700).
_GC_THRESHOLD = 20_000
#: After SIGTERM, how long the batch being written may still take. A store that stopped
#: answering (a frozen link, a lock) then holds it for ever: it is left unacknowledged,
#: the broker delivers it again, and writes are idempotent.
STOP_WAIT_SECONDS = 10.0
#: A write that has not returned for this long makes ``/readyz`` say so: a store that
#: stopped answering reports no error. A batch takes well under a second.
WRITE_STALL_SECONDS = 30.0


def collect_garbage_seldom() -> None:
    """Tune the garbage collector of a process that runs the history consumer alone.

    A batch in flight holds tens of thousands of young objects (deliveries, events,
    rows), nearly all freed by reference counting, never in cycles; with CPython's
    defaults the collector walked them (and every module's objects) again and again.
    Freezing what start-up made and collecting young objects every 20,000 allocations
    instead of 700 cut the ingest's CPU per mail by about a third (decode and write
    of 20,000 bench mails in process: 142 → 92 µs a mail).
    """
    gc.freeze()
    gc.set_threshold(_GC_THRESHOLD, *gc.get_threshold()[1:])


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
        self.metrics.keeps_no_limits()
        self._broker: Broker | None = None
        self._store_error: str | None = "not started"
        self._start_error: str | None = None
        self._topology = Topology.from_settings(settings)
        self._store = store
        self._inbox: queue.SimpleQueue[Delivery] = queue.SimpleQueue()
        self._stopping = False
        self._drain = False
        self._drain_when: Callable[[], bool] | None = None
        self._next_purge = 0.0
        self._purging: list[_Purge] = []
        self._batches = PurgeBatches()
        self._empty_polls = 0
        self._leaving = False
        self._writing_since: float | None = None
        self._give_up_at: float | None = None  # on a write, once stopping
        self._left_behind = False
        self._repair = TopologyRepair(self._topology, settings.broker_url.get_secret_value())
        self.written = 0

    def stop(self) -> None:
        """Finish the current batch (if the store takes it within ``STOP_WAIT_SECONDS``)
        and return; signal-safe."""
        if self._give_up_at is None:
            self._give_up_at = time.monotonic() + STOP_WAIT_SECONDS
        self._stopping = True

    def readiness(self) -> str | None:
        """None when connected, consuming and able to write the store; else why not."""
        if self._broker is None and self._start_error is not None:
            return self._start_error  # the store or the broker: whichever failed the start
        if problem := connection_problem(self._broker):
            return problem
        if repair := self._repair.reason(self._broker):
            return repair
        since = self._writing_since
        if since is not None and (waited := time.monotonic() - since) > WRITE_STALL_SECONDS:
            return f"history store: a write has not returned for {waited:.0f} s"
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
            self._connect,
            stopping=lambda: self._stopping,
            what="history consumer",
            failed=self._start_failed,
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
        log.info("history consumer started", queue=self._topology.history_queue, node=broker.node)
        try:
            with QueueProbe(url) as probe:
                self._loop(broker, store, probe)
        finally:
            broker.cancel_consumers()
            broker.close()
            if self._store is None:
                store.close()
            log.info("history consumer stopped", events_written=self.written)

    def _start_failed(self, exc: Exception) -> None:
        self._start_error = f"cannot start yet: {exc}"

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
            broker = Broker(
                url,
                name=f"rohrpost-history:{settings.namespace}",
                republish=False,
                on_blocked=lambda reason: self.metrics.broker_blocked.set(reason is not None),
            )
            broker.start()
        except BaseException:
            if self._store is None:
                store.close()
            raise
        return store, broker

    def _loop(self, broker: Broker, store: HistoryStore, probe: QueueProbe) -> None:
        """Read batch after batch; each is written while the next is read.

        Reading (decoding JSON, validating) and writing (building rows, waiting for
        the database) take about equal time per mail; with one write in flight on
        a writer thread, the database's work overlaps the reading of the next
        batch. Writes stay in order, one at a time, so acks (``multiple``) do too.

        Retention on PostgreSQL purges on a thread of its own, beside ingest: a purge
        batch is one transaction of its own connection on old, finished mails (rows
        the writer holds are skipped), so ingest never waits for one. SQLite has one
        writer at a time: there a purge batch runs between two batches of ingest.
        """
        beside = store.engine.dialect.name == "postgresql"
        self._leaving = False
        # Daemon threads, waited for with a bound once stopping (rohrpost.shared.background).
        writer = BackgroundWorker("history-writer")
        purger = BackgroundWorker("history-purge")
        writing: Future[bool] | None = None
        purging: Future[None] | None = None
        try:
            while not self._stopping:
                self._repair.check(broker)
                self._report_readiness()
                batch = self._collect()
                purging = self._purge_beside(store, purger, purging) if beside else None
                if batch:
                    self._empty_polls = 0
                    decoded = self._decode(batch)
                    if writing is not None and not self._written(writing):
                        return  # stopping while the store was down: the broker redelivers
                    writing = writer.submit(self._archive, broker, store, batch, *decoded)
                    if beside or not self._purge_due():
                        continue
                # Idle, or a purge batch is due: the store is this thread's for now.
                if writing is not None:
                    if not self._written(writing):
                        return
                    writing = None
                if not batch and self._drained(probe):
                    return
                if not beside:
                    self._purge_step(store)
        finally:
            self._leave(writing, purging)
            writer.close()
            purger.close()

    def _leave(self, writing: Future[bool] | None, purging: Future[None] | None) -> None:
        """Let the write and the purge batch under way finish (bounded once stopping)."""
        self._leaving = True  # the purge thread ends after its current batch
        if writing is not None:
            self._written(writing)
        if purging is not None:
            wait_bounded(purging, deadline=lambda: self._give_up_at)

    def _written(self, writing: Future[bool]) -> bool:
        """Whether the batch ``writing`` was written and acked; False when stopped meanwhile.

        Once stopping, writes get ``STOP_WAIT_SECONDS`` more; one still running then
        is left behind, its batch unacknowledged. Meanwhile the ready gauge follows
        ``readiness`` (a stalled write, a store outage).
        """
        if wait_bounded(writing, deadline=lambda: self._give_up_at, tick=self._report_readiness):
            self._report_readiness()
            return writing.result()
        if not self._left_behind:
            self._left_behind = True
            log.warning(
                "the history store did not finish the batch being written; leaving it "
                "unacknowledged for the broker to deliver again",
                waited_seconds=STOP_WAIT_SECONDS,
            )
        return False

    def _report_readiness(self) -> None:
        self.metrics.ready.labels("history").set(0 if self.readiness() else 1)

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

    def _decode(self, batch: list[Delivery]) -> tuple[list[Part], list[Rejection]]:
        parts: list[Part] = []
        rejections: list[Rejection] = []
        for delivery in batch:
            readable, unreadable = read(delivery, self._settings)
            parts += readable
            rejections += unreadable
        return parts, rejections

    def _archive(
        self,
        broker: Broker,
        store: HistoryStore,
        batch: list[Delivery],
        parts: list[Part],
        rejections: list[Rejection],
    ) -> bool:
        """Write a decoded batch, set aside what cannot be, ack; False: stopped meanwhile."""
        if parts:
            refused = self._write(store, parts)
            if refused is None:
                return False  # stopping while the store was down: the broker redelivers
            rejections = rejections + refused
        dead_lettered = self._set_aside(broker, rejections)
        # Every delivery up to the last one is now written or set aside.
        last = next((d for d in reversed(batch) if id(d) not in dead_lettered), None)
        if last is not None:
            broker.ack(last, multiple=True)
        return True

    def _write(self, store: HistoryStore, parts: list[Part]) -> list[Rejection] | None:
        """Write ``parts``; return those the store refuses (None: stopped during an outage).

        A refused batch is split in halves until each refused part stands alone, so
        k bad parts among n cost about k·log₂(n) extra writes, and only on failure.
        """
        try:
            return [] if self._write_when_available(store, parts) else None
        except Exception as exc:  # not an outage: some value in here cannot be stored
            self.metrics.history_write_errors.inc()
            if len(parts) == 1:
                pieces = parts[0].split()
                if len(pieces) == 1:
                    part = parts[0]
                    return [Rejection(part.delivery, part.body(), UNSTORABLE, describe(exc))]
                parts = pieces
            half = len(parts) // 2
            first = self._write(store, parts[:half])
            second = None if first is None else self._write(store, parts[half:])
            return None if first is None or second is None else first + second

    def _write_when_available(self, store: HistoryStore, parts: list[Part]) -> bool:
        """Write, waiting out a store outage with backoff; False when stopped meanwhile."""
        records: list[HistoryRecord] = [record for part in parts for record in part.records]
        failures = 0
        while True:
            try:
                self._writing_since = time.monotonic()
                try:
                    new = store.write_new(records)
                finally:
                    self._writing_since = None
                self._count(new)
                self._store_error = None
                return True
            except StoreUnavailable as exc:
                self._store_error = f"history store: {exc}"
                self.metrics.history_write_errors.inc()
                delay = _BACKOFF_SECONDS[min(failures, len(_BACKOFF_SECONDS) - 1)]
                failures += 1
                log.error(
                    "history store write failed; retrying",
                    error=str(exc),
                    retry_in_seconds=delay,
                    failures=failures,
                    events=len(records),
                )
                if not self._sleep(delay):
                    return False

    def _set_aside(self, broker: Broker, rejections: list[Rejection]) -> set[int]:
        """Move each rejection into the rejected queue with its reason, confirmed.

        Returns the ids of deliveries that could not be moved so: those are
        dead-lettered whole by the broker instead (at-least-once), never dropped.
        """
        queue_name = self._topology.history_rejected_queue
        moving = []
        for rejection in rejections:
            log.warning(
                "history message set aside",
                reason=rejection.reason,
                error=rejection.error,
                message_id=rejection.delivery.properties.message_id,
                queue=queue_name,
            )
            publication = Publication("", queue_name, rejection.body, rejection.properties())
            moving.append((rejection, broker.publish(publication)))
        dead_lettered: set[int] = set()
        timeout = self._settings.publish_timeout.total_seconds()
        for rejection, future in moving:
            try:
                future.result(timeout=timeout)
            except Exception as exc:  # dead-letter the whole message instead
                if id(rejection.delivery) not in dead_lettered:
                    log.error("setting a history message aside failed", error=str(exc))
                    broker.nack(rejection.delivery, requeue=False)
                    dead_lettered.add(id(rejection.delivery))
        return dead_lettered

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

    def _queue_empty(self, probe: QueueProbe) -> bool:
        try:
            return not any(probe.depths([self._topology.history_queue]).values())
        except BrokerUnavailable as exc:
            log.warning("cannot read the history queue's depth to drain", error=str(exc))
            return False

    def _purge_due(self) -> bool:
        return bool(self._purging) or time.monotonic() >= self._next_purge

    def _drained(self, probe: QueueProbe) -> bool:
        """In drain mode: True once the history queue was empty a few polls in a row."""
        if not (self._drain or (self._drain_when is not None and self._drain_when())):
            return False
        self._empty_polls = self._empty_polls + 1 if self._queue_empty(probe) else 0
        return self._empty_polls >= _EMPTY_POLLS_TO_DRAIN

    def _purge_beside(
        self, store: HistoryStore, purger: BackgroundWorker, purging: Future[None] | None
    ) -> Future[None]:
        """The purge thread's next round (it purges if one is due), once the last ended."""
        if purging is not None and not purging.done():
            return purging
        return purger.submit(self._purge_round, store)

    def _purge_round(self, store: HistoryStore) -> None:
        """A whole purge, batch after batch, if one is due (on the purge thread)."""
        self._purge_step(store)
        while self._purging and not (self._stopping or self._leaving):
            self._purge_step(store)

    def _purge_step(self, store: HistoryStore) -> None:
        """One purge batch, if due; whatever goes wrong in it never stops the archiving."""
        try:
            self._purge_if_due(store)
        except Exception as exc:  # store errors are handled inside: this is a bug
            self._purging = []  # tried again at the next purge interval
            log.error("history purge failed", error=f"{type(exc).__name__}: {exc}")

    def _purge_if_due(self, store: HistoryStore) -> None:
        """Delete one batch of expired mails, if a purge is due or under way.

        Retention runs between batches of ingest, one purge batch (one short
        transaction, sized by ``PurgeBatches`` to take at most ~0.5 s) per round of
        the loop, so purging a million expired mails never stops the archiving for long.
        """
        now = time.monotonic()
        if not self._purging and now >= self._next_purge:
            self._next_purge = now + self._settings.purge_interval.total_seconds()
            moment = datetime.now(UTC)
            try:
                store.forget_old_counts(moment)
            except StoreError as exc:
                log.warning("dropping old outcome counts failed; retrying later", error=str(exc))
            self._purging = [
                _Purge(tenant, app, moment - timedelta(days=config.retention_days))
                for tenant, tenant_config in self._settings.tenants.items()
                for app, config in tenant_config.apps.items()
            ]
        if not self._purging:
            return
        purge = self._purging[0]
        started = time.monotonic()
        try:
            deleted = store.purge_batch(
                purge.cutoff, tenant=purge.tenant, app=purge.app, batch_size=self._batches.size
            )
        except StoreError as exc:
            log.warning("history purge failed; retrying later", error=str(exc))
            self._purging = []
            return
        self._batches.took(time.monotonic() - started)
        purge.deleted += deleted
        if deleted:
            return
        self._purging.pop(0)
        if purge.deleted:
            log.info("history purged", tenant=purge.tenant, app=purge.app, mails=purge.deleted)


@dataclass
class _Purge:
    """The retention purge of one tenant/app, under way."""

    tenant: str
    app: str
    cutoff: datetime
    deleted: int = 0
