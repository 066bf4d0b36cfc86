"""Live gossip benchmark: N real member processes on loopback, ``default`` vs ``lan``.

    .venv/bin/python bench/gossip_live.py --nodes 50

For each preset it measures, through every member's own HTTP API:

* join convergence: from the moment N-1 members are told to join one seed
  (``PUT /v1/agent/join``, all at once, after every process is up so that Python start-up
  time is not counted) until every member's ``/v1/agent/members`` shows N alive;
* detection: from ``kill -9`` of one member until every other member reports it failed;
* bytes per member per second sent (UDP + TCP, from each member's own statistics) over
  an idle window after convergence.

It prints a table and, last, one JSON line. Every process it starts is killed and
reaped on any exit. Targets for ``default``: join ≤ 3 s, detection ≤ 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from meshnode.procs import MemberProcess, fetch_json, kill_all, spawn_member, wait_ready

#: Polling period of the members' APIs; it bounds the timing resolution.
POLL = 0.1


async def poll_until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    """Seconds until ``check`` holds (polled every POLL); raises after ``within``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            raise TimeoutError(f"{what}: not within {within:.0f} s")
        await asyncio.sleep(POLL)
    return time.monotonic() - started


async def members_of(session: aiohttp.ClientSession, member: MemberProcess) -> list[Any] | None:
    reply = await fetch_json(session, member.http_url + "/v1/agent/members")
    return reply if isinstance(reply, list) else None


async def sent_bytes(session: aiohttp.ClientSession, members: list[MemberProcess]) -> list[int]:
    replies = await asyncio.gather(
        *(fetch_json(session, m.http_url + "/v1/mesh/gossip") for m in members)
    )
    totals = []
    for member, reply in zip(members, replies, strict=True):
        if not isinstance(reply, dict):
            raise RuntimeError(f"{member.name} did not report its statistics")
        stats = reply["Stats"]
        totals.append(int(stats["bytes_sent"]) + int(stats["stream_bytes_sent"]))
    return totals


async def run_preset(
    preset: str, nodes: int, idle: float, workdir: Path, started: list[MemberProcess]
) -> dict[str, float]:
    print(f"[{preset}] starting {nodes} member processes…", flush=True)
    names = [f"{preset}-{i:03d}" for i in range(nodes)]
    processes = [await spawn_member(n, workdir, preset=preset) for n in names]
    started.extend(processes)
    await asyncio.gather(*(wait_ready(p, 120) for p in processes))
    seed = processes[0]
    seed_address = f"127.0.0.1:{seed.gossip_port}"
    connector = aiohttp.TCPConnector(limit=nodes + 10)
    timeout = aiohttp.ClientTimeout(total=10, sock_connect=2)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def join(member: MemberProcess) -> None:
            async with session.put(f"{member.http_url}/v1/agent/join/{seed_address}") as reply:
                if reply.status != 200:
                    raise RuntimeError(f"{member.name}: join failed: {await reply.text()}")

        async def converged() -> bool:
            views = await asyncio.gather(*(members_of(session, p) for p in processes))
            return all(
                view is not None
                and sum(1 for e in view if e["Status"] == 1 and "State" not in e) == nodes
                for view in views
            )

        print(f"[{preset}] all up; joining {nodes - 1} members to {seed_address}", flush=True)
        t0 = time.monotonic()
        await asyncio.gather(*(join(p) for p in processes[1:]))
        join_seconds = time.monotonic() - t0 + await poll_until(converged, 60, "join convergence")
        print(f"[{preset}] converged in {join_seconds:.2f} s", flush=True)

        await asyncio.sleep(2)  # let the join broadcasts drain from the queues
        before = await sent_bytes(session, processes)
        t1 = time.monotonic()
        await asyncio.sleep(idle)
        after = await sent_bytes(session, processes)
        window = time.monotonic() - t1
        per_member = [(b - a) / window for a, b in zip(before, after, strict=True)]
        bytes_per_second = sum(per_member) / len(per_member)
        print(f"[{preset}] idle traffic {bytes_per_second:.0f} B/s per member", flush=True)

        victim = random.choice(processes[1:])
        observers = [p for p in processes if p is not victim]
        victim.kill()
        t2 = time.monotonic()
        await victim.process.wait()

        async def detected() -> bool:
            views = await asyncio.gather(*(members_of(session, p) for p in observers))
            return all(
                view is not None
                and any(e["Name"] == victim.name and e["Status"] == 4 for e in view)
                for view in views
            )

        detect_seconds = time.monotonic() - t2 + await poll_until(detected, 120, "detection")
        print(f"[{preset}] {victim.name} seen failed by all in {detect_seconds:.2f} s", flush=True)
    await kill_all(processes)
    return {
        "join_s": round(join_seconds, 3),
        "detect_s": round(detect_seconds, 3),
        "bytes_per_member_s": round(bytes_per_second, 1),
        "bytes_per_member_s_max": round(max(per_member), 1),
    }


async def main_async(nodes: int, idle: float, presets: list[str]) -> dict[str, Any]:
    started: list[MemberProcess] = []
    results: dict[str, Any] = {"bench": "gossip_live", "nodes": nodes}
    with tempfile.TemporaryDirectory(prefix="gossip-live-") as workdir:
        try:
            for preset in presets:
                results[preset] = await run_preset(preset, nodes, idle, Path(workdir), started)
        finally:
            await kill_all(started)  # whatever happened, no member outlives the bench
    return results


def print_table(results: dict[str, Any], presets: list[str]) -> None:
    rows = [
        ("join convergence (s)", "join_s"),
        ("failure detection (s)", "detect_s"),
        ("sent bytes/member/s (mean)", "bytes_per_member_s"),
        ("sent bytes/member/s (max)", "bytes_per_member_s_max"),
    ]
    print()
    print(f"{'nodes = ' + str(results['nodes']):<30}" + "".join(f"{p:>12}" for p in presets))
    for label, key in rows:
        print(f"{label:<30}" + "".join(f"{results[p][key]:>12}" for p in presets))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--idle", type=float, default=10.0, help="traffic window (s)")
    parser.add_argument("--baseline", default="lan", help="preset to compare against")
    args = parser.parse_args(argv)
    if args.nodes < 3:
        parser.error("--nodes must be at least 3")
    presets = ["default", args.baseline]
    try:
        results = asyncio.run(main_async(args.nodes, args.idle, presets))
    except (TimeoutError, RuntimeError) as exc:
        print(f"gossip_live: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    base, ours = results[args.baseline], results["default"]
    results["ratio"] = {
        key: round(ours[key] / base[key], 3) if base[key] else None
        for key in ("join_s", "detect_s", "bytes_per_member_s")
    }
    print_table(results, presets)
    targets_met = ours["join_s"] <= 3.0 and ours["detect_s"] <= 10.0
    print(f"targets (default join ≤ 3 s, detection ≤ 10 s): {'met' if targets_met else 'MISSED'}")
    print(json.dumps(results, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
