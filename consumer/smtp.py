"""SMTP transport: one reused connection per server, outcomes translated to our errors.

Connection-level failures (refused, timeout, bad greeting, failed login) are
transient: they are not the mail's fault. Replies to the mail itself are classified
by code: 4xx transient, 5xx permanent. A server answering 421 closes the connection,
so the next mail opens a fresh one.
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Mapping, Sequence
from typing import Protocol

from shared.errors import (
    DeliveryError,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from shared.settings import SmtpServer


class Transport(Protocol):
    """Sends one finished message; raises a DeliveryError subclass on failure."""

    def send(
        self, server: str, envelope_from: str, recipients: Sequence[str], message: bytes
    ) -> str:
        """Send ``message``; return the server's final reply (e.g. ``250 2.0.0 queued``)."""
        ...

    def close(self) -> None:
        """Close any open connections."""
        ...


def _reply(code: int, text: bytes | str) -> str:
    decoded = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return f"{code} {' '.join(decoded.split())}"


def classify(code: int, text: bytes | str, stage: str) -> DeliveryError:
    """Our error for an SMTP reply ``code`` at ``stage`` (MAIL, RCPT, DATA)."""
    reply = f"{stage}: {_reply(code, text)}"
    if 400 <= code < 500:
        return TransientDeliveryError(reply, code)
    return PermanentDeliveryError(reply, code)


class SmtpTransport:
    """Real SMTP over smtplib; not thread-safe, so each sender thread owns one."""

    def __init__(self, servers: Mapping[str, SmtpServer]) -> None:
        self._servers = servers
        self._connections: dict[str, smtplib.SMTP] = {}

    def send(
        self, server: str, envelope_from: str, recipients: Sequence[str], message: bytes
    ) -> str:
        """Send over ``server``'s connection, reconnecting once if a reused one went stale."""
        reused = server in self._connections
        connection = self._connection(server)
        try:
            return self._transaction(connection, envelope_from, recipients, message)
        except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
            self._drop(server)
            if reused:
                return self.send(server, envelope_from, recipients, message)
            raise TransientDeliveryError(f"server disconnected: {exc}") from exc
        except DeliveryError as exc:
            if exc.code == 421:
                self._drop(server)
            else:
                self._reset(server)
            raise
        except (OSError, smtplib.SMTPException) as exc:
            self._drop(server)
            raise TransientDeliveryError(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """Say QUIT to every server and forget the connections."""
        for server in list(self._connections):
            connection = self._connections.pop(server)
            try:
                connection.quit()
            except (OSError, smtplib.SMTPException):
                connection.close()

    @staticmethod
    def _transaction(
        connection: smtplib.SMTP, envelope_from: str, recipients: Sequence[str], message: bytes
    ) -> str:
        # smtplib.sendmail does not return the DATA reply (the queue id we record),
        # so the three steps are spelled out.
        options = (
            ["SMTPUTF8"]
            if not envelope_from.isascii() or not all(r.isascii() for r in recipients)
            else []
        )
        code, text = connection.mail(envelope_from, options)
        if code != 250:
            raise classify(code, text, "MAIL FROM")
        refused: list[tuple[int, bytes, str]] = []
        for recipient in recipients:
            code, text = connection.rcpt(recipient)
            if code not in (250, 251):
                refused.append((code, text, recipient))
        if len(refused) == len(recipients):
            code, text, _ = max(refused)  # a permanent refusal outranks a transient one
            raise classify(code, text, "RCPT TO")
        code, text = connection.data(message)
        if code != 250:
            raise classify(code, text, "DATA")
        reply = _reply(code, text)
        if refused:
            # Retrying would send a duplicate to everyone who accepted; record instead.
            reply += "; refused: " + ", ".join(f"{r} ({_reply(c, t)})" for c, t, r in refused)
        return reply

    def _connection(self, name: str) -> smtplib.SMTP:
        connection = self._connections.get(name)
        if connection is None:
            connection = self._connect(self._servers[name])
            self._connections[name] = connection
        return connection

    @staticmethod
    def _connect(server: SmtpServer) -> smtplib.SMTP:
        timeout = server.timeout.total_seconds()
        where = f"{server.host}:{server.port}"
        try:
            connection: smtplib.SMTP
            if server.security == "tls":
                connection = smtplib.SMTP_SSL(
                    server.host,
                    server.port,
                    timeout=timeout,
                    context=ssl.create_default_context(),
                )
            else:
                connection = smtplib.SMTP(server.host, server.port, timeout=timeout)
            connection.ehlo()
            if server.security == "starttls":
                connection.starttls(context=ssl.create_default_context())
                connection.ehlo()
            password = server.password()
            if server.user is not None and password is not None:
                connection.login(server.user, password.get_secret_value())
        except smtplib.SMTPResponseException as exc:
            raise TransientDeliveryError(
                f"{where}: {_reply(exc.smtp_code, exc.smtp_error)}", exc.smtp_code
            ) from exc
        except (OSError, smtplib.SMTPException) as exc:
            raise TransientDeliveryError(f"{where}: {type(exc).__name__}: {exc}") from exc
        return connection

    def _reset(self, name: str) -> None:
        connection = self._connections.get(name)
        if connection is None:
            return
        try:
            connection.rset()
        except (OSError, smtplib.SMTPException):
            self._drop(name)

    def _drop(self, name: str) -> None:
        connection = self._connections.pop(name, None)
        if connection is not None:
            connection.close()
