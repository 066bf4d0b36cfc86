"""Leaf issuing end to end: how fast the CA leader's certificates reach the services
registered on real agents, against ``sign_csr`` in-process in the same run.

    .venv/bin/python bench/ca_issue.py                 # 200 services per phase
    .venv/bin/python bench/ca_issue.py --quick         # 20 services per phase

One server (``--server --bootstrap-expect 1``, the CA leader) and two client agents on
loopback. Once the leader serves the trust bundle and each agent holds its own leaf:

* **proactive**: N services are registered on the clients at once (half on each,
  concurrent ``PUT /v1/agent/service/register``); each agent's leaf manager notices
  and requests the leaves by itself (key and CSR made on the agent, signed by the
  leader after it checked the service is registered on that node). Done when every
  client's ``meshnode_ca_leaves`` gauge counts its services plus its own identity
  (polled every ``POLL`` s); then every leaf is read back with
  ``GET /v1/agent/connect/ca/leaf/<name>`` (must answer 200 from the agent's copy, no
  new signature);
* **on demand**: N more services, each registered and then asked for at once with
  ``GET /v1/agent/connect/ca/leaf/<name>`` (at most ``--concurrency`` requests in
  flight), retried until 200: the path a proxy starting next to a new service takes.

Each phase reports certificates per second end to end (N over the time from the
first registration until the last leaf), the leader's ``signed``/``refused``
counters, the agents' failed requests and leaves replaced right after being issued
(``renewed``: a second signature for the same service). Sampling the leader every
``POLL`` s splits the time in two: when the leader's catalog lists every new service
(it signs only for services registered on the requesting node) and the leader's
signing rate between 10 % and 90 % of the signatures. Baseline: ``CertificateAuthority.sign_csr``
in this process on ``--csrs`` CSRs (best of 3 rounds, as ``bench/ca_sign.py``
measures it): the ratio end-to-end / in-process is the share of the leader's raw
signing rate that the whole path (HTTP, CSR, gossip RPC, catalog check, executor,
answer, verification, disk) delivers.

It prints a table and, last, one JSON line ``{"bench": "ca_issue", ...}``. Every
process it starts is killed and reaped on any exit (error, Ctrl-C, SIGTERM) and its
temporary directory removed. On a shared 2-core machine the figures are noisy; the
agents and this process share the two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.ca_sign

from bench.ca_sign import measure_signing
from bench.common import poll_until, run_benchmark
from meshnode.procs import AgentProcess, fetch_json, kill_agents, start_agent, wait_agent_ready

#: Poll period of the agents' metrics; it bounds the timing resolution.
POLL: Final = 0.1
#: Bounds on every wait, so a broken cluster fails the bench instead of hanging it.
START_WITHIN: Final = 60.0
FORM_WITHIN: Final = 60.0
ISSUE_WITHIN: Final = 180.0
#: Registrations sent at once (the PUTs themselves, not the leaves).
REGISTER_CONCURRENCY: Final = 64
SIGNED: Final = 'meshnode_ca_operations_total{operation="signed"}'
REFUSED: Final = 'meshnode_ca_operations_total{operation="refused"}'
LEAVES: Final = "meshnode_ca_leaves"
FAILED: Final = 'meshnode_ca_leaf_requests_total{outcome="failed"}'
RENEWED: Final = 'meshnode_ca_leaf_requests_total{outcome="renewed"}'
CATALOG_SERVICES: Final = "meshnode_catalog_services"


async def metrics(session: aiohttp.ClientSession, agent: AgentProcess) -> dict[str, float]:
    """The agent's Prometheus samples, ``name{labels}`` → value."""
    url = agent.http_url + "/v1/agent/metrics?format=prometheus"
    async with session.get(url) as reply:
        if reply.status != 200:
            raise RuntimeError(f"GET {url}: {reply.status}")
        text = await reply.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def register(session: aiohttp.ClientSession, agent: AgentProcess, service: str) -> None:
    body = {"Name": service, "ID": service, "Port": 8080}
    async with session.put(agent.http_url + "/v1/agent/service/register", json=body) as reply:
        if reply.status != 200:
            raise RuntimeError(f"register {service} at {agent.name}: {reply.status}")
        await reply.read()


async def get_leaf(
    session: aiohttp.ClientSession, agent: AgentProcess, service: str
) -> tuple[int, Any]:
    url = f"{agent.http_url}/v1/agent/connect/ca/leaf/{service}"
    async with session.get(url) as reply:
        text = await reply.text()
        return reply.status, json.loads(text) if reply.status == 200 else text


def placement(
    clients: Sequence[AgentProcess], prefix: str, count: int
) -> list[tuple[AgentProcess, str]]:
    """Services ``prefix-000``... spread round-robin over the clients."""
    return [(clients[i % len(clients)], f"{prefix}-{i:04d}") for i in range(count)]


async def counters(
    session: aiohttp.ClientSession, server: AgentProcess, clients: Sequence[AgentProcess]
) -> dict[str, float]:
    """The leader's and the clients' figures that a phase watches, summed over clients."""
    leader, *views = await asyncio.gather(
        metrics(session, server), *(metrics(session, c) for c in clients)
    )
    return {
        "signed": leader.get(SIGNED, 0.0),
        "refused": leader.get(REFUSED, 0.0),
        "leader_catalog_services": leader.get(CATALOG_SERVICES, 0.0),
        "failed": sum(v.get(FAILED, 0.0) for v in views),
        "renewed": sum(v.get(RENEWED, 0.0) for v in views),
        "leaves": sum(v.get(LEAVES, 0.0) for v in views),
    }


class Sampler:
    """Samples ``counters`` every POLL while a phase runs, to split its time into the
    catalog reaching the leader and the leader signing."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        server: AgentProcess,
        clients: Sequence[AgentProcess],
        before: dict[str, float],
    ) -> None:
        self._args = (session, server, clients)
        self.before = before
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.t0 = time.monotonic()

    async def run(self) -> None:
        while True:
            values = await counters(*self._args)
            self.samples.append((time.monotonic() - self.t0, values))
            await asyncio.sleep(POLL)

    def first(self, key: str, at_least: float) -> float | None:
        """Seconds until ``key`` first rose by ``at_least`` (None if it never did)."""
        base = self.before[key]
        return next((t for t, v in self.samples if v[key] - base >= at_least), None)

    def figures(self, count: int) -> dict[str, float | None]:
        catalog = self.first("leader_catalog_services", count)
        low, high = self.first("signed", 0.1 * count), self.first("signed", 0.9 * count)
        rate = None
        if low is not None and high is not None and high > low and count >= 10:
            rate = round(0.8 * count / (high - low), 1)
        return {
            "leader_catalog_complete_s": round(catalog, 2) if catalog is not None else None,
            "signed_10pct_s": round(low, 2) if low is not None else None,
            "signed_90pct_s": round(high, 2) if high is not None else None,
            "signing_rate_10_90_per_s": rate,
        }


async def form(
    session: aiohttp.ClientSession,
    server: AgentProcess,
    clients: Sequence[AgentProcess],
    processes: list[asyncio.subprocess.Process],
) -> float:
    started = time.monotonic()
    await start_agent(server, [], ["--server", "--bootstrap-expect", "1"])
    assert server.process is not None
    processes.append(server.process)
    await wait_agent_ready(server, session, START_WITHIN)
    for client in clients:
        await start_agent(client, [server.gossip_addr])
        assert client.process is not None
        processes.append(client.process)
    await asyncio.gather(*(wait_agent_ready(c, session, START_WITHIN) for c in clients))
    everyone = [server, *clients]

    async def formed() -> bool:
        leaders = await asyncio.gather(
            *(fetch_json(session, a.http_url + "/v1/status/leader") for a in everyone)
        )
        if leaders != [server.gossip_addr] * len(everyone):
            return False
        views = await asyncio.gather(*(metrics(session, a) for a in everyone))
        return all(view.get(LEAVES, 0.0) >= 1 for view in views)  # each agent's own leaf

    await poll_until(formed, FORM_WITHIN, "leader and every agent's own leaf", every=POLL)
    took = time.monotonic() - started
    print(f"  1 server + {len(clients)} clients formed in {took:.1f} s", flush=True)
    return took


async def proactive_phase(
    session: aiohttp.ClientSession,
    server: AgentProcess,
    clients: Sequence[AgentProcess],
    count: int,
) -> dict[str, Any]:
    services = placement(clients, "pro", count)
    before = await counters(session, server, clients)
    limit = asyncio.Semaphore(REGISTER_CONCURRENCY)

    async def register_one(agent: AgentProcess, service: str) -> None:
        async with limit:
            await register(session, agent, service)

    sampler = Sampler(session, server, clients, before)
    sampling = asyncio.create_task(sampler.run())
    try:
        t0 = sampler.t0
        await asyncio.gather(*(register_one(a, s) for a, s in services))
        registered = time.monotonic() - t0
        target = before["leaves"] + count

        async def all_issued() -> bool:
            views = await asyncio.gather(*(metrics(session, c) for c in clients))
            return sum(v.get(LEAVES, 0.0) for v in views) >= target

        await poll_until(all_issued, ISSUE_WITHIN, f"{count} leaves issued proactively", every=POLL)
        issued = time.monotonic() - t0
    finally:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
    after = await counters(session, server, clients)
    sampler.samples.append((time.monotonic() - sampler.t0, after))

    # Every leaf is there: read each back (from the agent's copy, no new signature).
    read_limit = asyncio.Semaphore(16)
    bad: list[str] = []

    async def read_one(agent: AgentProcess, service: str) -> None:
        async with read_limit:
            status, body = await get_leaf(session, agent, service)
        if status != 200 or body.get("Service") != service:
            bad.append(f"{service}: {status}")

    await asyncio.gather(*(read_one(a, s) for a, s in services))
    checked = await counters(session, server, clients)
    return {
        "services": count,
        "registered_s": round(registered, 3),
        "all_issued_s": round(issued, 3),
        "certs_per_s": round(count / issued, 1),
        "signed": int(after["signed"] - before["signed"]),
        "refused": int(after["refused"] - before["refused"]),
        "agent_failed_requests": int(after["failed"] - before["failed"]),
        "replaced_at_once": int(after["renewed"] - before["renewed"]),
        **sampler.figures(count),
        "read_back_not_ok": len(bad),
        "signed_during_read_back": int(checked["signed"] - after["signed"]),
        "bad_examples": bad[:5],
    }


async def on_demand_phase(
    session: aiohttp.ClientSession,
    server: AgentProcess,
    clients: Sequence[AgentProcess],
    count: int,
    concurrency: int,
) -> dict[str, Any]:
    services = placement(clients, "od", count)
    before = await counters(session, server, clients)
    limit = asyncio.Semaphore(concurrency)
    refusals: dict[str, int] = {}
    latencies: list[float] = []

    async def one(agent: AgentProcess, service: str) -> None:
        async with limit:
            started = time.monotonic()
            await register(session, agent, service)
            while True:
                status, body = await get_leaf(session, agent, service)
                if status == 200:
                    latencies.append(time.monotonic() - started)
                    return
                key = f"{status} {str(body)[:60]}"
                refusals[key] = refusals.get(key, 0) + 1
                if time.monotonic() - started > ISSUE_WITHIN:
                    raise TimeoutError(f"leaf for {service}: still {key}")
                await asyncio.sleep(POLL)

    sampler = Sampler(session, server, clients, before)
    sampling = asyncio.create_task(sampler.run())
    try:
        t0 = sampler.t0
        await asyncio.gather(*(one(a, s) for a, s in services))
        issued = time.monotonic() - t0
    finally:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
    after = await counters(session, server, clients)
    sampler.samples.append((time.monotonic() - sampler.t0, after))
    latencies.sort()
    return {
        "services": count,
        "concurrency": concurrency,
        "all_issued_s": round(issued, 3),
        "certs_per_s": round(count / issued, 1),
        "leaf_p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "leaf_max_ms": round(1000 * latencies[-1], 1),
        "signed": int(after["signed"] - before["signed"]),
        "refused": int(after["refused"] - before["refused"]),
        "agent_failed_requests": int(after["failed"] - before["failed"]),
        "replaced_at_once": int(after["renewed"] - before["renewed"]),
        **sampler.figures(count),
        "retried_answers": refusals,
    }


async def run(options: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    print(f"in-process baseline: sign_csr on {options.csrs} CSRs, best of 3…", flush=True)
    baseline = measure_signing(options.csrs, 3)
    print(f"  {baseline['certs_per_s']:.0f} certificates/s", flush=True)
    server = AgentProcess.create("server-0", workdir)
    clients = [AgentProcess.create(f"client-{i}", workdir) for i in (1, 2)]
    processes: list[asyncio.subprocess.Process] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30, sock_connect=5)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            print("cluster:", flush=True)
            formed = await form(session, server, clients, processes)
            print(f"proactive: {options.services} services registered at once…", flush=True)
            proactive = await proactive_phase(session, server, clients, options.services)
            print(
                f"  all issued after {proactive['all_issued_s']:.2f} s"
                f" ({proactive['certs_per_s']:.0f}/s)",
                flush=True,
            )
            print(
                f"on demand: {options.services} services, leaf asked at once"
                f" ({options.concurrency} in flight)…",
                flush=True,
            )
            on_demand = await on_demand_phase(
                session, server, clients, options.services, options.concurrency
            )
            print(
                f"  all issued after {on_demand['all_issued_s']:.2f} s"
                f" ({on_demand['certs_per_s']:.0f}/s)",
                flush=True,
            )
    except BaseException:
        for agent in (server, *clients):
            if agent.process is not None and agent.process.returncode not in (None, -9):
                print(f"--- {agent.name} log tail:\n{agent.log_tail()}", file=sys.stderr)
        raise
    finally:
        await kill_agents(processes)
    in_process = baseline["certs_per_s"]
    return {
        "bench": "ca_issue",
        "services": options.services,
        "clients": len(clients),
        "cluster_formed_s": round(formed, 2),
        "proactive": proactive,
        "on_demand": on_demand,
        "in_process": {
            "csrs": options.csrs,
            "certs_per_s": round(in_process, 1),
            "sign_p50_ms": round(baseline["sign_p50_ms"], 3),
            "agent_key_and_csr_ms": round(baseline["agent_key_and_csr_ms"], 3),
        },
        "ratio_proactive_to_in_process": round(proactive["certs_per_s"] / in_process, 4),
        "ratio_on_demand_to_in_process": round(on_demand["certs_per_s"] / in_process, 4),
    }


def print_table(results: dict[str, Any]) -> None:
    proactive, on_demand = results["proactive"], results["on_demand"]
    in_process = results["in_process"]
    print()
    print(f"{'':<48}{'certs/s':>10}{'seconds':>10}{'ratio':>8}")
    rows = [
        (
            f"proactive: {proactive['services']} services registered at once",
            proactive["certs_per_s"],
            proactive["all_issued_s"],
            results["ratio_proactive_to_in_process"],
        ),
        (
            f"on demand: GET leaf, {on_demand['concurrency']} in flight",
            on_demand["certs_per_s"],
            on_demand["all_issued_s"],
            results["ratio_on_demand_to_in_process"],
        ),
        (
            f"baseline: sign_csr in-process ({in_process['csrs']} CSRs)",
            in_process["certs_per_s"],
            None,
            1.0,
        ),
    ]
    for label, rate, seconds, ratio in rows:
        shown = f"{seconds:.2f}" if seconds is not None else ""
        print(f"{label:<48}{rate:>10.1f}{shown:>10}{ratio:>8.3f}")
    for name, phase in (("proactive", proactive), ("on demand", on_demand)):
        print(
            f"{name}: leader signed {phase['signed']}, refused {phase['refused']};"
            f" agents' failed requests {phase['agent_failed_requests']}, leaves replaced"
            f" right after issue {phase['replaced_at_once']}"
        )
        print(
            f"  leader's catalog had every service after {phase['leader_catalog_complete_s']} s;"
            f" signed 10 % after {phase['signed_10pct_s']} s, 90 % after"
            f" {phase['signed_90pct_s']} s: {phase['signing_rate_10_90_per_s']} certs/s"
            " while signing"
        )
    print(
        f"proactive: registrations answered in {proactive['registered_s']:.2f} s; read back"
        f" not ok {proactive['read_back_not_ok']}, new signatures while reading back"
        f" {proactive['signed_during_read_back']}"
    )
    print(
        f"on demand: per leaf p50 {on_demand['leaf_p50_ms']} ms, max {on_demand['leaf_max_ms']}"
        f" ms; retried answers {on_demand['retried_answers'] or 'none'}"
    )
    print(
        f"in-process: sign p50 {in_process['sign_p50_ms']} ms; agent side key + CSR"
        f" {in_process['agent_key_and_csr_ms']} ms (not in the baseline)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--services", type=int, default=None, help="services per phase (200)")
    parser.add_argument("--csrs", type=int, default=None, help="in-process CSRs (300)")
    parser.add_argument("--concurrency", type=int, default=32, help="on-demand GETs in flight")
    parser.add_argument("--quick", action="store_true", help="20 services, 100 CSRs")
    options = parser.parse_args(argv)
    options.services = options.services or (20 if options.quick else 200)
    options.csrs = options.csrs or (100 if options.quick else 300)
    if not 1 <= options.services <= 2000:
        parser.error("--services must be between 1 and 2000")
    if not 1 <= options.concurrency <= 256:
        parser.error("--concurrency must be between 1 and 256")

    return run_benchmark("ca_issue", lambda workdir: run(options, workdir), print_table)


if __name__ == "__main__":
    sys.exit(main())
