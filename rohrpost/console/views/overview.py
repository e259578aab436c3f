"""The overview: every tenant/app at a glance, the figures ``rohrpost status`` shows.

The page and its figures (``/overview/figures``, which the page fetches again every
few seconds with htmx) are built from ``OperatorService.overview``: the same code,
and the same JSON object (``overview``), as ``rohrpost status --json``, read at most
a few seconds before (``rohrpost.console.snapshots``). A source that
cannot be asked (the broker, the store, the management API) leaves its figures
unknown and says why; the page is shown all the same.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from rohrpost.commands.status import age
from rohrpost.console.pages import ViewContext
from rohrpost.console.views.common import check
from rohrpost.operations.status import AGE_BUCKET_NAMES, Overview, RouteStatus

#: How often the page fetches its figures again. RabbitMQ's management API samples
#: every 5 s, so a shorter period would show the same in-flight figures twice.
REFRESH_SECONDS = 5


def _scope(ctx: ViewContext) -> dict[str, str]:
    """The tenant and app filters, which must name a configured tenant and app."""
    values = {name: ctx.query.get(name, "").strip() for name in ("tenant", "app")}
    tenants = ctx.console.settings.tenants
    errors: dict[str, str] = {}
    if values["tenant"] and values["tenant"] not in tenants:
        errors["tenant"] = "no such tenant"
    elif values["app"] and not any(
        values["app"] in config.apps
        for name, config in tenants.items()
        if values["tenant"] in ("", name)
    ):
        errors["app"] = "no such app" + (f" of {values['tenant']}" if values["tenant"] else "")
    check(errors, {"filters": values, **_choices(ctx), "overview": None})
    return values


def _choices(ctx: ViewContext) -> dict[str, list[str]]:
    tenants = ctx.console.settings.tenants
    apps = sorted({app for config in tenants.values() for app in config.apps})
    return {"tenants": sorted(tenants), "apps": apps}


def _link(path: str, **query: str) -> str:
    return f"{path}?{urlencode(query)}" if query else path


def _route(ctx: ViewContext, route: RouteStatus) -> dict[str, Any]:
    """What the page shows of a route beside its figures: server, state, age, links."""
    server = ctx.console.settings.smtp.get(route.smtp)
    # tenant and app names are [a-z0-9_-]: nothing in them needs quoting
    scope = f"tenant={route.tenant}&app={route.app}"
    if not route.enabled:
        state = "disabled"
    else:
        state = {None: "unknown", True: "paused", False: "active"}[route.paused]
    idle = route.enabled and route.consumers == 0 and route.paused is False
    return {
        "server": f"{server.host}:{server.port}" if server else "",
        "state": state,
        "oldest": age(route.oldest_waiting_seconds),
        # figures that call for a look: a route nobody sends from, dead letters
        "flags": {
            "consumers": "warn" if idle else "",
            "dead_lettered": "bad" if route.dead_lettered else "",
        },
        "links": {
            "dead_letters": f"/dead-letters?{scope}",
            "dead_letters_hour": f"/dead-letters?{scope}&since=-1h",
            "dead_letters_day": f"/dead-letters?{scope}&since=-24h",
            "mails": f"/mails?{scope}",
            "queued": f"/mails?{scope}&status=queued",
            "scheduled": f"/mails?{scope}&status=scheduled",
            "retrying": f"/mails?{scope}&status=retrying",
            "sent_hour": f"/mails?{scope}&status=sent&since=-1h",
            "sent_day": f"/mails?{scope}&status=sent&since=-24h",
            "tenant": f"/tenants#app-{route.tenant}-{route.app}",
            "audit": f"/audit?tenant={route.tenant}",
        },
    }


def _problems(ctx: ViewContext, shown: Overview) -> list[dict[str, str]]:
    """Why figures are missing: the broker and the store are alarms, the rest notes."""
    scrub = ctx.console.scrub
    problems = []
    if shown.broker is not None:
        problems.append(
            {"source": "broker", "alarm": "yes", "text": scrub(f"queues unknown: {shown.broker}")}
        )
    if shown.history is not None:
        text = f"history figures unknown: {shown.history}"
        problems.append({"source": "history", "alarm": "yes", "text": scrub(text)})
    if shown.management is not None:
        text = f"in flight unknown: {shown.management}"
        problems.append({"source": "management", "alarm": "", "text": scrub(text)})
    problems += [{"source": "queues", "alarm": "", "text": scrub(note)} for note in shown.notes]
    return problems


async def overview_page(ctx: ViewContext) -> dict[str, Any]:
    """Per tenant/app: state, SMTP server, queues, consumers, activity, oldest waiting mail."""
    filters = _scope(ctx)
    shown = await ctx.call(
        ctx.console.overviews.get, filters["tenant"] or None, filters["app"] or None
    )
    return {
        "overview": shown.model_dump(mode="json"),
        "routes": {f"{r.tenant}/{r.app}": _route(ctx, r) for r in shown.routes},
        "total": {"oldest": age(shown.total.oldest_waiting_seconds)},
        "problems": _problems(ctx, shown),
        "age_buckets": list(AGE_BUCKET_NAMES),
        "filters": filters,
        **_choices(ctx),
        "figures": _link("/overview/figures", **{k: v for k, v in filters.items() if v}),
        "refresh_seconds": REFRESH_SECONDS,
    }
