"""The history store: every mail's fate, in SQLite (default) or PostgreSQL."""

from rohrpost.shared.store.history import (
    EventEntry,
    HistoryStore,
    MailFilter,
    MailHistory,
    MailSummary,
    OperatorAction,
)
from rohrpost.shared.store.writer import HistoryRecord

__all__ = [
    "EventEntry",
    "HistoryRecord",
    "HistoryStore",
    "MailFilter",
    "MailHistory",
    "MailSummary",
    "OperatorAction",
]
