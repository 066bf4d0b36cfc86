"""Three real server agents and a client on loopback elect one leader, fail over when
it is killed, and take it back as a follower when it restarts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from meshnode.procs import (
    AgentProcess,
    fetch_json,
    kill_agents,
    start_agent,
    wait_agent_ready,
)

pytestmark = pytest.mark.slow

SERVER_ARGS = ["--server", "--bootstrap-expect", "3"]
#: Failover budget: an election timeout in [1 s, 2 s] after the last heartbeat, a
#: pre-vote and a vote round trip (ca/election.py ElectionConfig), with slack for a
#: loaded test machine.
FAILOVER_WITHIN = 5.0


class Cluster:
    def __init__(self, tmp_path: Path, session: aiohttp.ClientSession) -> None:
        self.servers = [AgentProcess.create(f"s{i}", tmp_path) for i in (1, 2, 3)]
        self.client = AgentProcess.create("c1", tmp_path)
        self.session = session
        self.processes: list[asyncio.subprocess.Process] = []

    async def start(self, agent: AgentProcess, join: list[str], extra: list[str]) -> None:
        await start_agent(agent, join, extra)
        assert agent.process is not None
        self.processes.append(agent.process)
        await wait_agent_ready(agent, self.session)

    async def leader_of(self, agent: AgentProcess) -> str | None:
        reply = await fetch_json(self.session, agent.http_url + "/v1/status/leader")
        return reply if isinstance(reply, str) else None

    async def leaders(self, agents: list[AgentProcess]) -> dict[str, str | None]:
        replies = await asyncio.gather(*(self.leader_of(a) for a in agents))
        return {a.name: r for a, r in zip(agents, replies, strict=True)}

    async def metrics(self, agent: AgentProcess) -> dict[str, float]:
        url = agent.http_url + "/v1/agent/metrics?format=prometheus"
        async with self.session.get(url) as response:
            text = await response.text()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("meshnode_ca_") and "{" not in line:
                name, value = line.split()
                values[name] = float(value)
        return values

    def by_gossip_address(self, address: str) -> AgentProcess:
        return next(s for s in self.servers if s.gossip_addr == address)


async def wait_until(
    check: Callable[[], Awaitable[bool]], within: float, what: Callable[[], str]
) -> float:
    """Poll ``check`` until it is true; the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within} s: {what()}")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def leaders_elected_by_self(cluster: Cluster) -> list[tuple[int, str]]:
    """(term, server) of every ``leader_elected`` the servers logged about themselves."""
    found: list[tuple[int, str]] = []
    for server in cluster.servers:
        for line in server.log_path.read_text(errors="replace").splitlines():
            if '"leader_elected"' not in line:
                continue
            entry = json.loads(line)
            if entry.get("us") is True:
                found.append((int(entry["term"]), server.name))
    return found


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        cluster = Cluster(tmp_path, session)
        try:
            yield cluster
        finally:
            await kill_agents(cluster.processes)


async def test_one_leader_failover_and_rejoin(cluster: Cluster) -> None:
    first, *others = cluster.servers
    await cluster.start(first, [], SERVER_ARGS)
    for server in others:
        await cluster.start(server, [first.gossip_addr], SERVER_ARGS)
    await cluster.start(cluster.client, [first.gossip_addr], [])
    everyone = [*cluster.servers, cluster.client]
    server_addresses = sorted(s.gossip_addr for s in cluster.servers)
    seen: dict[str, str | None] = {}

    async def all_agree(agents: list[AgentProcess], not_leader: str = "") -> bool:
        seen.clear()
        seen.update(await cluster.leaders(agents))
        values = set(seen.values())
        return len(values) == 1 and next(iter(values)) not in ("", None, not_leader)

    # 1. Exactly one leader, the same for every server and for the client.
    await wait_until(lambda: all_agree(everyone), 20, lambda: f"leaders {seen}")
    leader_address = seen[first.name]
    assert leader_address in server_addresses
    leader = cluster.by_gossip_address(leader_address)
    for agent in everyone:
        peers = await fetch_json(cluster.session, agent.http_url + "/v1/status/peers")
        assert sorted(peers) == server_addresses, (agent.name, peers)
    metrics = {s.name: await cluster.metrics(s) for s in cluster.servers}
    assert [n for n, m in metrics.items() if m["meshnode_ca_leader"] == 1] == [leader.name]
    assert len({m["meshnode_ca_term"] for m in metrics.values()}) == 1, metrics
    async with cluster.session.get(cluster.client.http_url + "/v1/catalog/services") as response:
        assert response.headers["X-Consul-KnownLeader"] == "true"

    # 2. kill -9 the leader: the two others agree on a new one within a few seconds.
    leader.kill()
    assert leader.process is not None
    await leader.process.wait()
    survivors = [s for s in cluster.servers if s is not leader]
    took = await wait_until(
        lambda: all_agree(survivors, not_leader=leader_address),
        FAILOVER_WITHIN,
        lambda: f"survivors' leaders {seen}",
    )
    new_leader_address = seen[survivors[0].name]
    assert new_leader_address in server_addresses and new_leader_address != leader_address
    print(f"failover took {took:.2f} s")
    # The client follows through gossip metadata (one alive broadcast away).
    await wait_until(
        lambda: all_agree([*survivors, cluster.client], not_leader=leader_address),
        10,
        lambda: f"client and survivors {seen}",
    )

    # 3. Restart the old leader: it follows the current leader, which stays leader.
    await cluster.start(leader, [survivors[0].gossip_addr], SERVER_ARGS)
    await wait_until(lambda: all_agree(everyone), 15, lambda: f"after restart {seen}")
    assert seen[leader.name] == new_leader_address
    await asyncio.sleep(2.0)  # a few heartbeat rounds: nobody is deposed, nothing flaps
    assert await all_agree(everyone), seen
    assert seen[leader.name] == new_leader_address
    metrics = {s.name: await cluster.metrics(s) for s in cluster.servers}
    new_leader = cluster.by_gossip_address(new_leader_address)
    assert [n for n, m in metrics.items() if m["meshnode_ca_leader"] == 1] == [new_leader.name]
    assert len({m["meshnode_ca_term"] for m in metrics.values()}) == 1, metrics
    # At most one leader per term, over the whole run (restarts included).
    elected = leaders_elected_by_self(cluster)
    terms = [term for term, _ in elected]
    assert len(terms) == len(set(terms)), elected
    assert len(elected) >= 2, elected
