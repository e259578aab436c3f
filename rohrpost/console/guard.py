"""In front of every route: the actor, the login wall, the origin check, security headers.

Plain ASGI (no body is read here, so a large request is refused by its length before
anything reads it).
"""

from __future__ import annotations

import ipaddress
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rohrpost.console.auth import CSRF_COOKIE, SESSION_COOKIE, new_csrf_token
from rohrpost.console.inputs import MAX_BODY_BYTES

if TYPE_CHECKING:
    from rohrpost.console.actors import Actor
    from rohrpost.console.app import Console

#: No script but the console's own files, no inline script or style, no framing.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; "
    "frame-ancestors 'none'"
)
PUBLIC = ("/login", "/healthz", "/static/")
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
_LOCAL_NAMES = ("localhost",)


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _loopback(host: str | None) -> bool:
    name = urlsplit(f"//{host or ''}").hostname or ""
    if name in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Guard:
    """The ASGI middleware every request passes."""

    def __init__(self, app: ASGIApp, console: Console) -> None:
        self.app = app
        self.console = console

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        path = _route_path(scope)
        refusal = self._refusal(request, path)
        actor, session = self._actor(request)
        state = scope.setdefault("state", {})
        state["actor"], state["session"] = actor, session
        cookie = request.cookies.get(CSRF_COOKIE, "")
        state["csrf_cookie"] = cookie if len(cookie) == 43 else new_csrf_token()
        secure = request.url.scheme == "https"
        send = self._headed(send, None if cookie == state["csrf_cookie"] else state, secure)
        if refusal is None:
            refusal = self._origin_refusal(request, actor)
        if refusal is None and actor is None and not path.startswith(PUBLIC):
            refusal = self._login_wall(request, path)
        if refusal is not None:
            await send(refusal[0])
            await send(refusal[1])
            return
        await self.app(scope, receive, send)

    def _actor(self, request: Request) -> tuple[Actor | None, Any]:
        auth = self.console.auth
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return auth.bearer(header[7:].strip()), None
        found = auth.session(request.cookies.get(SESSION_COOKIE))
        if found is not None:
            return found
        return (auth.local_actor(), None) if auth.open else (None, None)

    def _refusal(self, request: Request, path: str) -> tuple[Message, Message] | None:
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
            return _answer(413, "the request is too large", path)
        if self.console.auth.open and not _loopback(request.headers.get("host")):
            # Without users the console listens on loopback only; a foreign Host header
            # means a page elsewhere reached it by DNS rebinding.
            return _answer(421, "this console answers only on its loopback address", path)
        return None

    def _origin_refusal(
        self, request: Request, actor: Actor | None
    ) -> tuple[Message, Message] | None:
        if request.method in _SAFE_METHODS or (actor is not None and actor.via == "token"):
            return None
        origin = request.headers.get("origin") or _origin_of(request.headers.get("referer"))
        own = f"{request.url.scheme}://{request.url.netloc}"
        if origin != own:
            return _answer(403, f"refused: request from another origin ({origin or 'none'})", "")
        return None

    def _login_wall(self, request: Request, path: str) -> tuple[Message, Message]:
        if path.startswith("/api/"):
            return _answer(401, "log in or send Authorization: Bearer TOKEN", path)
        root = request.scope.get("root_path", "")
        if request.headers.get("hx-request") == "true":
            # htmx renewing part of a page (the overview's figures): the whole page goes
            # to the login, which leads back to it, instead of a login form in the part.
            current = urlsplit(request.headers.get("hx-current-url", ""))
            page = current.path if current.netloc == request.url.netloc else ""
            page = page[len(root) :] if root and page.startswith(root) else page
            back = (page or "/") + (f"?{current.query}" if page and current.query else "")
            location = f"{root}/login?next={quote(back, safe='')}"
            return _answer(401, "the session ended: log in again", path, hx_redirect=location)
        target = quote(path + (f"?{request.url.query}" if request.url.query else ""), safe="")
        return _redirect(f"{root}/login?next={target}")

    def _headed(self, send: Send, new_cookie: dict[str, Any] | None, secure: bool) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("content-security-policy", CSP)
                headers.setdefault("x-frame-options", "DENY")
                headers["cache-control"] = "no-store"
                headers["x-content-type-options"] = "nosniff"
                headers["referrer-policy"] = "same-origin"
                headers["cross-origin-opener-policy"] = "same-origin"
                if new_cookie is not None:
                    flags = "; HttpOnly; SameSite=Strict; Path=/" + ("; Secure" if secure else "")
                    headers.append(
                        "set-cookie", f"{CSRF_COOKIE}={new_cookie['csrf_cookie']}{flags}"
                    )
            await send(message)

        return wrapped


def _origin_of(url: str | None) -> str | None:
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None


def _answer(
    status: int, text: str, path: str, *, hx_redirect: str | None = None
) -> tuple[Message, Message]:
    if path.startswith("/api/"):
        body, kind = json.dumps({"error": text, "status": status}).encode(), b"application/json"
    else:
        body, kind = f"{status}: {text}\n".encode(), b"text/plain; charset=utf-8"
    headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if hx_redirect is not None:
        headers.append((b"hx-redirect", hx_redirect.encode()))
    return (
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body},
    )


def _redirect(location: str) -> tuple[Message, Message]:
    headers = [(b"location", location.encode()), (b"content-length", b"0")]
    return (
        {"type": "http.response.start", "status": 303, "headers": headers},
        {"type": "http.response.body", "body": b""},
    )
