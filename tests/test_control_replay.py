"""The control stream replayed at start and after a reconnect: old instructions are not news."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from rohrpost.operations import OperatorSession
from rohrpost.operations.actions import pause, resume
from rohrpost.shared.settings import Settings
from tests.conftest import WorkerThread, wait_until
from tests.test_broker import close_connections, needs_rabbitmqctl


def messages(caplog: pytest.LogCaptureFixture, *texts: str) -> list[tuple[str, str]]:
    return [
        (record.getMessage(), getattr(record, "action", "") or "")
        for record in caplog.records
        if record.getMessage() in texts and record.levelno >= logging.INFO
    ]


@needs_rabbitmqctl
def test_old_pauses_are_not_logged_as_news_after_a_restart_or_a_reconnect(
    settings: Settings,
    worker_thread: Callable[..., WorkerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="rohrpost")
    news = ("pause state changed", "route paused", "route resumed")
    with OperatorSession(settings, "olaf") as session:
        pause(session, "acme", None)
        resume(session, "acme", None)
        handle = worker_thread(settings)  # started after both: it replays them
        wait_until(lambda: handle.worker.readiness() is None)
        replayed = [r for r in caplog.records if r.getMessage().startswith("pause state replayed")]
        assert [(r.levelno, getattr(r, "action", None)) for r in replayed] == [
            (logging.DEBUG, "pause"),
            (logging.DEBUG, "resume"),
        ]
        assert messages(caplog, *news) == []

        pause(session, "acme", None)  # given while it runs: news
        wait_until(lambda: len(messages(caplog, *news)) == 2)

        assert close_connections(f"rohrpost-worker:{settings.namespace}") == 1
        wait_until(
            lambda: handle.worker.readiness() is None and "reconnecting to broker" in caplog.text
        )
        resume(session, "acme", None)  # comes after the whole stream, read again
        wait_until(lambda: ("route resumed", "") in messages(caplog, *news), timeout=60)
    assert messages(caplog, *news) == [
        ("pause state changed", "pause"),
        ("route paused", ""),
        ("pause state changed", "resume"),
        ("route resumed", ""),
    ]
