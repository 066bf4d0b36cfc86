"""The load balancers of ``proxy.balancer``: proportions, smoothness, load awareness,
consistent hashing, and the exclude set, with seeded RNGs (a seed is in every name or
message, so a failure can be replayed)."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.balancer import (
    DEFAULT_MINIMUM_RING_SIZE,
    MAX_ROUND_ROBIN_CYCLE,
    POLICIES,
    Balancer,
    LeastRequestBalancer,
    RandomBalancer,
    RingHashBalancer,
    RoundRobinBalancer,
    build_balancer,
    smooth_cycle,
    stable_hash,
)
from proxy.errors import LocalProtocolError

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True)
PICKS = 10_000


def cluster(*weights: int) -> list[tuple[str, int]]:
    return [(f"10.0.0.{i + 1}:8080", weight) for i, weight in enumerate(weights)]


def shares(counts: Counter[str | None], total: int) -> dict[str | None, float]:
    return {key: count / total for key, count in counts.items()}


# --------------------------------------------------------------------------- all policies


@pytest.mark.parametrize("policy", POLICIES)
def test_an_empty_cluster_has_no_pick(policy: str) -> None:
    balancer: Balancer[str] = build_balancer(policy, [], random.Random(1), active={})
    assert balancer.pick() is None
    assert balancer.pick(frozenset({"x"}), hash_key=5) is None


@pytest.mark.parametrize("policy", POLICIES)
def test_excluding_everything_gives_none(policy: str) -> None:
    endpoints = cluster(3, 1, 2)
    balancer = build_balancer(policy, endpoints, random.Random(2), active={})
    everything = frozenset(key for key, _ in endpoints) | {"stranger"}
    for _ in range(50):
        assert balancer.pick(everything, hash_key=stable_hash("k")) is None
    # ... and the balancer still works afterwards.
    assert balancer.pick() in {key for key, _ in endpoints}


@pytest.mark.parametrize("policy", POLICIES)
def test_an_exclude_set_larger_than_the_cluster_need_not_cover_it(policy: str) -> None:
    endpoints = cluster(1, 1, 1)
    balancer = build_balancer(policy, endpoints, random.Random(3), active={})
    exclude = frozenset({"10.0.0.1:8080", "a", "b", "c", "d"})
    picks = {balancer.pick(exclude, hash_key=h) for h in range(0, 1 << 64, 1 << 58)}
    assert picks <= {"10.0.0.2:8080", "10.0.0.3:8080"}
    assert None not in picks


@PROPERTY
@given(
    weights=st.lists(st.integers(1, 20), min_size=1, max_size=8),
    excluded=st.sets(st.integers(0, 7)),
    seed=st.integers(0, 2**32),
    policy=st.sampled_from(POLICIES),
)
def test_picks_honour_exclude_and_fail_cleanly(
    weights: list[int], excluded: set[int], seed: int, policy: str
) -> None:
    endpoints = cluster(*weights)
    keys = [key for key, _ in endpoints]
    exclude = frozenset(keys[i] for i in excluded if i < len(keys))
    rng = random.Random(seed)
    active = {key: rng.randrange(5) for key in keys}
    balancer = build_balancer(policy, endpoints, random.Random(seed), active=active)
    for _ in range(30):
        picked = balancer.pick(exclude, hash_key=rng.getrandbits(64))
        if len(exclude) == len(keys):
            assert picked is None
        else:
            assert picked in keys and picked not in exclude


@pytest.mark.parametrize(
    ("endpoints", "complaint"),
    [
        ([("a", 1), ("a", 2)], "twice"),
        ([("a", 0)], "weight"),
        ([("a", -3)], "weight"),
        ([("a", True)], "weight"),
        ([("a", 1.5)], "weight"),
    ],
)
def test_bad_endpoint_lists_are_refused(endpoints: list[tuple[str, int]], complaint: str) -> None:
    for policy in POLICIES:
        with pytest.raises(LocalProtocolError, match=complaint):
            build_balancer(policy, endpoints, random.Random(1), active={})


def test_unknown_policy_and_missing_active_map_are_refused() -> None:
    with pytest.raises(LocalProtocolError, match="maglev"):
        build_balancer("maglev", cluster(1), random.Random(1))
    with pytest.raises(LocalProtocolError, match="active"):
        build_balancer("least_request", cluster(1), random.Random(1))


@pytest.mark.parametrize("policy", POLICIES)
def test_endpoints_keep_their_order_and_any_hashable_key_works(policy: str) -> None:
    endpoints: list[tuple[Hashable, int]] = [(("10.0.0.9", 80), 1), (("10.0.0.2", 81), 2)]
    balancer = build_balancer(policy, endpoints, random.Random(4), active={})
    assert balancer.endpoints == (("10.0.0.9", 80), ("10.0.0.2", 81))
    assert balancer.pick() in balancer.endpoints
    assert balancer.pick(frozenset({("10.0.0.9", 80)})) == ("10.0.0.2", 81)


# ---------------------------------------------------------------------------- round robin


def test_round_robin_is_nginx_smooth_weighted_round_robin() -> None:
    # nginx's own example (ngx_http_upstream_round_robin.c): weights 5, 1, 1 give
    # a a b a c a a, not a a a a a b c.
    assert smooth_cycle([5, 1, 1]) == [0, 0, 1, 0, 2, 0, 0]
    assert smooth_cycle([1, 1, 1]) == [0, 1, 2]
    assert smooth_cycle([4, 2]) == [0, 1, 0]  # reduced by the gcd
    balancer = RoundRobinBalancer(cluster(5, 1, 1))  # no rng: starts at slot 0
    names = {"10.0.0.1:8080": "a", "10.0.0.2:8080": "b", "10.0.0.3:8080": "c"}
    assert "".join(names[str(balancer.pick())] for _ in range(14)) == "aabacaa" * 2


@PROPERTY
@given(weights=st.lists(st.integers(1, 50), min_size=1, max_size=10), seed=st.integers(0, 999))
def test_round_robin_is_exactly_proportional_over_every_full_cycle(
    weights: list[int], seed: int
) -> None:
    balancer = RoundRobinBalancer(cluster(*weights), random.Random(seed))
    divisor = math.gcd(*weights)
    length = sum(weights) // divisor
    assert len(balancer.cycle) == length
    for _ in range(3):  # any window of one cycle length, wherever it starts
        counts = Counter(balancer.pick() for _ in range(length))
        assert counts == {key: weight // divisor for key, weight in cluster(*weights)}


@PROPERTY
@given(weights=st.lists(st.integers(1, 30), min_size=2, max_size=10))
def test_round_robin_keeps_every_endpoint_within_one_pick_of_its_share(
    weights: list[int],
) -> None:
    cycle = smooth_cycle(weights)
    total = len(cycle)
    reduced = [w // math.gcd(*weights) for w in weights]
    counts = [0] * len(weights)
    for step, index in enumerate(cycle, 1):
        counts[index] += 1
        for i, weight in enumerate(reduced):
            assert abs(counts[i] - step * weight / total) <= 1.0


def test_round_robin_large_clusters_use_the_deadline_order_exactly_too() -> None:
    # 600 endpoints x ~1200 slots is past nginx's budget: the EDF order is used.
    weights = [1 + i % 3 for i in range(600)]
    cycle = smooth_cycle(weights)
    assert Counter(cycle) == dict(enumerate(weights))
    # Spread, not bunched: the weight-3 endpoint 2 is never picked twice in a row.
    slots = [slot for slot, index in enumerate(cycle) if index == 2]
    assert min(b - a for a, b in itertools.pairwise(slots)) > 1


def test_round_robin_scales_down_huge_weights() -> None:
    weights = [65_535, 40_000, 1, 7]
    cycle = smooth_cycle(weights)
    assert len(cycle) <= MAX_ROUND_ROBIN_CYCLE + len(weights)
    counts = Counter(cycle)
    assert set(counts) == {0, 1, 2, 3}
    assert counts[0] / counts[1] == pytest.approx(65_535 / 40_000, rel=1e-3)


def test_round_robin_starts_at_a_random_slot() -> None:
    firsts = {
        RoundRobinBalancer(cluster(*[1] * 10), random.Random(seed)).pick() for seed in range(20)
    }
    assert len(firsts) > 3


def test_round_robin_skips_excluded_slots_and_keeps_the_others_proportions() -> None:
    balancer = RoundRobinBalancer(cluster(4, 3, 2, 1))
    keys = balancer.endpoints
    exclude = frozenset({keys[1]})
    cycles = 50
    counts = Counter(balancer.pick(exclude) for _ in range(cycles * (10 - 3)))
    assert keys[1] not in counts
    for key, weight in ((keys[0], 4), (keys[2], 2), (keys[3], 1)):
        assert abs(counts[key] - cycles * weight) <= 1, counts


def test_round_robin_walks_over_a_long_run_of_an_excluded_endpoint() -> None:
    balancer = RoundRobinBalancer(cluster(1000, 1))
    heavy, light = balancer.endpoints
    assert [balancer.pick(frozenset({heavy})) for _ in range(5)] == [light] * 5


# --------------------------------------------------------------------------------- random


@pytest.mark.parametrize("seed", [1, 2, 3, 20250301])
def test_random_80_20_within_two_percent_over_10000_picks(seed: int) -> None:
    balancer = RandomBalancer(cluster(80, 20), random.Random(seed))
    counts = Counter(balancer.pick() for _ in range(PICKS))
    assert shares(counts, PICKS)["10.0.0.1:8080"] == pytest.approx(0.80, abs=0.02), seed


@pytest.mark.parametrize("seed", [4, 5])
def test_random_equal_weights_is_uniform(seed: int) -> None:
    balancer = RandomBalancer(cluster(1, 1, 1, 1), random.Random(seed))
    counts = Counter(balancer.pick() for _ in range(PICKS))
    for share in shares(counts, PICKS).values():
        assert share == pytest.approx(0.25, abs=0.02), seed


@pytest.mark.parametrize("seed", [6, 7])
def test_random_with_exclusions_keeps_the_proportions_of_the_rest(seed: int) -> None:
    # The heavy endpoints are excluded: the rejection draws mostly fail and the exact
    # fallback runs; shares among the rest must still follow their weights (3:1).
    balancer = RandomBalancer(cluster(500, 500, 3, 1), random.Random(seed))
    keys = balancer.endpoints
    counts = Counter(balancer.pick(frozenset(keys[:2])) for _ in range(PICKS))
    assert set(counts) == {keys[2], keys[3]}
    assert shares(counts, PICKS)[keys[2]] == pytest.approx(0.75, abs=0.02), seed


# -------------------------------------------------------------------------- least request


@pytest.mark.parametrize("seed", [8, 9])
def test_two_choices_spread_evenly_when_loads_are_equal(seed: int) -> None:
    balancer = LeastRequestBalancer(cluster(1, 1, 1, 1), random.Random(seed), {})
    assert not balancer.weighted
    counts = Counter(balancer.pick() for _ in range(PICKS))
    for share in shares(counts, PICKS).values():
        assert share == pytest.approx(0.25, abs=0.02), seed


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_two_choices_prefer_the_less_loaded(seed: int) -> None:
    # Loads 0 < 1 < 2 < 3: with two uniform draws (with replacement) the least loaded
    # of the pair wins, so P(i) = ((4 - i)² - (3 - i)²) / 16 = 7/16, 5/16, 3/16, 1/16.
    keys = [key for key, _ in cluster(1, 1, 1, 1)]
    active = {key: load for load, key in enumerate(keys)}
    balancer = LeastRequestBalancer(cluster(1, 1, 1, 1), random.Random(seed), active)
    counts = Counter(balancer.pick() for _ in range(PICKS))
    got = shares(counts, PICKS)
    for key, expected in zip(keys, (7 / 16, 5 / 16, 3 / 16, 1 / 16), strict=True):
        assert got[key] == pytest.approx(expected, abs=0.02), (seed, got)


def test_least_request_reads_the_live_active_map() -> None:
    keys = [key for key, _ in cluster(1, 1)]
    active = {keys[0]: 0, keys[1]: 0}
    balancer = LeastRequestBalancer(cluster(1, 1), random.Random(13), active)
    active[keys[0]] = 100
    counts = Counter(balancer.pick() for _ in range(1000))
    # keys[0] wins only when both draws are keys[0]: ~1/4.
    assert counts[keys[0]] / 1000 == pytest.approx(0.25, abs=0.05)


def test_more_choices_come_closer_to_the_least_loaded() -> None:
    endpoints = cluster(*[1] * 8)
    keys = [key for key, _ in endpoints]
    active = {key: 10 for key in keys} | {keys[5]: 0}
    two = LeastRequestBalancer(endpoints, random.Random(14), active)
    four = LeastRequestBalancer(endpoints, random.Random(14), active, choice_count=4)
    share_two = Counter(two.pick() for _ in range(PICKS))[keys[5]] / PICKS
    share_four = Counter(four.pick() for _ in range(PICKS))[keys[5]] / PICKS
    assert share_two == pytest.approx(1 - (7 / 8) ** 2, abs=0.02)
    assert share_four == pytest.approx(1 - (7 / 8) ** 4, abs=0.02)
    assert four.pick(frozenset(keys[:7])) == keys[7]


@pytest.mark.parametrize("seed", [15, 16])
def test_weighted_least_request_follows_weights_when_idle(seed: int) -> None:
    balancer = LeastRequestBalancer(cluster(80, 20), random.Random(seed), {})
    assert balancer.weighted
    counts = Counter(balancer.pick() for _ in range(PICKS))
    assert shares(counts, PICKS)["10.0.0.1:8080"] == pytest.approx(0.80, abs=0.01)


def test_weighted_least_request_divides_weight_by_load() -> None:
    # Envoy: effective weight = weight / (active + 1). a: 2 / (3 + 1) = 0.5; b: 1 / 1.
    a, b = (key for key, _ in cluster(2, 1))
    balancer = LeastRequestBalancer(cluster(2, 1), random.Random(17), {a: 3, b: 0})
    counts = Counter(balancer.pick() for _ in range(3000))
    assert counts[b] / 3000 == pytest.approx(2 / 3, abs=0.02)
    # With no bias the load is ignored.
    unbiased = LeastRequestBalancer(
        cluster(2, 1), random.Random(17), {a: 3, b: 0}, active_request_bias=0.0
    )
    counts = Counter(unbiased.pick() for _ in range(3000))
    assert counts[a] / 3000 == pytest.approx(2 / 3, abs=0.02)


def test_weighted_least_request_skips_excluded_without_losing_their_turn() -> None:
    endpoints = cluster(3, 2, 1)
    a, b, c = (key for key, _ in endpoints)
    balancer = LeastRequestBalancer(endpoints, random.Random(18), {})
    assert {balancer.pick(frozenset({a})) for _ in range(200)} == {b, c}
    # a was set aside, not pushed back: it is due at once when no longer excluded.
    assert balancer.pick() == a


def test_least_request_refuses_bad_options() -> None:
    with pytest.raises(LocalProtocolError):
        LeastRequestBalancer(cluster(1), random.Random(1), {}, choice_count=1)
    with pytest.raises(LocalProtocolError):
        LeastRequestBalancer(cluster(1), random.Random(1), {}, active_request_bias=-1.0)


# ------------------------------------------------------------------------------ ring hash

KEYS = [stable_hash(f"user-{i}") for i in range(20_000)]


def test_stable_hash_is_pinned() -> None:
    # Every proxy must place the same entries at the same points: this must never change.
    assert stable_hash("") == 0xE4A6A0577479B2B4
    assert stable_hash("10.0.0.1:8080_0") == 0x81D98E7C780E1242
    assert stable_hash(b"10.0.0.1:8080_0") == stable_hash("10.0.0.1:8080_0")
    lone_surrogate = "\ud800x"  # not valid UTF-8, still hashable
    assert stable_hash(lone_surrogate) == stable_hash(b"\xed\xa0\x80x")


def test_ring_sizes_follow_envoy() -> None:
    # 10 equal endpoints: ceil(0.1 * 1024) / 0.1 = 1030 entries, 103 each.
    ring = RingHashBalancer(cluster(*[1] * 10), random.Random(1))
    assert ring.ring_size == 1030
    assert ring.entries_per_endpoint == (103,) * 10
    # Weights 1:2 -> min normalized 1/3 -> ceil(1024/3) * 3 = 1026 entries, 342 and 684.
    ring = RingHashBalancer(cluster(1, 2), random.Random(1))
    assert ring.entries_per_endpoint == (342, 684)
    # 1:1000 -> 2 entries for the light one -> 2002; 1:5000 would need 5001 > maximum.
    ring = RingHashBalancer(cluster(1, 1000), random.Random(1), maximum_ring_size=4096)
    assert ring.entries_per_endpoint == (2, 2000)
    ring = RingHashBalancer(cluster(1, 5000), random.Random(1), maximum_ring_size=4096)
    assert ring.ring_size == 4096
    assert ring.entries_per_endpoint[0] == 1
    with pytest.raises(LocalProtocolError):
        RingHashBalancer(cluster(1), random.Random(1), minimum_ring_size=10, maximum_ring_size=5)


def test_ring_hash_is_stable_across_builds_rngs_and_endpoint_order() -> None:
    endpoints = cluster(*[1] * 8)
    first = RingHashBalancer(endpoints, random.Random(1))
    second = RingHashBalancer(list(reversed(endpoints)), random.Random(99))
    for key in KEYS[:2000]:
        assert first.pick(hash_key=key) == first.pick(hash_key=key) == second.pick(hash_key=key)


def test_ring_hash_balances_equal_endpoints() -> None:
    n = 10
    ring = RingHashBalancer(cluster(*[1] * n), random.Random(1))
    counts = Counter(ring.pick(hash_key=key) for key in KEYS)
    assert len(counts) == n
    for share in shares(counts, len(KEYS)).values():
        assert 0.7 / n <= share <= 1.3 / n, counts


def test_ring_hash_follows_weights() -> None:
    ring = RingHashBalancer(cluster(1, 2), random.Random(1))
    counts = Counter(ring.pick(hash_key=key) for key in KEYS)
    assert shares(counts, len(KEYS))["10.0.0.2:8080"] == pytest.approx(2 / 3, abs=0.05)


@pytest.mark.parametrize("n", [5, 10, 20])
def test_excluding_one_of_n_moves_only_its_own_keys(n: int) -> None:
    ring = RingHashBalancer(cluster(*[1] * n), random.Random(1))
    gone = ring.endpoints[n // 2]
    moved = 0
    for key in KEYS:
        before = ring.pick(hash_key=key)
        after = ring.pick(frozenset({gone}), hash_key=key)
        assert after != gone
        if before != gone:
            assert after == before  # nobody else's keys move
        else:
            moved += 1
    assert moved / len(KEYS) == pytest.approx(1 / n, rel=0.3)


@pytest.mark.parametrize("n", [5, 10, 20])
def test_rebuilding_without_one_of_n_moves_about_1_to_2_n_ths(n: int) -> None:
    # Envoy's ring rescales when a host leaves (ceil(1024 / n) entries each), so the
    # survivors gain entries and capture some keys from each other too.
    endpoints = cluster(*[1] * n)
    before = RingHashBalancer(endpoints, random.Random(1))
    after = RingHashBalancer(endpoints[:-1], random.Random(1))
    moved = sum(before.pick(hash_key=key) != after.pick(hash_key=key) for key in KEYS)
    assert 0.7 / n <= moved / len(KEYS) <= 2.0 / n


@PROPERTY
@given(n=st.integers(2, 12), removed=st.integers(0, 11), seed=st.integers(0, 1000))
def test_exclusion_is_the_ring_without_the_endpoint(n: int, removed: int, seed: int) -> None:
    ring = RingHashBalancer(cluster(*[1] * n), random.Random(seed), minimum_ring_size=64)
    gone = ring.endpoints[removed % n]
    rng = random.Random(seed)
    for _ in range(200):
        key = rng.getrandbits(64)
        before = ring.pick(hash_key=key)
        after = ring.pick(frozenset({gone}), hash_key=key)
        assert after != gone and (before == gone or after == before)


def test_ring_hash_wraps_around_and_uses_a_random_point_without_a_key() -> None:
    ring = RingHashBalancer(cluster(1, 1, 1), random.Random(19))
    # Past the last entry a key belongs to the first one.
    assert ring.pick(hash_key=(1 << 64) - 1) == ring.pick(hash_key=0)
    counts = Counter(ring.pick() for _ in range(3000))
    assert len(counts) == 3 and min(counts.values()) > 600


def test_ring_hash_names_endpoints_with_the_given_function() -> None:
    endpoints = [(("10.0.0.1", 80), 1), (("10.0.0.2", 80), 1)]
    by_address: Callable[[tuple[str, int]], str] = lambda e: f"{e[0]}:{e[1]}"  # noqa: E731
    ring = RingHashBalancer(endpoints, random.Random(1), name=by_address)
    same = RingHashBalancer(
        [(f"{host}:{port}", 1) for (host, port), _ in endpoints], random.Random(1)
    )
    for key in KEYS[:500]:
        picked = ring.pick(hash_key=key)
        assert picked is not None
        assert f"{picked[0]}:{picked[1]}" == same.pick(hash_key=key)


def test_default_ring_size_is_envoys_minimum() -> None:
    assert DEFAULT_MINIMUM_RING_SIZE == 1024
