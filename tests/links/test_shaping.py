"""bridged.links.shaping's token bucket (net_bandwidth), with the clock passed in.

The Shaper itself runs inside a link worker: tests/integration/test_faults_net.py
drives it through a daemon (latency, bandwidth, loss, reorder, reset).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridged.links.shaping import Bucket


def test_a_bucket_starts_empty_and_fills_at_its_rate():
    """No bytes at first; 15 ms at 100 kB/s allow 1500 bytes."""
    bucket = Bucket(100_000, now=0.0)
    assert bucket.allowance(0.0) == 0
    assert bucket.allowance(0.015) == pytest.approx(1500, abs=1)


def test_it_wakes_up_for_half_a_burst_not_for_every_byte():
    """Until half of its 20 ms burst has gathered the allowance stays 0."""
    bucket = Bucket(100_000, now=0.0)  # burst 2000 bytes, step 1000
    assert bucket.allowance(0.009) == 0
    assert bucket.allowance(0.0101) >= 1000


def test_an_idle_bucket_holds_one_burst_at_most():
    """Ten idle seconds allow one burst (20 ms worth), not ten seconds' worth."""
    bucket = Bucket(50_000, now=0.0)
    assert bucket.allowance(10.0) == 1000


def test_spending_and_the_wait_for_the_next_step():
    """Spent tokens are gone; wait() is the time the next step takes at the rate."""
    bucket = Bucket(100_000, now=0.0)
    got = bucket.allowance(1.0)
    bucket.spend(got)
    assert bucket.allowance(1.0) == 0
    assert bucket.wait() == pytest.approx(0.01)
    assert bucket.allowance(1.0 + bucket.wait() * 1.001) >= 1000


@settings(max_examples=50, deadline=None)
@given(rate=st.integers(1, 10_000_000), steps=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=50))
def test_over_any_time_no_more_than_rate_times_time_plus_a_burst_moves(rate, steps):
    """Whatever the wake-ups, bytes moved <= rate * elapsed + one burst (the cap holds)."""
    bucket = Bucket(rate, now=0.0)
    now = moved = 0.0
    for step in steps:
        now += step
        n = bucket.allowance(now)
        bucket.spend(n)
        moved += n
    assert moved <= rate * now + max(1.0, rate * 0.02)
