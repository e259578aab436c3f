"""What the console's tests share: users of each role, a pipeline to make dead letters."""

from __future__ import annotations

import functools
import re
from typing import Any

import httpx

from rohrpost.console.passwords import hash_password, hash_token
from rohrpost.consumer.history import HistoryConsumer
from rohrpost.producer.client import Producer
from rohrpost.shared.settings import Settings
from rohrpost.shared.store import HistoryStore
from tests.conftest import drain

ROLES = ("viewer", "operator", "admin")
PASSWORDS = {role: f"{role}-correct-horse-battery" for role in ROLES}
TOKENS = {role: f"token-of-the-{role}-0123456789abcdef" for role in ROLES}
SECRET_KEY = "console-signing-key-that-must-never-show"
ORIGIN = "http://console.test"
GLOBEX = {"globex": {"apps": {"shop": {"smtp": "catcher", "sender": "shop@globex.example"}}}}


@functools.cache
def _password_hash(role: str) -> str:
    return hash_password(PASSWORDS[role])


def console_config(**extra: Any) -> dict[str, Any]:
    """A [console] section with a user and a token of every role."""
    return {
        "users": {role: {"role": role, "password_hash": _password_hash(role)} for role in ROLES},
        "tokens": {
            f"{role}-tool": {"role": role, "token_hash": hash_token(TOKENS[role])} for role in ROLES
        },
        "secret_key_env": "ROHRPOST_TEST_CONSOLE_KEY",
        **extra,
    }


def mail(
    recipient: str = "anna@example.com", tenant: str = "acme", app: str = "billing", **fields: Any
) -> dict[str, Any]:
    """A finished mail for ``recipient``."""
    return {
        "tenant": tenant,
        "app": app,
        "to": [recipient],
        "subject": "Invoice",
        "text": "x",
        **fields,
    }


def archive(settings: Settings) -> None:
    """Archive every event waiting for the history (the history consumer, drained)."""
    store = HistoryStore.open(settings.store_url.get_secret_value(), migrate_schema=True)
    try:
        HistoryConsumer(settings, store).run(drain=True)
    finally:
        store.close()


def dead_letters_of(settings: Settings, mails: list[dict[str, Any]]) -> list[str]:
    """Submit ``mails`` (whose recipients the catcher rejects), send them, archive; their ids."""
    with Producer(settings) as producer:
        ids = [str(i) for i in producer.submit_many(mails)]
    drain(settings)
    archive(settings)
    return ids


def csrf_of(page: str) -> str:
    """The CSRF token a page's forms carry."""
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "no CSRF token on the page"
    return found.group(1)


async def logged_in(client: httpx.AsyncClient, role: str) -> str:
    """Log ``client`` in as the user of ``role``; return the session's CSRF token."""
    form = await client.get("/login")
    response = await client.post(
        "/login",
        data={"user": role, "password": PASSWORDS[role], "csrf": csrf_of(form.text), "next": "/"},
        headers={"origin": ORIGIN},
    )
    assert response.status_code == 303, response.text
    page = await client.get("/tenants")
    return csrf_of(page.text)
