"""web → api through two real agents and their proxy workers, over real mTLS.

Two agents on loopback: ``a1`` (a server, ``--bootstrap-expect 1``) hosts ``web``,
which declares ``api`` as an upstream on a local port; ``a2`` hosts the ``api``
instances (HTTP servers in this process: ``v1``, ``v2`` and, for the ejection test, a
broken one). Each agent starts and supervises its own proxy worker on its own inbound
port. The test plays ``web``: it sends plain HTTP to the upstream port on loopback;
a1's worker routes it, opens (or reuses) an mTLS connection to a2's inbound port
presenting web's leaf; a2's worker checks the intention and forwards to an api
instance.

The agents are started once for the module (a few seconds); tests run in file order
and each restores the policy it changes. Figures are printed (run with ``-s``).
Every process is killed and the temporary directory removed whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import ssl
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from meshnode.procs import AgentProcess, free_port, kill_agents, start_agent, wait_agent_ready

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

#: A snapshot reaches the worker within 100 ms of a change (issue #5); a policy write
#: reaches the other agent by gossip in well under a second. Slack for a loaded machine.
APPLIED_WITHIN = 10.0
SPLIT_REQUESTS = 4000
#: 80/20 within ±2 % is the pure splitter's promise over 10,000 draws
#: (tests/proxy/test_runtime.py); over 4,000 real requests allow ±3 %.
SPLIT_TOLERANCE = 0.03


@dataclass
class Answer:
    status: int
    body: str
    headers: dict[str, str]


class Mesh:
    def __init__(self, workdir: Path, session: aiohttp.ClientSession) -> None:
        self.workdir = workdir
        self.session = session
        self.a1 = AgentProcess.create("a1", workdir)
        self.a2 = AgentProcess.create("a2", workdir)
        self.proxy_ports = {"a1": self.a1.proxy_port, "a2": self.a2.proxy_port}
        self.upstream_port = free_port()
        self.web_port = free_port()
        self.access_log = workdir / "a2-access.log"
        self.runners: list[web.AppRunner] = []
        self.backends: dict[str, int] = {}

    @property
    def upstream(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"

    async def call(self, method: str, agent: AgentProcess, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body)
        async with self.session.request(method, agent.http_url + path, data=data) as response:
            text = await response.text()
            assert response.status == 200, (agent.name, method, path, response.status, text)
            return json.loads(text) if text else None

    async def request(self, path: str = "/", method: str = "GET", **kw: Any) -> Answer:
        async with self.session.request(method, self.upstream + path, **kw) as response:
            body = await response.text()
            return Answer(response.status, body, dict(response.headers))

    async def answers(self) -> bool:
        """web → api answers 200 through both proxies."""
        with contextlib.suppress(aiohttp.ClientError):
            return (await self.request()).status == 200
        return False

    async def backend(
        self, name: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self.runners.append(runner)
        self.backends[name] = port
        return port

    async def register_api(self, instance: str, version: str, port: int) -> None:
        body = {
            "ID": f"api-{instance}",
            "Name": "api",
            "Port": port,
            "Address": "127.0.0.1",
            "Meta": {"version": version},
        }
        await self.call("PUT", self.a2, "/v1/agent/service/register", body)

    async def deregister(self, agent: AgentProcess, service_id: str) -> None:
        await self.call("PUT", agent, f"/v1/agent/service/deregister/{service_id}")

    async def metrics(self, agent: AgentProcess) -> str:
        async with self.session.get(agent.http_url + "/v1/agent/metrics?format=prometheus") as r:
            assert r.status == 200
            return await r.text()

    async def until(
        self, condition: Callable[[], Awaitable[bool]], what: str, within: float = APPLIED_WITHIN
    ) -> float:
        started = time.monotonic()
        while True:
            if await condition():
                return time.monotonic() - started
            if time.monotonic() - started > within:
                raise AssertionError(
                    f"not within {within} s: {what}\n--- a1\n{self.a1.log_tail()}\n--- a2\n"
                    f"{self.a2.log_tail()}"
                )
            await asyncio.sleep(0.05)


def hello(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/slow":
            await asyncio.sleep(3)
        if request.path == "/ws":  # a WebSocket: greets with its name, then echoes
            socket = web.WebSocketResponse()
            await socket.prepare(request)
            await socket.send_str(f"{name} {request.headers.get('x-meshnode-source', '')}")
            async for message in socket:
                if message.type == aiohttp.WSMsgType.TEXT:
                    await socket.send_str(message.data)
            return socket
        source = request.headers.get("x-meshnode-source", "")
        return web.Response(text=name, headers={"x-seen-source": source})

    return handler


async def broken(request: web.Request) -> web.StreamResponse:
    return web.Response(status=503, text="broken")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh() -> AsyncIterator[Mesh]:
    workdir = Path(tempfile.mkdtemp(prefix="meshnode-proxy-e2e-"))
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
    cluster = Mesh(workdir, session)
    try:
        a1, a2 = cluster.a1, cluster.a2
        await start_agent(
            a1,
            extra_args=["--server", "--bootstrap-expect", "1"],
        )
        # a2's worker writes its access log to a file (the telemetry test reads it).
        a2_config = workdir / "a2.toml"
        a2_config.write_text(f'[proxy]\naccess_log = "{cluster.access_log}"\n')
        await start_agent(
            a2,
            join=[a1.gossip_addr],
            extra_args=["--config", str(a2_config)],
        )
        await wait_agent_ready(a1, session)
        await wait_agent_ready(a2, session)
        v1 = await cluster.backend("v1", hello("v1"))
        v2 = await cluster.backend("v2", hello("v2"))
        await cluster.register_api("1", "v1", v1)
        await cluster.register_api("2", "v2", v2)
        web_service = {
            "ID": "web-1",
            "Name": "web",
            "Port": cluster.web_port,
            "Connect": {
                "SidecarService": {
                    "Proxy": {
                        "Upstreams": [
                            {"DestinationName": "api", "LocalBindPort": cluster.upstream_port}
                        ]
                    }
                }
            },
        }
        await cluster.call("PUT", a1, "/v1/agent/service/register", web_service)
        await cluster.call(
            "PUT", a1, "/v1/config", {"Kind": "service-defaults", "Name": "api", "Protocol": "http"}
        )
        await cluster.call(
            "PUT",
            a1,
            "/v1/connect/intentions/exact?source=web&destination=api",
            {"Action": "allow"},
        )

        took = await cluster.until(cluster.answers, "web → api answers through both proxies", 60.0)
        print(f"\nweb → api answered {took:.2f} s after registration")
        yield cluster
    finally:
        await session.close()
        for runner in cluster.runners:
            await runner.cleanup()
        await kill_agents([a.process for a in (cluster.a1, cluster.a2) if a.process is not None])
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------ tests


async def test_requests_cross_mutual_tls_and_plaintext_is_refused(mesh: Mesh) -> None:
    answer = await mesh.request()
    assert answer.status == 200 and answer.body in ("v1", "v2")
    # The api side saw who called: web's identity from its client certificate.
    assert answer.headers.get("x-seen-source") == "web"

    port = mesh.proxy_ports["a2"]
    # Plain HTTP to the inbound port: no TLS, no answer.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(1024), 10)
    assert b"HTTP/1.1" not in data
    writer.close()
    # TLS without a client certificate: refused in the handshake (TLS 1.3 reports it
    # at the first read).
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="api"
        )
        writer.write(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.readexactly(1), 10)

    async def counted() -> bool:
        text = await mesh.metrics(mesh.a2)
        return "meshnode_proxy_tls_handshake_failures_total" in text

    await mesh.until(counted, "handshake failures in a2's metrics")


async def test_switching_the_intention_to_deny_takes_effect(mesh: Mesh) -> None:
    url = "/v1/connect/intentions/exact?source=web&destination=api"
    await mesh.call("PUT", mesh.a1, url, {"Action": "deny"})
    try:

        async def denied() -> bool:
            answer = await mesh.request()
            return answer.status == 403

        took = await mesh.until(denied, "deny takes effect")
        answer = await mesh.request()
        assert answer.headers["x-meshnode-error"].startswith("intention: denied by web => api")
        print(f"\ndeny took effect after {took:.2f} s")
    finally:
        await mesh.call("PUT", mesh.a1, url, {"Action": "allow"})

    async def allowed() -> bool:
        return (await mesh.request()).status == 200

    await mesh.until(allowed, "allow again")


async def test_an_80_20_split_between_subsets(mesh: Mesh) -> None:
    resolver = {
        "Kind": "service-resolver",
        "Name": "api",
        "Subsets": {
            "v1": {"Filter": 'Service.Meta.version == "v1"'},
            "v2": {"Filter": 'Service.Meta.version == "v2"'},
        },
    }
    splitter = {
        "Kind": "service-splitter",
        "Name": "api",
        "Splits": [
            {"Weight": 80, "ServiceSubset": "v1"},
            {"Weight": 20, "ServiceSubset": "v2"},
        ],
    }
    await mesh.call("PUT", mesh.a1, "/v1/config", resolver)
    await mesh.call("PUT", mesh.a1, "/v1/config", splitter)
    try:

        async def split_applied() -> bool:
            seen = Counter([(await mesh.request()).body for _ in range(50)])
            return 25 <= seen["v1"] <= 49 and seen["v2"] >= 1

        await mesh.until(split_applied, "the splitter applies")
        counts: Counter[str] = Counter()
        started = time.monotonic()

        async def worker(n: int) -> None:
            for _ in range(n):
                counts[(await mesh.request()).body] += 1

        await asyncio.gather(*(worker(SPLIT_REQUESTS // 8) for _ in range(8)))
        seconds = time.monotonic() - started
        share = counts["v1"] / SPLIT_REQUESTS
        print(f"\n80/20 split: {dict(counts)} over {SPLIT_REQUESTS} requests in {seconds:.1f} s")
        assert counts["v1"] + counts["v2"] == SPLIT_REQUESTS, counts
        assert abs(share - 0.8) <= SPLIT_TOLERANCE, counts
    finally:
        await mesh.call("DELETE", mesh.a1, "/v1/config/service-splitter/api")
        await mesh.call("DELETE", mesh.a1, "/v1/config/service-resolver/api")


async def test_a_failing_instance_is_ejected_and_retries_hide_it(mesh: Mesh) -> None:
    port = await mesh.backend("broken", broken)
    await mesh.register_api("broken", "v1", port)
    router = {
        "Kind": "service-router",
        "Name": "api",
        "Routes": [
            {
                "Match": {"HTTP": {"PathPrefix": "/"}},
                "Destination": {"NumRetries": 3, "RetryOnStatusCodes": [503]},
            }
        ],
    }
    defaults = {
        "Kind": "service-defaults",
        "Name": "web",
        "UpstreamConfig": {
            "Defaults": {
                "PassiveHealthCheck": {
                    "Interval": "1s",
                    "MaxFailures": 2,
                    "BaseEjectionTime": "30s",
                    "MaxEjectionPercent": 50,
                }
            }
        },
    }
    await mesh.call("PUT", mesh.a1, "/v1/config", router)
    await mesh.call("PUT", mesh.a1, "/v1/config", defaults)
    try:

        async def three_instances() -> bool:
            text = await mesh.metrics(mesh.a1)
            return "meshnode_proxy_snapshot" in text and await _endpoints(mesh) == 3

        await mesh.until(three_instances, "a1's proxy knows the broken instance", 20)
        statuses = Counter([(await mesh.request()).status for _ in range(200)])
        print(f"\nwith a broken instance and retries: {dict(statuses)}")
        assert statuses == Counter({200: 200}), statuses

        async def ejected() -> bool:
            return "meshnode_proxy_outlier_ejections_total" in await mesh.metrics(mesh.a1)

        await mesh.until(ejected, "the broken instance is ejected")
    finally:
        await mesh.deregister(mesh.a2, "api-broken")
        await mesh.call("DELETE", mesh.a1, "/v1/config/service-router/api")
        await mesh.call("DELETE", mesh.a1, "/v1/config/service-defaults/web")


async def _endpoints(mesh: Mesh) -> int:
    """Passing api instances in a1's catalog."""
    async with mesh.session.get(mesh.a1.http_url + "/v1/health/service/api?passing") as r:
        return len(await r.json())


async def test_timeouts_and_rate_limits_give_their_status_codes(mesh: Mesh) -> None:
    router = {
        "Kind": "service-router",
        "Name": "api",
        "Routes": [
            {"Match": {"HTTP": {"PathPrefix": "/slow"}}, "Destination": {"RequestTimeout": "500ms"}}
        ],
    }
    await mesh.call("PUT", mesh.a1, "/v1/config", router)
    try:

        async def times_out() -> bool:
            return (await mesh.request("/slow")).status == 504

        await mesh.until(times_out, "the route's timeout applies")
        answer = await mesh.request("/slow")
        assert answer.headers["x-meshnode-error"].startswith("timeout"), answer.headers
    finally:
        await mesh.call("DELETE", mesh.a1, "/v1/config/service-router/api")

    limited = {
        "Kind": "service-defaults",
        "Name": "api",
        "Protocol": "http",
        "RateLimits": {"InstanceLevel": {"RequestsPerSecond": 5, "RequestsMaxBurst": 5}},
    }
    await mesh.call("PUT", mesh.a1, "/v1/config", limited)
    try:

        async def limits() -> bool:
            answers = [await mesh.request() for _ in range(10)]
            return any(a.status == 429 for a in answers)

        await mesh.until(limits, "the rate limit applies")
        answers = [await mesh.request() for _ in range(20)]
        refused = [a for a in answers if a.status == 429]
        assert refused and all(int(a.headers["Retry-After"]) >= 1 for a in refused)
        assert refused[0].headers["x-meshnode-error"].startswith("rate-limit")
    finally:
        await mesh.call(
            "PUT",
            mesh.a1,
            "/v1/config",
            {"Kind": "service-defaults", "Name": "api", "Protocol": "http"},
        )

    async def unlimited() -> bool:
        return all([(await mesh.request()).status == 200 for _ in range(10)])

    await mesh.until(unlimited, "the rate limit is lifted")


async def test_metrics_show_the_calls(mesh: Mesh) -> None:
    for _ in range(20):
        assert (await mesh.request()).status == 200

    async def counted() -> bool:
        a1 = await mesh.metrics(mesh.a1)
        a2 = await mesh.metrics(mesh.a2)
        outbound = [
            line
            for line in a1.splitlines()
            if line.startswith("meshnode_proxy_requests_total")
            and 'direction="outbound"' in line
            and 'source="web"' in line
            and 'destination="api"' in line
            and 'code_class="2xx"' in line
        ]
        inbound = [
            line
            for line in a2.splitlines()
            if line.startswith("meshnode_proxy_requests_total") and 'direction="inbound"' in line
        ]
        return bool(outbound and inbound) and float(outbound[0].split()[-1]) >= 20

    await mesh.until(counted, "requests counted on both sides (stats every second)")
    text = await mesh.metrics(mesh.a1)
    for family in (
        "meshnode_proxy_request_duration_seconds_bucket",
        "meshnode_proxy_request_bytes_total",
        "meshnode_proxy_response_bytes_total",
        "meshnode_proxy_tcp_connections_opened_total",
    ):
        assert family in text, family


async def test_access_log_lines_name_both_identities(mesh: Mesh) -> None:
    assert (await mesh.request("/logged")).status == 200

    def lines() -> list[dict[str, Any]]:
        if not mesh.access_log.exists():
            return []
        return [json.loads(line) for line in mesh.access_log.read_text().splitlines() if line]

    async def logged() -> bool:
        return any(record.get("path") == "/logged" for record in lines())

    await mesh.until(logged, "an access log line for /logged on a2")
    record = next(r for r in lines() if r.get("path") == "/logged")
    assert record["direction"] == "inbound"
    assert record["source"] == "web" and record["destination"] == "api"
    assert record["source_id"].startswith("spiffe://") and record["source_id"].endswith("/svc/web")
    assert record["status"] == 200 and record["method"] == "GET"
    assert record["duration_ms"] >= 0 and record["upstream"]


async def test_root_rotation_under_load_fails_no_request(mesh: Mesh) -> None:
    async def leaf_serial(agent: AgentProcess, service: str) -> str:
        leaf = await mesh.call("GET", agent, f"/v1/agent/connect/ca/leaf/{service}")
        return str(leaf["SerialNumber"])

    before = (await leaf_serial(mesh.a1, "web"), await leaf_serial(mesh.a2, "api"))
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            try:
                statuses[(await mesh.request()).status] += 1
            except aiohttp.ClientError as exc:
                failures.append(repr(exc))
            await asyncio.sleep(0.005)

    workers = [asyncio.create_task(load()) for _ in range(4)]
    try:
        await mesh.call("PUT", mesh.a1, "/v1/mesh/ca/rotate")
        rotated = time.monotonic()

        async def reissued() -> bool:
            now = (await leaf_serial(mesh.a1, "web"), await leaf_serial(mesh.a2, "api"))
            return now[0] != before[0] and now[1] != before[1]

        took = await mesh.until(reissued, "both leaves re-issued under the new root", 60.0)
        # Let the workers apply the new leaves and serve with them for a while.
        await asyncio.sleep(3.0)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    total = sum(statuses.values())
    print(
        f"\nrotation: leaves re-issued {took:.1f} s after the rotate; {total} requests "
        f"during {time.monotonic() - rotated:.1f} s: {dict(statuses)}, failures {len(failures)}"
    )
    assert not failures, failures[:5]
    assert statuses == Counter({200: total}), statuses


async def test_an_http_forward_proxy_port_serves_every_upstream_by_host(mesh: Mesh) -> None:
    forward_port = free_port()
    web_service = {
        "ID": "web-1",
        "Name": "web",
        "Port": mesh.web_port,
        "Connect": {
            "SidecarService": {
                "Proxy": {
                    "Upstreams": [{"DestinationName": "api", "LocalBindPort": mesh.upstream_port}],
                    "Config": {"http_proxy_port": forward_port},
                }
            }
        },
    }
    await mesh.call("PUT", mesh.a1, "/v1/agent/service/register", web_service)
    proxy_url = f"http://127.0.0.1:{forward_port}"

    async def via_proxy() -> Answer:
        # Absolute form, as a client with HTTP_PROXY set sends it.
        async with mesh.session.get("http://api/hello", proxy=proxy_url) as response:
            return Answer(response.status, await response.text(), dict(response.headers))

    async def listening() -> bool:
        with contextlib.suppress(aiohttp.ClientError):
            return (await via_proxy()).status == 200
        return False

    await mesh.until(listening, "the forward proxy port answers")
    answer = await via_proxy()
    assert answer.body in ("v1", "v2") and answer.headers["x-seen-source"] == "web"
    # Origin form with a Host header, a Consul DNS name and a port.
    url = f"{proxy_url}/hello"
    async with mesh.session.get(url, headers={"Host": "API.service.consul:80"}) as response:
        assert response.status == 200 and await response.text() in ("v1", "v2")
    async with mesh.session.get(url, headers={"Host": "billing"}) as response:
        assert response.status == 404
        assert response.headers["x-meshnode-error"].startswith("no-upstream: 'billing'")


async def test_a_deny_cuts_open_tcp_connections_too(mesh: Mesh) -> None:
    """db is a tcp service: its intention is checked per connection, and a deny
    closes the connections already open (Consul would leave them open)."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    db_port = server.sockets[0].getsockname()[1]
    db_upstream = free_port()
    url = "/v1/connect/intentions/exact?source=web&destination=db"
    try:
        await mesh.call(
            "PUT",
            mesh.a2,
            "/v1/agent/service/register",
            {"ID": "db-1", "Name": "db", "Port": db_port, "Address": "127.0.0.1"},
        )
        upstreams = [
            {"DestinationName": "api", "LocalBindPort": mesh.upstream_port},
            {"DestinationName": "db", "LocalBindPort": db_upstream},
        ]
        web_service = {
            "ID": "web-1",
            "Name": "web",
            "Port": mesh.web_port,
            "Connect": {"SidecarService": {"Proxy": {"Upstreams": upstreams}}},
        }
        await mesh.call("PUT", mesh.a1, "/v1/agent/service/register", web_service)
        await mesh.call("PUT", mesh.a1, url, {"Action": "allow"})

        async def session() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", db_upstream)
                writer.write(b"ping")
                if await asyncio.wait_for(reader.readexactly(4), 5) == b"ping":
                    return reader, writer
                writer.close()
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                pass
            return None

        opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def connected() -> bool:
            found = await session()
            if found is not None:
                opened.append(found)
            return found is not None

        await mesh.until(connected, "web → db over tcp")
        reader, writer = opened[-1]
        await mesh.call("PUT", mesh.a1, url, {"Action": "deny"})
        written = time.monotonic()
        assert await asyncio.wait_for(reader.read(), APPLIED_WITHIN) == b""
        print(f"\nan open tcp connection was cut {time.monotonic() - written:.2f} s after the deny")
        writer.close()
        assert await session() is None  # and new ones are refused
    finally:
        server.close()
        await mesh.call("DELETE", mesh.a1, url)
        await mesh.deregister(mesh.a2, "db-1")


async def test_a_websocket_crosses_both_workers(mesh: Mesh) -> None:
    """api is an http service: the upgrade request is routed and authorized like any
    request, then the 101 turns both proxies' connections into a tunnel."""
    await mesh.call(
        "PUT",
        mesh.a1,
        "/v1/connect/intentions/exact?source=web&destination=api",
        {"Action": "allow"},
    )

    await mesh.until(mesh.answers, "web → api answers")
    async with mesh.session.ws_connect(mesh.upstream + "/ws") as socket:
        greeting = await socket.receive_str(timeout=10)
        assert greeting in ("v1 web", "v2 web")  # the inbound proxy named the caller
        for i in range(100):
            await socket.send_str(f"message {i}")
            assert await socket.receive_str(timeout=10) == f"message {i}"
