"""CA benchmark: the leader's leaf-renewal load at N services, simulated in virtual time.

    .venv/bin/python bench/ca_renewal.py             # 10,000 services, 7 days (about 10 s)
    .venv/bin/python bench/ca_renewal.py --quick     # 500 services, 10 CSR samples (tests)
    .venv/bin/python bench/ca_renewal.py --services 50000 --days 14 --seed 7

Two parts, in one process on one core:

* **Signing capacity, measured.** ``CertificateAuthority.sign_csr`` over ``--csr-samples``
  CSRs made beforehand (the agents' work, not the leader's), best of ``--rounds``
  rounds: the leader's capacity in certificates/s. Also timed: ``rotate_root`` and the
  same CSRs signed under the new root (cross-signed during a rotation), whose ratio to
  the first figure is measured in the same run, so machine noise largely cancels.
  The leaf's validity (``NotBefore`` backdating, TTL) is read from a real leaf, not
  assumed.
* **Renewal load, simulated.** Every service holds one leaf; an event queue (``heapq``)
  replays ``ca.renewal``'s schedule over ``--days`` of virtual time: each leaf is renewed
  at ``renew_at(not_before, not_after, fraction)`` with a seeded random fraction, and
  each renewal issues a new leaf at that moment. Signing is not repeated per event:
  the request times are fed to a FIFO single-server model of the leader whose service
  time is the measured time per signature, which gives the leader load (request rate /
  capacity, > 100 % means it is saturated and requests queue), the longest queueing
  delay, and when a wave has been fully served.

Scenarios, each against a baseline of the same population in the same run:

1. **steady state**: an aged cluster (the renewal process in equilibrium, as if every
   service had registered at a random moment long ago);
2. **every leaf issued at t=0, jittered renewals** vs the **naive baseline**: the same
   leaves renewed at exactly half-life, the thundering herd a design without jitter
   gives. ``peak_ratio_vs_naive`` (busiest second, jittered / naive) is the headline;
3. **root rotation**: every agent sees the rotation at the same moment (the worst case;
   gossip spreading would only smooth it) and re-issues at ``reissue_at(seen,
   rotation_spread(N, measured capacity), fraction)``, vs everyone re-issuing at once;
4. **cold start**: N services register within 60 s, and the echo of that wave when
   the leaves come up for renewal, jittered vs at exactly half-life.

Time is virtual and seeded (``--seed``): the request counts and peaks are exact and
repeat; only the signing capacity, and what is derived from it, moves with the machine.
It prints a table and, last, one JSON line ``{"bench": "ca_renewal", ...}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cryptography

from ca.issuer import DEFAULT_LEAF_TTL, CertificateAuthority, generate_key, make_csr
from ca.renewal import reissue_at, renew_at, rotation_spread
from ca.spiffe import SpiffeId

TRUST_DOMAIN: Final = "0e2b3c4d-1111-4222-8333-444455556666.meshnode"
#: Virtual time 0. Any instant works; the CA's root is created at it.
EPOCH: Final = datetime(2025, 1, 1, tzinfo=UTC)
#: Full run and ``--quick`` defaults: (services, CSR samples, signing rounds).
FULL: Final = (10_000, 300, 3)
QUICK: Final = (500, 10, 1)
#: A cold cluster's services all register within this many seconds (DESIGN: a start).
STARTUP_WINDOW_S: Final = 60.0
#: Fraction used when there is no jitter: exactly half-life (the naive design).
HALF_LIFE: Final = 0.5

REGISTER: Final = "register"
RENEWAL: Final = "renewal"
REISSUE: Final = "reissue"


# ---------------------------------------------------------------------------- signing


@dataclass(frozen=True, slots=True)
class Signing:
    """What the leader's CA costs on this machine, and the shape of the leaves it makes."""

    samples: int
    rounds: int
    sign_seconds: float
    """Mean wall time of one ``sign_csr`` in the best round."""
    sign_after_rotation_seconds: float
    rotate_root_seconds: float
    backdate: timedelta
    """How far ``NotBefore`` lies before the moment of signing (read from a real leaf)."""
    validity: timedelta
    """How far ``NotAfter`` lies after the moment of signing (read from a real leaf)."""

    @property
    def per_s(self) -> float:
        return 1.0 / self.sign_seconds


def measure_signing(samples: int, rounds: int, ttl: timedelta) -> Signing:
    authority = CertificateAuthority.create_root(TRUST_DOMAIN, EPOCH)
    ids = [SpiffeId.service(TRUST_DOMAIN, "dc1", f"svc-{i}") for i in range(samples)]
    csrs = [make_csr(generate_key(), sid) for sid in ids]  # the agents' side, not timed
    now = EPOCH + timedelta(hours=1)

    def one_round() -> float:
        started = time.perf_counter()
        for csr, sid in zip(csrs, ids, strict=True):
            authority.sign_csr(csr, expected=sid, registered=True, now=now, ttl=ttl)
        return (time.perf_counter() - started) / samples

    best = min(one_round() for _ in range(rounds))
    leaf = authority.sign_csr(csrs[0], expected=ids[0], registered=True, now=now, ttl=ttl)
    started = time.perf_counter()
    authority.rotate_root(now)
    rotate_seconds = time.perf_counter() - started
    after = min(one_round() for _ in range(rounds))
    return Signing(
        samples=samples,
        rounds=rounds,
        sign_seconds=best,
        sign_after_rotation_seconds=after,
        rotate_root_seconds=rotate_seconds,
        backdate=now - leaf.not_before,
        validity=leaf.not_after - now,
    )


# ---------------------------------------------------------------------------- simulation


def seconds_of(moment: datetime) -> float:
    return (moment - EPOCH).total_seconds()


#: A pending request in the event queue: (at, sequence, service, kind, generation).
#: ``generation`` is the service's leaf generation when it was scheduled; the event is
#: stale once another leaf was issued (a renewal that a re-issue already replaced, or
#: the reverse). Plain tuples: the heap compares millions of them.
Event = tuple[float, int, int, str, int]


@dataclass(frozen=True, slots=True)
class Request:
    """One CSR reaching the leader."""

    at: float
    kind: str
    service: int


class Cluster:
    """``services`` agents' leaves in virtual time (seconds since :data:`EPOCH`)."""

    def __init__(
        self, services: int, signing: Signing, rng: random.Random, *, jitter: bool
    ) -> None:
        self.services = services
        self._signing = signing
        self._rng = rng
        self._jitter = jitter
        self._queue: list[Event] = []
        self._sequence = 0
        self._generation = [0] * services
        self.requests: list[Request] = []

    def _fraction(self) -> float:
        return self._rng.random() if self._jitter else HALF_LIFE

    def _push(self, at: float, service: int, kind: str) -> None:
        self._sequence += 1
        heapq.heappush(self._queue, (at, self._sequence, service, kind, self._generation[service]))

    def _hold_leaf(self, service: int, issued: float, fraction: float) -> None:
        """``service`` holds a leaf signed at ``issued``; schedule its renewal."""
        # sign_csr works in whole seconds (X.509 times have no fractions).
        moment = (EPOCH + timedelta(seconds=issued)).replace(microsecond=0)
        not_before = moment - self._signing.backdate
        not_after = moment + self._signing.validity
        self._generation[service] += 1
        self._push(seconds_of(renew_at(not_before, not_after, fraction)), service, RENEWAL)

    def start_cold(self, window_s: float) -> None:
        """Every service registers at a uniform moment in ``[0, window_s)``."""
        moments = [self._rng.random() * window_s for _ in range(self.services)]
        for service, at in enumerate(moments):
            self._push(at, service, REGISTER)

    def start_aged(self) -> None:
        """Leaves as in a cluster running for a long time: the renewal process in
        equilibrium. The current leaf's issue-to-renewal interval is length-biased
        (a random moment falls in a long interval more often than in a short one) and
        the moment "now" is uniform inside it (renewal theory, the inspection paradox).
        """
        not_before = EPOCH - self._signing.backdate
        not_after = EPOCH + self._signing.validity
        shortest = seconds_of(renew_at(not_before, not_after, 0.0))
        longest = seconds_of(renew_at(not_before, not_after, 1.0))
        for service in range(self.services):
            interval = math.sqrt(
                shortest**2 + self._rng.random() * (longest**2 - shortest**2)
            )  # inverse CDF of a density proportional to the interval, on [shortest, longest]
            fraction = (interval - shortest) / (longest - shortest)
            issued = self._rng.random() * interval - interval
            self._hold_leaf(service, issued, fraction)

    def rotate(self, at: float, spread: timedelta) -> None:
        """Every agent sees a root rotation at ``at`` and schedules its re-issue."""
        seen = EPOCH + timedelta(seconds=at)
        for service in range(self.services):
            self._push(seconds_of(reissue_at(seen, spread, self._rng.random())), service, REISSUE)

    def run_until(self, end: float) -> None:
        while self._queue and self._queue[0][0] <= end:
            at, _, service, kind, generation = heapq.heappop(self._queue)
            if generation != self._generation[service]:
                continue  # superseded by a newer leaf
            self.requests.append(Request(at, kind, service))
            self._hold_leaf(service, at, self._fraction())


# ---------------------------------------------------------------------------- measures


def busiest(times: Sequence[float], width: float) -> int:
    """The largest number of the sorted ``times`` inside any window ``[t, t + width)``."""
    most = 0
    first = 0
    for last, at in enumerate(times):
        while at - times[first] >= width:
            first += 1
        most = max(most, last - first + 1)
    return most


@dataclass(frozen=True, slots=True)
class Served:
    """A request and when the leader, signing one at a time in arrival order, was done
    with it."""

    request: Request
    done: float
    wait: float


def serve(requests: Sequence[Request], sign_seconds: float) -> list[Served]:
    """A FIFO single-server queue with the measured time per signature."""
    served = []
    free_at = -math.inf
    for request in sorted(requests, key=lambda r: r.at):
        begin = max(request.at, free_at)
        free_at = begin + sign_seconds
        served.append(Served(request, free_at, begin - request.at))
    return served


@dataclass(frozen=True, slots=True)
class Load:
    """The leader's load from a selection of requests."""

    label: str
    requests: int
    span_s: float
    peak_1s: int
    peak_60s: int
    max_wait_s: float
    complete_s: float | None = None
    """For a wave: from its start until the last leaf it asked for was signed."""

    @property
    def mean_per_s(self) -> float:
        return self.requests / self.span_s if self.span_s > 0 else 0.0

    @property
    def peak_60s_per_s(self) -> float:
        return self.peak_60s / 60


def load_of(
    label: str,
    served: Sequence[Served],
    *,
    kinds: frozenset[str],
    start: float,
    end: float,
    complete_from: float | None = None,
) -> Load:
    chosen = [s for s in served if s.request.kind in kinds and start <= s.request.at < end]
    times = [s.request.at for s in chosen]
    return Load(
        label=label,
        requests=len(chosen),
        span_s=end - start,
        peak_1s=busiest(times, 1.0),
        peak_60s=busiest(times, 60.0),
        max_wait_s=max((s.wait for s in chosen), default=0.0),
        complete_s=(
            None
            if complete_from is None
            else max((s.done for s in chosen), default=complete_from) - complete_from
        ),
    )


def all_replaced_by(served: Sequence[Served], services: int, since: float) -> float:
    """When every service held a leaf requested at or after ``since`` (a rotation)."""
    first: dict[int, float] = {}
    for item in served:
        if item.request.at >= since and item.request.service not in first:
            first[item.request.service] = item.done
    if len(first) < services:
        return math.inf
    return max(first.values()) - since


# ---------------------------------------------------------------------------- scenarios


@dataclass(frozen=True, slots=True)
class Plan:
    services: int
    days: float
    rotation_at_s: float
    seed: int


def rng_for(plan: Plan, scenario: str) -> random.Random:
    # Paired scenarios (jittered and naive) share a stream, so they start from the
    # same population: the same registration moments, the same aged leaves.
    return random.Random(f"{plan.seed}:{scenario}")


def steady(plan: Plan, signing: Signing) -> Load:
    cluster = Cluster(plan.services, signing, rng_for(plan, "aged"), jitter=True)
    cluster.start_aged()
    end = plan.days * 86_400
    cluster.run_until(end)
    served = serve(cluster.requests, signing.sign_seconds)
    return load_of(
        "steady state (aged cluster, jittered)",
        served,
        kinds=frozenset({RENEWAL}),
        start=0.0,
        end=end,
    )


def synchronized(plan: Plan, signing: Signing, *, jitter: bool) -> Load:
    cluster = Cluster(plan.services, signing, rng_for(plan, "t0"), jitter=jitter)
    cluster.start_cold(0.0)
    end = plan.days * 86_400
    cluster.run_until(end)
    served = serve(cluster.requests, signing.sign_seconds)
    label = (
        "all issued at t=0, renewals jittered 40-60 %"
        if jitter
        else "  baseline: all issued at t=0, renewal at half-life"
    )
    return load_of(label, served, kinds=frozenset({RENEWAL}), start=0.0, end=end)


def rotation(plan: Plan, signing: Signing, spread: timedelta) -> tuple[Load, Load]:
    """The re-issue wave and, after it, the renewals of the leaves it issued."""
    cluster = Cluster(plan.services, signing, rng_for(plan, "aged"), jitter=True)
    cluster.start_aged()
    cluster.run_until(plan.rotation_at_s)
    cluster.rotate(plan.rotation_at_s, spread)
    end = plan.days * 86_400
    cluster.run_until(end)
    served = serve(cluster.requests, signing.sign_seconds)
    wave_end = max(
        (s.request.at for s in served if s.request.kind == REISSUE), default=plan.rotation_at_s
    )
    every = frozenset({RENEWAL, REISSUE})
    if spread > timedelta(0):
        label = f"root rotation, re-issue spread over {spread.total_seconds():.0f} s"
    else:
        label = "  baseline: rotation, every leaf re-issued at once"
    wave = load_of(
        label,
        served,
        kinds=every,
        start=plan.rotation_at_s,
        end=wave_end + 1.0,
    )
    wave = dataclasses.replace(
        wave,
        span_s=max(spread.total_seconds(), 1.0),
        complete_s=all_replaced_by(served, plan.services, plan.rotation_at_s),
    )
    echo = load_of(
        "  then: renewals of the re-issued leaves",
        served,
        kinds=frozenset({RENEWAL}),
        start=wave_end + 1.0,
        end=end,
    )
    return wave, echo


def startup(plan: Plan, signing: Signing, *, jitter: bool) -> tuple[Load, Load]:
    """A cold cluster registering within 60 s, and the echo of that wave at renewal."""
    cluster = Cluster(plan.services, signing, rng_for(plan, "cold"), jitter=jitter)
    cluster.start_cold(STARTUP_WINDOW_S)
    end = plan.days * 86_400
    cluster.run_until(end)
    served = serve(cluster.requests, signing.sign_seconds)
    wave = load_of(
        f"cold start: every service registers within {STARTUP_WINDOW_S:.0f} s",
        served,
        kinds=frozenset({REGISTER}),
        start=0.0,
        end=STARTUP_WINDOW_S,
        complete_from=0.0,
    )
    label = (
        "  then: its renewals, jittered 40-60 %"
        if jitter
        else "  baseline: its renewals at half-life"
    )
    echo = load_of(label, served, kinds=frozenset({RENEWAL}), start=0.0, end=end)
    return wave, echo


# ---------------------------------------------------------------------------- report


def print_table(plan: Plan, signing: Signing, ttl: timedelta, loads: Sequence[Load]) -> None:
    print(
        f"\n## Leader signing capacity (sign_csr, {signing.samples} CSRs, best of"
        f" {signing.rounds}; cryptography {cryptography.__version__},"
        f" Python {platform.python_version()}, 1 core)"
    )
    rows = [
        ("capacity", f"{signing.per_s:,.0f} certificates/s ({1000 * signing.sign_seconds:.3f} ms)"),
        (
            "under a rotated root (cross-signed)",
            f"{1 / signing.sign_after_rotation_seconds:,.0f} certificates/s"
            f" (ratio {signing.sign_seconds / signing.sign_after_rotation_seconds:.2f})",
        ),
        ("rotate_root, once", f"{1000 * signing.rotate_root_seconds:.1f} ms"),
        (
            "leaf validity (from a real leaf)",
            f"signing -{signing.backdate.total_seconds():.0f} s"
            f" to +{signing.validity.total_seconds() / 3600:.1f} h",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")

    print(
        f"\n## Leader load at {plan.services:,} services, leaf TTL"
        f" {ttl.total_seconds() / 3600:g} h, {plan.days:g} days of virtual time"
        f" (seed {plan.seed}); load = requests/s / capacity"
    )
    width = max(len(load.label) for load in loads)
    header = (
        f"  {'scenario':<{width}}  {'requests':>8}  {'mean/s':>8}  {'peak 1 s':>8}"
        f"  {'peak 60 s':>9}  {'load mean':>9}  {'load 1 s':>9}  {'max wait':>8}  {'done in':>8}"
    )
    print(header)
    for load in loads:
        done = "" if load.complete_s is None else f"{load.complete_s:.1f} s"
        print(
            f"  {load.label:<{width}}  {load.requests:>8,}  {load.mean_per_s:>8.3f}"
            f"  {load.peak_1s:>8,}  {load.peak_60s_per_s:>7.2f}/s"
            f"  {percent(load.mean_per_s / signing.per_s):>9}"
            f"  {percent(load.peak_1s / signing.per_s):>9}"
            f"  {1000 * load.max_wait_s:>6.1f}ms  {done:>8}"
        )


def percent(share: float) -> str:
    return f"{100 * share:.2g}%" if share < 0.01 else f"{100 * share:.1f}%"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 services, 10 CSR samples")
    parser.add_argument("--services", type=int, help=f"services (default {FULL[0]:,})")
    parser.add_argument("--csr-samples", type=int, help=f"CSRs signed (default {FULL[1]})")
    parser.add_argument("--rounds", type=int, help=f"signing rounds, best kept ({FULL[2]})")
    parser.add_argument("--ttl-hours", type=float, default=DEFAULT_LEAF_TTL.total_seconds() / 3600)
    parser.add_argument("--days", type=float, default=7.0, help="virtual time simulated")
    parser.add_argument(
        "--rotation-at-hours", type=float, default=24.0, help="when the root rotates"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    services = args.services or defaults[0]
    samples = args.csr_samples or defaults[1]
    rounds = args.rounds or defaults[2]
    ttl = timedelta(hours=args.ttl_hours)
    plan = Plan(services, args.days, args.rotation_at_hours * 3600, args.seed)

    started = time.perf_counter()
    signing = measure_signing(samples, rounds, ttl)
    steady_load = steady(plan, signing)
    jittered = synchronized(plan, signing, jitter=True)
    naive = synchronized(plan, signing, jitter=False)
    spread = rotation_spread(services, signing.per_s)
    wave, wave_echo = rotation(plan, signing, spread)
    naive_wave, _ = rotation(plan, signing, timedelta(0))
    cold, cold_echo = startup(plan, signing, jitter=True)
    _, naive_cold_echo = startup(plan, signing, jitter=False)
    wall = time.perf_counter() - started

    loads = [steady_load, jittered, naive, wave, wave_echo, naive_wave]
    loads += [cold, cold_echo, naive_cold_echo]
    print_table(plan, signing, ttl, loads)
    ratio = jittered.peak_1s / naive.peak_1s
    print(
        f"\n  busiest second, jittered / naive: {jittered.peak_1s} / {naive.peak_1s}"
        f" = {ratio:.2g} (steady state {steady_load.peak_1s}); rotation wave"
        f" {wave.peak_1s} / {naive_wave.peak_1s}; renewals after a cold start"
        f" {cold_echo.peak_1s} / {naive_cold_echo.peak_1s}; wall {wall:.1f} s"
    )

    capacity = signing.per_s
    summary: dict[str, Any] = {
        "bench": "ca_renewal",
        "services": services,
        "seed": plan.seed,
        "quick": args.quick,
        "ttl_h": args.ttl_hours,
        "days": plan.days,
        "csr_samples": samples,
        "cryptography": cryptography.__version__,
        "python": platform.python_version(),
        "sign_per_s": round(capacity, 1),
        "sign_after_rotation_ratio": round(
            signing.sign_seconds / signing.sign_after_rotation_seconds, 3
        ),
        "rotate_root_ms": round(1000 * signing.rotate_root_seconds, 2),
        "steady_mean_per_s": round(steady_load.mean_per_s, 4),
        "steady_peak_1s": steady_load.peak_1s,
        "steady_peak_60s_per_s": round(steady_load.peak_60s_per_s, 3),
        "steady_cpu_share_mean": round(steady_load.mean_per_s / capacity, 7),
        "steady_cpu_share_peak": round(steady_load.peak_1s / capacity, 6),
        "synchronized_peak_1s": jittered.peak_1s,
        "synchronized_peak_60s_per_s": round(jittered.peak_60s_per_s, 3),
        "naive_peak_1s": naive.peak_1s,
        "naive_cpu_share_peak": round(naive.peak_1s / capacity, 4),
        "naive_max_wait_s": round(naive.max_wait_s, 3),
        "peak_ratio_vs_naive": round(ratio, 6),
        "steady_peak_ratio_vs_naive": round(steady_load.peak_1s / naive.peak_1s, 6),
        "rotation_spread_s": spread.total_seconds(),
        "rotation_peak_1s": wave.peak_1s,
        "rotation_cpu_share": round(wave.peak_1s / capacity, 4),
        "rotation_complete_s": round(wave.complete_s or 0.0, 3),
        "rotation_max_wait_s": round(wave.max_wait_s, 4),
        "rotation_echo_peak_1s": wave_echo.peak_1s,
        "naive_rotation_peak_1s": naive_wave.peak_1s,
        "naive_rotation_cpu_share": round(naive_wave.peak_1s / capacity, 4),
        "naive_rotation_complete_s": round(naive_wave.complete_s or 0.0, 3),
        "naive_rotation_max_wait_s": round(naive_wave.max_wait_s, 4),
        "startup_peak_1s": cold.peak_1s,
        "startup_cpu_share": round(cold.peak_1s / capacity, 4),
        "startup_complete_s": round(cold.complete_s or 0.0, 3),
        "startup_max_wait_s": round(cold.max_wait_s, 4),
        "startup_echo_peak_1s": cold_echo.peak_1s,
        "naive_startup_echo_peak_1s": naive_cold_echo.peak_1s,
        "wall_s": round(wall, 2),
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
