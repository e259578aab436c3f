"""A RabbitMQ cluster of three extra nodes on this machine, for `python -m bench cluster`.

Each node has its own name (``rohrpost-cluster-N@localhost``), AMQP and distribution
ports, and data and log directories under ``/var/tmp/rohrpost-cluster``, owned by the
``rabbitmq`` user (a node that cannot write there stops without a word), and runs as
that user, so all share its Erlang cookie. The machine's own node (``rabbit@…``, which
other programs use) is never part of this cluster: nodes 2 and 3 join node 1, so
killing a node or tearing the cluster down cannot cost that node its quorum, and
nothing here resets it.

Everything this module starts it finds again from files in the base directory, so
``teardown()`` also cleans up after an interrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

BASE = Path("/var/tmp/rohrpost-cluster")
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_HOME = Path("/var/lib/rabbitmq")  # holds the .erlang.cookie every node shares
PREFIX = "rohrpost-cluster-"


class ClusterError(RuntimeError):
    """A step of setting up or tearing down the cluster failed."""


def _run(argv: list[str], env: dict[str, str], timeout: float = 120) -> str:
    """Run a RabbitMQ tool as the rabbitmq user; its output, or ClusterError."""
    try:
        result = subprocess.run(
            argv,
            env=env,
            cwd=RABBITMQ_HOME,
            user="rabbitmq",
            group="rabbitmq",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"{' '.join(argv[1:])}: no answer within {timeout:g}s") from exc
    if result.returncode != 0:
        raise ClusterError(f"{' '.join(argv[1:])}: {(result.stderr or result.stdout).strip()}")
    return result.stdout


@dataclass(frozen=True)
class Node:
    """One extra node: its name, ports and directories (under ``base``, by default this
    cluster's; tests/ownnode.py gives a node of its own a temporary one)."""

    index: int
    amqp_port: int
    base: Path = BASE
    prefix: str = PREFIX
    #: Erlang distribution port; 0: ``amqp_port + 20000``
    dist: int = 0

    @property
    def name(self) -> str:
        return f"{self.prefix}{self.index}@localhost"

    @property
    def dist_port(self) -> int:
        return self.dist or self.amqp_port + 20000

    @property
    def home(self) -> Path:
        return self.base / f"node{self.index}"

    @property
    def pid_file(self) -> Path:
        return self.home / "pid"

    def url(self, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.amqp_port}/%2F"

    def env(self) -> dict[str, str]:
        """The environment of this node's server and of the tools that talk to it."""
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(RABBITMQ_HOME),
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(self.home / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.home / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.home / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.home / "data"),
            "RABBITMQ_LOG_BASE": str(self.home / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def ctl(self, *args: str, timeout: float = 120) -> str:
        """``rabbitmqctl -n NODE ARGS``."""
        argv = [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *args]
        return _run(argv, self.env(), timeout)

    def prepare(self) -> None:
        """Create the node's files, owned by the rabbitmq user."""
        for sub in ("data", "log"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        (self.home / "rabbitmq-env.conf").write_text("# no settings: the environment has them\n")
        (self.home / "enabled_plugins").write_text("[].\n")  # no management or Prometheus port
        (self.home / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        shutil.chown(self.base, "rabbitmq", "rabbitmq")
        for path in [self.home, *self.home.rglob("*")]:
            shutil.chown(path, "rabbitmq", "rabbitmq")

    def start(self) -> None:
        """Start the node in the background and wait until it serves AMQP."""
        self.pid_file.unlink(missing_ok=True)
        _run([str(RABBITMQ_BIN / "rabbitmq-server"), "-detached"], self.env())
        self.wait_until_started()

    def wait_until_started(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.pid_file.exists():
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.name} did not start; see {self.home / 'log'}")
            time.sleep(0.2)
        self.ctl("wait", "--timeout", str(int(timeout)), str(self.pid_file), timeout=timeout + 10)
        while not _answers(self.amqp_port):
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.name} does not accept AMQP on {self.amqp_port}")
            time.sleep(0.2)

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, 0)
            return pid
        return None

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM, as a crash or the OOM killer would."""
        pid = self.pid()
        if pid is None:
            raise ClusterError(f"{self.name} is not running")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.pid() is not None and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the node: gracefully if it answers, else SIGKILL (its own process only)."""
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ClusterError):
            self.ctl("stop", str(self.pid_file), timeout=60)
        if self.pid() is not None:
            os.kill(pid, signal.SIGKILL)

    def connections(self) -> list[str]:
        """The client-given names of the AMQP connections this node serves."""
        listing = self.ctl("list_connections", "port", "client_properties", "--formatter", "json")
        names = []
        for connection in json.loads(listing or "[]"):
            # rabbitmqctl lists the whole cluster's connections; each node has its own port
            if connection.get("port") != self.amqp_port:
                continue
            properties = dict(_pairs(connection.get("client_properties", [])))
            names.append(str(properties.get("connection_name", "?")))
        return names


def _pairs(properties: Any) -> list[tuple[str, Any]]:
    """client_properties as rabbitmqctl's JSON gives them: a list of [key, type, value]."""
    if isinstance(properties, dict):
        return list(properties.items())
    return [(item[0], item[-1]) for item in properties if isinstance(item, list) and item]


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


class LocalCluster:
    """Three extra nodes: node 1 first, then 2 and 3 joined to it."""

    def __init__(self, first_port: int = 5681) -> None:
        self.nodes = [Node(index, first_port + index - 1) for index in (1, 2, 3)]

    def urls(self) -> list[str]:
        return [node.url() for node in self.nodes]

    def up(self) -> None:
        """Start the three nodes and form the cluster (after removing any leftovers)."""
        self.teardown()
        for node in self.nodes:
            if _answers(node.amqp_port) or _answers(node.dist_port):
                raise ClusterError(f"port {node.amqp_port} or {node.dist_port} is in use")
            node.prepare()
            node.start()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        running = self.running(first)
        if running != {node.name for node in self.nodes}:
            raise ClusterError(f"the cluster did not form: running nodes {sorted(running)}")

    def running(self, asking: Node) -> set[str]:
        """The running nodes of the cluster, as ``asking`` sees them."""
        status = json.loads(asking.ctl("cluster_status", "--formatter", "json"))
        return set(status.get("running_nodes", []))

    def members(self, asking: Node, prefix: str) -> dict[str, tuple[list[str], list[str]]]:
        """(members, online members) of every queue whose name starts with ``prefix``."""
        listing = asking.ctl("list_queues", "name", "members", "online", "--formatter", "json")
        return {
            queue["name"]: (sorted(queue.get("members") or []), sorted(queue.get("online") or []))
            for queue in json.loads(listing or "[]")
            if queue["name"].startswith(prefix)
        }

    def rejoined(self, node: Node, prefix: str) -> bool:
        """``node`` runs in the cluster again and is online in every queue of ``prefix``."""
        asking = next(other for other in self.nodes if other is not node)
        try:
            if node.name not in self.running(asking):
                return False
            queues = self.members(asking, prefix)
        except ClusterError:
            return False
        return all(node.name in online for _members, online in queues.values())

    def teardown(self) -> None:
        """Stop every extra node and delete its files; the machine's own node is untouched."""
        for node in reversed(self.nodes):
            node.stop()
        shutil.rmtree(BASE, ignore_errors=True)


def default_node_check() -> dict[str, Any]:
    """The machine's own node after the run: alone in its cluster, serving quorum queues
    and streams (declared, then deleted). A failed check is reported, not raised."""
    try:
        status = json.loads(
            subprocess.run(
                ["rabbitmqctl", "cluster_status", "--formatter", "json"],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
        )
        disk = sorted(status.get("disk_nodes", []))
        report: dict[str, Any] = {"disk_nodes": disk, "running": status.get("running_nodes")}
        if any(name.startswith(PREFIX) for name in disk):
            report["error"] = "the default node lists extra nodes as members"
            return report
        params = pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2F")
        params.socket_timeout = params.stack_timeout = 30
        with contextlib.closing(pika.BlockingConnection(params)) as connection:
            channel = connection.channel()
            for kind in ("quorum", "stream"):
                name = f"rohrpost-cluster-check.{kind}.{os.getpid()}"
                channel.queue_declare(name, durable=True, arguments={"x-queue-type": kind})
                channel.queue_delete(name)
        report["declared and deleted"] = "a quorum queue and a stream"
    except (OSError, ValueError, subprocess.SubprocessError, pika.exceptions.AMQPError) as exc:
        return {"error": f"the default node did not pass the check: {exc!r}"}
    return report
