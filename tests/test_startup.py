"""Start-up against a broker that is not ready, and restarts that back off."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest

from rohrpost.catcher import free_port
from rohrpost.consumer.history import HistoryConsumer
from rohrpost.consumer.supervisor import RestartBackoff
from rohrpost.shared.errors import BrokerError, BrokerUnavailable, TopologyConflict
from rohrpost.shared.settings import Settings
from rohrpost.shared.startup import START_DELAYS, start_with_retries
from tests.conftest import wait_until


class Flaky:
    """Fails with the given errors, one per call, then returns "started"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "started"


def test_start_up_is_retried_with_growing_waits_until_the_broker_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="rohrpost")
    slept: list[float] = []
    start = Flaky(
        BrokerUnavailable("connection refused"),
        BrokerError("declaring queue x: coordinator_unavailable"),
        BrokerUnavailable("connection refused"),
    )
    result = start_with_retries(start, stopping=lambda: False, what="worker", sleep=slept.append)
    assert (result, start.calls) == ("started", 4)
    retries = [r for r in caplog.records if r.getMessage() == "worker cannot start yet; retrying"]
    assert [r.retry_in_seconds for r in retries] == list(START_DELAYS[:3])
    assert [r.attempt for r in retries] == [1, 2, 3]
    assert sum(slept) == pytest.approx(sum(START_DELAYS[:3]))
    assert not any(r.exc_info for r in caplog.records), "no traceback per attempt"


def test_a_conflicting_topology_is_not_retried() -> None:
    start = Flaky(TopologyConflict("queue x exists with other arguments"))
    with pytest.raises(TopologyConflict):
        start_with_retries(start, stopping=lambda: False, what="worker", sleep=lambda _s: None)
    assert start.calls == 1


def test_a_stop_during_start_up_ends_the_retries() -> None:
    start = Flaky(*[BrokerUnavailable("refused")] * 100)
    stops = iter([False, False, True])
    result = start_with_retries(
        start, stopping=lambda: next(stops, True), what="worker", sleep=lambda _s: None
    )
    assert result is None
    assert start.calls == 1


def test_restarts_back_off_exponentially_up_to_the_cap() -> None:
    backoff = RestartBackoff(first=1, factor=2, cap=60, healthy_after=60)
    assert [backoff.delay(ran_for=0.5) for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_a_child_that_ran_healthy_restarts_as_if_for_the_first_time() -> None:
    backoff = RestartBackoff(first=1, factor=2, cap=60, healthy_after=60)
    assert [backoff.delay(ran_for=1) for _ in range(3)] == [1, 2, 4]
    assert backoff.delay(ran_for=3600) == 1
    assert backoff.delay(ran_for=2) == 2


def test_a_history_consumer_that_cannot_start_says_why_when_asked_if_ready(
    make_settings: Callable[..., Settings],
) -> None:
    nowhere = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"
    consumer = HistoryConsumer(make_settings(store_url=nowhere))
    thread = threading.Thread(target=consumer.run, name="test-history", daemon=True)
    thread.start()
    try:
        # the store is what is missing, not the broker (which answers)
        reason = wait_until(lambda: "history store" in (why := consumer.readiness() or "") and why)
        assert reason.startswith("cannot start yet: history store unavailable: ")
    finally:
        consumer.stop()
        thread.join(30)
    assert not thread.is_alive()
