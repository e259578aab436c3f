"""No control character and no overlong line reaches the SMTP server; international
addresses go out IDNA-encoded, or with SMTPUTF8, or end at once with a clear reason."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from email.header import decode_header, make_header
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pika
import pytest

from rohrpost.catcher import CaughtMail, MailCatcher
from rohrpost.consumer.mime import build_message
from rohrpost.consumer.outcome import DeadLetter
from rohrpost.consumer.processor import MailProcessor
from rohrpost.consumer.render import RenderedMail, RenderLimits, TemplateRenderer
from rohrpost.consumer.smtp import SmtpTransport
from rohrpost.producer.client import Producer
from rohrpost.shared.amqp import Delivery
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.container import (
    Attachment,
    encode_container,
    parse_container,
)
from rohrpost.shared.errors import ContainerError, TransientDeliveryError, UnencodableMail
from rohrpost.shared.settings import Settings, SmtpServer
from rohrpost.shared.topology import Topology, queue_depths
from rohrpost.shared.wire import ATTEMPTS_HEADER, ERROR_HEADER, REASON_HEADER
from tests.conftest import (
    WorkerThread,
    dead_letters,
    declare,
    drain,
    publish_raw,
    wait_until,
    write_template,
)

#: Every C0 control, DEL, some C1 controls (NEL among them) and the Unicode line and
#: paragraph separators: what mail software may take for a line end or pass on raw.
CONTROLS = [chr(c) for c in range(0x20)] + ["\x7f", "\x80", "\x85", "\x9b", "\x9f"]
CONTROLS += ["\u2028", "\u2029"]
CONTROL_IDS = [f"U+{ord(c):04X}" for c in CONTROLS]


def mail(**fields: Any) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "app": "billing",
        "to": ["anna@example.com"],
        "subject": "Your invoice",
        "text": "Hello",
        **fields,
    }


GOOD = {
    "tenant": "globex",
    "app": "shop",
    "to": ["good@example.com"],
    "subject": "unaffected",
    "text": "fine",
}


def with_control(field: str, character: str) -> tuple[dict[str, Any], str]:
    """A container with ``character`` at position 3 of ``field``, and the field's name."""
    bad = f"ab{character}cd"
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "subject": ({"subject": bad}, "subject"),
        "from name": ({"from": f"{bad} <billing@acme.example>"}, "from"),
        "to address": ({"to": [f"{bad}@example.com"]}, "to.0"),
        "to name": ({"to": [f"{bad} <anna@example.com>"]}, "to.0"),
        "cc": ({"cc": [f"{bad} <bob@example.com>"]}, "cc.0"),
        "bcc": ({"bcc": [f"{bad}@example.com"]}, "bcc.0"),
        "reply_to": ({"reply_to": [f"{bad} <help@acme.example>"]}, "reply_to.0"),
        "header value": ({"headers": {"X-Note": bad}}, "headers.X-Note"),
        "tag": ({"tags": [bad]}, "tags.0"),
        "file name": (
            {"attachments": [{"filename": f"{bad}.pdf", "content": "aGk="}]},
            "attachments.0.filename",
        ),
    }
    fields, name = cases[field]
    return mail(**fields), name


FIELDS = [
    "subject",
    "from name",
    "to address",
    "to name",
    "cc",
    "bcc",
    "reply_to",
    "header value",
    "tag",
    "file name",
]


def expected_error(field: str, character: str) -> str:
    if character in "\r\n":
        return f"{field}: must not contain CR or LF (header injection)"
    return f"{field}: must not contain control characters (U+{ord(character):04X} at position 3)"


def head_of(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[0]


def assert_clean(data: bytes, *, header_line_limit: int = 78) -> None:
    """CRLF line ends only, no raw control byte, no line over 998 octets (headers: the limit)."""
    assert b"\r" not in data.replace(b"\r\n", b""), "bare CR"
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF"
    raw_controls = {b for b in data if (b < 0x20 and b not in b"\t\r\n") or b == 0x7F}
    assert not raw_controls, f"raw control bytes {sorted(raw_controls)}"
    assert max(map(len, data.split(b"\r\n"))) <= 998
    head = head_of(data)
    assert b"\t" not in head
    assert max(map(len, head.split(b"\r\n"))) <= header_line_limit


def lf(text: str) -> str:
    """``text`` with the CRLF line ends of its canonical form (RFC 2046) as LF."""
    return text.replace("\r\n", "\n")


def parsed(caught: CaughtMail) -> EmailMessage:
    # A message with UTF-8 headers (RFC 6532) parses as text; as bytes, the standard
    # library would surrogate-escape them.
    message = email.message_from_string(caught.data.decode("utf-8"), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


@pytest.fixture
def two_tenants(make_settings: Callable[..., Settings]) -> Settings:
    """acme/billing and globex/shop, both through the test's catcher; topology declared."""
    settings = make_settings(
        tenants={"globex": {"apps": {"shop": {"smtp": "catcher", "sender": "shop@globex.example"}}}}
    )
    declare(settings)
    return settings


# --- refused at submit -------------------------------------------------------------------


@pytest.mark.parametrize("character", CONTROLS, ids=CONTROL_IDS)
@pytest.mark.parametrize("field", FIELDS)
def test_a_control_character_in_any_header_field_is_refused_naming_field_and_position(
    field: str, character: str
) -> None:
    container, name = with_control(field, character)
    with pytest.raises(ContainerError) as error:
        parse_container(container)
    assert str(error.value) == expected_error(name, character)


@pytest.mark.parametrize("character", ["\x00", "\x1b", "\x7f", "\x85", "\u2028"])
def test_a_control_character_in_a_header_name_is_refused_and_shown_escaped(
    character: str,
) -> None:
    name = f"X-ab{character}cd"
    with pytest.raises(ContainerError) as error:
        parse_container(mail(headers={name: "value"}))
    shown = repr(name)[1:-1]
    assert str(error.value) == f"headers.{shown}: {name!r} is not a valid header name"
    assert str(error.value).isprintable()


@pytest.mark.parametrize("field", FIELDS)
def test_submit_refuses_a_control_character_and_publishes_nothing(
    settings: Settings, field: str
) -> None:
    container, name = with_control(field, "\x1b")
    with Producer(settings) as producer, pytest.raises(ContainerError) as error:
        producer.submit(container)
    assert str(error.value) == expected_error(name, "\x1b")
    queue = Topology.from_settings(settings).send_queue("acme", "billing")
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        assert queue_depths(channel, [queue]) == {queue: 0}


def test_printable_unicode_in_header_fields_is_accepted() -> None:
    container = parse_container(
        mail(
            subject="Grüße — 日本 ✓ \u200d",
            to=["Zoë Ünal <zoe@example.com>"],
            tags=["größe"],
            attachments=[{"filename": "März.pdf", "content": "aGk="}],
        )
    )
    assert container.subject == "Grüße — 日本 ✓ \u200d"


# --- published raw, bypassing the producer -------------------------------------------------


@pytest.mark.parametrize("field", FIELDS)
def test_control_characters_published_raw_are_dead_lettered_invalid_and_never_sent(
    two_tenants: Settings,
    catcher: MailCatcher,
    worker_thread: Callable[..., WorkerThread],
    field: str,
) -> None:
    handle = worker_thread(two_tenants)
    queue = Topology.from_settings(two_tenants).send_queue("acme", "billing")
    for character in CONTROLS:
        container, _ = with_control(field, character)
        publish_raw(two_tenants, queue, json.dumps(container).encode())
    with Producer(two_tenants) as producer:
        producer.submit(GOOD)
    catcher.wait_for(lambda mails: len(mails) == 1)
    found: list[Any] = []
    wait_until(lambda: found.extend(dead_letters(two_tenants)) or len(found) == len(CONTROLS))
    handle.stop()
    assert [m.recipients for m in catcher.mails] == [("good@example.com",)]
    _, name = with_control(field, "\x00")
    assert {properties.headers[REASON_HEADER] for properties, _ in found} == {"invalid"}
    assert sorted(properties.headers[ERROR_HEADER] for properties, _ in found) == sorted(
        expected_error(name, character) for character in CONTROLS
    )


# --- what the writer puts on the wire --------------------------------------------------------


@pytest.mark.parametrize("character", CONTROLS, ids=CONTROL_IDS)
def test_the_writer_never_writes_a_control_character_it_is_given_raw(character: str) -> None:
    # An old container or a future bug could bring what validation refuses today.
    bad = f"ab{character}cd"
    # (CR or LF in an address is refused: see the next test)
    name = "Anna" if character in "\r\n" else bad
    container = parse_container(mail()).model_copy(  # without validation
        update={
            "to": (f"{name} <anna@example.com>",),
            "headers": {"X-Note": bad},
            "attachments": (
                Attachment.model_construct(
                    filename=f"{bad}.pdf", content_type="application/pdf", content="aGk="
                ),
            ),
        }
    )
    data = build_message(
        container, RenderedMail(bad, bad, None), sender="billing@acme.example", msg_id="<1@x>"
    )
    assert_clean(data)
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message["Subject"] == bad, "carried encoded"
    assert message["X-Note"] == bad
    assert next(message.iter_attachments()).get_filename() == f"{bad}.pdf"


@pytest.mark.parametrize(
    "address",
    [
        "ab\x00cd@example.com",
        "ab\x1bcd@example.com",
        "ab\rcd@example.com",
        "ab\x85cd@example.com",
        "ab\u2028cd@example.com",
        "Anna\r\nBcc: victim@example.com <anna@example.com>",
        "Anna\n <anna@example.com>",
    ],
)
def test_the_writer_refuses_an_address_it_cannot_write(address: str) -> None:
    container = parse_container(mail()).model_copy(
        update={"to": (address,)}  # without validation
    )
    with pytest.raises(UnencodableMail, match=rf"^address {re.escape(repr(address))}: "):
        build_message(
            container, RenderedMail("s", "t", None), sender="billing@acme.example", msg_id="<1@x>"
        )


@pytest.mark.parametrize("character", CONTROLS, ids=CONTROL_IDS)
def test_a_rendered_subject_is_one_line_without_control_characters(
    templates: Path, character: str
) -> None:
    write_template(templates, "notice", subject="Hello {{ name }}!", text="x")
    container = parse_container(
        {
            "tenant": "acme",
            "app": "billing",
            "to": ["anna@example.com"],
            "template": "notice",
            "data": {"name": f"ab{character}cd"},
        }
    )
    renderer = TemplateRenderer(templates, RenderLimits(5.0, 1 << 20, 1 << 18))
    try:
        subject = renderer.render(container).subject
    finally:
        renderer.close()
    # Line breaks and other whitespace become a space; other controls are dropped.
    assert subject == ("Hello ab cd!" if character.isspace() else "Hello abcd!")


@pytest.mark.parametrize(
    ("name", "expected_subject"),
    [
        ("\x00\x1b[31mred\x1b[0m\x7f", "Hello [31mred[0m"),
        ("line\r\nBcc: victim@example.com", "Hello line Bcc: victim@example.com"),
        ("next\x85line\u2028and\u2029para\x0bgraph", "Hello next line and para graph"),
        ("bell\x07 back\x08space \x9bCSI", "Hello bell backspace CSI"),
    ],
)
def test_control_characters_in_template_data_never_reach_the_wire_raw(
    settings: Settings, catcher: MailCatcher, templates: Path, name: str, expected_subject: str
) -> None:
    write_template(templates, "notice", subject="Hello {{ name }}", text="Dear {{ name }}")
    with Producer(settings) as producer:
        producer.submit(
            {
                "tenant": "acme",
                "app": "billing",
                "to": ["anna@example.com"],
                "template": "notice",
                "data": {"name": name},
            }
        )
    drain(settings)
    [caught] = catcher.mails
    assert_clean(caught.data)
    message = caught.parsed()
    assert message["Subject"] == expected_subject
    body = "Dear " + name.replace("\r\n", "\n").replace("\r", "\n")
    assert lf(message.get_content()) == body + "\n", "the body keeps them, transfer-encoded"


def template_mail(templates: Path, subject: str) -> dict[str, Any]:
    write_template(templates, "long", subject="{{ subject }}", text="x")
    return {
        "tenant": "acme",
        "app": "billing",
        "to": ["anna@example.com"],
        "template": "long",
        "data": {"subject": subject},
    }


@pytest.mark.parametrize(
    "subject",
    [
        "word " * 400,
        "x" * 2000,
        "Grüße aus Köln " * 133,
        "日本へようこそ" * 286,
        "a" * 990 + " " + "b" * 1009,
        "mixed ü" + "y" * 1993,
    ],
    ids=["ascii words", "ascii unbreakable", "latin", "cjk", "two long words", "mixed"],
)
def test_a_2000_character_subject_is_folded_within_78_octets_and_round_trips(
    settings: Settings, catcher: MailCatcher, templates: Path, subject: str
) -> None:
    with Producer(settings) as producer:
        producer.submit(template_mail(templates, subject))
    drain(settings)
    [caught] = catcher.mails
    assert_clean(caught.data, header_line_limit=78)
    assert caught.parsed()["Subject"] == " ".join(subject.split())


def decoded_display_name(caught: CaughtMail, header: str) -> str:
    """The display name as RFC 2047 decodes it: the standard library's modern parser puts
    a space between adjacent encoded words of a name, which RFC 2047 6.2 says to drop."""
    raw = email.message_from_bytes(caught.data)[header]  # compat32: the raw folded value
    return str(make_header(decode_header(raw))).removesuffix(" <anna@example.com>")


@pytest.mark.parametrize(
    "name",
    [
        "A" * 900,
        "Anna " * 150,
        "Jürgen Groß " * 60,
        "名前" * 400,
        '"Müller, Anna; Buchhaltung <Köln> ' * 25,
    ],
    ids=["ascii unbreakable", "ascii words", "latin", "cjk", "specials"],
)
def test_a_long_display_name_is_encoded_within_78_octets_and_round_trips(
    settings: Settings, catcher: MailCatcher, name: str
) -> None:
    quoted = name.strip().replace("\\", "\\\\").replace('"', '\\"')
    address = f'"{quoted}" <anna@example.com>'
    with Producer(settings) as producer:
        producer.submit(mail(to=[address], reply_to=[address], **{"from": address}))
    drain(settings)
    [caught] = catcher.mails
    assert_clean(caught.data, header_line_limit=78)
    for header in ("From", "To", "Reply-To"):
        assert decoded_display_name(caught, header) == name.strip()
        assert caught.parsed()[header].addresses[0].addr_spec == "anna@example.com"


def test_a_short_quoted_display_name_round_trips_with_the_modern_parser(
    settings: Settings, catcher: MailCatcher
) -> None:
    with Producer(settings) as producer:
        producer.submit(
            mail(to=['"Müller, Anna" <anna@example.com>', '"O\'Brien, \\"Bo\\"" <b@x.de>'])
        )
    drain(settings)
    [caught] = catcher.mails
    names = [a.display_name for a in caught.parsed()["To"].addresses]
    assert names == ["Müller, Anna", 'O\'Brien, "Bo"']


@pytest.mark.parametrize(
    ("value", "longest"),
    [
        ("word " * 199, 78),
        ("a" * 998, 78),
        ("ö" * 998, 78),
        ("ü " * 499, 78),
        # A word that fits a line is not encoded, so that a URL stays usable.
        ("<https://example.com/unsubscribe/" + "u" * 900 + ">", 998),
    ],
    ids=["ascii words", "ascii unbreakable", "non-ascii", "non-ascii words", "url"],
)
def test_a_long_custom_header_value_is_folded_and_round_trips(
    settings: Settings, catcher: MailCatcher, value: str, longest: int
) -> None:
    headers = {"X-Campaign-Note": value, "X-" + "n" * 74: value}
    with Producer(settings) as producer:
        producer.submit(mail(headers=headers))
    drain(settings)
    [caught] = catcher.mails
    assert_clean(caught.data, header_line_limit=max(longest, 100))
    message = caught.parsed()
    for name in headers:
        assert message[name] == value
    # A 76-character name leaves no room on its line: the value's first word follows it.
    lines = head_of(caught.data).split(b"\r\n")
    assert max(len(line) for line in lines if not line.startswith(b"X-nnn")) <= longest


@pytest.mark.parametrize(
    "filename",
    [
        "請求書の控え" * 50,
        "Rechnung Nr. 7 — März " * 13 + "(Kopie).pdf",
        "a" * 300,
        'quote " back\\slash; semicolon, comma (paren).pdf',
        "ü" * 998,
        "x" * 60 + ".pdf",
    ],
    ids=["cjk 300", "latin 300", "ascii 300", "specials", "998 non-ascii", "ascii 64"],
)
def test_a_long_or_non_ascii_file_name_is_continued_within_78_octets_and_round_trips(
    settings: Settings, catcher: MailCatcher, filename: str
) -> None:
    attachment = {"filename": filename, "content": base64.b64encode(b"%PDF").decode()}
    with Producer(settings) as producer:
        producer.submit(mail(attachments=[attachment]))
    drain(settings)
    [caught] = catcher.mails
    assert_clean(caught.data)
    assert max(map(len, caught.data.split(b"\r\n"))) <= 78, "every line of every part"
    [part] = caught.parsed().iter_attachments()
    assert part.get_filename() == filename
    assert part.get_content() == b"%PDF"


@pytest.mark.parametrize(
    "text",
    [
        "NUL \x00 ESC \x1b[1m DEL \x7f BEL \x07 VT \x0b FF \x0c end",
        "bare\rcarriage\rreturns\r\nand\nnewlines",
        "x" * 5000 + "\nshort line",
        "ü" * 3000,
        "日本語" * 2000,
        "tab\tstays\n" * 3,
    ],
    ids=["controls", "bare cr", "long ascii line", "long latin line", "cjk", "tabs"],
)
def test_a_body_never_carries_a_raw_control_byte_or_an_overlong_line(
    settings: Settings, catcher: MailCatcher, text: str
) -> None:
    with Producer(settings) as producer:
        producer.submit(mail(text=text, html=f"<p>{text}</p>"))
    drain(settings)
    [caught] = catcher.mails
    assert_clean(caught.data)
    message = caught.parsed()
    expected = text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
    assert lf(message.get_body(("plain",)).get_content()).rstrip("\n") == expected
    assert lf(message.get_body(("html",)).get_content()).rstrip("\n") == f"<p>{text}</p>".replace(
        "\r\n", "\n"
    ).replace("\r", "\n")


def test_plain_ascii_bodies_go_out_as_they_are(settings: Settings, catcher: MailCatcher) -> None:
    with Producer(settings) as producer:
        producer.submit(mail(text="Hello Anna,\n\tyour invoice.\n", html="<p>Hi</p>"))
    drain(settings)
    data = catcher.mails[0].data
    assert data.count(b"Content-Transfer-Encoding: 7bit") == 2
    assert b"Hello Anna,\r\n\tyour invoice.\r\n" in data


# --- internationalised addresses -------------------------------------------------------------


def test_idn_domains_go_out_idna_encoded_in_envelope_and_headers(
    settings: Settings, catcher: MailCatcher
) -> None:
    with Producer(settings) as producer:
        mail_id = producer.submit(
            mail(
                **{"from": "Büro <buero@münchen.de>"},
                to=["Anna <anna@münchen.de>", "taro@例え.jp"],
                cc=["leser@Bücher.example"],
                bcc=["audit@straße.de"],
                reply_to=["hilfe@münchen.de"],
            )
        )
    drain(settings)
    [caught] = catcher.mails
    assert caught.envelope_from == "buero@xn--mnchen-3ya.de"
    assert set(caught.recipients) == {
        "anna@xn--mnchen-3ya.de",
        "taro@xn--r8jz45g.jp",
        "leser@xn--bcher-kva.example",
        "audit@xn--strae-oqa.de",
    }
    assert caught.data.isascii() and not caught.smtputf8
    message = caught.parsed()
    assert [a.addr_spec for a in message["To"].addresses] == [
        "anna@xn--mnchen-3ya.de",
        "taro@xn--r8jz45g.jp",
    ]
    assert message["Cc"] == "leser@xn--bcher-kva.example"
    assert message["From"] == "Büro <buero@xn--mnchen-3ya.de>"
    assert message["Reply-To"] == "hilfe@xn--mnchen-3ya.de"
    assert message["Message-ID"] == f"<{mail_id}@xn--mnchen-3ya.de>"


UTF8_LOCAL_PARTS = [
    ({"to": ["Jürgen <jürgen@example.com>"]}, "recipient jürgen@example.com"),
    ({"cc": ["用户@例え.jp"]}, "recipient 用户@xn--r8jz45g.jp"),
    ({"bcc": ["ñandú@example.com"]}, "recipient ñandú@example.com"),
    ({"from": "Zoë <zoë@acme.example>"}, "sender zoë@acme.example"),
    ({"reply_to": ["hilfe-ä@acme.example"]}, "an address in the message's headers"),
]
UTF8_IDS = ["to", "cc", "bcc", "from", "reply_to"]


@pytest.mark.parametrize(("fields", "what"), UTF8_LOCAL_PARTS, ids=UTF8_IDS)
def test_a_non_ascii_local_part_is_sent_with_smtputf8_to_a_server_offering_it(
    settings: Settings, catcher: MailCatcher, fields: dict[str, Any], what: str
) -> None:
    with Producer(settings) as producer:
        producer.submit(mail(**fields))
    drain(settings)
    [caught] = catcher.mails
    assert caught.smtputf8
    assert_clean(caught.data)
    address = what.rpartition(" ")[2]
    if what.startswith("recipient"):
        assert address in caught.recipients
    elif what.startswith("sender"):
        assert caught.envelope_from == address
        assert parsed(caught)["From"].addresses[0].addr_spec == address
    else:
        assert parsed(caught)["Reply-To"].addresses[0].addr_spec == "hilfe-ä@acme.example"


@pytest.fixture
def ascii_only_server(
    make_settings: Callable[..., Settings],
) -> Iterator[tuple[Settings, MailCatcher]]:
    """acme/billing and globex/shop through a server that does not offer SMTPUTF8."""
    with MailCatcher(smtputf8=False) as strict:
        settings = make_settings(
            smtp={"strict": {"host": "127.0.0.1", "port": strict.port, "timeout": "5s"}},
            tenants={
                "acme": {"apps": {"billing": {"smtp": "strict"}}},
                "globex": {"apps": {"shop": {"smtp": "strict", "sender": "shop@globex.example"}}},
            },
        )
        declare(settings)
        yield settings, strict


@pytest.mark.parametrize(("fields", "what"), UTF8_LOCAL_PARTS, ids=UTF8_IDS)
def test_a_non_ascii_local_part_is_dead_lettered_at_once_when_the_server_lacks_smtputf8(
    ascii_only_server: tuple[Settings, MailCatcher],
    worker_thread: Callable[..., WorkerThread],
    caplog: pytest.LogCaptureFixture,
    fields: dict[str, Any],
    what: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="rohrpost")
    settings, strict = ascii_only_server
    handle = worker_thread(settings)
    with Producer(settings) as producer:
        producer.submit(mail(**fields))
        producer.submit(GOOD)
        producer.submit(mail(subject="after the bad one"))
    strict.wait_for(lambda mails: len(mails) == 2)
    [(properties, _)] = wait_until(lambda: dead_letters(settings))
    handle.stop()
    assert properties.headers[REASON_HEADER] == "unencodable"
    assert properties.headers[ATTEMPTS_HEADER] == 1
    assert properties.headers[ERROR_HEADER] == (
        f"{what} needs SMTPUTF8, which smtp server strict (127.0.0.1:{strict.port}) does not offer"
    )
    assert {m.recipients for m in strict.mails} == {("good@example.com",), ("anna@example.com",)}
    assert not [r for r in caplog.records if r.exc_info], "no traceback is logged"


class _FailingTransport:
    """A transport whose send raises ``error``: no real input makes the writer fail so."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def send(self, server: str, envelope_from: str, recipients: Any, message: bytes) -> str:
        raise self.error

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "error",
    [
        UnicodeEncodeError("ascii", "ü", 0, 1, "ordinal not in range(128)"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        UnencodableMail("recipient ü@example.com needs SMTPUTF8"),
    ],
    ids=["encode", "decode", "unencodable"],
)
def test_an_encoding_error_in_sending_is_permanent_at_once_and_logs_no_traceback(
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
    error: Exception,
) -> None:
    caplog.set_level(logging.DEBUG, logger="rohrpost")
    settings = make_settings()
    topology = Topology.from_settings(settings)
    renderer = TemplateRenderer(settings.templates_dir, RenderLimits.of(settings))
    processor = MailProcessor(settings, topology, renderer)
    container = parse_container(mail())
    delivery = Delivery(
        tag=1,
        generation=1,
        queue=topology.send_queue("acme", "billing"),
        routing_key=topology.send_queue("acme", "billing"),
        properties=pika.BasicProperties(message_id=str(container.id), headers={}),
        body=encode_container(container),
        redelivered=False,
    )
    try:
        outcome = processor.process(delivery, _FailingTransport(error)).outcome
    finally:
        renderer.close()
    assert isinstance(outcome, DeadLetter)
    assert outcome.reason == "unencodable"
    assert str(error) in outcome.error
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize("password", ["Pässwort-geheim", "пароль-секрет", "密码-秘密"])
def test_a_password_smtplib_cannot_encode_is_transient_and_names_no_secret(
    monkeypatch: pytest.MonkeyPatch, password: str
) -> None:
    variable = f"ROHRPOST_TEST_PW_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(variable, password)
    with MailCatcher(login=("user", "right")) as server:
        config = SmtpServer(host="127.0.0.1", port=server.port, user="user", password_env=variable)
        transport = SmtpTransport({"relay": config})
        with pytest.raises(TransientDeliveryError) as error:
            transport.send("relay", "a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
        transport.close()
    message = str(error.value)
    assert "not ASCII" in message
    assert not any(part in message for part in password.split("-"))
    assert message.isascii(), "not even one character of the secret"
    assert error.value.__cause__ is None and error.value.__suppress_context__
