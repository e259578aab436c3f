"""Reading the history: search mails, show one mail's timeline, purge old ones.

The Python API behind ``rohrpost history …`` and, later, a web console.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, field_validator
from sqlalchemy import Engine, Select, delete, exists, select

from rohrpost.shared.container import bare_address
from rohrpost.shared.errors import StoreError
from rohrpost.shared.events import MailEvent
from rohrpost.shared.store.database import (
    create_store_engine,
    migrate,
    require_migrated,
    translate_errors,
)
from rohrpost.shared.store.tables import events, mail_recipients, mail_tags, mails, operator_actions
from rohrpost.shared.store.writer import TERMINAL, HistoryRecord, HistoryWriter


def split_recipients(value: object) -> list[str]:
    """The addresses of a stored recipients text (``"Anna <a@x>, b@y"``), each as written.

    Commas inside a quoted display name (``"Schmidt, Anna" <a@x>``) or inside ``<…>``
    do not split.
    """
    if isinstance(value, list):
        return [str(item) for item in value]
    if not isinstance(value, str) or not value:
        return []
    found: list[str] = []
    current: list[str] = []
    quoted = angled = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"' and not angled:
            quoted = not quoted
        elif char in "<>" and not quoted:
            angled = char == "<"
        elif char == "," and not (quoted or angled):
            found.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    found.append("".join(current).strip())
    return [address for address in found if address]


class MailFilter(BaseModel):
    """What ``list_mails`` returns: every given criterion must hold."""

    model_config = ConfigDict(frozen=True)

    tenant: str | None = None
    app: str | None = None
    status: str | None = None
    to: str | None = None
    tag: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 100

    @field_validator("to")
    @classmethod
    def _bare_address(cls, value: str | None) -> str | None:
        """``Anna <anna@example.com>`` finds Anna's mails: the store indexes bare addresses."""
        return None if value is None else bare_address(value.strip()).lower()


class MailSummary(BaseModel):
    """One mail as the history knows it."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    tenant: str
    app: str
    status: str
    created_at: datetime | None
    updated_at: datetime
    not_before: datetime | None
    sent_at: datetime | None
    sender: str | None
    #: to, cc and bcc as submitted (``Anna <anna@example.com>``); empty once deleted
    recipients: Annotated[list[str], BeforeValidator(split_recipients)]
    subject: str | None
    template: str | None
    attempts: int
    last_error: str | None
    reason: str | None
    message_id: str | None
    history: str | None
    content_deleted: bool
    resend_of: uuid.UUID | None


class EventEntry(BaseModel):
    """One step of a mail's timeline."""

    model_config = ConfigDict(frozen=True)

    event_id: uuid.UUID
    kind: str
    at: datetime
    round: int
    attempt: int | None
    reason: str | None
    error: str | None
    smtp_reply: str | None
    message_id: str | None
    actor: str | None
    detail: dict[str, Any] | None


class OperatorAction(BaseModel):
    """An operator action on a whole tenant or app (pause, resume)."""

    model_config = ConfigDict(frozen=True)

    event_id: uuid.UUID
    kind: str
    at: datetime
    actor: str | None
    tenant: str
    app: str | None
    detail: dict[str, Any] | None


class MailHistory(BaseModel):
    """One mail, its container (when kept) and its whole timeline, oldest first."""

    model_config = ConfigDict(frozen=True)

    mail: MailSummary
    container: dict[str, Any] | None
    events: list[EventEntry]


_SUMMARY_COLUMNS = [mails.c[name] for name in MailSummary.model_fields]
_EVENT_RANK = {"submitted": 0, "scheduled": 1, "attempt_failed": 2}


class HistoryStore:
    """The history store: one engine, shared by readers and the writer."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._writer = HistoryWriter(engine)

    @classmethod
    def open(cls, url: str, *, migrate_schema: bool = False) -> HistoryStore:
        """Open the store at ``url``; migrate it, or insist that it is migrated.

        Only migrating creates a SQLite file: opened to read, a missing file is a
        StoreError that says so (SQLite would create an empty one).
        """
        if not migrate_schema:
            _require_sqlite_file(url)
        engine = create_store_engine(url)
        try:
            if migrate_schema:
                migrate(engine)
            else:
                require_migrated(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()

    def write(self, records: Iterable[HistoryRecord]) -> int:
        """Store records in one transaction; return how many events were new."""
        return len(self._writer.write(records))

    def write_new(self, records: Iterable[HistoryRecord]) -> list[MailEvent]:
        """Store records in one transaction; return the events that were new."""
        return self._writer.write(records)

    def list_mails(self, criteria: MailFilter | None = None) -> list[MailSummary]:
        """Mails matching ``criteria``, newest first."""
        query = _filtered(select(*_SUMMARY_COLUMNS), criteria or MailFilter())
        with translate_errors(), self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [MailSummary.model_validate(dict(row)) for row in rows]

    def mail(self, mail_id: uuid.UUID) -> MailHistory | None:
        """One mail with its timeline, or None when the history does not know it."""
        with translate_errors(), self.engine.connect() as conn:
            row = (
                conn.execute(
                    select(*_SUMMARY_COLUMNS, mails.c.container).where(mails.c.id == mail_id)
                )
                .mappings()
                .first()
            )
            if row is None:
                return None
            timeline = (
                conn.execute(select(events).where(events.c.mail_id == mail_id)).mappings().all()
            )
        entries = [EventEntry.model_validate(dict(e)) for e in timeline]
        entries.sort(key=lambda e: (e.round, e.at, _EVENT_RANK.get(e.kind, 3)))
        summary = MailSummary.model_validate({k: row[k] for k in MailSummary.model_fields})
        container = json.loads(row["container"]) if row["container"] else None
        return MailHistory(mail=summary, container=container, events=entries)

    def ids_with_prefix(self, prefix: str, limit: int = 11) -> list[uuid.UUID]:
        """Ids of mails starting with ``prefix`` (hex digits, dashes ignored), in order.

        A range query on the primary key (``low <= id <= high``), so it stays an
        index lookup however many mails the store holds.
        """
        low, high = prefix_range(prefix)
        query = select(mails.c.id).where(mails.c.id >= low, mails.c.id <= high)
        with translate_errors(), self.engine.connect() as conn:
            return list(conn.execute(query.order_by(mails.c.id).limit(limit)).scalars())

    def actions(self, tenant: str | None = None, limit: int = 100) -> list[OperatorAction]:
        """Tenant-wide operator actions, newest first."""
        query = select(operator_actions).order_by(operator_actions.c.at.desc()).limit(limit)
        if tenant is not None:
            query = query.where(operator_actions.c.tenant == tenant)
        with translate_errors(), self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [OperatorAction.model_validate(dict(r)) for r in rows]

    def purge(
        self, older_than: datetime, *, tenant: str | None = None, app: str | None = None
    ) -> int:
        """Delete finished mails (and their events) last changed before ``older_than``."""
        query = delete(mails).where(mails.c.status.in_(TERMINAL), mails.c.updated_at < older_than)
        if tenant is not None:
            query = query.where(mails.c.tenant == tenant)
        if app is not None:
            query = query.where(mails.c.app == app)
        with translate_errors(), self.engine.begin() as conn:
            return conn.execute(query).rowcount


def prefix_range(prefix: str) -> tuple[uuid.UUID, uuid.UUID]:
    """The lowest and highest id starting with ``prefix``; ValueError unless it is hex."""
    digits = prefix.replace("-", "").lower()
    if not digits or len(digits) > 32 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError(f"{prefix!r} is not the start of a mail id (hex digits and dashes)")
    return uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f"))


def _require_sqlite_file(url: str) -> None:
    """StoreError when ``url`` is a SQLite file that does not exist."""
    scheme, _, rest = url.partition(":///")
    path = rest.partition("?")[0]
    if scheme.partition("+")[0] != "sqlite" or not path or path == ":memory:":
        return
    if not Path(path).exists():
        raise StoreError(
            f"the history store {path} does not exist: no history consumer has run with "
            "this configuration yet (`rohrpost store migrate` creates it)"
        )


def _filtered(query: Select[Any], criteria: MailFilter) -> Select[Any]:
    for column, value in (
        (mails.c.tenant, criteria.tenant),
        (mails.c.app, criteria.app),
        (mails.c.status, criteria.status),
    ):
        if value is not None:
            query = query.where(column == value)
    if criteria.since is not None:
        query = query.where(mails.c.updated_at >= criteria.since)
    if criteria.until is not None:
        query = query.where(mails.c.updated_at < criteria.until)
    if criteria.to is not None:
        query = query.where(
            exists().where(
                mail_recipients.c.mail_id == mails.c.id,
                mail_recipients.c.address == criteria.to.lower(),
            )
        )
    if criteria.tag is not None:
        query = query.where(
            exists().where(mail_tags.c.mail_id == mails.c.id, mail_tags.c.tag == criteria.tag)
        )
    return query.order_by(mails.c.updated_at.desc()).limit(criteria.limit)
