"""``meshnode.api``: the Consul-compatible HTTP API over a real ``Catalog``.

Only the agent process is faked (``FakeAgent``, a test double for ``AgentHandle``);
requests go through aiohttp's real server stack (``TestServer``/``TestClient``).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, Counter, Gauge

from gossip.events import Member, MemberFailed, MemberState
from meshnode.api import MAX_BODY_BYTES, build_app, serve
from meshnode.catalog import SERF_CHECK_ID, Catalog
from meshnode.config import AclConfig
from meshnode.model import (
    CheckDefinition,
    CheckKind,
    HealthStatus,
    NodeInfo,
    ValidationError,
    parse_registration,
)

TOKEN = "0123456789abcdef-secret"


@dataclass
class FakeAgent:
    """Stands in for the agent process; records what the API asked of it."""

    catalog: Catalog
    changed: int = 0
    ttl_updates: list[tuple[str, HealthStatus, str]] = field(default_factory=list)
    joined: list[str] = field(default_factory=list)
    left: bool = False
    reloads: int = 0
    keyring_calls: list[tuple[str, str | None]] = field(default_factory=list)
    script_checks: bool = False
    extra_members: list[Member] = field(default_factory=list)
    leader_address: str = ""
    servers: list[str] = field(default_factory=list)

    def members(self) -> list[Member]:
        me = Member("node1", ("10.0.0.1", 7946), b"", 3, MemberState.ALIVE, 0.0)
        return [me, *self.extra_members]

    def leader(self) -> str:
        return self.leader_address

    def peers(self) -> list[str]:
        return list(self.servers)

    def self_info(self) -> dict[str, object]:
        return {"Stats": {"meshnode": {"members": "1"}}, "Ignored": "not an object"}

    async def join(self, address: str) -> None:
        if address.startswith("bad"):
            raise ValueError(f"failed to join {address}: no response")
        self.joined.append(address)

    async def leave(self) -> None:
        self.left = True

    def reload(self) -> None:
        self.reloads += 1

    def local_changed(self) -> None:
        self.changed += 1

    def ttl_update(self, check_id: str, status: HealthStatus, output: str) -> None:
        state = self.catalog.local.checks.get(check_id)
        if state is None or state.definition.kind != CheckKind.TTL:
            raise KeyError(check_id)
        self.ttl_updates.append((check_id, status, output))

    def check_allowed(self, check: CheckDefinition) -> None:
        if check.kind == CheckKind.SCRIPT and not self.script_checks:
            raise ValidationError("Args", "script checks are disabled on this agent")

    def mesh_gossip_info(self) -> dict[str, object]:
        return {"Name": "node1", "Members": {"alive": 1}}

    async def keyring(self, op: str, key: str | None) -> dict[str, object]:
        if key == "bad":
            raise ValueError("key is not valid base64")
        self.keyring_calls.append((op, key))
        if op == "list":
            return {"Keys": {"a2V5MQ==": 1}, "NumNodes": 1, "PrimaryKeys": {"a2V5MQ==": 1}}
        return {}


@dataclass
class Env:
    client: TestClient[Any, Any]
    catalog: Catalog
    agent: FakeAgent

    async def put(self, path: str, body: object = None, **kwargs: Any) -> aiohttp.ClientResponse:
        data = kwargs.pop("data", None)
        if data is None and body is not None:
            data = json.dumps(body)
        return await self.client.put(path, data=data, **kwargs)

    async def get_json(self, path: str, **kwargs: Any) -> Any:
        response = await self.client.get(path, **kwargs)
        assert response.status == 200, await response.text()
        return await response.json()


EnvFactory = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env() -> AsyncIterator[EnvFactory]:
    clients: list[TestClient[Any, Any]] = []

    async def factory(acl: AclConfig | None = None) -> Env:
        catalog = Catalog(NodeInfo("node1", "id-node1", "10.0.0.1", "dc1", {"rack": "r1"}))
        agent = FakeAgent(catalog)
        registry = CollectorRegistry()
        Counter("meshnode_test_requests", "Requests.", registry=registry).inc(3)
        Gauge("meshnode_test_level", "A level.", registry=registry).set(7)
        app = build_app(
            agent,
            catalog,
            acl=acl or AclConfig(),
            registry=registry,
            datacenter="dc1",
            node_name="node1",
            rng=random.Random(7),
        )
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return Env(client, catalog, agent)

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture
async def env(make_env: EnvFactory) -> Env:
    return await make_env()


def add_remote_node(catalog: Catalog, name: str, *bodies: dict[str, Any], **meta: str) -> None:
    """Give ``catalog`` another node's record, as gossip would."""
    other = Catalog(NodeInfo(name, f"id-{name}", f"10.0.1.{len(name)}", "dc1", meta))
    for body in bodies:
        service, checks = parse_registration(body)
        other.register_service(service, checks)
    assert catalog.merge(other.local)


WEB_TTL = {
    "Name": "web",
    "ID": "web-1",
    "Tags": ["v1", "primary"],
    "Port": 8080,
    "Meta": {"version": "1"},
    "Check": {"TTL": "30s", "Notes": "heartbeat"},
}


# --------------------------------------------------------------------------- agent writes


async def test_register_with_check_and_agent_views(env: Env) -> None:
    response = await env.put("/v1/agent/service/register", WEB_TTL)
    assert response.status == 200
    assert await response.text() == ""
    assert env.agent.changed == 1

    services = await env.get_json("/v1/agent/services")
    assert services == {
        "web-1": {
            "ID": "web-1",
            "Service": "web",
            "Tags": ["v1", "primary"],
            "Meta": {"version": "1"},
            "Port": 8080,
            "Address": "",
            "TaggedAddresses": {},
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": False,
            "Datacenter": "dc1",
        }
    }
    response = await env.client.get("/v1/agent/service/web-1")
    one = await response.json()
    assert one["Service"] == "web" and one["ContentHash"]
    assert response.headers["X-Consul-ContentHash"]
    missing = await env.client.get("/v1/agent/service/nope")
    assert missing.status == 404

    checks = await env.get_json("/v1/agent/checks")
    assert list(checks) == ["service:web-1"]
    check = checks["service:web-1"]
    assert check["Status"] == "critical"  # Consul starts checks critical
    assert check["ServiceID"] == "web-1" and check["ServiceName"] == "web"
    assert check["ServiceTags"] == ["v1", "primary"]
    assert check["Node"] == "node1" and check["Type"] == "ttl" and check["Notes"] == "heartbeat"


async def test_register_py_consul_style_lowercase_body(env: Env) -> None:
    # What py-consul's agent.service.register(..., check=Check.http(...),
    # extra_checks=[Check.ttl(...)]) sends: lowercase keys, a "checks" list.
    body = {
        "name": "api",
        "id": "api-1",
        "port": 9090,
        "tags": ["x"],
        "enabletagoverride": True,
        "checks": [
            {"http": "http://127.0.0.1:9090/health", "interval": "10s", "timeout": "1s"},
            {"ttl": "15s"},
        ],
    }
    response = await env.put("/v1/agent/service/register", body)
    assert response.status == 200, await response.text()
    checks = await env.get_json("/v1/agent/checks")
    assert sorted(checks) == ["service:api-1:1", "service:api-1:2"]
    assert checks["service:api-1:1"]["Type"] == "http"
    assert checks["service:api-1:1"]["Definition"]["HTTP"] == "http://127.0.0.1:9090/health"
    services = await env.get_json("/v1/agent/services")
    assert services["api-1"]["EnableTagOverride"] is True


async def test_replace_existing_checks(env: Env) -> None:
    body = {"Name": "web", "ID": "web-1", "Checks": [{"TTL": "10s"}, {"TTL": "20s"}]}
    assert (await env.put("/v1/agent/service/register", body)).status == 200
    body = {"Name": "web", "ID": "web-1", "Checks": [{"CheckID": "only", "TTL": "10s"}]}
    path = "/v1/agent/service/register?replace-existing-checks=true"
    assert (await env.put(path, body)).status == 200
    assert sorted(await env.get_json("/v1/agent/checks")) == ["only"]


async def test_check_register_and_deregister(env: Env) -> None:
    await env.put("/v1/agent/service/register", {"Name": "web"})
    # py-consul's agent.check.register body: name, the check, id, notes, serviceid.
    body = {"name": "disk", "ttl": "1m", "id": "disk-1", "notes": "n", "serviceid": "web"}
    response = await env.put("/v1/agent/check/register", body)
    assert response.status == 200, await response.text()
    node_check = {"Name": "mem", "TTL": "1m"}  # node-level: no ServiceID
    assert (await env.put("/v1/agent/check/register", node_check)).status == 200
    checks = await env.get_json("/v1/agent/checks")
    assert checks["disk-1"]["ServiceID"] == "web" and checks["mem"]["ServiceID"] == ""
    assert (await env.put("/v1/agent/check/deregister/disk-1")).status == 200
    assert "disk-1" not in await env.get_json("/v1/agent/checks")
    assert (await env.put("/v1/agent/check/deregister/disk-1")).status == 404
    assert env.agent.changed == 4


async def test_deregister_service_removes_its_checks(env: Env) -> None:
    await env.put("/v1/agent/service/register", WEB_TTL)
    assert (await env.put("/v1/agent/service/deregister/web-1")).status == 200
    assert await env.get_json("/v1/agent/services") == {}
    assert await env.get_json("/v1/agent/checks") == {}
    assert await env.get_json("/v1/catalog/service/web") == []
    response = await env.put("/v1/agent/service/deregister/web-1")
    assert response.status == 404
    assert "web-1" in await response.text()


# --------------------------------------------------------------------------- TTL


async def test_ttl_pass_warn_fail_update_flip_health(env: Env) -> None:
    await env.put("/v1/agent/service/register", WEB_TTL)

    async def status() -> str:
        entries = await env.get_json("/v1/health/checks/web")
        assert len(entries) == 1
        return str(entries[0]["Status"])

    assert await status() == "critical"
    assert (await env.put("/v1/agent/check/pass/service:web-1?note=all%20good")).status == 200
    assert await status() == "passing"
    checks = await env.get_json("/v1/agent/checks")
    assert checks["service:web-1"]["Output"] == "all good"
    assert (await env.put("/v1/agent/check/warn/service:web-1")).status == 200
    assert await status() == "warning"
    assert (await env.put("/v1/agent/check/fail/service:web-1")).status == 200
    assert await status() == "critical"
    update = {"Status": "passing", "Output": "ok from nomad"}
    assert (await env.put("/v1/agent/check/update/service:web-1", update)).status == 200
    assert await status() == "passing"
    assert env.agent.ttl_updates == [
        ("service:web-1", HealthStatus.PASSING, "all good"),
        ("service:web-1", HealthStatus.WARNING, ""),
        ("service:web-1", HealthStatus.CRITICAL, ""),
        ("service:web-1", HealthStatus.PASSING, "ok from nomad"),
    ]
    passing = await env.get_json("/v1/health/service/web?passing")
    assert [e["Service"]["ID"] for e in passing] == ["web-1"]


async def test_ttl_errors(env: Env) -> None:
    body = {"Name": "web", "Check": {"HTTP": "http://127.0.0.1:1/", "Interval": "10s"}}
    await env.put("/v1/agent/service/register", body)
    assert (await env.put("/v1/agent/check/pass/nope")).status == 404
    response = await env.put("/v1/agent/check/pass/service:web")
    assert response.status == 400
    assert "TTL" in await response.text()
    bad = {"Status": "sideways"}
    response = await env.put("/v1/agent/check/update/service:web", bad)
    assert response.status == 400
    assert "Status" in await response.text()


# --------------------------------------------------------------------------- catalog


async def test_catalog_shapes_and_filters(env: Env) -> None:
    await env.put("/v1/agent/service/register", WEB_TTL)
    add_remote_node(
        env.catalog,
        "node2",
        {"Name": "web", "ID": "web-2", "Tags": ["v2"], "Address": "10.9.9.9", "Port": 80},
        {"Name": "db", "Tags": ["primary"]},
        rack="r2",
    )

    assert await env.get_json("/v1/catalog/services") == {
        "db": ["primary"],
        "web": ["primary", "v1", "v2"],
    }
    meta_filtered = await env.get_json("/v1/catalog/services?node-meta=rack:r2")
    assert meta_filtered == {"db": ["primary"], "web": ["v2"]}

    web = await env.get_json("/v1/catalog/service/web")
    assert [(e["Node"], e["ServiceID"]) for e in web] == [("node1", "web-1"), ("node2", "web-2")]
    first = web[0]
    assert first["Address"] == "10.0.0.1" and first["ServiceAddress"] == ""
    assert first["Datacenter"] == "dc1" and first["NodeMeta"] == {"rack": "r1"}
    assert first["ServiceTags"] == ["v1", "primary"] and first["ServicePort"] == 8080
    assert first["TaggedAddresses"]["lan"] == "10.0.0.1"
    assert first["CreateIndex"] >= 1 and first["ModifyIndex"] >= first["CreateIndex"]
    for key in ("ServiceMeta", "ServiceWeights", "ServiceEnableTagOverride", "ServiceKind"):
        assert key in first
    tagged = await env.get_json("/v1/catalog/service/web?tag=v2")
    assert [e["ServiceID"] for e in tagged] == ["web-2"]
    both = await env.get_json("/v1/catalog/service/web?tag=v1&tag=primary")
    assert [e["ServiceID"] for e in both] == ["web-1"]
    by_meta = await env.get_json("/v1/catalog/service/web?node-meta=rack:r1")
    assert [e["Node"] for e in by_meta] == ["node1"]
    assert await env.get_json("/v1/catalog/service/unknown") == []

    nodes = await env.get_json("/v1/catalog/nodes")
    assert [n["Node"] for n in nodes] == ["node1", "node2"]
    assert nodes[0]["ID"] == "id-node1" and nodes[0]["Meta"] == {"rack": "r1"}
    assert [n["Node"] for n in await env.get_json("/v1/catalog/nodes?node-meta=rack:r2")] == [
        "node2"
    ]
    node = await env.get_json("/v1/catalog/node/node2")
    assert node["Node"]["Node"] == "node2"
    assert sorted(node["Services"]) == ["db", "web-2"]
    assert node["Services"]["web-2"]["Address"] == "10.9.9.9"
    assert node["Services"]["web-2"]["ModifyIndex"] >= 1
    assert await env.get_json("/v1/catalog/node/ghost") is None
    assert await env.get_json("/v1/catalog/datacenters") == ["dc1"]


async def test_health_service_includes_serf_health_and_filters(env: Env) -> None:
    await env.put("/v1/agent/service/register", WEB_TTL)
    add_remote_node(
        env.catalog,
        "node2",
        {"Name": "web", "ID": "web-2", "Tags": ["v2"], "Check": {"TTL": "1m", "Status": "passing"}},
    )
    entries = await env.get_json("/v1/health/service/web")
    assert [e["Node"]["Node"] for e in entries] == ["node1", "node2"]
    for entry in entries:
        assert entry["Checks"][0]["CheckID"] == SERF_CHECK_ID
        assert entry["Checks"][0]["Status"] == "passing"
        assert set(entry["Service"]) >= {"ID", "Service", "Tags", "Address", "Port", "Meta"}
        assert set(entry["Node"]) >= {"ID", "Node", "Address", "Datacenter", "Meta"}
    # web-1's TTL check starts critical, so only web-2 passes.
    passing = await env.get_json("/v1/health/service/web?passing")
    assert [e["Service"]["ID"] for e in passing] == ["web-2"]
    assert await env.get_json("/v1/health/service/web?passing=false") == entries
    tagged = await env.get_json("/v1/health/service/web?tag=v1")
    assert [e["Service"]["ID"] for e in tagged] == ["web-1"]
    bad = await env.client.get("/v1/health/service/web?passing=maybe")
    assert bad.status == 400

    # Gossip declares node2 dead: serfHealth goes critical, ?passing drops it.
    dead = Member("node2", ("10.0.1.5", 7946), b"", 1, MemberState.DEAD, 0.0)
    env.catalog.on_member_event(MemberFailed(dead), 1.0)
    assert await env.get_json("/v1/health/service/web?passing") == []
    node2 = await env.get_json("/v1/health/node/node2")
    assert node2[0]["CheckID"] == SERF_CHECK_ID and node2[0]["Status"] == "critical"

    states = await env.get_json("/v1/health/state/critical")
    assert {(c["Node"], c["CheckID"]) for c in states} == {
        ("node1", "service:web-1"),
        ("node2", SERF_CHECK_ID),
    }
    everything = await env.get_json("/v1/health/state/any")
    assert len(everything) == 4  # two serfHealth, two TTL checks
    assert (await env.client.get("/v1/health/state/bogus")).status == 400


async def test_maintenance_modes(env: Env) -> None:
    await env.put("/v1/agent/service/register", {"Name": "web", "ID": "web-1"})
    assert len(await env.get_json("/v1/health/service/web?passing")) == 1

    # py-consul sends Python's True/False.
    path = "/v1/agent/service/maintenance/web-1?enable=True&reason=deploying"
    assert (await env.put(path)).status == 200
    checks = await env.get_json("/v1/agent/checks")
    maintenance = checks["_service_maintenance:web-1"]
    assert maintenance["Status"] == "critical" and maintenance["Notes"] == "deploying"
    assert await env.get_json("/v1/health/service/web?passing") == []
    assert (await env.put("/v1/agent/service/maintenance/web-1?enable=false")).status == 200
    assert len(await env.get_json("/v1/health/service/web?passing")) == 1

    assert (await env.put("/v1/agent/service/maintenance/nope?enable=true")).status == 404
    assert (await env.put("/v1/agent/service/maintenance/web-1")).status == 400
    assert (await env.put("/v1/agent/service/maintenance/web-1?enable=yes")).status == 400

    assert (await env.put("/v1/agent/maintenance?enable=true")).status == 200
    assert "_node_maintenance" in await env.get_json("/v1/agent/checks")
    assert await env.get_json("/v1/health/service/web?passing") == []
    assert (await env.put("/v1/agent/maintenance?enable=0")).status == 200
    assert "_node_maintenance" not in await env.get_json("/v1/agent/checks")
    assert env.agent.changed == 5


# --------------------------------------------------------------------------- blocking


def index_of(response: aiohttp.ClientResponse) -> int:
    return int(response.headers["X-Consul-Index"])


async def test_blocking_query_returns_on_change(env: Env) -> None:
    await env.put("/v1/agent/service/register", WEB_TTL)
    first = await env.client.get("/v1/health/service/web")
    index = index_of(first)

    async def blocked() -> tuple[int, Any, float]:
        started = time.monotonic()
        response = await env.client.get(f"/v1/health/service/web?index={index}&wait=10s")
        return index_of(response), await response.json(), time.monotonic() - started

    task = asyncio.create_task(blocked())
    await asyncio.sleep(0.2)
    assert not task.done()
    # A change to another service does not wake this query.
    await env.put("/v1/agent/service/register", {"Name": "other"})
    await asyncio.sleep(0.2)
    assert not task.done()
    await env.put("/v1/agent/check/pass/service:web-1")
    new_index, body, elapsed = await asyncio.wait_for(task, 5)
    assert new_index > index
    assert body[0]["Checks"][1]["Status"] == "passing"
    assert elapsed < 5


async def test_blocking_query_times_out_with_same_index(env: Env) -> None:
    await env.put("/v1/agent/service/register", WEB_TTL)
    index = index_of(await env.client.get("/v1/catalog/services"))
    started = time.monotonic()
    response = await env.client.get(f"/v1/catalog/services?index={index}&wait=1s&stale")
    elapsed = time.monotonic() - started
    assert response.status == 200
    assert index_of(response) == index
    # wait plus at most wait/16 of jitter.
    assert 0.9 <= elapsed < 1.0 + 1 / 16 + 0.5


async def test_blocking_query_answers_at_once_when_index_is_behind_or_ahead(env: Env) -> None:
    await env.put("/v1/agent/service/register", WEB_TTL)
    current = index_of(await env.client.get("/v1/catalog/service/web"))
    started = time.monotonic()
    behind = await env.client.get(f"/v1/catalog/service/web?index={current - 1}&wait=10s")
    assert index_of(behind) == current
    # An index from before a restart (above anything we have): answer, don't hold.
    ahead = await env.client.get("/v1/catalog/service/web?index=999999&wait=10s")
    assert index_of(ahead) == current
    assert time.monotonic() - started < 2


async def test_hash_blocking_on_agent_services(env: Env) -> None:
    response = await env.client.get("/v1/agent/services")
    content_hash = response.headers["X-Consul-ContentHash"]

    async def blocked() -> aiohttp.ClientResponse:
        return await env.client.get(f"/v1/agent/services?hash={content_hash}&wait=10s")

    task = asyncio.create_task(blocked())
    await asyncio.sleep(0.2)
    assert not task.done()
    await env.put("/v1/agent/service/register", {"Name": "web"})
    changed = await asyncio.wait_for(task, 5)
    assert changed.headers["X-Consul-ContentHash"] != content_hash
    assert list(await changed.json()) == ["web"]


@pytest.mark.parametrize("query", ["index=abc", "index=-1", "index=1&wait=10", "index=1&wait=soon"])
async def test_bad_blocking_parameters(env: Env, query: str) -> None:
    response = await env.client.get(f"/v1/catalog/services?{query}")
    assert response.status == 400
    assert "Invalid" in await response.text()


# --------------------------------------------------------------------------- headers


async def test_consul_headers_on_every_response(env: Env) -> None:
    env.agent.leader_address = "10.0.0.2:7946"
    await env.put("/v1/agent/service/register", WEB_TTL)
    requests = [
        ("GET", "/v1/agent/self"),
        ("GET", "/v1/agent/services"),
        ("GET", "/v1/catalog/services"),
        ("GET", "/v1/catalog/service/web"),
        ("GET", "/v1/catalog/service/never-registered"),
        ("GET", "/v1/health/service/web"),
        ("GET", "/v1/health/node/ghost"),
        ("GET", "/v1/status/leader"),
        ("GET", "/v1/agent/metrics?format=prometheus"),
        ("PUT", "/v1/agent/check/pass/service:web-1"),
        ("PUT", "/v1/agent/service/deregister/ghost"),  # 404
        ("GET", "/v1/no/such/endpoint"),  # router 404
        ("DELETE", "/v1/agent/services"),  # 405
        ("PUT", "/v1/agent/service/register"),  # 400: empty body
    ]
    for method, path in requests:
        response = await env.client.request(method, path)
        assert int(response.headers["X-Consul-Index"]) >= 1, path
        assert response.headers["X-Consul-KnownLeader"] == "true", path
        assert response.headers["X-Consul-LastContact"] == "0", path


async def test_known_leader_header_follows_the_agent(env: Env) -> None:
    for path in ("/v1/status/leader", "/v1/catalog/services", "/v1/no/such/endpoint"):
        response = await env.client.get(path)
        assert response.headers["X-Consul-KnownLeader"] == "false", path
    env.agent.leader_address = "10.0.0.2:7946"
    response = await env.client.get("/v1/catalog/services")
    assert response.headers["X-Consul-KnownLeader"] == "true"


async def test_index_never_zero_and_never_backwards(env: Env) -> None:
    fresh = await env.client.get("/v1/catalog/service/nothing")
    assert index_of(fresh) >= 1
    seen = [index_of(await env.client.get("/v1/catalog/services"))]
    for n in range(3):
        await env.put("/v1/agent/service/register", {"Name": f"svc{n}"})
        seen.append(index_of(await env.client.get("/v1/catalog/services")))
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


async def test_method_not_allowed(env: Env) -> None:
    assert (await env.client.get("/v1/agent/service/register")).status in (404, 405)
    assert (await env.client.post("/v1/agent/check/pass/x")).status == 405
    assert (await env.client.delete("/v1/catalog/services")).status == 405


# --------------------------------------------------------------------------- bad input


OVERSIZED = json.dumps({"Name": "web", "Meta": {"k": "x" * (MAX_BODY_BYTES + 10)}})


@pytest.mark.parametrize(
    ("path", "data", "message"),
    [
        ("/v1/agent/service/register", "{not json", "decode"),
        ("/v1/agent/service/register", "", "empty"),
        ("/v1/agent/service/register", '{"Name": "web", "Port": NaN}', "NaN"),
        ("/v1/agent/service/register", "[1, 2]", "object"),
        ("/v1/agent/service/register", '{"Name": "web", "Port": "80"}', "Port"),
        ("/v1/agent/service/register", '{"Name": 5}', "Name"),
        ("/v1/agent/service/register", '{"Name": "web", "Tags": "a,b"}', "Tags"),
        ("/v1/agent/service/register", '{"Port": 80}', "name"),
        (
            "/v1/agent/service/register",
            '{"Name": "web", "Check": {"GRPC": "127.0.0.1:1", "Interval": "5s"}}',
            "gRPC",
        ),
        ("/v1/agent/service/register", '{"Name": "web", "Check": {"Interval": "5s"}}', "type"),
        (
            "/v1/agent/service/register",
            '{"Name": "web", "Checks": [{"TTL": "5s"}, {"TTL": "soon"}]}',
            "Checks[1].TTL",
        ),
        (
            "/v1/agent/service/register",
            '{"Name": "web", "Check": {"Args": ["/bin/true"], "Interval": "5s"}}',
            "script",
        ),
        ("/v1/agent/service/register", OVERSIZED, "too large"),
        ("/v1/agent/check/register", '{"Name": "c", "TTL": "5s", "ServiceID": "ghost"}', "ghost"),
        ("/v1/agent/check/register", '{"Name": "c"}', "type"),
    ],
)
async def test_bad_input_is_400_and_changes_nothing(
    env: Env, path: str, data: str, message: str
) -> None:
    index_before = env.catalog.index
    version_before = env.catalog.local.version
    response = await env.client.put(path, data=data)
    assert response.status == 400
    text = await response.text()
    assert message.lower() in text.lower(), text
    assert response.headers["Content-Type"].startswith("text/plain")
    assert env.catalog.index == index_before
    assert env.catalog.local.version == version_before
    assert env.catalog.local_services() == {}
    assert env.agent.changed == 0


async def test_oversized_body_without_content_length(env: Env) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536

    response = await env.client.put("/v1/agent/service/register", data=chunks())
    assert response.status == 400
    assert env.catalog.local_services() == {}


async def test_filter_expressions_are_refused_not_ignored(env: Env) -> None:
    assert (await env.client.get("/v1/agent/checks?filter=")).status == 200  # Nomad
    response = await env.client.get('/v1/catalog/service/web?filter=Service=="web"')
    assert response.status == 400


# --------------------------------------------------------------------------- ACL


async def test_acl_writes_need_the_token(make_env: EnvFactory) -> None:
    env = await make_env(AclConfig(enabled=True, token=TOKEN))
    body = {"Name": "web"}
    denied = await env.put("/v1/agent/service/register", body)
    assert denied.status == 403
    assert await denied.text() == "Permission denied"
    assert int(denied.headers["X-Consul-Index"]) >= 1
    wrong = await env.put("/v1/agent/service/register", body, headers={"X-Consul-Token": "nope"})
    assert wrong.status == 403
    assert env.catalog.local_services() == {}
    assert env.agent.changed == 0

    ok = await env.put("/v1/agent/service/register", body, headers={"X-Consul-Token": TOKEN})
    assert ok.status == 200
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert (
        await env.put("/v1/agent/service/maintenance/web?enable=1", headers=bearer)
    ).status == 200
    assert (await env.put(f"/v1/agent/service/deregister/web?token={TOKEN}")).status == 200
    assert (await env.put("/v1/agent/leave")).status == 403
    assert not env.agent.left

    # Reads stay open, except the keyring listing (it shows the gossip keys).
    assert (await env.client.get("/v1/agent/services")).status == 200
    assert (await env.client.get("/v1/health/service/web")).status == 200
    assert (await env.client.get("/v1/operator/keyring")).status == 403
    keyring = await env.client.get("/v1/operator/keyring", headers={"X-Consul-Token": TOKEN})
    assert keyring.status == 200


async def test_acl_enabled_without_a_token_refuses_writes(make_env: EnvFactory) -> None:
    env = await make_env(AclConfig(enabled=True, token=None))
    response = await env.put(
        "/v1/agent/service/register", {"Name": "w"}, headers={"X-Consul-Token": ""}
    )
    assert response.status == 403


# --------------------------------------------------------------------------- agent node


async def test_self_members_join_leave(env: Env) -> None:
    me = await env.get_json("/v1/agent/self")
    assert all(isinstance(value, dict) for value in me.values())
    assert me["Config"]["Datacenter"] == "dc1" and me["Config"]["NodeName"] == "node1"
    assert me["Config"]["Version"].count(".") == 2
    assert me["Member"]["Tags"]["build"].startswith(me["Config"]["Version"] + ":")
    assert me["Stats"]["meshnode"] == {"members": "1"}  # merged from self_info()
    assert "Ignored" not in me

    # The agent's additions merge into sections the API fills, not over them.
    extra: dict[str, object] = {
        "Member": {"Tags": {"role": "x"}},
        "Stats": {"agent": {"extra": "1"}},
    }
    env.agent.self_info = lambda: extra  # type: ignore[method-assign]
    merged = await env.get_json("/v1/agent/self")
    assert merged["Member"]["Tags"]["build"] == me["Member"]["Tags"]["build"]
    assert merged["Member"]["Tags"]["role"] == "x"
    assert merged["Stats"]["agent"]["extra"] == "1"
    assert merged["Stats"]["agent"]["services"] == me["Stats"]["agent"]["services"]

    env.agent.extra_members = [
        Member("node0", ("10.0.0.9", 7946), b"", 1, MemberState.SUSPECT, 0.0),
        Member("node3", ("10.0.0.8", 7946), b"", 1, MemberState.DEAD, 0.0),
        Member("node4", ("10.0.0.7", 7946), b"", 1, MemberState.LEFT, 0.0),
    ]
    members = await env.get_json("/v1/agent/members")
    assert [(m["Name"], m["Status"]) for m in members] == [
        ("node0", 1),
        ("node1", 1),
        ("node3", 4),
        ("node4", 3),
    ]
    assert members[0]["State"] == "suspect"
    assert members[1]["Addr"] == "10.0.0.1" and members[1]["Port"] == 7946
    assert members[1]["Tags"]["dc"] == "dc1"
    assert await env.get_json("/v1/agent/members?wan=1") == []

    assert (await env.put("/v1/agent/join/10.0.0.2:7946")).status == 200
    assert env.agent.joined == ["10.0.0.2:7946"]
    failed = await env.put("/v1/agent/join/bad-host")
    assert failed.status == 500
    assert "bad-host" in await failed.text()
    assert (await env.put("/v1/agent/reload")).status == 200
    assert env.agent.reloads == 1
    assert (await env.put("/v1/agent/leave")).status == 200
    assert env.agent.left


async def test_status_and_mesh_endpoints(env: Env) -> None:
    leader = await env.client.get("/v1/status/leader")
    assert await leader.text() == '""'
    assert await env.get_json("/v1/status/peers") == []
    assert await env.get_json("/v1/mesh/gossip") == {"Name": "node1", "Members": {"alive": 1}}
    pretty = await env.client.get("/v1/status/peers?pretty")
    assert await pretty.text() == "[]"
    env.agent.leader_address = "10.0.0.2:7946"
    env.agent.servers = ["10.0.0.1:7946", "10.0.0.2:7946", "10.0.0.3:7946"]
    assert await env.get_json("/v1/status/leader") == "10.0.0.2:7946"
    assert await env.get_json("/v1/status/peers") == env.agent.servers


async def test_keyring_calls_through(env: Env) -> None:
    listing = await env.get_json("/v1/operator/keyring")
    assert listing == [
        {
            "WAN": False,
            "Datacenter": "dc1",
            "Segment": "",
            "Messages": {},
            "Keys": {"a2V5MQ==": 1},
            "NumNodes": 1,
            "PrimaryKeys": {"a2V5MQ==": 1},
        }
    ]
    key = {"Key": "bmV3a2V5bmV3a2V5bmV3aw=="}
    assert (await env.client.post("/v1/operator/keyring", data=json.dumps(key))).status == 200
    assert (await env.client.put("/v1/operator/keyring", data=json.dumps(key))).status == 200
    assert (await env.client.delete("/v1/operator/keyring", data=json.dumps(key))).status == 200
    assert env.agent.keyring_calls == [
        ("list", None),
        ("install", key["Key"]),
        ("use", key["Key"]),
        ("remove", key["Key"]),
    ]
    bad = await env.client.post("/v1/operator/keyring", data='{"Key": "bad"}')
    assert bad.status == 400
    assert "base64" in await bad.text()
    assert (await env.client.post("/v1/operator/keyring", data="{}")).status == 400


async def test_metrics_formats(env: Env) -> None:
    response = await env.client.get("/v1/agent/metrics?format=prometheus")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert "meshnode_test_requests_total 3.0" in text
    assert "meshnode_test_level 7.0" in text
    metrics = await env.get_json("/v1/agent/metrics")
    assert set(metrics) == {"Timestamp", "Gauges", "Points", "Counters", "Samples"}
    assert {"Name": "meshnode_test_level", "Value": 7.0, "Labels": {}} in metrics["Gauges"]
    assert [c["Name"] for c in metrics["Counters"]] == ["meshnode_test_requests_total"]


# --------------------------------------------------------------------------- serve


async def test_serve_binds_a_free_port_and_shutdown_wakes_blocked_queries() -> None:
    catalog = Catalog(NodeInfo("node1", "id-node1", "127.0.0.1", "dc1"))
    app = build_app(
        FakeAgent(catalog),
        catalog,
        acl=AclConfig(),
        registry=CollectorRegistry(),
        datacenter="dc1",
        node_name="node1",
    )
    runner, port = await serve(app, "127.0.0.1", 0)
    assert port > 0
    async with aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{port}"
        async with session.get(f"{base}/v1/status/leader") as response:
            assert response.status == 200
        index = catalog.index

        async def blocked() -> int:
            async with session.get(f"{base}/v1/catalog/services?index={index}") as response:
                return response.status

        task = asyncio.create_task(blocked())
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await runner.cleanup()  # default wait is 5 minutes: shutdown must not wait it out
        assert time.monotonic() - started < 5
        assert await asyncio.wait_for(task, 5) == 200
