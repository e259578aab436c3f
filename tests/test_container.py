"""The mail container: what it accepts, what it refuses, and the committed JSON Schema."""

from __future__ import annotations

import base64
import json
import os
import re
import string
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import getaddresses
from typing import Any

import pytest
from email_validator import validate_email
from hypothesis import given, settings
from hypothesis import strategies as st

from rohrpost.shared.container import (
    MAX_ATTACHMENT_BYTES,
    MAX_CONTAINER_BYTES,
    MailContainer,
    decode_container,
    encode_container,
    is_plain_address,
    new_mail_id,
    parse_container,
)
from rohrpost.shared.errors import ContainerError
from rohrpost.shared.schema_export import SCHEMA_DIR, render, schemas


def mail(**fields: Any) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "app": "billing",
        "to": ["anna@example.com"],
        "subject": "Invoice",
        "text": "Hello",
        **fields,
    }


def test_a_minimal_finished_mail_is_valid_and_gets_an_id() -> None:
    container = parse_container(mail())
    assert container.id.version == 4
    assert container.history == "keep"
    assert container.recipients == ("anna@example.com",)


def test_wire_json_round_trips_with_from_as_the_key() -> None:
    container = parse_container(mail(**{"from": "Billing <billing@acme.example>"}))
    body = encode_container(container)
    assert json.loads(body)["from"] == "Billing <billing@acme.example>"
    assert decode_container(body) == container


@pytest.mark.parametrize(
    ("fields", "field_named"),
    [
        ({"subject": "Hi\r\nBcc: victim@example.com"}, "subject"),
        ({"headers": {"X-Campaign": "a\nb"}}, "headers.X-Campaign"),
        ({"headers": {"Bad Name": "x"}}, "headers.Bad Name"),
        ({"headers": {"Subject": "x"}}, "headers.Subject"),
        ({"to": ["not-an-address"]}, "to.0"),
        ({"to": ["anna@example.com\r\nBcc: x@example.com"]}, "to.0"),
        ({"cc": ["a@example.com, b@example.com"]}, "cc.0"),
        ({"from": "nobody@localhost"}, "from"),
        ({"tenant": "Acme Corp"}, "tenant"),
        ({"app": "billing.eu"}, "app"),
        ({"template": "../../etc/passwd", "subject": None, "text": None}, "template"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"history": "forever"}, "history"),
        ({"not_before": "2026-12-24T18:00:00"}, "not_before"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_invalid_fields_are_refused_naming_the_field(
    fields: dict[str, Any], field_named: str
) -> None:
    data = {k: v for k, v in mail(**fields).items() if v is not None}
    with pytest.raises(ContainerError) as error:
        parse_container(data)
    assert f"{field_named}:" in str(error.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"to": []}, "at least one recipient"),
        ({"template": "welcome"}, "either template"),
        ({"subject": None}, "subject is required"),
        ({"text": None}, "text or html is required"),
        ({"data": {"name": "Anna"}}, "data is only used with a template"),
        (
            {"not_before": "2026-12-24T18:00:00Z", "expires_at": "2026-12-24T17:00:00Z"},
            "not_before must be before expires_at",
        ),
    ],
)
def test_inconsistent_containers_are_refused_with_the_reason(
    fields: dict[str, Any], message: str
) -> None:
    data = {k: v for k, v in mail(**fields).items() if v is not None}
    with pytest.raises(ContainerError, match=message):
        parse_container(data)


def test_a_template_mail_needs_no_subject() -> None:
    container = parse_container(
        {
            "tenant": "acme",
            "app": "billing",
            "bcc": ["a@example.com"],
            "template": "welcome",
            "data": {"name": "Anna"},
        }
    )
    assert container.template == "welcome"


def test_non_ascii_names_and_idn_addresses_are_valid() -> None:
    container = parse_container(
        mail(to=["Jürgen Groß <juergen@grüße.example>", "日本 <a@example.jp>"])
    )
    assert len(container.to) == 2


def test_attachments_must_be_base64() -> None:
    with pytest.raises(ContainerError, match=r"attachments\.0\.content|base64"):
        parse_container(mail(attachments=[{"filename": "a.pdf", "content": "not base64!!"}]))


def test_attachments_over_the_cap_are_refused() -> None:
    big = base64.b64encode(b"\0" * (MAX_ATTACHMENT_BYTES + 1)).decode()
    with pytest.raises(ContainerError, match="attachments total"):
        parse_container(mail(attachments=[{"filename": "big.bin", "content": big}]))


def test_an_oversize_container_is_refused_at_encoding_and_decoding() -> None:
    container = parse_container(mail(text="x" * (MAX_CONTAINER_BYTES + 1)))
    with pytest.raises(ContainerError, match="cap"):
        encode_container(container)
    with pytest.raises(ContainerError, match="cap"):
        decode_container(b" " * (MAX_CONTAINER_BYTES + 1))


def test_malformed_json_is_a_container_error() -> None:
    with pytest.raises(ContainerError, match="Invalid JSON"):
        decode_container(b'{"tenant": "acme", ')


def test_containers_are_frozen() -> None:
    container = parse_container(mail())
    with pytest.raises(ValueError, match="frozen"):
        container.subject = "changed"  # type: ignore[misc]


def test_timestamps_must_carry_a_timezone() -> None:
    aware = datetime.now(UTC) + timedelta(hours=1)
    assert parse_container(mail(not_before=aware.isoformat())).not_before == aware


def test_committed_json_schemas_match_the_models() -> None:
    for name, schema in schemas().items():
        committed = (SCHEMA_DIR / name).read_text()
        assert committed == render(schema), (
            f"shared/schema/{name} is out of date: run `rohrpost schema -o shared/schema`"
        )


def test_the_schema_names_the_wire_fields() -> None:
    schema = MailContainer.model_json_schema(by_alias=True)
    assert {"id", "tenant", "app", "from", "to", "template", "not_before", "expires_at"} <= set(
        schema["properties"]
    )
    assert schema["additionalProperties"] is False


ATOM = st.text(
    alphabet=string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-.", min_size=1, max_size=70
)
LABEL = st.text(alphabet=string.ascii_letters + string.digits + "-", min_size=1, max_size=65)


@settings(max_examples=3000, deadline=None)
@given(
    local=ATOM,
    labels=st.lists(LABEL, min_size=1, max_size=4),
    tld=st.sampled_from(["com", "de", "example", "test", "localhost", "x", "c0m", "museum"]),
)
def test_the_fast_address_check_accepts_only_what_the_full_check_accepts(
    local: str, labels: list[str], tld: str
) -> None:
    address = f"{local}@{'.'.join([*labels, tld])}"
    if is_plain_address(address):
        validate_email(address, check_deliverability=False)  # raises if the fast path erred
        assert getaddresses([address]) == [("", address)]


def test_the_fast_address_check_takes_plain_ascii_addresses_only() -> None:
    assert is_plain_address("customer17@example.com")
    assert is_plain_address("a.b+tag@mail.sub.example.org")
    assert not is_plain_address("Anna <anna@example.com>")
    assert not is_plain_address("anna@example.test")
    assert not is_plain_address("anna@grüße.example")


def test_mail_ids_are_random_version_4_and_a_forked_child_never_repeats_its_parents() -> None:
    ids = {new_mail_id() for _ in range(10_000)}  # more than one pooled batch
    assert len(ids) == 10_000
    assert {i.version for i in ids} == {4}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child takes an id from the pool it inherited, if it kept one
        os.write(write, new_mail_id().bytes)
        os._exit(0)
    os.waitpid(pid, 0)
    child_id = uuid.UUID(bytes=os.read(read, 16))
    os.close(read)
    os.close(write)
    assert child_id != new_mail_id()
    assert child_id not in ids


@pytest.mark.parametrize(
    ("filename", "why"),
    [
        ("invoice\u202efdp.exe", r"bidirectional formatting characters.*U\+202E at position 8"),
        ("a\u2066b.pdf", r"bidirectional.*U\+2066"),
        ("a\rb.txt", "CR or LF"),
        ("", "at least 1 character"),
    ],
)
def test_an_attachment_name_that_disguises_its_type_is_refused(filename: str, why: str) -> None:
    attachment = {"filename": filename, "content": "aGk="}
    with pytest.raises(ContainerError, match=rf"attachments\.0\.filename: .*{why}"):
        parse_container(mail(attachments=[attachment]))
    if filename:  # producers in other languages check the same with the JSON Schema
        assert re.fullmatch(_FILENAME_PATTERN, filename) is None


def test_attachment_names_in_any_script_are_fine() -> None:
    for filename in ("Rechnung März.pdf", "فاتورة.pdf", "請求書 2026.xlsx", "a..b.txt", ".profile"):
        parsed = parse_container(mail(attachments=[{"filename": filename, "content": "aGk="}]))
        assert parsed.attachments[0].filename == filename
        assert re.fullmatch(_FILENAME_PATTERN, filename)


_FILENAME_PATTERN = MailContainer.model_json_schema()["$defs"]["Attachment"]["properties"][
    "filename"
]["pattern"]
