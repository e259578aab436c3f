"""AMQP header tables read tolerantly: an odd header value never makes a message unreadable.

pika decodes a header table recursively and trusts every value, and any error while
decoding a frame ends the whole connection. So a message whose headers another
client wrote as a table nested a few hundred levels deep (``RecursionError``), a
timestamp beyond the year 9999 or a NaN double (``ValueError``) could never be read:
every reader of its queue — a worker, ``rohrpost dlq list`` — lost its connection on
it, over and over. RabbitMQ passes such headers through unchanged.

``TolerantProperties`` decodes as pika does and, only when that fails, decodes the
table entry by entry, putting a note in place of each value it cannot read.
"""

from __future__ import annotations

import struct
from typing import Any

import pika.exceptions
from pika import data, spec

_DECODE_ERRORS = (
    RecursionError,
    ValueError,
    OverflowError,
    OSError,
    struct.error,
    IndexError,
    pika.exceptions.InvalidFieldTypeException,
)
#: Value types whose size is known without decoding them: type byte + 4-byte length, or fixed.
_SIZED = frozenset({b"S", b"x", b"A", b"F"})
_Basic = spec.BasicProperties
_FIXED = {b"T": 9, b"d": 9, b"l": 9, b"L": 9, b"f": 5, b"I": 5, b"i": 5, b"D": 6}


class TolerantProperties(spec.BasicProperties):  # type: ignore[misc]
    """``BasicProperties`` whose header table never makes decoding fail."""

    def decode(self, encoded: bytes, offset: int = 0) -> Any:
        try:
            return super().decode(encoded, offset)
        except _DECODE_ERRORS:
            first, start, end = _table_bounds(encoded, offset)
            if not first & self.FLAG_HEADERS:
                raise
            without = struct.pack(">H", first & ~self.FLAG_HEADERS)
            super().decode(encoded[:offset] + without + encoded[offset + 2 : start] + encoded[end:])
            self.headers = tolerant_table(encoded[start + 4 : end])
            return self


def _table_bounds(encoded: bytes, offset: int) -> tuple[int, int, int]:
    """The first flag word, and where the header table starts and ends."""
    first = word = struct.unpack_from(">H", encoded, offset)[0]
    position = offset + 2
    while word & 1:  # more flag words follow
        word = struct.unpack_from(">H", encoded, position)[0]
        position += 2
    for flag in (
        spec.BasicProperties.FLAG_CONTENT_TYPE,
        spec.BasicProperties.FLAG_CONTENT_ENCODING,
    ):
        if first & flag:
            position += 1 + encoded[position]
    (length,) = struct.unpack_from(">I", encoded, position)
    return first, position, position + 4 + length


def tolerant_table(raw: bytes) -> dict[str | bytes, Any]:
    """The entries of an encoded table (without its length); unreadable values become notes."""
    table: dict[str | bytes, Any] = {}
    position = 0
    while position < len(raw):
        key, position = data.decode_short_string(raw, position)
        kind = raw[position : position + 1]
        try:
            table[key], position = data.decode_value(raw, position)
        except _DECODE_ERRORS as exc:
            table[key] = f"<unreadable header value of type {kind!r}: {type(exc).__name__}>"
            if kind in _SIZED:
                position += 5 + struct.unpack_from(">I", raw, position + 1)[0]
            elif kind in _FIXED:
                position += _FIXED[kind]
            else:
                break  # its size is unknown: the rest cannot be read
    return table


def use_tolerant_properties() -> None:
    """Make pika decode every message's properties with ``TolerantProperties`` (idempotent).

    pika looks the class up in ``spec.props`` for each content header it reads; there
    is no per-connection hook, so this is process-wide. It changes nothing for
    headers pika can read.
    """
    spec.props[spec.BasicProperties.INDEX] = TolerantProperties
