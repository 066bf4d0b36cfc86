"""Connect on real agents: one trust bundle and one policy across a 5-agent cluster,
through a leader crash, a client restart, a root rotation under live mTLS traffic,
and the loss of quorum; ACLs on a 1-server cluster.

The 5-agent cluster (servers s1-s3 with ``--bootstrap-expect 3``, clients c1 and c2)
is started once for the module (about 10 s); the tests run in file order and each
leaves it in a state the next can use:

1. ``test_one_bundle_and_one_policy_everywhere_through_a_leader_crash`` kills the
   leader (2 of 3 servers left: still a quorum);
2. ``test_policy_spreads_by_gossip_broadcast`` checks a write spreads as fast as a
   catalog change (by broadcast, not only by anti-entropy);
3. ``test_a_restarted_client_serves_its_policy_before_rejoining`` restarts c2;
4. ``test_root_rotation_under_a_stream_of_mtls_handshakes`` rotates the root;
5. ``test_without_a_leader_writes_get_503_and_reads_go_on`` kills the leader and
   another server (2 of 3 down).

``test_acls_guard_policy_writes_but_not_authorize`` runs its own 1-server cluster.
Each test also runs alone (``-k``): it writes the policy it reads, and kills only
what it needs to. Figures (propagation and failover times, handshake counts) are
printed; run with ``-s`` to see them. Every process is killed and the temporary
directory removed whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ca.bundle import BundleRoot, TrustBundle, verify_leaf
from meshnode.procs import (
    AgentProcess,
    free_port,
    kill_agents,
    start_agent,
    stop_agent,
    wait_agent_ready,
)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

SERVER_ARGS = ["--server", "--bootstrap-expect", "3"]
DATACENTER = "dc1"
ACL_TOKEN = "e2e-token-0123456789abcdef"
#: A leader crash: an election timeout in [1 s, 2 s] after the last heartbeat, a
#: pre-vote and a vote round (ca/election.py), with slack for a loaded machine.
FAILOVER_WITHIN = 10.0
#: A policy write reaches every agent by gossip broadcast in well under a second on
#: loopback; a bundle too big for a packet (during a rotation) by push-pull in 1-3 s.
#: Slack for a loaded CI machine.
PROPAGATION_WITHIN = 8.0
#: Gossip rounds every 0.2 s to 4 members: 5 agents hear a broadcast within ~0.5 s.
BROADCAST_WITHIN = 1.5
#: Re-issue after a rotation happens within ca.renewal.MIN_ROTATION_SPREAD (30 s for
#: a small cluster) of the new bundle's arrival; slack for retries and a slow machine.
REISSUE_WITHIN = 50.0
#: Handshakes keep going this long once both sides present leaves of the new root.
AFTER_REISSUE = 4.0
#: ...and until this many have been made in all (a quick re-issue makes a short run).
MIN_HANDSHAKES = 400
HANDSHAKE_INTERVAL = 0.02
#: Writes without a leader wait agent.LEADER_WAIT (10 s) for one, then answer 503.
NO_LEADER_503_WITHIN = 15.0


# --------------------------------------------------------------------------- plumbing


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    text: str
    index: int
    """``X-Consul-Index``, 0 when absent."""
    seconds: float

    def json(self) -> Any:
        return json.loads(self.text)


class Cluster:
    """Agent processes on loopback, and an HTTP client for their APIs."""

    def __init__(self, workdir: Path, session: aiohttp.ClientSession, names: Sequence[str]):
        self.workdir = workdir
        self.session = session
        self.agents = {name: AgentProcess.create(name, workdir) for name in names}
        self.processes: list[asyncio.subprocess.Process] = []
        """Every incarnation of every agent, for cleanup."""

    def __getitem__(self, name: str) -> AgentProcess:
        return self.agents[name]

    @property
    def servers(self) -> list[AgentProcess]:
        return [a for name, a in self.agents.items() if name.startswith("s")]

    def running(self) -> list[AgentProcess]:
        return [a for a in self.agents.values() if a.running]

    async def spawn(
        self, agent: AgentProcess, join: Sequence[str] = (), extra: Sequence[str] = ()
    ) -> None:
        await start_agent(agent, join, extra)
        assert agent.process is not None
        self.processes.append(agent.process)

    async def call(
        self,
        method: str,
        agent: AgentProcess,
        path: str,
        body: object = None,
        *,
        token: str | None = None,
    ) -> Reply:
        headers = {"X-Consul-Token": token} if token else {}
        data = None if body is None else json.dumps(body)
        started = time.monotonic()
        async with self.session.request(
            method, agent.http_url + path, data=data, headers=headers
        ) as response:
            text = await response.text()
            index = int(response.headers.get("X-Consul-Index", "0") or 0)
        return Reply(response.status, text, index, time.monotonic() - started)

    async def get(self, agent: AgentProcess, path: str) -> Any:
        """GET that must answer 200; the decoded body."""
        reply = await self.call("GET", agent, path)
        assert reply.status == 200, (agent.name, path, reply.status, reply.text)
        return reply.json()

    async def put(
        self, agent: AgentProcess, path: str, body: object = None, *, token: str | None = None
    ) -> Reply:
        return await self.call("PUT", agent, path, body, token=token)

    async def write(self, agent: AgentProcess, path: str, body: object) -> float:
        """A policy write that must succeed (200 ``true``); the seconds it took."""
        reply = await self.put(agent, path, body)
        assert reply.status == 200 and reply.json() is True, (agent.name, path, reply)
        return reply.seconds

    async def register(self, agent: AgentProcess, service: str, port: int = 8080) -> None:
        body = {"Name": service, "ID": f"{service}-1", "Port": port}
        reply = await self.put(agent, "/v1/agent/service/register", body)
        assert reply.status == 200, reply

    async def leader_address(self, agent: AgentProcess) -> str:
        reply = await self.call("GET", agent, "/v1/status/leader")
        return str(reply.json()) if reply.status == 200 else ""

    def by_gossip_address(self, address: str) -> AgentProcess:
        return next(a for a in self.agents.values() if a.gossip_addr == address)

    def log_tails(self, chars: int = 1500) -> str:
        return "\n".join(f"--- {a.name}\n{a.log_tail(chars)}" for a in self.agents.values())


async def wait_until(
    check: Callable[[], Awaitable[bool]], within: float, what: Callable[[], str]
) -> float:
    """Poll ``check`` every 50 ms until it holds; the seconds it took. Connection
    errors count as "not yet"."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            if await check():
                return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within} s: {what()}")
        await asyncio.sleep(0.05)


async def everywhere(
    agents: Sequence[AgentProcess],
    probe: Callable[[AgentProcess], Awaitable[object]],
    seen: dict[str, object],
) -> dict[str, object]:
    """``probe`` at every agent at once; fills and returns ``seen`` (name -> result)."""
    results = await asyncio.gather(*(probe(a) for a in agents), return_exceptions=True)
    seen.clear()
    seen.update({a.name: r for a, r in zip(agents, results, strict=True)})
    return seen


def same_everywhere(seen: dict[str, object], expected: object) -> bool:
    return all(value == expected for value in seen.values())


async def converge(
    agents: Sequence[AgentProcess],
    probe: Callable[[AgentProcess], Awaitable[object]],
    expected: object,
    within: float,
    what: str,
) -> float:
    """Wait until ``probe`` gives ``expected`` at every agent; the seconds it took."""
    seen: dict[str, object] = {}

    async def check() -> bool:
        await everywhere(agents, probe, seen)
        return same_everywhere(seen, expected)

    return await wait_until(check, within, lambda: f"{what}: expected {expected!r}, saw {seen}")


def bundle_of(roots: dict[str, Any]) -> TrustBundle:
    """The agent's ``/v1/agent/connect/ca/roots`` as a ``TrustBundle`` to verify with."""
    bundle = TrustBundle(
        roots["TrustDomain"],
        tuple(
            BundleRoot(r["RootCert"], tuple(r["IntermediateCerts"]), r["SigningKeyID"])
            for r in roots["Roots"]
        ),
        roots["ActiveRootID"],
        0,
    )
    assert [root.id for root in bundle.roots] == [r["ID"] for r in roots["Roots"]]
    return bundle


def service_uri(trust_domain: str, service: str) -> str:
    return f"spiffe://{trust_domain}/ns/default/dc/{DATACENTER}/svc/{service}"


def certificates(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode())


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def check_leaf(leaf: dict[str, Any], roots: dict[str, Any], service: str) -> x509.Certificate:
    """A Consul-shaped leaf for ``service``: URI SAN, chain to the roots, own key."""
    expected = service_uri(roots["TrustDomain"], service)
    assert leaf["Service"] == service
    assert leaf["ServiceURI"] == expected
    cert = certificates(leaf["CertPEM"])[0]
    assert uri_sans(cert) == [expected]
    identity = verify_leaf(leaf["CertPEM"], [], bundle_of(roots), datetime.now(UTC))
    assert identity.uri == expected
    key = serialization.load_pem_private_key(leaf["PrivateKeyPEM"].encode(), None)
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(serialization.Encoding.PEM, public) == (
        cert.public_key().public_bytes(serialization.Encoding.PEM, public)
    )
    return cert


def without_indexes(value: Any) -> Any:
    """Policy as an agent serves it, minus its local Raft-style indexes (a restarted
    agent numbers its changes anew)."""
    if isinstance(value, list):
        return [without_indexes(v) for v in value]
    if isinstance(value, dict):
        return {
            k: without_indexes(v)
            for k, v in value.items()
            if k not in ("CreateIndex", "ModifyIndex", "CreatedAt", "UpdatedAt")
        }
    return value


def intention_path(source: str, destination: str, what: str = "exact") -> str:
    return f"/v1/connect/intentions/{what}?source={source}&destination={destination}"


async def allowed(cluster: Cluster, agent: AgentProcess, source: str, destination: str) -> object:
    reply = await cluster.call("GET", agent, intention_path(source, destination, "check"))
    return reply.json()["Allowed"] if reply.status == 200 else reply.status


async def intention_action(
    cluster: Cluster, agent: AgentProcess, source: str, destination: str
) -> object:
    reply = await cluster.call("GET", agent, intention_path(source, destination))
    return reply.json()["Action"] if reply.status == 200 else reply.status


async def boot(cluster: Cluster, servers: Sequence[AgentProcess], extra: Sequence[str]) -> None:
    """Start every agent at once (the others join the first server), then wait for one
    leader and one trust bundle everywhere."""
    first = servers[0]
    everyone = list(cluster.agents.values())
    started = time.monotonic()
    for agent in everyone:
        join = [] if agent is first else [first.gossip_addr]
        args = [*extra] if agent in servers else []
        await cluster.spawn(agent, join, args)
    await asyncio.gather(*(wait_agent_ready(a, cluster.session) for a in everyone))
    seen: dict[str, object] = {}

    async def one_leader() -> bool:
        await everywhere(everyone, cluster.leader_address, seen)
        leaders = set(seen.values())
        return len(leaders) == 1 and "" not in leaders

    async def one_root() -> bool:
        async def active_root(agent: AgentProcess) -> object:
            reply = await cluster.call("GET", agent, "/v1/agent/connect/ca/roots")
            return reply.json()["ActiveRootID"] if reply.status == 200 else reply.status

        await everywhere(everyone, active_root, seen)
        roots = set(seen.values())
        return len(roots) == 1 and all(isinstance(r, str) for r in roots)

    await wait_until(one_leader, 30, lambda: f"one leader: {seen}\n{cluster.log_tails()}")
    await wait_until(one_root, 15, lambda: f"one root: {seen}\n{cluster.log_tails()}")
    took = time.monotonic() - started
    print(f"\n{len(everyone)} agents up with a leader and a root in {took:.1f} s")


@contextlib.asynccontextmanager
async def running_cluster(names: Sequence[str]) -> AsyncIterator[Cluster]:
    """A cluster of agents named ``names`` (``s*`` servers, ``c*`` clients), not yet
    started; every process is killed and the directory removed on the way out."""
    workdir = Path(tempfile.mkdtemp(prefix="meshnode-connect-"))
    try:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            cluster = Cluster(workdir, session, names)
            try:
                yield cluster
            finally:
                await kill_agents(cluster.processes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    async with running_cluster(["s1", "s2", "s3", "c1", "c2"]) as cluster:
        await boot(cluster, cluster.servers, SERVER_ARGS)
        yield cluster


async def wait_for_leader(cluster: Cluster, agents: Sequence[AgentProcess]) -> str:
    """One leader named by every agent in ``agents``; its gossip address."""
    seen: dict[str, object] = {}

    async def agreed() -> bool:
        await everywhere(agents, cluster.leader_address, seen)
        values = set(seen.values())
        return len(values) == 1 and "" not in values

    await wait_until(agreed, 20, lambda: f"one leader: {seen}")
    return str(next(iter(seen.values())))


# --------------------------------------------------------------------------- 1. one cluster


async def ca_status(cluster: Cluster, agent: AgentProcess) -> object:
    """(agents lagging, agents listed) in this agent's ``/v1/mesh/ca/status``."""
    status = await cluster.get(agent, "/v1/mesh/ca/status")
    return (status["Lagging"], len(status["Agents"]))


async def config_view(cluster: Cluster, agent: AgentProcess, name: str) -> object:
    view: list[object] = []
    for kind in ("service-defaults", "service-resolver", "service-splitter"):
        reply = await cluster.call("GET", agent, f"/v1/config/{kind}/{name}")
        view.append(without_indexes(reply.json()) if reply.status == 200 else reply.status)
    return view


def routing_entries(name: str, weights: tuple[float, float]) -> list[dict[str, Any]]:
    """service-defaults (http), a resolver with subsets v1/v2, a splitter between them."""
    return [
        {"Kind": "service-defaults", "Name": name, "Protocol": "http"},
        {
            "Kind": "service-resolver",
            "Name": name,
            "Subsets": {
                "v1": {"Filter": "Service.Meta.version == v1"},
                "v2": {"Filter": "Service.Meta.version == v2"},
            },
        },
        {
            "Kind": "service-splitter",
            "Name": name,
            "Splits": [
                {"Weight": weights[0], "ServiceSubset": "v1"},
                {"Weight": weights[1], "ServiceSubset": "v2"},
            ],
        },
    ]


async def test_one_bundle_and_one_policy_everywhere_through_a_leader_crash(
    cluster: Cluster,
) -> None:
    everyone = cluster.running()
    assert len(everyone) == 5, "this test needs the whole cluster"
    c1, c2, s3 = cluster["c1"], cluster["c2"], cluster["s3"]

    # One trust bundle: the same active root everywhere, and nobody lagging.
    roots = {a.name: await cluster.get(a, "/v1/agent/connect/ca/roots") for a in everyone}
    assert len({r["ActiveRootID"] for r in roots.values()}) == 1, roots
    assert len({r["TrustDomain"] for r in roots.values()}) == 1, roots
    root_id, trust_domain = roots["c1"]["ActiveRootID"], roots["c1"]["TrustDomain"]
    took = await converge(
        everyone, lambda a: ca_status(cluster, a), (0, 5), 10, "(lagging, listed) in CA status"
    )
    print(f"CA status: 0 of 5 lagging everywhere ({took:.2f} s more)")

    # A leaf for a service registered on a client: a valid SVID of the cluster.
    await cluster.register(c1, "web")
    reply = await cluster.call("GET", c1, "/v1/agent/connect/ca/leaf/web")
    assert reply.status == 200, reply
    check_leaf(reply.json(), roots["c1"], "web")
    print(f"first leaf for web at c1 in {reply.seconds:.2f} s")
    reply = await cluster.call("GET", c2, "/v1/agent/connect/ca/leaf/web")
    assert reply.status == 404, reply  # web is not registered on c2

    # An intention written at c1 is in force at all five agents...
    async def web_to_api(agent: AgentProcess) -> object:
        return (
            await intention_action(cluster, agent, "web", "api"),
            await allowed(cluster, agent, "web", "api"),
        )

    written = await cluster.write(c1, intention_path("web", "api"), {"Action": "deny"})
    took = await converge(everyone, web_to_api, ("deny", False), PROPAGATION_WITHIN, "web=>api")
    print(f"intention deny: written in {written:.2f} s, at all 5 agents {took:.2f} s later")
    # ...and switched to allow at another agent.
    written = await cluster.write(c2, intention_path("web", "api"), {"Action": "allow"})
    took = await converge(everyone, web_to_api, ("allow", True), PROPAGATION_WITHIN, "web=>api")
    print(f"intention allow: written in {written:.2f} s, at all 5 agents {took:.2f} s later")
    authorize = {"Target": "api", "ClientCertURI": service_uri(trust_domain, "web")}
    for agent in everyone:
        reply = await cluster.call("POST", agent, "/v1/agent/connect/authorize", authorize)
        assert reply.status == 200, reply
        assert reply.json()["Authorized"] is True, (agent.name, reply.text)
        assert "Matched L4 intention" in reply.json()["Reason"], reply.text

    # Config entries written at a server are readable at every agent.
    for entry in routing_entries("api", (80, 20)):
        reply = await cluster.put(s3, "/v1/config", entry)
        assert reply.status == 200 and reply.json() is True, (entry["Kind"], reply)
    view = await config_view(cluster, s3, "api")
    assert isinstance(view, list)
    assert view[0]["Protocol"] == "http", view
    assert sorted(view[1]["Subsets"]) == ["v1", "v2"], view
    assert [split["Weight"] for split in view[2]["Splits"]] == [80, 20], view
    took = await converge(
        everyone, lambda a: config_view(cluster, a, "api"), view, PROPAGATION_WITHIN, "config"
    )
    print(f"3 config entries written at s3 at all 5 agents {took:.2f} s after the last write")
    # Weights not summing to 100: 400, saying why, and nothing changes anywhere.
    reply = await cluster.put(c1, "/v1/config", routing_entries("api", (70, 20))[2])
    assert reply.status == 400, reply
    assert "sum of all split weights must be 100" in reply.text, reply.text
    await asyncio.sleep(0.3)
    await converge(everyone, lambda a: config_view(cluster, a, "api"), view, 0, "config")

    # kill -9 the leader: a new one is elected, with the same root.
    leader_address = await wait_for_leader(cluster, everyone)
    leader = cluster.by_gossip_address(leader_address)
    assert leader in cluster.servers
    leader.kill()
    assert leader.process is not None
    await leader.process.wait()
    killed_at = time.monotonic()
    survivors = cluster.running()
    seen: dict[str, object] = {}

    async def new_leader_everywhere() -> bool:
        await everywhere(survivors, cluster.leader_address, seen)
        values = set(seen.values())
        return len(values) == 1 and not values & {"", leader_address}

    await wait_until(new_leader_everywhere, FAILOVER_WITHIN, lambda: f"leaders: {seen}")
    failover = time.monotonic() - killed_at
    elected = cluster.by_gossip_address(str(seen["c1"]))
    print(f"leader {leader.name} killed: {elected.name} named everywhere after {failover:.2f} s")
    for agent in survivors:
        after = await cluster.get(agent, "/v1/agent/connect/ca/roots")
        assert (after["ActiveRootID"], after["TrustDomain"]) == (root_id, trust_domain), agent.name

    # A service registered after the failover gets a leaf from the new leader...
    await cluster.register(c2, "billing")
    reply = await cluster.call("GET", c2, "/v1/agent/connect/ca/leaf/billing")
    assert reply.status == 200, (reply, cluster.log_tails())
    check_leaf(reply.json(), await cluster.get(c2, "/v1/agent/connect/ca/roots"), "billing")
    print(f"leaf for billing, registered after the failover, in {reply.seconds:.2f} s")
    reply = await cluster.call("GET", c1, "/v1/agent/connect/ca/leaf/web")
    assert reply.status == 200, reply  # the old one is still served

    # ...and a policy write succeeds and reaches every survivor.
    written = await cluster.write(c1, intention_path("billing", "api"), {"Action": "deny"})
    took = await converge(
        survivors,
        lambda a: intention_action(cluster, a, "billing", "api"),
        "deny",
        PROPAGATION_WITHIN,
        "billing=>api",
    )
    print(f"policy write after the failover in {written:.2f} s, everywhere {took:.2f} s later")


async def test_policy_spreads_by_gossip_broadcast(cluster: Cluster) -> None:
    """A write reaches every running agent within a few gossip rounds, as a catalog
    change does, not only when anti-entropy repairs the difference."""
    running = cluster.running()
    c1 = cluster["c1"]
    await wait_until(lambda: leader_known(cluster, c1), 20, lambda: "a leader")
    await cluster.register(c1, "spread-1")
    catalog = await converge(
        running,
        lambda a: catalog_has(cluster, a, "spread-1"),
        True,
        PROPAGATION_WITHIN,
        "catalog",
    )
    await cluster.write(c1, intention_path("spread", "api"), {"Action": "deny"})
    policy = await converge(
        running,
        lambda a: intention_action(cluster, a, "spread", "api"),
        "deny",
        PROPAGATION_WITHIN,
        "spread=>api",
    )
    print(
        f"\nat {len(running)} agents: a catalog change after {catalog:.2f} s, a policy write"
        f" after {policy:.2f} s"
    )
    assert policy < BROADCAST_WITHIN, (policy, catalog)


async def catalog_has(cluster: Cluster, agent: AgentProcess, service: str) -> bool:
    return service in await cluster.get(agent, "/v1/catalog/services")


# --------------------------------------------------------------------------- 2. restart


async def policy_view(cluster: Cluster, agent: AgentProcess) -> dict[str, object]:
    """Everything an agent serves about policy and trust, without local indexes."""
    view: dict[str, object] = {
        "intentions": without_indexes(await cluster.get(agent, "/v1/connect/intentions")),
        "roots": (await cluster.get(agent, "/v1/agent/connect/ca/roots"))["ActiveRootID"],
        "keep=>api": await allowed(cluster, agent, "keep", "api"),
    }
    for kind in ("service-defaults", "service-resolver", "service-splitter"):
        view[kind] = without_indexes(await cluster.get(agent, f"/v1/config/{kind}"))
    return view


async def test_a_restarted_client_serves_its_policy_before_rejoining(cluster: Cluster) -> None:
    c1, c2 = cluster["c1"], cluster["c2"]
    server = next(s for s in cluster.servers if s.running)
    # Policy to keep: written at c1, in force at c2 (and on its disk).
    await cluster.write(c1, intention_path("keep", "api"), {"Action": "allow"})
    for entry in routing_entries("keep", (50, 50)):
        reply = await cluster.put(c1, "/v1/config", entry)
        assert reply.status == 200, reply
    await cluster.register(c2, "api", 9090)
    leaf = await cluster.get(c2, "/v1/agent/connect/ca/leaf/api")
    before = await policy_view(cluster, c1)
    assert before["keep=>api"] is True
    await converge([c2], lambda a: policy_view(cluster, a), before, PROPAGATION_WITHIN, "c2")

    # Stop c2 (a graceful leave), restart it on the same data_dir with a join address
    # where nobody listens: it cannot rejoin, and still serves what it knew.
    assert await stop_agent(c2) == 0, c2.log_tail()
    nobody = f"127.0.0.1:{free_port()}"
    await cluster.spawn(c2, [nobody])
    started = time.monotonic()
    await wait_agent_ready(c2, cluster.session)
    ready = time.monotonic() - started
    after = await policy_view(cluster, c2)
    assert after == before, (after, before)
    members = await cluster.get(c2, "/v1/agent/members")
    assert [m["Name"] for m in members if m["Status"] == 1] == ["c2"], members
    assert await cluster.leader_address(c2) == ""
    print(f"c2 restarted alone: its first answers ({ready:.1f} s after start) serve the policy")
    # Enforcement and the saved leaf need no leader either.
    authorize = {"Target": "api", "ClientCertURI": leaf["ServiceURI"].replace("/api", "/keep")}
    reply = await cluster.call("POST", c2, "/v1/agent/connect/authorize", authorize)
    assert reply.status == 200 and reply.json()["Authorized"] is True, reply
    restored = await cluster.get(c2, "/v1/agent/connect/ca/leaf/api")
    assert restored["SerialNumber"] == leaf["SerialNumber"]
    assert restored["PrivateKeyPEM"] == leaf["PrivateKeyPEM"]

    # Rejoined, it follows the cluster again: a leader, and new writes arrive.
    reply = await cluster.put(c2, f"/v1/agent/join/{server.gossip_addr}")
    assert reply.status == 200, reply
    took = await wait_until(
        lambda: leader_known(cluster, c2), 15, lambda: f"c2 knows a leader\n{c2.log_tail()}"
    )
    await cluster.write(c1, intention_path("keep", "api"), {"Action": "deny"})
    await converge(
        [c2], lambda a: allowed(cluster, a, "keep", "api"), False, PROPAGATION_WITHIN, "c2"
    )
    print(f"c2 rejoined: leader known {took:.2f} s after the join, new policy arrives")


async def leader_known(cluster: Cluster, agent: AgentProcess) -> bool:
    return await cluster.leader_address(agent) != ""


# --------------------------------------------------------------------------- 3. rotation


@dataclass
class TlsSide:
    """One service's mTLS identity, kept current from its agent with blocking queries
    on its leaf and on the roots; every change rebuilds the ``SSLContext``."""

    cluster: Cluster
    agent: AgentProcess
    service: str
    server_side: bool
    directory: Path
    context: ssl.SSLContext | None = None
    leaf: dict[str, Any] = field(default_factory=dict)
    roots: dict[str, Any] = field(default_factory=dict)
    leaves: list[tuple[float, x509.Certificate]] = field(default_factory=list)
    """(when adopted, leaf certificate), oldest first."""
    root_sets: list[tuple[float, frozenset[str]]] = field(default_factory=list)
    """(when adopted, root IDs trusted), oldest first."""
    errors: list[str] = field(default_factory=list)
    _generation: itertools.count[int] = field(default_factory=itertools.count)
    _watchers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def leaf_path(self) -> str:
        return f"/v1/agent/connect/ca/leaf/{self.service}"

    async def start(self) -> None:
        self.leaf = await self.cluster.get(self.agent, self.leaf_path)
        self.roots = await self.cluster.get(self.agent, "/v1/agent/connect/ca/roots")
        self._rebuild()
        self._watchers = [
            asyncio.create_task(self._watch(self.leaf_path, self._leaf_changed)),
            asyncio.create_task(self._watch("/v1/agent/connect/ca/roots", self._roots_changed)),
        ]

    async def aclose(self) -> None:
        for task in self._watchers:
            task.cancel()
        for task in self._watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self, path: str, changed: Callable[[dict[str, Any]], None]) -> None:
        index = 0
        while True:
            try:
                reply = await self.cluster.call("GET", self.agent, f"{path}?index={index}&wait=5s")
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.errors.append(f"{path}: {exc!r}")
                await asyncio.sleep(0.2)
                continue
            if reply.status != 200:
                self.errors.append(f"{path}: {reply.status} {reply.text}")
                await asyncio.sleep(0.2)
                continue
            index = reply.index
            changed(reply.json())

    def _leaf_changed(self, leaf: dict[str, Any]) -> None:
        if leaf["CertPEM"] != self.leaf["CertPEM"]:
            self.leaf = leaf
            self._rebuild()

    def _roots_changed(self, roots: dict[str, Any]) -> None:
        if [r["ID"] for r in roots["Roots"]] != [r["ID"] for r in self.roots["Roots"]]:
            self.roots = roots
            self._rebuild()

    def _rebuild(self) -> None:
        generation = next(self._generation)
        certfile = self.directory / f"{self.service}-{generation}.crt"
        keyfile = self.directory / f"{self.service}-{generation}.key"
        certfile.write_text(self.leaf["CertPEM"])
        keyfile.write_text(self.leaf["PrivateKeyPEM"])
        keyfile.chmod(0o600)
        context = ssl.SSLContext(
            ssl.PROTOCOL_TLS_SERVER if self.server_side else ssl.PROTOCOL_TLS_CLIENT
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False  # SPIFFE IDs, not host names: checked by hand
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata="".join(r["RootCert"] for r in self.roots["Roots"]))
        context.load_cert_chain(certfile, keyfile)
        self.context = context
        now = time.monotonic()
        cert = certificates(self.leaf["CertPEM"])[0]
        if not self.leaves or self.leaves[-1][1] != cert:
            self.leaves.append((now, cert))
        root_ids = frozenset(r["ID"] for r in self.roots["Roots"])
        if not self.root_sets or self.root_sets[-1][1] != root_ids:
            self.root_sets.append((now, root_ids))

    def adopted_leaf_of(self, root: x509.Certificate) -> float | None:
        """When this side started presenting a leaf signed by ``root``."""
        return next((at for at, cert in self.leaves if issued_by(cert, root)), None)

    def trusts(self, root_id: str) -> float | None:
        return next((at for at, ids in self.root_sets if root_id in ids), None)


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def peer_uri(writer: asyncio.StreamWriter) -> tuple[list[str], bytes]:
    """The peer's URI SANs (from the verified certificate) and its DER."""
    ssl_object = writer.get_extra_info("ssl_object")
    peer = ssl_object.getpeercert()
    uris = [value for kind, value in peer.get("subjectAltName", ()) if kind == "URI"]
    return uris, ssl_object.getpeercert(binary_form=True)


@dataclass
class HandshakeLog:
    client_saw: list[tuple[float, bytes]] = field(default_factory=list)
    """(when the client started, DER of the server's leaf) per good handshake."""
    server_saw: list[tuple[float, bytes]] = field(default_factory=list)
    """(when the server accepted, DER of the client's leaf) per good handshake."""
    failures: list[str] = field(default_factory=list)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1):
            await writer.wait_closed()


async def test_root_rotation_under_a_stream_of_mtls_handshakes(cluster: Cluster) -> None:
    c1, c2 = cluster["c1"], cluster["c2"]
    await wait_until(lambda: leader_known(cluster, c1), 20, lambda: "a leader")
    await cluster.register(c1, "web")
    await cluster.register(c2, "api", 9090)
    tls_dir = cluster.workdir / "tls"
    tls_dir.mkdir(exist_ok=True)
    web = TlsSide(cluster, c1, "web", server_side=False, directory=tls_dir)
    api = TlsSide(cluster, c2, "api", server_side=True, directory=tls_dir)
    log = HandshakeLog()
    trust_domain = (await cluster.get(c1, "/v1/agent/connect/ca/roots"))["TrustDomain"]
    web_uri, api_uri = service_uri(trust_domain, "web"), service_uri(trust_domain, "api")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted = time.monotonic()
        try:
            async with asyncio.timeout(5):
                assert api.context is not None
                await writer.start_tls(api.context)
                uris, der = peer_uri(writer)
                if uris != [web_uri]:
                    raise AssertionError(f"client presented {uris}")
                if await reader.readline() != b"ping\n":
                    raise AssertionError("no ping")
                writer.write(b"ok\n")
                await writer.drain()
            log.server_saw.append((accepted, der))
        except Exception as exc:
            log.failures.append(f"server at {accepted:.2f}: {exc!r}")
        finally:
            await close(writer)

    async def handshake(port: int) -> None:
        started = time.monotonic()
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=web.context, server_hostname="api"
                )
                uris, der = peer_uri(writer)
                if uris != [api_uri]:
                    raise AssertionError(f"server presented {uris}")
                writer.write(b"ping\n")
                await writer.drain()
                if await reader.readline() != b"ok\n":
                    raise AssertionError("no answer")
            log.client_saw.append((started, der))
        except Exception as exc:
            log.failures.append(f"client at {started:.2f}: {exc!r}")
        finally:
            if writer is not None:
                await close(writer)

    async def drive(port: int, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await handshake(port)
            await asyncio.sleep(HANDSHAKE_INTERVAL)

    async def warmed_up() -> bool:
        return len(log.client_saw) >= 20

    stop = asyncio.Event()
    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    driver: asyncio.Task[None] | None = None
    try:
        await web.start()
        await api.start()
        port = listener.sockets[0].getsockname()[1]
        driver = asyncio.create_task(drive(port, stop))
        driving_since = time.monotonic()
        await wait_until(warmed_up, 10, lambda: f"first handshakes: {log.failures[:3]}")
        reply = await cluster.put(c1, "/v1/mesh/ca/rotate")
        assert reply.status == 200, reply
        rotated_at = time.monotonic()
        new_root_id = reply.json()["ActiveRootID"]
        print(f"\nrotation answered in {reply.seconds:.2f} s, new root {new_root_id[:23]}")
        # The new bundle comes to c1 by gossip, like everywhere else.
        roots = {}

        async def c1_has_it() -> bool:
            nonlocal roots
            roots = await cluster.get(c1, "/v1/agent/connect/ca/roots")
            return bool(roots["ActiveRootID"] == new_root_id)

        took = await wait_until(c1_has_it, PROPAGATION_WITHIN, lambda: f"c1 roots {roots}")
        print(f"new bundle at c1 {took:.2f} s after the answer")
        assert len(roots["Roots"]) == 2, roots
        new_root = next(
            certificates(r["RootCert"])[0] for r in roots["Roots"] if r["ID"] == new_root_id
        )

        async def both_reissued() -> bool:
            return all(s.adopted_leaf_of(new_root) for s in (web, api))

        await wait_until(
            both_reissued,
            REISSUE_WITHIN,
            lambda: f"leaves re-issued: web {web.leaves}, api {api.leaves}",
        )
        reissued_at = time.monotonic()

        async def enough() -> bool:
            made = len(log.client_saw) + len(log.failures)
            return time.monotonic() - reissued_at >= AFTER_REISSUE and made >= MIN_HANDSHAKES

        await wait_until(enough, 60, lambda: f"{len(log.client_saw)} handshakes")
    finally:
        stop.set()
        if driver is not None:
            await driver
        listener.close()
        await listener.wait_closed()
        await web.aclose()
        await api.aclose()

    total = len(log.client_saw) + len(log.failures)
    web_new, api_new = web.adopted_leaf_of(new_root), api.adopted_leaf_of(new_root)
    assert web_new is not None and api_new is not None
    print(
        f"{total} handshakes in {time.monotonic() - driving_since:.0f} s, "
        f"{len(log.failures)} failed; after the rotation: new roots trusted by web at "
        f"+{(web.trusts(new_root_id) or 0) - rotated_at:.2f} s, api "
        f"+{(api.trusts(new_root_id) or 0) - rotated_at:.2f} s; leaves re-issued: web "
        f"+{web_new - rotated_at:.1f} s, api +{api_new - rotated_at:.1f} s"
    )
    assert log.failures == [], log.failures[:10]
    assert web.errors == [] and api.errors == [], (web.errors, api.errors)
    assert total >= MIN_HANDSHAKES, total
    # A stream: no stall anywhere, the rotation and the re-issues included.
    starts = [at for at, _ in log.client_saw]
    longest_gap = max(later - earlier for earlier, later in itertools.pairwise(starts))
    assert longest_gap < 2.0, longest_gap
    # Both sides took the new roots and each a new leaf under the new root...
    for side in (web, api):
        trusted_at = side.trusts(new_root_id)
        assert trusted_at is not None and trusted_at >= rotated_at, side.root_sets
        assert len(side.leaves) >= 2 and not issued_by(side.leaves[0][1], new_root)
    # ...and every handshake begun once both presented it used leaves of the new root,
    # in both directions.
    both_new = max(web_new, api_new)
    late_client = [der for at, der in log.client_saw if at > both_new]
    late_server = [der for at, der in log.server_saw if at > both_new]
    assert len(late_client) >= 50 and len(late_server) >= 50, (len(late_client), both_new)
    for der in {*late_client, *late_server}:
        assert issued_by(x509.load_der_x509_certificate(der), new_root)
    print(
        f"longest gap between handshakes {longest_gap * 1000:.0f} ms; {len(late_client)}"
        " handshakes after both re-issues, all with leaves of the new root both ways"
    )
    # Handshakes before the rotation used the old root's leaves.
    early = [der for at, der in log.client_saw if at < rotated_at]
    assert early and not issued_by(x509.load_der_x509_certificate(early[0]), new_root)

    # Every agent serves the new bundle (old root kept until its leaves expire).
    running = cluster.running()

    async def bundle(agent: AgentProcess) -> object:
        roots = await cluster.get(agent, "/v1/agent/connect/ca/roots")
        return (roots["ActiveRootID"], len(roots["Roots"]))

    await converge(running, bundle, (new_root_id, 2), PROPAGATION_WITHIN, "bundle")
    await converge(
        running, lambda a: ca_status(cluster, a), (0, len(running)), 10, "(lagging, listed)"
    )


# --------------------------------------------------------------------------- 4. no leader


async def test_without_a_leader_writes_get_503_and_reads_go_on(cluster: Cluster) -> None:
    c1, c2 = cluster["c1"], cluster["c2"]
    await wait_until(lambda: leader_known(cluster, c1), 20, lambda: "a leader")
    # What to read later, written while there is a leader.
    await cluster.register(c1, "web")
    leaf = await cluster.get(c1, "/v1/agent/connect/ca/leaf/web")
    await cluster.write(c1, intention_path("quorum", "api"), {"Action": "deny"})
    await converge(
        [c1, c2],
        lambda a: intention_action(cluster, a, "quorum", "api"),
        "deny",
        PROPAGATION_WITHIN,
        "quorum=>api",
    )
    before = {a.name: await policy_view(cluster, a) for a in (c1, c2)}

    # kill -9 the leader and another server (2 of the 3 down, counting any already
    # down): no write can land at a leader on its way out.
    leader = cluster.by_gossip_address(await cluster.leader_address(c1))
    others = [s for s in cluster.servers if s.running and s is not leader]
    doomed = [leader, *others[: len(others) - 1]]
    for server in doomed:
        server.kill()
    for server in doomed:
        assert server.process is not None
        await server.process.wait()
    killed_at = time.monotonic()
    down = [s.name for s in cluster.servers if not s.running]
    assert len(down) == 2, down

    # Writes: 503 with a clear message. An intention, a config entry, a rotation, and
    # a leaf for a service registered now (registering is local: no leader needed).
    await cluster.register(c2, "newcomer")
    replies = await asyncio.gather(
        cluster.put(c1, intention_path("quorum", "api"), {"Action": "allow"}),
        cluster.put(c2, "/v1/config", {"Kind": "service-defaults", "Name": "x", "Protocol": "tcp"}),
        cluster.put(c2, "/v1/mesh/ca/rotate"),
        cluster.call("GET", c2, "/v1/agent/connect/ca/leaf/newcomer"),
    )
    answered = time.monotonic() - killed_at
    for reply in replies:
        assert reply.status == 503 and "leader" in reply.text.lower(), reply
    assert answered < NO_LEADER_503_WITHIN, replies
    print(f"\n{down} killed: writes answered 503 {answered:.1f} s later ({replies[0].text!r})")

    # Reads go on, at once, everywhere the agents are (policy, roots, the leaf we had).
    for agent in (c1, c2):
        started = time.monotonic()
        after = await policy_view(cluster, agent)
        assert after == before[agent.name], (agent.name, after, before[agent.name])
        assert await allowed(cluster, agent, "quorum", "api") is False
        assert time.monotonic() - started < 2.0
    reply = await cluster.call("GET", c1, "/v1/agent/connect/ca/leaf/web")
    assert reply.status == 200 and reply.seconds < 2.0, reply
    assert reply.json()["SerialNumber"] == leaf["SerialNumber"]
    reply = await cluster.call("GET", c1, "/v1/connect/intentions/match?by=destination&name=api")
    assert reply.status == 200 and reply.json()["api"], reply

    # ...and the clients stop naming a leader once gossip has declared the old one dead.
    async def no_leader_named() -> bool:
        return await cluster.leader_address(c1) == await cluster.leader_address(c2) == ""

    await wait_until(no_leader_named, 20, lambda: "no leader named at c1 and c2")


# --------------------------------------------------------------------------- 5. ACLs


async def test_acls_guard_policy_writes_but_not_authorize() -> None:
    async with running_cluster(["s1"]) as cluster:
        s1 = cluster["s1"]
        config = cluster.workdir / "acl.toml"
        config.write_text(f'[acl]\nenabled = true\ntoken = "{ACL_TOKEN}"\n')
        await boot(cluster, [s1], ["--server", "--bootstrap-expect", "1", "--config", str(config)])
        path = intention_path("web", "api")

        reply = await cluster.put(s1, path, {"Action": "deny"})
        assert (reply.status, reply.text) == (403, "Permission denied"), reply
        reply = await cluster.put(s1, path, {"Action": "deny"}, token="not-" + ACL_TOKEN)
        assert reply.status == 403, reply
        assert (await cluster.call("GET", s1, path)).status == 404  # nothing was written
        reply = await cluster.put(s1, path, {"Action": "deny"}, token=ACL_TOKEN)
        assert reply.status == 200 and reply.json() is True, reply
        assert await intention_action(cluster, s1, "web", "api") == "deny"  # reads are open

        trust_domain = (await cluster.get(s1, "/v1/agent/connect/ca/roots"))["TrustDomain"]
        authorize = {"Target": "api", "ClientCertURI": service_uri(trust_domain, "web")}
        reply = await cluster.call("POST", s1, "/v1/agent/connect/authorize", authorize)
        assert reply.status == 200, reply
        assert reply.json()["Authorized"] is False, reply

        # The other writes and the leaf (it holds a private key) need the token too.
        assert (await cluster.put(s1, "/v1/mesh/ca/rotate")).status == 403
        body = {"Kind": "service-defaults", "Name": "api", "Protocol": "http"}
        assert (await cluster.put(s1, "/v1/config", body)).status == 403
        reply = await cluster.put(
            s1, "/v1/agent/service/register", {"Name": "web"}, token=ACL_TOKEN
        )
        assert reply.status == 200, reply
        assert (await cluster.call("GET", s1, "/v1/agent/connect/ca/leaf/web")).status == 403
