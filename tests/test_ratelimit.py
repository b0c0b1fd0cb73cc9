"""The token bucket behind per-link rate limits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rhizome_proto._ratelimit import TokenBucket


def test_bucket() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)
    with pytest.raises(ValueError):
        TokenBucket(10, burst=0.5)
    b = TokenBucket(10, burst=20)
    assert b.spend(20, 0) == 0  # a full burst
    assert b.spend(5, 0) == 0.5  # 5 beyond: half a second to pay back
    assert b.delay(0.25) == 0.25
    assert b.delay(0.5) == 0
    assert b.spend(1, 0.4) == pytest.approx(0.1)  # time going backwards refills nothing
    assert b.delay(10) == 0 and b.spend(20, 10) == 0  # refilled to the burst, not beyond
    assert b.spend(1, 10) == pytest.approx(0.1)


@given(st.lists(st.tuples(st.floats(0, 2), st.integers(0, 50)), max_size=60))
def test_obeying_the_delay_keeps_the_average_within_the_rate(
    arrivals: list[tuple[float, int]],
) -> None:
    """A peer that waits out every delay never brings more than burst + rate * elapsed."""
    rate, burst = 10.0, 20.0
    b = TokenBucket(rate, burst)
    now, total = 0.0, 0
    for gap, units in arrivals:
        now += gap
        total += units
        now += b.spend(units, now)  # the adapter stops reading this long
        assert total <= burst + rate * now + 1e-6
