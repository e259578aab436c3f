"""Who is acting, and what they may do: one actor per request, one permission function.

A logged-in user and an API token are the same shape (an ``Actor``). Every check goes
through ``permission_allowed(actor, action, resource)``; views never look at roles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["viewer", "operator", "admin"]

#: Reading pages and the API.
VIEW = "view"
#: Seeing recipients unmasked (viewers may be configured to see them masked).
VIEW_RECIPIENTS = "view-recipients"
#: Who may log in or call the API, and with which role.
VIEW_USERS = "view-users"
#: Everything that changes something.
MAIL_ACTIONS = frozenset(
    {
        "edit",
        "retry",
        "purge",
        "resend",
        "cancel",
        "send-now",
        "hold",
        "release",
        "pause",
        "resume",
    }
)

_GRANTS: dict[Role, frozenset[str]] = {
    "viewer": frozenset({VIEW, VIEW_RECIPIENTS}),
    "operator": frozenset({VIEW, VIEW_RECIPIENTS}) | MAIL_ACTIONS,
    "admin": frozenset({VIEW, VIEW_RECIPIENTS, VIEW_USERS}) | MAIL_ACTIONS,
}


@dataclass(frozen=True)
class Actor:
    """Who makes a request: a user (``session``), a token (``token``), or ``local`` (no users)."""

    name: str
    role: Role
    via: Literal["session", "token", "local"]
    #: Viewers see recipients masked when the configuration says so.
    masked: bool = False

    @property
    def audit_name(self) -> str:
        """How the history records this actor."""
        return f"token:{self.name}" if self.via == "token" else self.name


def permission_allowed(actor: Actor | None, action: str, resource: Any = None) -> bool:
    """True when ``actor`` may do ``action`` (on ``resource``: a tenant, a mail …).

    Roles apply to every tenant alike, so ``resource`` does not change the answer
    today; it is passed so a per-tenant rule needs no change in any view.
    """
    if actor is None:
        return False
    if action == VIEW_RECIPIENTS and actor.masked:
        return False
    return action in _GRANTS[actor.role]


_ADDRESS = re.compile(r"""([^\s<>"'(),;:@\\])[^\s<>"'(),;:@\\]*@([^\s<>"'(),;:@\\]+)""")


def mask_text(text: str) -> str:
    """``text`` with each e-mail address's local part hidden: ``a…@example.com``."""
    return _ADDRESS.sub(r"\1…@\2", text)


def masked(value: Any) -> Any:
    """``value`` (a view's data) with every address in every string masked."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {key: masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [masked(item) for item in value]
    return value
