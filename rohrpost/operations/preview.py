"""A dry run: a container rendered with the current templates and written as MIME, not sent."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rohrpost.consumer.mime import build_message, message_id
from rohrpost.consumer.render import RenderLimits, TemplateRenderer
from rohrpost.shared.container import parse_container
from rohrpost.shared.errors import ContainerError, RenderError, UnencodableMail
from rohrpost.shared.settings import Settings

_LINE = re.compile(r" line (\d+):")


@dataclass(frozen=True)
class MailPreview:
    """What a mail would look like if sent now; or why it cannot be rendered."""

    subject: str | None = None
    text: str | None = None
    html: str | None = None
    headers: str | None = None
    error: str | None = None
    #: The template line an error names, when it names one.
    error_line: int | None = None


class DryRun:
    """Renders containers as a worker would, with the same limits; use ``close`` at the end."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._renderer = TemplateRenderer(settings.templates_dir, RenderLimits.of(settings))

    def close(self) -> None:
        """Stop the renderer's watchdog thread."""
        self._renderer.close()

    def preview(self, container: dict[str, Any]) -> MailPreview:
        """The rendered mail (subject, text, html, headers), or the error a worker would meet."""
        try:
            mail = parse_container(container)
            rendered = self._renderer.render(mail)
            app = self._settings.app(mail.tenant, mail.app)
            sender = mail.from_ or (app.sender if app else "unknown@rohrpost.invalid")
            message = build_message(mail, rendered, sender=sender, msg_id=message_id(mail, sender))
        except (ContainerError, RenderError, UnencodableMail, OSError) as exc:
            found = _LINE.search(str(exc))
            return MailPreview(error=str(exc), error_line=int(found.group(1)) if found else None)
        head = message.partition(b"\r\n\r\n")[0].decode("utf-8", "backslashreplace")
        return MailPreview(
            subject=rendered.subject, text=rendered.text, html=rendered.html, headers=head
        )
