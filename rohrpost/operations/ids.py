"""Mail ids as operators type them: whole, or a unique prefix (like git's short hashes).

``6c0f5d1e`` (or ``6c0f…`` copied from a listing) names the one mail whose id starts
so; a prefix that fits several lists them, one that fits none says where to look.
The history store answers with a range query on its primary key; the dead-letter
tools match the prefix against the dead letters they read anyway.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING

from rohrpost.shared.errors import OperatorError

if TYPE_CHECKING:  # the store (SQLAlchemy) is not in a client install, which reads dead letters
    from rohrpost.shared.store import HistoryStore

#: Fewest hex digits a prefix needs (as git): shorter ones fit too many mails.
MIN_PREFIX = 4
#: How many mails an ambiguous prefix lists at most.
PREFIX_CANDIDATES = 10
_HEX = frozenset("0123456789abcdef")


def normalize(text: str) -> str:
    """``text`` as a lowercase id or id prefix; ValueError saying what is wrong.

    A trailing ``…`` or ``...`` (as listings and the README shorten ids) is dropped.
    """
    cleaned = text.strip().lower().removesuffix("…").removesuffix("...")
    digits = cleaned.replace("-", "")
    if not digits or not set(digits) <= _HEX or len(digits) > 32:
        raise ValueError(
            f"{text!r} is not a mail id: give the id (a UUID) or its first {MIN_PREFIX} or "
            "more hex digits"
        )
    if len(digits) < MIN_PREFIX:
        raise ValueError(f"{text!r} is too short: give at least {MIN_PREFIX} hex digits of the id")
    return cleaned


def whole_id(text: str) -> uuid.UUID | None:
    """The UUID ``text`` spells out in full, or None when it is a prefix."""
    digits = normalize(text).replace("-", "")
    return uuid.UUID(digits) if len(digits) == 32 else None


def starts_with(mail_id: str | None, prefix: str) -> bool:
    """True when ``mail_id`` begins with the (normalized) ``prefix``, dashes ignored."""
    if mail_id is None:
        return False
    return mail_id.lower().replace("-", "").startswith(prefix.replace("-", ""))


def ambiguous(prefix: str, candidates: Iterable[object], *, more: bool = False) -> OperatorError:
    """The error for a prefix that fits several mails, listing them."""
    listed = ", ".join(str(c) for c in candidates)
    return OperatorError(
        f"id prefix {prefix} fits several mails: {listed}{', …' if more else ''}; give more digits"
    )


def resolve_mail_id(text: str, store: HistoryStore | None) -> uuid.UUID:
    """The mail ``text`` names: a whole id as it is, a prefix through the history store.

    OperatorError when the prefix fits no mail or several (they are listed), or when
    there is no store to look in; ValueError when ``text`` is not an id at all.
    """
    whole = whole_id(text)
    if whole is not None:
        return whole
    prefix = normalize(text)
    if store is None:
        raise OperatorError(
            f"{prefix} is an id prefix, and without the history store it cannot be "
            "looked up: give the whole id"
        )
    found = store.ids_with_prefix(prefix, PREFIX_CANDIDATES + 1)
    if not found:
        raise OperatorError(
            f"the history knows no mail whose id starts with {prefix} (mistyped, or too new "
            "to be archived yet?); check with `rohrpost history list`"
        )
    if len(found) > 1:
        raise ambiguous(prefix, found[:PREFIX_CANDIDATES], more=len(found) > PREFIX_CANDIDATES)
    return found[0]
