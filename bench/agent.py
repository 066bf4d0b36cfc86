"""Live agent benchmark: real ``meshnode agent`` processes on loopback.

    .venv/bin/python bench/agent.py             # 50 agents, about 3 minutes on 2 cores
    .venv/bin/python bench/agent.py --quick     # 10 agents, shorter runs

It measures, each with a baseline from the same run:

* **start-up and memory of one agent**: from process spawn until ``/v1/agent/self``
  answers (median of a few starts), and the resident memory (``VmRSS``) of the idle
  single-member agent. Baseline: a minimal aiohttp server process, started and measured
  the same way (the cost of Python + aiohttp alone);
* **registration propagation**: N agents (``MESHNODE_MDNS__ENABLED=false``) joined to
  the first; then, again and again, a new service is registered at a random agent and
  the time until it is in *every* agent's ``/v1/catalog/services`` is measured, twice
  over: by polling every agent every ``POLL`` seconds (concurrently, aiohttp), and by
  one blocking query per agent (``?index=``), which wakes on the change itself and
  loads the machine far less. Baseline: the time until the *registering* agent shows
  it (the floor set by the observer);
* **memory at N members**: ``VmRSS`` of every agent of the cluster (median, max);
* **read throughput of one agent**: requests/s and latency of
  ``GET /v1/health/service/web`` (``WEB_INSTANCES`` instances, each with a TTL check)
  and ``GET /v1/catalog/services`` with K concurrent keep-alive clients for a fixed
  time, interleaved with the same load against a minimal aiohttp process that returns
  the agent's own response (the same JSON, re-serialized per request): the ratio is
  what the agent's work costs on top of aiohttp and ``json``. The client is one
  Python process, so a baseline figure is also a bound on the client.

It prints a table and, last, one JSON line ``{"bench": "agent", ...}``. Every process
it starts is stopped and reaped on any exit (error, Ctrl-C, SIGTERM), and its
temporary directory removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common

from bench.common import percentile, poll_until, run_benchmark

#: Polling period of the catalogs in the polling measurement (the brief's ~20 ms);
#: it bounds that measurement's resolution.
POLL: Final = 0.02
#: Agents started at once while building the cluster: each spends ~1 s of CPU on
#: imports, and a 2-core machine gains nothing from starting more together.
START_BATCH: Final = 4
#: Bounds on every wait, so a broken agent fails the bench instead of hanging it.
START_WITHIN: Final = 60.0
CONVERGE_WITHIN: Final = 120.0
PROPAGATE_WITHIN: Final = 30.0
STOP_GRACE: Final = 5.0
#: An idle agent settles (first gossip rounds, lazy imports) before its RSS is read.
SETTLE: Final = 2.0
#: Instances of ``web`` in the catalog for the health read benchmark.
WEB_INSTANCES: Final = 10
#: Rounds of the interleaved throughput runs (agent, baseline, agent, baseline...).
THROUGHPUT_ROUNDS: Final = 2

#: The baseline HTTP server: ``python -c BASELINE_SERVER [BODIES_JSON_FILE]``. It
#: answers every GET with ``bodies[path]`` (default ``{}``), serialized per request
#: as the agent does, and announces its port the way the agent does (a JSON log line).
BASELINE_SERVER: Final = """\
import asyncio, json, sys
from aiohttp import web

bodies = json.load(open(sys.argv[1])) if len(sys.argv) > 1 else {}

def dumps(value):
    return json.dumps(value, separators=(",", ":"))

async def handler(request):
    return web.json_response(bodies.get(request.path, {}), dumps=dumps)

async def main():
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    print(json.dumps({"event": "agent_started", "http": f"127.0.0.1:{port}"}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


# ---------------------------------------------------------------------- processes


@dataclass(slots=True)
class Child:
    """One child process (an agent or the baseline server) and what it announced."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    spawned_at: float
    http_port: int = 0
    gossip_port: int = 0
    ready_after: float = 0.0
    """Seconds from spawn until the API answered."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


@dataclass
class Lab:
    """Every child this run started, so that all of them are stopped on any exit."""

    workdir: Path
    children: list[Child] = field(default_factory=list)

    async def spawn(self, name: str, args: Sequence[str], env: dict[str, str]) -> Child:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log_file:
            spawned_at = time.monotonic()
            process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                # Its own session: a Ctrl-C reaches only the bench, which stops them.
                start_new_session=True,
            )
        child = Child(name, process, log_path, spawned_at)
        self.children.append(child)
        return child

    async def spawn_agent(self, name: str, join: Sequence[str] = ()) -> Child:
        data_dir = self.workdir / name
        args = [
            sys.executable, "-m", "meshnode.cli", "agent",
            "--node", name,
            "--data-dir", str(data_dir),
            "--bind", "127.0.0.1",
            "--gossip-port", "0",
            "--http-addr", "127.0.0.1:0",
            "--log-format", "json",
        ]  # fmt: skip
        for seed in join:
            args += ["--join", seed]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHNODE_")}
        env["MESHNODE_MDNS__ENABLED"] = "false"
        return await self.spawn(name, args, env)

    async def spawn_baseline(self, name: str, bodies: Path | None = None) -> Child:
        args = [sys.executable, "-c", BASELINE_SERVER]
        if bodies is not None:
            args.append(str(bodies))
        return await self.spawn(name, args, dict(os.environ))

    async def stop(self, children: Sequence[Child], grace: float = STOP_GRACE) -> None:
        """SIGTERM (an agent leaves gracefully), SIGKILL after ``grace``; reaps all."""
        for child in children:
            if child.running:
                with contextlib.suppress(ProcessLookupError):
                    child.process.terminate()
        try:
            async with asyncio.timeout(grace):
                await asyncio.gather(*(c.process.wait() for c in children))
        except TimeoutError:
            pass
        finally:
            await self.kill(children)

    async def kill(self, children: Sequence[Child] | None = None) -> None:
        chosen = self.children if children is None else children
        for child in chosen:
            if child.running:
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
        for child in chosen:
            await child.process.wait()


def _announced(child: Child) -> dict[str, Any] | None:
    """The child's ``agent_started`` log line, once written."""
    try:
        text = child.log_path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if '"agent_started"' not in line:
            continue
        with contextlib.suppress(json.JSONDecodeError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "agent_started":
                return event
    return None


async def wait_ready(session: aiohttp.ClientSession, child: Child) -> None:
    """Wait until ``/v1/agent/self`` answers; sets the ports and ``ready_after``."""
    deadline = child.spawned_at + START_WITHIN
    while True:
        if not child.running:
            raise RuntimeError(
                f"{child.name} exited with {child.process.returncode}: {child.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} not ready after {START_WITHIN:.0f} s")
        if not child.http_port and (event := _announced(child)) is not None:
            child.http_port = int(str(event["http"]).rsplit(":", 1)[1])
            if "gossip" in event:
                child.gossip_port = int(str(event["gossip"]).rsplit(":", 1)[1])
        if child.http_port:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(child.url + "/v1/agent/self") as reply:
                    if reply.status == 200:
                        await reply.read()
                        child.ready_after = time.monotonic() - child.spawned_at
                        return
        await asyncio.sleep(0.02)


def rss_bytes(pid: int) -> int:
    """``VmRSS`` of a process, from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------- statistics


def mib(value: float) -> float:
    return round(value / 2**20, 1)


# ---------------------------------------------------------------------- HTTP helpers


async def get_json(session: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with session.get(url, params=params or None) as reply:
        if reply.status != 200:
            raise RuntimeError(f"GET {url}: {reply.status} {await reply.text()}")
        return await reply.json()


async def put_json(session: aiohttp.ClientSession, url: str, body: object = None) -> None:
    async with session.put(url, json=body) as reply:
        if reply.status != 200:
            raise RuntimeError(f"PUT {url}: {reply.status} {await reply.text()}")


# ---------------------------------------------------------------------- phases


async def single_agent_phase(
    lab: Lab, session: aiohttp.ClientSession, starts: int
) -> dict[str, Any]:
    """Start one lone agent and one baseline server ``starts`` times, interleaved."""
    agent_ready: list[float] = []
    base_ready: list[float] = []
    agent_rss: list[int] = []
    base_rss: list[int] = []
    for attempt in range(starts):
        for kind in ("agent", "baseline"):
            if kind == "agent":
                child = await lab.spawn_agent(f"solo-{attempt}")
            else:
                child = await lab.spawn_baseline(f"baseline-{attempt}")
            await wait_ready(session, child)
            await asyncio.sleep(SETTLE)
            rss = rss_bytes(child.process.pid)
            (agent_ready if kind == "agent" else base_ready).append(child.ready_after)
            (agent_rss if kind == "agent" else base_rss).append(rss)
            await lab.stop([child])
        print(
            f"  start {attempt + 1}/{starts}: agent ready in {agent_ready[-1]:.2f} s "
            f"({mib(agent_rss[-1])} MiB), baseline {base_ready[-1]:.2f} s "
            f"({mib(base_rss[-1])} MiB)",
            flush=True,
        )
    return {
        "agent_ready_s": round(statistics.median(agent_ready), 3),
        "baseline_ready_s": round(statistics.median(base_ready), 3),
        "agent_ready_all_s": [round(v, 3) for v in agent_ready],
        "rss_1_member_mib": mib(statistics.median(agent_rss)),
        "baseline_rss_mib": mib(statistics.median(base_rss)),
    }


async def start_cluster(
    lab: Lab, session: aiohttp.ClientSession, count: int
) -> tuple[list[Child], dict[str, float]]:
    started = time.monotonic()
    seed = await lab.spawn_agent("agent-000")
    await wait_ready(session, seed)
    join = [f"127.0.0.1:{seed.gossip_port}"]
    agents = [seed]
    for first in range(1, count, START_BATCH):
        batch = [
            await lab.spawn_agent(f"agent-{i:03d}", join)
            for i in range(first, min(count, first + START_BATCH))
        ]
        await asyncio.gather(*(wait_ready(session, a) for a in batch))
        agents += batch
    all_up = time.monotonic() - started
    print(f"  {count} agents up in {all_up:.1f} s", flush=True)

    async def converged() -> bool:
        views = await asyncio.gather(
            *(get_json(session, a.url + "/v1/agent/members") for a in agents),
            return_exceptions=True,
        )
        return all(
            isinstance(view, list)
            and sum(1 for e in view if e["Status"] == 1 and "State" not in e) == count
            for view in views
        )

    converge = await poll_until(
        converged, CONVERGE_WITHIN, f"{count} members everywhere", every=POLL
    )
    print(f"  every agent sees {count} members alive {converge:.1f} s later", flush=True)
    return agents, {"start_s": round(all_up, 1), "converge_s": round(converge, 2)}


async def idle_cpu(agents: Sequence[Child], window: float) -> float:
    """Mean CPU share (percent of one core) of an idle agent over ``window``."""
    before = [cpu_seconds(a.process.pid) for a in agents]
    await asyncio.sleep(window)
    after = [cpu_seconds(a.process.pid) for a in agents]
    return 100 * statistics.mean(b - a for a, b in zip(before, after, strict=True)) / window


async def measure_propagation(
    session: aiohttp.ClientSession,
    agents: Sequence[Child],
    origin: Child,
    service: str,
    *,
    blocking: bool,
) -> tuple[float, float]:
    """Register ``service`` at ``origin``; (seconds until the origin shows it, seconds
    until every agent does), from just before the registration is sent."""
    seen: dict[str, float] = {}
    indexes: dict[str, int] = {}
    t0 = [0.0]  # set just before the registration is sent

    async def watch(agent: Child) -> None:
        url = agent.url + "/v1/catalog/services"
        while True:
            if blocking:
                params = {"index": str(indexes[agent.name]), "wait": f"{PROPAGATE_WITHIN:.0f}s"}
                async with session.get(url, params=params) as reply:
                    indexes[agent.name] = int(reply.headers["X-Consul-Index"])
                    services = await reply.json()
            else:
                async with session.get(url) as reply:
                    services = await reply.json()
            if service in services:
                seen[agent.name] = time.monotonic() - t0[0]
                return
            if not blocking:
                await asyncio.sleep(POLL)

    watchers: list[asyncio.Task[None]] = []
    try:
        if blocking:
            # Park one blocking query per agent on its current services index first.
            async def index_of(agent: Child) -> None:
                async with session.get(agent.url + "/v1/catalog/services") as reply:
                    indexes[agent.name] = int(reply.headers["X-Consul-Index"])
                    await reply.read()

            await asyncio.gather(*(index_of(a) for a in agents))
            watchers = [asyncio.create_task(watch(a)) for a in agents]
            await asyncio.sleep(0.05)
        t0[0] = time.monotonic()
        if not blocking:
            watchers = [asyncio.create_task(watch(a)) for a in agents]
        registration = {"Name": service, "ID": service, "Port": 9000}
        await put_json(session, origin.url + "/v1/agent/service/register", registration)
        async with asyncio.timeout(PROPAGATE_WITHIN):
            await asyncio.gather(*watchers)
    except TimeoutError:
        missing = sorted(a.name for a in agents if a.name not in seen)
        raise TimeoutError(
            f"{service} from {origin.name} not everywhere within {PROPAGATE_WITHIN:.0f} s; "
            f"missing at {missing[:10]}"
        ) from None
    finally:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    return seen[origin.name], max(seen.values())


async def propagation_phase(
    session: aiohttp.ClientSession,
    agents: Sequence[Child],
    registrations: int,
    rng: random.Random,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for mode in ("poll", "blocking"):
        origin_times, all_times = [], []
        for number in range(registrations):
            origin = rng.choice(agents)
            service = f"bench-{mode}-{number:03d}"
            at_origin, everywhere = await measure_propagation(
                session, agents, origin, service, blocking=mode == "blocking"
            )
            origin_times.append(at_origin)
            all_times.append(everywhere)
            await asyncio.sleep(rng.uniform(0.2, 0.4))  # let the broadcast drain
        results[mode] = {
            "p50_s": round(percentile(all_times, 0.50), 3),
            "p99_s": round(percentile(all_times, 0.99), 3),
            "max_s": round(max(all_times), 3),
            "origin_p50_s": round(percentile(origin_times, 0.50), 3),
            "samples": len(all_times),
        }
        print(
            f"  [{mode}] visible everywhere p50 {results[mode]['p50_s']:.3f} s, "
            f"p99 {results[mode]['p99_s']:.3f} s (at the origin: "
            f"p50 {results[mode]['origin_p50_s']:.3f} s)",
            flush=True,
        )
    return results


@dataclass
class LoadRun:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    body_bytes: int = 0


async def load(url: str, clients: int, duration: float, into: LoadRun) -> None:
    """``clients`` keep-alive connections GET ``url`` back to back for ``duration``."""
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Open the connections before the clock starts.
        await asyncio.gather(*(get_json(session, url) for _ in range(clients)))
        deadline = time.perf_counter() + duration

        async def client() -> None:
            while (started := time.perf_counter()) < deadline:
                try:
                    async with session.get(url) as reply:
                        body = await reply.read()
                        ok = reply.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok, body = False, b""
                if ok:
                    into.latencies.append(time.perf_counter() - started)
                    into.requests += 1
                    into.body_bytes = len(body)
                else:
                    into.errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        into.seconds += time.perf_counter() - started


async def throughput_phase(
    lab: Lab,
    session: aiohttp.ClientSession,
    agents: Sequence[Child],
    clients: int,
    duration: float,
) -> dict[str, Any]:
    target = agents[0]
    instances = agents[:WEB_INSTANCES]
    for number, agent in enumerate(instances):
        body = {
            "Name": "web",
            "ID": f"web-{number}",
            "Port": 8080,
            "Tags": ["v1", "bench"],
            "Meta": {"version": "1.2.3"},
            "Check": {"CheckID": f"web-{number}-ttl", "TTL": "10m"},
        }
        await put_json(session, agent.url + "/v1/agent/service/register", body)
        await put_json(session, agent.url + f"/v1/agent/check/pass/web-{number}-ttl")

    async def all_passing() -> bool:
        entries = await get_json(session, target.url + "/v1/health/service/web", passing="1")
        return len(entries) == len(instances)

    await poll_until(
        all_passing, PROPAGATE_WITHIN, "web passing everywhere at the target", every=POLL
    )
    paths = {
        "health_service": "/v1/health/service/web",
        "catalog_services": "/v1/catalog/services",
    }
    bodies = {path: await get_json(session, target.url + path) for path in paths.values()}
    bodies_file = lab.workdir / "baseline-bodies.json"
    bodies_file.write_text(json.dumps(bodies))
    baseline = await lab.spawn_baseline("baseline-throughput", bodies_file)
    await wait_ready(session, baseline)

    runs = {(e, t): LoadRun() for e in paths for t in ("agent", "baseline")}
    try:
        for round_number in range(THROUGHPUT_ROUNDS):
            for endpoint, path in paths.items():
                for kind, child in (("agent", target), ("baseline", baseline)):
                    await load(child.url + path, clients, duration, runs[endpoint, kind])
            print(f"  round {round_number + 1}/{THROUGHPUT_ROUNDS} done", flush=True)
    finally:
        await lab.stop([baseline])

    results: dict[str, Any] = {"clients": clients, "seconds_per_run": duration}
    for endpoint in paths:
        row: dict[str, Any] = {}
        for kind in ("agent", "baseline"):
            run = runs[endpoint, kind]
            row[f"{kind}_rps"] = round(run.requests / run.seconds, 1)
            row[f"{kind}_p50_ms"] = round(1000 * percentile(run.latencies, 0.50), 2)
            row[f"{kind}_p99_ms"] = round(1000 * percentile(run.latencies, 0.99), 2)
            row[f"{kind}_errors"] = run.errors
            row[f"{kind}_body_bytes"] = run.body_bytes
        row["ratio"] = round(row["agent_rps"] / row["baseline_rps"], 3)
        results[endpoint] = row
    return results


# ---------------------------------------------------------------------- main


async def run(options: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    lab = Lab(workdir)
    rng = random.Random(options.seed)
    results: dict[str, Any] = {"bench": "agent", "agents": options.agents}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=PROPAGATE_WITHIN + 10, sock_connect=2)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            print(f"one agent, {options.starts} starts (and as many of the baseline):")
            results["single"] = await single_agent_phase(lab, session, options.starts)

            print(f"cluster of {options.agents} agents:", flush=True)
            agents, results["cluster"] = await start_cluster(lab, session, options.agents)
            results["cluster"]["idle_cpu_percent_per_agent"] = round(await idle_cpu(agents, 3.0), 2)

            print(f"propagation, {options.registrations} registrations per mode:", flush=True)
            results["propagation"] = await propagation_phase(
                session, agents, options.registrations, rng
            )
            rss = [rss_bytes(a.process.pid) for a in agents]
            results["memory"] = {
                "rss_1_member_mib": results["single"]["rss_1_member_mib"],
                "rss_n_members_median_mib": mib(statistics.median(rss)),
                "rss_n_members_max_mib": mib(max(rss)),
                "baseline_rss_mib": results["single"]["baseline_rss_mib"],
            }

            print(
                f"read throughput, {options.clients} clients, {options.duration:g} s per run:",
                flush=True,
            )
            results["throughput"] = await throughput_phase(
                lab, session, agents, options.clients, options.duration
            )
            await lab.stop(agents)
    except Exception:
        # A child that died on its own is the likely cause: show what it said.
        for child in lab.children:
            if not child.running and child.process.returncode not in (0, -9, -15):
                print(f"--- {child.name} log tail:\n{child.log_tail()}", file=sys.stderr)
        raise
    finally:
        await lab.kill()
    return results


def print_table(results: dict[str, Any]) -> None:
    single, memory = results["single"], results["memory"]
    propagation, throughput = results["propagation"], results["throughput"]
    n = results["agents"]
    rows: list[tuple[str, str, str, str]] = [
        ("measure", "agent", "baseline", "ratio"),
        (
            "start to API ready, median (s)",
            f"{single['agent_ready_s']:.3f}",
            f"{single['baseline_ready_s']:.3f}",
            f"{single['agent_ready_s'] / single['baseline_ready_s']:.2f}",
        ),
        (
            "RSS, 1 member (MiB)",
            f"{memory['rss_1_member_mib']}",
            f"{memory['baseline_rss_mib']}",
            f"{memory['rss_1_member_mib'] / memory['baseline_rss_mib']:.2f}",
        ),
        (
            f"RSS, {n} members, median / max (MiB)",
            f"{memory['rss_n_members_median_mib']} / {memory['rss_n_members_max_mib']}",
            "",
            "",
        ),
    ]
    for mode, label in (("poll", f"poll {POLL * 1000:.0f} ms"), ("blocking", "blocking query")):
        p = propagation[mode]
        rows.append(
            (
                f"registration → all {n} catalogs, {label}: p50 / p99 (s)",
                f"{p['p50_s']:.3f} / {p['p99_s']:.3f}",
                f"{p['origin_p50_s']:.3f} (origin)",
                "",
            )
        )
    for endpoint, label in (
        ("health_service", "GET /v1/health/service/web"),
        ("catalog_services", "GET /v1/catalog/services"),
    ):
        row = throughput[endpoint]
        rows.append(
            (
                f"{label} (req/s)",
                f"{row['agent_rps']:.0f}",
                f"{row['baseline_rps']:.0f}",
                f"{row['ratio']:.2f}",
            )
        )
        rows.append(
            (
                f"  p99 latency (ms), body {row['agent_body_bytes']} B",
                f"{row['agent_p99_ms']:.2f}",
                f"{row['baseline_p99_ms']:.2f}",
                "",
            )
        )
    width = max(len(r[0]) for r in rows) + 2
    print()
    for label, ours, base, ratio in rows:
        print(f"{label:<{width}}{ours:>16}{base:>20}{ratio:>8}")
    cluster = results["cluster"]
    print(
        f"cluster: {n} agents up in {cluster['start_s']} s, all members everywhere "
        f"{cluster['converge_s']} s later; idle CPU {cluster['idle_cpu_percent_per_agent']} % "
        "of a core per agent"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--agents", type=int, default=None, help="cluster size (default 50)")
    parser.add_argument("--quick", action="store_true", help="10 agents, shorter runs")
    parser.add_argument("--registrations", type=int, default=None, help="per mode (20)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    parser.add_argument("--duration", type=float, default=None, help="seconds per load run (5)")
    parser.add_argument("--starts", type=int, default=None, help="single-agent starts (5)")
    parser.add_argument("--seed", type=int, default=1, help="picks the registering agents")
    options = parser.parse_args(argv)
    quick = options.quick
    options.agents = options.agents or (10 if quick else 50)
    options.registrations = options.registrations or (10 if quick else 20)
    options.duration = options.duration or (2.0 if quick else 5.0)
    options.starts = options.starts or (3 if quick else 5)
    if options.agents < 2:
        parser.error("--agents must be at least 2")
    if options.agents > 200:
        parser.error("--agents above 200 would overload this machine")
    if not 1 <= options.clients <= 256:
        parser.error("--clients must be between 1 and 256")

    return run_benchmark("agent", lambda workdir: run(options, workdir), print_table)


if __name__ == "__main__":
    sys.exit(main())
