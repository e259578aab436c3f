"""The history store: every mail's fate, in SQLite (default) or PostgreSQL."""

from rohrpost.shared.store.audit import AuditEntry
from rohrpost.shared.store.history import (
    EventEntry,
    HistoryStore,
    MailFilter,
    MailHistory,
    MailSummary,
    OperatorAction,
)
from rohrpost.shared.store.letters import DeadLetterQuery, DeadLetterRow
from rohrpost.shared.store.writer import HistoryRecord

__all__ = [
    "AuditEntry",
    "DeadLetterQuery",
    "DeadLetterRow",
    "EventEntry",
    "HistoryRecord",
    "HistoryStore",
    "MailFilter",
    "MailHistory",
    "MailSummary",
    "OperatorAction",
]
