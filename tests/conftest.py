"""Shared fixtures: a real RabbitMQ, a real SMTP server, one namespace per test.

The broker is found as a user's machine offers it: ``ROHRPOST_TEST_BROKER_URL`` if
set; else a RabbitMQ answering on 127.0.0.1:5672; else, where Docker runs, a
RabbitMQ container started with testcontainers; else the run fails saying how to
provide one. Never a silent skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pika
import pytest
import redis
import tomli_w
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import OperationalError

from rohrpost.catcher import MailCatcher
from rohrpost.consumer.events import BATCH_TYPE
from rohrpost.consumer.worker import SendWorker
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.errors import BrokerUnavailable
from rohrpost.shared.events import MailEvent
from rohrpost.shared.settings import Settings, settings_from_mapping
from rohrpost.shared.state import SharedState
from rohrpost.shared.store import HistoryStore
from rohrpost.shared.topology import Topology

LOCAL_BROKER = "amqp://guest:guest@127.0.0.1:5672/%2F"
RABBITMQ_IMAGE = "rabbitmq:3.13-management"
LOCAL_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
POSTGRES_IMAGE = "postgres:16"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
REDIS_IMAGE = "redis:7"


def _answers(url: str) -> bool:
    try:
        with admin_channel(url, timeout=3):
            return True
    except BrokerUnavailable:
        return False


def _docker_runs() -> bool:
    if shutil.which("docker") is None:
        return False
    result = subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=20)
    return result.returncode == 0


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the figures tests measured (``record_property("figure", …)``), also under xdist."""
    figures = [
        value
        for report in terminalreporter.stats.get("passed", [])
        for name, value in getattr(report, "user_properties", [])
        if name == "figure"
    ]
    if figures:
        terminalreporter.section("figures measured by the tests")
        for figure in figures:
            terminalreporter.line(str(figure))


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's ROHRPOST_* variables must not leak into tests or their subprocesses."""
    for name in list(os.environ):
        if name.startswith("ROHRPOST_") and not name.startswith("ROHRPOST_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """The AMQP URL of the RabbitMQ the tests use."""
    if url := os.environ.get("ROHRPOST_TEST_BROKER_URL"):
        yield url
        return
    if _answers(LOCAL_BROKER):
        yield LOCAL_BROKER
        return
    if _docker_runs():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer(RABBITMQ_IMAGE) as container:
            params = container.get_connection_params()
            credentials = f"{container.username}:{container.password}"
            yield f"amqp://{credentials}@{params.host}:{params.port}/%2F"
        return
    pytest.fail(
        "No RabbitMQ for the tests. Set ROHRPOST_TEST_BROKER_URL=amqp://user:pass@host:5672/%2F, "
        "or start one on 127.0.0.1:5672 (`rabbitmq-server -detached`), or install Docker so "
        "the tests can start a container.",
        pytrace=False,
    )


def _postgres_answers(url: str) -> bool:
    engine = create_engine(url)
    try:
        with engine.connect():
            return True
    except OperationalError:
        return False
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database URL whose user may create databases (one per test)."""
    if url := os.environ.get("ROHRPOST_TEST_DATABASE_URL"):
        yield url
        return
    if _postgres_answers(LOCAL_POSTGRES):
        yield LOCAL_POSTGRES
        return
    if _docker_runs():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer(POSTGRES_IMAGE, driver="psycopg") as container:
            yield container.get_connection_url()
        return
    pytest.fail(
        "No PostgreSQL for the tests. Set ROHRPOST_TEST_DATABASE_URL="
        "postgresql+psycopg://user@host:5432/db (a user that may CREATE DATABASE), or start "
        "one on 127.0.0.1:5432, or install Docker so the tests can start a container.",
        pytrace=False,
    )


def _redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The Redis holding the shared state of the tests' installations."""
    if url := os.environ.get("ROHRPOST_TEST_REDIS_URL"):
        yield url
        return
    if _redis_answers(LOCAL_REDIS):
        yield LOCAL_REDIS
        return
    if _docker_runs():
        from testcontainers.redis import RedisContainer

        with RedisContainer(REDIS_IMAGE) as container:
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(6379)}/0"
        return
    pytest.fail(
        "No Redis for the tests. Set ROHRPOST_TEST_REDIS_URL=redis://host:6379/0, or start "
        "one on 127.0.0.1:6379 (`redis-server --daemonize yes`), or install Docker so the "
        "tests can start a container.",
        pytrace=False,
    )


#: What a RabbitMQ user may configure, write and read (``rabbitmqctl set_permissions``).
Permissions = tuple[str, str, str]
EVERYTHING: Permissions = (".*", ".*", ".*")


@pytest.fixture
def broker_user(broker_url: str) -> Iterator[Callable[..., str]]:
    """RabbitMQ users of this test, deleted afterwards: ``make(password, permissions=…)``
    returns the broker URL that logs in as a new user (permissions on vhost ``/``)."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("needs a local rabbitmqctl to create a user")
    made: list[str] = []

    def make(password: str, permissions: Permissions = EVERYTHING) -> str:
        user = f"rp-test-{uuid.uuid4().hex[:8]}"
        ctl = ["rabbitmqctl", "-q"]
        subprocess.run([*ctl, "add_user", user, password], check=True, capture_output=True)
        made.append(user)
        subprocess.run(
            [*ctl, "set_permissions", "-p", "/", user, *permissions],
            check=True,
            capture_output=True,
        )
        parts = urlsplit(broker_url)
        host = parts.netloc.rpartition("@")[2]
        return parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}").geturl()

    yield make
    for user in made:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", user], check=False, capture_output=True)


def delete_redis_keys(url: str, namespace: str) -> None:
    """Delete every key of ``namespace`` from the shared state (the server outlives the run)."""
    state = SharedState(url)
    try:
        state.forget_namespace(namespace)
    finally:
        state.close()


@contextlib.contextmanager
def postgres_database(server_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        # also when the test failed: the server outlives the run
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty history store: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'history.db'}"
        return
    with postgres_database(request.getfixturevalue("postgres_url")) as url:
        yield url


@pytest.fixture
def store(store_url: str) -> Iterator[HistoryStore]:
    """A migrated history store on each backend."""
    opened = HistoryStore.open(store_url, migrate_schema=True)
    yield opened
    opened.close()


@pytest.fixture
def namespace() -> str:
    """A namespace of this test's own, so tests never see each other's queues."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def catcher() -> Iterator[MailCatcher]:
    """A real SMTP server on 127.0.0.1 that records what it receives."""
    with MailCatcher() as server:
        yield server


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    """An empty templates directory for this test."""
    path = tmp_path / "templates"
    path.mkdir()
    return path


def write_template(templates: Path, name: str, **parts: str) -> Path:
    """Write ``subject``/``text``/``html`` parts of template ``name`` for acme/billing."""
    folder = templates / "acme" / "billing" / name
    folder.mkdir(parents=True, exist_ok=True)
    for part, body in parts.items():
        (folder / f"{part}.j2").write_text(body)
    return folder


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def base_config(
    broker_url: str, namespace: str, templates: Path, smtp_port: int, redis_url: str = ""
) -> dict[str, Any]:
    """The configuration tests start from: tenant acme, app billing, fast backoff."""
    return {
        "broker_url": broker_url,
        "redis_url": redis_url,
        "namespace": namespace,
        "templates_dir": str(templates),
        "store_url": f"sqlite:///{templates.parent / 'history.db'}",
        "history_batch_wait": "50ms",
        "metrics_port": 0,
        "max_delay": "127s",
        "threads": 2,
        "prefetch": 50,
        "publish_timeout": "20s",
        "smtp": {"catcher": {"host": "127.0.0.1", "port": smtp_port, "timeout": "5s"}},
        "tenants": {
            "acme": {
                "apps": {
                    "billing": {
                        "smtp": "catcher",
                        "sender": "Acme Billing <billing@acme.example>",
                        "max_attempts": 3,
                        "backoff": {"base": "1s", "factor": 2, "jitter": 0},
                    }
                }
            }
        },
    }


@pytest.fixture
def make_settings(
    broker_url: str, redis_url: str, namespace: str, templates: Path, catcher: MailCatcher
) -> Iterator[Callable[..., Settings]]:
    """Build Settings for this test's namespace; deletes everything declared afterwards."""
    made: list[Settings] = []

    def make(**overrides: Any) -> Settings:
        base = base_config(broker_url, namespace, templates, catcher.port, redis_url)
        settings = settings_from_mapping(_merge(base, overrides))
        made.append(settings)
        return settings

    yield make
    with admin_channel(broker_url) as channel:
        for settings in made:
            Topology.from_settings(settings).delete(channel)
    delete_redis_keys(redis_url, namespace)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """The default test settings, with the topology declared."""
    settings = make_settings()
    declare(settings)
    return settings


def declare(settings: Settings) -> Topology:
    """Declare the topology of ``settings``."""
    topology = Topology.from_settings(settings)
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        topology.declare(channel)
    return topology


def write_config(settings: Settings, path: Path) -> Path:
    """Write ``settings`` as a TOML file a ``rohrpost`` process can read."""
    data = settings.model_dump(mode="json", exclude_none=True)
    data["broker_url"] = settings.broker_url.get_secret_value()
    data["store_url"] = settings.store_url.get_secret_value()
    data["redis_url"] = settings.redis_url.get_secret_value() if settings.redis_url else ""
    data["management_url"] = settings.management_url.get_secret_value()
    path.write_text(tomli_w.dumps(data))
    return path


def rohrpost_command(config: Path, *args: str) -> list[str]:
    """argv running the ``rohrpost`` command with ``config``."""
    return [
        sys.executable,
        "-m",
        "rohrpost",
        "--config",
        str(config),
        "--log-format",
        "json",
        *args,
    ]


def stop_process(process: subprocess.Popen[str], timeout: float = 60) -> tuple[str, str]:
    """SIGTERM ``process`` and return its (stdout, stderr) once it exited.

    One that does not exit within ``timeout`` is killed with its whole process group
    (start it with ``start_new_session=True``, so a supervisor's children go too) and
    fails the test with the end of its stderr: nothing keeps running into later tests.
    """
    process.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{process.args!r} did not exit {timeout:g}s after SIGTERM: {stderr[-3000:]}")
    return stdout, stderr


def drain(settings: Settings, **worker_options: Any) -> None:
    """Run a worker until the send and delay queues are empty."""
    SendWorker(settings, **worker_options).run(drain=True)


class WorkerThread:
    """A SendWorker running in a background thread until ``stop()``."""

    def __init__(self, settings: Settings, **options: Any) -> None:
        self.worker = SendWorker(settings, **options)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-worker")

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:
            self.error = exc

    def start(self) -> WorkerThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.worker.stop()
        self._thread.join(30)
        assert not self._thread.is_alive(), "worker did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def worker_thread(
    make_settings: Callable[..., Settings],
) -> Iterator[Callable[..., WorkerThread]]:
    """Start workers in threads; each is stopped before the namespace is deleted."""
    started: list[WorkerThread] = []

    def start(settings: Settings, **options: Any) -> WorkerThread:
        handle = WorkerThread(settings, **options).start()
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


class EventLog:
    """A quorum queue bound to the events exchange, read on demand."""

    def __init__(self, settings: Settings) -> None:
        self._url = settings.broker_url.get_secret_value()
        self.queue = f"{settings.namespace}.test-events"
        with admin_channel(self._url) as channel:
            channel.queue_declare(self.queue, durable=True, arguments={"x-queue-type": "quorum"})
            channel.queue_bind(self.queue, f"{settings.namespace}.events", "#")
        self.events: list[MailEvent] = []

    def read(self) -> list[MailEvent]:
        """Every event published so far (accumulated over calls)."""
        with admin_channel(self._url) as channel:
            while True:
                method, props, body = channel.basic_get(self.queue, auto_ack=True)
                if method is None:
                    break
                if props.type == BATCH_TYPE:  # workers publish their events in batches
                    self.events.extend(MailEvent.model_validate(e) for e in json.loads(body))
                else:
                    self.events.append(MailEvent.model_validate_json(body))
        return self.events

    def delete(self) -> None:
        with admin_channel(self._url) as channel:
            channel.queue_delete(self.queue)


@pytest.fixture
def event_log(settings: Settings) -> Iterator[EventLog]:
    """Events of this test's namespace (topology declared)."""
    log = EventLog(settings)
    yield log
    log.delete()


def dead_letters(settings: Settings, tenant: str = "acme", app: str = "billing") -> list[Any]:
    """Every message in tenant/app's dead-letter queue as (properties, body), removed."""
    found = []
    queue = Topology.from_settings(settings).dead_queue(tenant, app)
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((properties, body))


def publish_raw(
    settings: Settings,
    routing_key: str,
    body: bytes,
    exchange: str = "",
    properties: pika.BasicProperties | None = None,
) -> None:
    """Publish bytes as any client could, with confirms."""
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        channel.confirm_delivery()
        channel.basic_publish(
            exchange,
            routing_key,
            body,
            properties or pika.BasicProperties(delivery_mode=2),
            mandatory=True,
        )


def get(url: str) -> tuple[int, str]:
    """HTTP GET: (status, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def wait_until(condition: Callable[[], Any], timeout: float = 60) -> Any:
    """Poll ``condition`` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.2)
    return result
