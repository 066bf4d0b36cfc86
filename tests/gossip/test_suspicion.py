"""Lifeguard's dynamic suspicion timeout (memberlist suspicion.go)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.config import preset
from gossip.suspicion import Suspicion


def expected_timeout(n: int, k: int, minimum: float, maximum: float) -> float:
    """memberlist: max − (max−min)·ln(n+1)/ln(k+1), never below min."""
    if k < 1:
        return minimum
    return max(minimum, maximum - (maximum - minimum) * math.log(n + 1) / math.log(k + 1))


def test_starts_at_the_maximum() -> None:
    suspicion = Suspicion("a", started=100.0, minimum=4.0, maximum=24.0, k=3)
    assert suspicion.timeout == 24.0
    assert suspicion.deadline == 124.0
    assert suspicion.confirmations == 0


def test_shrinks_with_independent_confirmations_to_the_minimum() -> None:
    suspicion = Suspicion("a", started=0.0, minimum=4.0, maximum=24.0, k=3)
    timeouts = [suspicion.timeout]
    for accuser in ("b", "c", "d"):
        assert suspicion.confirm(accuser)
        timeouts.append(suspicion.timeout)
    assert timeouts == pytest.approx([expected_timeout(n, 3, 4.0, 24.0) for n in range(4)])
    assert timeouts == sorted(timeouts, reverse=True)
    assert timeouts[1] == pytest.approx(24.0 - 20.0 * math.log(2) / math.log(4))  # 14.0
    assert timeouts[-1] == 4.0
    # Enough confirmations: no more news, and it stays at the minimum.
    assert not suspicion.confirm("e")
    assert suspicion.timeout == 4.0
    assert suspicion.deadline == 4.0


def test_duplicate_accusers_do_not_count() -> None:
    suspicion = Suspicion("a", started=0.0, minimum=2.0, maximum=12.0, k=4)
    assert not suspicion.confirm("a"), "the original accuser confirmed itself"
    assert suspicion.confirm("b")
    assert not suspicion.confirm("b")
    assert suspicion.confirmations == 1
    assert suspicion.timeout == pytest.approx(expected_timeout(1, 4, 2.0, 12.0))


def test_k_zero_is_plain_swim() -> None:
    suspicion = Suspicion("a", started=10.0, minimum=3.0, maximum=18.0, k=0)
    assert suspicion.timeout == 3.0
    assert suspicion.deadline == 13.0
    assert not suspicion.confirm("b")
    assert suspicion.timeout == 3.0


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    minimum=st.floats(0.1, 100.0),
    factor=st.floats(1.0, 10.0),
    k=st.integers(0, 10),
    accusers=st.lists(st.sampled_from("abcdefghijklmnop"), max_size=30),
)
def test_timeout_matches_the_formula(
    minimum: float, factor: float, k: int, accusers: list[str]
) -> None:
    maximum = minimum * factor
    suspicion = Suspicion("first", started=0.0, minimum=minimum, maximum=maximum, k=k)
    distinct: set[str] = {"first"}
    previous = suspicion.timeout
    for accuser in accusers:
        counted = suspicion.confirm(accuser)
        assert counted == (accuser not in distinct and len(distinct) - 1 < k)
        if counted:
            distinct.add(accuser)
        timeout = suspicion.timeout
        assert minimum <= timeout <= max(minimum, maximum) + 1e-9
        assert timeout <= previous + 1e-9  # never grows
        previous = timeout
    n = suspicion.confirmations
    assert n == min(k, len(distinct) - 1)
    assert suspicion.timeout == pytest.approx(expected_timeout(n, k, minimum, maximum))


def test_config_timeouts_follow_memberlist() -> None:
    lan = preset("lan")
    # min = mult × max(1, log10 N) × probe_interval; max = 6 × min (reference §1).
    assert lan.suspicion_timeouts(10) == pytest.approx((4.0, 24.0))
    assert lan.suspicion_timeouts(100) == pytest.approx((8.0, 48.0))
    assert lan.suspicion_timeouts(1000) == pytest.approx((12.0, 72.0))
    assert lan.suspicion_timeouts(1) == pytest.approx((4.0, 24.0))
    swim = preset("swim")
    minimum, maximum = swim.suspicion_timeouts(100)
    assert minimum == maximum  # no Lifeguard: a fixed timeout
