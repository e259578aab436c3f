"""The console as an ASGI app: ``create_app(settings)``.

``Console`` holds what every request shares (the operator API, the jobs, the
authenticator, the templates, health and metrics); ``Guard`` stands in front of
every route: it finds the request's actor, lets nothing but the login page, static
files and ``/healthz`` through without one, refuses a state-changing request from a
foreign origin, and puts the security headers on every answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from rohrpost.console import endpoints
from rohrpost.console.auth import CSRF_COOKIE, Authenticator
from rohrpost.console.guard import Guard
from rohrpost.console.health import Health
from rohrpost.console.inputs import Inputs
from rohrpost.console.jobs import JobBoard
from rohrpost.console.pages import API, NAVIGATION, Problem, endpoint
from rohrpost.console.site import PAGES
from rohrpost.console.snapshots import MAX_AGE, RENEW_AFTER, OverviewSnapshots
from rohrpost.console.templating import configure
from rohrpost.operations.service import OperatorService
from rohrpost.shared.logs import get_logger
from rohrpost.shared.settings import Settings

log = get_logger(__name__)
HERE = Path(__file__).parent
FLASH_COOKIE = "rohrpost_flash"


class Console:
    """What every request of one console shares."""

    def __init__(self, settings: Settings, service: OperatorService | None = None) -> None:
        self.settings = settings
        self.service = service or OperatorService(settings)
        self.jobs = JobBoard()
        self.overviews = OverviewSnapshots(
            self.service.overview, renew_after=RENEW_AFTER, max_age=MAX_AGE
        )
        key = settings.console.secret_key()
        if key is None and settings.console.users:
            log.warning(
                "no console secret key; sessions end when the console restarts",
                variable=settings.console.secret_key_env,
            )
        self._key = key.get_secret_value().encode() if key else secrets.token_bytes(32)
        self.auth = Authenticator(settings.console, self._key)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        configure(self.templates.env)
        self.health = Health(self.service)
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "rohrpost_console_requests",
            "Requests answered by the console.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self._seconds = Histogram(
            "rohrpost_console_request_duration_seconds",
            "Time to answer a request.",
            ["route"],
            registry=self.registry,
        )
        self._secrets = [s for s in settings.secrets() if s]

    @property
    def routes(self) -> list[tuple[str, str]]:
        """Every enabled (tenant, app)."""
        return self.settings.routes()

    def scrub(self, text: str) -> str:
        """``text`` with every configured secret replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count a request (labels: the route's pattern, never its ids)."""
        self._requests.labels(route, method, str(status)).inc()
        self._seconds.labels(route).observe(seconds)

    def csrf_token(self, request: Request) -> str:
        """The token this request's forms must carry."""
        session = getattr(request.state, "session", None)
        if session is not None:
            return str(session.csrf)
        return str(request.state.csrf_cookie)

    def check_csrf(self, request: Request, inputs: Inputs) -> None:
        """Problem 403 unless a state-changing request carries the CSRF token (tokens need none)."""
        if request.state.actor is not None and request.state.actor.via == "token":
            return
        given = request.headers.get("x-csrf-token") or inputs.get("csrf")
        if not given or not hmac.compare_digest(given, self.csrf_token(request)):
            raise Problem(
                403, "the form is stale or forged (CSRF token missing or wrong); reload it"
            )

    def sign(self, text: str) -> str:
        """``text`` with an HMAC, for a cookie the browser must not forge."""
        mac = hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{mac}.{text}"

    def unsign(self, value: str) -> str | None:
        """The text of a signed value, or None when it was changed."""
        mac, _, text = value.partition(".")
        good = hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()[:32]
        return text if hmac.compare_digest(mac, good) else None

    def flash(self, response: Response, message: str) -> None:
        """Show ``message`` on the next page."""
        if message:
            response.set_cookie(
                FLASH_COOKIE, self.sign(message[:500]), httponly=True, samesite="strict"
            )

    async def render(
        self, request: Request, template: str, data: dict[str, Any], status: int = 200
    ) -> Response:
        """``data`` through ``template``, inside the base layout with banners and flash."""
        flash = request.cookies.get(FLASH_COOKIE)
        message = self.unsign(flash) if flash else None
        context = {
            "data": data,
            "actor": request.state.actor,
            "csrf": self.csrf_token(request),
            "nav": NAVIGATION,
            "banners": await self.health.banners(),
            "flash": message,
            "path": request.url.path,
        }
        response = self.templates.TemplateResponse(request, template, context, status_code=status)
        if flash:
            response.delete_cookie(FLASH_COOKIE)
        return response


def create_app(settings: Settings, service: OperatorService | None = None) -> Starlette:
    """The console for ``settings`` (``service``: the operator API, e.g. shared with a test)."""
    console = Console(settings, service)
    routes: list[Route | Mount] = [
        Route("/", endpoints.landing),
        Route("/login", endpoints.login, methods=["GET", "POST"]),
        Route("/logout", endpoints.logout, methods=["POST"]),
        Route("/healthz", endpoints.healthz),
        Route("/metrics", endpoints.metrics),
        Route(f"{API}/openapi.json", endpoints.openapi),
        Route("/dead-letters/{mail_id}/preview.html", endpoints.preview_html),
    ]
    for page in PAGES:
        methods = list(page.methods)
        routes.append(Route(page.path, endpoint(console, page, api=False), methods=methods))
        if page.api:
            routes.append(
                Route(API + page.path, endpoint(console, page, api=True), methods=methods)
            )
    routes.append(Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        console.overviews.close()
        console.service.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.console = console
    return Guard(app, console)  # type: ignore[return-value]


__all__ = ["CSRF_COOKIE", "Console", "create_app"]
