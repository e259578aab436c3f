"""Operator actions on mails and tenants: cancel, pause, resume, resend from history."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from rohrpost.consumer.outcome import cancelled_event_id
from rohrpost.operations.session import OperatorSession
from rohrpost.shared.control import ControlMessage
from rohrpost.shared.errors import OperatorError
from rohrpost.shared.events import EventKind
from rohrpost.shared.store import EventEntry, HistoryStore
from rohrpost.shared.store.writer import TERMINAL
from rohrpost.shared.wire import ACTOR_HEADER


def cancel(session: OperatorSession, mail_id: uuid.UUID, store: HistoryStore | None) -> str:
    """Stop a queued or scheduled mail from being sent; return what was done.

    Every worker learns it from the control stream (also workers started later) and
    drops the mail when it comes due. Cancelling twice is harmless. A mail the
    history knows as already sent, expired or dead-lettered is refused.
    """
    found = store.mail(mail_id) if store is not None else None
    if found is not None and found.mail.status == "cancelled":
        return f"mail {mail_id} was already cancelled"
    if found is not None and found.mail.status in TERMINAL:
        hint = " (use `rohrpost dlq purge`)" if found.mail.status == "dead_lettered" else ""
        raise OperatorError(f"mail {mail_id} is already {found.mail.status}{hint}")
    session.control(ControlMessage(action="cancel", mail_id=mail_id, actor=session.actor))
    if found is None:
        return f"cancelled {mail_id} (the history does not know it yet)"
    mail = found.mail
    mail_round = _round(found.events)
    session.record(
        EventKind.CANCELLED,
        mail_id=mail_id,
        tenant=mail.tenant,
        app=mail.app,
        round=mail_round,
        event_id=cancelled_event_id(mail_id, mail_round),
    )
    return f"cancelled {mail_id} ({mail.tenant}/{mail.app}, was {mail.status})"


def _round(events: list[EventEntry]) -> int:
    return max((e.round for e in events), default=0)


def pause(session: OperatorSession, tenant: str, app: str | None) -> str:
    """Stop sending for a tenant (or one app); its queues keep accepting mail."""
    return _pause_or_resume(session, "pause", tenant, app)


def resume(session: OperatorSession, tenant: str, app: str | None) -> str:
    """Send again what a pause held back."""
    return _pause_or_resume(session, "resume", tenant, app)


def _pause_or_resume(session: OperatorSession, action: str, tenant: str, app: str | None) -> str:
    session.require_route(tenant, app)
    message = ControlMessage.model_validate(
        {"action": action, "tenant": tenant, "app": app, "actor": session.actor}
    )
    session.control(message)
    kind = EventKind.PAUSED if action == "pause" else EventKind.RESUMED
    session.record(kind, tenant=tenant, app=app)
    scope = f"{tenant}/{app}" if app else f"tenant {tenant}"
    return f"{action}d {scope}"


def resend(session: OperatorSession, mail_id: uuid.UUID, store: HistoryStore) -> uuid.UUID:
    """Submit an archived mail again as a new mail linked to it; return the new id."""
    found = store.mail(mail_id)
    if found is None:
        raise OperatorError(f"the history has no mail {mail_id}")
    if found.container is None:
        why = (
            "it was deleted after sending (history = delete)"
            if (found.mail.content_deleted)
            else "the history has no container for it"
        )
        raise OperatorError(f"cannot resend {mail_id}: {why}")
    copy = {
        key: value
        for key, value in found.container.items()
        if key not in ("id", "created_at", "not_before", "expires_at", "resend_of")
    }
    copy |= {"resend_of": str(mail_id), "created_at": datetime.now(UTC).isoformat()}
    new_id = session.producer.submit(copy, headers={ACTOR_HEADER: session.actor})
    session.record(
        EventKind.RESENT,
        mail_id=mail_id,
        tenant=found.mail.tenant,
        app=found.mail.app,
        round=_round(found.events),
        detail={"new_mail_id": str(new_id)},
    )
    return new_id
