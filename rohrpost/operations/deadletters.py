"""The dead-letter queues: list, show, edit, retry and purge dead letters.

Reading holds every message of a dead-letter queue unacked and lets the broker put
back what was not moved (see ``rohrpost.operations.browse``). Moving is publish-with-confirm
first, ack second: a crash in between leaves the mail twice (in the DLQ and where it
went), never nowhere. Only the queues of the tenant/app asked for are opened.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from rohrpost.operations.browse import Browse, Message, browse
from rohrpost.operations.edits import apply_edits, diff
from rohrpost.operations.ids import ambiguous, starts_with
from rohrpost.operations.letter import DeadLetter, read_letter
from rohrpost.operations.session import OperatorSession
from rohrpost.shared.broker import Publication
from rohrpost.shared.container import encode_container, parse_container
from rohrpost.shared.errors import ContainerError, OperatorError, UnknownRoute
from rohrpost.shared.events import INVALID_BODY, REPLACED_BODY, EventKind
from rohrpost.shared.preview import clip
from rohrpost.shared.wire import (
    ACTOR_HEADER,
    ATTEMPTS_HEADER,
    DEAD_AT_HEADER,
    EDITED_AT_HEADER,
    EDITED_BY_HEADER,
    ERROR_HEADER,
    REASON_HEADER,
    mail_properties,
)


class DeadLetterFilter(BaseModel):
    """Which dead letters an operation applies to; every given criterion must hold."""

    model_config = ConfigDict(frozen=True)

    tenant: str | None = None
    app: str | None = None
    reason: str | None = None
    since: datetime | None = None
    #: mail ids, or unique prefixes of them (see rohrpost.operations.ids)
    ids: frozenset[str] | None = None
    #: SHA-256 of bodies: names dead letters that are not mail containers (or have no id).
    digests: frozenset[str] | None = None

    def matches(self, letter: DeadLetter) -> bool:
        """True when ``letter`` meets every criterion (ids or digests: either names it)."""
        named = self.ids is None and self.digests is None
        named = named or (
            self.ids is not None and any(starts_with(letter.mail_id, i) for i in self.ids)
        )
        named = named or (self.digests is not None and letter.digest in self.digests)
        return (
            named
            and (self.reason is None or letter.reason == self.reason)
            and (
                self.since is None or (letter.dead_at is not None and letter.dead_at >= self.since)
            )
        )

    def unmatched(self, letters: Sequence[DeadLetter]) -> list[str]:
        """The ids (or prefixes) asked for that none of ``letters`` has."""
        return sorted(
            i for i in self.ids or () if not any(starts_with(x.mail_id, i) for x in letters)
        )

    def check_unique(self, letters: Sequence[DeadLetter]) -> None:
        """OperatorError when an id prefix fits dead letters of several mails."""
        for prefix in sorted(self.ids or ()):
            fitting = sorted({str(x.mail_id) for x in letters if starts_with(x.mail_id, prefix)})
            if len(fitting) > 1:
                raise ambiguous(prefix, fitting)


@dataclass(frozen=True)
class _Held:
    letter: DeadLetter
    message: Message


class DeadLetterQueue:
    """The dead-letter queues of one installation, seen through an OperatorSession."""

    def __init__(self, session: OperatorSession) -> None:
        self._session = session
        self._topology = session.topology

    def letters(self, criteria: DeadLetterFilter | None = None) -> list[DeadLetter]:
        """Every matching dead letter; nothing is removed from the queues."""
        with self._held(criteria or DeadLetterFilter()) as (_session, held):
            return [h.letter for h in held]

    def get(self, mail_id: str, *, tenant: str | None = None) -> DeadLetter:
        """The dead letter of ``mail_id`` (or a unique prefix); OperatorError when none."""
        found = self.letters(DeadLetterFilter(ids=frozenset({mail_id}), tenant=tenant))
        if not found:
            raise OperatorError(f"no dead letter {mail_id}")
        return found[0]

    def edit(
        self,
        mail_id: str,
        *,
        assignments: Sequence[str] = (),
        removals: Sequence[str] = (),
        replacement: dict[str, Any] | None = None,
        tenant: str | None = None,
    ) -> dict[str, list[Any]]:
        """Correct a dead letter in place; return the changes ``{path: [old, new]}``.

        The edited container is validated before anything moves (ContainerError
        names the field). The corrected copy goes into the same dead-letter queue,
        confirmed, before the original is removed; then the edit is recorded.
        """
        criteria = DeadLetterFilter(ids=frozenset({mail_id}), tenant=tenant)
        with self._held(criteria) as (browsing, held):
            if not held:
                raise OperatorError(f"no dead letter {mail_id}")
            letter, message = held[0].letter, held[0].message
            mail_id = letter.mail_id or mail_id  # the whole id, when a prefix was given
            if replacement is None and letter.container is None:
                raise OperatorError(
                    f"dead letter {mail_id} is not a mail container: {letter.problem}; "
                    "replace it whole with --editor, or delete it with `rohrpost dlq purge`"
                )
            before = letter.container or {}
            after = (
                replacement
                if replacement is not None
                else apply_edits(before, assignments, removals)
            )
            container = parse_container(after)
            if (str(container.id), container.tenant, container.app) != (
                mail_id,
                letter.tenant,
                letter.app,
            ):
                raise ContainerError("id, tenant and app cannot be edited")
            body = encode_container(container)
            changes = diff(before, json.loads(body))
            if not changes:
                return {}
            headers = {
                k: v
                for k, v in letter.headers.items()
                if isinstance(k, str) and not k.startswith("x-")
            }
            headers |= {
                REASON_HEADER: letter.reason,
                ERROR_HEADER: letter.error or "",
                ATTEMPTS_HEADER: letter.attempts or 0,
                DEAD_AT_HEADER: int(letter.dead_at.timestamp()) if letter.dead_at else 0,
                EDITED_BY_HEADER: self._session.actor,
                EDITED_AT_HEADER: int(time.time()),
            }
            properties = mail_properties(
                mail_id, round=letter.round, headers=headers, user_id=self._session.user
            )
            self._session.confirm(
                self._session.publish(Publication("", letter.queue, body, properties)),
                f"storing the edited dead letter {mail_id}",
            )
            browsing.remove(message)
        # The corrected container goes along, so the history shows the letter as it now is.
        detail: dict[str, Any] = {"changes": changes, "container": json.loads(body)}
        if letter.container is None:
            detail[REPLACED_BODY] = letter.digest
        self._session.record(
            EventKind.EDITED,
            mail_id=container.id,
            tenant=letter.tenant,
            app=letter.app,
            round=letter.round,
            reason=clip(letter.reason, 40),
            detail=detail,
        )
        return changes

    def retry(
        self,
        criteria: DeadLetterFilter,
        *,
        dry_run: bool = False,
        window: int = 200,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> tuple[list[DeadLetter], list[tuple[DeadLetter, str]]]:
        """Re-submit matching dead letters with the attempt counter reset.

        Returns (re-submitted, skipped with the reason). Each is published through
        the submit exchange (so the history records a ``resubmitted`` event with the
        actor) and confirmed before it leaves the dead-letter queue. ``on_progress``
        gets (done, total) after each one.
        """
        producer = self._session.producer
        headers = {ACTOR_HEADER: self._session.actor}
        done: list[DeadLetter] = []
        skipped: list[tuple[DeadLetter, str]] = []
        with self._held(criteria) as (browsing, held):
            ready = []
            for item in held:
                if item.letter.container is None:
                    skipped.append((item.letter, f"not a mail container: {item.letter.problem}"))
                    continue
                try:
                    _, publication = producer.prepare(
                        item.letter.container, headers=headers, round=item.letter.round + 1
                    )
                except (ContainerError, UnknownRoute) as exc:
                    skipped.append((item.letter, f"{exc}; fix it with `rohrpost dlq edit`"))
                    continue
                ready.append((item, publication))
            if dry_run:
                return [item.letter for item, _ in ready], skipped
            for start in range(0, len(ready), window):
                chunk = ready[start : start + window]
                futures = [(item, self._session.publish(pub)) for item, pub in chunk]
                for item, future in futures:
                    self._session.confirm(future, f"re-submitting {item.letter.mail_id}")
                browsing.remove_many([item.message for item, _ in chunk])  # all confirmed
                done += [item.letter for item, _ in chunk]
                if on_progress is not None:
                    on_progress(len(done), len(ready))
        return done, skipped

    def purge(self, criteria: DeadLetterFilter) -> int:
        """Remove matching dead letters for good, recording each in its mail's history."""
        count = 0
        with self._held(criteria) as (browsing, held):
            for item in held:
                self._record_purge(item.letter)
                browsing.remove(item.message)
                count += 1
        return count

    def _record_purge(self, letter: DeadLetter) -> None:
        detail: dict[str, Any] = {"reason": clip(letter.reason, 1000)}
        if letter.container is None:  # the history knows it by its bytes
            self._session.record(
                EventKind.PURGED,
                tenant=letter.tenant,
                app=letter.app,
                round=letter.round,
                detail={**detail, INVALID_BODY: letter.digest},
            )
        elif letter.mail_id is not None:
            with contextlib.suppress(ValueError):
                self._session.record(
                    EventKind.PURGED,
                    mail_id=uuid.UUID(letter.mail_id),
                    tenant=letter.tenant,
                    app=letter.app,
                    round=letter.round,
                    detail=detail,
                )

    @contextlib.contextmanager
    def _held(self, criteria: DeadLetterFilter) -> Iterator[tuple[Browse, list[_Held]]]:
        """Hold every message of the chosen queues; the matching ones are returned."""
        routes = {
            self._topology.dead_queue(tenant, app): (tenant, app)
            for tenant, app in self._topology.routes
            if criteria.tenant in (None, tenant) and criteria.app in (None, app)
        }
        if criteria.tenant is not None and not routes:
            raise OperatorError(f"no enabled app of tenant {criteria.tenant!r} matches")
        url = self._session.settings.broker_url.get_secret_value()
        with browse(url, list(routes)) as session:
            held = []
            for message in session.messages:
                tenant, app = routes[message.queue]
                letter = read_letter(tenant, app, message.queue, message.properties, message.body)
                if criteria.matches(letter):
                    held.append(_Held(letter, message))
            criteria.check_unique([h.letter for h in held])
            yield session, held
