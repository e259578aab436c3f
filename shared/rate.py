"""Rates as the configuration writes them: ``20/s``, ``600/m``, ``1000/h``, ``50000/d``."""

from __future__ import annotations

import re
from dataclasses import dataclass

_PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h|d)\s*$")


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` mails per ``period`` (one of s, m, h, d)."""

    count: float
    period: str

    @property
    def per_second(self) -> float:
        """The rate in mails per second."""
        return self.count / _PERIODS[self.period]

    @property
    def interval_ms(self) -> float:
        """Milliseconds between two mails at this rate (GCRA's emission interval)."""
        return 1000.0 / self.per_second

    def __str__(self) -> str:
        count = int(self.count) if float(self.count).is_integer() else self.count
        return f"{count}/{self.period}"


def parse_rate(value: str | Rate) -> Rate:
    """Parse ``20/s`` (or ``/m``, ``/h``, ``/d``); ValueError saying how to write one."""
    if isinstance(value, Rate):
        return value
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(
            f"{value!r} is not a rate; write mails per second, minute, hour or day: "
            '"20/s", "600/m", "1000/h", "50000/d"'
        )
    count, period = float(match.group(1)), match.group(2)
    if count <= 0:
        raise ValueError(f"{value!r}: a rate must be more than 0")
    return Rate(count, period)
