"""HTTP endpoints of every long-running process: ``/metrics``, ``/healthz``, ``/readyz``.

``/healthz`` answers 200 while the process runs; ``/readyz`` answers 200 only when
it is connected and consuming (and, for the history consumer, the store answers),
else 503 with the reason — what Kubernetes probes need.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rohrpost.shared.broker import admin_channel
from rohrpost.shared.errors import ConfigError
from rohrpost.shared.logs import get_logger
from rohrpost.shared.topology import Topology

log = get_logger(__name__)

Readiness = Callable[[], str | None]  # None when ready, else why not
_CACHE_SECONDS = 5.0
#: The label every sample carries: the namespace, so that several installations
#: scraped by one Prometheus can be told apart (``namespace`` itself is taken on
#: Kubernetes, where the Prometheus Operator sets it to the pod's namespace).
NAMESPACE_LABEL = "rohrpost_namespace"


class Labelled:
    """A registry's samples with constant labels added, at exposition time.

    One place for every metric, those of child processes (multiprocess mode) included.
    """

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self._registry = registry
        self._labels = labels

    def collect(self) -> Iterator[Metric]:
        """Every metric of the registry, each sample with the constant labels."""
        for metric in self._registry.collect():
            labelled = copy.copy(metric)  # collectors may cache their metrics
            labelled.samples = [
                sample._replace(labels={**sample.labels, **self._labels})
                for sample in metric.samples
            ]
            yield labelled


class QueueCollector(Collector):
    """Queue depths and consumer counts of the namespace, read from the broker at scrape time.

    RabbitMQ reports neither the age of the oldest message nor per-message times
    for quorum queues over AMQP, so there is no oldest-message gauge; delivery
    latency and schedule lateness histograms show a backlog's age instead.
    """

    def __init__(self, topology: Topology, broker_url: str) -> None:
        self._topology = topology
        self._url = broker_url
        self._cache: tuple[float, list[Metric]] | None = None
        self._lock = threading.Lock()

    def _queues(self) -> Iterator[tuple[str, str, str, str]]:
        topology = self._topology
        for tenant, app in topology.routes:
            for send in topology.send_queues(tenant, app):
                yield send, "send", tenant, app
            yield topology.dead_queue(tenant, app), "dead", tenant, app
            yield topology.held_queue(tenant, app), "held", tenant, app
        for queue in topology.delay_queues():
            yield queue, "delay", "", ""
        if topology.history:
            yield topology.history_queue, "history", "", ""
            yield topology.history_rejected_queue, "history_rejected", "", ""

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if self._cache is None or time.monotonic() - self._cache[0] > _CACHE_SECONDS:
                self._cache = (time.monotonic(), self._read())
            yield from self._cache[1]

    def _read(self) -> list[Metric]:
        labels = ["queue", "kind", "tenant", "app"]
        messages = GaugeMetricFamily(
            "rohrpost_queue_messages", "Messages ready in the queue.", labels=labels
        )
        consumers = GaugeMetricFamily(
            "rohrpost_queue_consumers", "Consumers of the queue.", labels=labels
        )
        up = GaugeMetricFamily("rohrpost_broker_up", "1 when the broker answered this scrape.")
        try:
            with admin_channel(self._url, timeout=3) as channel:
                for queue, kind, tenant, app in self._queues():
                    method = channel.queue_declare(queue, passive=True).method
                    messages.add_metric([queue, kind, tenant, app], method.message_count)
                    consumers.add_metric([queue, kind, tenant, app], method.consumer_count)
        except Exception as exc:  # a scrape must not fail because the broker did
            log.warning("queue metrics unavailable", error=str(exc))
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [messages, consumers, up]


class Endpoints:
    """A small HTTP server on its own thread."""

    def __init__(
        self,
        port: int,
        registry: CollectorRegistry,
        readiness: Readiness,
        *,
        namespace: str | None = None,
    ) -> None:
        """``namespace``: added to every sample as ``rohrpost_namespace``."""
        self._registry: CollectorRegistry | Labelled = (
            registry if namespace is None else Labelled(registry, {NAMESPACE_LABEL: namespace})
        )
        self._readiness = readiness
        handler = self._handler()
        # All interfaces: Prometheus and Kubernetes probes come from elsewhere.
        try:
            self._server = ThreadingHTTPServer(("0.0.0.0", port), handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve /metrics, /healthz, /readyz on port {port}: "
                f"{exc.strerror or exc} (another process listens there?); choose another "
                "with metrics_port or --metrics-port (0 turns them off)"
            ) from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="endpoints", daemon=True
        )

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._server.server_address[1])

    def start(self) -> Endpoints:
        """Start serving."""
        self._thread.start()
        log.info("serving /metrics, /healthz, /readyz", port=self.port)
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoints = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._answer(200, generate_latest(endpoints._registry), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    self._answer(200, b"ok\n")
                elif self.path == "/readyz":
                    why = endpoints._readiness()
                    if why is None:
                        self._answer(200, b"ready\n")
                    else:
                        self._answer(503, f"not ready: {why}\n".encode())
                else:
                    self._answer(404, b"try /metrics, /healthz or /readyz\n")

            def _answer(self, code: int, body: bytes, kind: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass  # scrapes every few seconds would drown the logs

        return Handler
