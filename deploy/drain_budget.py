"""How long a send worker's SIGTERM drain takes at most, for a configuration file.

    python deploy/drain_budget.py deploy/kubernetes/overlays/example/rohrpost.toml

On SIGTERM a worker cancels its consumers and finishes every mail it already holds
before it exits 0 (README, Operating): at most ``prefetch`` mails per send queue it
consumes (three per route: the high, normal and bulk lanes), sent ``threads`` at a
time. Each mail costs one SMTP transaction; when its server does not answer at all,
one ``timeout`` of that server (smtplib gives up on the connection or the greeting,
the mail is retried later, the next mail connects anew). Then the worker waits up to
10 s for the broker to confirm the cancel, up to ``publish_timeout`` for its last
confirms and 5 s for the broker to answer the connection's close (one that does not
answer is then cut off). So, per worker process:

    ceil(prefetch * 3 * routes / threads) * slowest SMTP timeout + 10 s + publish_timeout + 5 s

With ``--processes N`` the N processes drain side by side: the same bound. A server
that answers is much faster (rounds * its time per mail; tests/test_deploy.py measures
both). terminationGracePeriodSeconds (Kubernetes) and stop_grace_period (compose)
must be at least this; tests/test_deploy.py checks the committed ones.
"""

from __future__ import annotations

import math
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from rohrpost.shared.broker import CLOSE_HANDSHAKE_SECONDS
from rohrpost.shared.container import PRIORITIES
from rohrpost.shared.errors import ConfigError
from rohrpost.shared.settings import Settings, settings_from_mapping

#: How long the worker waits for the broker to confirm that its consumers are cancelled.
CANCEL_SECONDS = 10.0


@dataclass(frozen=True)
class DrainBudget:
    """The worst-case SIGTERM drain of one worker process, and what it is made of."""

    held: int  # mails a worker process may hold: prefetch per consumed send queue (lane)
    threads: int
    mail_seconds: float  # the slowest SMTP server's timeout among the consumed routes
    publish_timeout: float

    @property
    def rounds(self) -> int:
        """Turns the sender threads take to finish every held mail."""
        return math.ceil(self.held / self.threads)

    @property
    def seconds(self) -> float:
        """The bound: the rounds at the slowest timeout, cancel, last confirms, close."""
        return (
            self.rounds * self.mail_seconds
            + CANCEL_SECONDS
            + self.publish_timeout
            + CLOSE_HANDSHAKE_SECONDS
        )

    @classmethod
    def of(cls, settings: Settings) -> DrainBudget:
        """The budget of a worker consuming every enabled route of ``settings``."""
        routes = settings.routes()
        used = {settings.tenants[t].apps[a].smtp for t, a in routes}
        timeouts = [settings.smtp[name].timeout.total_seconds() for name in used]
        return cls(
            held=settings.prefetch * len(PRIORITIES) * len(routes),
            threads=settings.threads,
            mail_seconds=max(timeouts, default=0.0),
            publish_timeout=settings.publish_timeout.total_seconds(),
        )

    def explain(self) -> str:
        """One line with the arithmetic."""
        return (
            f"ceil({self.held} held / {self.threads} threads) = {self.rounds} rounds"
            f" x {self.mail_seconds:g} s + {CANCEL_SECONDS:g} s + {self.publish_timeout:g} s"
            f" + {CLOSE_HANDSHAKE_SECONDS:g} s"
            f" = {self.seconds:g} s"
        )


def budget_of_file(path: Path) -> DrainBudget:
    """The budget of the configuration in ``path`` (TOML; the environment is not read)."""
    return DrainBudget.of(settings_from_mapping(tomllib.loads(path.read_text())))


def main(argv: list[str]) -> int:
    """Print the budget of each configuration file named in ``argv``."""
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    for name in argv[1:]:
        try:
            budget = budget_of_file(Path(name))
        except (OSError, tomllib.TOMLDecodeError, ConfigError) as exc:
            print(
                f"error: {name}: {exc.strerror if isinstance(exc, OSError) else exc}",
                file=sys.stderr,
            )
            return 2
        print(f"{name}: {budget.explain()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
