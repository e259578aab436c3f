"""Tenants and apps (pause, resume), the audit of every operator action, and the users."""

from __future__ import annotations

from typing import Any

from rohrpost.console.actors import VIEW_USERS
from rohrpost.console.pages import Problem, ViewContext
from rohrpost.console.views.common import name_param, when


async def tenant_list(ctx: ViewContext) -> dict[str, Any]:
    """Every configured tenant and app, with the pause in force (from the history)."""
    settings = ctx.console.settings
    paused = await ctx.call(ctx.console.service.paused)
    tenants = []
    for tenant, config in sorted(settings.tenants.items()):
        apps = []
        for app, app_config in sorted(config.apps.items()):
            server = settings.smtp.get(app_config.smtp)
            pause = paused.get((tenant, app))
            apps.append(
                {
                    "app": app,
                    "enabled": app_config.enabled,
                    "smtp": f"{app_config.smtp} ({server.host}:{server.port})" if server else "",
                    "sender": app_config.sender,
                    "paused": pause.model_dump(mode="json") if pause else None,
                }
            )
        pause = paused.get((tenant, None))
        tenants.append(
            {
                "tenant": tenant,
                "paused": pause.model_dump(mode="json") if pause else None,
                "apps": apps,
            }
        )
    return {"tenants": tenants, "can": {"pause": ctx.may("pause"), "resume": ctx.may("resume")}}


def _scope(ctx: ViewContext) -> tuple[str, str | None]:
    tenant = name_param(ctx, "tenant")
    app = name_param(ctx, "app") if "app" in ctx.params else None
    config = ctx.console.settings.tenants.get(tenant)
    if config is None or (app is not None and app not in config.apps):
        raise Problem(404, f"no tenant {tenant}" + (f" with app {app}" if app else ""))
    return tenant, app


async def _pause_or_resume(ctx: ViewContext, action: str) -> dict[str, Any]:
    tenant, app = _scope(ctx)
    ctx.require(action, tenant)
    service = ctx.console.service
    function = service.pause if action == "pause" else service.resume
    message = await ctx.call(function, ctx.actor.audit_name, tenant, app)
    return {"redirect": "/tenants", "message": message, "tenant": tenant, "app": app}


async def pause_scope(ctx: ViewContext) -> dict[str, Any]:
    """Hold a tenant's (or one app's) mails: queued, not sent, until resumed."""
    return await _pause_or_resume(ctx, "pause")


async def resume_scope(ctx: ViewContext) -> dict[str, Any]:
    """Send again what a pause held."""
    return await _pause_or_resume(ctx, "resume")


async def audit_list(ctx: ViewContext) -> dict[str, Any]:
    """Every operator action, newest first: who, when, what, and an edit's changes."""
    errors: dict[str, str] = {}
    tenant = ctx.query.get("tenant", "").strip() or None
    before = when(ctx.query, "before", errors)
    if errors:
        raise Problem(400, "; ".join(f"{k}: {v}" for k, v in errors.items()))
    entries = await ctx.call(ctx.console.service.audit, tenant, 100, before)
    shown = []
    for entry in entries:
        item = entry.model_dump(mode="json")
        changes = (entry.detail or {}).get("changes")
        item["changes"] = changes if isinstance(changes, dict) else None
        shown.append(item)
    last = entries[-1].at.isoformat() if len(entries) == 100 else None
    return {
        "entries": shown,
        "filters": {"tenant": tenant or ""},
        "next": last,
        "tenants": sorted(ctx.console.settings.tenants),
    }


async def user_list(ctx: ViewContext) -> dict[str, Any]:
    """Who may log in or call the API, with which role (never a hash)."""
    ctx.require(VIEW_USERS)
    config = ctx.console.settings.console
    return {
        "users": [{"name": n, "role": u.role} for n, u in sorted(config.users.items())],
        "tokens": [{"name": n, "role": t.role} for n, t in sorted(config.tokens.items())],
        "mask_recipients_for_viewers": config.mask_recipients_for_viewers,
    }
