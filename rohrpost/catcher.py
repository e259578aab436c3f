"""A local SMTP server that keeps what it receives, and can be told to misbehave.

Used by ``rohrpost demo`` and by the tests: a real SMTP conversation over TCP
(aiosmtpd), with scripted replies per recipient (``421`` twice, then accept; always
``550``), a sending limit answered with throttling replies, and optional latency, so
failure handling is tested against a real server; it counts connections open at once.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

Stage = Literal["rcpt", "data"]


@dataclass(frozen=True)
class CaughtMail:
    """One message the catcher accepted."""

    envelope_from: str
    recipients: tuple[str, ...]
    data: bytes
    received_at: float
    smtputf8: bool = False  # MAIL FROM carried SMTPUTF8

    def parsed(self) -> EmailMessage:
        """The message parsed with the modern email API (decoded headers)."""
        message = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        return message


@dataclass(frozen=True)
class Attempt:
    """One transaction the catcher saw, accepted or not."""

    recipient: str
    reply: str
    at: float


class _Handler:
    def __init__(self, catcher: MailCatcher) -> None:
        self._catcher = catcher

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self._catcher.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, _options: Any
    ) -> str:
        reply = self._catcher._scripted(address, "rcpt") or self._catcher._throttled()
        if reply is not None:
            self._catcher._note(address, reply)
            self._close_if_421(server, reply)
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self._catcher.latency:
            await asyncio.sleep(self._catcher.latency)
        for address in envelope.rcpt_tos:
            reply = self._catcher._scripted(address, "data")
            if reply is not None:
                self._catcher._note(address, reply)
                self._close_if_421(server, reply)
                return reply
        self._catcher._accept(envelope)
        return "250 2.0.0 Ok: queued"

    @staticmethod
    def _close_if_421(server: Any, reply: str) -> None:
        # A real server closes the connection after 421; so does this one.
        if reply.startswith("421") and server.transport is not None:
            asyncio.get_running_loop().call_later(0.01, server.transport.close)


class _CountingSMTP(SMTP):
    """aiosmtpd's server, telling the catcher when a connection opens and closes."""

    def __init__(self, catcher: MailCatcher, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._catcher = catcher

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._catcher._connected(+1)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._catcher._connected(-1)
        super().connection_lost(error)


class _Controller(Controller):
    def __init__(self, catcher: MailCatcher, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._catcher = catcher

    def factory(self) -> SMTP:
        return _CountingSMTP(self._catcher, self.handler, **self.SMTP_kwargs)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class MailCatcher:
    """An SMTP server on 127.0.0.1 that records mail; use as a context manager."""

    def __init__(
        self,
        port: int = 0,
        *,
        latency: float = 0.0,
        pipelining: bool = False,
        smtputf8: bool = True,
        login: tuple[str, str] | None = None,
    ) -> None:
        """``pipelining``: advertise RFC 2920 PIPELINING, as Postfix does.

        ``smtputf8``: offer RFC 6531 SMTPUTF8 (UTF-8 addresses and headers); without
        it, non-ASCII in a command is refused, as a strict ASCII server would.
        ``login``: offer AUTH (without TLS) and accept this user and password.
        """
        self.latency = latency
        self.pipelining = pipelining
        self.smtputf8 = smtputf8
        self.login = login
        self._requested_port = port
        self._controller: Controller | None = None
        self._cond = threading.Condition()
        self._mails: list[CaughtMail] = []
        self._attempts: list[Attempt] = []
        self._scripts: dict[tuple[str, Stage], deque[str]] = defaultdict(deque)
        self._always: dict[tuple[str, Stage], str] = {}
        self._open = 0
        self._peak = 0
        self._throttle: tuple[float, str] | None = None
        self._admitted: deque[float] = deque()  # recipients let through lately (throttle)

    @property
    def port(self) -> int:
        """The port the server listens on."""
        assert self._controller is not None, "catcher not started"
        return int(self._controller.port)

    def start(self) -> MailCatcher:
        """Start listening (on a free port unless one was given)."""
        for _ in range(5):
            port = self._requested_port or free_port()
            auth: dict[str, Any] = {}
            if self.login is not None:
                auth = {"authenticator": self._authenticate, "auth_require_tls": False}
            controller = _Controller(
                self,
                _Handler(self),
                hostname="127.0.0.1",
                port=port,
                enable_SMTPUTF8=self.smtputf8,
                **auth,
            )
            try:
                controller.start()
            except OSError:  # another process took the free port first
                if self._requested_port:
                    raise
                continue
            self._controller = controller
            return self
        raise OSError("mail catcher: found no free port")

    def stop(self) -> None:
        """Stop listening."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> MailCatcher:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def script(self, recipient: str, replies: Iterable[str], stage: Stage = "data") -> None:
        """Answer the next transactions for ``recipient`` with ``replies``, then accept."""
        with self._cond:
            self._scripts[(recipient.lower(), stage)].extend(replies)

    def always(self, recipient: str, reply: str, stage: Stage = "rcpt") -> None:
        """Answer every transaction for ``recipient`` with ``reply``."""
        with self._cond:
            self._always[(recipient.lower(), stage)] = reply

    def throttle(self, rate: float, reply: str = "421 4.7.0 rate limit exceeded") -> None:
        """Answer ``reply`` to every recipient beyond ``rate`` per second (over the last second).

        As a provider with a sending limit does; a reply starting ``421`` closes the
        connection, as a real server does.
        """
        with self._cond:
            self._throttle = (rate, reply)

    @property
    def peak_connections(self) -> int:
        """The most connections that were open at once so far."""
        with self._cond:
            return self._peak

    @property
    def mails(self) -> list[CaughtMail]:
        """Every accepted mail so far."""
        with self._cond:
            return list(self._mails)

    @property
    def attempts(self) -> list[Attempt]:
        """Every transaction so far, accepted or refused, in order."""
        with self._cond:
            return list(self._attempts)

    def wait_for(
        self, predicate: Callable[[list[CaughtMail]], bool], timeout: float = 30.0
    ) -> list[CaughtMail]:
        """Block until ``predicate(mails)`` holds; raise TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self._mails):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"mail catcher: condition not met; {len(self._mails)} mails")
                self._cond.wait(remaining)
            return list(self._mails)

    def _authenticate(self, *args: Any) -> AuthResult:
        credentials = args[-1]  # (server, session, envelope, mechanism, credentials)
        expected = tuple(part.encode() for part in self.login or ())
        given = (
            (credentials.login, credentials.password)
            if isinstance(credentials, LoginPassword)
            else None
        )
        return AuthResult(success=given == expected)

    def _scripted(self, recipient: str, stage: Stage) -> str | None:
        key = (recipient.lower(), stage)
        with self._cond:
            if key in self._always:
                return self._always[key]
            script = self._scripts.get(key)
            return script.popleft() if script else None

    def _connected(self, change: int) -> None:
        with self._cond:
            self._open += change
            self._peak = max(self._peak, self._open)

    def _throttled(self) -> str | None:
        """The throttling reply if this recipient is one too many this second, else None."""
        with self._cond:
            if self._throttle is None:
                return None
            rate, reply = self._throttle
            now = time.monotonic()
            while self._admitted and now - self._admitted[0] >= 1.0:
                self._admitted.popleft()
            if len(self._admitted) >= rate:
                return reply
            self._admitted.append(now)
            return None

    def _note(self, recipient: str, reply: str) -> None:
        with self._cond:
            self._attempts.append(Attempt(recipient, reply, time.time()))

    def _accept(self, envelope: Any) -> None:
        data = envelope.original_content or envelope.content
        mail = CaughtMail(
            envelope.mail_from,
            tuple(envelope.rcpt_tos),
            bytes(data),
            time.time(),
            bool(envelope.smtp_utf8),
        )
        with self._cond:
            for recipient in mail.recipients:
                self._attempts.append(Attempt(recipient, "250", mail.received_at))
            self._mails.append(mail)
            self._cond.notify_all()
