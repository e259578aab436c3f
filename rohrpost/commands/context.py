"""What every command shares: the lazily loaded settings and logging."""

from __future__ import annotations

import click

from shared.logs import configure_logging
from shared.settings import Settings, load_settings


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
