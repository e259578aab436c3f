"""Runs rohrpost's processes: send workers and the history consumer, restarted if they die.

Python threads share one core (the GIL), so using every core takes processes.
Workers are stateless; the broker spreads mails across their consumers.

A single process serves its own ``/metrics``, ``/healthz`` and ``/readyz``. With
several, the children write metrics in prometheus-client's multiprocess mode and
the supervisor serves their sum on one port, ready when every child is.

In drain mode the workers exit once the send and delay queues are empty; then the
history consumer is told (through a shared event) to exit once it has archived what
is left, so ``rohrpost run --drain`` returns with every mail sent *and* archived.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Protocol

from prometheus_client import CollectorRegistry, multiprocess

from rohrpost.consumer.endpoints import Endpoints, QueueCollector
from rohrpost.consumer.history import HistoryConsumer, collect_garbage_seldom
from rohrpost.shared.errors import RohrpostError
from rohrpost.shared.logs import configure_logging, get_logger
from rohrpost.shared.metrics import Metrics
from rohrpost.shared.settings import Settings
from rohrpost.shared.topology import Topology

log = get_logger(__name__)


@dataclass
class RestartBackoff:
    """When to start a child again after it exited: exponential, reset after a healthy run.

    A child that cannot start (broker away, a queue declared with other arguments)
    would otherwise be respawned every second; one that ran ``healthy_after``
    seconds before it died starts again after ``first`` seconds, as if for the first
    time.
    """

    first: float = 1.0
    factor: float = 2.0
    cap: float = 60.0
    healthy_after: float = 60.0
    failures: int = 0

    def delay(self, ran_for: float) -> float:
        """The wait before the next start of a child that exited after ``ran_for`` seconds."""
        if ran_for >= self.healthy_after:
            self.failures = 0
        delay = min(self.cap, self.first * self.factor**self.failures)
        self.failures += 1
        return delay


#: Exit status of a process a second Ctrl-C stopped at once (128 + SIGINT, as shells do).
FORCED_EXIT = 128 + signal.SIGINT


def _on_signals(stop: Callable[[], None], force: Callable[[], None] | None = None) -> None:
    """SIGTERM and a first SIGINT (Ctrl-C) call ``stop``, a graceful stop; a second
    SIGINT calls ``force`` (default: exit at once with FORCED_EXIT).

    A graceful stop finishes the mails in hand, which takes up to a send timeout per
    round of them: an operator at a terminal can cut it short. What was not finished
    is not acked, so the broker hands it to another worker (a mail in the middle of
    its SMTP transaction may then be sent twice, as after SIGKILL).
    """
    interrupted = False

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        stop()

    def on_sigint(_signum: int, _frame: FrameType | None) -> None:
        nonlocal interrupted
        if not interrupted:
            interrupted = True
            log.info("stopping; Ctrl-C again stops at once, unfinished mails back to the queue")
            stop()
        elif force is not None:
            force()
        else:
            _exit_now()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigint)


def _exit_now() -> None:
    log.warning("second Ctrl-C: stopping at once; what was in hand goes back to the queue")
    os._exit(FORCED_EXIT)  # no clean-up: nothing unfinished was acked


def _serve(
    settings: Settings,
    port: int,
    metrics_registry: CollectorRegistry,
    readiness: Callable[[], str | None],
) -> Endpoints | None:
    if not port:
        return None
    metrics_registry.register(
        QueueCollector(Topology.from_settings(settings), settings.broker_url.get_secret_value())
    )
    return Endpoints(port, metrics_registry, readiness, namespace=settings.namespace).start()


class _Service(Protocol):
    """A SendWorker or a HistoryConsumer, as far as running one in this process goes."""

    def stop(self) -> None: ...
    def readiness(self) -> str | None: ...
    def run(self, *, drain: bool = False) -> None: ...


def _run_here(
    settings: Settings,
    service: _Service,
    registry: CollectorRegistry,
    *,
    drain: bool,
    metrics_port: int,
) -> None:
    """Run ``service`` in this process until SIGTERM/SIGINT (or drained), serving its endpoints."""
    _on_signals(service.stop)
    endpoints = _serve(settings, metrics_port, registry, service.readiness)
    try:
        service.run(drain=drain)
    finally:
        if endpoints is not None:
            endpoints.stop()


def run_worker(settings: Settings, *, drain: bool = False, metrics_port: int = 0) -> None:
    """Run one SendWorker in this process until SIGTERM/SIGINT (or drained)."""
    from rohrpost.consumer.worker import SendWorker  # not imported by a history consumer

    registry = CollectorRegistry()
    worker = SendWorker(settings, metrics=Metrics(registry))
    _run_here(settings, worker, registry, drain=drain, metrics_port=metrics_port)


def run_history_consumer(settings: Settings, *, drain: bool = False, metrics_port: int = 0) -> None:
    """Run the history consumer in this process until SIGTERM/SIGINT (or drained)."""
    collect_garbage_seldom()
    registry = CollectorRegistry()
    consumer = HistoryConsumer(settings, metrics=Metrics(registry))
    _run_here(settings, consumer, registry, drain=drain, metrics_port=metrics_port)


class EventLike(Protocol):
    """A multiprocessing event, as far as the children use it."""

    def is_set(self) -> bool: ...


def _worker_main(settings: Settings, drain: bool, _workers_done: EventLike) -> None:
    configure_logging(settings.log_level, settings.log_format, settings.secrets())
    from rohrpost.consumer.worker import SendWorker

    worker = SendWorker(settings, metrics=Metrics())  # multiprocess mode: values go to files
    _on_signals(worker.stop)
    _exit_on_error(lambda: worker.run(drain=drain), "worker")


def _history_main(settings: Settings, drain: bool, workers_done: EventLike) -> None:
    configure_logging(settings.log_level, settings.log_format, settings.secrets())
    collect_garbage_seldom()
    consumer = HistoryConsumer(settings, metrics=Metrics())
    _on_signals(consumer.stop)
    _exit_on_error(
        lambda: consumer.run(drain=drain, drain_when=workers_done.is_set), "history consumer"
    )


def _exit_on_error(run: Callable[[], None], what: str) -> None:
    """Run a child's service; on an error, one log line and exit status 1 (no traceback)."""
    try:
        run()
    except RohrpostError as exc:
        log.error(f"{what} stopped by an error", error=str(exc), error_type=type(exc).__name__)
        sys.exit(1)
    except Exception:
        log.exception(f"{what} stopped by an unexpected error")
        sys.exit(1)


@dataclass(frozen=True)
class Child:
    """A kind of process to keep running."""

    name: str
    main: Callable[[Settings, bool, EventLike], None]
    #: In drain mode, drains once the workers are done instead of on its own.
    follows_workers: bool = False


WORKER = Child("worker", _worker_main)
HISTORY = Child("history", _history_main, follows_workers=True)


class Supervisor:
    """Keeps its children running; SIGTERM stops them all gracefully."""

    def __init__(
        self,
        settings: Settings,
        children: list[Child],
        *,
        drain: bool = False,
        metrics_port: int = 0,
    ) -> None:
        self._settings = settings
        self._children = children
        self._drain = drain
        self._metrics_port = metrics_port
        self._stopping = False
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[BaseProcess] = []
        self._started_at: list[float] = []
        self._backoff = [RestartBackoff() for _ in children]
        self._restart_at: dict[int, float] = {}
        self._workers_done = self._context.Event()
        self._metrics_dir = ""

    def stop(self) -> None:
        """Ask every child to finish what it is doing and exit."""
        self._stopping = True

    def _force(self) -> None:
        """A second Ctrl-C: kill every child (SIGKILL) and exit at once."""
        for process in self._processes:
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
        _exit_now()

    def run(self) -> int:
        """Supervise until stopped or, draining, until every child is done; return exit code."""
        _on_signals(self.stop, self._force)
        self._metrics_dir = tempfile.mkdtemp(prefix="rohrpost-metrics-")
        # Children read it when they import prometheus-client, so it is set first.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self._metrics_dir)
        endpoints = None
        try:  # a port in use ends the run here: the files' folder goes all the same
            endpoints = _serve(self._settings, self._metrics_port, registry, self.readiness)
            return self._supervise()
        finally:
            if endpoints is not None:
                endpoints.stop()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def readiness(self) -> str | None:
        """None when every child runs and reported ready; else why not."""
        if not all(p.is_alive() for p in self._processes):
            return "a child process is not running"
        collector = multiprocess.MultiProcessCollector(None, path=self._metrics_dir)
        ready = len(
            [
                sample
                for metric in collector.collect()
                if metric.name == "rohrpost_process_ready"
                for sample in metric.samples
                if sample.value == 1
            ]
        )
        wanted = len(self._children)
        return None if ready >= wanted else f"{ready} of {wanted} processes ready"

    def _supervise(self) -> int:
        self._started_at = [0.0] * len(self._children)
        self._processes = [self._spawn(i) for i in range(len(self._children))]
        while not self._stopping:
            time.sleep(0.2)
            self._restart_dead()
            if self._drain:
                self._tell_followers_when_workers_are_done()
                if all(p.exitcode == 0 for p in self._processes):
                    return 0
        for process in self._processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: the child finishes what it holds
        for process in self._processes:
            process.join()
        return 0

    def _restart_dead(self) -> None:
        now = time.monotonic()
        for index, process in enumerate(self._processes):
            if process.is_alive() or process.exitcode is None:
                continue
            if self._drain and process.exitcode == 0:
                continue
            if index not in self._restart_at:
                child = self._children[index]
                delay = self._backoff[index].delay(now - self._started_at[index])
                self._restart_at[index] = now + delay
                log.error(
                    "process died; restarting",
                    child=child.name,
                    slot=index,
                    pid=process.pid,
                    code=process.exitcode,
                    restart_in_seconds=delay,
                )
                if process.pid is not None:
                    multiprocess.mark_process_dead(process.pid, self._metrics_dir)
            elif now >= self._restart_at[index]:
                del self._restart_at[index]
                self._processes[index] = self._spawn(index)

    def _tell_followers_when_workers_are_done(self) -> None:
        leaders = [
            p for c, p in zip(self._children, self._processes, strict=True) if not c.follows_workers
        ]
        if all(p.exitcode == 0 for p in leaders):
            self._workers_done.set()

    def _spawn(self, index: int) -> BaseProcess:
        child = self._children[index]
        drain = self._drain and not child.follows_workers
        process = self._context.Process(
            target=child.main,
            args=(self._settings, drain, self._workers_done),
            name=f"rohrpost-{child.name}-{index}",
        )
        process.start()
        self._started_at[index] = time.monotonic()
        log.info("process started", child=child.name, slot=index, pid=process.pid)
        return process
