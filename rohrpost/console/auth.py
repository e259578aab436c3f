"""Finding the actor of a request: a signed session cookie, a bearer token, or local mode.

The session cookie is ``payload.signature`` (HMAC-SHA256 with the console's secret
key); the payload names the user, the expiry, the CSRF token of the session, and a
fingerprint of the user's password hash, so changing a password ends its sessions.
With no user configured (only allowed on a loopback address) every request acts as
the local operator.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from rohrpost.console.actors import Actor
from rohrpost.console.passwords import verify
from rohrpost.shared.settings import ConsoleSettings

SESSION_COOKIE = "rohrpost_session"
#: Before login (and in local mode) the CSRF token lives in a cookie of its own.
CSRF_COOKIE = "rohrpost_csrf"


@dataclass(frozen=True)
class Session:
    """A verified session: who, and the CSRF token its forms must carry."""

    user: str
    csrf: str
    expires: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Authenticator:
    """Checks passwords, tokens and session cookies against the console's configuration."""

    def __init__(self, config: ConsoleSettings, secret_key: bytes) -> None:
        self._config = config
        self._key = secret_key
        self._token_cache: dict[str, Actor] = {}

    @property
    def open(self) -> bool:
        """True when no user is configured: everyone on the loopback address is the operator."""
        return not self._config.users

    def local_actor(self) -> Actor:
        """The actor of local mode: the OS user, with every permission."""
        try:
            name = getpass.getuser()
        except (KeyError, OSError):
            name = "local"
        return Actor(name=name, role="admin", via="local")

    def login(self, user: str, password: str) -> Actor | None:
        """The actor for a correct user name and password, else None (same time either way)."""
        config = self._config.users.get(user)
        stored = config.password_hash.get_secret_value() if config else None
        if not verify(password, stored) or config is None:
            return None
        return self._actor(user)

    def _actor(self, user: str) -> Actor | None:
        config = self._config.users.get(user)
        if config is None:
            return None
        masked = config.role == "viewer" and self._config.mask_recipients_for_viewers
        return Actor(name=user, role=config.role, via="session", masked=masked)

    def bearer(self, token: str) -> Actor | None:
        """The actor of an API token, or None."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        if digest in self._token_cache:
            return self._token_cache[digest]
        for name, config in self._config.tokens.items():
            if verify(token, config.token_hash.get_secret_value()):
                actor = Actor(name=name, role=config.role, via="token")
                if len(self._token_cache) < 1000:  # scrypt once per token, not per request
                    self._token_cache[digest] = actor
                return actor
        return None

    def _fingerprint(self, user: str) -> str:
        config = self._config.users[user]
        material = config.password_hash.get_secret_value().encode()
        return hashlib.sha256(self._key + material).hexdigest()[:16]

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def new_session(self, user: str) -> tuple[str, Session]:
        """A cookie value for ``user`` and the session it stands for."""
        lifetime = self._config.session_lifetime.total_seconds()
        session = Session(user, secrets.token_urlsafe(32), time.time() + lifetime)
        data = {"u": user, "c": session.csrf, "e": session.expires, "f": self._fingerprint(user)}
        payload = _b64(json.dumps(data, separators=(",", ":")).encode())
        return f"{payload}.{self._sign(payload)}", session

    def session(self, cookie: str | None) -> tuple[Actor, Session] | None:
        """The actor and session of a cookie; None when it is absent, forged or expired."""
        if not cookie or "." not in cookie or len(cookie) > 4096:
            return None
        payload, _, signature = cookie.partition(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            data: dict[str, Any] = json.loads(_unb64(payload))
            user, csrf, expires = str(data["u"]), str(data["c"]), float(data["e"])
        except (ValueError, KeyError, TypeError):
            return None
        actor = self._actor(user)
        if actor is None or expires < time.time() or data.get("f") != self._fingerprint(user):
            return None
        return actor, Session(user, csrf, expires)


def new_csrf_token() -> str:
    """A fresh random CSRF token."""
    return secrets.token_urlsafe(32)
