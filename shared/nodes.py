"""The broker's address: one AMQP URL, or the URLs of a cluster's nodes.

Settings keep the addresses as one text, the URLs joined by commas (the form
``ROHRPOST_BROKER_URL`` takes too), so everything that is handed
``settings.broker_url`` connects to a cluster as it does to one node. A comma
separates two addresses only where the next one starts with ``amqp://`` or
``amqps://``: a comma inside a password or a query stays part of its URL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

_NEXT_NODE = re.compile(r"\s*,\s*(?=amqps?://)", re.IGNORECASE)
_SCHEMES = ("amqp", "amqps")
_HINT = "use amqp://user:password@host:5672/vhost (or amqps://)"


def split_nodes(text: str) -> list[str]:
    """The node URLs in ``text`` (one URL, or several joined by commas), in order."""
    return [part for part in _NEXT_NODE.split(text.strip()) if part]


def redact_url(url: str) -> str:
    """Return ``url`` (or each URL of a list of nodes) with any password replaced by ``***``."""
    nodes = split_nodes(url)
    if len(nodes) > 1:
        return ",".join(_redact_one(node) for node in nodes)
    return _redact_one(url)


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def broker_user(url: str) -> str:
    """The user name a connection to ``url`` (or its first node) logs in as.

    As pika reads it: the URL's user name, unquoted; ``guest`` when the URL names none.
    It is the ``user_id`` rohrpost's publishes carry, which RabbitMQ validates.
    """
    nodes = split_nodes(url) or [url]
    username = urlsplit(nodes[0]).username
    return unquote(username) if username is not None else "guest"


def broker_addresses(value: object) -> str:
    """The broker addresses ``value`` gives, checked, as the text Settings keep.

    ``value`` is one URL, a list of URLs (a TOML array), or text holding a JSON
    array or URLs joined by commas (an environment variable). Raises ValueError
    naming the address at fault, its password hidden.
    """
    nodes = _as_list(value)
    if not nodes:
        raise ValueError(f"no broker address given; {_HINT}")
    for position, node in enumerate(nodes, 1):
        _check(node, _which(position, node, len(nodes)))
    _check_cluster(nodes)
    return ",".join(nodes)


def _as_list(value: object) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"not a JSON array of URLs: {exc}") from None
        else:
            return split_nodes(text)
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise ValueError(f"must be a URL or a list of URLs; {_HINT}")
    if not all(isinstance(item, str) for item in value):
        raise ValueError("every broker address must be a URL (text)")
    return [item.strip() for item in value]


def _which(position: int, node: str, count: int) -> str:
    if count == 1:
        return redact_url(node) or "the address"
    return f"address {position} of {count} ({redact_url(node)})"


def _check(node: str, which: str) -> None:
    try:
        parts = urlsplit(node)
        parts.port  # noqa: B018 -- raises ValueError for a port that is no number in range
    except ValueError as exc:
        raise ValueError(f"{which}: not a valid URL: {exc}") from None
    if parts.scheme.lower() not in _SCHEMES or not parts.hostname:
        raise ValueError(f"{which}: not an AMQP URL; {_HINT}")


def _check_cluster(nodes: list[str]) -> None:
    """The nodes of one cluster: each listed once, all with the same virtual host and user."""
    seen: set[tuple[str, int]] = set()
    vhost = _vhost(urlsplit(nodes[0]))
    user = broker_user(nodes[0])
    for position, node in enumerate(nodes, 1):
        parts = urlsplit(node)
        which = _which(position, node, len(nodes))
        default_port = 5671 if parts.scheme.lower() == "amqps" else 5672
        address = ((parts.hostname or "").lower(), parts.port or default_port)
        if address in seen:
            raise ValueError(f"{which}: this node is listed twice")
        seen.add(address)
        if _vhost(parts) != vhost:
            raise ValueError(
                f"{which}: virtual host {_vhost(parts)!r}, but address 1 names {vhost!r}; "
                "the nodes of one cluster serve the same virtual hosts"
            )
        if broker_user(node) != user:
            raise ValueError(
                f"{which}: user {broker_user(node)!r}, but address 1 names {user!r}; "
                "every node is to be reached as the same user (the user_id of publishes)"
            )


def _vhost(parts: SplitResult) -> str:
    """The virtual host a URL names, as pika reads it (no path: ``/``)."""
    return unquote(parts.path[1:]) if parts.path not in ("", "/") else "/"
