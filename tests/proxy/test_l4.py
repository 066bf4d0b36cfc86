"""proxy.l4: client → outbound → mTLS → inbound → echo server, on 127.0.0.1 with real
certificates; and the worker process (``python -m proxy``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from proxy import tls
from proxy.l4 import (
    InboundListener,
    InboundSettings,
    LocalService,
    OutboundListener,
    OutboundSettings,
)
from proxy.l4.transport import Address, Authorize
from tests.proxy.test_tls import Pki, make_pki

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 10.0


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki("test.meshnode")


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


def allow_all(peer: str | None, service: str) -> tuple[bool, str]:
    return True, "test"


def in_order(endpoints: Sequence[Address]) -> OrderedPicker:
    return OrderedPicker(list(endpoints))


@dataclass
class OrderedPicker:
    """The first endpoint not excluded (a deterministic balancer)."""

    endpoints: list[Address]

    def __call__(self, exclude: Collection[Address]) -> Address | None:
        return next((e for e in self.endpoints if e not in exclude), None)


@dataclass
class Mesh:
    pki: Pki
    inbound: InboundListener
    outbound: OutboundListener
    backend: asyncio.Server

    def inbound_settings(
        self, target: Address, authorize: Authorize = allow_all, idle: float | None = 60.0
    ) -> InboundSettings:
        return make_inbound_settings(self.pki, target, authorize, idle)


def make_inbound_settings(
    pki: Pki, target: Address, authorize: Authorize = allow_all, idle: float | None = 60.0
) -> InboundSettings:
    api = pki.leaf("api")
    context = tls.server_context([pki.root_pem], api.chain_pem, api.key_pem)
    return InboundSettings({"api": LocalService("api", target, context)}, authorize, 2.0, idle)


def make_outbound_settings(
    pki: Pki, endpoints: Sequence[Address], idle: float | None = 60.0, upstream: str = "api"
) -> OutboundSettings:
    web = pki.leaf("web")
    return OutboundSettings(
        upstream=upstream,
        expected_identity=f"spiffe://{pki.trust_domain}/ns/default/dc/dc1/svc/api",
        contexts=tls.ClientContexts([pki.root_pem], web.chain_pem, web.key_pem),
        pick=in_order(endpoints),
        connect_timeout=2.0,
        idle_timeout=idle,
        backoff_base=0.001,
    )


@pytest.fixture
async def mesh(pki: Pki) -> AsyncIterator[Mesh]:
    backend = await echo_server()
    inbound = InboundListener(
        "127.0.0.1", 0, [pki.root_pem], make_inbound_settings(pki, ("127.0.0.1", port_of(backend)))
    )
    await inbound.start()
    outbound = OutboundListener("127.0.0.1", 0, make_outbound_settings(pki, [inbound.address]))
    await outbound.start()
    try:
        yield Mesh(pki, inbound, outbound, backend)
    finally:
        await outbound.aclose()
        await inbound.aclose()
        backend.close()


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


async def test_round_trip_and_counters(mesh: Mesh) -> None:
    assert await exchange(mesh.outbound.address, b"hello") == b"hello"
    assert await exchange(mesh.outbound.address, b"again") == b"again"
    await wait_for(lambda: mesh.inbound.statistics().connections_closed == 2, "closed")
    for listener in (mesh.inbound, mesh.outbound):
        counted = listener.statistics()
        assert counted.connections_opened == 2
        assert counted.connections_active == 0
        assert (counted.bytes_received, counted.bytes_sent) == (10, 10)
        assert counted.handshake_failures == {}
    assert mesh.inbound.open_links == 0


async def test_new_connections_resume_the_session_of_a_full_handshake(mesh: Mesh) -> None:
    context = mesh.outbound._settings.contexts.context_for(mesh.inbound.address, "api")
    assert await exchange(mesh.outbound.address, b"one") == b"one"
    kept = context.resume_session
    assert kept is not None and kept.has_ticket
    for payload in (b"two", b"three"):
        assert await exchange(mesh.outbound.address, payload) == payload
    # Resumed connections keep the session (reading a new one leaks on CPython 3.11).
    assert context.resume_session is kept


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
        mesh.inbound.update(mesh.inbound_settings(("127.0.0.1", port_of(recorder))))
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


def test_multi_megabyte_transfer_under_uvloop(pki: Pki) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        backend = await echo_server()
        settings = make_inbound_settings(pki, ("127.0.0.1", port_of(backend)))
        inbound = InboundListener("127.0.0.1", 0, [pki.root_pem], settings)
        await inbound.start()
        outbound = OutboundListener("127.0.0.1", 0, make_outbound_settings(pki, [inbound.address]))
        await outbound.start()
        try:
            await _bulk(outbound.address, 16 << 20, slow_reader=True)
            await _bulk(outbound.address, 8 << 20, slow_reader=False)
        finally:
            await outbound.aclose()
            await inbound.aclose()
            backend.close()

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


async def test_a_client_certificate_from_another_ca_is_refused(mesh: Mesh) -> None:
    foreign = make_pki("other.meshnode")
    web = foreign.leaf("web")
    settings = make_outbound_settings(mesh.pki, [mesh.inbound.address])
    # Trusts our CA (so it would accept the server), presents the foreign leaf.
    settings = OutboundSettings(
        upstream="api",
        expected_identity=settings.expected_identity,
        contexts=tls.ClientContexts([mesh.pki.root_pem], web.chain_pem, web.key_pem),
        pick=settings.pick,
    )
    mesh.outbound.update(settings)
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(*mesh.outbound.address)
        writer.write(b"hello")
        await assert_closed(reader)
        writer.close()
    await wait_for(lambda: mesh.inbound.statistics().handshake_failures, "counted")
    assert mesh.inbound.statistics().handshake_failures == {"untrusted_certificate": 1}
    assert mesh.inbound.statistics().connections_opened == 0


async def test_a_server_of_the_wrong_identity_is_refused(mesh: Mesh) -> None:
    # The inbound side answers for "api" with db's certificate.
    db = mesh.pki.leaf("db")
    context = tls.server_context([mesh.pki.root_pem], db.chain_pem, db.key_pem)
    target = ("127.0.0.1", port_of(mesh.backend))
    mesh.inbound.update(
        InboundSettings({"api": LocalService("api", target, context)}, allow_all, 2.0, 60.0)
    )
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(*mesh.outbound.address)
        writer.write(b"hello")
        await assert_closed(reader)
        writer.close()
    counted = mesh.outbound.statistics()
    assert counted.handshake_failures == {"wrong_identity": 1}
    assert (counted.connect_failures, counted.no_endpoint, counted.bytes_received) == (1, 1, 0)


async def test_a_denied_connection_is_closed_and_counted(mesh: Mesh) -> None:
    asked: list[tuple[str | None, str]] = []

    def deny(peer: str | None, service: str) -> tuple[bool, str]:
        asked.append((peer, service))
        return False, "intention web → api: deny"

    mesh.inbound.update(mesh.inbound_settings(("127.0.0.1", port_of(mesh.backend)), deny))
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(*mesh.outbound.address)
        writer.write(b"hello")
        await assert_closed(reader)
        writer.close()
    assert asked == [(f"spiffe://{mesh.pki.trust_domain}/ns/default/dc/dc1/svc/web", "api")]
    counted = mesh.inbound.statistics()
    assert (counted.denied, counted.bytes_received) == (1, 0)
    await wait_for(lambda: mesh.inbound.statistics().connections_active == 0, "closed")


async def test_a_connect_failure_falls_back_to_the_next_endpoint(mesh: Mesh) -> None:
    dead = await echo_server()
    dead_address = ("127.0.0.1", port_of(dead))
    dead.close()
    await dead.wait_closed()
    mesh.outbound.update(make_outbound_settings(mesh.pki, [dead_address, mesh.inbound.address]))
    assert await exchange(mesh.outbound.address, b"hello") == b"hello"
    counted = mesh.outbound.statistics()
    assert (counted.connect_failures, counted.no_endpoint) == (1, 0)


async def test_no_reachable_endpoint_closes_the_client(mesh: Mesh) -> None:
    mesh.outbound.update(make_outbound_settings(mesh.pki, []))
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(*mesh.outbound.address)
        assert await reader.read() == b""
        writer.close()
    assert mesh.outbound.statistics().no_endpoint == 1


async def test_update_swaps_the_target_for_new_connections_only(mesh: Mesh) -> None:
    old_reader, old_writer = await asyncio.open_connection(*mesh.outbound.address)
    old_writer.write(b"before")
    assert await old_reader.readexactly(6) == b"before"
    other = await echo_server(tag=b"other:")
    try:
        mesh.inbound.update(mesh.inbound_settings(("127.0.0.1", port_of(other))))
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


async def test_idle_connections_are_closed(pki: Pki) -> None:
    backend = await echo_server()
    settings = make_inbound_settings(pki, ("127.0.0.1", port_of(backend)), idle=None)
    inbound = InboundListener("127.0.0.1", 0, [pki.root_pem], settings)
    await inbound.start()
    outbound = OutboundListener(
        "127.0.0.1", 0, make_outbound_settings(pki, [inbound.address], idle=0.3)
    )
    await outbound.start()
    try:
        async with asyncio.timeout(WAIT_S):
            reader, writer = await asyncio.open_connection(*outbound.address)
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
        assert outbound.statistics().idle_timeouts == 1
        await wait_for(lambda: inbound.statistics().connections_active == 0, "closed")
    finally:
        await outbound.aclose()
        await inbound.aclose()
        backend.close()


# ---------------------------------------------------------------------------- the worker


async def _free_port() -> int:
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = port_of(server)
    server.close()
    await server.wait_closed()
    return port


@pytest.mark.slow
async def test_worker_process_end_to_end_and_sigterm(pki: Pki, tmp_path: Path) -> None:
    backend = await echo_server()
    api, web = pki.leaf("api"), pki.leaf("web")
    inbound_port, outbound_port = await _free_port(), await _free_port()
    config = {
        "trust_bundle": [pki.root_pem],
        "inbound": {
            "host": "127.0.0.1",
            "port": inbound_port,
            "services": {
                "api": {
                    "target": ["127.0.0.1", port_of(backend)],
                    "cert_chain": api.chain_pem,
                    "private_key": api.key_pem,
                }
            },
            "allow": [[web.spiffe_id, "api"]],
        },
        "outbound": [
            {
                "host": "127.0.0.1",
                "port": outbound_port,
                "upstream": "api",
                "expected_identity": api.spiffe_id,
                "cert_chain": web.chain_pem,
                "private_key": web.key_pem,
                "endpoints": [["127.0.0.1", inbound_port]],
            }
        ],
    }
    path = tmp_path / "worker.json"
    path.write_text(json.dumps(config))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "--config",
        str(path),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(WAIT_S):
            assert await process.stdout.readline() == b"ready\n"
        assert await exchange(("127.0.0.1", outbound_port), b"through a worker") == (
            b"through a worker"
        )
        # An open connection does not hold the worker up.
        _, writer = await asyncio.open_connection("127.0.0.1", outbound_port)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_S):
            assert await process.wait() == 0
        writer.close()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        backend.close()


def test_worker_refuses_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "worker.json"
    path.write_text(json.dumps({"outbound": []}))
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "trust_bundle" in done.stderr
