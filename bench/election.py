"""Leader failover time of the election (issue 4), measured in the gossip simulator.

Five servers on real gossip cores form a cluster and elect a leader; the leader
crashes at a random moment; the time until every live server names the same new
leader is one sample. One seed per sample:

    .venv/bin/python bench/election.py                 # 200 seeds, no loss
    .venv/bin/python bench/election.py --seeds 1000 --loss 0.05

Prints a table and a final JSON line
``{"bench": "election", "failover_p50_s": ..., "failover_p99_s": ..., "seeds": ...}``.
Time is virtual: the real-process target (failover p99 ≤ 3 s) also pays for event
loop and network latency, which this does not model beyond the simulator's links.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ca.election import ElectionConfig
from gossip.sim import percentile
from tests.ca.test_election_sim import FAILOVER_P99_TARGET_S, failover_samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=200, help="samples (one seed each)")
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--loss", type=float, default=0.0, help="datagram loss rate, 0..1")
    parser.add_argument("--election-timeout", type=float, default=ElectionConfig().election_timeout)
    args = parser.parse_args(argv)
    timeout = args.election_timeout
    config = ElectionConfig(election_timeout=timeout, heartbeat_interval=timeout / 4)
    started = time.monotonic()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    samples, problems = failover_samples(seeds, loss=args.loss, config=config)
    wall = time.monotonic() - started
    p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
    rows: list[tuple[str, Any]] = [
        ("servers", 5),
        ("seeds", args.seeds),
        ("loss", args.loss),
        ("election_timeout_s", timeout),
        ("failover_min_s", min(samples, default=None)),
        ("failover_p50_s", p50),
        ("failover_p90_s", percentile(samples, 0.9)),
        ("failover_p99_s", p99),
        ("failover_max_s", max(samples, default=None)),
        ("target_p99_s", FAILOVER_P99_TARGET_S),
        ("problems", len(problems)),
        ("wall_s", round(wall, 1)),
    ]
    for key, value in rows:
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<20} {shown:>10}")
    for problem in problems[:10]:
        print(problem, file=sys.stderr)
    print(
        json.dumps(
            {
                "bench": "election",
                "failover_p50_s": p50,
                "failover_p99_s": p99,
                "seeds": args.seeds,
                "loss": args.loss,
                "problems": len(problems),
            }
        )
    )
    ok = not problems and p99 is not None and p99 <= FAILOVER_P99_TARGET_S
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
