"""Delay levels: routing keys, the declared bindings, and a real 30-day delay."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rohrpost.producer.client import Producer
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.delay import RELEASE_LEAD_SECONDS, DelayLevels
from rohrpost.shared.settings import Settings
from rohrpost.shared.topology import Topology, queue_depths
from rohrpost.shared.wire import DUE_HEADER
from tests.conftest import declare

NAMES = st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,10}\Z")


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more."""

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and p[0] in ("*", k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split("."))


def matches(topology: Topology, exchange: str, pattern: str, key: str) -> bool:
    """Whether ``exchange`` (by its declared type) routes ``key`` along a binding ``pattern``."""
    kind = dict(topology.exchanges())[exchange]
    return pattern == key if kind == "direct" else topic_matches(pattern, key)


def route(topology: Topology, exchange: str, key: str) -> tuple[list[str], str]:
    """Follow the declared bindings and dead-letter settings from ``exchange``.

    Returns the delay queues visited, in order, and the queue the message ends in.
    """
    dead_letter_to = {q.name: q.arguments.get("x-dead-letter-exchange") for q in topology.queues()}
    delay_queues = set(topology.delay_queues())
    visited = []
    for _ in range(10 * topology.delay.count + 10):
        targets = [
            b
            for b in topology.bindings()
            if b.source == exchange
            and matches(topology, exchange, b.pattern, key)
            and b.destination != topology.history_queue  # the history copy; see below
        ]
        assert len(targets) == 1, f"{key} on {exchange} routes to {targets}"
        target = targets[0]
        if target.destination not in delay_queues:
            return visited, target.destination
        visited.append(target.destination)
        exchange = dead_letter_to[target.destination]
    raise AssertionError("routing loop")


def ttl_seconds(topology: Topology, queues: list[str]) -> int:
    ttl = {q.name: q.arguments.get("x-message-ttl", 0) for q in topology.queues()}
    return sum(ttl[q] for q in queues) // 1000


def topology_for(levels: int, tenant: str = "acme", app: str = "billing") -> Topology:
    return Topology("ns", ((tenant, app),), DelayLevels("ns", levels))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), levels=st.integers(min_value=1, max_value=10), tenant=NAMES, app=NAMES)
def test_every_delay_waits_exactly_its_seconds_then_reaches_its_send_queue(
    data: st.DataObject, levels: int, tenant: str, app: str
) -> None:
    topology = topology_for(levels, tenant, app)
    seconds = data.draw(st.integers(min_value=0, max_value=topology.delay.max_seconds))
    key = topology.delay.routing_key(seconds, tenant, app)
    entry = topology.schedule_exchange if seconds else topology.submit_exchange
    if not seconds:
        key = topology.route_key(tenant, app)
    visited, final = route(topology, entry, key)
    assert final == topology.send_queue(tenant, app)
    assert ttl_seconds(topology, visited) == seconds
    # One queue per nonzero octal digit, highest level first.
    assert len(visited) == sum(1 for digit in oct(seconds)[2:] if digit != "0")
    levels = [int(q.split(".")[2]) for q in visited]
    assert levels == sorted(levels, reverse=True) and len(set(levels)) == len(levels)


def test_every_delay_of_four_levels_routes_correctly() -> None:
    topology = topology_for(4)
    for seconds in range(1, 8**4):
        key = topology.delay.routing_key(seconds, "acme", "billing")
        visited, final = route(topology, topology.schedule_exchange, key)
        assert final == "ns.send.acme.billing"
        assert ttl_seconds(topology, visited) == seconds


def test_a_due_mail_goes_straight_to_its_send_queue() -> None:
    topology = topology_for(8)
    assert route(topology, topology.submit_exchange, "acme.billing") == ([], "ns.send.acme.billing")


@pytest.mark.parametrize("seconds", [0, 1, 77, 255])
def test_a_submitted_mail_also_reaches_the_history_queue_once(seconds: int) -> None:
    topology = topology_for(8)
    key = topology.delay.routing_key(seconds, "acme", "billing") if seconds else "acme.billing"
    entry = topology.schedule_exchange if seconds else topology.submit_exchange
    to_history = [
        b
        for b in topology.bindings()
        if b.source == entry
        and b.destination == topology.history_queue
        and matches(topology, entry, b.pattern, key)
    ]
    assert len(to_history) == 1
    if seconds:
        return
    # A due mail for a route nobody declared stays unroutable (its submit fails). A
    # delayed one waits in the delay levels and is held there at the end (README).
    stray = key.replace("acme.billing", "globex.billing")
    assert not [
        b
        for b in topology.bindings()
        if b.source == entry and matches(topology, entry, b.pattern, stray)
    ]


def test_a_dead_letter_from_the_broker_reaches_its_dead_letter_queue() -> None:
    topology = topology_for(8)
    [send] = [q for q in topology.queues() if q.name == "ns.send.acme.billing"]
    exchange = send.arguments["x-dead-letter-exchange"]
    key = send.arguments["x-dead-letter-routing-key"]
    assert [
        b.destination
        for b in topology.bindings()
        if b.source == exchange and matches(topology, exchange, b.pattern, key)
    ] == ["ns.dead.acme.billing"]


def test_delays_round_up_to_whole_seconds_and_cap_at_one_pass() -> None:
    levels = DelayLevels("ns", 2)
    assert levels.seconds(timedelta(seconds=2.01)) == 3
    assert levels.seconds(timedelta(seconds=-5)) == 0
    assert levels.seconds(timedelta(days=1)) == 63
    assert levels.routing_key(17, "acme", "billing") == "2.1.acme.billing"
    with pytest.raises(ValueError, match="outside"):
        levels.routing_key(64, "acme", "billing")


def test_a_scheduled_mail_leaves_the_lead_early_rounded_down_and_capped_at_one_pass() -> None:
    levels = DelayLevels("ns", 2)
    lead = RELEASE_LEAD_SECONDS
    assert levels.release_seconds(timedelta(seconds=lead + 2.99)) == 2
    assert levels.release_seconds(timedelta(seconds=lead + 3)) == 3
    assert levels.release_seconds(lead + 0.4) == 0
    assert levels.release_seconds(lead - 1) == 0  # due within the lead: straight to its queue
    assert levels.release_seconds(timedelta(seconds=-5)) == 0
    assert levels.release_seconds(timedelta(days=1)) == 63


def test_just_enough_levels_cover_the_maximum_delay() -> None:
    assert DelayLevels.covering("ns", 63).count == 2
    assert DelayLevels.covering("ns", 64).count == 3
    assert DelayLevels.covering("ns", 90 * 86400).count == 8


def test_the_default_maximum_delay_is_at_least_sixty_days() -> None:
    assert DelayLevels("ns", Settings().delay_levels).max_seconds >= 60 * 86400


def test_a_mail_delayed_30_days_waits_first_in_level_7(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(max_delay="90d")
    topology = declare(settings)
    assert topology.delay.count == 8
    not_before = datetime.now(UTC) + timedelta(days=30)
    with Producer(settings) as producer:
        producer.submit(
            {
                "tenant": "acme",
                "app": "billing",
                "to": ["a@example.com"],
                "subject": "later",
                "text": "in 30 days",
                "not_before": not_before.isoformat(),
            }
        )
    # 30 days = 2,592,000 s = 0o11706400: the highest digit is 1 at level 7 (8**7 s).
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        depths = queue_depths(
            channel, [*topology.delay_queues(), topology.send_queue("acme", "billing")]
        )
    assert {name: n for name, n in depths.items() if n} == {f"{settings.namespace}.delay.7.1": 1}


@pytest.mark.parametrize(
    ("ahead", "key_delay"), [(30.4, 25), (RELEASE_LEAD_SECONDS + 0.9, 0), (1, 0)]
)
def test_a_scheduled_mail_is_marked_with_when_it_is_due_and_leaves_the_lead_early(
    make_settings: Callable[..., Settings], ahead: float, key_delay: int
) -> None:
    config = make_settings()
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    due = now + timedelta(seconds=ahead, microseconds=123)
    topology = Topology.from_settings(config)
    with Producer(config, clock=lambda: now) as producer:
        _, scheduled = producer.prepare(
            {
                "tenant": "acme",
                "app": "billing",
                "to": ["a@example.com"],
                "subject": "s",
                "text": "t",
                "not_before": due.isoformat(),
            }
        )
        _, due_now = producer.prepare(
            {
                "tenant": "acme",
                "app": "billing",
                "to": ["a@example.com"],
                "subject": "s",
                "text": "t",
            }
        )
    # rounded up to the millisecond: a worker never holds it short of its not_before
    assert scheduled.properties.headers[DUE_HEADER] == math.ceil(due.timestamp() * 1000)
    assert due_now.properties.headers is None
    if key_delay:
        assert scheduled.routing_key == topology.delayed_key(key_delay, "acme", "billing")
    else:  # due within the lead: straight into its send queue, the worker holds it
        assert scheduled.routing_key == topology.route_key("acme", "billing")
