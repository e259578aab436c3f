"""Operator actions on mails and tenants: cancel, pause, resume, resend from history.

The actions on one queued, scheduled or retrying mail (``cancel``, ``send_now``,
``hold``, ``release``) reach the mail wherever it waits: they are instructions on the
control stream, which every worker applies when the mail comes by, so no delay queue
has to be searched. Each is recorded in the mail's history with who gave it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from rohrpost.consumer.outcome import cancelled_event_id
from rohrpost.operations.browse import browse
from rohrpost.operations.session import OperatorSession
from rohrpost.shared.broker import Publication
from rohrpost.shared.container import encode_container, parse_container, priority_of
from rohrpost.shared.control import ControlMessage
from rohrpost.shared.errors import OperatorError
from rohrpost.shared.events import EventKind
from rohrpost.shared.store import EventEntry, HistoryStore, MailHistory
from rohrpost.shared.store.writer import TERMINAL
from rohrpost.shared.wire import (
    ACTOR_HEADER,
    RELEASED_HEADER,
    SEND_NOW_HEADER,
    attempt_of,
    carried_headers,
    mail_properties,
    round_of,
)


def unknown_to_history(mail_id: uuid.UUID) -> str:
    """What to say about a mail id the history does not know, and how to check."""
    return (
        f"the history does not know mail {mail_id}: it may be too new (the history "
        "consumer archives a mail within seconds of its submit) or mistyped; check with "
        f"`rohrpost history show {mail_id}` or `rohrpost history list`"
    )


def known_mail(store: HistoryStore | None, mail_id: uuid.UUID, action: str) -> MailHistory:
    """The mail as the history knows it; OperatorError saying why ``action`` cannot be done."""
    if store is None:
        raise OperatorError(f"{action} needs the history store, to know the mail's tenant/app")
    found = store.mail(mail_id)
    if found is None:
        raise OperatorError(unknown_to_history(mail_id))
    return found


def is_held(found: MailHistory) -> bool:
    """True when the mail's last hold or release (by time) was a hold."""
    marks = [e for e in found.events if e.kind in (EventKind.HELD, EventKind.RELEASED)]
    return bool(marks) and max(marks, key=lambda e: e.at).kind == EventKind.HELD


def cancel(session: OperatorSession, mail_id: uuid.UUID, store: HistoryStore | None) -> str:
    """Stop a queued, scheduled, retrying or held mail from being sent; say what was done.

    Every worker learns it from the control stream (also workers started later) and
    drops the mail when it comes due; a held mail is taken out of its held queue.
    Cancelling twice is harmless. A mail the history knows as already sent, expired
    or dead-lettered is refused. An id the history does not know is cancelled all the
    same (the mail may be too new to be archived), and the answer says so.
    """
    found = store.mail(mail_id) if store is not None else None
    if found is not None and found.mail.status == "cancelled":
        return f"mail {mail_id} was already cancelled"
    if found is not None and found.mail.status in TERMINAL:
        hint = " (use `rohrpost dlq purge`)" if found.mail.status == "dead_lettered" else ""
        raise OperatorError(f"mail {mail_id} is already {found.mail.status}{hint}")
    session.control(ControlMessage(action="cancel", mail_id=mail_id, actor=session.actor))
    if found is None:
        known = "" if store is not None else " (no history store to check it against)"
        why = unknown_to_history(mail_id) if store is not None else ""
        return f"cancelled {mail_id}{known}" + (f"; but {why}" if why else "")
    mail = found.mail
    if is_held(found):
        _take_from_held_queue(session, found, mail_id)
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


def send_now(session: OperatorSession, mail_id: uuid.UUID, store: HistoryStore | None) -> str:
    """Send a scheduled or retrying mail now (``postqueue -i``); say what was done.

    The mail waits in the delay levels, which cannot be searched. So its archived
    container (as the history keeps it, edits included) goes straight into its send
    queue as a copy of the same id and round, without ``not_before``, marked with this
    instruction; then the control stream tells every worker to drop the copy still
    waiting when it comes due (an unmarked or older-marked copy of that round). A
    crash between the two steps leaves two copies of one round: the send claim
    (shared state) lets only one of them be sent. Refused for a held mail (release it
    first) and a finished one; a queued mail is already due.
    """
    found = known_mail(store, mail_id, "send-now")
    mail = found.mail
    _refuse_finished(found, mail_id, "to send")
    if is_held(found):
        raise OperatorError(f"mail {mail_id} is held; release it first: rohrpost release {mail_id}")
    if mail.status == "queued":
        return f"mail {mail_id} is already due (queued): it is sent as soon as a worker takes it"
    if found.container is None:
        raise OperatorError(f"cannot send {mail_id} now: the history has no container for it")
    _require_enabled(session, mail.tenant, mail.app)
    given = datetime.now(UTC)  # before the copy can be sent: the timeline's order
    container = parse_container({k: v for k, v in found.container.items() if k != "not_before"})
    mail_round = _round(found.events)
    message = ControlMessage(
        action="send_now", mail_id=mail_id, round=mail_round, actor=session.actor
    )
    properties = mail_properties(
        str(mail_id),
        attempt=mail.attempts + 1,
        round=mail_round,
        headers={SEND_NOW_HEADER: message.mark},
        user_id=session.user,
    )
    queue = session.topology.send_queue(mail.tenant, mail.app, container.priority)
    session.confirm(
        session.publish(Publication("", queue, encode_container(container), properties)),
        f"queueing {mail_id} for sending now",
    )
    session.control(message)
    session.record(
        EventKind.SEND_NOW,
        mail_id=mail_id,
        tenant=mail.tenant,
        app=mail.app,
        round=mail_round,
        at=given,
        detail={"was": mail.status},
    )
    return f"sending {mail_id} now ({mail.tenant}/{mail.app}, was {mail.status})"


def hold(session: OperatorSession, mail_id: uuid.UUID, store: HistoryStore | None) -> str:
    """Hold a queued, scheduled or retrying mail (``postsuper -h``); say what was done.

    Every worker sets the mail aside into its route's held queue
    (``{ns}.held.{tenant}.{app}``) when it comes due, instead of sending it, until
    ``release``. Holding twice is harmless.
    """
    found = known_mail(store, mail_id, "hold")
    mail = found.mail
    _refuse_finished(found, mail_id, "to hold")
    if is_held(found):
        return f"mail {mail_id} is already held"
    session.require_route(mail.tenant, mail.app)
    session.control(ControlMessage(action="hold", mail_id=mail_id, actor=session.actor))
    session.record(
        EventKind.HELD,
        mail_id=mail_id,
        tenant=mail.tenant,
        app=mail.app,
        round=_round(found.events),
    )
    return (
        f"held {mail_id} ({mail.tenant}/{mail.app}, {mail.status}): set aside when due, "
        f"until `rohrpost release {mail_id}`"
    )


def release(session: OperatorSession, mail_id: uuid.UUID, store: HistoryStore | None) -> str:
    """Release a held mail (``postsuper -H``); say what was done.

    The release goes on the control stream first; then a mail already set aside is
    moved back into its send queue, marked with the release (so a worker that has not
    read the release yet does not set it aside again). A mail not yet set aside is
    sent when due.
    """
    found = known_mail(store, mail_id, "release")
    mail = found.mail
    held = is_held(found)
    given = datetime.now(UTC)  # before the mail can be sent: the timeline's order
    message = ControlMessage(action="release", mail_id=mail_id, actor=session.actor, at=given)
    if held:
        session.control(message)
    moved = _move_back(session, found, mail_id, message.mark)
    if not held and not moved:
        raise OperatorError(f"mail {mail_id} is not held (status {mail.status})")
    session.record(
        EventKind.RELEASED,
        mail_id=mail_id,
        tenant=mail.tenant,
        app=mail.app,
        round=_round(found.events),
        at=given,
    )
    where = "moved back into its send queue" if moved else "not set aside yet; sent when due"
    return f"released {mail_id} ({mail.tenant}/{mail.app}): {where}"


def _refuse_finished(found: MailHistory, mail_id: uuid.UUID, what: str) -> None:
    status = found.mail.status
    if status in TERMINAL:
        raise OperatorError(f"mail {mail_id} is already {status}; nothing left {what}")


def _require_enabled(session: OperatorSession, tenant: str, app: str) -> None:
    session.require_route(tenant, app)
    if (tenant, app) not in session.topology.routes:
        raise OperatorError(f"{tenant}/{app} is disabled: its mails are not sent")


def _move_back(session: OperatorSession, found: MailHistory, mail_id: uuid.UUID, mark: int) -> int:
    """Move the mail's copies from its held queue to its send queue; how many there were."""
    tenant, app = found.mail.tenant, found.mail.app
    topology = session.topology
    if (tenant, app) not in topology.routes:
        return 0
    url = session.settings.broker_url.get_secret_value()
    moved = 0
    with browse(url, [topology.held_queue(tenant, app)]) as held:
        for message in held.messages:
            if message.properties.message_id != str(mail_id):
                continue
            properties = mail_properties(
                str(mail_id),
                attempt=attempt_of(message.properties),
                round=round_of(message.properties),
                headers={**carried_headers(message.properties), RELEASED_HEADER: mark},
                user_id=session.user,
            )
            lane = topology.send_queue(tenant, app, priority_of(message.body))
            session.confirm(
                session.publish(Publication("", lane, message.body, properties)),
                f"moving {mail_id} back to its send queue",
            )
            held.remove(message)
            moved += 1
    return moved


def _take_from_held_queue(session: OperatorSession, found: MailHistory, mail_id: uuid.UUID) -> None:
    """Remove a cancelled mail's copies from its held queue (nothing sends them any more)."""
    tenant, app = found.mail.tenant, found.mail.app
    if (tenant, app) not in session.topology.routes:
        return
    url = session.settings.broker_url.get_secret_value()
    with browse(url, [session.topology.held_queue(tenant, app)]) as held:
        for message in held.messages:
            if message.properties.message_id == str(mail_id):
                held.remove(message)
