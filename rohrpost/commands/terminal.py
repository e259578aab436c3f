"""Text for an operator's terminal: what a message holds can never steer it.

A dead letter, a subject in the history or an error quoting a value may carry ESC
sequences (colours, cursor moves, window titles, hyperlinks), other control
characters, bidirectional overrides that reorder what is shown, or lone
surrogates that cannot be written at all. Everything printed from such content
goes through ``printable`` (plain text) or ``printable_json`` (JSON text).
"""

from __future__ import annotations

import json
import re
from typing import Any

from rohrpost.shared.preview import SHOW, Limits, preview

# C1 controls, DEL, bidirectional marks and overrides, line/paragraph separators, surrogates.
_UNSAFE_IN_JSON = "\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE = re.compile(f"[\x00-\x1f{_UNSAFE_IN_JSON}]")
_UNSAFE_JSON = re.compile(f"[{_UNSAFE_IN_JSON}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: object) -> str:
    """``text`` on one line, every control or reordering character written as an escape."""
    return _UNSAFE.sub(_escape, str(text))


def printable_json(text: str) -> str:
    """JSON text with such characters as ``\\uXXXX`` escapes: still valid, equal JSON.

    They can only occur inside strings (JSON's own syntax is ASCII), and JSON
    escapes C0 controls itself.
    """
    return _UNSAFE_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def json_text(value: Any, limits: Limits = SHOW, *, indent: int | None = 2) -> str:
    """A bounded preview of ``value`` as JSON, safe to print (non-ASCII letters kept)."""
    return printable_json(json.dumps(preview(value, limits), indent=indent, ensure_ascii=False))


def cell(value: object, width: int) -> str:
    """``value`` for a table cell of ``width`` characters: printable, cut with ``…``."""
    text = printable("-" if value is None or value == "" else value)
    return text if len(text) <= width else text[: width - 1] + "…"
