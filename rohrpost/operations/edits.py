"""Editing a container: ``--set path=value`` / ``--unset path``, validation, and the diff."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rohrpost.shared.errors import ContainerError

#: Fields that identify a mail or its route; changing them would make another mail.
FIXED_FIELDS = frozenset({"id", "tenant", "app", "schema_version", "created_at"})
LIST_FIELDS = frozenset({"to", "cc", "bcc", "reply_to", "tags"})


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string: --set subject=Hello


def apply_edits(
    data: dict[str, Any], assignments: Sequence[str], removals: Sequence[str] = ()
) -> dict[str, Any]:
    """Return a copy of ``data`` with ``path=value`` set and ``path`` removed.

    ``value`` is JSON when it parses as JSON, else a string; a list field given one
    value becomes a one-element list. ``data.name=Anna`` reaches into objects.
    """
    edited: dict[str, Any] = json.loads(json.dumps(data))
    for assignment in assignments:
        path, sep, text = assignment.partition("=")
        if not sep or not path:
            raise ContainerError(f"{assignment!r}: write --set path=value")
        value = _value(text)
        if path in LIST_FIELDS and not isinstance(value, list):
            value = [value]
        _set(edited, path.split("."), value)
    for path in removals:
        _set(edited, path.split("."), None, remove=True)
    return edited


def _set(data: dict[str, Any], parts: list[str], value: Any, *, remove: bool = False) -> None:
    if parts[0] in FIXED_FIELDS:
        raise ContainerError(f"{parts[0]}: cannot be edited (it identifies the mail or its route)")
    target = data
    for depth, part in enumerate(parts[:-1]):
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ContainerError(f"{where}: is not an object, cannot set {'.'.join(parts)}")
        target = child
    if remove:
        target.pop(parts[-1], None)
    else:
        target[parts[-1]] = value


def diff(before: Any, after: Any, path: str = "") -> dict[str, list[Any]]:
    """``{path: [old, new]}`` for every value that differs; objects are compared by key."""
    if isinstance(before, dict) and isinstance(after, dict):
        changes: dict[str, list[Any]] = {}
        for key in sorted(set(before) | set(after)):
            changes.update(diff(before.get(key), after.get(key), f"{path}.{key}" if path else key))
        return changes
    return {} if before == after else {path: [before, after]}
