"""Rendering template mails at send time.

Templates live in ``{templates_dir}/{tenant}/{app}/{name}/`` as ``subject.j2``,
``text.j2`` and optionally ``html.j2``. They run in a bounded jinja2 sandbox
(template authors are not trusted with Python, nor with the process: see
``sandbox``), HTML is autoescaped, and undefined variables are errors (a mail saying
"Dear ," is worse than a dead letter). Templates are re-read when their file
changes, so an edit applies to mails already queued.

A mail's templates render within ``render_timeout`` and produce at most
``max_render_bytes`` of UTF-8 together; a template reads only files of its own app.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import jinja2

from rohrpost.consumer.bounds import data_size
from rohrpost.consumer.sandbox import BoundedEnvironment
from rohrpost.consumer.template_loader import AppTemplateLoader, TemplateRefused, scoped_name
from rohrpost.consumer.watchdog import RenderTimeout, RenderWatchdog
from rohrpost.shared.container import MailContainer
from rohrpost.shared.errors import RenderError
from rohrpost.shared.settings import Settings


@dataclass(frozen=True, slots=True)
class RenderedMail:
    """The content of one mail, ready for MIME."""

    subject: str
    text: str | None
    html: str | None


#: Control characters that are not whitespace (str.split() takes care of those).
_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")


@dataclass(frozen=True, slots=True)
class RenderLimits:
    """How long a mail's templates may render and how much they may produce."""

    timeout: float
    max_bytes: int
    max_template_bytes: int

    @classmethod
    def of(cls, settings: Settings) -> RenderLimits:
        """The limits configured in ``settings``."""
        return cls(
            timeout=settings.render_timeout.total_seconds(),
            max_bytes=settings.max_render_bytes,
            max_template_bytes=settings.max_template_bytes,
        )


def _one_line(subject: str) -> str:
    # A subject is a header, and template data may hold anything: line breaks (CR, LF,
    # NEL, U+2028 …) and runs of whitespace become one space, other control
    # characters (NUL, ESC, DEL …) are dropped, as they have no meaning in a subject.
    return " ".join(_CONTROL.sub("", subject).split())


class _MailEnvironment(BoundedEnvironment):
    def join_path(self, template: str, parent: str) -> str:
        return scoped_name(template, parent)


class _OutputBudget:
    """Counts what a mail's templates produce: UTF-8 bytes, at most ``limit``."""

    def __init__(self, limit: int, base: str) -> None:
        self._limit = limit
        self._base = base
        self._used = 0

    def take(self, chunks: Iterator[str]) -> str:
        """Join ``chunks`` into one part; RenderError once the mail's output is too large."""
        parts: list[str] = []
        # Characters are a lower bound of the bytes: count them while rendering,
        # the bytes once at the end.
        characters = self._used
        for chunk in chunks:
            characters += len(chunk)
            if characters > self._limit:
                self._refuse()
            parts.append(chunk)
        text = "".join(parts)
        self._used += len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        if self._used > self._limit:
            self._refuse()
        return text

    def _refuse(self) -> NoReturn:
        raise RenderError(
            f"template {self._base}: output larger than max_render_bytes ({self._limit})"
        )


class TemplateRenderer:
    """Renders containers, from templates or as given."""

    def __init__(self, templates_dir: Path, limits: RenderLimits) -> None:
        self._limits = limits
        self._env = _MailEnvironment(
            max_size=limits.max_bytes,
            loader=AppTemplateLoader(templates_dir, limits.max_template_bytes),
            autoescape=lambda name: name is not None and name.endswith("html.j2"),
            undefined=jinja2.StrictUndefined,
            auto_reload=True,
            keep_trailing_newline=True,
        )
        self._watchdog = RenderWatchdog(limits.timeout)

    def close(self) -> None:
        """Stop the render deadline's watchdog thread."""
        self._watchdog.close()

    def render(self, mail: MailContainer) -> RenderedMail:
        """Return subject, text and html of ``mail``; RenderError if a template fails."""
        if mail.template is None:
            assert mail.subject is not None
            return RenderedMail(_one_line(mail.subject), mail.text, mail.html)
        base = f"{mail.tenant}/{mail.app}/{mail.template}"
        try:
            with self._watchdog:
                return self._render_all(base, mail)
        except RenderTimeout:
            raise RenderError(
                f"template {base}: rendering took longer than render_timeout "
                f"({self._limits.timeout:g}s)"
            ) from None

    def _render_all(self, base: str, mail: MailContainer) -> RenderedMail:
        # Every value a template handles stays within the limit, the data too: a
        # step C runs at once (sorting a list, printing it) is bounded by its size.
        if (size := data_size(mail.data, self._limits.max_bytes)) > self._limits.max_bytes:
            raise RenderError(
                f"template {base}: data of {size} or more characters and items, more than "
                f"max_render_bytes ({self._limits.max_bytes})"
            )
        budget = _OutputBudget(self._limits.max_bytes, base)
        subject = self._render(f"{base}/subject.j2", mail, budget, required=True)
        text = self._render(f"{base}/text.j2", mail, budget, required=False)
        html = self._render(f"{base}/html.j2", mail, budget, required=False)
        if text is None and html is None:
            raise RenderError(f"template {base}: needs text.j2 or html.j2")
        assert subject is not None
        return RenderedMail(_one_line(subject), text, html)

    def _render(
        self, name: str, mail: MailContainer, budget: _OutputBudget, *, required: bool
    ) -> str | None:
        try:
            template = self._env.get_template(name)
        except jinja2.TemplateNotFound as exc:
            if exc.name == name and not required:
                return None
            _reraise(name, exc)
        except Exception as exc:
            _reraise(name, exc)
        try:
            return budget.take(template.generate(mail.data))
        except Exception as exc:
            _reraise(name, exc)


def _reraise(name: str, exc: Exception) -> NoReturn:
    """Raise ``exc`` of template ``name`` as a RenderError; an OSError stays one (transient)."""
    if isinstance(exc, RenderError):
        raise exc
    if isinstance(exc, jinja2.TemplateSyntaxError):
        message = f"template {exc.name or name} line {exc.lineno}: {exc.message}"
    elif isinstance(exc, jinja2.TemplateNotFound):
        message = f"template {exc.name} not found" + (
            f" (used by {name})" if exc.name != name else ""
        )
    elif isinstance(exc, TemplateRefused) and exc.name is not None:
        message = str(exc) + (f" (used by {name})" if exc.name != name else "")
    elif isinstance(exc, jinja2.TemplateError):
        message = f"template {name}: {exc}"
    elif isinstance(exc, OSError):
        raise exc  # the templates directory cannot be read now: try again later
    else:
        message = f"template {name}: {type(exc).__name__}: {exc}"
    raise RenderError(message) from exc
