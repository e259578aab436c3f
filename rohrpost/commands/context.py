"""What every command shares: the lazily loaded settings and logging."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from rohrpost.shared.logs import configure_logging
from rohrpost.shared.settings import Settings, load_settings
from rohrpost.shared.timeparse import parse_when


class CliContext:
    """The global options, and the settings built from them on first use."""

    def __init__(self, config: str | None, log_level: str | None, log_format: str | None) -> None:
        self.config = config
        self.overrides = {
            key: value
            for key, value in (("log_level", log_level), ("log_format", log_format))
            if value is not None
        }
        self._settings: Settings | None = None

    def settings(self) -> Settings:
        """Load the configuration (once) and configure logging from it."""
        if self._settings is None:
            self._settings = load_settings(self.config, **self.overrides)
            configure_logging(
                self._settings.log_level, self._settings.log_format, self._settings.secrets()
            )
        return self._settings


pass_context = click.make_pass_decorator(CliContext)


def when_option(value: str | None, flag: str) -> datetime | None:
    """A time flag's value (ISO 8601, or relative like +2h, -7d); BadParameter names ``flag``."""
    if value is None:
        return None
    try:
        return parse_when(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=flag) from exc


def short_time(moment: datetime | None) -> str:
    """``moment`` in UTC to the second, or ``-``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if moment else "-"
