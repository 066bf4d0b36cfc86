"""proxy.l4: client → outbound → mTLS → inbound → echo server, on 127.0.0.1 with real
certificates, configured from snapshots compiled by ``proxy.runtime`` (one snapshot
per side, as two hosts would have). The snapshot builders here are shared with
tests/proxy/test_worker.py."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import os
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import pytest

from proxy.dataplane import TlsMaterial
from proxy.l4 import InboundListener, OutboundListener, transport
from proxy.l4.transport import Address
from proxy.runtime import Compiled, compile_snapshot
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
    RateLimit,
    RetryPolicy,
    Route,
    Snapshot,
    SplitTarget,
    Upstream,
    instance_sni,
)
from proxy.telemetry import AccessLogger, Telemetry
from tests.proxy.test_tls import Leaf, Pki, make_pki

WAIT_S = 10.0
ALLOW_WEB = IntentionRule("web", "allow", "web => api")
DENY_WEB = IntentionRule("web", "deny", "web => api")
INSTANCE = "api-1"


@dataclass(frozen=True)
class Leaves:
    pki: Pki
    api: Leaf
    web: Leaf
    db: Leaf


@pytest.fixture(scope="module")
def leaves() -> Leaves:
    pki = make_pki("test.meshnode")
    return Leaves(pki, pki.leaf("api"), pki.leaf("web"), pki.leaf("db"))


# ---------------------------------------------------------------------------- snapshots


def certificate(leaf: Leaf) -> Certificate:
    return Certificate(leaf.chain_pem, leaf.key_pem, leaf.spiffe_id)


def inbound_snapshot(
    leaves: Leaves,
    backend: Address,
    *,
    port: int = 0,
    version: int = 1,
    intentions: tuple[IntentionRule, ...] = (ALLOW_WEB,),
    leaf: Leaf | None = None,
    access_log: AccessLog = AccessLog(path="off"),  # noqa: B008 -- frozen
    **service: Any,
) -> Snapshot:
    """Host B: its inbound port serving ``api`` (SNI ``api`` and the instance's
    ``i<hex>.api``) at ``backend``; ``service`` overrides ``LocalService`` fields."""
    settings: dict[str, Any] = {"connect_timeout": 2.0, "idle_timeout": 60.0, **service}
    local = LocalService("api", certificate(leaf or leaves.api), intentions=intentions, **settings)
    target = InboundTarget("api", (backend,))
    targets = {"api": target, instance_sni("api", INSTANCE): target}
    return Snapshot(
        version,
        leaves.pki.trust_domain,
        (leaves.pki.root_pem,),
        inbound=Inbound("127.0.0.1", port, {"api": local}, targets),
        access_log=access_log,
    )


def outbound_snapshot(
    leaves: Leaves,
    endpoints: Sequence[Address],
    *,
    port: int = 0,
    version: int = 1,
    sni: str = "api",
    idle: float = 60.0,
    leaf: Leaf | None = None,
    limits: Limits = Limits(),  # noqa: B008 -- frozen
    protocol: str = "tcp",
    access_log: AccessLog = AccessLog(path="off"),  # noqa: B008 -- frozen
) -> Snapshot:
    """Host A: one outbound listener, web → api, to ``endpoints`` (inbound ports)."""
    identity = f"spiffe://{leaves.pki.trust_domain}/ns/default/dc/dc1/svc/api"
    cluster = Cluster(
        "api",
        "api",
        identity,
        tuple(Endpoint(host, port_, sni) for host, port_ in endpoints),
        limits=limits,
        connect_timeout=2.0,
    )
    route = Route(
        "api/default", (SplitTarget(10_000, "api"),), retry=RetryPolicy(backoff_base=0.001)
    )
    upstream = Upstream(
        "web",
        "api",
        "127.0.0.1",
        port,
        certificate(leaf or leaves.web),
        (route,),
        {"api": cluster},
        protocol,  # type: ignore[arg-type]
        idle,
    )
    return Snapshot(
        version,
        leaves.pki.trust_domain,
        (leaves.pki.root_pem,),
        upstreams=(upstream,),
        access_log=access_log,
    )


@dataclass
class Side:
    """A snapshot compiled with its TLS material, as the data plane keeps them."""

    compiled: Compiled
    material: TlsMaterial

    @staticmethod
    def of(snapshot: Snapshot, previous: Side | None = None) -> Side:
        compiled = compile_snapshot(
            snapshot, previous.compiled if previous else None, random.Random(5)
        )
        material = TlsMaterial.build(snapshot, previous.material if previous else None)
        return Side(compiled, material)

    @property
    def upstream_address(self) -> Address:
        return next(iter(self.compiled.upstreams))


def make_inbound(side: Side, telemetry: Telemetry | None = None, **kw: Any) -> InboundListener:
    assert side.compiled.inbound is not None
    bundle = side.compiled.snapshot.trust_bundle
    return InboundListener(side.compiled.inbound, side.material.sni, bundle, telemetry, **kw)


def make_outbound(side: Side, telemetry: Telemetry | None = None, **kw: Any) -> OutboundListener:
    address = side.upstream_address
    runtime = side.compiled.upstreams[address]
    return OutboundListener(
        runtime, side.material.upstreams[address], telemetry, rng=random.Random(1), **kw
    )


# ---------------------------------------------------------------------------- servers


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are only alike

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def echo_server(tag: bytes = b"") -> asyncio.Server:
    """Echoes; with a ``tag``, answers it first on every connection."""

    class Tagged(_Echo):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            if tag:
                self.transport.write(tag)

    return await asyncio.get_running_loop().create_server(Tagged, "127.0.0.1", 0)


def port_of(server: asyncio.Server) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


def address_of(server: asyncio.Server) -> Address:
    return "127.0.0.1", port_of(server)


@dataclass
class Mesh:
    leaves: Leaves
    inbound: InboundListener
    outbound: OutboundListener
    backend: asyncio.Server
    inbound_side: Side
    outbound_side: Side
    telemetry_in: Telemetry
    telemetry_out: Telemetry

    def set_inbound(self, snapshot: Snapshot) -> None:
        self.inbound_side = Side.of(snapshot, self.inbound_side)
        assert self.inbound_side.compiled.inbound is not None
        self.inbound.update(self.inbound_side.compiled.inbound, self.inbound_side.material.sni)

    def set_outbound(self, snapshot: Snapshot) -> None:
        side = self.outbound_side = Side.of(snapshot, self.outbound_side)
        address = side.upstream_address
        self.outbound.update(side.compiled.upstreams[address], side.material.upstreams[address])

    def outbound_to(self, endpoints: Sequence[Address], **kw: Any) -> Snapshot:
        return outbound_snapshot(self.leaves, endpoints, **kw)


async def start_mesh(leaves: Leaves, *, inbound: Snapshot | None = None, **out: Any) -> Mesh:
    backend = await echo_server()
    inbound_side = Side.of(inbound or inbound_snapshot(leaves, address_of(backend)))
    telemetry_in, telemetry_out = Telemetry(), Telemetry()
    listener_in = make_inbound(inbound_side, telemetry_in)
    await listener_in.start()
    outbound_side = Side.of(outbound_snapshot(leaves, [listener_in.address], **out))
    listener_out = make_outbound(outbound_side, telemetry_out)
    await listener_out.start()
    return Mesh(
        leaves,
        listener_in,
        listener_out,
        backend,
        inbound_side,
        outbound_side,
        telemetry_in,
        telemetry_out,
    )


async def stop_mesh(mesh: Mesh) -> None:
    await mesh.outbound.aclose()
    await mesh.inbound.aclose()
    mesh.backend.close()


@pytest.fixture
async def mesh(leaves: Leaves) -> AsyncIterator[Mesh]:
    started = await start_mesh(leaves)
    try:
        yield started
    finally:
        await stop_mesh(started)


async def exchange(address: Address, payload: bytes) -> bytes:
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(*address)
        writer.write(payload)
        answer = await reader.readexactly(len(payload))
        writer.close()
        return answer


async def assert_closed(reader: asyncio.StreamReader) -> None:
    """The proxy closed the connection: EOF, or a reset when it closed with bytes of
    ours still unread (the kernel then answers with RST)."""
    with contextlib.suppress(ConnectionResetError):
        assert await reader.read() == b""


async def refused(address: Address, payload: bytes = b"hello") -> None:
    """A connection through ``address`` is closed without an answer."""
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(*address)
        writer.write(payload)
        await assert_closed(reader)
        writer.close()


async def wait_for(condition: Callable[[], object], what: str) -> None:
    """Poll ``condition`` (a counter the proxy updates from its callbacks)."""
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                if condition():
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not {what} within {WAIT_S} s") from None


def counter(telemetry: Telemetry, name: str, **labels: str) -> float:
    """A counter of ``telemetry.dump()`` summed over the series matching ``labels``."""
    total = 0.0
    for metric, series, value in telemetry.dump()["counters"]:
        if metric == f"meshnode_proxy_{name}_total":
            found = dict(map(tuple, series))
            if all(found.get(k) == v for k, v in labels.items()):
                total += value
    return total


# ---------------------------------------------------------------------------- tests


async def test_round_trip_counters_and_telemetry(mesh: Mesh) -> None:
    assert await exchange(mesh.outbound.address, b"hello") == b"hello"
    assert await exchange(mesh.outbound.address, b"again") == b"again"
    await wait_for(lambda: mesh.inbound.statistics().connections_closed == 2, "closed")
    await wait_for(lambda: mesh.outbound.statistics().connections_closed == 2, "closed")
    for listener in (mesh.inbound, mesh.outbound):
        counted = listener.statistics()
        assert counted.connections_opened == 2
        assert counted.connections_active == 0
        assert (counted.bytes_received, counted.bytes_sent) == (10, 10)
        assert counted.handshake_failures == {}
    assert mesh.inbound.open_links == 0
    for telemetry, direction in ((mesh.telemetry_in, "inbound"), (mesh.telemetry_out, "outbound")):
        labels = {"direction": direction, "source": "web", "destination": "api"}
        assert counter(telemetry, "tcp_connections_opened", **labels) == 2
        assert counter(telemetry, "tcp_connections_closed", **labels) == 2
        assert counter(telemetry, "requests", code_class="tcp", **labels) == 2
        assert counter(telemetry, "request_bytes", **labels) == 10


async def test_closed_connections_are_freed_without_the_cycle_collector(mesh: Mesh) -> None:
    """A closed link, its sides and transports go by reference counting: left in
    reference cycles they would pile up (~2 KB a connection) until a full collection."""

    def links() -> int:
        return sum(type(obj) is transport._Link for obj in gc.get_objects())

    gc.collect()
    before = links()
    gc.disable()
    try:
        for payload in (b"one", b"two", b"three"):
            assert await exchange(mesh.outbound.address, payload) == payload
        await wait_for(lambda: mesh.inbound.statistics().connections_closed == 3, "closed")
        await wait_for(lambda: mesh.outbound.statistics().connections_closed == 3, "closed")
        await wait_for(lambda: links() == before, "links freed")
    finally:
        gc.enable()


async def test_new_connections_resume_the_session_of_a_full_handshake(mesh: Mesh) -> None:
    context = mesh.outbound.contexts.context_for(mesh.inbound.address, "api")
    assert await exchange(mesh.outbound.address, b"one") == b"one"
    kept = context.resume_session
    assert kept is not None and kept.has_ticket
    for payload in (b"two", b"three"):
        assert await exchange(mesh.outbound.address, payload) == payload
    # Resumed connections keep the session (reading a new one leaks on CPython 3.11).
    assert context.resume_session is kept


async def test_a_per_instance_server_name_reaches_its_service(mesh: Mesh) -> None:
    sni = instance_sni("api", INSTANCE)
    mesh.set_outbound(mesh.outbound_to([mesh.inbound.address], sni=sni))
    assert await exchange(mesh.outbound.address, b"instance") == b"instance"
    assert mesh.inbound.statistics().connections_opened == 1


async def test_an_unknown_server_name_is_refused_in_the_handshake(mesh: Mesh) -> None:
    mesh.set_outbound(mesh.outbound_to([mesh.inbound.address], sni="nobody"))
    await refused(mesh.outbound.address)
    await wait_for(lambda: mesh.inbound.statistics().handshake_failures, "counted")
    assert mesh.inbound.statistics().handshake_failures == {"unknown_sni": 1}
    assert counter(mesh.telemetry_in, "tls_handshake_failures", reason="unknown_sni") == 1


async def _bulk(address: Address, size: int, *, slow_reader: bool) -> None:
    """Send ``size`` pseudo-random bytes while reading the echo back (slowly: small
    reads with pauses, so every buffer on the way fills and backpressure acts)."""
    payload = os.urandom(1 << 16) * (size >> 16)
    async with asyncio.timeout(60):
        reader, writer = await asyncio.open_connection(*address)

        async def send() -> None:
            writer.write(payload)
            await writer.drain()

        async def receive() -> bytes:
            digest = hashlib.sha256()
            received = 0
            while received < size:
                chunk = await reader.read(16384 if slow_reader else 1 << 20)
                assert chunk, f"closed after {received} bytes"
                digest.update(chunk)
                received += len(chunk)
                if slow_reader and received < size // 2:
                    await asyncio.sleep(0.001)
            return digest.digest()

        async with asyncio.TaskGroup() as group:
            group.create_task(send())
            echoed = group.create_task(receive())
        writer.close()
    assert echoed.result() == hashlib.sha256(payload).digest()


async def test_multi_megabyte_transfer_both_directions_with_a_slow_reader(mesh: Mesh) -> None:
    await _bulk(mesh.outbound.address, 16 << 20, slow_reader=True)
    assert mesh.outbound.statistics().bytes_sent == 16 << 20
    # The slow reader filled the buffers on the way: reading was paused upstream.
    paused = mesh.outbound.statistics().backpressure_pauses
    assert paused + mesh.inbound.statistics().backpressure_pauses > 0


async def test_eof_from_the_client_arrives_after_its_bytes(mesh: Mesh) -> None:
    """Across mTLS an EOF cannot stay a half-close (asyncio TLS transports cannot
    write EOF): the proxy flushes what it has, then closes; the backend gets every
    byte, then EOF."""
    received: asyncio.Queue[bytes] = asyncio.Queue()

    class Recorder(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            received.put_nowait(data)

        def eof_received(self) -> bool:
            received.put_nowait(b"")
            return False

    recorder = await asyncio.get_running_loop().create_server(Recorder, "127.0.0.1", 0)
    try:
        mesh.set_inbound(inbound_snapshot(mesh.leaves, address_of(recorder)))
        payload = os.urandom(1 << 20)
        reader, writer = await asyncio.open_connection(*mesh.outbound.address)
        writer.write(payload)
        writer.write_eof()
        got = bytearray()
        async with asyncio.timeout(WAIT_S):
            while chunk := await received.get():
                got += chunk
        assert bytes(got) == payload
        await assert_closed(reader)
        writer.close()
    finally:
        recorder.close()


def test_multi_megabyte_transfer_under_uvloop(leaves: Leaves) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        mesh = await start_mesh(leaves)
        try:
            await _bulk(mesh.outbound.address, 16 << 20, slow_reader=True)
            await _bulk(mesh.outbound.address, 8 << 20, slow_reader=False)
            assert await exchange(mesh.outbound.address, b"small") == b"small"
        finally:
            await stop_mesh(mesh)

    uvloop.run(scenario())


async def test_a_plaintext_client_is_refused_and_counted(mesh: Mesh) -> None:
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(*mesh.inbound.address)
        writer.write(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        assert await reader.read() == b""
        writer.close()
    await wait_for(lambda: mesh.inbound.statistics().handshake_failures, "counted")
    assert mesh.inbound.statistics().handshake_failures == {"plaintext": 1}
    assert mesh.inbound.statistics().connections_opened == 0
    assert counter(mesh.telemetry_in, "tls_handshake_failures", reason="plaintext") == 1


async def test_a_client_certificate_from_another_ca_is_refused(mesh: Mesh) -> None:
    foreign = make_pki("other.meshnode").leaf("web")
    # Trusts our CA (so it would accept the server), presents the foreign leaf.
    mesh.set_outbound(mesh.outbound_to([mesh.inbound.address], leaf=foreign))
    await refused(mesh.outbound.address)
    await wait_for(lambda: mesh.inbound.statistics().handshake_failures, "counted")
    assert mesh.inbound.statistics().handshake_failures == {"untrusted_certificate": 1}
    assert mesh.inbound.statistics().connections_opened == 0


async def test_a_server_of_the_wrong_identity_is_refused(mesh: Mesh) -> None:
    # The inbound side answers for "api" with db's certificate.
    backend = address_of(mesh.backend)
    mesh.set_inbound(inbound_snapshot(mesh.leaves, backend, leaf=mesh.leaves.db))
    await refused(mesh.outbound.address)
    counted = mesh.outbound.statistics()
    assert counted.handshake_failures == {"wrong_identity": 1}  # one endpoint, one try
    assert (counted.connect_failures, counted.no_endpoint, counted.bytes_received) == (1, 1, 0)
    assert counter(mesh.telemetry_out, "tls_handshake_failures", reason="wrong_identity") == 1


async def test_a_denied_connection_is_closed_and_counted(mesh: Mesh) -> None:
    mesh.set_inbound(
        inbound_snapshot(mesh.leaves, address_of(mesh.backend), intentions=(DENY_WEB,))
    )
    await refused(mesh.outbound.address)
    counted = mesh.inbound.statistics()
    assert (counted.denied, counted.bytes_received, counted.connections_opened) == (1, 0, 0)
    labels = {"source": "web", "destination": "api", "level": "l4"}
    assert counter(mesh.telemetry_in, "intention_denials", **labels) == 1
    await wait_for(lambda: mesh.inbound.open_links == 0, "closed")


async def test_default_deny_without_an_intention(mesh: Mesh) -> None:
    mesh.set_inbound(inbound_snapshot(mesh.leaves, address_of(mesh.backend), intentions=()))
    await refused(mesh.outbound.address)
    mesh.set_inbound(
        inbound_snapshot(mesh.leaves, address_of(mesh.backend), intentions=(), default_allow=True)
    )
    assert await exchange(mesh.outbound.address, b"allowed") == b"allowed"


async def test_a_connection_rate_limit_refuses_the_excess(mesh: Mesh) -> None:
    limit = RateLimit(requests_per_second=0.001, burst=1)
    mesh.set_inbound(inbound_snapshot(mesh.leaves, address_of(mesh.backend), rate_limit=limit))
    assert await exchange(mesh.outbound.address, b"first") == b"first"
    await refused(mesh.outbound.address)
    assert counter(mesh.telemetry_in, "rate_limited", source="web", destination="api") == 1


async def test_max_connections_of_a_local_service(mesh: Mesh) -> None:
    mesh.set_inbound(inbound_snapshot(mesh.leaves, address_of(mesh.backend), max_connections=1))
    reader, writer = await asyncio.open_connection(*mesh.outbound.address)
    writer.write(b"one")
    assert await reader.readexactly(3) == b"one"
    await refused(mesh.outbound.address)
    writer.close()
    await wait_for(lambda: mesh.inbound.open_links == 0, "closed")
    assert await exchange(mesh.outbound.address, b"two") == b"two"


async def test_the_outbound_breaker_limits_connections(mesh: Mesh) -> None:
    mesh.set_outbound(mesh.outbound_to([mesh.inbound.address], limits=Limits(max_connections=1)))
    reader, writer = await asyncio.open_connection(*mesh.outbound.address)
    writer.write(b"one")
    assert await reader.readexactly(3) == b"one"
    await refused(mesh.outbound.address)
    trips = counter(mesh.telemetry_out, "circuit_breaker_trips", limit="max_connections")
    assert trips == 1
    writer.close()
    await wait_for(lambda: mesh.outbound.open_links == 0, "closed")
    assert await exchange(mesh.outbound.address, b"two") == b"two"


async def test_a_connect_failure_falls_back_to_another_endpoint(mesh: Mesh) -> None:
    dead = await echo_server()
    dead_address = address_of(dead)
    dead.close()
    await dead.wait_closed()
    mesh.set_outbound(mesh.outbound_to([dead_address, mesh.inbound.address]))
    for payload in (b"hello", b"again", b"third"):
        assert await exchange(mesh.outbound.address, payload) == payload
    counted = mesh.outbound.statistics()
    assert counted.connect_failures >= 1
    assert counted.no_endpoint == 0


async def test_no_endpoint_closes_the_client(mesh: Mesh) -> None:
    mesh.set_outbound(mesh.outbound_to([]))
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(*mesh.outbound.address)
        assert await reader.read() == b""
        writer.close()
    assert mesh.outbound.statistics().no_endpoint == 1
    assert counter(mesh.telemetry_out, "no_healthy_endpoint") == 1


async def test_update_swaps_the_target_for_new_connections_only(mesh: Mesh) -> None:
    old_reader, old_writer = await asyncio.open_connection(*mesh.outbound.address)
    old_writer.write(b"before")
    assert await old_reader.readexactly(6) == b"before"
    other = await echo_server(tag=b"other:")
    try:
        mesh.set_inbound(inbound_snapshot(mesh.leaves, address_of(other), version=2))
        # New connections reach the new target ...
        reader, writer = await asyncio.open_connection(*mesh.outbound.address)
        writer.write(b"x")
        assert await reader.readexactly(7) == b"other:x"
        writer.close()
        # ... while the old one still reaches the old target.
        old_writer.write(b"after")
        assert await old_reader.readexactly(5) == b"after"
        old_writer.close()
    finally:
        other.close()


async def test_an_access_log_line_per_connection(leaves: Leaves) -> None:
    lines: list[str] = []
    mesh = await start_mesh(leaves)
    try:
        mesh.outbound.access_log = AccessLogger(AccessLog(), lines.append, random.Random(1))
        assert await exchange(mesh.outbound.address, b"logged") == b"logged"
        await wait_for(lambda: lines, "logged")
        inbound_port = mesh.inbound.address[1]
    finally:
        await stop_mesh(mesh)
    record = json.loads(lines[0])
    assert record["direction"] == "outbound"
    assert (record["source"], record["destination"], record["protocol"]) == ("web", "api", "tcp")
    assert (record["route"], record["cluster"], record["status"]) == ("api/default", "api", 0)
    assert record["upstream"] == f"127.0.0.1:{inbound_port}"
    assert (record["bytes_in"], record["bytes_out"], record["attempts"]) == (6, 6, 1)
    assert record["error"] == ""


async def test_idle_connections_are_closed(leaves: Leaves) -> None:
    mesh = await start_mesh(leaves, idle=0.3)
    try:
        async with asyncio.timeout(WAIT_S):
            reader, writer = await asyncio.open_connection(*mesh.outbound.address)
            loop = asyncio.get_running_loop()
            started = loop.time()
            for _ in range(4):  # activity keeps it open past the timeout
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                last_activity = loop.time()
                await asyncio.sleep(0.15)
            assert await reader.read() == b""
            idle_closed = loop.time()
            writer.close()
        assert idle_closed - started > 2 * 0.3  # activity kept it open past one timeout
        assert 0.3 - 0.05 <= idle_closed - last_activity <= 0.3 + 0.25
        assert mesh.outbound.statistics().idle_timeouts == 1
        await wait_for(lambda: mesh.inbound.statistics().connections_active == 0, "closed")
    finally:
        await stop_mesh(mesh)


def test_unchanged_certificates_keep_their_contexts(leaves: Leaves) -> None:
    """Session resumption needs the same client contexts across snapshots."""
    first = Side.of(outbound_snapshot(leaves, [("127.0.0.1", 1)]))
    second = Side.of(outbound_snapshot(leaves, [("127.0.0.1", 2)], version=2), first)
    address = first.upstream_address
    assert second.material.upstreams[address] is first.material.upstreams[address]
    rotated = Side.of(
        outbound_snapshot(leaves, [("127.0.0.1", 2)], version=3, leaf=leaves.db), second
    )
    assert rotated.material.upstreams[address] is not first.material.upstreams[address]
    inbound = Side.of(inbound_snapshot(leaves, ("127.0.0.1", 1)))
    again = Side.of(replace(inbound_snapshot(leaves, ("127.0.0.1", 2)), version=2), inbound)
    assert again.material.sni["api"] is inbound.material.sni["api"]
    assert again.material.sni[instance_sni("api", INSTANCE)] is again.material.sni["api"]
