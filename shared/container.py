"""The mail container: the one message services hand to rohrpost (wire format v1).

A container is JSON, validated by the frozen model below. Its JSON Schema lives in
``shared/schema/`` so producers in any language can validate before publishing.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import re
import threading
import uuid
from datetime import UTC, datetime
from email.utils import getaddresses
from typing import Annotated, Any, Literal

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError, PydanticSerializationError

from rohrpost.shared.errors import ContainerError
from rohrpost.shared.jsonvalue import JsonValueError, check_plain_json, deep_path
from rohrpost.shared.storable import StoredDatetime

SCHEMA_VERSION = 1
#: Decoded size of all attachments of one mail together.
MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024
#: Size of the whole container as JSON on the wire (base64 attachments included).
#: Quorum queues keep every message on disk and in the Raft log; big messages cost
#: throughput for every tenant, so the cap is deliberately modest.
MAX_CONTAINER_BYTES = 16 * 1024 * 1024
#: Nesting of template ``data``: each object or list is a level (``{"a": [1]}`` is 2).
#: JSON parsers and the template engine recurse once per level; real data needs few.
MAX_DATA_DEPTH = 64

#: How urgent a mail is: ``high`` for credentials, password resets and one-time codes,
#: ``normal`` for everything else, ``bulk`` for newsletters. Each is a lane of its own
#: (a send queue per tenant/app), and workers always serve high before normal before bulk.
Priority = Literal["high", "normal", "bulk"]
#: Every priority, in the order workers serve them.
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "bulk")
DEFAULT_PRIORITY: Priority = "normal"


def _is_default_priority(value: object) -> bool:
    # Workers of earlier versions refuse unknown fields: without "priority" on the wire,
    # the mails they can send (normal ones) stay readable to them during an upgrade.
    return value == DEFAULT_PRIORITY


class _Uuid4Pool:
    """Random (version 4) UUIDs from one ``os.urandom`` call per 4,096 of them.

    ``os.urandom`` releases the GIL; in ``submit_many`` the I/O thread then takes it
    and the submitting thread waits for its turn — once per mail, which profiled as
    ~20 µs a mail. The bytes are the same kernel randomness as ``uuid.uuid4``'s. A
    forked child discards the parent's pool, so processes never share ids.
    """

    _BATCH = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._offset = 0
        os.register_at_fork(after_in_child=self._discard)

    def _discard(self) -> None:
        self._pool, self._offset = b"", 0
        self._lock = threading.Lock()

    def __call__(self) -> uuid.UUID:
        with self._lock:
            if self._offset >= len(self._pool):
                self._pool, self._offset = os.urandom(16 * self._BATCH), 0
            start = self._offset
            self._offset += 16
            return uuid.UUID(bytes=self._pool[start : start + 16], version=4)


new_mail_id = _Uuid4Pool()


_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 ftext: printable ASCII minus ':'
#: Headers rohrpost writes itself; a container may not set them.
RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        "From",
        "To",
        "Cc",
        "Bcc",
        "Reply-To",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Disposition",
    )
)


#: What no header may carry: the C0 and C1 controls and DEL (Unicode category Cc) and
#: the line and paragraph separators. Mail software takes some of them for line ends
#: (CR, LF, VT, FF, NEL, U+2028); the others reach parsers and terminals raw (NUL, ESC).
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _no_control_characters(value: str) -> str:
    found = _CONTROL_CHARACTER.search(value)
    if found is None:
        return value
    if found.group() in "\r\n":
        raise ValueError("must not contain CR or LF (header injection)")
    raise ValueError(
        f"must not contain control characters "
        f"(U+{ord(found.group()):04X} at position {found.start() + 1})"
    )


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: A bare ASCII address email-validator would accept; anything else takes the full check.
_PLAIN_ADDRESS = re.compile(rf"({_ATOM}(?:\.{_ATOM})*)@((?:{_LABEL}\.)+[A-Za-z]{{2,63}})")
_SPECIAL_USE = frozenset(SPECIAL_USE_DOMAIN_NAMES)


@functools.lru_cache(maxsize=16384)
def is_plain_address(value: str) -> bool:
    """True for a bare ASCII address email-validator accepts (checked without it)."""
    # Parsing with email.utils and email-validator costs ~170 µs an address, most of
    # a container's validation; a plain address needs neither. Cached: a worker meets
    # the same sender for every mail, and each recipient several times.
    match = _PLAIN_ADDRESS.fullmatch(value)
    if match is None:
        return False
    local, domain = match.groups()
    labels = domain.lower().split(".")
    return (
        len(local) <= 64
        and len(domain) <= 253
        and labels[-1] not in _SPECIAL_USE
        and ("--" not in domain or not any(label[2:4] == "--" for label in labels))
    )


def bare_address(address: str) -> str:
    """The address of ``Name <addr>`` (or of a bare address, itself)."""
    if is_plain_address(address):
        return address
    return getaddresses([address])[0][1] or address


def _address(value: str) -> str:
    if is_plain_address(value):
        return value
    _no_control_characters(value)
    parsed = getaddresses([value])
    if len(parsed) != 1 or not parsed[0][1]:
        raise ValueError(f"{value!r} is not one e-mail address")
    _, addr = parsed[0]
    try:
        validate_email(addr, check_deliverability=False)
    except EmailNotValidError as exc:
        # Quote what was written: "anna(at)example.com" parses as "anna" (a comment).
        read_as = f" (read as {addr!r})" if addr != value.strip() else ""
        raise ValueError(f"{value!r} is not a valid e-mail address{read_as}: {exc}") from None
    return value.strip()


def _header_name(value: str) -> str:
    if not _HEADER_NAME.match(value):
        raise ValueError(f"{value!r} is not a valid header name")
    if value.lower() in RESERVED_HEADERS:
        raise ValueError(f"{value!r} is set by rohrpost and cannot be overridden")
    return value


def _template_name(value: str) -> str:
    if ".." in value.split("/") or value.startswith("/"):
        raise ValueError("must be a relative name without '..'")
    return value


#: The rule of ``_no_control_characters`` for the JSON Schema (ECMA-262), so that
#: producers in other languages can check it before publishing.
_NO_CONTROL_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f\u2028\u2029]*$"
_NO_CONTROL = Field(json_schema_extra={"pattern": _NO_CONTROL_PATTERN})

Name = Annotated[str, StringConstraints(pattern=_NAME_PATTERN)]
Address = Annotated[
    str,
    StringConstraints(max_length=998),
    AfterValidator(_address),
    Field(description="One address: 'anna@example.com' or 'Anna Müller <anna@example.com>'."),
    _NO_CONTROL,
]
HeaderText = Annotated[
    str, StringConstraints(max_length=998), AfterValidator(_no_control_characters), _NO_CONTROL
]
HeaderName = Annotated[str, AfterValidator(_header_name)]
Tag = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64),
    AfterValidator(_no_control_characters),
    _NO_CONTROL,
]
#: Bidirectional formatting characters: in a file name they disguise its extension
#: ("invoice\u202efdp.exe" shows as "invoiceexe.pdf"), the classic attachment spoof.
_BIDI_CONTROL = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _file_name(value: str) -> str:
    value = _no_control_characters(value)
    if found := _BIDI_CONTROL.search(value):
        raise ValueError(
            f"must not contain bidirectional formatting characters, which disguise a file's "
            f"type (U+{ord(found.group()):04X} at position {found.start() + 1})"
        )
    return value


FileName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=998),
    AfterValidator(_file_name),
    Field(
        json_schema_extra={
            "pattern": r"^[^\u0000-\u001f\u007f-\u009f\u2028\u2029"
            r"\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]*$"
        }
    ),
]
TemplateName = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,127}$"),
    AfterValidator(_template_name),
]


def _base64_size(value: str) -> int:
    try:
        return len(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        raise ValueError("content is not valid base64") from None


class Attachment(BaseModel):
    """A document attached to the mail, carried inline as base64."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    filename: FileName
    content_type: str = Field(
        default="application/octet-stream",
        # RFC 6838 restricted-name, ASCII only: type and subtype of 1-127 characters
        pattern=r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$",
    )
    content: str = Field(description="The document, base64-encoded (RFC 4648, with padding).")


def _plain_data(value: Any) -> Any:
    """Refuse template data that JSON cannot carry as given, or that nests too deeply."""
    if isinstance(value, dict):
        try:
            check_plain_json(value, max_depth=MAX_DATA_DEPTH)
        except JsonValueError as exc:
            raise PydanticCustomError(
                "plain_json", "{reason}", {"path": exc.path, "reason": exc.reason}
            ) from None
    return value


TemplateData = Annotated[dict[str, Any], BeforeValidator(_plain_data)]


class MailContainer(BaseModel):
    """One mail, with everything needed to send it and the settings that govern it.

    Either finished content (``subject`` plus ``text`` and/or ``html``) or a
    ``template`` rendered with ``data`` at send time.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, title="MailContainer"
    )

    id: uuid.UUID = Field(
        default_factory=new_mail_id, description="Idempotency key; also the Message-ID."
    )
    schema_version: Literal[1] = 1
    tenant: Name
    app: Name
    from_: Address | None = Field(
        default=None, alias="from", description="Sender; defaults to the app's sender."
    )
    to: tuple[Address, ...] = Field(default=(), max_length=1000)
    cc: tuple[Address, ...] = Field(default=(), max_length=1000)
    bcc: tuple[Address, ...] = Field(default=(), max_length=1000)
    reply_to: tuple[Address, ...] = Field(default=(), max_length=10)
    headers: dict[HeaderName, HeaderText] = Field(default_factory=dict, max_length=50)
    subject: HeaderText | None = None
    text: str | None = None
    html: str | None = None
    template: TemplateName | None = None
    data: TemplateData = Field(
        default_factory=dict,
        description=f"Template data: plain JSON, nested at most {MAX_DATA_DEPTH} levels.",
    )
    attachments: tuple[Attachment, ...] = Field(default=(), max_length=50)
    not_before: StoredDatetime | None = Field(default=None, description="Earliest send time.")
    expires_at: StoredDatetime | None = Field(
        default=None, description="Not sent after this; ends as 'expired'."
    )
    max_attempts: int | None = Field(
        default=None, ge=1, le=100, description="Defaults to the app's max_attempts."
    )
    history: Literal["keep", "delete"] = "keep"
    priority: Priority = Field(
        default=DEFAULT_PRIORITY,
        exclude_if=_is_default_priority,
        description="high: credentials, password resets, one-time codes (sent before "
        "anything else); normal; bulk: newsletters (sent when nothing else waits). Left "
        "out when normal.",
    )
    tags: tuple[Tag, ...] = Field(default=(), max_length=20)
    created_at: StoredDatetime = Field(default_factory=lambda: datetime.now(UTC))
    resend_of: uuid.UUID | None = Field(
        default=None, description="The mail this one re-sends (set by `history resend`)."
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> MailContainer:
        if not (self.to or self.cc or self.bcc):
            raise ValueError("at least one recipient is needed in to, cc or bcc")
        if self.template is not None:
            if self.subject is not None or self.text is not None or self.html is not None:
                raise ValueError("give either template (+ data) or subject/text/html, not both")
        else:
            if self.subject is None:
                raise ValueError("subject is required when no template is given")
            if self.text is None and self.html is None:
                raise ValueError("text or html is required when no template is given")
            if self.data:
                raise ValueError("data is only used with a template")
        if self.not_before and self.expires_at and self.not_before >= self.expires_at:
            raise ValueError("not_before must be before expires_at")
        total = sum(_base64_size(a.content) for a in self.attachments) if self.attachments else 0
        if total > MAX_ATTACHMENT_BYTES:
            raise ValueError(
                f"attachments total {total} bytes, more than the cap of {MAX_ATTACHMENT_BYTES}"
            )
        return self

    @property
    def recipients(self) -> tuple[str, ...]:
        """Every envelope recipient: to, cc and bcc."""
        return self.to + self.cc + self.bcc


def _shown(part: object) -> str:
    """A part of a field path, escaped when it holds control characters (a bad key)."""
    text = str(part)
    return text if text.isprintable() else repr(text)[1:-1]


def describe_validation_error(exc: ValidationError, *, whole: str | None = "container") -> str:
    """Render pydantic errors as ``field.path: message`` lines.

    ``whole`` names an error of the model as a whole; None shows its message alone (it
    names its fields itself).
    """
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(_shown(p) for p in error["loc"] if p != "[key]") or whole
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "plain_json" and error.get("ctx", {}).get("path"):
            where = f"{where}.{error['ctx']['path']}"  # where inside ``data``
        lines.append(message if where is None else f"{where}: {message}")
    return "; ".join(lines)


def _too_deep(where: list[str]) -> ContainerError:
    field = where[0] if where else "container"
    return ContainerError(f"{field}: nested deeper than {MAX_DATA_DEPTH} levels (the limit)")


def parse_container(data: Any) -> MailContainer:
    """Validate a mapping into a container; ContainerError names the bad field."""
    if isinstance(data, MailContainer):
        return data
    try:
        return MailContainer.model_validate(data)
    except ValidationError as exc:
        raise ContainerError(describe_validation_error(exc)) from exc


_SERIALIZER = MailContainer.__pydantic_serializer__


def encode_container(container: MailContainer) -> bytes:
    """Serialize to wire JSON; raise ContainerError when it exceeds the size cap."""
    try:
        # The serializer itself: model_dump_json adds a call and a str to bytes copy.
        body = _SERIALIZER.to_json(container, by_alias=True, exclude_none=True)
    except PydanticSerializationError as exc:  # only a container built without validation
        raise ContainerError(f"container: cannot be written as JSON: {exc}") from exc
    if len(body) > MAX_CONTAINER_BYTES:
        raise ContainerError(
            f"container: {len(body)} bytes as JSON, more than the cap of {MAX_CONTAINER_BYTES}"
        )
    return body


def priority_of(body: bytes) -> Priority:
    """The priority of the container ``body``; normal when it is not a valid container."""
    try:
        return decode_container(body).priority
    except ContainerError:
        return DEFAULT_PRIORITY


def decode_container(body: bytes) -> MailContainer:
    """Parse wire JSON into a container; raise ContainerError naming what is wrong."""
    if len(body) > MAX_CONTAINER_BYTES:
        raise ContainerError(
            f"container: {len(body)} bytes, more than the cap of {MAX_CONTAINER_BYTES}"
        )
    try:
        return MailContainer.model_validate_json(body)
    except ValidationError as exc:
        if any("recursion limit" in e["msg"] for e in exc.errors(include_url=False)):
            # The JSON parser's own limit (~200 levels): name the field as for shallower data.
            where = deep_path(body.decode("utf-8", "replace"), MAX_DATA_DEPTH + 1)
            raise _too_deep(where or []) from exc
        raise ContainerError(describe_validation_error(exc)) from exc
