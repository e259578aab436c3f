"""Bulk actions run in the background; their progress is polled by the page (or the API)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rohrpost.shared.errors import RohrpostError
from rohrpost.shared.logs import get_logger

log = get_logger(__name__)
_KEPT = 100

Work = Callable[["Job"], str]


@dataclass
class Job:
    """One bulk action: who started it, how far it got, how it ended."""

    id: str
    action: str
    actor: str
    total: int
    done: int = 0
    state: str = "running"  # running, finished, failed
    message: str = ""
    skipped: list[dict[str, str]] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def progress(self, done: int, total: int) -> None:
        """Called by the operation after each mail."""
        self.done, self.total = done, total

    def view(self) -> dict[str, Any]:
        """The job as its page and the API show it."""
        return {
            "id": self.id,
            "action": self.action,
            "actor": self.actor,
            "total": self.total,
            "done": self.done,
            "state": self.state,
            "message": self.message,
            "skipped": self.skipped[:100],
            "skipped_count": len(self.skipped),
            "percent": 100 if not self.total else int(100 * self.done / self.total),
            "seconds": round((self.finished_at or time.time()) - self.started_at, 1),
        }


class JobBoard:
    """The jobs of this console process (the last hundred)."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, action: str, actor: str, total: int, work: Work) -> Job:
        """Run ``work(job)`` in a thread; it returns the closing message."""
        job = Job(uuid.uuid4().hex, action, actor, total)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > _KEPT:
                self._jobs.popitem(last=False)
        threading.Thread(target=self._run, args=(job, work), name=f"job-{action}").start()
        return job

    def get(self, job_id: str) -> Job | None:
        """A job by its id."""
        with self._lock:
            return self._jobs.get(job_id)

    def running(self) -> list[Job]:
        """Jobs still running."""
        with self._lock:
            return [job for job in self._jobs.values() if job.state == "running"]

    @staticmethod
    def _run(job: Job, work: Work) -> None:
        try:
            job.message = work(job)
            job.state = "finished"
        except RohrpostError as exc:
            job.message, job.state = str(exc), "failed"
        except Exception as exc:  # a job thread must end with a state, whatever happened
            log.exception("console job failed", action=job.action)
            job.message, job.state = f"unexpected {type(exc).__name__}", "failed"
        finally:
            job.finished_at = time.time()
