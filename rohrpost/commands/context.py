"""What every command shares: the lazily loaded settings and logging, confirmations,
mail ids as typed, plural forms and times.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from rohrpost.operations.ids import normalize
from rohrpost.shared.logs import configure_logging
from rohrpost.shared.settings import Settings, config_path, load_settings, stray_variables
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
        """Load the configuration (once) and configure logging from it.

        Without a configuration file and without tenants (from ``ROHRPOST_*``
        variables), says so first: whatever the command then refuses (a tenant that
        is not configured) follows from it.
        """
        if self._settings is None:
            found = config_path(self.config)
            self._settings = load_settings(self.config, **self.overrides)
            configure_logging(
                self._settings.log_level, self._settings.log_format, self._settings.secrets()
            )
            for variable in stray_variables(self._settings):
                click.echo(f"warning: {variable} is no setting; it is ignored", err=True)
            if found is None and not self._settings.tenants:
                click.echo(
                    "warning: no configuration file found (--config, $ROHRPOST_CONFIG or "
                    "./rohrpost.toml): running with the defaults, which configure no tenant",
                    err=True,
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


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 mail``, ``2 mails`` (``nouns`` for an irregular plural)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


# -- confirmations ---------------------------------------------------------------------

YES = click.option(
    "--yes", "-y", is_flag=True, help="Do not ask for confirmation (needed without a terminal)."
)


def confirm(yes: bool, what: str) -> None:
    """Go on when ``--yes`` was given or the operator answers yes on the terminal.

    ``what``: what the command is about to do (``this deletes …``). Every destructive
    command confirms this way. Without a terminal to ask on, a usage error (exit 2)
    says to pass ``--yes``; answering no stops with exit 1 and changes nothing.
    """
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"{what}: pass --yes to confirm (there is no terminal to ask)")
    if not click.confirm(f"{what[:1].upper()}{what[1:]}. Go on?", default=False, err=True):
        raise click.ClickException("not confirmed; nothing was changed")


# -- mail ids ----------------------------------------------------------------------------


if TYPE_CHECKING:
    _TextParam = click.ParamType[str]
else:  # click before 8.2 has no generic ParamType
    _TextParam = click.ParamType


class MailIdType(_TextParam):
    """A mail id as typed: the whole UUID or its first hex digits (4 or more)."""

    name = "MAIL_ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return normalize(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


MAIL_ID = MailIdType()
