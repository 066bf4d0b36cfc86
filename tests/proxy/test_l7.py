"""proxy.l7: client → HttpOutboundListener → mTLS → HttpInbound → HTTP backend, on
127.0.0.1 with real certificates and the real runtime (``compile_snapshot``).

The backends are aiohttp servers and the client is aiohttp's, so framing is checked
against an independent HTTP implementation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from proxy import tls
from proxy.l7 import HttpInbound, HttpOutboundListener
from proxy.match import HttpMatch
from proxy.runtime import compile_snapshot
from proxy.snapshot import (
    AccessLog,
    Certificate,
    Cluster,
    Endpoint,
    Inbound,
    InboundTarget,
    IntentionRule,
    Limits,
    LocalService,
    Outlier,
    Permission,
    RateLimit,
    RetryPolicy,
    Route,
    Snapshot,
    SplitTarget,
    Upstream,
)
from proxy.telemetry import AccessLogger, Telemetry
from tests.proxy.test_tls import Leaf, Pki, make_pki

WAIT_S = 20.0
Address = tuple[str, int]


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki("test.meshnode")


# ------------------------------------------------------------------------ backend


@dataclass
class Backend:
    name: str
    runner: web.AppRunner
    address: Address
    hits: Counter[str] = field(default_factory=Counter)
    sources: list[str | None] = field(default_factory=list)
    fail_with: int = 0
    """Answer every request with this status (0: behave)."""


async def start_backend(name: str) -> Backend:
    backend: Backend

    async def echo(request: web.Request) -> web.StreamResponse:
        backend.hits[request.path] += 1
        backend.sources.append(request.headers.get("x-meshnode-source"))
        if backend.fail_with:
            await request.read()
            return web.Response(status=backend.fail_with, text=f"{name} fails")
        path = request.path
        if path.startswith("/slow"):
            await asyncio.sleep(float(request.query.get("s", "2")))
        if path.startswith("/stall"):
            response = web.StreamResponse(headers={"x-backend": name})
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(b"first;")
            await asyncio.sleep(float(request.query.get("s", "2")))
            await response.write(b"late;")
            await response.write_eof()
            return response
        if path.startswith("/chunked"):
            response = web.StreamResponse(headers={"x-backend": name})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for i in range(int(request.query.get("n", "5"))):
                await response.write(b"piece %d;" % i)
            await response.write_eof()
            return response
        if path.startswith("/ws"):
            # A WebSocket echo (tests/proxy/test_l7_upgrade.py): greets, then echoes
            # every message; "close" makes the server close.
            if request.headers.get("upgrade", "").lower() != "websocket":
                return web.Response(status=426, text="websocket only")
            socket = web.WebSocketResponse()
            await socket.prepare(request)
            await socket.send_str(f"hello from {name}")
            async for message in socket:
                if message.type == aiohttp.WSMsgType.TEXT and message.data == "close":
                    break
                if message.type == aiohttp.WSMsgType.TEXT:
                    await socket.send_str(message.data)
                elif message.type == aiohttp.WSMsgType.BINARY:
                    await socket.send_bytes(message.data)
            await socket.close()
            return socket
        if path.startswith("/big"):
            size = int(request.query["n"])
            return web.Response(body=b"x" * size, headers={"x-backend": name})
        body = await request.read()
        headers = {"x-backend": name, "x-path": path, "x-method": request.method}
        return web.Response(body=body or name.encode(), headers=headers)

    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = cast(tuple[str, int], runner.addresses[0])[:2]
    backend = Backend(name, runner, (host, port))
    return backend


# --------------------------------------------------------------------------- mesh


@dataclass
class Host:
    """One destination host: an mTLS acceptor handing connections to HttpInbound."""

    inbound: HttpInbound
    server: asyncio.Server
    backend: Backend
    accepted: list[str | None] = field(default_factory=list)

    @property
    def address(self) -> Address:
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port


class _Acceptor(asyncio.Protocol):
    """The L4 inbound listener's part, reduced: after the handshake, hand over."""

    def __init__(self, host: Host, service: LocalService, target: InboundTarget) -> None:
        self.host = host
        self.service = service
        self.target = target

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = tls.peer_spiffe_id(transport.get_extra_info("ssl_object"))
        self.host.accepted.append(peer)
        self.host.inbound.take_over(
            cast(asyncio.Transport, transport), self.service, self.target, peer
        )


def certificate(leaf: Leaf) -> Certificate:
    return Certificate(leaf.chain_pem, leaf.key_pem, leaf.spiffe_id)


@dataclass
class Mesh:
    pki: Pki
    hosts: list[Host]
    outbound: HttpOutboundListener
    telemetry: Telemetry
    log_lines: list[str]

    def url(self, path: str) -> str:
        host, port = self.outbound.address
        return f"http://{host}:{port}{path}"

    def counter(self, name: str) -> float:
        dump = self.telemetry.dump()
        return sum(value for n, _, value in dump["counters"] if n == f"meshnode_proxy_{name}_total")


@dataclass
class Knobs:
    """What a test changes; the rest is the defaults of the snapshot types."""

    backends: int = 1
    service: Mapping[str, Any] = field(default_factory=dict)
    """LocalService fields (intentions, rate_limit, request_timeout...)."""
    route: Mapping[str, Any] = field(default_factory=dict)
    upstream: Mapping[str, Any] = field(default_factory=dict)
    """Upstream fields (idle_timeout...)."""
    cluster: Mapping[str, Any] = field(default_factory=dict)
    split: tuple[int, ...] = ()
    """Weights (1/100 %) over clusters c0, c1... each of one backend; () = one cluster."""
    dead_endpoints: int = 0
    """Extra endpoints first in the cluster that refuse connections."""


def _service(api: Leaf, knobs: Knobs) -> LocalService:
    fields: dict[str, Any] = {"default_allow": True, "protocol": "http"}
    fields.update(knobs.service)
    return LocalService("api", certificate(api), **fields)


async def _dead_port() -> int:
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return port


@contextlib.asynccontextmanager
async def mesh(pki: Pki, knobs: Knobs | None = None) -> AsyncIterator[Mesh]:
    knobs = knobs or Knobs()
    api, web_leaf = pki.leaf("api"), pki.leaf("web")
    telemetry = Telemetry()
    lines: list[str] = []
    access_log = AccessLogger(AccessLog(sample=1.0), lines.append, random.Random(1))
    loop = asyncio.get_running_loop()
    hosts: list[Host] = []
    outbound: HttpOutboundListener | None = None
    try:
        for i in range(knobs.backends if not knobs.split else len(knobs.split)):
            backend = await start_backend(f"b{i}")
            service = _service(api, knobs)
            target = InboundTarget("api", (backend.address,))
            inbound_snapshot = Snapshot(
                1,
                pki.trust_domain,
                (pki.root_pem,),
                inbound=Inbound("127.0.0.1", 0, {"api": service}, {"api": target}),
            )
            runtime = compile_snapshot(inbound_snapshot, None, random.Random(i)).inbound
            assert runtime is not None
            context = tls.server_context([pki.root_pem], api.chain_pem, api.key_pem)
            host = Host(HttpInbound(runtime, telemetry, access_log), cast(Any, None), backend)
            host.server = await loop.create_server(
                lambda h=host, s=service, t=target: _Acceptor(h, s, t),  # type: ignore[misc]
                "127.0.0.1",
                0,
                ssl=context,
            )
            hosts.append(host)
        dead = [
            Endpoint("127.0.0.1", await _dead_port(), "api") for _ in range(knobs.dead_endpoints)
        ]
        endpoints = [Endpoint(*h.address, "api") for h in hosts]
        cluster_fields: dict[str, Any] = {"connect_timeout": 2.0}
        cluster_fields.update(knobs.cluster)
        identity = api.spiffe_id
        if knobs.split:
            clusters = {
                f"c{i}": Cluster(f"c{i}", "api", identity, (e,), **cluster_fields)
                for i, e in enumerate(endpoints)
            }
            splits = tuple(SplitTarget(w, f"c{i}") for i, w in enumerate(knobs.split))
        else:
            clusters = {
                "api": Cluster("api", "api", identity, (*dead, *endpoints), **cluster_fields)
            }
            splits = (SplitTarget(10_000, "api"),)
        route = Route("api/default", splits, **knobs.route)
        upstream = Upstream(
            "web",
            "api",
            "127.0.0.1",
            0,
            certificate(web_leaf),
            (route,),
            clusters,
            "http",
            **knobs.upstream,
        )
        snapshot = Snapshot(2, pki.trust_domain, (pki.root_pem,), upstreams=(upstream,))
        runtime_out = compile_snapshot(snapshot, None, random.Random(7)).upstreams[("127.0.0.1", 0)]
        contexts = tls.ClientContexts([pki.root_pem], web_leaf.chain_pem, web_leaf.key_pem)
        outbound = HttpOutboundListener(
            runtime_out, contexts, telemetry, access_log, rng=random.Random(3)
        )
        await outbound.start()
        yield Mesh(pki, hosts, outbound, telemetry, lines)
    finally:
        if outbound is not None:
            await outbound.aclose()
        for host in hosts:
            host.server.close()
            await host.inbound.aclose()
            await host.backend.runner.cleanup()


@contextlib.asynccontextmanager
async def client(connections: int = 1) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=WAIT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


# -------------------------------------------------------------------------- tests


async def test_keep_alive_reuses_one_mtls_connection_for_many_requests(pki: Pki) -> None:
    async with mesh(pki) as m, client() as session:
        for i in range(50):
            async with session.post(m.url(f"/echo/{i}"), data=b"ping %d" % i) as response:
                assert response.status == 200
                assert await response.read() == b"ping %d" % i
                assert response.headers["x-path"] == f"/echo/{i}"
                assert "x-meshnode-error" not in response.headers
        host = m.hosts[0]
        assert len(host.accepted) == 1, "one upstream mTLS connection"
        assert host.accepted[0] is not None and host.accepted[0].endswith("/svc/web")
        assert set(host.backend.sources) == {"web"}
        assert m.outbound.open_connections() == 1
        assert m.counter("requests") == 100  # 50 outbound + 50 inbound
        records = [json.loads(line) for line in m.log_lines]
        outbound = [r for r in records if r["direction"] == "outbound"]
        assert len(outbound) == 50 and outbound[0]["status"] == 200
        assert outbound[0]["route"] == "api/default" and outbound[0]["cluster"] == "api"
        assert outbound[0]["bytes_in"] == len(b"ping 0") and outbound[0]["attempts"] == 1
        inbound = [r for r in records if r["direction"] == "inbound"]
        assert inbound[0]["source"] == "web" and inbound[0]["source_id"].endswith("/svc/web")


async def test_a_forged_source_header_is_replaced(pki: Pki) -> None:
    async with mesh(pki) as m, client() as session:
        async with session.get(m.url("/"), headers={"x-meshnode-source": "admin"}) as response:
            assert response.status == 200
        assert m.hosts[0].backend.sources == ["web"]


async def test_chunked_request_and_response_bodies(pki: Pki) -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for i in range(20):
            yield b"chunk-%d," % i
            await asyncio.sleep(0)

    async with mesh(pki) as m, client() as session:
        async with session.post(m.url("/echo"), data=pieces()) as response:
            assert response.status == 200
            assert await response.read() == b"".join(b"chunk-%d," % i for i in range(20))
        async with session.get(m.url("/chunked?n=50")) as response:
            assert response.status == 200
            assert response.headers.get("transfer-encoding") == "chunked"
            assert await response.read() == b"".join(b"piece %d;" % i for i in range(50))


async def test_multi_megabyte_bodies_both_ways(pki: Pki) -> None:
    payload = random.Random(5).randbytes(6 << 20)
    async with mesh(pki) as m, client() as session:
        async with session.post(m.url("/echo"), data=payload) as response:
            assert response.status == 200
            assert await response.read() == payload
        async with session.get(m.url(f"/big?n={8 << 20}")) as response:
            total = 0
            async for piece in response.content.iter_chunked(1 << 16):
                total += len(piece)
                await asyncio.sleep(0)  # a slower reader: backpressure through the proxies
            assert total == 8 << 20
        async with session.get(m.url("/after")) as response:
            assert response.status == 200  # the connection is still good


def allow_only(path_prefix: str) -> Knobs:
    """api allows web only on paths under ``path_prefix`` (rule "web => api"), and
    denies everything else."""
    rule = IntentionRule(
        "web", "", "web => api", (Permission("allow", HttpMatch(path_prefix=path_prefix)),)
    )
    return Knobs(service={"intentions": (rule,), "default_allow": False})


async def test_an_l7_intention_denies_with_the_rule_in_the_header(pki: Pki) -> None:
    async with mesh(pki, allow_only("/ok")) as m, client() as session:
        async with session.get(m.url("/ok/1")) as response:
            assert response.status == 200
        async with session.post(m.url("/secret"), data=b"x" * 1000) as response:
            assert response.status == 403
            assert response.headers["x-meshnode-error"] == "intention: denied by web => api"
            assert int(response.headers["content-length"]) == len(await response.read())
        async with session.get(m.url("/ok/2")) as response:
            assert response.status == 200  # same connections, still in step
        assert m.hosts[0].backend.hits == Counter({"/ok/1": 1, "/ok/2": 1})
        assert len(m.hosts[0].accepted) == 1
        assert m.counter("intention_denials") == 1


async def test_rate_limit_answers_429_with_retry_after(pki: Pki) -> None:
    knobs = Knobs(service={"rate_limit": RateLimit(0.5, 2)})
    async with mesh(pki, knobs) as m, client() as session:
        statuses = []
        for _ in range(3):
            async with session.get(m.url("/")) as response:
                statuses.append(response.status)
                if response.status == 429:
                    assert response.headers["x-meshnode-error"].startswith("rate-limit: ")
                    assert int(response.headers["retry-after"]) >= 1
        assert statuses == [200, 200, 429]
        assert m.counter("rate_limited") == 1


async def test_a_slow_local_instance_gives_504(pki: Pki) -> None:
    knobs = Knobs(service={"request_timeout": 0.3})
    async with mesh(pki, knobs) as m, client() as session:
        async with session.get(m.url("/slow?s=2")) as response:
            assert response.status == 504
            assert response.headers["x-meshnode-error"].startswith("timeout: ")
        async with session.get(m.url("/fast")) as response:
            assert response.status == 200


async def test_the_route_timeout_gives_504(pki: Pki) -> None:
    async with mesh(pki, Knobs(route={"request_timeout": 0.3})) as m, client() as session:
        async with session.get(m.url("/slow?s=2")) as response:
            assert response.status == 504
            assert response.headers["x-meshnode-error"].startswith("timeout: ")
        assert m.counter("upstream_timeouts") >= 1


def _retry_knobs(**policy: Any) -> Knobs:
    retry = RetryPolicy(num_retries=2, on_status_codes=(503,), backoff_base=0.001, **policy)
    return Knobs(backends=2, route={"retry": retry})


async def test_a_503_is_retried_on_another_endpoint(pki: Pki) -> None:
    async with mesh(pki, _retry_knobs()) as m, client() as session:
        m.hosts[0].backend.fail_with = 503
        for _ in range(10):
            async with session.get(m.url("/r")) as response:
                assert response.status == 200
                assert response.headers["x-backend"] == "b1"
        assert m.hosts[0].backend.hits["/r"] >= 1
        assert m.counter("retries") == m.hosts[0].backend.hits["/r"]


async def test_a_post_is_not_retried_unless_configured(pki: Pki) -> None:
    async with mesh(pki, _retry_knobs()) as m, client() as session:
        m.hosts[0].backend.fail_with = 503
        statuses = Counter()
        for _ in range(10):
            async with session.post(m.url("/p"), data=b"body") as response:
                statuses[response.status] += 1
                await response.read()
        assert statuses[503] >= 1 and m.counter("retries") == 0
    async with mesh(pki, _retry_knobs(retry_non_idempotent=True)) as m, client() as session:
        m.hosts[0].backend.fail_with = 503
        for _ in range(10):
            async with session.post(m.url("/p"), data=b"body") as response:
                assert response.status == 200
                assert await response.read() == b"body"


async def test_a_connect_failure_is_retried_then_reported(pki: Pki) -> None:
    retry = RetryPolicy(num_retries=1, backoff_base=0.001)
    knobs = Knobs(dead_endpoints=1, route={"retry": retry})
    async with mesh(pki, knobs) as m, client() as session:
        for _ in range(4):
            async with session.get(m.url("/c")) as response:
                assert response.status == 200
    async with mesh(pki, Knobs(dead_endpoints=1)) as m, client() as session:
        statuses = Counter()
        for _ in range(4):
            async with session.get(m.url("/c")) as response:
                statuses[response.status] += 1
                if response.status == 503:
                    assert response.headers["x-meshnode-error"].startswith("connect-failure: ")
        assert statuses == Counter({200: 2, 503: 2})


async def test_an_unreachable_local_instance_gives_503(pki: Pki) -> None:
    async with mesh(pki) as m, client() as session:
        await m.hosts[0].backend.runner.cleanup()
        async with session.get(m.url("/gone")) as response:
            assert response.status == 503
            assert response.headers["x-meshnode-error"].startswith("local-unavailable: ")


async def test_the_circuit_breaker_sheds_the_second_concurrent_request(pki: Pki) -> None:
    async with mesh(pki, Knobs(cluster={"limits": Limits(max_requests=1)})) as m, client(2) as s:

        async def get() -> tuple[int, str]:
            async with s.get(m.url("/slow?s=0.5")) as response:
                await response.read()
                return response.status, response.headers.get("x-meshnode-error", "")

        results = sorted(await asyncio.gather(get(), get()))
        assert results == [(200, ""), (503, "circuit-breaker: max_requests (api)")]
        assert m.counter("circuit_breaker_trips") == 1


async def test_an_ejected_endpoint_is_skipped(pki: Pki) -> None:
    outlier = Outlier(consecutive_5xx=2, base_ejection_time=30.0, max_ejection_percent=50)
    async with mesh(pki, Knobs(backends=2, cluster={"outlier": outlier})) as m, client() as s:
        m.hosts[0].backend.fail_with = 500
        for _ in range(6):
            async with s.get(m.url("/e")) as response:
                await response.read()
        failed = m.hosts[0].backend.hits["/e"]
        assert failed == 2
        for _ in range(10):
            async with s.get(m.url("/e")) as response:
                assert response.status == 200
        assert m.hosts[0].backend.hits["/e"] == failed


async def test_a_subset_whose_instances_are_all_ejected_fails_over(pki: Pki) -> None:
    """c0 (all traffic) fails over to c1: once c0's only instance is ejected, requests
    go to c1 — not to the ejected instance in panic mode — until the ejection ends."""
    outlier = Outlier(consecutive_5xx=1, base_ejection_time=30.0, max_ejection_percent=100)
    knobs = Knobs(split=(10_000, 0), cluster={"outlier": outlier, "failover": ("c1",)})
    async with mesh(pki, knobs) as m, client() as s:
        m.hosts[0].backend.fail_with = 500
        async with s.get(m.url("/f")) as response:
            assert response.status == 500  # c0's instance answers, and is ejected
        for _ in range(10):
            async with s.get(m.url("/f")) as response:
                assert response.status == 200 and response.headers["x-backend"] == "b1"
        assert m.hosts[0].backend.hits["/f"] == 1


def test_an_80_20_split_within_2_percent_through_the_runtime() -> None:
    leaf = Certificate("", "", "spiffe://t/ns/default/dc/dc1/svc/web")
    clusters = {
        name: Cluster(name, "api", "id", (Endpoint("10.0.0.1", 1, name),)) for name in ("a", "b")
    }
    route = Route("r", (SplitTarget(8000, "a"), SplitTarget(2000, "b")))
    upstream = Upstream("web", "api", "127.0.0.1", 1, leaf, (route,), clusters, "http")
    snapshot = Snapshot(1, "t", ("",), upstreams=(upstream,))
    runtime = compile_snapshot(snapshot, None, random.Random(11)).upstreams[("127.0.0.1", 1)]
    picked = Counter(runtime.split(runtime.route(None)).cluster.name for _ in range(10_000))
    assert abs(picked["a"] / 10_000 - 0.8) <= 0.02


async def test_an_80_20_split_over_sockets(pki: Pki) -> None:
    async with mesh(pki, Knobs(split=(8000, 2000))) as m, client(4) as s:

        async def get() -> str:
            async with s.get(m.url("/s")) as response:
                await response.read()
                return response.headers["x-backend"]

        picked = Counter(await asyncio.gather(*(get() for _ in range(600))))
        assert abs(picked["b0"] / 600 - 0.8) <= 0.06


# -------------------------------------------------------------- raw HTTP edges


async def raw(m: Mesh, data: bytes, *, until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection(*m.outbound.address)
    try:
        writer.write(data)
        async with asyncio.timeout(WAIT_S):
            return await reader.read(-1) if until_close else await reader.read(65536)
    finally:
        writer.close()


async def test_pipelined_requests_are_answered_in_order(pki: Pki) -> None:
    async with mesh(pki) as m:
        requests = b"".join(
            b"POST /p%d HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n%02d" % (i, i)
            for i in range(5)
        )
        answer = await raw(
            m, requests + b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        assert answer.count(b"HTTP/1.1 200 OK") == 6
        bodies = [answer.index(b"\r\n\r\n%02d" % i) for i in range(5)]
        assert bodies == sorted(bodies)
        assert answer.endswith(b"b0") and b"connection: close" in answer.lower()


async def test_head_and_bad_requests(pki: Pki) -> None:
    async with mesh(pki) as m:
        answer = await raw(
            m,
            b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /g HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        assert answer.count(b"HTTP/1.1 200") == 2 and answer.endswith(b"b0")
        answer = await raw(m, b"GARBAGE\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ") and b"x-meshnode-error: bad-request" in answer
        answer = await raw(m, b"GET /old HTTP/1.0\r\nHost: a\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"b0")


def update_service(m: Mesh, host: Host, **changes: Any) -> None:
    """Give ``host``'s inbound a new snapshot where the api service has ``changes``."""
    runtime = host.inbound._runtime
    changed = replace(runtime.inbound.services["api"], **changes)
    inbound = replace(runtime.inbound, services={"api": changed})
    snapshot = Snapshot(3, m.pki.trust_domain, (m.pki.root_pem,), inbound=inbound)
    new = compile_snapshot(snapshot, None, random.Random(1)).inbound
    assert new is not None
    host.inbound.update(new)


async def test_update_swaps_the_runtime_for_new_requests(pki: Pki) -> None:
    async with mesh(pki) as m, client() as session:
        async with session.get(m.url("/")) as response:
            assert response.status == 200
        update_service(m, m.hosts[0], default_allow=False, intentions=())
        async with session.get(m.url("/")) as response:
            assert response.status == 403
            assert response.headers["x-meshnode-error"] == "intention: denied by default deny"


def test_the_data_path_under_uvloop(pki: Pki) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        await test_keep_alive_reuses_one_mtls_connection_for_many_requests(pki)
        await test_chunked_request_and_response_bodies(pki)
        await test_multi_megabyte_bodies_both_ways(pki)
        await test_pipelined_requests_are_answered_in_order(pki)
        await test_head_and_bad_requests(pki)
        await test_a_503_is_retried_on_another_endpoint(pki)
        await test_the_circuit_breaker_sheds_the_second_concurrent_request(pki)

    uvloop.run(scenario())


async def test_least_request_sees_requests_in_flight(pki: Pki) -> None:
    from proxy.snapshot import LoadBalancing

    knobs = Knobs(backends=2, cluster={"load_balancing": LoadBalancing("least_request")})
    async with mesh(pki, knobs) as m, client(4) as s:
        cluster = m.outbound._runtime.clusters["api"]

        async def slow() -> int:
            async with s.get(m.url("/slow?s=0.5")) as response:
                await response.read()
                return response.status

        task = asyncio.gather(slow(), slow())
        for _ in range(100):
            if sum(cluster.active.values()) == 2:
                break
            await asyncio.sleep(0.01)
        assert sorted(cluster.active.values()) == [1, 1]  # one each: two choices, fewest
        assert await task == [200, 200]
        assert sum(cluster.active.values()) == 0


async def test_expect_100_continue_crosses_the_mesh(pki: Pki) -> None:
    async with mesh(pki) as m, client() as session:
        post = session.post(m.url("/e"), data=b"after continue", expect100=True)
        async with post as response:
            assert response.status == 200
            assert await response.read() == b"after continue"


# --------------------------------------------------------------- idle timeouts


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the peer closes within ``seconds`` (what arrives first is discarded)."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
        return True
    except TimeoutError:
        return False


async def test_an_idle_client_connection_is_closed_after_the_upstream_idle_timeout(
    pki: Pki,
) -> None:
    async with mesh(pki, Knobs(upstream={"idle_timeout": 0.3})) as m:
        reader, writer = await asyncio.open_connection(*m.outbound.address)
        try:
            # A request in flight longer than the idle timeout is not cut.
            writer.write(b"GET /slow?s=0.6 HTTP/1.1\r\nHost: a\r\n\r\n")
            async with asyncio.timeout(WAIT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            started = asyncio.get_running_loop().time()
            assert await _closed_within(reader, 3.0)
            waited = asyncio.get_running_loop().time() - started
            assert 0.25 <= waited <= 1.5
            assert m.outbound.open_connections() == 0
        finally:
            writer.close()


async def test_an_idle_mesh_connection_is_closed_after_the_service_idle_timeout(
    pki: Pki,
) -> None:
    async with mesh(pki, Knobs(service={"idle_timeout": 0.3})) as m, client() as session:
        async with session.get(m.url("/")) as response:
            assert response.status == 200
        inbound = m.hosts[0].inbound
        assert inbound.open_connections() == 1
        for _ in range(150):
            if inbound.open_connections() == 0 and m.outbound._pool.idle_count() == 0:
                break
            await asyncio.sleep(0.01)
        assert inbound.open_connections() == 0
        assert m.outbound._pool.idle_count() == 0  # the pool saw the close
        async with session.get(m.url("/")) as response:  # a new mesh connection
            assert response.status == 200


async def test_the_route_idle_timeout_gives_504_before_the_response(pki: Pki) -> None:
    knobs = Knobs(route={"idle_timeout": 0.3, "request_timeout": 0.0})
    async with mesh(pki, knobs) as m, client() as session:
        async with session.get(m.url("/slow?s=2")) as response:
            assert response.status == 504
            error = response.headers["x-meshnode-error"]
            assert error.startswith("timeout: ") and "idle" in error
        async with session.get(m.url("/slow?s=0.1")) as response:
            assert response.status == 200


async def test_the_route_idle_timeout_closes_a_stalled_response(pki: Pki) -> None:
    knobs = Knobs(route={"idle_timeout": 0.3, "request_timeout": 0.0})
    async with mesh(pki, knobs) as m:
        reader, writer = await asyncio.open_connection(*m.outbound.address)
        try:
            writer.write(b"GET /stall?s=3 HTTP/1.1\r\nHost: a\r\n\r\n")
            async with asyncio.timeout(WAIT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            started = asyncio.get_running_loop().time()
            assert await _closed_within(reader, 2.5)
            assert asyncio.get_running_loop().time() - started < 1.5
        finally:
            writer.close()
        line = json.loads(m.log_lines[-1])
        assert line["error"].startswith("timeout: ") and line["status"] == 200


async def test_update_closes_idle_pooled_connections_to_removed_endpoints(pki: Pki) -> None:
    async with mesh(pki, Knobs(backends=2)) as m, client() as session:
        for _ in range(2):  # round robin: one pooled connection to each endpoint
            async with session.get(m.url("/")) as response:
                assert response.status == 200
        assert m.outbound._pool.idle_count() == 2
        kept, removed = m.hosts
        runtime = m.outbound._runtime
        upstream = runtime.upstream
        cluster = upstream.clusters["api"]
        endpoint = Endpoint(*kept.address, "api")
        clusters = {"api": replace(cluster, endpoints=(endpoint,))}
        snapshot = Snapshot(
            3,
            m.pki.trust_domain,
            (m.pki.root_pem,),
            upstreams=(replace(upstream, clusters=clusters),),
        )
        new = compile_snapshot(snapshot, None, random.Random(1)).upstreams[("127.0.0.1", 0)]
        m.outbound.update(new, m.outbound._contexts)
        assert m.outbound._pool.idle_count() == 1
        for _ in range(150):
            if removed.inbound.open_connections() == 0:
                break
            await asyncio.sleep(0.01)
        assert removed.inbound.open_connections() == 0
        assert kept.inbound.open_connections() == 1
        for _ in range(3):
            async with session.get(m.url("/")) as response:
                assert response.headers["x-backend"] == "b0"
