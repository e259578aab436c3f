"""A file of mails for ``rohrpost submit --file``: JSON lines, or one JSON array.

Every mail keeps the line it starts on, so every refusal names where to look:
``mails.jsonl line 3: …`` or ``mails.json mail #2 (line 5): …``. Lines and mails
count from 1.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from rohrpost.shared.container import MAX_DATA_DEPTH
from rohrpost.shared.errors import ContainerError
from rohrpost.shared.jsonvalue import deep_path

_SPACE = re.compile(r"[ \t\n\r]*")


@dataclass
class MailFile:
    """The mails of one file, each with the line it starts on."""

    name: str
    is_array: bool = False
    mails: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def where(self, position: int) -> str:
        """Where mail ``position`` (from 1) is: ``name line 3`` or ``name mail #2 (line 5)``."""
        line = self.lines[position - 1]
        if self.is_array:
            return f"{self.name} mail #{position} (line {line})"
        return f"{self.name} line {line}"

    def add(self, item: Any, line: int, position: int) -> None:
        if not isinstance(item, dict):
            where = f"mail #{position} (line {line})" if self.is_array else f"line {line}"
            raise ContainerError(
                f"{self.name} {where}: a mail must be a JSON object, not {_kind(item)}"
            )
        self.mails.append(item)
        self.lines.append(line)


def read_mail_file(name: str, raw: bytes) -> MailFile:
    """Parse ``raw`` (UTF-8, an optional BOM); ContainerError names the line of any fault."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad_line = raw.count(b"\n", 0, exc.start) + 1
        raise ContainerError(f"{name} line {bad_line}: not UTF-8 text") from None
    if text.lstrip().startswith("["):
        return _array(MailFile(name, is_array=True), text)
    mails = MailFile(name)
    # Split on LF only: JSON strings may hold U+2028 and other characters splitlines() splits on.
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            mails.add(_loads(line, name, number), number, len(mails.mails) + 1)
    return mails


def _loads(line: str, name: str, number: int) -> Any:
    where = f"{name} line {number}"
    try:
        return json.loads(line)
    except RecursionError:
        raise _too_deep(where, line, 0) from None
    except json.JSONDecodeError as exc:
        raise ContainerError(f"{where}: not JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:  # e.g. a number of more than 4,300 digits
        raise ContainerError(f"{where}: not JSON: {exc}") from None


def _skip(text: str, position: int) -> int:
    """The position after any JSON whitespace at ``position``."""
    match = _SPACE.match(text, position)
    return match.end() if match else position


def _array(mails: MailFile, text: str) -> MailFile:
    decoder = json.JSONDecoder()
    position = _skip(text, text.index("[") + 1)
    line, counted = 1, 0
    while not text.startswith("]", position):
        line, counted = line + text.count("\n", counted, position), position
        where = f"{mails.name} mail #{len(mails.mails) + 1} (line {line})"
        try:
            item, end = decoder.raw_decode(text, position)
        except RecursionError:
            raise _too_deep(where, text, position) from None
        except json.JSONDecodeError as exc:  # its line and column are the file's
            raise ContainerError(
                f"{mails.name} line {exc.lineno}: not JSON: {exc.msg} (column {exc.colno}, "
                f"in mail #{len(mails.mails) + 1})"
            ) from None
        except ValueError as exc:
            raise ContainerError(f"{where}: not JSON: {exc}") from None
        mails.add(item, line, len(mails.mails) + 1)
        position = _skip(text, end)
        if text.startswith(",", position):
            position = _skip(text, position + 1)
        elif not text.startswith("]", position):
            raise _syntax(mails.name, text, position, "expected ',' or ']' after a mail")
    end = _skip(text, position + 1)
    if end < len(text):
        raise _syntax(mails.name, text, end, "unexpected text after the array")
    return mails


def _syntax(name: str, text: str, position: int, what: str) -> ContainerError:
    line = text.count("\n", 0, position) + 1
    column = position - text.rfind("\n", 0, position)
    return ContainerError(f"{name} line {line}: not JSON: {what} (column {column})")


def _too_deep(where: str, text: str, start: int) -> ContainerError:
    start = _skip(text, start)
    if not text.startswith("{", start):
        return ContainerError(f"{where}: a mail must be a JSON object, not an array")
    path = deep_path(text, MAX_DATA_DEPTH + 1, start) or ["container"]
    return ContainerError(
        f"{where}: {path[0]}: nested deeper than {MAX_DATA_DEPTH} levels (the limit)"
    )


def _kind(item: Any) -> str:
    kinds = {list: "an array", str: "a string", int: "a number", float: "a number"}
    return kinds.get(type(item), "JSON " + json.dumps(item))
