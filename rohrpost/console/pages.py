"""Pages: a view builds a plain dict; the HTML template and the JSON API both render it.

Each ``Page`` is served twice, at its path (HTML) and under ``/api/v1`` (JSON), by
the same view, so the API cannot drift from the pages. A view raises ``Invalid``
(field errors: the form again, 422), ``Problem`` (a 4xx with a message) or returns a
dict; a dict with ``redirect`` ends an action (HTML: 303 there, with the message).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
from pydantic_core import to_jsonable_python
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from rohrpost.console.actors import VIEW, VIEW_RECIPIENTS, Actor, masked, permission_allowed
from rohrpost.console.inputs import BadInput, BodyTooLarge, Inputs, read_inputs
from rohrpost.shared.errors import (
    BrokerError,
    ContainerError,
    OperatorError,
    RohrpostError,
    StoreError,
    UnknownRoute,
)
from rohrpost.shared.logs import get_logger

if TYPE_CHECKING:
    from rohrpost.console.app import Console

log = get_logger(__name__)
T = TypeVar("T")
API = "/api/v1"
#: The landing page and the navigation, in order.
LANDING = "/overview"
#: How long a page that only reads waits for the store or the broker. One that stopped
#: answering (a frozen link, a hung server) would hold the page until TCP gives up, for
#: ever where the peer's kernel still answers; an action is waited for to its end.
READ_SECONDS = 30.0
NAVIGATION = [
    ("Overview", "/overview"),
    ("Dead letters", "/dead-letters"),
    ("History", "/mails"),
    ("Tenants", "/tenants"),
    ("Audit", "/audit"),
]


class Problem(Exception):
    """A request that cannot be answered as asked: status and a message for the person."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Invalid(Exception):
    """Input with errors, each under the name of the field it concerns; the form again."""

    def __init__(self, errors: dict[str, str], data: dict[str, Any]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors
        self.data = data


@dataclass
class ViewContext:
    """Everything a view may use: the actor, the operator API, the request's inputs."""

    request: Request
    actor: Actor
    console: Console
    inputs: Inputs
    api: bool

    @property
    def params(self) -> dict[str, Any]:
        """The path's parameters."""
        return dict(self.request.path_params)

    @property
    def query(self) -> dict[str, str]:
        """The query string's parameters (the first of repeated ones)."""
        return dict(self.request.query_params)

    def require(self, action: str, resource: Any = None) -> None:
        """Problem 403 unless the actor may do ``action``."""
        if not permission_allowed(self.actor, action, resource):
            raise Problem(403, f"{self.actor.name} ({self.actor.role}) may not {action}")

    def may(self, action: str, resource: Any = None) -> bool:
        """Whether the actor may do ``action``: what the page offers."""
        return permission_allowed(self.actor, action, resource)

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run a blocking operation (store, broker) off the event loop.

        A read (GET) that has not returned within ``READ_SECONDS`` is a 503; its thread
        is left to finish by itself.
        """
        work = functools.partial(function, *args)
        if self.request.method not in ("GET", "HEAD"):
            return await anyio.to_thread.run_sync(work)
        with anyio.move_on_after(READ_SECONDS):
            return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        raise Problem(
            503, f"the history store or RabbitMQ did not answer within {READ_SECONDS:g} s"
        )


View = Callable[[ViewContext], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Page:
    """A view at a path: its template, methods, and the permission needed to reach it."""

    path: str
    view: View
    template: str
    summary: str
    methods: tuple[str, ...] = ("GET",)
    action: str = VIEW
    api: bool = True
    tags: tuple[str, ...] = field(default=())


_STATUS: list[tuple[type[Exception] | tuple[type[Exception], ...], int]] = [
    ((StoreError, BrokerError), 503),
    ((ContainerError, UnknownRoute), 422),
    (OperatorError, 409),
    (BodyTooLarge, 413),
    (BadInput, 400),
]


def _status_for(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, Problem):
        return exc.status, exc.message
    if isinstance(exc, BodyTooLarge):
        return 413, "the request is too large"
    for kinds, status in _STATUS:
        if isinstance(exc, kinds):
            return status, str(exc)
    return 500, "unexpected error (logged)"


def endpoint(
    console: Console, page: Page, *, api: bool
) -> Callable[[Request], Awaitable[Response]]:
    """The Starlette endpoint serving ``page`` as HTML or as JSON."""

    async def serve(request: Request) -> Response:
        started = time.perf_counter()
        actor: Actor = request.state.actor
        status, data, template = 200, {}, page.template
        try:
            if not permission_allowed(actor, page.action, None):
                raise Problem(403, f"{actor.name} ({actor.role}) may not {page.action}")
            inputs = await read_inputs(request)
            if request.method not in ("GET", "HEAD"):
                console.check_csrf(request, inputs)
            data = await page.view(ViewContext(request, actor, console, inputs, api))
        except Invalid as exc:
            status, data = 422, {**exc.data, "errors": exc.errors}
        except (RohrpostError, Problem, BodyTooLarge, BadInput) as exc:
            status, message = _status_for(exc)
            data, template = {"error": console.scrub(message), "status": status}, "problem.html"
        except Exception as exc:
            log.exception("console page failed", path=page.path)
            status, message = _status_for(exc)
            data, template = {"error": message, "status": status}, "problem.html"
        if not permission_allowed(actor, VIEW_RECIPIENTS):
            data = masked(data)
        console.observe(page.path, request.method, status, time.perf_counter() - started)
        if api:
            return JSONResponse(to_jsonable_python(data), status_code=status)
        if "redirect" in data and status < 400:
            root = request.scope.get("root_path", "")
            response = RedirectResponse(root + data["redirect"], status_code=303)
            console.flash(response, data.get("message", ""))
            return response
        return await console.render(request, template, data, status)

    return serve
