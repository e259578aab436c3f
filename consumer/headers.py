"""Header values as they go on the wire: folded, encoded, no line over 998 octets.

Short printable ASCII goes out as it is (the common case, and the fast one). Longer
printable ASCII is folded before spaces. What cannot be folded within 998 octets,
and everything else (non-ASCII, or a control character a rendered template or an
old container brought), becomes RFC 2047 encoded words, one a line: a control
character is then carried encoded, never as a raw byte. File names that are long
or not plain ASCII become RFC 2231 parameters, continued over lines.
"""

from __future__ import annotations

import binascii
import re
from urllib.parse import quote

#: RFC 2047's limit for a line holding encoded words (RFC 5322 recommends 78).
FOLD_AT = 76
#: RFC 5322's hard limit for a line, CRLF not counted.
MAX_LINE = 998

_WORD_OVERHEAD = len("=?utf-8?b??=")
#: A run of spaces and the word after it, or the spaces that end the text.
_TOKEN = re.compile(r" *[^ ]+| +$")


def is_plain(value: str) -> bool:
    """True for printable ASCII: no encoding needed, no control character."""
    return value.isascii() and value.isprintable()


def unstructured(name: str, value: str) -> str:
    """The value of header ``name`` (subject, custom headers) ready to follow ``name: ``."""
    room = FOLD_AT - len(name) - 2
    if is_plain(value):
        if len(value) <= room:
            return value
        folded = _fold_at_spaces(value, room, MAX_LINE - len(name) - 2)
        if folded is not None:
            return folded
    return encoded_words(value, room)


def _fold_at_spaces(value: str, room: int, first_limit: int) -> str | None:
    """``value`` folded before spaces, lines within ``room`` where its words allow.

    None when a word is too long for a line even so. Unfolding (removing each CRLF)
    gives back ``value`` exactly.
    """
    lines: list[str] = []
    line = ""
    for token in _TOKEN.findall(value):
        # A line of spaces alone is not allowed: trailing spaces stay where they are.
        if line and len(line) + len(token) > room and not token.isspace():
            lines.append(line)
            line, room = token, FOLD_AT
        else:
            line += token
    lines.append(line)
    if len(lines[0]) > first_limit or any(len(rest) > MAX_LINE for rest in lines[1:]):
        return None
    return "\r\n".join(lines)


def encoded_words(value: str, room: int) -> str:
    """``value`` as RFC 2047 encoded words (UTF-8, base64), one a line.

    The first word fits in ``room`` characters, but holds one character at least: a
    value that starts on the line after its header name gains a leading space in the
    standard library's parser. Each later word has a line of its own within FOLD_AT.
    A word never splits a character, as RFC 2047 requires.
    """
    raw = value.encode("utf-8")
    words: list[str] = []
    room = max(room, _WORD_OVERHEAD + 8)  # room for a 4-byte character
    start = 0
    while start < len(raw):
        end = min(len(raw), start + (room - _WORD_OVERHEAD) // 4 * 3)
        while end < len(raw) and raw[end] & 0xC0 == 0x80:  # a UTF-8 continuation byte
            end -= 1
        payload = binascii.b2a_base64(raw[start:end], newline=False).decode("ascii")
        words.append(f"=?utf-8?b?{payload}?=")
        start, room = end, FOLD_AT - 1
    return "\r\n ".join(words)


def filename_parameter(filename: str) -> str:
    """The ``filename`` parameter of a Content-Disposition, each line within FOLD_AT - 1.

    Plain short names are quoted; others are RFC 2231 ``filename*=utf-8''…``, split
    into ``filename*0*=``, ``filename*1*=`` … when longer than a line. Sections end on
    character boundaries: parsers (the standard library's among them) decode each
    section on its own.
    """
    quoted = f'filename="{filename}"'
    if len(quoted) < FOLD_AT and is_plain(filename) and not {'"', "\\"} & set(filename):
        return quoted
    encoded = [quote(character, safe="") for character in filename]
    single = "filename*=utf-8''" + "".join(encoded)
    if len(single) < FOLD_AT:
        return single
    sections: list[str] = []
    section = "filename*0*=utf-8''"
    for piece in encoded:
        if len(section) + len(piece) > FOLD_AT - 2:  # " " before, ";" after
            sections.append(section)
            section = f"filename*{len(sections)}*="
        section += piece
    sections.append(section)
    return ";\r\n ".join(sections)
