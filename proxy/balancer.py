"""Endpoint selection for one upstream cluster: the load balancers of the data plane.

Theory of operation
-------------------
A balancer is built from the cluster's endpoints — opaque hashable keys (an address,
an instance ID) with integer weights ≥ 1 — and rebuilt whenever that set changes.
Everything that does not depend on the request is computed at construction, so a
pick is a handful of list and dict operations (a fraction of a µs to ~1 µs; see
``bench/proxy_cores.py``).

Every balancer answers the same question, ``pick(exclude, hash_key) -> endpoint | None``:

* ``exclude`` is a set of endpoints not to choose now: those outlier detection has
  ejected (``OutlierDetector.ejected(now)`` is a frozenset made for this), or those a
  retry already tried. It is honoured exactly, and when it covers every endpoint the
  pick is ``None`` (the proxy answers "no healthy endpoint"). An empty ``exclude``
  costs one truth test.
* ``hash_key`` is the request's 64-bit hash (``stable_hash`` of a header, a cookie,
  the source address, as a hash policy says). Only ``RingHashBalancer`` reads it.

The four policies, with Envoy's semantics (Envoy docs, "Load balancers",
``intro/arch_overview/upstream/load_balancing/load_balancers``; Consul's
``LoadBalancer.Policy`` uses the same names):

``round_robin`` (``RoundRobinBalancer``)
    Weighted and *smooth*: over one cycle of ``sum(weights)`` picks (weights reduced by
    their gcd) every endpoint is chosen exactly ``weight`` times, and its picks are
    spread through the cycle rather than bunched: the order is nginx's smooth weighted
    round robin (Envoy uses an earliest-deadline-first schedule to the same end; see
    ``smooth_cycle``). The cycle is precomputed; a pick reads the next slot. The
    starting slot is random so that proxies built at the same moment do not all start
    on the same endpoint. Excluded endpoints' slots are skipped (the skipped slots are
    consumed, so the others keep their proportions).
``least_request`` (``LeastRequestBalancer``)
    Envoy's default. With equal weights: draw ``choice_count`` (2) endpoints at random,
    with replacement, and take the one with fewer active requests — the "power of two
    choices", O(1), and nearly as good as a full scan (Mitzenmacher 2001). With unequal
    weights, as Envoy does: an earliest-deadline-first schedule whose weights are
    recomputed each time an endpoint is picked, ``weight / (active + 1) ** bias``
    (``active_request_bias``, default 1.0), so loaded endpoints are picked less often.
    Active requests are read per pick from a mapping the caller keeps up to date.
``random`` (``RandomBalancer``)
    Weighted: an endpoint is chosen with probability ``weight / sum(weights)``
    (cumulative weights, one bisect).
``ring_hash`` (``RingHashBalancer``)
    Consistent hashing (Karger et al. 1997; "ketama"), built exactly as Envoy builds
    its ring (``ring_hash_lb.cc``): the ring gets ``scale · weight / sum(weights)``
    entries per endpoint, where ``scale`` is the smallest size ≥
    ``minimum_ring_size`` that gives the least-weighted endpoint a whole number of
    entries, capped at ``maximum_ring_size``; entry i of an endpoint sits at
    ``stable_hash(f"{name}_{i}")``. A request goes to the first entry at or after its
    hash, clockwise. An excluded endpoint is treated as if its entries were not on the
    ring (the walk continues clockwise), so excluding one of N endpoints moves exactly
    the keys it owned, about 1/N. Rebuilding the ring without an endpoint moves its
    keys plus those captured by the entries the others gain when the ring is rescaled
    (Envoy's formula gives each of N equal endpoints ``ceil(minimum / N)`` entries):
    1.3/N to 1.7/N in all for N from 3 to 100 (measured). Health changes should
    therefore go through ``exclude``; only membership changes need a rebuild. Without
    a ``hash_key`` a random point is used, as in Envoy.

Randomness comes from the ``random.Random`` given to the constructor (STYLE rule 2).
"""

from __future__ import annotations

import hashlib
import heapq
import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeVar

from proxy.errors import LocalProtocolError

if TYPE_CHECKING:
    from random import Random

K = TypeVar("K", bound=Hashable)

NOTHING: Final[frozenset[Any]] = frozenset()
"""The empty ``exclude`` (the default of every ``pick``)."""

ROUND_ROBIN: Final = "round_robin"
LEAST_REQUEST: Final = "least_request"
RANDOM: Final = "random"
RING_HASH: Final = "ring_hash"
POLICIES: Final = (ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH)
"""The policy names ``build_balancer`` accepts (Consul's ``LoadBalancer.Policy`` values)."""

#: Longest precomputed round-robin cycle. Weights whose sum (after dividing by their gcd)
#: is larger are scaled down to fit, so proportions are then exact to within half a
#: weight unit in 65,536. Consul weights are 1..65535 but real clusters use small ones;
#: the cap bounds the cycle at 512 KiB and its build at ~70 ms (see ``smooth_cycle``).
MAX_ROUND_ROBIN_CYCLE: Final = 1 << 16

#: Envoy's default ``minimum_ring_size``.
DEFAULT_MINIMUM_RING_SIZE: Final = 1024
#: Envoy's default ``maximum_ring_size`` is 8M entries, which Envoy hashes in C++ in a
#: few hundred ms. Here an entry costs ~1 µs to build, so the default cap is 64k
#: entries (~70 ms), reached only when weights are very uneven. Raise it if needed.
DEFAULT_MAXIMUM_RING_SIZE: Final = 1 << 16
#: Envoy's hard limit on ``maximum_ring_size``.
RING_SIZE_LIMIT: Final = 8 * 1024 * 1024

#: Envoy's default ``choice_count`` for least request.
DEFAULT_CHOICE_COUNT: Final = 2

#: Draws a random pick makes before an ``exclude`` that rejects them all makes it
#: build the list of remaining endpoints. Rejection sampling keeps the exact
#: distribution; 4 misses in a row mean most of the cluster is excluded.
_REJECTION_DRAWS: Final = 4

_TWO_TO_64: Final = float(1 << 64)


_blake2b: Final = hashlib.blake2b
_from_bytes: Final = int.from_bytes


def stable_hash(value: str | bytes) -> int:
    """A 64-bit hash of ``value`` that is the same in every process and on every host
    (BLAKE2b with an 8-byte digest; Python's ``hash()`` is salted per process).

    Use it for ring entries and for request hash keys. A str is hashed as its UTF-8
    bytes (lone surrogates passed through). ~0.7 µs for a short value."""
    if isinstance(value, str):
        try:
            data = value.encode()
        except UnicodeEncodeError:
            data = value.encode("utf-8", "surrogatepass")
    else:
        data = value
    return _from_bytes(_blake2b(data, digest_size=8).digest(), "big")


class Balancer(Protocol[K]):
    """What the proxy asks of any load balancer."""

    @property
    def endpoints(self) -> tuple[K, ...]:
        """The endpoints, in the order given."""
        ...

    def pick(self, exclude: Collection[K] = NOTHING, hash_key: int | None = None) -> K | None:
        """An endpoint not in ``exclude``, or None when there is none."""
        ...


def build_balancer(
    policy: str,
    endpoints: Iterable[tuple[K, int]],
    rng: Random,
    *,
    active: Mapping[K, int] | None = None,
    choice_count: int = DEFAULT_CHOICE_COUNT,
    active_request_bias: float = 1.0,
    minimum_ring_size: int = DEFAULT_MINIMUM_RING_SIZE,
    maximum_ring_size: int = DEFAULT_MAXIMUM_RING_SIZE,
    name: Callable[[K], str] = str,
) -> Balancer[K]:
    """The balancer for ``policy`` (one of ``POLICIES``). ``active`` is required for
    ``least_request``; the other options apply to the policy they are named after."""
    if policy == ROUND_ROBIN:
        return RoundRobinBalancer(endpoints, rng)
    if policy == LEAST_REQUEST:
        if active is None:
            raise LocalProtocolError("least_request needs the active-request mapping")
        return LeastRequestBalancer(
            endpoints,
            rng,
            active,
            choice_count=choice_count,
            active_request_bias=active_request_bias,
        )
    if policy == RANDOM:
        return RandomBalancer(endpoints, rng)
    if policy == RING_HASH:
        return RingHashBalancer(
            endpoints,
            rng,
            minimum_ring_size=minimum_ring_size,
            maximum_ring_size=maximum_ring_size,
            name=name,
        )
    raise LocalProtocolError(f"unknown load-balancing policy {policy!r}; one of {POLICIES}")


# ----------------------------------------------------------------------------- helpers


def _validated(endpoints: Iterable[tuple[K, int]]) -> tuple[tuple[K, ...], tuple[int, ...]]:
    keys: list[K] = []
    weights: list[int] = []
    seen: set[K] = set()
    for key, weight in endpoints:
        if key in seen:
            raise LocalProtocolError(f"endpoint {key!r} is given twice")
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise LocalProtocolError(f"endpoint {key!r} has weight {weight!r}; need an int ≥ 1")
        seen.add(key)
        keys.append(key)
        weights.append(weight)
    return tuple(keys), tuple(weights)


def _all_excluded(keys: tuple[K, ...], exclude: Collection[K]) -> bool:
    """Whether ``exclude`` covers every key: O(1) unless ``exclude`` is at least as
    large as the cluster."""
    if len(exclude) < len(keys):
        return False
    return all(key in exclude for key in keys)


def _run_ends(owners: list[int]) -> list[int]:
    """For each slot of a cyclic sequence, the next slot (cyclically) whose owner
    differs: lets a walk skip a run of one excluded endpoint in one step."""
    size = len(owners)
    ends = [(i + 1) % size for i in range(size)]
    if len(set(owners)) < 2:
        return ends  # never walked: a lone endpoint that is excluded means "none"
    # Two backward passes over the cycle: the second fixes the run that wraps around.
    for step in range(2 * size - 1, -1, -1):
        i = step % size
        following = (i + 1) % size
        ends[i] = following if owners[following] != owners[i] else ends[following]
    return ends


def smooth_cycle(weights: Iterable[int]) -> list[int]:
    """One cycle of smooth weighted round robin, as endpoint indices.

    The weights are divided by their gcd (and scaled down if their sum exceeds
    ``MAX_ROUND_ROBIN_CYCLE``); index i then appears exactly ``weights[i]`` times, its
    picks spread through the cycle. nginx's algorithm (``ngx_http_upstream_round_robin.c``:
    every step each endpoint's current weight grows by its weight, the largest is
    picked, lowest index first, and loses the total) keeps every endpoint within one
    pick of its exact share at every point of the cycle, but costs O(total · n). When
    that exceeds ``_NGINX_BUDGET`` steps the cycle is the earliest-deadline-first order
    Envoy uses for weighted round robin (``edf_scheduler.h``), the k-th pick of i due at
    ``(k - ½) / w_i``: O(total · log n), within ~1.5 picks of the exact share."""
    reduced = list(weights)
    if not reduced:
        return []
    divisor = math.gcd(*reduced)
    reduced = [w // divisor for w in reduced]
    total = sum(reduced)
    if total > MAX_ROUND_ROBIN_CYCLE:
        reduced = [max(1, round(w * MAX_ROUND_ROBIN_CYCLE / total)) for w in reduced]
        total = sum(reduced)
    if total == len(reduced):
        return list(range(total))  # equal weights: both algorithms give plain order
    if total * len(reduced) <= _NGINX_BUDGET:
        return _nginx_cycle(reduced, total)
    return _deadline_cycle(reduced, total)


#: Most endpoint-steps (cycle length × endpoints) spent on nginx's algorithm, ~15 ms.
_NGINX_BUDGET: Final = 1 << 18


def _nginx_cycle(weights: list[int], total: int) -> list[int]:
    current = [0] * len(weights)
    cycle: list[int] = []
    for _ in range(total):
        current = [c + w for c, w in zip(current, weights, strict=True)]
        best = current.index(max(current))
        current[best] -= total
        cycle.append(best)
    return cycle


def _deadline_cycle(weights: list[int], total: int) -> list[int]:
    # (deadline, index, picks so far): deadlines are exact quotients of small ints,
    # so equal deadlines compare equal and the index breaks the tie.
    heap = [(1 / (2 * w), i, 0) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    cycle: list[int] = []
    for _ in range(total):
        _, i, picked = heap[0]
        cycle.append(i)
        picked += 1
        heapq.heapreplace(heap, ((2 * picked + 1) / (2 * weights[i]), i, picked))
    return cycle


# ----------------------------------------------------------------------------- policies


class RoundRobinBalancer(Generic[K]):
    """Smooth weighted round robin over a precomputed cycle (see the module docstring)."""

    __slots__ = ("_cursor", "_cycle", "_run_ends", "_size", "endpoints")

    def __init__(self, endpoints: Iterable[tuple[K, int]], rng: Random | None = None) -> None:
        keys, weights = _validated(endpoints)
        self.endpoints: tuple[K, ...] = keys
        order = smooth_cycle(weights)
        self._cycle: list[K] = [keys[i] for i in order]
        self._size = len(order)
        self._run_ends = _run_ends(order) if order else []
        self._cursor = rng.randrange(self._size) if rng is not None and self._size else 0

    @property
    def cycle(self) -> tuple[K, ...]:
        """One full cycle of picks, from slot 0 (for tests and the admin API)."""
        return tuple(self._cycle)

    def pick(self, exclude: Collection[K] = NOTHING, hash_key: int | None = None) -> K | None:
        size = self._size
        if not size:
            return None
        cursor = self._cursor
        endpoint = self._cycle[cursor]
        cursor += 1
        self._cursor = 0 if cursor == size else cursor
        if exclude and endpoint in exclude:
            return self._pick_excluding(exclude, self._cursor)
        return endpoint

    def _pick_excluding(self, exclude: Collection[K], slot: int) -> K | None:
        if _all_excluded(self.endpoints, exclude):
            return None
        cycle = self._cycle
        run_ends = self._run_ends
        while True:
            endpoint = cycle[slot]
            if endpoint not in exclude:
                slot += 1
                self._cursor = 0 if slot == self._size else slot
                return endpoint
            slot = run_ends[slot]


class RandomBalancer(Generic[K]):
    """An endpoint drawn with probability proportional to its weight."""

    __slots__ = ("_count", "_cumulative", "_random", "_total", "_uniform", "_weights", "endpoints")

    def __init__(self, endpoints: Iterable[tuple[K, int]], rng: Random) -> None:
        keys, weights = _validated(endpoints)
        self.endpoints: tuple[K, ...] = keys
        self._weights = weights
        self._count = len(keys)
        self._random = rng.random
        self._uniform = len(set(weights)) <= 1
        # Floats (exact below 2**53): bisecting a float among floats is the fast compare.
        cumulative: list[float] = []
        running = 0
        for weight in weights:
            running += weight
            cumulative.append(float(running))
        self._cumulative = cumulative
        self._total = float(running)

    def pick(self, exclude: Collection[K] = NOTHING, hash_key: int | None = None) -> K | None:
        count = self._count
        if not count:
            return None
        if self._uniform:
            endpoint = self.endpoints[int(self._random() * count)]
        else:
            # hi = count - 1 keeps a product rounded up to the total inside the list.
            endpoint = self.endpoints[
                bisect_right(self._cumulative, self._random() * self._total, 0, count - 1)
            ]
        if exclude and endpoint in exclude:
            return self._pick_excluding(exclude)
        return endpoint

    def _draw(self) -> K:
        if self._uniform:
            return self.endpoints[int(self._random() * self._count)]
        slot = bisect_right(self._cumulative, self._random() * self._total, 0, self._count - 1)
        return self.endpoints[slot]

    def _pick_excluding(self, exclude: Collection[K]) -> K | None:
        if _all_excluded(self.endpoints, exclude):
            return None
        for _ in range(_REJECTION_DRAWS):
            endpoint = self._draw()
            if endpoint not in exclude:
                return endpoint
        return _weighted_choice(self.endpoints, self._weights, exclude, self._random())


def _weighted_choice(
    keys: tuple[K, ...], weights: tuple[int, ...], exclude: Collection[K], fraction: float
) -> K | None:
    """The exact weighted draw among the keys not excluded (the slow path)."""
    remaining = [
        (key, weight) for key, weight in zip(keys, weights, strict=True) if key not in exclude
    ]
    if not remaining:
        return None
    point = fraction * sum(weight for _, weight in remaining)
    for key, weight in remaining:
        point -= weight
        if point < 0:
            return key
    return remaining[-1][0]


class LeastRequestBalancer(Generic[K]):
    """Envoy's least request: power of two choices with equal weights, a load-adjusted
    earliest-deadline-first schedule with unequal ones (see the module docstring).

    ``active`` maps an endpoint to its requests in flight; it is read at each pick, so
    the caller keeps it current (an endpoint missing from it has none)."""

    __slots__ = (
        "_active",
        "_bias",
        "_choices",
        "_count",
        "_random",
        "_schedule",
        "_sequence",
        "_weights",
        "endpoints",
    )

    def __init__(
        self,
        endpoints: Iterable[tuple[K, int]],
        rng: Random,
        active: Mapping[K, int],
        *,
        choice_count: int = DEFAULT_CHOICE_COUNT,
        active_request_bias: float = 1.0,
    ) -> None:
        keys, weights = _validated(endpoints)
        if choice_count < 2:
            raise LocalProtocolError(f"choice_count must be ≥ 2, not {choice_count}")
        if active_request_bias < 0:
            raise LocalProtocolError("active_request_bias must be ≥ 0")
        self.endpoints: tuple[K, ...] = keys
        self._weights = weights
        self._count = len(keys)
        self._active = active
        self._random = rng.random
        self._choices = choice_count
        self._bias = active_request_bias
        self._sequence = len(keys)
        # Unequal weights: (deadline, sequence, index) heap. Each endpoint starts at a
        # random phase of its first period so that proxies built together do not all
        # begin with the same endpoint.
        self._schedule: list[tuple[float, int, int]] | None = None
        if len(set(weights)) > 1:
            self._schedule = [(rng.random() / w, i, i) for i, w in enumerate(weights)]
            heapq.heapify(self._schedule)

    @property
    def weighted(self) -> bool:
        """True when weights differ (the schedule is used instead of two choices)."""
        return self._schedule is not None

    def pick(self, exclude: Collection[K] = NOTHING, hash_key: int | None = None) -> K | None:
        count = self._count
        if not count:
            return None
        if self._schedule is not None:
            return self._pick_scheduled(exclude)
        if self._choices != 2:
            return self._pick_choices(exclude)
        keys = self.endpoints
        random = self._random
        load = self._active.get
        best = keys[int(random() * count)]
        other = keys[int(random() * count)]
        if exclude and (best in exclude or other in exclude):
            if _all_excluded(keys, exclude):
                return None
            if best in exclude:
                best = self._draw_allowed(exclude)
            if other in exclude:
                other = self._draw_allowed(exclude)
        return other if load(other, 0) < load(best, 0) else best

    def _pick_choices(self, exclude: Collection[K]) -> K | None:
        """``choice_count`` draws (not 2), the least loaded kept, first on ties."""
        keys = self.endpoints
        if exclude and _all_excluded(keys, exclude):
            return None
        count = self._count
        random = self._random
        load = self._active.get
        best: K | None = None
        best_load = 0
        for _ in range(self._choices):
            other = keys[int(random() * count)]
            if exclude and other in exclude:
                other = self._draw_allowed(exclude)
            other_load = load(other, 0)
            if best is None or other_load < best_load:
                best, best_load = other, other_load
        return best

    def _draw_allowed(self, exclude: Collection[K]) -> K:
        """A uniform draw among the endpoints not excluded (at least one is not): by
        rejection while that is cheap, then from the explicit list."""
        keys = self.endpoints
        count = self._count
        random = self._random
        for _ in range(_REJECTION_DRAWS):
            drawn = keys[int(random() * count)]
            if drawn not in exclude:
                return drawn
        allowed = [key for key in keys if key not in exclude]
        return allowed[int(random() * len(allowed))]

    def _pick_scheduled(self, exclude: Collection[K]) -> K | None:
        schedule = self._schedule
        assert schedule is not None
        keys = self.endpoints
        deadline, _, index = schedule[0]
        endpoint = keys[index]
        if exclude and endpoint in exclude:
            return self._pick_scheduled_excluding(exclude)
        self._reschedule(deadline, index, endpoint)
        return endpoint

    def _reschedule(self, deadline: float, index: int, endpoint: K) -> None:
        """Pop the head of the schedule and push it back one period later, the period
        computed from the endpoint's load now (Envoy: ``weight / (active + 1) ^ bias``)."""
        assert self._schedule is not None
        bias = self._bias
        load = self._active.get(endpoint, 0) + 1
        if bias == 1.0:
            period = load / self._weights[index]
        elif bias == 0.0:
            period = 1.0 / self._weights[index]
        else:
            period = load**bias / self._weights[index]
        self._sequence += 1
        heapq.heapreplace(self._schedule, (deadline + period, self._sequence, index))

    def _pick_scheduled_excluding(self, exclude: Collection[K]) -> K | None:
        schedule = self._schedule
        assert schedule is not None
        keys = self.endpoints
        if _all_excluded(keys, exclude):
            return None
        # Set the excluded heads aside (their deadlines unchanged), pick the first one
        # that is not excluded, put the others back.
        aside = []
        while keys[schedule[0][2]] in exclude:
            aside.append(heapq.heappop(schedule))
        deadline, _, index = schedule[0]
        endpoint = keys[index]
        self._reschedule(deadline, index, endpoint)
        for entry in aside:
            heapq.heappush(schedule, entry)
        return endpoint


class RingHashBalancer(Generic[K]):
    """Consistent hashing on Envoy's ring (see the module docstring).

    ``name(endpoint)`` is the text hashed for the endpoint's entries (Envoy hashes the
    host's address): it must be the same on every proxy for them to agree."""

    __slots__ = (
        "_hashes",
        "_owners",
        "_random",
        "_run_ends",
        "_size",
        "endpoints",
        "entries_per_endpoint",
    )

    def __init__(
        self,
        endpoints: Iterable[tuple[K, int]],
        rng: Random,
        *,
        minimum_ring_size: int = DEFAULT_MINIMUM_RING_SIZE,
        maximum_ring_size: int = DEFAULT_MAXIMUM_RING_SIZE,
        name: Callable[[K], str] = str,
    ) -> None:
        keys, weights = _validated(endpoints)
        if not 1 <= minimum_ring_size <= maximum_ring_size <= RING_SIZE_LIMIT:
            raise LocalProtocolError(
                "need 1 ≤ minimum_ring_size ≤ maximum_ring_size ≤ "
                f"{RING_SIZE_LIMIT}, not {minimum_ring_size}, {maximum_ring_size}"
            )
        self.endpoints: tuple[K, ...] = keys
        self._random = rng.random
        entries: list[tuple[int, int]] = []
        counts: list[int] = []
        if keys:
            total = sum(weights)
            smallest = min(weights) / total
            scale = min(math.ceil(smallest * minimum_ring_size) / smallest, maximum_ring_size)
            current = 0.0
            target = 0.0
            for index, (key, weight) in enumerate(zip(keys, weights, strict=True)):
                prefix = f"{name(key)}_"
                target += scale * (weight / total)
                count = 0
                while current < target:
                    entries.append((stable_hash(f"{prefix}{count}"), index))
                    count += 1
                    current += 1
                counts.append(count)
            entries.sort()
        self.entries_per_endpoint: tuple[int, ...] = tuple(counts)
        """Ring entries of each endpoint, in ``endpoints`` order (Envoy reports the min
        and max as ``min_hashes_per_host``/``max_hashes_per_host``)."""
        self._hashes = [entry_hash for entry_hash, _ in entries]
        self._owners: list[K] = [keys[index] for _, index in entries]
        self._size = len(entries)
        self._run_ends = _run_ends([index for _, index in entries]) if entries else []

    @property
    def ring_size(self) -> int:
        return self._size

    def pick(self, exclude: Collection[K] = NOTHING, hash_key: int | None = None) -> K | None:
        size = self._size
        if not size:
            return None
        if hash_key is None:
            hash_key = int(self._random() * _TWO_TO_64)
        slot = bisect_left(self._hashes, hash_key)
        if slot == size:
            slot = 0
        endpoint = self._owners[slot]
        if exclude and endpoint in exclude:
            return self._walk(exclude, slot)
        return endpoint

    def _walk(self, exclude: Collection[K], slot: int) -> K | None:
        """Clockwise from ``slot`` to the first entry of an endpoint not excluded:
        exactly where the key would land on a ring without the excluded endpoints."""
        if _all_excluded(self.endpoints, exclude):
            return None
        owners = self._owners
        run_ends = self._run_ends
        while owners[slot] in exclude:
            slot = run_ends[slot]
        return owners[slot]
