"""Logging: structlog for the call sites, the standard library for the output.

rohrpost's modules log through ``get_logger(__name__)``: a structlog logger bound to
the stdlib logger of that name, whatever structlog's global configuration is. The
line's ``event`` becomes the record's message and every field a record attribute,
so a service that imports the producer sees rohrpost's lines in its own logging
configuration, under the ``rohrpost`` logger, and nothing at all when it has none
(the library installs only a ``NullHandler``, as the logging HOWTO asks of
libraries).

rohrpost's own processes call ``configure_logging`` once, at the entry point: JSON
lines on stderr (a readable console renderer on a TTY) for every stdlib record,
rohrpost's and its libraries' alike. Bind ``mail_id``, ``tenant``, ``app`` and
``attempt`` with ``structlog.contextvars`` so every line about a mail carries them.
Known secret values are scrubbed from every line, tracebacks included; tracebacks
never carry local variables.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, MutableMapping
from datetime import UTC, datetime
from typing import Any, Literal

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Attributes every LogRecord has: a field of the same name would make logging raise.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_LOG_KWARGS = ("exc_info", "stack_info")


def _to_stdlib(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``logging.Logger.log``: message, fields as ``extra``."""
    kwargs = {key: event_dict.pop(key) for key in _LOG_KWARGS if key in event_dict}
    message = event_dict.pop("event", "")
    extra = {(f"{k}_" if k in _RECORD_ATTRIBUTES else k): v for k, v in event_dict.items()}
    return {"msg": message, "extra": extra, **kwargs}


_CALL_SITE_PROCESSORS: list[Any] = [
    structlog.stdlib.filter_by_level,
    structlog.contextvars.merge_contextvars,
    _to_stdlib,
]


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger writing to the stdlib logger ``name`` (under ``rohrpost``)."""
    return structlog.stdlib.BoundLogger(
        logging.getLogger(name), processors=_CALL_SITE_PROCESSORS, context={}
    )


def _secret_forms(secret: str) -> set[str]:
    """``secret`` as it may appear in a line: raw, as a Python repr, JSON-escaped, as bytes."""
    forms = {secret, repr(secret)[1:-1], json.dumps(secret)[1:-1]}
    forms.add(repr(secret.encode("utf-8", "backslashreplace"))[2:-1])
    return {form for form in forms if form}


class SecretScrubber:
    """A processor replacing every known secret value with ``***``, at any depth."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms = set().union(*(_secret_forms(s) for s in secrets if s))
        # Longest first, so a secret that contains another is replaced whole.
        self._forms = sorted(forms, key=len, reverse=True)

    def scrub(self, value: Any) -> Any:
        """``value`` with every secret replaced, through dicts, lists and tuples."""
        if isinstance(value, str):
            for form in self._forms:
                if form in value:
                    value = value.replace(form, "***")
            return value
        if isinstance(value, dict):
            return {key: self.scrub(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(item) for item in value]
        return value

    def __call__(
        self, _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if self._forms:
            for key, value in event_dict.items():
                event_dict[key] = self.scrub(value)
        return event_dict


def _plain(value: Any) -> Any:
    """``value`` as JSON can carry it: anything else as its ``str``."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return str(value)


class LineFormatter(logging.Formatter):
    """Every stdlib record as one line: rohrpost's, its libraries' and the service's.

    The line carries ``event``, ``level``, ``timestamp``, the record's extra fields
    and, for an exception, its traceback without local variables; secrets are
    scrubbed last, from every field at any depth.
    """

    def __init__(self, fmt: Literal["json", "console"], secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._console = fmt == "console"
        self._scrubber = SecretScrubber(secrets)
        self._exceptions: Any = (
            structlog.processors.format_exc_info
            if self._console
            else structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
        self._renderer: Any = (
            structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
            if self._console
            else structlog.processors.JSONRenderer()
        )

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "event": record.getMessage(),
            "level": record.levelname.lower(),
            "timestamp": datetime.fromtimestamp(record.created, UTC).strftime(
                "%Y-%m-%dT%H:%M:%S.%fZ"
            ),
        }
        if not record.name.startswith("rohrpost"):
            line["logger"] = record.name
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES:
                line[key] = value if self._console else _plain(value)
        if record.exc_info:
            line["exc_info"] = record.exc_info
            line = self._exceptions(None, record.levelname, line)
        return str(self._renderer(None, record.levelname, self._scrubber(None, "", line)))


def configure_logging(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    secrets: Iterable[str] = (),
) -> None:
    """Send this process's log records to stderr as lines; call once, at the entry point."""
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter("console" if console else "json", secrets))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    # pika narrates every frame at DEBUG (enough to slow a worker to a crawl) and logs a
    # failed connect as seven ERROR lines with a traceback; rohrpost reports connection
    # trouble itself, once. pika's own warnings and errors show at --log-level debug.
    logging.getLogger("pika").setLevel(logging.WARNING if level == "debug" else logging.CRITICAL)
