"""SMTP transport: one reused connection per server, outcomes translated to our errors.

Connection-level failures (refused, timeout, bad greeting, failed login) are
transient: they are not the mail's fault. Replies to the mail itself are classified
by code: 4xx transient, 5xx permanent; a 4xx that says the client sends too fast
(``is_throttling``) is a throttling reply, which the worker answers by slowing
down, not by spending an attempt. A server answering 421 closes the connection,
so the next mail opens a fresh one. A mail that needs SMTPUTF8 (an address whose
local part is not ASCII) is not sent to a server that does not offer it:
UnencodableMail, before any command.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import ssl
from collections.abc import Mapping, Sequence
from typing import Protocol

from rohrpost.shared.errors import (
    DeliveryError,
    PermanentDeliveryError,
    ThrottledDeliveryError,
    TransientDeliveryError,
    UnencodableMail,
)
from rohrpost.shared.settings import SmtpServer

#: Replies that say "too fast" when their text does (RFC 3463's 4.7.x, or words).
_THROTTLING_CODES = (421, 451, 454)
_THROTTLING_TEXT = re.compile(
    r"\b4\.7\.\d{1,3}\b|rate|throttl|too many|too fast|slow down|limit", re.IGNORECASE
)
# SMTP's end-of-data is a line holding one dot, so a line starting with one gets two.
_DOT_AT_LINE_START = re.compile(rb"(?m)^\.")


class Transport(Protocol):
    """Sends one finished message; raises a DeliveryError subclass or UnencodableMail."""

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


def _reply_or_raise(connection: smtplib.SMTP, command: str) -> tuple[int, bytes]:
    """The reply to ``command``; a 421 is raised at once (the server is closing)."""
    code, text = connection.getreply()
    if code == 421:
        raise classify(code, text, command.split(":", maxsplit=1)[0])
    return code, text


def _finish(
    connection: smtplib.SMTP,
    replies: list[tuple[int, bytes]],
    recipients: Sequence[str],
    message: bytes,
) -> str:
    """Judge the MAIL and RCPT replies, send the message if DATA may go ahead."""
    data = replies[1 + len(recipients)] if len(replies) > 1 + len(recipients) else None
    code, text = replies[0]
    refused = [
        (c, t, r) for (c, t), r in zip(replies[1:], recipients, strict=False) if c not in (250, 251)
    ]
    failure = None
    if code != 250:
        failure = classify(code, text, "MAIL FROM")
    elif len(refused) == len(recipients):
        code, text, _ = max(refused)  # a permanent refusal outranks a transient one
        failure = classify(code, text, "RCPT TO")
    if failure is not None:
        if data is not None and data[0] == 354:
            connection.send(b".\r\n")  # DATA was accepted anyway: send nothing, then fail
            connection.getreply()
        raise failure
    if data is None:
        connection.send(b"DATA\r\n")
        data = _reply_or_raise(connection, "DATA")
    if data[0] != 354:
        raise classify(data[0], data[1], "DATA")
    body = _DOT_AT_LINE_START.sub(b"..", message)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    connection.send(body + b".\r\n")
    code, text = _reply_or_raise(connection, "DATA")
    if code != 250:
        raise classify(code, text, "DATA")
    reply = _reply(code, text)
    if refused:
        # Retrying would send a duplicate to everyone who accepted; record instead.
        reply += "; refused: " + ", ".join(f"{r} ({_reply(c, t)})" for c, t, r in refused)
    return reply


def needs_smtputf8(envelope_from: str, recipients: Sequence[str], message: bytes) -> str | None:
    """What in this transaction needs SMTPUTF8 (RFC 6531), or None."""
    if not envelope_from.isascii():
        return f"sender {envelope_from}"
    for recipient in recipients:
        if not recipient.isascii():
            return f"recipient {recipient}"
    if not message.isascii():  # the writer keeps it ASCII but for such addresses
        return "an address in the message's headers"
    return None


def _login(connection: smtplib.SMTP, user: str, password: str, where: str) -> None:
    try:
        connection.login(user, password)
    except UnicodeError:
        # smtplib sends AUTH as ASCII; its error would quote a character of the secret.
        raise TransientDeliveryError(
            f"{where}: the user name or password is not ASCII, which smtplib cannot send"
        ) from None


def is_throttling(code: int, text: bytes | str) -> bool:
    """Whether a reply says the client sends too fast (``421 4.7.0 rate limit exceeded``,
    ``454 Throttling failure``, ``451 4.7.1 …``): 421, 451 or 454 with an enhanced
    code 4.7.x or words about rates, throttling or limits.
    """
    decoded = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return code in _THROTTLING_CODES and _THROTTLING_TEXT.search(decoded) is not None


def classify(code: int, text: bytes | str, stage: str) -> DeliveryError:
    """Our error for an SMTP reply ``code`` at ``stage`` (MAIL, RCPT, DATA)."""
    reply = f"{stage}: {_reply(code, text)}"
    if is_throttling(code, text):
        return ThrottledDeliveryError(reply, code)
    if 400 <= code < 500:
        return TransientDeliveryError(reply, code)
    return PermanentDeliveryError(reply, code)


class PooledConnections(Protocol):
    """Connections to one server that a process's sender threads share (``max_connections``)."""

    def checkout(self) -> smtplib.SMTP | None:
        """An idle connection, or None: open one (a permit for it is free)."""
        ...

    def checkin(self, connection: smtplib.SMTP) -> None:
        """Give back a connection that is still usable."""
        ...

    def discard(self) -> None:
        """The connection borrowed (or to be opened) is gone."""
        ...


class SmtpTransport:
    """Real SMTP over smtplib; not thread-safe, so each sender thread owns one.

    Connections to servers in ``pools`` are borrowed for one transaction from the
    process's pool (``rohrpost.consumer.connections``); to the others it keeps its own.
    """

    def __init__(
        self,
        servers: Mapping[str, SmtpServer],
        pools: Mapping[str, PooledConnections] | None = None,
    ) -> None:
        self._servers = servers
        self._pools = pools or {}
        self._connections: dict[str, smtplib.SMTP] = {}

    def send(
        self, server: str, envelope_from: str, recipients: Sequence[str], message: bytes
    ) -> str:
        """Send over ``server``'s connection, reconnecting once if a reused one went stale."""
        pool = self._pools.get(server)
        if pool is None:
            return self._send(server, envelope_from, recipients, message)
        borrowed = pool.checkout()
        if borrowed is not None:
            self._connections[server] = borrowed
        try:
            return self._send(server, envelope_from, recipients, message)
        finally:
            connection = self._connections.pop(server, None)
            if connection is None:
                pool.discard()
            else:
                pool.checkin(connection)

    def _send(
        self, server: str, envelope_from: str, recipients: Sequence[str], message: bytes
    ) -> str:
        reused = server in self._connections
        connection = self._connection(server)
        utf8 = needs_smtputf8(envelope_from, recipients, message)
        if utf8 is not None and not connection.has_extn("smtputf8"):
            where = f"{self._servers[server].host}:{self._servers[server].port}"
            raise UnencodableMail(
                f"{utf8} needs SMTPUTF8, which smtp server {server} ({where}) does not offer"
            )
        try:
            return self._transaction(
                connection, envelope_from, recipients, message, utf8=bool(utf8)
            )
        except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
            self._drop(server)
            if reused:
                return self._send(server, envelope_from, recipients, message)
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
        except UnicodeError as exc:
            self._drop(server)  # the transaction may be half sent
            raise UnencodableMail(f"cannot encode the SMTP transaction: {exc}") from None

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
        connection: smtplib.SMTP,
        envelope_from: str,
        recipients: Sequence[str],
        message: bytes,
        *,
        utf8: bool,
    ) -> str:
        # smtplib.sendmail re-parses every address (~0.13 ms each) and does not return
        # the final reply (the queue id we record), so the transaction is spelled out;
        # with PIPELINING (RFC 2920) it takes two round trips instead of 3 + recipients.
        commands = [f"MAIL FROM:<{envelope_from}>{' SMTPUTF8' if utf8 else ''}"]
        commands += [f"RCPT TO:<{recipient}>" for recipient in recipients]
        if connection.has_extn("pipelining"):
            connection.send(("\r\n".join([*commands, "DATA"]) + "\r\n").encode())
            replies = [_reply_or_raise(connection, cmd) for cmd in [*commands, "DATA"]]
        else:
            replies = []
            for command in commands:
                connection.send((command + "\r\n").encode())
                replies.append(_reply_or_raise(connection, command))
                if len(replies) == 1 and replies[0][0] != 250:
                    break
        return _finish(connection, replies, recipients, message)

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
        # A handshake that fails (greeting, STARTTLS, login) closes its socket.
        with contextlib.ExitStack() as on_failure:
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
                on_failure.callback(connection.close)
                connection.ehlo()
                if server.security == "starttls":
                    connection.starttls(context=ssl.create_default_context())
                    connection.ehlo()
                password = server.password()
                if server.user is not None and password is not None:
                    _login(connection, server.user, password.get_secret_value(), where)
            except smtplib.SMTPResponseException as exc:
                error = (
                    ThrottledDeliveryError
                    if is_throttling(exc.smtp_code, exc.smtp_error)
                    else TransientDeliveryError
                )
                raise error(
                    f"{where}: {_reply(exc.smtp_code, exc.smtp_error)}", exc.smtp_code
                ) from exc
            except (OSError, smtplib.SMTPException) as exc:
                raise TransientDeliveryError(f"{where}: {type(exc).__name__}: {exc}") from exc
            on_failure.pop_all()
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
