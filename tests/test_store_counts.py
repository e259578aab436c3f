"""The outcome counts' 5-minute steps, computed in whole steps since 1970 (no database)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from rohrpost.shared.store.counts import COUNTED, STEP, step_of, tally

_OFFSETS = st.integers(-1439, 1439).map(lambda minutes: timezone(timedelta(minutes=minutes)))
_MOMENTS = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30), timezones=_OFFSETS
)


def calendar_step(at: datetime) -> datetime:
    """The step as the calendar says: UTC, minutes down to a multiple of 5."""
    at = at.astimezone(UTC)
    return at.replace(minute=at.minute - at.minute % 5, second=0, microsecond=0)


@given(_MOMENTS)
def test_a_step_is_the_utc_five_minutes_a_moment_falls_in_whatever_its_offset(
    at: datetime,
) -> None:
    step = step_of(at)
    assert step == calendar_step(at)
    assert step.utcoffset() == timedelta(0)
    assert step <= at < step + STEP


@given(st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30)))
def test_a_naive_moment_is_read_as_local_time_as_before(at: datetime) -> None:
    assert step_of(at) == calendar_step(at)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["acme", "bolt"]),
            st.sampled_from(["shop", "billing", None]),
            st.sampled_from([*sorted(COUNTED), "submitted", "edited"]),
            _MOMENTS,
        ),
        max_size=40,
    )
)
def test_a_tally_counts_each_counted_outcome_in_its_step(
    outcomes: list[tuple[str, str | None, str, datetime]],
) -> None:
    expected = Counter(
        (tenant, app, kind, calendar_step(at))
        for tenant, app, kind, at in outcomes
        if app is not None and kind in COUNTED
    )
    assert tally(outcomes) == expected
