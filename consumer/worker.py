"""The send worker: consumes every enabled send queue, sends, and records each outcome.

Threads in one worker process:

* the broker's I/O thread (``rohrpost.shared.broker.Broker``) receives deliveries, publishes,
  acks, and keeps heartbeats going however long an SMTP conversation takes;
* ``threads`` sender threads, each with its own SMTP connections, take deliveries
  from an in-process inbox, render and send them, then hand the outcome's
  publications back to the broker. The delivery is acked once they are confirmed.

Every lane (send queue) of every route has a consumer with its own prefetch window
(``prefetch`` each: a burst of high mails comes in whole, not one ack round trip at
a time), and the inbox serves high before normal before bulk, routes in turn
(``rohrpost.consumer.inbox``): a backlog delays other routes' and lanes' mails by a
turn, not by its size.

``stop()`` (SIGTERM) cancels the consumers and finishes every mail already
delivered to this process before it returns, so nothing is redelivered needlessly.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import structlog
from prometheus_client import CollectorRegistry

from rohrpost.consumer.control import ControlFollower
from rohrpost.consumer.due import LONGEST_HOLD_SECONDS, DueHold
from rohrpost.consumer.events import EventBatcher
from rohrpost.consumer.inbox import Inbox
from rohrpost.consumer.limits import FlowControl, Item
from rohrpost.consumer.observers import LogObserver, MetricsObserver, Observer
from rohrpost.consumer.outcome import (
    RATE_LIMITED,
    Processed,
    Redelay,
    Sent,
    mail_publication,
    outcome_event,
)
from rohrpost.consumer.processor import MailProcessor
from rohrpost.consumer.render import RenderLimits, TemplateRenderer
from rohrpost.consumer.smtp import SmtpTransport
from rohrpost.shared.broker import Broker, Delivery, admin_channel, connection_problem
from rohrpost.shared.container import PRIORITIES, Priority, decode_container
from rohrpost.shared.control import ControlState
from rohrpost.shared.errors import BrokerUnavailable, ContainerError, NotConfirmed, Unroutable
from rohrpost.shared.idempotency import Claim, SendClaims
from rohrpost.shared.logs import get_logger
from rohrpost.shared.metrics import Metrics
from rohrpost.shared.probe import QueueProbe
from rohrpost.shared.repair import TopologyRepair
from rohrpost.shared.settings import Settings
from rohrpost.shared.startup import start_with_retries
from rohrpost.shared.state import SharedState
from rohrpost.shared.topology import Topology
from rohrpost.shared.wire import attempt_of, due_of

log = get_logger(__name__)

_POLL_SECONDS = 0.2
#: Drain mode: queues must look empty this many polls in a row; a message being
#: dead-lettered from one delay level to the next is briefly in neither queue.
_EMPTY_POLLS_TO_DRAIN = 3
#: Most deliveries whose send claims are taken in one round trip to the shared state.
_CLAIM_BATCH = 500
#: How often a stopping worker looks whether its last outcomes are confirmed.
_SETTLE_POLL_SECONDS = 0.01
#: How long a mail whose move the broker refused (a full or deleted queue) stays with
#: the worker before it goes back to its queue: not straight back into another attempt.
REQUEUE_DELAY_SECONDS = 5.0


class SendWorker:
    """One worker process's worth of consuming and sending."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        """``metrics``: where to record (default: a private registry nobody serves)."""
        self._settings = settings
        self._clock = clock
        self._topology = Topology.from_settings(settings)
        self._user = settings.broker_user  # the user_id of the mails it moves on
        self._renderer = renderer = TemplateRenderer(
            settings.templates_dir, RenderLimits.of(settings)
        )
        self.metrics = metrics or Metrics(CollectorRegistry())
        self._observers: list[Observer] = [LogObserver(), MetricsObserver(self.metrics)]
        self._control = ControlState()
        redis_url = settings.redis_url
        self._state = SharedState(redis_url.get_secret_value()) if redis_url else None
        self._claims = SendClaims(self._state, settings.namespace)
        self._processor = MailProcessor(
            settings,
            self._topology,
            renderer,
            clock=clock,
            control=self._control,
            claims=self._claims,
        )
        self._lanes = self._topology.lanes()
        self._consuming: set[str] = set()
        self._paused_routes: set[tuple[str, str]] = set()  # as last logged
        self._consuming_started = False
        # deliveries as they arrive, and then with their send claims (taken in batches)
        self._arrivals: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        # scheduled mails that arrived before they are due, until they are
        self._due = DueHold(self._due_now, clock)
        self._inbox: Inbox[tuple[Delivery, Claim | None]] = Inbox()
        # rate and connection limits, between the claimer and the sender threads
        self._flow = FlowControl(
            settings,
            self._processor.route_of,
            self._topology.send_queue,
            state=self._state,
            metrics=self.metrics,
            dispatch=lambda item: self._inbox.put(item, self._lanes[item[0].queue]),
            defer=self._defer,
            urgent=lambda queue: self._lanes[queue].priority == "high",
        )
        self._observers.append(self._flow)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._received = 0
        self._stopping = False
        self._broker: Broker | None = None
        self._batcher: EventBatcher | None = None
        self._blocked: str | None = None  # why the broker blocks publishing, while it does
        self._repair = TopologyRepair(self._topology, settings.broker_url.get_secret_value())

    def stop(self) -> None:
        """Ask ``run`` to finish in-flight mails and return; safe from a signal handler."""
        self._stopping = True

    def readiness(self) -> str | None:
        """None when connected and consuming; else why not (for ``/readyz``)."""
        if self._stopping:
            return "stopping"
        if not self._consuming_started:
            return "starting"
        if problem := connection_problem(self._broker):
            return problem
        if self._blocked is not None:
            return (
                f"RabbitMQ blocks publishing ({self._blocked}: a memory or disk alarm); "
                "no mail is taken until it clears"
            )
        return self._repair.reason(self._broker)

    def run(self, *, drain: bool = False) -> None:
        """Consume until ``stop()``, or with ``drain`` until send and delay queues are empty.

        Before any send queue is consumed, the control stream is replayed, so every
        cancellation and pause recorded so far is known.
        """
        broker = start_with_retries(self._connect, stopping=lambda: self._stopping, what="worker")
        if broker is None:
            return  # stopped before the broker was ready
        url = self._settings.broker_url.get_secret_value()
        threads = [
            threading.Thread(target=self._send_loop, name=f"sender-{i}", daemon=True)
            for i in range(self._settings.threads)
        ]
        threads.append(threading.Thread(target=self._claim_loop, name="claimer", daemon=True))
        self._flow.start()
        self._due.start()
        for thread in threads:
            thread.start()
        self._consuming_started = True
        self._follow_pauses()
        self.metrics.ready.labels("worker").set(1)
        log.info(
            "worker started",
            queues=len(self._lanes),
            threads=self._settings.threads,
            node=broker.node,
        )
        try:
            with QueueProbe(url) as probe:
                self._wait(probe if drain else None)
        finally:
            self._shutdown(broker, threads)

    def _connect(self) -> Broker:
        """Declare the topology, connect and replay the control stream."""
        url = self._settings.broker_url.get_secret_value()
        with admin_channel(url) as channel:
            self._topology.declare(channel)
        broker = Broker(
            url,
            name=f"rohrpost-worker:{self._settings.namespace}",
            republish=False,
            on_blocked=self._on_blocked,
        )
        broker.start()
        try:
            self._broker = broker
            self._batcher = EventBatcher(broker, self._topology.events_exchange)
            ControlFollower(broker, self._topology, self._control, self._follow_pauses).start()
        except BaseException:
            self._broker = self._batcher = None
            broker.close(timeout=1)
            raise
        return broker

    def _on_blocked(self, reason: str | None) -> None:
        """The broker blocks (``reason``) or unblocks publishing: on the I/O thread.

        While it blocks, no outcome can be recorded, so the worker stops taking mails
        (as for a pause: those it holds and has not begun go back to their queue; the
        outcomes of those being sent wait), and takes them again once it unblocks.
        """
        self._blocked = reason
        self.metrics.broker_blocked.set(0 if reason is None else 1)
        self._follow_pauses()

    def _follow_pauses(self) -> None:
        """Consume exactly the send queues of routes that are not paused (none while the
        broker blocks publishing)."""
        broker = self._broker
        if broker is None or not self._consuming_started:
            return
        with self._lock:
            for tenant, app in self._topology.routes:
                paused = self._control.is_paused(tenant, app)
                self.metrics.route_paused.labels(tenant, app).set(1 if paused else 0)
                halted = paused or self._blocked is not None
                for priority in PRIORITIES:
                    self._follow_pause(broker, tenant, app, priority, paused=halted)
                if paused != ((tenant, app) in self._paused_routes):
                    # once per change (and at start for what is paused), not per instruction
                    log.info("route paused" if paused else "route resumed", tenant=tenant, app=app)
                    self._paused_routes ^= {(tenant, app)}

    def _follow_pause(
        self, broker: Broker, tenant: str, app: str, priority: Priority, *, paused: bool
    ) -> None:
        """Consume the lane of ``priority`` of tenant/app, or stop, as ``paused`` says."""
        queue = self._topology.send_queue(tenant, app, priority)
        if paused and queue in self._consuming:
            broker.cancel_consumer(queue)
            self._consuming.discard(queue)
        elif not paused and queue not in self._consuming:
            broker.consume(queue, self._settings.prefetch, self._receive)
            self._consuming.add(queue)

    def _wait(self, probe: QueueProbe | None) -> None:
        empty_polls = 0
        while not self._stopping:
            time.sleep(_POLL_SECONDS)
            assert self._broker is not None
            self._repair.check(self._broker)
            # what `rohrpost run`'s supervisor reads to be ready (it cannot ask readiness())
            self.metrics.ready.labels("worker").set(1 if self.readiness() is None else 0)
            if probe is None:
                continue
            assert self._broker is not None
            # A paused route's mails wait for its resume, not for the drain.
            watched = [
                queue
                for queue, lane in self._lanes.items()
                if not self._control.is_paused(lane.tenant, lane.app)
            ]
            watched += self._topology.delay_queues()
            idle = self._in_flight == 0 and self._broker.pending() == 0
            if idle and self._all_empty(probe, watched):
                empty_polls += 1
                if empty_polls >= _EMPTY_POLLS_TO_DRAIN:
                    log.info("queues drained")
                    return
            else:
                empty_polls = 0

    @staticmethod
    def _all_empty(probe: QueueProbe, queues: list[str]) -> bool:
        try:
            return not any(probe.depths(queues).values())
        except BrokerUnavailable as exc:
            log.warning("cannot read queue depths to drain; trying again", error=str(exc))
            return False

    def _shutdown(self, broker: Broker, threads: list[threading.Thread]) -> None:
        try:
            broker.cancel_consumers().result(timeout=10)
        except Exception as exc:
            log.warning("could not cancel consumers cleanly", error=str(exc))
        for delivery in self._due.close():  # not due yet: back to the queue, for another worker
            self.metrics.held_until_due.dec()
            self._put_back(delivery)
        self._arrivals.put(None)  # the claimer hands on what arrived, then the end
        for thread in threads:
            thread.join()
        deadline = time.monotonic() + self._settings.publish_timeout.total_seconds()
        self._settle_outcomes(deadline)
        self._flow.release()
        self._claims.close()
        if self._state is not None:
            self._state.close()
        broker.close(timeout=max(0.0, deadline - time.monotonic()))
        self._broker = None
        self._renderer.close()
        # received: deliveries this process took; each was sent, retried, dead-lettered
        # or (paused route) put back before it exited.
        log.info("worker stopped", received=self._received, in_flight=self._in_flight)

    def _settle_outcomes(self, deadline: float) -> None:
        """Publish the last events and wait, until ``deadline``, for every mail to settle.

        A retried or dead-lettered mail settles in two steps: its move is confirmed,
        then its event is batched and confirmed. The sender threads have returned after
        the first, so without this wait the worker could exit with the mail unacked
        (and the broker would deliver it again, besides the retry).
        """
        batcher = self._batcher
        if batcher is None:
            return
        batcher.flush()
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(_SETTLE_POLL_SECONDS)
            batcher.flush()

    # -- I/O thread ----------------------------------------------------------------

    def _receive(self, delivery: Delivery) -> None:
        with self._lock:
            self._in_flight += 1
            self._received += 1
        self.metrics.in_flight.inc()
        due = due_of(delivery.properties)
        if due is not None and 0 < due - self._clock() <= LONGEST_HOLD_SECONDS:
            self.metrics.held_until_due.inc()
            if self._due.hold(delivery, due):
                return
            self.metrics.held_until_due.dec()  # stopping: the claimer has it at once
        self._arrivals.put(delivery)

    # -- due-hold thread -----------------------------------------------------------------

    def _due_now(self, delivery: Delivery) -> None:
        self.metrics.held_until_due.dec()
        self._arrivals.put(delivery)

    # -- claimer thread ----------------------------------------------------------------

    def _claim_loop(self) -> None:
        """Take the send claims of what arrived, many in one round trip; pass them on."""
        ending = False
        while not ending:
            batch = [self._arrivals.get()]
            while len(batch) < _CLAIM_BATCH and not self._arrivals.empty():
                batch.append(self._arrivals.get())
            ending = None in batch
            deliveries = [d for d in batch if d is not None]
            keys = [self._processor.claim_key(d) for d in deliveries]
            taken = iter(self._claims.claim_many([key for key in keys if key is not None]))
            # without a mail id in its properties, claimed once it is read
            self._flow.admit(
                (delivery, next(taken) if key is not None else None)
                for delivery, key in zip(deliveries, keys, strict=True)
            )
        self._flow.close()  # what still waits for its turn goes back to the delay levels
        self._inbox.close()

    # -- sender threads --------------------------------------------------------------

    def _send_loop(self) -> None:
        transport = SmtpTransport(self._settings.smtp, self._flow.pools)
        try:
            while (item := self._inbox.get()) is not None:
                delivery, claim = item
                structlog.contextvars.clear_contextvars()
                route = self._processor.route_of(delivery.queue)
                if self._blocked is not None or self._control.is_paused(*route):
                    # prefetched before the pause took effect, or the broker blocks
                    # publishing: its outcome could not be recorded now
                    self._claims.release(claim)
                    self._flow.put_back(delivery)
                    self._put_back(delivery)
                    continue
                processed = self._processor.process(delivery, transport, claim)
                self._record(processed)
        finally:
            transport.close()

    def _defer(self, item: Item, seconds: int) -> None:
        """Delay a mail whose turn under a rate limit is further off (same attempt)."""
        delivery, claim = item
        self._claims.release(claim)
        tenant, app = self._processor.route_of(delivery.queue)
        attempt = attempt_of(delivery.properties)
        delay = Redelay(self._topology.delay.seconds(seconds), RATE_LIMITED)
        try:
            mail = decode_container(delivery.body)  # it comes back into its own lane
        except ContainerError:
            mail = None  # the processor dead-letters it when it comes back
        self._record(Processed(delivery, mail, attempt, delay, tenant, app))

    def _put_back(self, delivery: Delivery) -> None:
        assert self._broker is not None
        self._broker.nack(delivery, requeue=True)
        self._done()

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1
        self.metrics.in_flight.dec()

    def _record(self, processed: Processed) -> None:
        """Move the mail if its outcome says so, then record the event; ack when confirmed."""
        broker, batcher = self._broker, self._batcher
        assert broker is not None and batcher is not None
        for observer in self._observers:
            try:
                observer.on_outcome(processed)
            except Exception:
                log.exception("outcome observer failed", observer=type(observer).__name__)
        event = outcome_event(processed)

        def record_event(error: BaseException | None) -> None:
            if error is not None or event is None:
                self._settle(processed, error)
            else:
                batcher.add(event, lambda failed: self._settle(processed, failed))

        moved = mail_publication(self._topology, processed, self._user)
        if moved is None:
            record_event(None)
        else:
            broker.publish(moved).add_done_callback(lambda done: record_event(done.exception()))

    def _settle(self, processed: Processed, error: BaseException | None) -> None:
        """Ack once the outcome is confirmed (``error`` None); else let it come back."""
        broker = self._broker
        assert broker is not None
        mail_id = str(processed.mail.id) if processed.mail else None
        if error is None or isinstance(processed.outcome, Sent):
            # A sent mail is acked even if its event was not confirmed: sending it
            # again would be worse than a gap in its history.
            if error is not None:
                log.error("sent event not confirmed", mail_id=mail_id, error=str(error))
            broker.ack(processed.delivery)
        else:
            if isinstance(error, Unroutable):  # a queue of the topology is gone
                self._repair.lost(f"a move came back unroutable: {error}")
            log.warning(
                "outcome not confirmed; the mail will be redelivered",
                mail_id=mail_id,
                error=str(error),
            )
            if isinstance(error, NotConfirmed):
                # Refused (a full queue, a deleted one): not straight into another attempt.
                def requeue() -> None:
                    broker.nack(processed.delivery, requeue=True)
                    self._done()

                broker.call_later(REQUEUE_DELAY_SECONDS, requeue)
                return
            broker.nack(processed.delivery, requeue=True)
        self._done()
