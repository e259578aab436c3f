"""The operator API of one installation, as the web console uses it.

Reads come from the history store (which knows every dead letter, so showing one
never touches a queue); actions go through an ``OperatorSession`` carrying the
acting user, so the history records who did what, as with the command line.
"""

from __future__ import annotations

import threading
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any

from rohrpost.operations import actions
from rohrpost.operations.deadletters import DeadLetterFilter, DeadLetterQueue
from rohrpost.operations.letter import DeadLetter
from rohrpost.operations.preview import DryRun, MailPreview
from rohrpost.operations.session import OperatorSession
from rohrpost.operations.status import Overview, overview
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.errors import RohrpostError, StoreError
from rohrpost.shared.settings import Settings
from rohrpost.shared.store import (
    AuditEntry,
    DeadLetterQuery,
    DeadLetterRow,
    HistoryStore,
    MailFilter,
    MailHistory,
    MailSummary,
)

Progress = Callable[[int, int], None]


class OperatorService:
    """Reads from the store and operator actions, for any actor; safe to share between threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: HistoryStore | None = None
        self._lock = threading.Lock()
        self._dry_run: DryRun | None = None

    def close(self) -> None:
        """Close the store's connections and the renderer."""
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None
            if self._dry_run is not None:
                self._dry_run.close()
                self._dry_run = None

    @property
    def store(self) -> HistoryStore:
        """The history store, opened on first use (StoreError while it cannot be)."""
        with self._lock:
            if self._store is None:
                if not self.settings.history_enabled:
                    raise StoreError("the history is off (history_enabled = false)")
                self._store = HistoryStore.open(self.settings.store_url.get_secret_value())
            return self._store

    def broker_problem(self) -> str | None:
        """Why the broker cannot be reached (for a banner), or None when it can."""
        try:
            with admin_channel(self.settings.broker_url.get_secret_value(), timeout=2):
                return None
        except RohrpostError as exc:
            return f"RabbitMQ cannot be reached: {exc}"

    def store_problem(self) -> str | None:
        """Why the history store cannot be read (for a banner), or None when it can."""
        try:
            self.store.ping()
            return None
        except StoreError as exc:
            self.close_store()
            return f"the history store cannot be read: {exc}"

    def close_store(self) -> None:
        """Forget the store's connections (it is opened again on next use)."""
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    # Reads

    def dead_letters(self, query: DeadLetterQuery) -> tuple[list[DeadLetterRow], int]:
        """A page of dead letters, newest first, and how many match."""
        return self.store.dead_letters(query)

    def dead_letter_keys(self, query: DeadLetterQuery) -> list[tuple[str, str, str]]:
        """Every matching dead letter as (tenant, app, mail id or digest): a set to act on."""
        return self.store.dead_letter_keys(query)

    def invalid_letter(self, letter_id: uuid.UUID) -> dict[str, Any] | None:
        """A dead letter that is not a mail container."""
        return self.store.invalid_letter(letter_id)

    def mails(self, criteria: MailFilter) -> list[MailSummary]:
        """Mails of the history, newest first."""
        return self.store.list_mails(criteria)

    def mail(self, mail_id: uuid.UUID) -> MailHistory | None:
        """One mail and its timeline."""
        return self.store.mail(mail_id)

    def audit(
        self, tenant: str | None = None, limit: int = 100, before: datetime | None = None
    ) -> list[AuditEntry]:
        """Operator actions, newest first (before ``before``, for the next page)."""
        return self.store.audit(tenant=tenant, limit=limit, before=before)

    def paused(self) -> dict[tuple[str, str | None], AuditEntry]:
        """The pauses in force."""
        return self.store.paused()

    def overview(self, tenant: str | None = None, app: str | None = None) -> Overview:
        """What ``rohrpost status`` shows, by the same code: figures a source cannot give
        are None and the overview says why (``broker``, ``history``, ``management``)."""
        try:
            store: HistoryStore | None = self.store
            problem = None
        except StoreError as exc:
            store, problem = None, str(exc)
        shown = overview(self.settings, store, tenant=tenant, app=app, history_problem=problem)
        if store is not None and shown.history is not None:
            self.close_store()  # opened afresh next time, once the store answers again
        return shown

    def preview(self, container: dict[str, Any]) -> MailPreview:
        """``container`` rendered with the current templates, not sent."""
        with self._lock:
            if self._dry_run is None:
                self._dry_run = DryRun(self.settings)
            dry_run = self._dry_run
        return dry_run.preview(container)

    # Actions

    def edit(
        self, actor: str, mail_id: str, tenant: str, replacement: dict[str, Any]
    ) -> dict[str, list[Any]]:
        """Replace a dead letter's container; return the changes."""
        with OperatorSession(self.settings, actor) as session:
            return DeadLetterQueue(session).edit(mail_id, replacement=replacement, tenant=tenant)

    def retry(
        self, actor: str, keys: list[tuple[str, str, str]], on_progress: Progress | None = None
    ) -> tuple[list[DeadLetter], list[tuple[DeadLetter, str]]]:
        """Re-submit the dead letters named by (tenant, app, mail id or digest)."""
        done: list[DeadLetter] = []
        skipped: list[tuple[DeadLetter, str]] = []
        total = len(keys)
        with OperatorSession(self.settings, actor) as session:
            queue = DeadLetterQueue(session)
            for criteria in _per_queue(keys):
                offset = len(done)

                def progress(count: int, _total: int, offset: int = offset) -> None:
                    if on_progress is not None:
                        on_progress(offset + count, total)

                moved, passed = queue.retry(criteria, on_progress=progress)
                done += moved
                skipped += passed
        return done, skipped

    def purge(
        self, actor: str, keys: list[tuple[str, str, str]], on_progress: Progress | None = None
    ) -> int:
        """Delete the dead letters named by (tenant, app, mail id or digest) for good."""
        count = 0
        with OperatorSession(self.settings, actor) as session:
            queue = DeadLetterQueue(session)
            for criteria in _per_queue(keys):
                count += queue.purge(criteria)
                if on_progress is not None:
                    on_progress(count, len(keys))
        return count

    def resend(self, actor: str, mail_id: uuid.UUID) -> uuid.UUID:
        """Submit an archived mail again as a new mail; return its id."""
        with OperatorSession(self.settings, actor) as session:
            return actions.resend(session, mail_id, self.store)

    def cancel(self, actor: str, mail_id: uuid.UUID) -> str:
        """Stop a queued or scheduled mail."""
        with OperatorSession(self.settings, actor) as session:
            return actions.cancel(session, mail_id, self.store)

    def send_now(self, actor: str, mail_id: uuid.UUID) -> str:
        """Send a scheduled or retrying mail now, not when it is due."""
        with OperatorSession(self.settings, actor) as session:
            return actions.send_now(session, mail_id, self.store)

    def hold(self, actor: str, mail_id: uuid.UUID) -> str:
        """Set a waiting mail aside when it comes due, until released."""
        with OperatorSession(self.settings, actor) as session:
            return actions.hold(session, mail_id, self.store)

    def release(self, actor: str, mail_id: uuid.UUID) -> str:
        """Send a held mail again (at once when it was already set aside)."""
        with OperatorSession(self.settings, actor) as session:
            return actions.release(session, mail_id, self.store)

    def pause(self, actor: str, tenant: str, app: str | None) -> str:
        """Hold a tenant's (or an app's) mails."""
        with OperatorSession(self.settings, actor) as session:
            return actions.pause(session, tenant, app)

    def resume(self, actor: str, tenant: str, app: str | None) -> str:
        """Send what a pause held."""
        with OperatorSession(self.settings, actor) as session:
            return actions.resume(session, tenant, app)


def _per_queue(keys: list[tuple[str, str, str]]) -> list[DeadLetterFilter]:
    """One filter per dead-letter queue, naming its letters by mail id or digest."""
    names: dict[tuple[str, str], set[str]] = defaultdict(set)
    for tenant, app, name in keys:
        names[(tenant, app)].add(name)
    filters = []
    for (tenant, app), named in sorted(names.items()):
        ids = frozenset(n for n in named if len(n) == 36)
        digests = frozenset(n for n in named if len(n) == 64)
        filters.append(DeadLetterFilter(tenant=tenant, app=app, ids=ids, digests=digests))
    return filters
