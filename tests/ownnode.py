"""A RabbitMQ node of the test's own, for what must not be done to the shared broker.

Resource alarms (``set_vm_memory_high_watermark``, ``set_disk_free_limit``) are global
to a node: set on the broker other tests and programs use, they would block every
publisher on it. So the tests that raise one start a node of their own, on free ports,
with its data in a temporary directory owned by the ``rabbitmq`` user, and stop it and
delete that directory afterwards. It needs root and a local RabbitMQ installation;
elsewhere those tests are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_HOME = Path("/var/lib/rabbitmq")  # its .erlang.cookie lets rabbitmqctl in


def why_not() -> str | None:
    """Why no node of our own can be started here; None when one can."""
    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        return f"needs a local RabbitMQ installation ({RABBITMQ_BIN})"
    if os.geteuid() != 0:
        return "needs root to start a RabbitMQ node as the rabbitmq user"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


class OwnNode:
    """One RabbitMQ node: ``url``, and ``ctl(...)`` for rabbitmqctl against it."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.name = f"rohrpost-test-{os.getpid()}-{self.port}@localhost"
        self.home = Path(tempfile.mkdtemp(prefix="rohrpost-node-"))
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def env(self) -> dict[str, str]:
        home = self.home
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(RABBITMQ_HOME),
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(_free_port()),
            "RABBITMQ_CONF_ENV_FILE": str(home / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(home / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(home / "data"),
            "RABBITMQ_LOG_BASE": str(home / "log"),
            "RABBITMQ_PID_FILE": str(home / "pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def _run(self, argv: list[str], timeout: float = 120) -> str:
        result = subprocess.run(
            argv,
            env=self._env,
            cwd=RABBITMQ_HOME,
            user="rabbitmq",
            group="rabbitmq",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[1:])}: {(result.stderr or result.stdout).strip()}")
        return result.stdout

    def ctl(self, *args: str) -> str:
        """``rabbitmqctl -n NODE ARGS`` (as the rabbitmq user)."""
        return self._run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *args])

    def start(self) -> None:
        self._env = self.env()
        for sub in ("data", "log"):
            (self.home / sub).mkdir()
        (self.home / "rabbitmq-env.conf").write_text("# the environment has the settings\n")
        (self.home / "enabled_plugins").write_text("[].\n")  # no management port
        (self.home / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\nlog.console = false\n"
        )
        for path in [self.home, *self.home.rglob("*")]:
            shutil.chown(path, "rabbitmq", "rabbitmq")
        self._run([str(RABBITMQ_BIN / "rabbitmq-server"), "-detached"])
        deadline = time.monotonic() + 120
        while not (self.home / "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.ctl("wait", "--timeout", "120", str(self.home / "pid"))
        while not _answers(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} does not accept AMQP; see {self.home / 'log'}")
            time.sleep(0.2)

    def stop(self) -> None:
        try:
            self.ctl("stop", str(self.home / "pid"))
        except (RuntimeError, subprocess.SubprocessError, AttributeError):
            with contextlib.suppress(OSError, ValueError):  # its own VM only, by its pid file
                os.kill(int((self.home / "pid").read_text().strip()), signal.SIGKILL)
        shutil.rmtree(self.home, ignore_errors=True)


@contextlib.contextmanager
def own_node() -> Iterator[OwnNode]:
    """A started node of our own, stopped and deleted afterwards."""
    node = OwnNode()
    try:
        node.start()
        yield node
    finally:
        node.stop()
