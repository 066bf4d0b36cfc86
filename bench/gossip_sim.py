"""The gossip targets of issue #2, measured in the simulator against the ``lan`` preset.

One command runs every target scenario for meshnode's ``default`` preset and for the
baseline ``lan`` preset (memberlist's LAN defaults) with the same seeds, in the same
run, and prints a table and a final JSON line:

    .venv/bin/python bench/gossip_sim.py            # full sizes (about 30 minutes)
    .venv/bin/python bench/gossip_sim.py --quick    # smaller, a few minutes

Time here is virtual, so the figures do not drift with the machine's load; only the
wall-clock column does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gossip.sim import Options, print_table, run


def plan(quick: bool) -> list[tuple[str, dict[str, Any], list[str], dict[str, tuple[str, float]]]]:
    """(label, options, presets, targets{key: (op, bound)})."""
    big = 300 if quick else 1000
    return [
        (
            f"crash N={big} loss 5%",
            dict(scenario="crash", nodes=big, loss=0.05, duration=120 if quick else 300),
            ["default", "lan"],
            {"detect_p50_s": ("<=", 6.0), "detect_p99_s": ("<=", 10.0)},
        ),
        (
            f"broadcast N={big} loss 10%",
            dict(scenario="broadcast", nodes=big, loss=0.10, updates=20 if quick else 50),
            ["default", "lan"],
            {"rounds_p99": ("<=", 9.0), "transmissions_per_member": ("<=", 8.0)},
        ),
        (
            "false-positives N=100 loss 10% slow 2%",
            dict(
                scenario="false-positives",
                nodes=100,
                loss=0.10,
                slow=0.02,
                duration=900 if quick else 3600,
            ),
            ["default", "swim", "lan"],
            {"false_dead": ("<=", 0)},
        ),
        (
            f"partition N={200 if quick else 1000} 60 s",
            dict(scenario="partition", nodes=200 if quick else 1000, duration=60),
            ["default", "lan"],
            {"heal_p99_s": ("<=", 30.0)},
        ),
        (
            f"idle N={big}",
            dict(scenario="idle", nodes=big, duration=120 if quick else 240),
            ["default", "lan"],
            {},
        ),
        (
            "rotation N=100",
            dict(scenario="rotation", nodes=100, duration=60),
            ["default"],
            {"dropped_packets": ("<=", 0)},
        ),
    ]


def check(value: Any, op: str, bound: float) -> bool:
    if value is None:
        return False
    return bool(value <= bound) if op == "<=" else bool(value >= bound)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller clusters and runs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", default="", help="run scenarios whose label contains this")
    args = parser.parse_args()
    summary: dict[str, Any] = {"bench": "gossip_sim", "quick": args.quick, "scenarios": {}}
    for label, kw, presets, targets in plan(args.quick):
        if args.only and args.only not in label:
            continue
        print(f"\n## {label}", flush=True)
        rows = []
        for name in presets:
            started = time.monotonic()
            result = run(Options(preset=name, seed=args.seed, **kw))
            result["wall_s"] = round(time.monotonic() - started, 1)
            rows.append(result)
            print(f"  {name}: done in {result['wall_s']} s", file=sys.stderr, flush=True)
        print_table(rows)
        by_preset = {row["preset"]: row for row in rows}
        entry: dict[str, Any] = {"results": by_preset, "targets": {}}
        for key, (op, bound) in targets.items():
            value = by_preset["default"].get(key)
            entry["targets"][key] = {
                "value": value,
                "bound": f"{op} {bound}",
                "met": check(value, op, bound),
                "lan": by_preset.get("lan", {}).get(key),
            }
        default_bw = by_preset["default"].get("bytes_per_member_s")
        lan_bw = by_preset.get("lan", {}).get("bytes_per_member_s")
        if default_bw and lan_bw:
            entry["bytes_ratio_vs_lan"] = round(default_bw / lan_bw, 3)
        if "swim" in by_preset:
            swim = by_preset["swim"]["suspicions_healthy"]
            ours = by_preset["default"]["suspicions_healthy"]
            entry["suspicions_swim_over_default"] = None if ours == 0 else round(swim / ours, 1)
            entry["suspicions"] = {"default": ours, "swim": swim}
        summary["scenarios"][label] = entry
        for key, target in entry["targets"].items():
            mark = "met" if target["met"] else "MISSED"
            print(
                f"  target {key} {target['bound']}: {target['value']} ({mark}; lan {target['lan']})"
            )
    print(json.dumps(summary, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
