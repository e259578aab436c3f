"""Addresses as they go on the wire, in the envelope and in the headers.

Domains go out in their ASCII (IDNA) form, which every server takes: the form
email-validator computed when the container was checked. A local part that is not
ASCII has no ASCII form: it goes out as UTF-8, which only a server offering
SMTPUTF8 (RFC 6531) may be given; the transport checks that. Display names are
quoted, or RFC 2047 encoded words when not short printable ASCII; a long list puts
one address on a line.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from email.utils import getaddresses

from email_validator import EmailNotValidError, validate_email

from rohrpost.consumer.headers import FOLD_AT, encoded_words, is_plain
from rohrpost.shared.container import is_plain_address
from rohrpost.shared.errors import UnencodableMail

#: Characters that make a display name a quoted string (RFC 5322 specials).
_SPECIALS = re.compile(r'[][\\()<>@,:;".]')
#: Room on a header's first line after the longest name of an address header.
_ROOM = FOLD_AT - len("Reply-To: ")


# Cached: email-validator takes ~170 µs an address.
@functools.lru_cache(maxsize=16384)
def wire_address(addr_spec: str) -> str:
    """``addr_spec`` with its domain in IDNA form (the local part as validated)."""
    if is_plain_address(addr_spec):
        return addr_spec
    try:
        checked = validate_email(addr_spec, check_deliverability=False)
    except EmailNotValidError as exc:  # the container was validated: an old one, or a bug
        raise UnencodableMail(f"address {addr_spec!r}: {exc}") from None
    return f"{checked.local_part}@{checked.ascii_domain}"


def _parsed(value: str) -> tuple[str, str]:
    """(display name, addr-spec) of ``value``."""
    if "\r" in value or "\n" in value:  # getaddresses drops them: another address
        raise UnencodableMail(f"address {value!r}: holds CR or LF")
    name, addr_spec = getaddresses([value])[0]
    return name, addr_spec or value


@functools.lru_cache(maxsize=16384)
def envelope_address(address: str) -> str:
    """The addr-spec of ``address`` (``Name <addr>`` or bare) for MAIL FROM and RCPT TO."""
    return address if is_plain_address(address) else wire_address(_parsed(address)[1])


def header_address(value: str) -> str:
    """One address for a From, To, Cc or Reply-To header."""
    return value if is_plain_address(value) else _named_address(value)


# Cached: a worker writes the same sender into every mail (~8 µs uncached).
@functools.lru_cache(maxsize=16384)
def _named_address(value: str) -> str:
    name, addr_spec = _parsed(value)
    spec = wire_address(addr_spec)
    if not name:
        return spec
    phrase = _phrase(name)
    last_line = phrase.rpartition("\n")[2]
    space = " " if len(last_line) + len(spec) + 3 <= FOLD_AT else "\r\n "
    return f"{phrase}{space}<{spec}>"


def _phrase(name: str) -> str:
    if is_plain(name) and len(name) <= _ROOM - 2:
        if _SPECIALS.search(name) is None:
            return name
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if len(quoted) <= _ROOM:
            return quoted
    return encoded_words(name, _ROOM)


def address_list(name: str, values: Sequence[str]) -> str:
    """The addresses of header ``name``: on one line if short, else one a line."""
    rendered = [header_address(v) for v in values]
    joined = ", ".join(rendered)
    if len(joined) + len(name) + 2 <= FOLD_AT and "\n" not in joined:
        return joined
    return ",\r\n ".join(rendered)
