"""What a request sends: a form (HTML pages) or a JSON object (the API), read within a limit."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request

#: The largest request body read: a mail container (16 MiB of JSON) and a form around it.
MAX_BODY_BYTES = 17 * 1024 * 1024


class BodyTooLarge(Exception):
    """The request body is larger than MAX_BODY_BYTES."""


class BadInput(Exception):
    """The body is not what the page takes (not a form, not a JSON object)."""


class Inputs:
    """The fields of a form or JSON object, read the same way by every view."""

    def __init__(self, fields: dict[str, Any], *, form: bool) -> None:
        self.fields = fields
        #: True when the fields came from a form (each a list of strings).
        self.form = form

    def get(self, name: str, default: str = "") -> str:
        """One field as text ('' when absent); the first value of a repeated form field."""
        value = self.fields.get(name)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None:
            return default
        return value if isinstance(value, str) else json.dumps(value)

    def getlist(self, name: str) -> list[str]:
        """Every value of a field, as text."""
        value = self.fields.get(name)
        if value is None:
            return []
        items = value if isinstance(value, list) else [value]
        return [item if isinstance(item, str) else json.dumps(item) for item in items]

    def value(self, name: str) -> Any:
        """A field as sent: JSON values as they are, form fields as text."""
        value = self.fields.get(name)
        if isinstance(value, list) and self.form:
            return value[0] if value else None
        return value


async def read_body(request: Request) -> bytes:
    """The request body; BodyTooLarge as soon as it passes the limit (also without a length)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def read_inputs(request: Request) -> Inputs:
    """The form fields or JSON object of a POST; empty for a GET."""
    if request.method in ("GET", "HEAD"):
        return Inputs({}, form=True)
    body = await read_body(request)
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind == "application/json":
        try:
            data = json.loads(body) if body.strip() else {}
        except (ValueError, RecursionError) as exc:
            raise BadInput(f"the body is not JSON: {str(exc)[:200]}") from None
        if not isinstance(data, dict):
            raise BadInput("the body must be one JSON object")
        return Inputs(data, form=False)
    if kind in ("application/x-www-form-urlencoded", ""):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput("the form is not UTF-8") from None
        try:
            fields = parse_qs(text, keep_blank_values=True, max_num_fields=20_000)
        except ValueError:
            raise BadInput("the form has too many fields") from None
        return Inputs(dict(fields), form=True)
    raise BadInput(f"send a form or JSON, not {kind}")
