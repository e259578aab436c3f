"""Serving the console with uvicorn: ``rohrpost console``, and as a child of ``rohrpost run``."""

from __future__ import annotations

import ipaddress
import signal
import socket
import threading
from typing import Any

import uvicorn

from rohrpost.console.app import create_app
from rohrpost.shared.errors import ConfigError
from rohrpost.shared.logs import configure_logging, get_logger
from rohrpost.shared.settings import Settings

log = get_logger(__name__)


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(settings: Settings, host: str) -> None:
    """ConfigError when the console would listen beyond this machine with no user configured."""
    if not settings.console.users and not is_loopback(host):
        raise ConfigError(
            f"the console refuses to listen on {host} while no user is configured: add "
            "[console.users.NAME] with role and password_hash (`rohrpost console "
            "hash-password`), or listen on 127.0.0.1"
        )


def server(
    settings: Settings, *, host: str | None = None, port: int | None = None
) -> uvicorn.Server:
    """A uvicorn server for the console (not started)."""
    host = host or settings.console.host
    check_binding(settings, host)
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=settings.console.port if port is None else port,
        root_path=settings.console.root_path,
        proxy_headers=True,
        forwarded_allow_ips=settings.console.forwarded_allow_ips,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=30,
    )
    return uvicorn.Server(config)


def url_of(server_: uvicorn.Server) -> str:
    """Where a started server answers."""
    config = server_.config
    port = config.port
    for listener in getattr(server_, "servers", []):
        for sock in listener.sockets:
            port = sock.getsockname()[1]
    host = config.host if ":" not in config.host else f"[{config.host}]"
    return f"http://{host}:{port}{config.root_path}/"


def serve(settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    """Run the console in this process until SIGTERM or Ctrl-C.

    ConfigError when it cannot listen (a port in use, an address not of this machine):
    bound here, since uvicorn would only log that and exit with status 3.
    """
    running = server(settings, host=host, port=port)
    config = running.config
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    try:
        listening = socket.create_server((config.host.strip("[]"), config.port), family=family)
    except OSError as exc:
        raise ConfigError(
            f"the console cannot listen on {config.host}:{config.port}: "
            f"{exc.strerror or exc}; choose another with --host/--port or [console] host/port"
        ) from exc
    port = listening.getsockname()[1]
    shown = config.host if ":" not in config.host else f"[{config.host.strip('[]')}]"
    # (uvicorn, given the socket, no longer says where it listens)
    log.info(
        "console starting",
        host=config.host,
        port=port,
        url=f"http://{shown}:{port}{config.root_path}/",
    )
    running.run(sockets=[listening])


class ConsoleThread:
    """The console served from a thread of this process (the demo, the tests)."""

    def __init__(self, settings: Settings, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = server(settings, host=host, port=port)
        self.server.config.install_signal_handlers = False  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self.server.run, name="console", daemon=True)

    def start(self) -> ConsoleThread:
        """Start serving; return once the server listens."""
        self._thread.start()
        while not self.server.started and self._thread.is_alive():
            threading.Event().wait(0.05)
        if not self.server.started:
            raise OSError(f"the console could not listen on port {self.server.config.port}")
        return self

    @property
    def url(self) -> str:
        """Where it answers."""
        return url_of(self.server)

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.should_exit = True
        self._thread.join(30)


def console_main(settings: Settings, drain: bool, workers_done: Any) -> None:
    """A child of ``rohrpost run --console``; in drain mode it ends with the workers."""
    from rohrpost.shared.metrics import Metrics

    configure_logging(settings.log_level, settings.log_format, settings.secrets())
    running = server(settings)
    running.config.install_signal_handlers = False  # type: ignore[attr-defined]
    metrics = Metrics()  # multiprocess mode: the supervisor sums
    metrics.keeps_no_limits()
    ready = metrics.ready.labels("console")

    def stop(*_args: object) -> None:
        running.should_exit = True

    def watch() -> None:
        while not running.should_exit:
            if running.started:
                ready.set(1)
            if drain and workers_done.is_set():
                running.should_exit = True
            threading.Event().wait(0.2)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=watch, name="console-watch", daemon=True).start()
    running.run()
