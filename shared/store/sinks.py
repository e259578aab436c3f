"""Where the history writer's rows go: SQLAlchemy Core (SQLite), or COPY (PostgreSQL).

The writer decides what a batch changes (``rohrpost.shared.store.writer``); a sink
reads the rows it needs and writes the result, a fixed number of statements per
batch whatever its size. On PostgreSQL, per-row statements cost more than the
rest of archiving together (``python -m bench history``: SQLAlchemy's parameter
building and psycopg's executemany took ~60 % of the consumer's CPU), so rows go
in with ``COPY`` (new rows straight into their table, changed mails through a
temporary table and one ``UPDATE … FROM``) and lookups take the batch's ids as one
array parameter.
"""

from __future__ import annotations

import json
import operator
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from sqlalchemy import Connection, bindparam, delete, insert, select, update

from rohrpost.shared.events import MailEvent
from rohrpost.shared.store.tables import events, mail_recipients, mail_tags, mails

_CHUNK = 500
MAIL_COLUMNS = [column.name for column in mails.columns]
#: The events' columns as ``_event_values`` lists them.
EVENT_COLUMNS = [
    "event_id",
    "mail_id",
    "kind",
    "at",
    "round",
    "attempt",
    "reason",
    "error",
    "smtp_reply",
    "message_id",
    "actor",
    "detail",
]


class MailChange(Protocol):
    """What a sink needs of a mail the writer changed."""

    row: dict[str, Any]
    is_new: bool
    new_content: bool
    changed: set[str]
    tags: tuple[str, ...]
    addresses: tuple[str, ...]


class Sink(Protocol):
    """The statements of one batch."""

    def known_events(self, conn: Connection, ids: list[uuid.UUID]) -> set[uuid.UUID]: ...
    def load_mails(self, conn: Connection, ids: list[uuid.UUID]) -> list[dict[str, Any]]: ...
    def save_mails(self, conn: Connection, changes: Sequence[MailChange]) -> None: ...
    def insert_events(self, conn: Connection, new: Sequence[MailEvent]) -> None: ...


def sink_for(dialect: str) -> Sink:
    """The sink for a database dialect ("postgresql", "sqlite")."""
    return CopySink() if dialect == "postgresql" else CoreSink()


class CoreSink:
    """SQLAlchemy Core statements: executemany, which SQLite runs in C."""

    def known_events(self, conn: Connection, ids: list[uuid.UUID]) -> set[uuid.UUID]:
        found: set[uuid.UUID] = set()
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            column = events.c.event_id
            found.update(conn.execute(select(column).where(column.in_(chunk))).scalars())
        return found

    def load_mails(self, conn: Connection, ids: list[uuid.UUID]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for start in range(0, len(ids), _CHUNK):
            query = select(mails).where(mails.c.id.in_(ids[start : start + _CHUNK]))
            rows += [dict(row) for row in conn.execute(query.with_for_update()).mappings()]
        return rows

    def save_mails(self, conn: Connection, changes: Sequence[MailChange]) -> None:
        created = [m.row for m in changes if m.is_new]
        if created:
            conn.execute(insert(mails), created)
        # One executemany per set of changed columns: a statement per mail cost
        # ~0.8 ms each in SQLAlchemy's statement building alone (measured, 5,000 mails).
        groups: dict[frozenset[str], list[dict[str, Any]]] = {}
        for mail in changes:
            if not mail.is_new and mail.changed:
                row = {f"new_{name}": mail.row[name] for name in mail.changed}
                groups.setdefault(frozenset(mail.changed), []).append(
                    {**row, "mail_id": mail.row["id"]}
                )
        for columns, rows in groups.items():
            statement = (
                update(mails)
                .where(mails.c.id == bindparam("mail_id"))
                .values({name: bindparam(f"new_{name}") for name in sorted(columns)})
            )
            conn.execute(statement, rows)
        content = [m for m in changes if m.new_content]
        ids = [m.row["id"] for m in content]
        for table, column, rows_of in (
            (mail_recipients, "address", _recipient_rows),
            (mail_tags, "tag", _tag_rows),
        ):
            if ids:
                conn.execute(delete(table).where(table.c.mail_id.in_(ids)))
            rows = [{"mail_id": mail_id, column: value} for mail_id, value in rows_of(content)]
            if rows:
                conn.execute(insert(table), rows)

    def insert_events(self, conn: Connection, new: Sequence[MailEvent]) -> None:
        if new:
            rows = [dict(zip(EVENT_COLUMNS, _event_values(e, _same), strict=True)) for e in new]
            conn.execute(insert(events), rows)


class CopySink:
    """PostgreSQL: COPY for rows, one array parameter per lookup."""

    def known_events(self, conn: Connection, ids: list[uuid.UUID]) -> set[uuid.UUID]:
        cursor = _cursor(conn)
        cursor.execute(
            "SELECT event_id FROM events WHERE event_id = ANY(%s::uuid[])", (_uuid_array(ids),)
        )
        return {row[0] for row in cursor.fetchall()}

    def load_mails(self, conn: Connection, ids: list[uuid.UUID]) -> list[dict[str, Any]]:
        cursor = _cursor(conn)
        cursor.execute(
            f"SELECT {', '.join(MAIL_COLUMNS)} FROM mails WHERE id = ANY(%s::uuid[]) "
            "ORDER BY id FOR UPDATE",
            (_uuid_array(ids),),
        )
        return [dict(zip(MAIL_COLUMNS, row, strict=True)) for row in cursor.fetchall()]

    def save_mails(self, conn: Connection, changes: Sequence[MailChange]) -> None:
        cursor = _cursor(conn)
        _copy(cursor, "mails", MAIL_COLUMNS, (_mail_values(m.row) for m in changes if m.is_new))
        updated = [m for m in changes if not m.is_new and m.changed]
        if updated:
            cursor.execute(
                "CREATE TEMP TABLE IF NOT EXISTS rohrpost_mail_changes "
                "(LIKE mails) ON COMMIT DELETE ROWS"
            )
            rows = (_mail_values(m.row) for m in updated)
            _copy(cursor, "rohrpost_mail_changes", MAIL_COLUMNS, rows)
            assignments = ", ".join(f"{c} = t.{c}" for c in MAIL_COLUMNS if c != "id")
            cursor.execute(
                f"UPDATE mails SET {assignments} FROM rohrpost_mail_changes t WHERE mails.id = t.id"
            )
        content = [m for m in changes if m.new_content]
        ids = [m.row["id"] for m in content if not m.is_new]
        if ids:
            array = _uuid_array(ids)
            cursor.execute("DELETE FROM mail_recipients WHERE mail_id = ANY(%s::uuid[])", (array,))
            cursor.execute("DELETE FROM mail_tags WHERE mail_id = ANY(%s::uuid[])", (array,))
        _copy(cursor, "mail_recipients", ["mail_id", "address"], _recipient_rows(content))
        _copy(cursor, "mail_tags", ["mail_id", "tag"], _tag_rows(content))

    def insert_events(self, conn: Connection, new: Sequence[MailEvent]) -> None:
        _copy(
            _cursor(conn), "events", EVENT_COLUMNS, (_event_values(event, _json) for event in new)
        )


def _cursor(conn: Connection) -> Any:
    """A psycopg cursor in the SQLAlchemy connection's transaction."""
    return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]


def _copy(cursor: Any, table: str, columns: list[str], rows: Iterable[tuple[Any, ...]]) -> None:
    rows = list(rows)
    if not rows:
        return
    with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def _mail_values(row: dict[str, Any]) -> tuple[Any, ...]:
    values = _MAIL_VALUES(row)
    return (*values[:_TAGS_AT], _array_text(values[_TAGS_AT]), *values[_TAGS_AT + 1 :])


_MAIL_VALUES = operator.itemgetter(*MAIL_COLUMNS)
_TAGS_AT = MAIL_COLUMNS.index("tags")


def _uuid_array(ids: Iterable[uuid.UUID]) -> str:
    """UUIDs as one PostgreSQL array literal: psycopg dumps a list of them one by one in
    Python (~10 µs a UUID, profiled), ``str`` takes under 1 µs."""
    return "{" + ",".join(map(str, ids)) + "}"


def _array_text(items: list[str] | None) -> str | None:
    """A text array as PostgreSQL reads it in COPY, each element quoted.

    psycopg dumps a list element by element in Python, several microseconds a mail
    at the history's rates; this is one join.
    """
    if items is None:
        return None
    quoted = (item.replace("\\", "\\\\").replace('"', '\\"') for item in items)
    return "{" + ",".join(f'"{item}"' for item in quoted) + "}"


def _recipient_rows(changes: Iterable[MailChange]) -> Iterable[tuple[uuid.UUID, str]]:
    return ((m.row["id"], address) for m in changes for address in m.addresses)


def _tag_rows(changes: Iterable[MailChange]) -> Iterable[tuple[uuid.UUID, str]]:
    return ((m.row["id"], tag) for m in changes for tag in m.tags)


def _json(value: dict[str, Any] | None) -> str | None:
    return json.dumps(value) if value is not None else None


def _same(value: dict[str, Any] | None) -> dict[str, Any] | None:
    return value


def _event_values(
    event: MailEvent, detail: Callable[[dict[str, Any] | None], Any]
) -> tuple[Any, ...]:
    """An event's values in ``EVENT_COLUMNS`` order, its detail as ``detail`` makes it
    (a dict for SQLAlchemy, JSON text for COPY); no dict per event on the COPY path."""
    return (
        event.event_id,
        event.mail_id,
        event.kind.value,
        event.at,
        event.round,
        event.attempt,
        event.reason,
        event.error,
        event.smtp_reply,
        event.message_id,
        event.actor,
        detail(event.detail),
    )
