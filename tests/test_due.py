"""The worker's timer for mails that arrive before they are due."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from rohrpost.consumer.due import DueHold
from rohrpost.shared.wire import DUE_HEADER, due_of


def test_held_items_are_released_in_due_order_none_before_it_is_due() -> None:
    released: list[tuple[str, float]] = []
    all_out = threading.Event()

    def release(item: str) -> None:
        released.append((item, time.time()))
        if len(released) == 4:
            all_out.set()

    hold: DueHold[str] = DueHold(release)
    hold.start()
    now = time.time()
    dues = {"c": now + 0.3, "a": now + 0.1, "d": now + 0.4, "b": now + 0.2}
    for item, due in dues.items():  # held out of order, the soonest not first
        assert hold.hold(item, due)
    assert all_out.wait(30), "not every held item was released"
    assert hold.close() == []
    assert [item for item, _ in released] == ["a", "b", "c", "d"]
    for item, at in released:
        assert at >= dues[item], f"{item} released {dues[item] - at:.3f}s early"


def test_an_item_due_before_everything_held_does_not_wait_for_them() -> None:
    released: list[str] = []
    first = threading.Event()
    hold: DueHold[str] = DueHold(lambda item: (released.append(item), first.set()))
    hold.start()
    hold.hold("late", time.time() + 3600)
    hold.hold("soon", time.time())
    assert first.wait(30), "the item due now waited behind one due in an hour"
    assert released == ["soon"]
    assert hold.close() == ["late"]


def test_closing_gives_back_what_is_not_due_soonest_first_and_takes_nothing_more() -> None:
    released: list[str] = []
    hold: DueHold[str] = DueHold(released.append)
    hold.start()
    now = time.time()
    for item, later in (("y", 600), ("x", 300), ("z", 900)):
        hold.hold(item, now + later)
    assert len(hold) == 3
    assert hold.close() == ["x", "y", "z"]
    assert not hold.hold("w", now), "held after it was closed"
    assert released == [] and len(hold) == 0


@pytest.mark.parametrize(
    ("headers", "due"),
    [
        ({DUE_HEADER: 1_800_000_000_500}, 1_800_000_000.5),
        (None, None),
        ({}, None),
        ({DUE_HEADER: "1800000000500"}, None),  # text, as a hostile publisher may send
        ({DUE_HEADER: True}, None),
        ({DUE_HEADER: 1.8e12}, None),  # a float is not a mark
        ({DUE_HEADER: 0}, None),
        ({DUE_HEADER: -5}, None),
        ({DUE_HEADER: 10**20}, None),  # past year 9999
        ("not a table", None),
    ],
)
def test_a_due_mark_is_read_only_when_it_is_a_sane_whole_number_of_milliseconds(
    headers: object, due: float | None
) -> None:
    assert due_of(SimpleNamespace(headers=headers)) == due
