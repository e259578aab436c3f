"""Runs send workers: in this process, or as N child processes that are restarted if they die.

Python threads share one core (the GIL), so using both cores of a machine takes
processes. Workers are stateless; the broker spreads mails across their consumers.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from types import FrameType

import structlog

from consumer.worker import SendWorker
from shared.logs import configure_logging
from shared.settings import Settings

log = structlog.get_logger(__name__)

_RESTART_DELAY_SECONDS = 1.0


def _on_stop_signals(stop: Callable[[], None]) -> None:
    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run_worker(settings: Settings, *, drain: bool = False) -> None:
    """Run one SendWorker in this process until SIGTERM/SIGINT (or drained)."""
    worker = SendWorker(settings)
    _on_stop_signals(worker.stop)
    worker.run(drain=drain)


def _child_main(settings: Settings, drain: bool) -> None:
    configure_logging(settings.log_level, settings.log_format, settings.secrets())
    run_worker(settings, drain=drain)


class WorkerSupervisor:
    """Keeps ``processes`` worker processes running; SIGTERM stops them all gracefully."""

    def __init__(self, settings: Settings, processes: int, *, drain: bool = False) -> None:
        self._settings = settings
        self._count = processes
        self._drain = drain
        self._stopping = False
        self._context = multiprocessing.get_context("spawn")

    def stop(self) -> None:
        """Ask every child to finish its in-flight mails and exit."""
        self._stopping = True

    def run(self) -> int:
        """Supervise until stopped (or, draining, until every child exited); return exit code."""
        _on_stop_signals(self.stop)
        children = [self._spawn(i) for i in range(self._count)]
        while not self._stopping:
            time.sleep(0.2)
            for index, child in enumerate(children):
                if child.is_alive() or child.exitcode is None:
                    continue
                if self._drain and child.exitcode == 0:
                    continue
                log.error("worker process died; restarting", pid=child.pid, code=child.exitcode)
                time.sleep(_RESTART_DELAY_SECONDS)
                children[index] = self._spawn(index)
            if self._drain and all(c.exitcode == 0 for c in children):
                return 0
        for child in children:
            if child.is_alive() and child.pid is not None:
                child.terminate()  # SIGTERM: the child finishes in-flight mails
        for child in children:
            child.join()
        return 0

    def _spawn(self, index: int) -> BaseProcess:
        process = self._context.Process(
            target=_child_main,
            args=(self._settings, self._drain),
            name=f"rohrpost-worker-{index}",
        )
        process.start()
        log.info("worker process started", pid=process.pid, index=index)
        return process
