"""Routes that are not pages: landing, login and logout, health, metrics, OpenAPI, the preview."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)

from rohrpost.console.actors import VIEW, VIEW_RECIPIENTS, mask_text, permission_allowed
from rohrpost.console.auth import SESSION_COOKIE
from rohrpost.console.inputs import BadInput, BodyTooLarge, Inputs, read_inputs
from rohrpost.console.openapi import document
from rohrpost.console.pages import LANDING, Problem, ViewContext
from rohrpost.console.views.deadletters import found_dead_letter
from rohrpost.shared.errors import RohrpostError
from rohrpost.shared.logs import get_logger

if TYPE_CHECKING:
    from rohrpost.console.app import Console

log = get_logger(__name__)
#: What a preview of a mail's HTML may do inside its sandboxed frame: show itself.
PREVIEW_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src data:; "
    "frame-ancestors 'self'; sandbox"
)
_FAILURE_PAUSE = 0.5


def _console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


async def landing(request: Request) -> Response:
    """The first page: the overview."""
    return RedirectResponse(request.scope.get("root_path", "") + LANDING, status_code=303)


def _next(value: str) -> str:
    """Where to go after login: a path of this site, never another site."""
    parts = urlsplit(value)
    if not value.startswith("/") or value.startswith("//") or parts.scheme or parts.netloc:
        return LANDING
    return value


async def login(request: Request) -> Response:
    """GET: the form. POST: user name and password; a session cookie when they match."""
    console = _console(request)
    target = _next(request.query_params.get("next", LANDING))
    if request.method == "GET":
        return await console.render(request, "login.html", {"next": target, "error": None})
    try:
        inputs = await read_inputs(request)
        console.check_csrf(request, inputs)
    except Problem as exc:
        return await console.render(
            request, "login.html", {"next": target, "error": exc.message}, 403
        )
    except (BodyTooLarge, BadInput):
        return PlainTextResponse("the request is too large or not a form", status_code=413)
    user, password = inputs.get("user")[:100], inputs.get("password")[:1000]
    actor = console.auth.login(user, password) if user and password else None
    if actor is None:
        await asyncio.sleep(_FAILURE_PAUSE)  # a guesser waits; scrypt made each guess costly
        log.warning("console login refused", user=user[:100])
        data = {"next": target, "error": "wrong user name or password"}
        return await console.render(request, "login.html", data, 401)
    cookie, _session = console.auth.new_session(user)
    root = request.scope.get("root_path", "")
    response = RedirectResponse(root + _next(inputs.get("next") or target), status_code=303)
    lifetime = int(console.settings.console.session_lifetime.total_seconds())
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=lifetime,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path=root or "/",
    )
    log.info("console login", user=user)
    return response


async def logout(request: Request) -> Response:
    """End the session."""
    console = _console(request)
    try:
        console.check_csrf(request, await read_inputs(request))
    except (Problem, BodyTooLarge, BadInput):
        return PlainTextResponse("refused: stale or forged form", status_code=403)
    root = request.scope.get("root_path", "")
    response = RedirectResponse(f"{root}/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=root or "/")
    return response


async def healthz(_request: Request) -> Response:
    """200 while the process runs."""
    return PlainTextResponse("ok\n")


async def metrics(request: Request) -> Response:
    """The console's own metrics (requests by route and status, their duration)."""
    return Response(generate_latest(_console(request).registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    """The OpenAPI document of ``/api/v1``."""
    return JSONResponse(document(request.scope.get("root_path", "")))


async def preview_html(request: Request) -> Response:
    """A dead letter's HTML part as the current templates render it, for a sandboxed frame."""
    console = _console(request)
    actor = request.state.actor
    if not permission_allowed(actor, VIEW):
        return PlainTextResponse("forbidden", status_code=403)
    ctx = ViewContext(request, actor, console, Inputs({}, form=True), api=False)
    try:
        found = await found_dead_letter(ctx)
        preview = await ctx.call(console.service.preview, found.container or {})
    except Problem as exc:
        return PlainTextResponse(exc.message, status_code=exc.status)
    except RohrpostError as exc:
        return PlainTextResponse(console.scrub(str(exc)), status_code=503)
    html = preview.html or "<p>(no HTML part)</p>"
    if not permission_allowed(actor, VIEW_RECIPIENTS):
        html = mask_text(html)
    headers = {"content-security-policy": PREVIEW_CSP, "x-frame-options": "SAMEORIGIN"}
    return HTMLResponse(html, headers=headers)
