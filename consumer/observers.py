"""Hooks that watch outcomes without cluttering the worker: one log line, the metrics.

The worker calls every observer for every outcome; an observer that fails is
logged, never raised (a broken metric must not stop mail).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

from rohrpost.consumer.outcome import (
    THROTTLED,
    Cancelled,
    DeadLetter,
    Duplicate,
    Expired,
    Held,
    Processed,
    Redelay,
    Retry,
    Sent,
)
from rohrpost.shared.logs import get_logger
from rohrpost.shared.metrics import Metrics

log = get_logger("rohrpost.consumer.worker")


class Observer(Protocol):
    """Something that wants to know each outcome."""

    def on_outcome(self, processed: Processed) -> None:
        """Called once per delivery, after the outcome was decided, before it is recorded."""


class LogObserver:
    """One INFO line per mail outcome (debug for an early arrival delayed again)."""

    def on_outcome(self, processed: Processed) -> None:
        match processed.outcome:
            case Sent(reply, message_id, _):
                log.info("mail sent", outcome="sent", smtp_reply=reply, message_id=message_id)
            case Retry(delay, error):
                log.info(
                    "mail attempt failed", outcome="retry", retry_in_seconds=delay, error=error
                )
            case DeadLetter(reason, error):
                log.warning(
                    "mail dead-lettered", outcome="dead_lettered", reason=reason, error=error
                )
            case Expired():
                log.info("mail expired", outcome="expired")
            case Cancelled():
                log.info("mail cancelled", outcome="cancelled")
            case Duplicate("superseded"):
                log.info("mail copy replaced by send-now; dropped", outcome="duplicate")
            case Duplicate():
                log.info("mail sent before; copy dropped", outcome="duplicate")
            case Held():
                log.info("mail held by an operator; set aside", outcome="held")
            case Redelay() as redelay:
                _log_redelay(redelay)


def _log_redelay(redelay: Redelay) -> None:
    if redelay.why == THROTTLED:
        log.info(
            "mail throttled by the server; delayed, not counted as an attempt",
            outcome="throttled",
            retry_in_seconds=redelay.delay_seconds,
            error=redelay.error,
        )
    else:
        log.debug(
            "mail delayed again",
            outcome="redelayed",
            delay_seconds=redelay.delay_seconds,
            why=redelay.why,
        )


class MetricsObserver:
    """Counts outcomes and times rendering, sending and delivery."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def on_outcome(self, processed: Processed) -> None:
        m, labels = self._m, (processed.tenant, processed.app)
        if processed.render_seconds is not None:
            m.render_duration.labels(*labels).observe(processed.render_seconds)
        if processed.send_seconds is not None:
            m.send_duration.labels(*labels).observe(processed.send_seconds)
        if processed.smtp_error is not None:
            m.smtp_errors.labels(*labels, processed.smtp_error).inc()
        match processed.outcome:
            case Sent():
                m.sent.labels(*labels).inc()
                self._timeliness(processed)
            case Retry():
                m.retried.labels(*labels).inc()
            case DeadLetter(reason, _):
                m.dead_lettered.labels(*labels, reason).inc()
            case Expired():
                m.expired.labels(*labels).inc()
            case Cancelled():
                m.cancelled.labels(*labels).inc()
            case Duplicate():
                m.duplicates.labels(*labels).inc()

    def _timeliness(self, processed: Processed) -> None:
        mail = processed.mail
        if mail is None:
            return
        now = datetime.now(UTC)
        labels = (processed.tenant, processed.app)
        due = max(mail.created_at, mail.not_before) if mail.not_before else mail.created_at
        self._m.delivery_latency.labels(*labels).observe(max(0.0, (now - due).total_seconds()))
        if mail.not_before is not None:
            lateness = max(0.0, (now - mail.not_before).total_seconds())
            self._m.schedule_lateness.labels(*labels).observe(lateness)
