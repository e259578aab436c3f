"""A TCP proxy for tests: freeze a connection as a dying peer would, then cut it.

The broker confirms a publish within a millisecond, so closing a connection from
outside rarely catches a publish in flight. Between client and broker, this proxy
can stop passing bytes either way while the client keeps writing (as when a broker
node dies), and then drop every connection: whatever the client published meanwhile
never reached the broker and is unconfirmed when the connection is lost, every time.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from urllib.parse import urlsplit


def node_url(url: str, port: int) -> str:
    """``url`` with another port on 127.0.0.1, its credentials kept: a node of the same
    "cluster", or the URL that reaches ``url``'s server through a proxy on ``port``."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@127.0.0.1:{port}" if auth else f"127.0.0.1:{port}"
    return parts._replace(netloc=netloc).geturl()


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; use as a context manager."""

    def __init__(
        self, target_host: str, target_port: int, port: int = 0, *, chunk_pause: float = 0.0
    ) -> None:
        """``chunk_pause``: seconds to wait after passing each chunk (up to 64 KiB) — a
        slow link, or a busy broker streaming a big message."""
        self._target = (target_host, target_port)
        self._chunk_pause = chunk_pause
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        self.connections = 0

    def __enter__(self) -> TcpProxy:
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.kill()

    def kill(self) -> None:
        """Die as a broker node does: drop every connection and refuse new ones."""
        self._closed = True
        # shutdown wakes the accept() under way; close alone lets it take one more
        # connection (a client reconnecting at once got through a "dead" node)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.drop()

    def freeze(self) -> None:
        """Stop passing bytes either way; they wait in the proxy until ``drop`` loses them."""
        self._flowing.clear()

    def drop(self) -> None:
        """Close every proxied connection at once, both sides; held bytes are lost."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._flowing.set()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._closed:
                client.close()
                return
            try:
                server = socket.create_connection(self._target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
                self.connections += 1
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
                if self._chunk_pause:
                    time.sleep(self._chunk_pause)
        # One side ended: end the proxied connection on both.
        with self._lock:
            self._sockets = [s for s in self._sockets if s not in (source, sink)]
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
