"""A RabbitMQ node of the test's own, for what must not be done to the shared broker.

Resource alarms (``set_vm_memory_high_watermark``, ``set_disk_free_limit``) are global
to a node: set on the broker other tests and programs use, they would block every
publisher on it. So the tests that raise one start a node of their own (bench's
``Node``, as ``python -m bench cluster`` starts its nodes), on free ports, with its data
in a temporary directory owned by the ``rabbitmq`` user, and stop it and delete that
directory afterwards. It needs root and a local RabbitMQ installation; elsewhere those
tests are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.rabbitnodes import RABBITMQ_BIN, Node


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


class OwnNode:
    """One RabbitMQ node: ``url``, and ``ctl(...)`` for rabbitmqctl against it."""

    def __init__(self) -> None:
        self._base = Path(tempfile.mkdtemp(prefix="rohrpost-node-"))
        self._node = Node(
            0,
            _free_port(),
            base=self._base,
            prefix=f"rohrpost-test-{os.getpid()}-",
            dist=_free_port(),  # a free AMQP port + 20000 may lie beyond 65535
        )
        self.url = self._node.url()

    def ctl(self, *args: str) -> str:
        """``rabbitmqctl -n NODE ARGS`` (as the rabbitmq user)."""
        return self._node.ctl(*args)

    def start(self) -> None:
        self._node.prepare()
        self._node.start()

    def stop(self) -> None:
        self._node.stop()
        shutil.rmtree(self._base, ignore_errors=True)


@contextlib.contextmanager
def own_node() -> Iterator[OwnNode]:
    """A started node of our own, stopped and deleted afterwards."""
    node = OwnNode()
    try:
        node.start()
        yield node
    finally:
        node.stop()
