"""PostgreSQL's COPY sink and SQLite's statements store a batch's rows alike."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from rohrpost.shared.container import MailContainer, parse_container
from rohrpost.shared.events import EventKind, MailEvent
from rohrpost.shared.store import HistoryRecord, HistoryStore
from rohrpost.shared.store.sinks import EVENT_COLUMNS
from rohrpost.shared.store.tables import events, mail_recipients, mail_tags, mails
from tests.conftest import postgres_database

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
#: Text that COPY must escape, and what the store must make storable (NUL).
AWKWARD = 'tab\there, new\nline, back\\slash, "quotes", {braces}, comma, nul\x00, é'


def mail(number: int, **fields: Any) -> MailContainer:
    return parse_container(
        {
            "id": str(uuid.UUID(int=number)),
            "tenant": "acme",
            "app": "billing",
            "to": [f"Anna {number} <Anna{number}@Example.com>", f"x{number}@example.com"],
            "subject": 'Invoice "7" \\ {a,b}',
            "text": "x",
            "tags": ['quote"d', "back\\slash", "{brace}", "com,ma", "plain"],
            "created_at": T0.isoformat(),
            **fields,
        }
    )


def happened(
    container: MailContainer, kind: EventKind, seconds: int, round_: int = 0, **fields: Any
) -> HistoryRecord:
    event = MailEvent(
        event_id=uuid.uuid5(container.id, f"{kind.value}.{round_}.{seconds}"),
        kind=kind,
        mail_id=container.id,
        tenant=container.tenant,
        app=container.app,
        at=T0 + timedelta(seconds=seconds),
        round=round_,
        **fields,
    )
    content = kind in (EventKind.SUBMITTED, EventKind.RESUBMITTED)
    return HistoryRecord(event, container if content else None, "billing@acme.example")


def batches() -> list[list[HistoryRecord]]:
    """New mails, then changes to them (one batch late, one early), a re-submission, repeats."""
    first, second, dropped = (
        mail(1),
        mail(2, not_before=(T0 + timedelta(hours=1)).isoformat()),
        mail(3, history="delete"),
    )
    failed = happened(first, EventKind.ATTEMPT_FAILED, 5, attempt=1, error=AWKWARD)
    corrected = mail(1, subject="Corrected", tags=["new"], to=["c@example.com"])
    return [
        [
            happened(first, EventKind.SUBMITTED, 0),
            happened(second, EventKind.SUBMITTED, 0),
            happened(second, EventKind.SCHEDULED, 0),
            failed,
        ],
        [
            happened(first, EventKind.SENT, 9, attempt=2, smtp_reply=AWKWARD, subject="Sent"),
            happened(dropped, EventKind.SENT, 4, attempt=1, message_id="<m@x>"),
            happened(dropped, EventKind.SUBMITTED, 0),
            failed,
            happened(second, EventKind.DEAD_LETTERED, 8, attempt=3, reason="rejected", error="550"),
        ],
        [
            happened(corrected, EventKind.RESUBMITTED, 20, round_=1, actor=AWKWARD),
            happened(corrected, EventKind.EDITED, 15, detail={"subject": [AWKWARD, "Corrected"]}),
            failed,
        ],
    ]


def stored_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the history's mail tables, in key order."""
    store = HistoryStore.open(url, migrate_schema=True)
    try:
        for batch in batches():
            store.write_new(batch)
        with store.engine.connect() as conn:
            return {
                table.name: [
                    tuple(row)
                    for row in conn.execute(
                        select(table).order_by(*(c for c in table.primary_key.columns))
                    )
                ]
                for table in (mails, events, mail_recipients, mail_tags)
            }
    finally:
        store.close()


@pytest.fixture
def both_stores(postgres_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    with postgres_database(postgres_url) as url:
        yield f"sqlite:///{tmp_path / 'history.db'}", url


def test_copy_and_statements_store_the_same_rows(both_stores: tuple[str, str]) -> None:
    sqlite_url, postgres_url = both_stores
    on_sqlite, on_postgres = stored_rows(sqlite_url), stored_rows(postgres_url)
    assert [len(rows) for rows in on_postgres.values()] == [3, 10, 3, 6]
    for table, rows in on_sqlite.items():
        assert on_postgres[table] == rows, table


def test_a_batch_stores_awkward_text_storable_and_whole(both_stores: tuple[str, str]) -> None:
    for url in both_stores:
        rows = stored_rows(url)
        errors = {row[7] for row in rows["events"]}
        assert AWKWARD.replace("\x00", "\ufffd") in errors
        first = next(row for row in rows["mails"] if row[0] == uuid.UUID(int=1))
        assert first[2:5] == ("billing", "queued", 1)
        assert first[-1] == ["new"]


def test_the_event_rows_name_every_column_of_the_events_table_once() -> None:
    # Listed by hand for the rows built without a dict; a column added to the table
    # and not here would be left empty by both sinks alike.
    assert sorted(EVENT_COLUMNS) == sorted(column.name for column in events.columns)
    assert len(set(EVENT_COLUMNS)) == len(EVENT_COLUMNS)
