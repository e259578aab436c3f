"""Plain JSON values: their types and nesting depth, checked without recursion.

Python's ``json`` module and pydantic recurse once per nesting level, so a deeply
nested value ends in ``RecursionError`` or a serialisation error far from where it
came in. These checks walk with an explicit stack (or scan the text), so a value
nested 100,000 levels deep is measured as safely as a flat one.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

#: Integers a JSON value may hold: what the history store and most JSON parsers keep exactly.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_SCALARS = (str, bool, type(None))
_CONTAINERS = frozenset({dict, list, tuple})
_PLAIN_SCALARS = frozenset({str, bool, type(None)})
_KEY_SHOWN = 40


class JsonValueError(ValueError):
    """A value is not plain JSON; ``path`` is where (dotted, relative to the value)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


def _step(path: str, key: object) -> str:
    text = str(key) if isinstance(key, str | int) else repr(key)
    if len(text) > _KEY_SHOWN:
        text = text[: _KEY_SHOWN - 1] + "…"
    return f"{path}.{text}" if path else text


def _scalar_problem(value: object) -> str | None:
    """Why a non-container ``value`` is not plain JSON, or None when it is."""
    if isinstance(value, _SCALARS):
        return None
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return None
        return "an integer beyond 64 bits is not kept exactly; send it as a string"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value!r} is not a JSON number"
    return f"{type(value).__name__} is not a JSON type; send a string or number instead"


def check_plain_json(value: object, *, max_depth: int) -> None:
    """Raise JsonValueError unless ``value`` is plain JSON nested at most ``max_depth`` levels.

    Plain JSON: dicts with string keys, lists or tuples, strings, booleans, None,
    finite floats and integers within 64 bits. Each dict or list is one level.
    """
    if type(value) not in _CONTAINERS or not _surely_plain(value, max_depth):
        _find_problem(value, max_depth)


def _surely_plain(value: object, max_depth: int) -> bool:
    """The fast common case: exact built-in types only; False means "look closer"."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return False
        if type(item) is dict:
            for key in item:
                if type(key) is not str:
                    return False
            item = item.values()
        for child in item:
            kind = type(child)
            if kind in _PLAIN_SCALARS:
                continue
            if kind in _CONTAINERS:
                stack.append((child, depth + 1))
            elif not _plain_number(child, kind):
                return False
    return True


def _plain_number(value: Any, kind: type) -> bool:
    if kind is int:
        return bool(INT64_MIN <= value <= INT64_MAX)
    return kind is float and math.isfinite(value)


def _find_problem(value: object, max_depth: int) -> None:
    stack: list[tuple[object, str, int]] = [(value, "", 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            if depth > max_depth:
                raise JsonValueError("", f"nested deeper than {max_depth} levels (the limit)")
            stack.extend(
                (child, _step(path, key), depth + 1)
                for key, child in _children(item, path)
                if not isinstance(child, _SCALARS)  # the common case, without a stack entry
            )
        elif (problem := _scalar_problem(item)) is not None:
            raise JsonValueError(path, problem)


def _children(item: dict[Any, Any] | list[Any] | tuple[Any, ...], path: str) -> Any:
    if not isinstance(item, dict):
        return enumerate(item)
    for key in item:
        if not isinstance(key, str):
            raise JsonValueError(path, f"the key {key!r:.40} is not a string")
    return item.items()


def nesting_exceeds(value: object, max_depth: int) -> bool:
    """True when ``value`` nests dicts and lists deeper than ``max_depth`` levels."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            if depth > max_depth:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if not isinstance(child, str))
    return False


_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}:,]', re.DOTALL)


def deep_path(text: str, max_depth: int, start: int = 0) -> list[str] | None:
    """The keys leading to where JSON ``text`` first nests deeper than ``max_depth``, or None.

    Scans tokens instead of parsing, so it answers for text ``json.loads`` cannot
    read (``RecursionError``). Array positions appear as numbers.
    """
    keys: list[str] = []  # one per open container: its current key or index
    last_string = ""
    for token in _TOKEN.finditer(text, start):
        mark = token.group()
        if mark in "[{":
            if len(keys) >= max_depth:
                return keys
            keys.append("0" if mark == "[" else "")
        elif mark in "]}":
            if not keys:
                return None
            keys.pop()
            if not keys:
                return None  # the first value ended
        elif mark == ":" and keys:
            keys[-1] = _decoded(last_string)
        elif mark == "," and keys and keys[-1].isdigit():
            keys[-1] = str(int(keys[-1]) + 1)
        elif mark.startswith('"'):
            last_string = mark
    return None


def _decoded(string_token: str) -> str:
    try:
        return str(json.loads(string_token))
    except ValueError:
        return string_token[1:-1]
