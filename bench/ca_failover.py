"""CA failover with real server processes: kill -9 the leader, time the new leader and
the CA being usable again, restart the victim, repeat.

    .venv/bin/python bench/ca_failover.py              # 5 servers, 20 kills
    .venv/bin/python bench/ca_failover.py --quick      # 5 servers, 3 kills

Five ``meshnode agent --server --bootstrap-expect 5`` processes on loopback form a
cluster; once one leader is elected, every server serves the trust bundle and every
follower holds a replica of the CA state, each round:

1. finds the leader (all servers name the same one), picks a random survivor;
2. ``kill -9`` the leader; from that moment (``t0``), concurrently:

   * **leader**: polls the survivors' ``/v1/status/leader`` every ``POLL`` s until
     all of them name the same server, and not the dead one;
   * **leaf**: registers a *new* service on the chosen survivor and asks for its leaf
     (``GET /v1/agent/connect/ca/leaf/<name>``, which waits for a leader itself),
     again until it answers 200;
   * **policy**: ``PUT /v1/connect/intentions/exact`` at the same survivor until it
     answers 200 (the write goes through the new leader);

   "CA usable" is the later of the leaf and the policy write;
3. checks that the survivors still serve the same ``ActiveRootID`` and that the new
   leaf was signed by that root (failover must not mint a second CA);
4. restarts the victim on its old ports and ``data_dir`` and waits until it has caught
   up: all five servers name the same leader, every server sees five members alive,
   the victim lists every intention written so far and serves the same root.

It reports p50/p99/max of the failover and CA-usable times and of the catch-up after
the restart; baselines: the election's own failover time in the gossip simulator
(``bench/election.py``'s measurement, same 5 servers and ``ElectionConfig``, run here
in-process), the configured election timeout, and the 3 s target (ratios of the
measured p99 to each). The servers' logs are checked for two leaders in one term.
With 20 rounds the nearest-rank p99 is the maximum.

It prints a table and, last, one JSON line ``{"bench": "ca_failover", ...}``. Every
process it starts is killed and reaped on any exit (error, Ctrl-C, SIGTERM) and its
temporary directory removed. On a shared 2-core machine the figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp
from cryptography import x509

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.ca (the baseline)

from bench.common import percentile, poll_until, run_benchmark
from ca.election import ElectionConfig
from meshnode.procs import AgentProcess, fetch_json, kill_agents, start_agent, wait_agent_ready
from tests.ca.test_election_sim import failover_samples

#: Target: a new leader within 3 s of the old one's death (p99).
TARGET_P99_S: Final = 3.0
#: Poll period of the survivors' leader view; it bounds the timing resolution.
POLL: Final = 0.05
#: Simulated failovers for the baseline (one seed each; ~2 s of CPU).
SIMULATED_SEEDS: Final = 200
#: Bounds on every wait, so a broken cluster fails the bench instead of hanging it.
START_WITHIN: Final = 60.0
FORM_WITHIN: Final = 90.0
FAILOVER_WITHIN: Final = 60.0
CATCH_UP_WITHIN: Final = 60.0
#: A leaf request may wait for a leader (the agent's LEADER_WAIT is 10 s).
REQUEST_TIMEOUT: Final = 20.0
#: Pause between rounds: a few heartbeats with all five servers up.
SETTLE: Final = 1.0
DESTINATION: Final = "d"


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50_s": round(percentile(values, 0.5), 3),
        "p99_s": round(percentile(values, 0.99), 3),
        "max_s": round(max(values, default=math.nan), 3),
    }


class Cluster:
    """The servers, the HTTP session and every process started (for cleanup)."""

    def __init__(self, workdir: Path, size: int, session: aiohttp.ClientSession) -> None:
        self.servers = [AgentProcess.create(f"server-{i}", workdir) for i in range(size)]
        self.session = session
        self.processes: list[asyncio.subprocess.Process] = []
        self.server_args = ["--server", "--bootstrap-expect", str(size)]

    async def start(self, agent: AgentProcess, join: Sequence[str]) -> None:
        await start_agent(agent, join, self.server_args)
        assert agent.process is not None
        self.processes.append(agent.process)
        await wait_agent_ready(agent, self.session, START_WITHIN)

    def running(self) -> list[AgentProcess]:
        return [s for s in self.servers if s.running]

    async def leaders(self, agents: Sequence[AgentProcess]) -> list[str | None]:
        replies = await asyncio.gather(
            *(fetch_json(self.session, a.http_url + "/v1/status/leader") for a in agents)
        )
        return [r if isinstance(r, str) and r else None for r in replies]

    async def agreed_leader(self, agents: Sequence[AgentProcess]) -> str | None:
        """The leader every one of ``agents`` names, or None."""
        views = set(await self.leaders(agents))
        return views.pop() if len(views) == 1 else None

    def by_address(self, address: str) -> AgentProcess:
        return next(s for s in self.servers if s.gossip_addr == address)

    async def metrics(self, agent: AgentProcess) -> dict[str, float]:
        """The agent's Prometheus samples, ``name{labels}`` → value."""
        url = agent.http_url + "/v1/agent/metrics?format=prometheus"
        async with self.session.get(url) as reply:
            text = await reply.text()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    async def active_root(self, agent: AgentProcess) -> tuple[str, str] | None:
        """(ActiveRootID, its PEM) as ``agent`` serves them."""
        roots = await fetch_json(self.session, agent.http_url + "/v1/agent/connect/ca/roots")
        if not isinstance(roots, dict):
            return None
        active = str(roots.get("ActiveRootID", ""))
        pem = next((r["RootCert"] for r in roots.get("Roots", []) if r.get("ID") == active), "")
        return active, str(pem)

    async def alive_members(self, agent: AgentProcess) -> set[str]:
        view = await fetch_json(self.session, agent.http_url + "/v1/agent/members")
        if not isinstance(view, list):
            return set()
        return {str(e["Name"]) for e in view if e.get("Status") == 1 and "State" not in e}

    async def intentions(self, agent: AgentProcess) -> set[str]:
        listed = await fetch_json(self.session, agent.http_url + "/v1/connect/intentions")
        if not isinstance(listed, list):
            return set()
        return {str(i.get("SourceName")) for i in listed}


async def form(cluster: Cluster) -> tuple[str, str]:
    """Start the servers and wait for one leader, the bundle everywhere and a CA state
    replica on every follower; returns the active root (ID, PEM)."""
    first, *others = cluster.servers
    await cluster.start(first, [])
    await asyncio.gather(*(cluster.start(s, [first.gossip_addr]) for s in others))
    names = {s.name for s in cluster.servers}
    root: list[tuple[str, str]] = []

    async def formed() -> bool:
        leader = await cluster.agreed_leader(cluster.servers)
        if leader is None:
            return False
        roots = {await cluster.active_root(s) for s in cluster.servers}
        active = roots.pop() if len(roots) == 1 else None
        if active is None:
            return False
        for server in cluster.servers:
            if await cluster.alive_members(server) != names:
                return False
            if server.gossip_addr != leader:
                metrics = await cluster.metrics(server)
                replicated = 'meshnode_ca_operations_total{operation="state_replicated"}'
                if metrics.get(replicated, 0) < 1:
                    return False
        root[:] = [active]
        return True

    took = await poll_until(formed, FORM_WITHIN, "leader, bundle and CA replicas", every=POLL)
    print(f"  {len(cluster.servers)} servers formed in {took:.1f} s after start", flush=True)
    return root[0]


async def until_ok(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: object,
    t0: float,
    last: list[str] | None = None,
) -> tuple[float, Any, int]:
    """Repeat the request until it answers 200: (seconds from ``t0``, JSON, tries).
    ``last`` gets the latest refusal, for the report when it never succeeds."""
    tries = 0
    while True:
        tries += 1
        try:
            async with session.request(
                method, url, json=body, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
            ) as reply:
                text = await reply.text()
                if reply.status == 200:
                    return time.monotonic() - t0, json.loads(text) if text else None, tries
                refusal = f"{reply.status} {text[:200]}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            refusal = f"{type(exc).__name__} {exc}"
        if last is not None:
            last[:] = [f"try {tries} at {time.monotonic() - t0:.1f} s: {refusal}"]
        await asyncio.sleep(POLL)


def signed_by(leaf_pem: str, root_pem: str) -> bool:
    """Was the leaf issued directly by this root (signature and issuer name)?"""
    try:
        leaf = x509.load_pem_x509_certificate(leaf_pem.encode())
        root = x509.load_pem_x509_certificate(root_pem.encode())
        leaf.verify_directly_issued_by(root)
    except (ValueError, TypeError, x509.InvalidSignature):
        return False
    return True


async def one_round(
    cluster: Cluster, number: int, root: tuple[str, str], rng: random.Random, written: set[str]
) -> dict[str, Any]:
    session = cluster.session
    leader_address = await cluster.agreed_leader(cluster.servers)
    if leader_address is None:
        raise RuntimeError("no agreed leader at the start of a round")
    victim = cluster.by_address(leader_address)
    survivors = [s for s in cluster.servers if s is not victim]
    chosen = rng.choice(survivors)
    service = f"failover-{number:03d}"
    source = f"failover-{number:03d}"

    victim.kill()
    t0 = time.monotonic()
    assert victim.process is not None
    await victim.process.wait()

    last: dict[str, list[str]] = {"leader": [], "leaf": [], "policy": []}

    async def new_leader() -> tuple[float, str]:
        while True:
            views = await cluster.leaders(survivors)
            agreed = set(views)
            if len(agreed) == 1 and None not in agreed and leader_address not in agreed:
                return time.monotonic() - t0, str(views[0])
            last["leader"][:] = [f"at {time.monotonic() - t0:.1f} s: {views}"]
            await asyncio.sleep(POLL)

    async def leaf() -> tuple[float, Any, int]:
        registration = {"Name": service, "ID": service, "Port": 20000 + number}
        url = chosen.http_url + "/v1/agent/service/register"
        await until_ok(session, "PUT", url, registration, t0, last["leaf"])
        url = f"{chosen.http_url}/v1/agent/connect/ca/leaf/{service}"
        return await until_ok(session, "GET", url, None, t0, last["leaf"])

    async def policy() -> tuple[float, Any, int]:
        url = (
            f"{chosen.http_url}/v1/connect/intentions/exact"
            f"?source={source}&destination={DESTINATION}"
        )
        return await until_ok(session, "PUT", url, {"Action": "allow"}, t0, last["policy"])

    tasks = {
        "leader": asyncio.create_task(new_leader()),
        "leaf": asyncio.create_task(leaf()),
        "policy": asyncio.create_task(policy()),
    }
    try:
        _, pending = await asyncio.wait(tasks.values(), timeout=FAILOVER_WITHIN)
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    if pending:
        stuck = {name: last[name] for name, task in tasks.items() if task in pending}
        raise TimeoutError(
            f"round {number}: not back within {FAILOVER_WITHIN:.0f} s after killing"
            f" {victim.name} (asking {chosen.name}): {stuck}"
        )
    leader_s, new_address = tasks["leader"].result()
    leaf_s, leaf_json, leaf_tries = tasks["leaf"].result()
    policy_s, _, policy_tries = tasks["policy"].result()
    written.add(source)
    roots_after = {await cluster.active_root(s) for s in survivors}
    same_root = roots_after == {root}
    leaf_pem = str(leaf_json.get("CertPEM", "")) if isinstance(leaf_json, dict) else ""
    leaf_ok = signed_by(leaf_pem, root[1])

    # Restart the victim on its data_dir and wait until it has caught up.
    restart_t0 = time.monotonic()
    await cluster.start(victim, [chosen.gossip_addr])
    names = {s.name for s in cluster.servers}

    async def caught_up() -> bool:
        if await cluster.agreed_leader(cluster.servers) is None:
            return False
        if await cluster.active_root(victim) != root:
            return False
        if not written <= await cluster.intentions(victim):
            return False
        views = await asyncio.gather(*(cluster.alive_members(s) for s in cluster.servers))
        return all(view == names for view in views)

    catch_up_s = await poll_until(
        caught_up, CATCH_UP_WITHIN, f"{victim.name} caught up", every=POLL
    )
    restart_s = time.monotonic() - restart_t0
    new_name = cluster.by_address(new_address).name
    print(
        f"  {number + 1:>3}: killed {victim.name}; {new_name} leads after {leader_s:.2f} s;"
        f" leaf {leaf_s:.2f} s ({leaf_tries} tries), policy {policy_s:.2f} s"
        f" ({policy_tries}); root {'same' if same_root else 'CHANGED'}"
        f"{'' if leaf_ok else ', leaf NOT signed by the root'};"
        f" back and caught up {restart_s:.1f} s",
        flush=True,
    )
    return {
        "leader_s": leader_s,
        "leaf_s": leaf_s,
        "policy_s": policy_s,
        "ca_usable_s": max(leaf_s, policy_s),
        "leaf_tries": leaf_tries,
        "policy_tries": policy_tries,
        "same_root": same_root,
        "leaf_signed_by_root": leaf_ok,
        "restart_caught_up_s": restart_s,
        "catch_up_after_ready_s": catch_up_s,
    }


def leaders_per_term(servers: Sequence[AgentProcess]) -> Counter[int]:
    """How many servers logged winning each term (``leader_elected`` with ``us``)."""
    terms: Counter[int] = Counter()
    for server in servers:
        if not server.log_path.exists():
            continue
        for line in server.log_path.read_text(errors="replace").splitlines():
            if '"leader_elected"' not in line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("us") is True:
                terms[int(entry["term"])] += 1
    return terms


def simulated_baseline(seeds: int) -> dict[str, float]:
    """The election's failover in the gossip simulator (bench/election.py), 5 servers."""
    started = time.monotonic()
    samples, problems = failover_samples(range(1, seeds + 1), config=ElectionConfig())
    return {
        "p50_s": round(percentile(samples, 0.5), 3),
        "p99_s": round(percentile(samples, 0.99), 3),
        "max_s": round(max(samples, default=math.nan), 3),
        "seeds": seeds,
        "problems": len(problems),
        "wall_s": round(time.monotonic() - started, 1),
    }


async def run(options: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rng = random.Random(options.seed)
    rounds: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=10, sock_connect=3)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        cluster = Cluster(workdir, options.servers, session)
        try:
            print(f"cluster of {options.servers} servers:", flush=True)
            root = await form(cluster)
            print(f"  active root {root[0][:23]}…; {options.kills} kills:", flush=True)
            written: set[str] = set()
            for number in range(options.kills):
                await asyncio.sleep(SETTLE)
                rounds.append(await one_round(cluster, number, root, rng, written))
        except BaseException:
            for server in cluster.servers:
                process = server.process
                if process is not None and process.returncode not in (None, -9):
                    print(f"--- {server.name} log tail:\n{server.log_tail()}", file=sys.stderr)
            raise
        finally:
            await kill_agents(cluster.processes)
    terms = leaders_per_term(cluster.servers)
    print(f"simulated baseline, {options.simulated_seeds} seeds…", flush=True)
    simulated = simulated_baseline(options.simulated_seeds)
    election_timeout = ElectionConfig().election_timeout
    results: dict[str, Any] = {
        "bench": "ca_failover",
        "servers": options.servers,
        "kills": len(rounds),
        "seed": options.seed,
    }
    for key in ("leader_s", "leaf_s", "policy_s", "ca_usable_s", "restart_caught_up_s"):
        results[key.removesuffix("_s")] = summary([r[key] for r in rounds])
    leader_p99 = results["leader"]["p99_s"]
    usable_p99 = results["ca_usable"]["p99_s"]
    results |= {
        "leaf_tries_max": max(r["leaf_tries"] for r in rounds),
        "policy_tries_max": max(r["policy_tries"] for r in rounds),
        "root_changed_rounds": sum(1 for r in rounds if not r["same_root"]),
        "leaf_not_signed_by_root_rounds": sum(1 for r in rounds if not r["leaf_signed_by_root"]),
        "terms_with_two_leaders": sum(1 for count in terms.values() if count > 1),
        "terms_won": len(terms),
        "simulated": simulated,
        "election_timeout_s": election_timeout,
        "target_p99_s": TARGET_P99_S,
        "ratio_leader_p99_to_target": round(leader_p99 / TARGET_P99_S, 3),
        "ratio_ca_usable_p99_to_target": round(usable_p99 / TARGET_P99_S, 3),
        "ratio_leader_p99_to_simulated_p99": round(leader_p99 / simulated["p99_s"], 3),
        "ratio_leader_p50_to_simulated_p50": round(
            results["leader"]["p50_s"] / simulated["p50_s"], 3
        ),
        "ratio_leader_p99_to_election_timeout": round(leader_p99 / election_timeout, 3),
        "target_met": leader_p99 <= TARGET_P99_S,
    }
    return results


def print_table(results: dict[str, Any]) -> None:
    print()
    print(f"{'seconds after kill -9 of the leader':<46}{'p50':>8}{'p99':>8}{'max':>8}")
    rows = [
        ("leader", "new leader named by every survivor"),
        ("leaf", "leaf for a new service issued (200)"),
        ("policy", "intention write accepted (200)"),
        ("ca_usable", "CA usable (leaf and policy write)"),
        ("restart_caught_up", "victim restarted and caught up"),
    ]
    for key, label in rows:
        figures = results[key]
        print(
            f"{label:<46}{figures['p50_s']:>8.3f}{figures['p99_s']:>8.3f}{figures['max_s']:>8.3f}"
        )
    simulated = results["simulated"]
    print(
        f"{'baseline: election in the simulator':<46}{simulated['p50_s']:>8.3f}"
        f"{simulated['p99_s']:>8.3f}{simulated['max_s']:>8.3f}"
    )
    print(
        f"ratios: leader p99 / target {results['ratio_leader_p99_to_target']},"
        f" / simulated p99 {results['ratio_leader_p99_to_simulated_p99']},"
        f" / election timeout {results['ratio_leader_p99_to_election_timeout']};"
        f" leader p50 / simulated p50 {results['ratio_leader_p50_to_simulated_p50']};"
        f" CA usable p99 / target {results['ratio_ca_usable_p99_to_target']}"
    )
    print(
        f"checks: root changed in {results['root_changed_rounds']} rounds, leaf not signed by"
        f" the root in {results['leaf_not_signed_by_root_rounds']}, terms with two leaders"
        f" {results['terms_with_two_leaders']} (of {results['terms_won']} won);"
        f" most tries: leaf {results['leaf_tries_max']}, policy {results['policy_tries_max']}"
    )
    verdict = "met" if results["target_met"] else "MISSED"
    print(
        f"target (new leader p99 ≤ {results['target_p99_s']:g} s): {verdict};"
        f" {results['kills']} kills of {results['servers']} servers"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--kills", type=int, default=None, help="rounds (20)")
    parser.add_argument("--servers", type=int, default=5, help="servers (5)")
    parser.add_argument("--quick", action="store_true", help="3 kills, a shorter baseline")
    parser.add_argument("--seed", type=int, default=1, help="picks the surviving agent used")
    parser.add_argument("--simulated-seeds", type=int, default=None, help=f"({SIMULATED_SEEDS})")
    options = parser.parse_args(argv)
    options.kills = options.kills or (3 if options.quick else 20)
    options.simulated_seeds = options.simulated_seeds or (20 if options.quick else SIMULATED_SEEDS)
    if not 3 <= options.servers <= 7:
        parser.error("--servers must be between 3 and 7")
    if not 1 <= options.kills <= 200:
        parser.error("--kills must be between 1 and 200")

    return run_benchmark("ca_failover", lambda workdir: run(options, workdir), print_table)


if __name__ == "__main__":
    sys.exit(main())
