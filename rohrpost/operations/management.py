"""RabbitMQ's management HTTP API, for what AMQP does not tell: messages held unacked.

A passive ``queue.declare`` over AMQP answers with the messages *ready* and the
consumers, not with the messages consumers hold unacknowledged (for rohrpost: the
mails workers are sending). The management plugin (``rabbitmq-plugins enable
rabbitmq_management``) knows them, sampled every 5 s by default
(``collect_statistics_interval``). Where it is not enabled or not reachable, those
figures are unknown, never guessed.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from rohrpost.shared.settings import Settings, redact_url

#: ``management_url`` that turns the management API off.
OFF = "off"
_PAGE_SIZE = 500
_TIMEOUT = 3.0


class ManagementUnavailable(Exception):
    """The management API did not answer (the text says why, without a password)."""


@dataclass(frozen=True)
class QueueCounts:
    """One queue as the management API last sampled it."""

    ready: int
    unacked: int
    consumers: int


def management_url(settings: Settings) -> str | None:
    """The management API's base URL: ``management_url``, or derived from ``broker_url``.

    Derived: the broker's host, port 15672 (15671 with TLS: ``amqps``), the broker's
    user and password. None when ``management_url`` is ``off``.
    """
    given = settings.management_url.get_secret_value().strip()
    if given == OFF:
        return None
    if given:
        return given.rstrip("/")
    broker = urllib.parse.urlsplit(settings.broker_url.get_secret_value())
    scheme, port = ("https", 15671) if broker.scheme == "amqps" else ("http", 15672)
    credentials = broker.netloc.rpartition("@")[0]
    host = broker.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{credentials + '@' if credentials else ''}{host}:{port}"


def broker_vhost(settings: Settings) -> str:
    """The virtual host ``broker_url`` names (``/`` when it names none)."""
    path = urllib.parse.urlsplit(settings.broker_url.get_secret_value()).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


class ManagementApi:
    """Reads queue figures from the management API at ``url`` (with user:password@)."""

    def __init__(self, url: str, *, timeout: float = _TIMEOUT) -> None:
        parts = urllib.parse.urlsplit(url)
        self._shown = redact_url(url)
        netloc = parts.netloc.rpartition("@")[2]
        self._base = urllib.parse.urlunsplit(parts._replace(netloc=netloc)).rstrip("/")
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}"} if user else {}
        self._timeout = timeout

    def queues(self, vhost: str, prefix: str) -> dict[str, QueueCounts]:
        """Every queue of ``vhost`` whose name starts with ``prefix``, by name."""
        found: dict[str, QueueCounts] = {}
        page, pages = 1, 1
        while page <= pages:
            query = urllib.parse.urlencode(
                {
                    "page": page,
                    "page_size": _PAGE_SIZE,
                    "name": f"^{re.escape(prefix)}",
                    "use_regex": "true",
                    "columns": "name,messages_ready,messages_unacknowledged,consumers",
                }
            )
            answer = self._get(f"/api/queues/{urllib.parse.quote(vhost, safe='')}?{query}")
            pages = int(answer.get("page_count") or 1)
            for item in answer.get("items", []):
                found[str(item["name"])] = QueueCounts(
                    ready=int(item.get("messages_ready") or 0),
                    unacked=int(item.get("messages_unacknowledged") or 0),
                    consumers=int(item.get("consumers") or 0),
                )
            page += 1
        return found

    def _get(self, path: str) -> dict[str, Any]:
        request = urllib.request.Request(self._base + path, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise ManagementUnavailable(
                f"RabbitMQ's management API at {self._shown} answered {exc.code} {exc.reason}"
            ) from exc
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ManagementUnavailable(
                f"RabbitMQ's management API at {self._shown} does not answer ({reason}); "
                "enable it with `rabbitmq-plugins enable rabbitmq_management` or set "
                "management_url"
            ) from exc
        if not isinstance(answer, dict):
            raise ManagementUnavailable(f"unexpected answer from {self._shown}")
        return answer
