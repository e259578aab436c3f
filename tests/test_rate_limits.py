"""Flow control (issue 15): rate limits per SMTP server and app, connection limits, throttling.

Unit tests of the pieces (rates as written, GCRA, AIMD, leases, the Lua twin of the
algorithm against a real Redis), then the acceptance tests against real workers,
a real SMTP server (the catcher, throttling above a rate) and a real Redis.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import pytest

from rohrpost.catcher import free_port
from rohrpost.consumer.smtp import classify, is_throttling
from rohrpost.shared.errors import ConfigError, ThrottledDeliveryError, TransientDeliveryError
from rohrpost.shared.gcra import BETA, BURST_MS, RECOVERY_SECONDS, Group, LocalRates, Params
from rohrpost.shared.leases import ConnectionLeases
from rohrpost.shared.rate import Rate, parse_rate
from rohrpost.shared.ratelimit import Limit, RateLimiter
from rohrpost.shared.settings import settings_from_mapping
from rohrpost.shared.state import SharedState

HORIZON_MS = 5000.0


# -- rates as written ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("20/s", 20),
        ("600/m", 10),
        ("1800/h", 0.5),
        ("86400/d", 1),
        ("2.5/s", 2.5),
        (" 7 / m ", 7 / 60),
    ],
)
def test_a_rate_is_a_count_per_second_minute_hour_or_day(text: str, per_second: float) -> None:
    assert parse_rate(text).per_second == pytest.approx(per_second)


def test_a_rate_is_written_back_as_it_was_given() -> None:
    assert str(parse_rate("20/s")) == "20/s"
    assert str(Rate(2.5, "m")) == "2.5/m"


@pytest.mark.parametrize(
    ("where", "value", "said"),
    [
        ("smtp.relay.max_rate", "20/x", "is not a rate"),
        ("smtp.relay.max_rate", "0/s", "must be more than 0"),
        ("smtp.relay.max_rate", 20, "is not a rate"),
        ("smtp.relay.max_connections", 0, "greater than or equal to 1"),
        ("tenants.acme.apps.billing.max_rate", "fast", "is not a rate"),
    ],
)
def test_a_bad_limit_is_an_error_that_names_the_field(where: str, value: object, said: str) -> None:
    config: dict[str, object] = {
        "smtp": {"relay": {"host": "relay.example"}},
        "tenants": {"acme": {"apps": {"billing": {"smtp": "relay", "sender": "a@acme.example"}}}},
    }
    *path, key = where.split(".")
    node = config
    for part in path:
        node = node[part]  # type: ignore[assignment]
    node[key] = value  # type: ignore[index]
    with pytest.raises(ConfigError) as raised:
        settings_from_mapping(config)
    assert f"{where}: " in str(raised.value) and said in str(raised.value)


# -- GCRA ------------------------------------------------------------------------------------


def waits(
    rates: LocalRates, params: list[Params], groups: list[Group], now: float
) -> list[list[float]]:
    decided = rates.decide(params, groups, now, HORIZON_MS)
    return [[s.wait_ms if s.reserved else -s.wait_ms for s in slots] for slots in decided.slots]


def test_a_burst_is_bounded_then_mails_are_spaced_by_the_rate() -> None:
    [turns] = waits(LocalRates(), [Params("smtp:x", 20)], [Group((0,), 10)], 1000.0)
    at_once = 1 + int(BURST_MS / 50)
    assert turns[:at_once] == [0.0] * at_once
    assert turns[at_once:] == [pytest.approx(50.0 * k) for k in range(1, 10 - at_once + 1)]


def test_a_turn_beyond_the_horizon_is_deferred_each_to_a_turn_of_its_own() -> None:
    [turns] = waits(LocalRates(), [Params("app:a:b", 1)], [Group((0,), 10)], 0.0)
    reserved = [t for t in turns if t >= 0]
    deferred = [-t for t in turns if t < 0]
    # 1/s with a burst of 250 ms: each turn 250 ms before its slot
    assert reserved == [0.0, 750.0, 1750.0, 2750.0, 3750.0, 4750.0]
    assert deferred == [5750.0, 6750.0, 7750.0, 8750.0]


def test_new_mails_queue_behind_deferred_ones_and_returning_ones_do_not() -> None:
    rates, params = LocalRates(), [Params("app:a:b", 1)]
    waits(rates, params, [Group((0,), 10)], 0.0)  # reserved up to 4.75 s, deferred to 8.75 s
    [new] = waits(rates, params, [Group((0,), 1)], 3000.0)
    [back] = waits(rates, params, [Group((0,), 1, returning=True)], 3000.0)
    assert new == [-(9750.0 - 3000.0)]  # deferred, behind the deferred ones
    assert back == [5750.0 - 3000.0]  # reserved: the next free turn


def test_a_mail_passes_every_limit_that_applies() -> None:
    params = [Params("smtp:x", 20), Params("app:a:b", 5)]
    [both] = waits(LocalRates(), params, [Group((0, 1), 4)], 0.0)
    assert both == [0.0, 0.0, 150.0, 350.0]  # the app's 5/s binds (200 ms, burst 250 ms)
    [server_only] = waits(LocalRates(), params, [Group((0,), 4)], 0.0)
    assert server_only == [0.0, 0.0, 0.0, 0.0]


def test_over_any_minute_the_rate_is_kept_within_ten_percent() -> None:
    rates, params = LocalRates(), [Params("smtp:x", 20)]
    sent: list[float] = []
    now = 0.0
    while now < 180_000:  # three minutes of a backlog arriving in batches of 30
        decided = rates.decide(params, [Group((0,), 30, returning=True)], now, HORIZON_MS)
        sent += [now + s.wait_ms for s in decided.slots[0] if s.reserved]
        now = max(sent[-1] - 1000, now + 100) if sent else now + 100
    for start in range(0, 120_000, 7_000):
        in_minute = sum(1 for t in sent if start <= t < start + 60_000)
        assert 1080 <= in_minute <= 1320


# -- AIMD ------------------------------------------------------------------------------------


def test_a_throttling_reply_cuts_the_rate_once_per_round_and_it_recovers_linearly() -> None:
    rates, server = LocalRates(), Params("smtp:x", 20, adaptive=True)
    cut = rates.throttled(server, made_at_ms=500.0, seed=0.0, now_ms=1000.0)
    assert cut == pytest.approx(20 * BETA)
    # a reply to a mail reserved before the cut: that round was answered already
    assert rates.throttled(server, made_at_ms=900.0, seed=0.0, now_ms=1100.0) == pytest.approx(
        cut, rel=0.01
    )
    half = 1000.0 + RECOVERY_SECONDS * 500
    decided = rates.decide([server], [], half, HORIZON_MS)
    assert decided.rates[0] == pytest.approx((cut + 20) / 2)
    later = rates.decide([server], [], 1000.0 + RECOVERY_SECONDS * 3000, HORIZON_MS)
    assert later.rates[0] == pytest.approx(20)  # never above the configured rate
    again = rates.throttled(server, made_at_ms=1001.0, seed=0.0, now_ms=half)
    assert again == pytest.approx((cut + 20) / 2 * BETA)


def test_a_server_without_a_rate_starts_from_what_it_accepted_and_probes_up_to_twice() -> None:
    rates, server = LocalRates(), Params("smtp:x", 0, adaptive=True)
    assert rates.decide([server], [], 0.0, HORIZON_MS).rates == (0.0,)  # no limit yet
    cut = rates.throttled(server, made_at_ms=0.0, seed=12.0, now_ms=0.0)
    assert cut == pytest.approx(12 * BETA)
    much_later = rates.decide([server], [], 500_000.0, HORIZON_MS)
    assert much_later.rates[0] == pytest.approx(24)


# -- the Lua twin in Redis -------------------------------------------------------------------


@pytest.fixture
def state(redis_url: str) -> Iterator[SharedState]:
    shared = SharedState(redis_url)
    yield shared
    shared.close()


@pytest.fixture
def limit_namespace(state: SharedState) -> Iterator[str]:
    namespace = f"t{uuid.uuid4().hex[:12]}"
    yield namespace
    state.forget_namespace(namespace)


def test_redis_decides_as_the_python_algorithm_does(
    state: SharedState, limit_namespace: str
) -> None:
    limits = [
        Limit("smtp:x", parse_rate("20/s"), adaptive=True),
        Limit("app:a:b", parse_rate("5/s")),
        Limit("smtp:y", None, adaptive=True),
    ]
    groups = [Group((0,), 10), Group((0, 1), 5), Group((1,), 30, returning=True), Group((2,), 3)]
    limiter = RateLimiter(state, limit_namespace, lambda _: 1, horizon=HORIZON_MS / 1000)
    in_redis = limiter.reserve(limits, groups)
    params = [Params(lim.name, lim.per_second, lim.adaptive) for lim in limits]
    in_python = LocalRates().decide(params, groups, 0.0, HORIZON_MS)
    assert limiter.is_global
    assert in_redis.rates == in_python.rates
    assert in_redis.slots == in_python.slots


def test_a_cut_in_redis_applies_to_every_process(state: SharedState, limit_namespace: str) -> None:
    server = Limit("smtp:x", parse_rate("20/s"), adaptive=True)
    one = RateLimiter(state, limit_namespace, lambda _: 1)
    other = RateLimiter(state, limit_namespace, lambda _: 1)
    made = one.reserve([server], [Group((0,), 1)]).now_ms
    assert one.throttled(server, made, seed=0.0) == pytest.approx(20 * BETA)
    assert other.reserve([server], [Group((0,), 1)]).rates[0] == pytest.approx(20 * BETA, rel=0.01)
    assert other.adapting([server]) == [True]


def test_without_redis_each_process_keeps_to_its_share_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="rohrpost")
    unreachable = SharedState(f"redis://127.0.0.1:{free_port()}/0")
    limiter = RateLimiter(unreachable, "tnowhere", lambda _: 4, horizon=5.0)
    server = Limit("smtp:x", parse_rate("20/s"), adaptive=True)
    first = limiter.reserve([server], [Group((0,), 3)])
    limiter.reserve([server], [Group((0,), 3)])
    assert first.rates == (5.0,)  # 20/s shared by four consumers
    assert not limiter.is_global
    said = [r for r in caplog.records if "keeps to its share" in r.getMessage()]
    assert len(said) == 1
    unreachable.close()


# -- throttling replies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "text", "throttling"),
    [
        (421, "4.7.0 rate limit exceeded", True),
        (454, "Throttling failure: Maximum sending rate exceeded.", True),
        (451, "4.7.1 Please slow down", True),
        (421, "4.7.28 Our system has detected an unusual rate of mail", True),
        (421, "4.3.2 busy, try again later", False),
        (451, "4.3.0 local error", False),
        (450, "4.7.1 rate limited", False),  # 450 is not one of the codes
        (550, "5.7.1 rate limit", False),
    ],
)
def test_throttling_replies_are_told_from_other_failures(
    code: int, text: str, throttling: bool
) -> None:
    assert is_throttling(code, text) is throttling
    error = classify(code, text, "RCPT TO")
    assert isinstance(error, ThrottledDeliveryError) is throttling
    assert isinstance(error, TransientDeliveryError) is (code < 500)


# -- connection leases -----------------------------------------------------------------------


def test_connection_permits_are_limited_and_come_back_when_a_lease_runs_out(
    state: SharedState, limit_namespace: str
) -> None:
    leases = ConnectionLeases(state, limit_namespace, lambda _: 1, ttl=0.5)
    held = [leases.acquire("relay", 2), leases.acquire("relay", 2)]
    assert all(lease is not None and lease.shared for lease in held)
    assert leases.acquire("relay", 2) is None
    other = ConnectionLeases(state, limit_namespace, lambda _: 1, ttl=0.5)
    renewal = other.renew([])
    assert renewal.lost == []
    first = held[0]
    assert first is not None
    leases.release(first)
    assert other.acquire("relay", 2) is not None  # a permit given back
    deadline_passed = leases.renew([h for h in held[1:] if h is not None])
    assert deadline_passed.lost == [] and "relay" in deadline_passed.wanted
    time.sleep(0.7)  # the lease of a process that died runs out
    assert leases.acquire("relay", 2) is not None


def test_without_redis_each_process_takes_its_share_of_the_permits_at_least_one() -> None:
    unreachable = SharedState(f"redis://127.0.0.1:{free_port()}/0")
    leases = ConnectionLeases(unreachable, "tnowhere", lambda _: 2)
    taken = [leases.acquire("relay", 5) for _ in range(3)]
    assert [lease is not None for lease in taken] == [True, True, False]  # 5 // 2
    alone = ConnectionLeases(unreachable, "tnowhere", lambda _: 3)
    assert alone.acquire("small", 1) is not None and alone.acquire("small", 1) is None
    unreachable.close()
