"""Metrics, health endpoints, Prometheus rules and the Grafana dashboard, against real servers."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from rohrpost.catcher import MailCatcher, free_port
from rohrpost.consumer.endpoints import Endpoints
from rohrpost.producer.client import Producer
from rohrpost.shared.errors import ConfigError
from rohrpost.shared.settings import Settings
from tests.conftest import declare, get, rohrpost_command, wait_until, write_config

DEPLOY = Path(__file__).parent.parent / "deploy"
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool missing (Debian package prometheus)"
)
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="prometheus missing (Debian package prometheus)"
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels.

    pid is dropped, and rohrpost_namespace, which every sample carries (one test says so).
    """
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(
                sorted(
                    (k, v)
                    for k, v in sample.labels.items()
                    if k not in ("pid", "rohrpost_namespace")
                )
            )
            found[(sample.name, labels)] = found.get((sample.name, labels), 0) + sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def process(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start processes that are sent SIGTERM (and waited for) at the end of the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], **options: Any) -> subprocess.Popen[bytes]:
        handle = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **options
        )
        started.append(handle)
        return handle

    yield start
    for handle in started:
        if handle.poll() is None:
            handle.send_signal(signal.SIGTERM)
            try:
                handle.wait(30)
            except subprocess.TimeoutExpired:
                handle.kill()
                handle.wait()


def mail(recipient: str, **fields: Any) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "app": "billing",
        "to": [recipient],
        "subject": "s",
        "text": "t",
        **fields,
    }


@needs_promtool
def test_the_prometheus_config_and_rules_pass_promtool() -> None:
    folder = DEPLOY / "prometheus"
    for argv in (["check", "config", "prometheus.yml"], ["check", "rules", "rules/rohrpost.yml"]):
        result = subprocess.run(
            ["promtool", *argv], cwd=folder, capture_output=True, text=True, check=False, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_every_alert_has_a_passing_promtool_unit_test() -> None:
    folder = DEPLOY / "prometheus"
    result = subprocess.run(
        ["promtool", "test", "rules", "tests/rohrpost_test.yml"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rules = (folder / "rules" / "rohrpost.yml").read_text()
    tests = (folder / "tests" / "rohrpost_test.yml").read_text()
    alerts = [
        line.split(":", 1)[1].strip()
        for line in rules.splitlines()
        if line.strip().startswith("- alert:")
    ]
    assert len(alerts) >= 5
    for alert in alerts:
        assert f"alertname: {alert}" in tests, f"no promtool test for {alert}"


def test_readyz_answers_503_with_the_reason_until_ready() -> None:
    state: dict[str, str | None] = {"why": "starting"}
    endpoints = Endpoints(0, CollectorRegistry(), lambda: state["why"]).start()
    try:
        base = f"http://127.0.0.1:{endpoints.port}"
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert get(f"{base}/readyz") == (503, "not ready: starting\n")
        state["why"] = None
        assert get(f"{base}/readyz") == (200, "ready\n")
        assert get(f"{base}/nope")[0] == 404
    finally:
        endpoints.stop()


@needs_prometheus
def test_a_real_prometheus_scrapes_a_worker_and_the_dashboard_queries_are_valid(
    make_settings: Callable[..., Settings],
    catcher: MailCatcher,
    tmp_path: Path,
    process: Callable[..., subprocess.Popen[bytes]],
) -> None:
    worker_port, prometheus_port = free_port(), free_port()
    settings = make_settings(metrics_port=worker_port)
    declare(settings)
    config = write_config(settings, tmp_path / "rohrpost.toml")
    process(rohrpost_command(config, "worker"))
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: rohrpost\n    static_configs: [{{targets: ['127.0.0.1:{worker_port}']}}]\n"
    )
    process(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
            "--log.level=warn",
        ]
    )
    api = f"http://127.0.0.1:{prometheus_port}"
    wait_until(lambda: get(f"{api}/-/ready")[0] == 200)
    wait_until(lambda: get(f"http://127.0.0.1:{worker_port}/readyz")[0] == 200)
    with Producer(settings) as producer:
        for i in range(7):
            producer.submit(mail(f"r{i}@example.com"))
    catcher.wait_for(lambda mails: len(mails) == 7)

    def sent_total() -> float | None:
        query = urllib.parse.quote('sum(rohrpost_mails_sent_total{tenant="acme"})')
        status, body = get(f"{api}/api/v1/query?query={query}")
        result = json.loads(body)["data"]["result"] if status == 200 else []
        return float(result[0]["value"][1]) if result and result[0]["value"][1] == "7" else None

    assert wait_until(sent_total, timeout=60) == 7.0

    dashboard = json.loads((DEPLOY / "grafana" / "rohrpost.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(expressions) >= 10
    for expr in expressions:
        query = urllib.parse.quote(
            expr.replace("$tenant", ".*").replace("$namespace", settings.namespace)
        )
        status, body = get(f"{api}/api/v1/query?query={query}")
        assert status == 200 and json.loads(body)["status"] == "success", (expr, body)


def test_counters_match_outcomes_exactly_with_two_worker_processes(
    make_settings: Callable[..., Settings],
    catcher: MailCatcher,
    tmp_path: Path,
    process: Callable[..., subprocess.Popen[bytes]],
) -> None:
    port = free_port()
    settings = make_settings(metrics_port=port)
    declare(settings)
    config = write_config(settings, tmp_path / "rohrpost.toml")
    catcher.script("flaky@example.com", ["421 4.3.2 busy"])
    catcher.script("late@example.com", ["451 4.3.0 later"])  # retried after it expired
    catcher.always("gone@example.com", "550 5.1.1 no such user", stage="rcpt")
    base = f"http://127.0.0.1:{port}"
    process(rohrpost_command(config, "run", "--processes", "2"))
    wait_until(lambda: get(f"{base}/readyz")[0] == 200)
    with Producer(settings) as producer:
        for i in range(3):
            producer.submit(mail(f"ok{i}@example.com"))
        producer.submit(mail("flaky@example.com"))
        producer.submit(mail("gone@example.com"))
        soon = datetime.now(UTC) + timedelta(seconds=1)
        producer.submit(mail("late@example.com", expires_at=soon.isoformat()))
    catcher.wait_for(lambda mails: len(mails) == 4)

    expected = [
        ("rohrpost_mails_sent_total", {}, 4),
        ("rohrpost_mails_retried_total", {}, 2),
        ("rohrpost_mails_dead_lettered_total", {"reason": "rejected"}, 1),
        ("rohrpost_mails_expired_total", {}, 1),
        ("rohrpost_mails_submitted_total", {}, 6),
        ("rohrpost_smtp_errors_total", {"code_class": "4xx"}, 2),
        ("rohrpost_smtp_errors_total", {"code_class": "5xx"}, 1),
    ]

    def counters() -> dict[str, float]:
        text = get(f"{base}/metrics")[1]
        return {
            f"{name}{labels}": value(text, name, tenant="acme", app="billing", **labels)
            for name, labels, _ in expected
        }

    want = {f"{name}{labels}": float(n) for name, labels, n in expected}
    wait_until(lambda: counters() == want, timeout=60)
    time.sleep(1)  # nothing more may arrive: the counts are exact, not at least
    assert counters() == want
    text = get(f"{base}/metrics")[1]
    assert value(text, "rohrpost_process_ready", kind="worker") == 2
    assert value(text, "rohrpost_process_ready", kind="history") == 1
    # Redis answers: the limits are global (the history child, which keeps none, says nothing)
    assert value(text, "rohrpost_rate_limits_global") == 1
    assert (
        value(
            text,
            "rohrpost_queue_consumers",
            queue=f"{settings.namespace}.send.acme.billing",
            kind="send",
            tenant="acme",
            app="billing",
        )
        == 2
    )
    assert "example.com" not in text, "no recipient in any label"
    assert all(
        sample.labels["rohrpost_namespace"] == settings.namespace
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ), "every sample says which installation it is from"
    assert value(text, "rohrpost_delivery_latency_seconds_count", tenant="acme", app="billing") == 4


@needs_prometheus
def test_the_shipped_prometheus_config_finds_a_healthy_run_and_no_alert_fires(
    make_settings: Callable[..., Settings],
    catcher: MailCatcher,
    tmp_path: Path,
    process: Callable[..., subprocess.Popen[bytes]],
) -> None:
    port, prometheus_port = free_port(), free_port()
    settings = make_settings(metrics_port=port)
    declare(settings)
    config = write_config(settings, tmp_path / "rohrpost.toml")
    process(rohrpost_command(config, "run"))  # a worker and the history consumer, one port
    shipped = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    assert 'targets: ["127.0.0.1:9750"]' in shipped and "scrape_interval: 15s" in shipped
    (tmp_path / "prometheus.yml").write_text(
        shipped.replace("127.0.0.1:9750", f"127.0.0.1:{port}")
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
    )
    # every condition that holds fires at once, instead of after its `for:`
    rules = (DEPLOY / "prometheus" / "rules" / "rohrpost.yml").read_text()
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "rohrpost.yml").write_text(re.sub(r"for: \w+", "for: 0s", rules))
    process(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
            "--log.level=warn",
        ]
    )
    api = f"http://127.0.0.1:{prometheus_port}/api/v1"
    wait_until(lambda: get(f"http://127.0.0.1:{port}/readyz")[0] == 200)
    with Producer(settings) as producer:
        producer.submit(mail("ok@example.com"))
    catcher.wait_for(lambda mails: len(mails) == 1)

    def query(expr: str) -> list[dict[str, Any]]:
        status, body = get(f"{api}/query?query={urllib.parse.quote(expr)}")
        return list(json.loads(body)["data"]["result"]) if status == 200 else []

    namespace = settings.namespace
    wait_until(lambda: query(f'rohrpost_mails_sent_total{{rohrpost_namespace="{namespace}"}}'))
    targets = json.loads(get(f"{api}/targets")[1])["data"]["activeTargets"]
    ours = [t for t in targets if t["labels"]["job"] == "rohrpost"]
    assert [(t["labels"]["instance"], t["health"]) for t in ours] == [(f"127.0.0.1:{port}", "up")]
    # the queue figures are read every few seconds: on a busy machine the first reading
    # can predate the worker's consumers (with `for: 0s` that alone would fire)
    consumers = f'rohrpost_queue_consumers{{rohrpost_namespace="{namespace}",kind="send"}}'
    wait_until(lambda: [r for r in query(f"min({consumers}) > 0")])
    seen = time.time()

    def evaluated_since_seen() -> bool:
        groups = json.loads(get(f"{api}/rules")[1])["data"]["groups"]
        return all(
            datetime.fromisoformat(g["lastEvaluation"].replace("Z", "+00:00")).timestamp()
            > seen + 3
            for g in groups
        )

    wait_until(evaluated_since_seen)
    alerts = json.loads(get(f"{api}/alerts")[1])["data"]["alerts"]
    assert alerts == [], "no alert pending or firing against a healthy `rohrpost run`"
    assert {s["metric"]["rohrpost_namespace"] for s in query("rohrpost_process_ready")} == {
        namespace
    }


def test_a_metrics_port_in_use_is_a_configuration_error_that_names_it(tmp_path: Path) -> None:
    taken = socket.create_server(("0.0.0.0", 0))
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=rf"port {port}: .*in use.*metrics_port"):
            Endpoints(port, CollectorRegistry(), lambda: None)
        config = tmp_path / "rohrpost.toml"
        config.write_text('namespace = "metrics-port-taken"\n')
        done = subprocess.run(
            rohrpost_command(config, "worker", "--metrics-port", str(port)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        taken.close()
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot serve /metrics, /healthz, /readyz on port {port}: ")
    assert "unexpected" not in done.stderr
