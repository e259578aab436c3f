"""Password and token hashes: scrypt with a random salt, in a self-describing format.

``scrypt$n$r$p$salt$hash`` (salt and hash base64). scrypt is in the standard
library (OpenSSL) and is memory-hard; n = 2**14, r = 8 costs ~16 MiB and some tens
of milliseconds per check, which is what a login may cost. API tokens are random
(256 bits), so a plain ``sha256$hex`` is as safe for them and cheap per request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

_N, _R, _P = 2**14, 8, 1
_LENGTH = 32
#: Checked against when a user name is unknown, so a login takes as long either way.
_DUMMY = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def hash_password(password: str) -> str:
    """A new scrypt hash of ``password`` with a random salt."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=_LENGTH)
    encode = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${encode(salt).decode()}${encode(digest).decode()}"


def hash_token(token: str) -> str:
    """The hash of an API token as the configuration holds it."""
    return "sha256$" + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A random API token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def verify(secret: str, stored: str | None) -> bool:
    """True when ``secret`` matches the ``stored`` hash; constant time in the secret."""
    parts = (stored or _DUMMY).split("$")
    try:
        if parts[0] == "sha256" and len(parts) == 2:
            computed = hashlib.sha256(secret.encode()).hexdigest().encode()
            expected = parts[1].encode()
        elif parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = (int(x) for x in parts[1:4])
            salt, expected = base64.b64decode(parts[4]), base64.b64decode(parts[5])
            if n > 2**20 or r > 32 or p > 16:  # a hash from the file must not exhaust memory
                return False
            computed = hashlib.scrypt(
                secret.encode(), salt=salt, n=n, r=r, p=p, dklen=len(expected), maxmem=2**30
            )
        else:
            return False
    except ValueError:
        return False
    return hmac.compare_digest(computed, expected) and stored is not None
