"""MIME messages, built with the standard library's compat32 API.

Measured here: the modern ``EmailMessage`` API costs ~1.3 ms a mail, the compat32
classes ~0.46 ms, so the compat32 path is used. Header values never carry CR/LF
(the container model refuses them; rendered subjects are folded to one line).
"""

from __future__ import annotations

from email.charset import BASE64, QP, Charset
from email.header import Header
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.policy import compat32
from email.utils import formataddr, formatdate, getaddresses
from typing import Any

from consumer.render import RenderedMail
from shared.container import Attachment, MailContainer

_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP
_UTF8_B64 = Charset("utf-8")
_UTF8_B64.body_encoding = BASE64
_MAX_7BIT_LINE = 998
# SMTP wants CRLF; smtplib does not convert the line ends of a bytes message, and
# servers refuse bare LF (it enables SMTP smuggling).
_SMTP_POLICY = compat32.clone(linesep="\r\n")


def message_id(mail: MailContainer, sender: str) -> str:
    """The Message-ID of ``mail``: stable across attempts, derived from its id."""
    domain = getaddresses([sender])[0][1].rpartition("@")[2] or "rohrpost.invalid"
    return f"<{mail.id}@{domain}>"


def _header(value: str) -> Any:
    # compat32 messages take Header objects as values; typeshed only admits str.
    return value if value.isascii() else Header(value, "utf-8")


def _addresses(values: tuple[str, ...] | list[str]) -> str:
    return ", ".join(formataddr(pair, charset="utf-8") for pair in getaddresses(list(values)))


def _text_part(body: str, subtype: str) -> MIMENonMultipart:
    part = MIMENonMultipart("text", subtype)
    ascii_safe = body.isascii() and all(len(line) <= _MAX_7BIT_LINE for line in body.splitlines())
    if ascii_safe:
        part.set_payload(body, "us-ascii")
    else:
        # Mostly-Latin text reads well and stays small as quoted-printable; CJK and
        # other scripts are smaller as base64.
        latin = sum(ch.isascii() for ch in body) >= 0.8 * len(body)
        part.set_payload(body, _UTF8_QP if latin else _UTF8_B64)
    return part


def _attachment_part(attachment: Attachment) -> MIMEBase:
    maintype, _, subtype = attachment.content_type.partition("/")
    part = MIMEBase(maintype, subtype)
    content = attachment.content
    # The container already carries base64: wrap it to 76-column lines instead of
    # decoding and encoding again.
    part.set_payload("\n".join(content[i : i + 76] for i in range(0, len(content), 76)))
    part["Content-Transfer-Encoding"] = "base64"
    filename = attachment.filename
    part.add_header(
        "Content-Disposition",
        "attachment",
        filename=filename if filename.isascii() else ("utf-8", "", filename),
    )
    return part


def _body(rendered: RenderedMail) -> MIMEBase:
    if rendered.text is not None and rendered.html is not None:
        alternative = MIMEMultipart("alternative")
        alternative.attach(_text_part(rendered.text, "plain"))
        alternative.attach(_text_part(rendered.html, "html"))
        return alternative
    if rendered.html is not None:
        return _text_part(rendered.html, "html")
    return _text_part(rendered.text or "", "plain")


def build_message(
    mail: MailContainer, rendered: RenderedMail, *, sender: str, msg_id: str
) -> bytes:
    """Return the complete message (headers and body) as bytes, ready for SMTP DATA."""
    root: MIMEBase = _body(rendered)
    if mail.attachments:
        mixed = MIMEMultipart("mixed")
        mixed.attach(root)
        for attachment in mail.attachments:
            mixed.attach(_attachment_part(attachment))
        root = mixed
    root["From"] = _addresses([sender])
    if mail.to:
        root["To"] = _addresses(mail.to)
    if mail.cc:
        root["Cc"] = _addresses(mail.cc)
    if mail.reply_to:
        root["Reply-To"] = _addresses(mail.reply_to)
    root["Subject"] = _header(rendered.subject)
    root["Date"] = formatdate(usegmt=True)
    root["Message-ID"] = msg_id
    for name, value in mail.headers.items():
        root[name] = _header(value)
    return root.as_bytes(policy=_SMTP_POLICY)
