"""Rendering template mails at send time.

Templates live in ``{templates_dir}/{tenant}/{app}/{name}/`` as ``subject.j2``,
``text.j2`` and optionally ``html.j2``. They run in jinja2's sandbox (template
authors are not trusted with Python), HTML is autoescaped, and undefined variables
are errors (a mail saying "Dear ," is worse than a dead letter). Templates are
re-read when their file changes, so an edit applies to mails already queued.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from rohrpost.shared.container import MailContainer
from rohrpost.shared.errors import RenderError


@dataclass(frozen=True, slots=True)
class RenderedMail:
    """The content of one mail, ready for MIME."""

    subject: str
    text: str | None
    html: str | None


#: Control characters that are not whitespace (str.split() takes care of those).
_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")


def _one_line(subject: str) -> str:
    # A subject is a header, and template data may hold anything: line breaks (CR, LF,
    # NEL, U+2028 …) and runs of whitespace become one space, other control
    # characters (NUL, ESC, DEL …) are dropped, as they have no meaning in a subject.
    return " ".join(_CONTROL.sub("", subject).split())


class TemplateRenderer:
    """Renders containers, from templates or as given."""

    def __init__(self, templates_dir: Path) -> None:
        self._env = SandboxedEnvironment(
            loader=jinja2.FileSystemLoader(str(templates_dir)),
            autoescape=lambda name: name is not None and name.endswith("html.j2"),
            undefined=jinja2.StrictUndefined,
            auto_reload=True,
            keep_trailing_newline=True,
        )

    def render(self, mail: MailContainer) -> RenderedMail:
        """Return subject, text and html of ``mail``; RenderError if a template fails."""
        if mail.template is None:
            assert mail.subject is not None
            return RenderedMail(_one_line(mail.subject), mail.text, mail.html)
        base = f"{mail.tenant}/{mail.app}/{mail.template}"
        subject = self._render(f"{base}/subject.j2", mail, required=True)
        text = self._render(f"{base}/text.j2", mail, required=False)
        html = self._render(f"{base}/html.j2", mail, required=False)
        if text is None and html is None:
            raise RenderError(f"template {base}: needs text.j2 or html.j2")
        assert subject is not None
        return RenderedMail(_one_line(subject), text, html)

    def _render(self, name: str, mail: MailContainer, *, required: bool) -> str | None:
        try:
            template = self._env.get_template(name)
        except jinja2.TemplateNotFound:
            if required:
                raise RenderError(f"template {name} not found") from None
            return None
        except jinja2.TemplateSyntaxError as exc:
            raise RenderError(f"template {name} line {exc.lineno}: {exc.message}") from exc
        try:
            return template.render(mail.data)
        except jinja2.TemplateError as exc:
            raise RenderError(f"template {name}: {exc}") from exc
        except Exception as exc:
            raise RenderError(f"template {name}: {type(exc).__name__}: {exc}") from exc
