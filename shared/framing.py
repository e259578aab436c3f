"""The wire bytes of a ``basic.publish``: method, content header and body frames.

pika's ``basic_publish`` builds these anew per message through several objects; its
content header alone (``BasicProperties.encode``) cost the I/O thread of
``submit_many`` ~8 µs a mail here, more than everything else it does for a publish.
Bulk publishes differ in little: a route's method frame is the same for every
message, and mails' properties differ only in their message id and timestamp. So
both are built once with pika's own encoding and reused, the header with those two
values (and the body size) put in place.
"""

from __future__ import annotations

import struct
from typing import Any

from pika import frame, spec

from rohrpost.shared.amqp import Publication

_BODY_FRAME = struct.Struct(">BHI")
_SIZE = struct.Struct(">Q")
_FRAME_END = bytes([spec.FRAME_END])
#: Header shapes kept per channel: a producer has one or two, a worker a few.
_MAX_TEMPLATES = 64


class HeaderTemplate:
    """A content header frame with slots for body size, message id and timestamp.

    Everything else is fixed: the frame's payload size, the property flags and every
    other property. Made from pika's encoding of one header, and checked against it.
    """

    def __init__(self, channel: int, body_size: int, properties: Any) -> None:
        """Raise ValueError when the message id and timestamp cannot be located."""
        encoded = frame.Header(channel, body_size, properties).marshal()
        message_id, timestamp = properties.message_id, properties.timestamp
        slot = bytes([len(message_id)]) + message_id.encode()
        if timestamp is not None:
            slot += _SIZE.pack(timestamp)
        at = encoded.find(slot, 19)  # 7 frame header + class, weight + body size
        if at < 0 or encoded.find(slot, at + 1) >= 0 or encoded[11:19] != _SIZE.pack(body_size):
            raise ValueError("message id and timestamp not found once in the header")
        self._head = encoded[:11]
        self._middle = encoded[19 : at + 1]  # up to the message id's length byte
        self._tail = encoded[at + len(slot) :]
        self._timestamped = timestamp is not None
        if self.frame(body_size, message_id, timestamp) != encoded:
            raise ValueError("the template does not reproduce pika's header")

    def frame(self, body_size: int, message_id: str, timestamp: int | None) -> bytes:
        """The header frame of a message of ``body_size`` bytes with these two properties."""
        stamp = _SIZE.pack(timestamp) if self._timestamped else b""
        return b"".join(
            (
                self._head,
                _SIZE.pack(body_size),
                self._middle,
                message_id.encode(),
                stamp,
                self._tail,
            )
        )


def _shape(properties: Any) -> tuple[Any, ...] | None:
    """What a header template is made for: every property but message id and timestamp.

    None when the header is not to be templated: not pika's properties, a header table
    (a dict, and per message in the workers' republishes), or no ASCII message id.
    """
    if not isinstance(properties, spec.BasicProperties) or properties.headers is not None:
        return None
    message_id = properties.message_id
    if not isinstance(message_id, str) or not message_id.isascii():
        return None
    p = properties
    return (
        p.content_type,
        p.content_encoding,
        p.delivery_mode,
        p.priority,
        p.correlation_id,
        p.reply_to,
        p.expiration,
        p.type,
        p.user_id,
        p.app_id,
        p.cluster_id,
        len(message_id),
        p.timestamp is None,
    )


class PublishFramer:
    """All frames of one ``basic.publish``, from pika's encoding reused per route and shape."""

    def __init__(self, channel_number: int, frame_max: int) -> None:
        self._channel = channel_number
        self._body_max = frame_max - spec.FRAME_HEADER_SIZE - spec.FRAME_END_SIZE
        self._methods: dict[tuple[str, str, bool], bytes] = {}
        self._headers: dict[tuple[Any, ...], HeaderTemplate | None] = {}

    def frames(self, publication: Publication) -> bytes:
        """All frames of one publish, concatenated."""
        key = (publication.exchange, publication.routing_key, publication.mandatory)
        method = self._methods.get(key)
        if method is None:
            publish = spec.Basic.Publish(
                exchange=key[0], routing_key=key[1], mandatory=publication.mandatory
            )
            method = self._methods[key] = frame.Method(self._channel, publish).marshal()
        body = publication.body
        parts = [method, self._header(len(body), publication.properties)]
        if len(body) <= self._body_max:
            if body:
                parts += (_BODY_FRAME.pack(spec.FRAME_BODY, self._channel, len(body)), body)
                parts.append(_FRAME_END)
        else:
            parts += (
                frame.Body(self._channel, body[start : start + self._body_max]).marshal()
                for start in range(0, len(body), self._body_max)
            )
        return b"".join(parts)

    def _header(self, body_size: int, properties: Any) -> bytes:
        shape = _shape(properties)
        template = self._headers.get(shape) if shape is not None else None
        if template is not None:
            return template.frame(body_size, properties.message_id, properties.timestamp)
        if shape is not None and shape not in self._headers and len(self._headers) < _MAX_TEMPLATES:
            try:
                self._headers[shape] = HeaderTemplate(self._channel, body_size, properties)
            except ValueError:
                self._headers[shape] = None  # pika's encoding for this shape, always
        encoded: bytes = frame.Header(self._channel, body_size, properties).marshal()
        return encoded
