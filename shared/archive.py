"""What the history keeps of a submitted mail, read without the parts it does not keep.

The history consumer reads every submitted container. Reading it whole
(``MailContainer``) costs ~50 µs a mail here, most of it on what the history does not
look at (template data checked for depth and type, attachments decoded for their
size, header names); at the ingest rate the history must keep up with, that was a
third of the consumer's CPU. ``ArchivedMail`` validates exactly the fields the
history stores, with the container's own field types, and keeps the message's JSON
text as it came as the stored container. A container that is well-formed for the
history but that a worker refuses in full is archived and then shows the worker's
``dead_lettered`` (``invalid``) event.
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rohrpost.shared.container import (
    MAX_CONTAINER_BYTES,
    Address,
    HeaderText,
    Name,
    Tag,
    TemplateName,
    describe_validation_error,
)
from rohrpost.shared.errors import ContainerError
from rohrpost.shared.storable import StoredDatetime


class ArchivedMail(BaseModel):
    """The stored fields of a mail container (other fields are ignored, not checked)."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    id: uuid.UUID
    tenant: Name
    app: Name
    from_: Address | None = Field(default=None, alias="from")
    to: tuple[Address, ...] = Field(default=(), max_length=1000)
    cc: tuple[Address, ...] = Field(default=(), max_length=1000)
    bcc: tuple[Address, ...] = Field(default=(), max_length=1000)
    subject: HeaderText | None = None
    template: TemplateName | None = None
    not_before: StoredDatetime | None = None
    expires_at: StoredDatetime | None = None
    history: Literal["keep", "delete"] = "keep"
    tags: tuple[Tag, ...] = Field(default=(), max_length=20)
    #: None when a client in another language left it out (the producer always sets it)
    created_at: StoredDatetime | None = None
    resend_of: uuid.UUID | None = None

    @property
    def recipients(self) -> tuple[str, ...]:
        """Every envelope recipient: to, cc and bcc."""
        return self.to + self.cc + self.bcc


def read_archived(body: bytes) -> tuple[ArchivedMail, str]:
    """The stored fields of a container and its JSON text; ContainerError naming the field."""
    if len(body) > MAX_CONTAINER_BYTES:
        raise ContainerError(
            f"container: {len(body)} bytes, more than the cap of {MAX_CONTAINER_BYTES}"
        )
    try:
        mail = ArchivedMail.model_validate_json(body)
    except ValidationError as exc:
        raise ContainerError(describe_validation_error(exc)) from exc
    # Valid JSON is valid UTF-8 (pydantic read it); it carries no raw NUL (JSON escapes
    # control characters in strings), so any store column holds it as it is.
    return mail, body.decode()
