"""Loads a tenant's templates from their app's directory and from nowhere else.

Template names are ``{tenant}/{app}/{path}``. A name a template uses in
``{% include %}``, ``{% import %}``, ``{% from %}`` or ``{% extends %}`` is relative
to the directory of the app it belongs to (``scoped_name``), may not contain ``..``
or start with ``/``, and a file reached through a symlink must still lie inside that
directory, so no template reaches another app's or tenant's files.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import jinja2


class TemplateRefused(jinja2.TemplateError):
    """A template name or file that may not or cannot be used; ``name``: the file's template."""

    def __init__(self, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


def scoped_name(name: str, parent: str) -> str:
    """The full name of ``name`` used by template ``parent``: in the same app's directory."""
    tenant, app, _ = parent.split("/", 2)
    if name.startswith("/") or "\\" in name or ".." in name.split("/"):
        raise TemplateRefused(
            f"template name {name!r} refused: names are relative to the directory of "
            f"{tenant}/{app} and cannot leave it"
        )
    return f"{tenant}/{app}/{name}"


class AppTemplateLoader(jinja2.BaseLoader):
    """Reads ``{root}/{tenant}/{app}/{path}``: UTF-8, at most ``max_bytes``, inside the app."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self._root = root
        self._max_bytes = max_bytes

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        parts = template.split("/")
        if len(parts) < 3 or ".." in parts or not all(parts[:2]):
            raise TemplateRefused(f"template name {template!r} refused")
        app_dir = self._root / parts[0] / parts[1]
        path = app_dir.joinpath(*parts[2:])
        try:
            real = path.resolve(strict=True)
            inside = real.is_relative_to(app_dir.resolve(strict=True))
        except (OSError, RuntimeError):  # missing, or a symlink loop
            raise jinja2.TemplateNotFound(template) from None
        if not inside:
            raise TemplateRefused(
                f"template {template} refused: it resolves to a file outside "
                f"{parts[0]}/{parts[1]} (a symlink?)",
                template,
            )
        data, stamp = self._read(real, template)
        try:
            source = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TemplateRefused(
                f"template {template} is not UTF-8: {exc.reason} (byte {exc.start})", template
            ) from None

        def uptodate() -> bool:
            # Follows symlinks: a link pointed elsewhere has another inode.
            try:
                return _stamp(os.stat(path)) == stamp
            except OSError:
                return False

        return source, str(path), uptodate

    def _read(self, real: Path, template: str) -> tuple[bytes, tuple[int, ...]]:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise jinja2.TemplateNotFound(template) from None
        with os.fdopen(fd, "rb") as file:
            status = os.fstat(file.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise TemplateRefused(f"template {template} refused: not a regular file", template)
            data = file.read(self._max_bytes + 1)
        if len(data) > self._max_bytes:
            raise TemplateRefused(
                f"template {template} refused: larger than max_template_bytes ({self._max_bytes})",
                template,
            )
        return data, _stamp(status)


def _stamp(status: os.stat_result) -> tuple[int, ...]:
    return (status.st_mtime_ns, status.st_size, status.st_ino, status.st_dev)
