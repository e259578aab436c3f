"""Prometheus metrics, prefix ``rohrpost_``.

Labels are bounded: tenant and app (from the configuration), reason, code class,
queue kind. Never a recipient, a mail id or an error text.

With several worker processes (``--processes N``, ``rohrpost run``) the metrics use
prometheus-client's multiprocess mode: each process writes its values to files in
``PROMETHEUS_MULTIPROC_DIR``, which the supervisor sets up, and the supervisor
serves the sum on one ``/metrics`` endpoint.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TENANT_APP = ("tenant", "app")
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 21600)
_LATENESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30, 60, 300, 900)
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 21600)
_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """Every metric a rohrpost process records, on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry
        self.submitted = Counter(
            "rohrpost_mails_submitted",
            "Mails submitted (counted by the history consumer).",
            TENANT_APP,
            registry=r,
        )
        self.sent = Counter(
            "rohrpost_mails_sent", "Mails the SMTP server accepted.", TENANT_APP, registry=r
        )
        self.retried = Counter(
            "rohrpost_mails_retried",
            "Failed attempts that will be retried.",
            TENANT_APP,
            registry=r,
        )
        self.dead_lettered = Counter(
            "rohrpost_mails_dead_lettered",
            "Mails moved to a dead-letter queue.",
            (*TENANT_APP, "reason"),
            registry=r,
        )
        self.expired = Counter(
            "rohrpost_mails_expired", "Mails not sent because they expired.", TENANT_APP, registry=r
        )
        self.cancelled = Counter(
            "rohrpost_mails_cancelled",
            "Mails not sent because an operator cancelled them.",
            TENANT_APP,
            registry=r,
        )
        self.duplicates = Counter(
            "rohrpost_mails_duplicates",
            "Copies of mails already sent in their round, dropped instead of sent again.",
            TENANT_APP,
            registry=r,
        )
        self.smtp_errors = Counter(
            "rohrpost_smtp_errors",
            "Failed SMTP transactions, by reply class (4xx, 5xx, connection).",
            (*TENANT_APP, "code_class"),
            registry=r,
        )
        self.send_duration = Histogram(
            "rohrpost_send_duration_seconds",
            "One SMTP transaction.",
            TENANT_APP,
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.render_duration = Histogram(
            "rohrpost_render_duration_seconds",
            "Rendering templates and building MIME.",
            TENANT_APP,
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.delivery_latency = Histogram(
            "rohrpost_delivery_latency_seconds",
            "From submission (or not_before, if later) until the server accepted the mail.",
            TENANT_APP,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.schedule_lateness = Histogram(
            "rohrpost_schedule_lateness_seconds",
            "How long after its not_before a scheduled mail was sent.",
            TENANT_APP,
            buckets=_LATENESS_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "rohrpost_mails_in_flight",
            "Mails a worker holds and has not acked yet.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.held_until_due = Gauge(
            "rohrpost_mails_held_until_due",
            "Scheduled mails a worker received early and holds until they are due.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.route_paused = Gauge(
            "rohrpost_route_paused",
            "1 while an operator paused the tenant/app.",
            TENANT_APP,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ready = Gauge(
            "rohrpost_process_ready",
            "1 once the process is connected and consuming.",
            ("kind",),
            registry=r,
            multiprocess_mode="liveall",
        )
        self.broker_blocked = Gauge(
            "rohrpost_broker_blocked",
            "1 while RabbitMQ blocks the process's publishing (a memory or disk alarm).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rate_limited = Counter(
            "rohrpost_rate_limited",
            "Mails that had to wait for their turn: limit rate (max_rate of the server or "
            "app), connections (max_connections), throttled (the server said too fast).",
            (*TENANT_APP, "server", "limit"),
            registry=r,
        )
        self.rate_limit_wait = Histogram(
            "rohrpost_rate_limit_wait_seconds",
            "How long mails that had to wait for their turn or a connection waited (in the "
            "worker, or through the delay levels).",
            TENANT_APP,
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.effective_rate = Gauge(
            "rohrpost_smtp_effective_rate",
            "Mails per second the installation sends to the server now: max_rate, lowered "
            "by throttling replies (0: no limit).",
            ("server",),
            registry=r,
            multiprocess_mode="livemax",
        )
        self.limits_global = Gauge(
            "rohrpost_rate_limits_global",
            "1 while rate and connection limits are kept in the shared state (Redis); 0 while "
            "each process keeps to its share.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.history_written = Counter(
            "rohrpost_history_events_written", "Events the history consumer stored.", registry=r
        )
        self.history_write_errors = Counter(
            "rohrpost_history_write_errors",
            "Batches the history store refused (retried).",
            registry=r,
        )
        self.history_last_write = Gauge(
            "rohrpost_history_last_write_timestamp_seconds",
            "When the history consumer last committed a batch.",
            registry=r,
            multiprocess_mode="max",
        )

    def keeps_no_limits(self) -> None:
        """Say that this process (the history consumer, the console) keeps no rate limits.

        Its ``rohrpost_rate_limits_global`` is 1, which leaves the workers' minimum as it
        is where a supervisor serves its children's values together; left at 0, it would
        say that limits are kept in shares while every worker keeps them in Redis.
        """
        self.limits_global.set(1)
