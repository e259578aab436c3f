"""The audit: every operator action, who did it and when, newest first.

Actions on one mail are its events that carry an actor (edited, resubmitted, resent,
purged, cancelled …; found through a partial index, not a scan of every event);
actions on a whole tenant or app (pause, resume) are in ``operator_actions``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Connection, select

from rohrpost.shared.store.tables import events, mails, operator_actions


class AuditEntry(BaseModel):
    """One operator action."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    actor: str | None
    kind: str
    tenant: str
    app: str | None
    mail_id: uuid.UUID | None
    detail: dict[str, Any] | None


def audit_entries(
    conn: Connection, *, tenant: str | None, before: datetime | None, limit: int
) -> list[AuditEntry]:
    """Up to ``limit`` operator actions before ``before``, newest first."""
    on_mails = (
        select(
            events.c.at,
            events.c.actor,
            events.c.kind,
            mails.c.tenant,
            mails.c.app,
            events.c.mail_id,
            events.c.detail,
        )
        .join(mails, mails.c.id == events.c.mail_id)
        .where(events.c.actor.is_not(None))
        .order_by(events.c.at.desc())
        .limit(limit)
    )
    on_tenants = (
        select(
            operator_actions.c.at,
            operator_actions.c.actor,
            operator_actions.c.kind,
            operator_actions.c.tenant,
            operator_actions.c.app,
            operator_actions.c.detail,
        )
        .order_by(operator_actions.c.at.desc())
        .limit(limit)
    )
    if tenant is not None:
        on_mails = on_mails.where(mails.c.tenant == tenant)
        on_tenants = on_tenants.where(operator_actions.c.tenant == tenant)
    if before is not None:
        on_mails = on_mails.where(events.c.at < before)
        on_tenants = on_tenants.where(operator_actions.c.at < before)
    found = [AuditEntry.model_validate(dict(row)) for row in conn.execute(on_mails).mappings()]
    found += [
        AuditEntry.model_validate({**row, "mail_id": None})
        for row in conn.execute(on_tenants).mappings()
    ]
    found.sort(key=lambda entry: entry.at, reverse=True)
    return found[:limit]


def paused_scopes(conn: Connection) -> dict[tuple[str, str | None], AuditEntry]:
    """The last pause of each tenant or tenant/app that was not resumed since."""
    latest: dict[tuple[str, str | None], AuditEntry] = {}
    rows = conn.execute(select(operator_actions).order_by(operator_actions.c.at)).mappings()
    for row in rows:
        entry = AuditEntry.model_validate({**row, "mail_id": None})
        latest[(entry.tenant, entry.app)] = entry
    return {scope: entry for scope, entry in latest.items() if entry.kind == "paused"}
