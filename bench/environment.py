"""What a benchmark part runs against: a namespace, smtp-sink, a store, rohrpost processes.

Everything it starts it stops, and everything it declares it deletes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import tomli_w
from sqlalchemy import create_engine, make_url, text

from bench.workload import APP, TEMPLATES, TENANT
from rohrpost.catcher import free_port
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.settings import Settings, settings_from_mapping
from rohrpost.shared.state import SharedState, StateUnavailable
from rohrpost.shared.topology import Topology

BROKER_URL = os.environ.get("ROHRPOST_BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
POSTGRES_URL = os.environ.get(
    "ROHRPOST_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def wait_for(url: str, timeout: float = 60) -> None:
    """Wait until ``url`` answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become ready")


@dataclass
class Environment:
    """One benchmark installation."""

    settings: Settings
    config: Path
    workdir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @functools.cached_property
    def topology(self) -> Topology:
        return Topology.from_settings(self.settings)

    def rohrpost(self, *argv: str, metrics_port: int = 0) -> psutil.Process:
        """Start ``rohrpost ARGV`` in the background; it is stopped on exit."""
        command = [
            sys.executable,
            "-m",
            "rohrpost",
            "--config",
            str(self.config),
            "--log-level",
            "warning",
            "--log-format",
            "json",
            *argv,
        ]
        if metrics_port:
            command += ["--metrics-port", str(metrics_port)]
        log = (self.workdir / f"rohrpost-{len(self.processes)}.log").open("wb")
        handle = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(handle)
        if metrics_port:
            wait_for(f"http://127.0.0.1:{metrics_port}/readyz")
        return psutil.Process(handle.pid)

    def stop(self, process: psutil.Process) -> None:
        """SIGTERM a started process and wait for it."""
        process.send_signal(signal.SIGTERM)
        process.wait(120)

    def store_engine(self) -> Any:
        """A SQLAlchemy engine on the history store."""
        return create_engine(self.settings.store_url.get_secret_value())


def _settings(
    namespace: str,
    sink_port: int,
    store_url: str,
    limits: dict[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    limits = limits or {}
    return {
        "broker_url": BROKER_URL,
        "namespace": namespace,
        "templates_dir": str(TEMPLATES),
        "store_url": store_url,
        "metrics_port": 0,
        "log_level": "warning",
        "smtp": {"sink": {"host": "127.0.0.1", "port": sink_port, **limits.get("smtp", {})}},
        "tenants": {
            TENANT: {
                "apps": {
                    APP: {
                        "smtp": "sink",
                        "sender": "shop@acme.example",
                        "max_attempts": 5,
                        **limits.get("app", {}),
                    }
                }
            }
        },
        **overrides,
    }


@contextlib.contextmanager
def _store(kind: str, workdir: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'history.db'}"
        return
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def _smtp_sink(port: int) -> Iterator[None]:
    if shutil.which("smtp-sink") is None:
        raise SystemExit("smtp-sink is missing: apt-get install postfix")
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen(
        ["smtp-sink", *user, f"127.0.0.1:{port}", "2000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)
        yield
    finally:
        sink.terminate()
        sink.wait(10)


def _delete_shared_state(settings: Settings) -> None:
    """Delete the namespace's keys from Redis (mail ids submitted and sent)."""
    if settings.redis_url is None:
        return
    state = SharedState(settings.redis_url.get_secret_value())
    try:
        state.forget_namespace(settings.namespace)
    except StateUnavailable:
        pass  # no Redis: nothing was kept there
    finally:
        state.close()


@contextlib.contextmanager
def environment(store: str = "sqlite", **overrides: Any) -> Iterator[Environment]:
    """A fresh namespace with smtp-sink and a store; everything is removed afterwards.

    ``limits={"smtp": {...}, "app": {...}}``: more keys for the sink server and the app.
    """
    workdir = Path(tempfile.mkdtemp(prefix="rohrpost-bench-"))
    sink_port = free_port()
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    with _smtp_sink(sink_port), _store(store, workdir) as store_url:
        settings = settings_from_mapping(_settings(namespace, sink_port, store_url, **overrides))
        data = settings.model_dump(mode="json", exclude_none=True)
        redis_url = settings.redis_url.get_secret_value() if settings.redis_url else ""
        data |= {"broker_url": BROKER_URL, "store_url": store_url, "redis_url": redis_url}
        config = workdir / "rohrpost.toml"
        config.write_text(tomli_w.dumps(data))
        env = Environment(settings, config, workdir)
        with admin_channel(BROKER_URL) as channel:
            env.topology.declare(channel)
        try:
            yield env
        finally:
            for handle in env.processes:
                if handle.poll() is None:
                    handle.send_signal(signal.SIGTERM)
            for handle in env.processes:
                try:
                    handle.wait(120)
                except subprocess.TimeoutExpired:
                    handle.kill()
            with admin_channel(BROKER_URL) as channel:
                env.topology.delete(channel)
            _delete_shared_state(settings)
            shutil.rmtree(workdir, ignore_errors=True)
