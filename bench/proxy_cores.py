"""Proxy cores micro-benchmark: what each per-request decision costs, in µs per call.

    .venv/bin/python bench/proxy_cores.py                  # 10 endpoints
    .venv/bin/python bench/proxy_cores.py --endpoints 100 --number 200000
    .venv/bin/python bench/proxy_cores.py --quick          # a smoke run

These decisions run on the hot path of the data plane, once or a few times per request
(pick an endpoint, take a rate-limit token, ask the breaker, record the result), so
each must cost a few µs at most. Each is timed with ``timeit`` as the proxy calls it —
a bound method called with its arguments, best of ``--repeat`` runs of ``--number``
calls — on one core, in this process.

The **baseline**, measured in the same run, is the floor any decision pays in Python: a
dict lookup plus one ``random.random()`` through bound methods (``get(key); random()``).
The ratio column is each call's cost over that floor.

Cases: every load balancer with an empty exclude set and with one endpoint excluded
(what an ejection or a retry adds); ``stable_hash`` of a header value (what a ring-hash
hash policy adds per request); a token bucket that allows and one that refuses; the
circuit breaker's question and its start/finish pair; the retry budget and back-off;
the outlier detector's record of a success and of a failure, and ``ejected(now)``.

It prints a table and, last, one JSON line ``{"bench": "proxy_cores", ...}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import timeit
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

if __name__ == "__main__":
    # Run as a script, this file's directory is first on sys.path, where the end-to-end
    # benchmark bench/proxy.py would be found instead of the ``proxy`` package.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _here]

from proxy.balancer import (
    LeastRequestBalancer,
    RandomBalancer,
    RingHashBalancer,
    RoundRobinBalancer,
    stable_hash,
)
from proxy.resilience import (
    CircuitBreaker,
    OutlierDetector,
    RetryBudget,
    TokenBucket,
    backoff,
)

#: Seed of every RNG here (printed in the JSON line).
SEED: Final = 20250301


def cases(endpoints: int) -> tuple[dict[str, tuple[str, dict[str, Any]]], str]:
    """name -> (statement, namespace); and the baseline's name."""
    rng = random.Random(SEED)
    keys = [f"10.1.{i // 250}.{i % 250 + 1}:8080" for i in range(endpoints)]
    equal = [(key, 1) for key in keys]
    weighted = [(key, 1 + i % 4) for i, key in enumerate(keys)]
    active = {key: rng.randrange(8) for key in keys}
    one_out = frozenset({keys[0]})
    ring = RingHashBalancer(equal, random.Random(SEED))
    hash_key = stable_hash("user-4711")

    bucket = TokenBucket(rate_per_s=1e12, burst=1e12)  # always a token: the allow path
    empty_bucket = TokenBucket(rate_per_s=1e-9, burst=1)
    empty_bucket.try_take(0.0)  # now empty for ~30 years: the refusal path
    breaker = CircuitBreaker()
    budget = RetryBudget()
    detector: OutlierDetector[str] = OutlierDetector(keys)
    # Thresholds off: every 503 bumps both counts and never ejects (the costliest record).
    failing: OutlierDetector[str] = OutlierDetector(
        keys, consecutive_5xx=0, consecutive_gateway_failure=0
    )
    fail_key = keys[-1]

    names: dict[str, Any] = {
        "get": {key: 0 for key in keys}.get,
        "random": rng.random,
        "key": keys[len(keys) // 2],
        "one_out": one_out,
        "hash_key": hash_key,
        "header": "session-4711-af9c2e",
        "stable_hash": stable_hash,
        "rr": RoundRobinBalancer(weighted, random.Random(SEED)).pick,
        "rand": RandomBalancer(weighted, random.Random(SEED)).pick,
        "rand_equal": RandomBalancer(equal, random.Random(SEED)).pick,
        "p2c": LeastRequestBalancer(equal, random.Random(SEED), active).pick,
        "lr_weighted": LeastRequestBalancer(weighted, random.Random(SEED), active).pick,
        "ring": ring.pick,
        # The endpoint that owns hash_key: excluding it makes the pick walk the ring.
        "ring_out": frozenset({ring.pick(hash_key=hash_key)}),
        "try_take": bucket.try_take,
        "refuse": empty_bucket.try_take,
        "allow_request": breaker.allow_request,
        "started": breaker.request_started,
        "finished": breaker.request_finished,
        "can_retry": budget.can_retry,
        "backoff": backoff,
        "record": detector.record,
        "record_failing": failing.record,
        "fail_key": fail_key,
        "ejected": detector.ejected,
    }
    statements = {
        "baseline: dict lookup + random()": "get(key); random()",
        "round_robin pick (weighted)": "rr()",
        "round_robin pick, 1 excluded": "rr(one_out)",
        "random pick (weighted)": "rand()",
        "random pick (equal weights)": "rand_equal()",
        "random pick, 1 excluded": "rand(one_out)",
        "least_request pick (P2C)": "p2c()",
        "least_request pick (P2C), 1 excluded": "p2c(one_out)",
        "least_request pick (weighted EDF)": "lr_weighted()",
        "least_request pick (weighted), 1 excluded": "lr_weighted(one_out)",
        "ring_hash pick": "ring(hash_key=hash_key)",
        "ring_hash pick, its owner excluded": "ring(ring_out, hash_key)",
        "stable_hash(header value)": "stable_hash(header)",
        "TokenBucket.try_take (allowed)": "try_take(1.0)",
        "TokenBucket.try_take (refused)": "refuse(1.0)",
        "CircuitBreaker.allow_request": "allow_request()",
        "CircuitBreaker request_started+finished": "started(); finished()",
        "RetryBudget.can_retry": "can_retry()",
        "backoff()": "backoff(3, fraction=0.5)",
        "OutlierDetector.record (2xx)": "record(key, 200, 1.0)",
        "OutlierDetector.record (5xx)": "record_failing(fail_key, 503, 1.0)",
        "OutlierDetector.ejected(now)": "ejected(1.0)",
    }
    table = {name: (statement, names) for name, statement in statements.items()}
    return table, "baseline: dict lookup + random()"


def measure(endpoints: int, number: int, repeat: int) -> dict[str, Any]:
    table, baseline_name = cases(endpoints)
    results: dict[str, float] = {}
    # Interleave: every case once per round, so a disturbance hits all of them alike.
    best: dict[str, float] = {}
    for _ in range(repeat):
        for name, (statement, names) in table.items():
            seconds = timeit.Timer(statement, globals=names).timeit(number) / number
            best[name] = min(best.get(name, seconds), seconds)
    for name, seconds in best.items():
        results[name] = seconds * 1e6
    baseline = results[baseline_name]
    return {
        "baseline_us": baseline,
        "us": results,
        "vs_baseline": {name: us / baseline for name, us in results.items()},
    }


def print_table(summary: dict[str, Any]) -> None:
    print(
        f"\n## Proxy cores, per call (Python {platform.python_version()}, one core,"
        f" {summary['endpoints']} endpoints, best of {summary['repeat']} x"
        f" {summary['number']:,})"
    )
    width = max(len(name) for name in summary["us"])
    print(f"  {'call':<{width}}  {'µs/call':>8}  {'× baseline':>10}")
    for name, us in summary["us"].items():
        print(f"  {name:<{width}}  {us:>8.3f}  {summary['vs_baseline'][name]:>10.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=10, help="endpoints in the cluster")
    parser.add_argument("--number", type=int, default=100_000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=5, help="timings per case; best kept")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 x 2,000 calls")
    args = parser.parse_args(argv)
    if args.endpoints < 2:
        parser.error("--endpoints must be ≥ 2 (one is excluded in some cases)")
    number, repeat = (2_000, 2) if args.quick else (args.number, args.repeat)
    measured = measure(args.endpoints, number, repeat)
    summary = {
        "bench": "proxy_cores",
        "python": platform.python_version(),
        "seed": SEED,
        "endpoints": args.endpoints,
        "number": number,
        "repeat": repeat,
        **measured,
    }
    print_table(summary)
    rounded = {
        **summary,
        "baseline_us": round(summary["baseline_us"], 4),
        "us": {name: round(us, 4) for name, us in summary["us"].items()},
        "vs_baseline": {name: round(r, 2) for name, r in summary["vs_baseline"].items()},
    }
    print(json.dumps(rounded, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
