"""The proxy worker (``python -m proxy``) and its data plane: snapshots applied
atomically, listeners created, updated, replaced and closed, the control protocol
with a test playing the agent, ``--snapshot`` files, signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import msgpack
import pytest

from proxy import tls
from proxy.dataplane import SnapshotRejected, plan_listeners
from proxy.plane import DataPlane
from proxy.server import FrameDecoder, encode_frame, read_frame
from proxy.snapshot import AccessLog, Endpoint, Outlier, Snapshot, encode
from tests.proxy.test_l4 import (
    DENY_WEB,
    WAIT_S,
    Leaves,
    address_of,
    counter,
    echo_server,
    exchange,
    inbound_snapshot,
    outbound_snapshot,
    refused,
    wait_for,
)
from tests.proxy.test_l4 import leaves as leaves
from tests.proxy.test_tls import Leaf

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def host_snapshot(
    leaves: Leaves,
    backend: tuple[str, int],
    inbound_port: int,
    outbound_port: int,
    *,
    version: int = 1,
    web: Leaf | None = None,
    **inbound: Any,
) -> Snapshot:
    """One host running both sides: web's outbound listener (presenting ``web``) →
    its own inbound port (SNI api) → api's local instance ``backend``."""
    served = inbound_snapshot(leaves, backend, port=inbound_port, version=version, **inbound)
    calls = outbound_snapshot(leaves, [("127.0.0.1", inbound_port)], port=outbound_port, leaf=web)
    return replace(served, upstreams=calls.upstreams)


# ---------------------------------------------------------------------------- the plan


def test_plan_listeners(leaves: Leaves) -> None:
    snapshot = host_snapshot(leaves, ("127.0.0.1", 1), 20000, 15001)
    first = plan_listeners(None, {}, snapshot)
    assert (first.inbound, first.create, first.update) == ("create", (("127.0.0.1", 15001),), ())
    running = {("127.0.0.1", 15001): "tcp", ("127.0.0.1", 15002): "tcp"}
    kept = plan_listeners(("127.0.0.1", 20000), running, snapshot)  # type: ignore[arg-type]
    assert (kept.inbound, kept.update, kept.close) == (
        "update",
        (("127.0.0.1", 15001),),
        (("127.0.0.1", 15002),),
    )
    http = {("127.0.0.1", 15001): "http"}
    moved = plan_listeners(("127.0.0.1", 20001), http, snapshot)  # type: ignore[arg-type]
    assert (moved.inbound, moved.replace) == ("rebind", (("127.0.0.1", 15001),))
    gone = plan_listeners(("127.0.0.1", 20000), {}, replace(snapshot, inbound=None))
    assert gone.inbound == "close"


def test_frames_round_trip() -> None:
    decoder = FrameDecoder()
    data = encode_frame("hello", {"pid": 1, "protocol": 1}) + encode_frame("applied", 3)
    assert decoder.feed(data[:5]) == []
    assert decoder.feed(data[5:]) == [["hello", {"pid": 1, "protocol": 1}], ["applied", 3]]


# ---------------------------------------------------------------------------- in process


@pytest.fixture
async def plane() -> AsyncIterator[DataPlane]:
    running = DataPlane(l7=False)
    try:
        yield running
    finally:
        await running.aclose()


async def test_a_new_snapshot_keeps_open_connections_and_a_deny_cuts_them(
    leaves: Leaves, plane: DataPlane
) -> None:
    backend = await echo_server()
    inbound_port, outbound_port = free_port(), free_port()
    outbound = ("127.0.0.1", outbound_port)
    try:
        await plane.apply(host_snapshot(leaves, address_of(backend), inbound_port, outbound_port))
        assert await exchange(outbound, b"through") == b"through"
        reader, writer = await asyncio.open_connection(*outbound)
        writer.write(b"open")
        assert await reader.readexactly(4) == b"open"
        listener = plane.outbound[outbound]
        await plane.apply(
            host_snapshot(leaves, address_of(backend), inbound_port, outbound_port, version=2)
        )
        assert plane.outbound[outbound] is listener  # updated in place
        assert plane.version == 2
        writer.write(b"still")
        assert await reader.readexactly(5) == b"still"
        # A deny refuses new connections and cuts the open one (revoked access).
        await plane.apply(
            host_snapshot(
                leaves,
                address_of(backend),
                inbound_port,
                outbound_port,
                version=3,
                intentions=(DENY_WEB,),
            )
        )
        await refused(outbound)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert counter(plane.telemetry, "intention_denials", level="l4") == 2
    finally:
        backend.close()


async def test_a_port_in_use_rejects_the_whole_snapshot(leaves: Leaves, plane: DataPlane) -> None:
    backend = await echo_server()
    squatter = await echo_server()
    inbound_port, outbound_port = free_port(), free_port()
    try:
        first = host_snapshot(leaves, address_of(backend), inbound_port, outbound_port)
        await plane.apply(first)
        taken = address_of(squatter)[1]
        second = outbound_snapshot(leaves, [("127.0.0.1", inbound_port)], port=taken)
        bad = replace(first, version=2, upstreams=first.upstreams + second.upstreams)
        with pytest.raises(SnapshotRejected, match="in use"):
            await plane.apply(bad)
        assert plane.version == 1
        assert set(plane.outbound) == {("127.0.0.1", outbound_port)}
        assert await exchange(("127.0.0.1", outbound_port), b"still") == b"still"
    finally:
        backend.close()
        squatter.close()


async def test_a_bad_certificate_rejects_the_snapshot(leaves: Leaves, plane: DataPlane) -> None:
    backend = await echo_server()
    inbound_port, outbound_port = free_port(), free_port()
    try:
        first = host_snapshot(leaves, address_of(backend), inbound_port, outbound_port)
        await plane.apply(first)
        upstream = first.upstreams[0]
        broken = replace(upstream.certificate, key_pem=leaves.api.key_pem)  # not web's key
        bad = replace(first, version=2, upstreams=(replace(upstream, certificate=broken),))
        with pytest.raises(SnapshotRejected):
            await plane.apply(bad)
        assert plane.version == 1
        assert await exchange(("127.0.0.1", outbound_port), b"kept") == b"kept"
    finally:
        backend.close()


async def test_listeners_move_and_close_with_the_snapshot(leaves: Leaves, plane: DataPlane) -> None:
    backend = await echo_server()
    inbound_port, outbound_port, moved_port = free_port(), free_port(), free_port()
    try:
        await plane.apply(host_snapshot(leaves, address_of(backend), inbound_port, outbound_port))
        reader, writer = await asyncio.open_connection("127.0.0.1", outbound_port)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        # The upstream moves to another port: the old listener and its connections go.
        await plane.apply(
            host_snapshot(leaves, address_of(backend), inbound_port, moved_port, version=2)
        )
        assert set(plane.outbound) == {("127.0.0.1", moved_port)}
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
        writer.close()
        with pytest.raises(OSError):
            await exchange(("127.0.0.1", outbound_port), b"gone")
        assert await exchange(("127.0.0.1", moved_port), b"moved") == b"moved"
        # The inbound port moves too (the outbound endpoint with it).
        other_inbound = free_port()
        snapshot = host_snapshot(leaves, address_of(backend), other_inbound, moved_port, version=3)
        await plane.apply(snapshot)
        assert await exchange(("127.0.0.1", moved_port), b"rebound") == b"rebound"
        await plane.apply(replace(snapshot, version=4, inbound=None, upstreams=()))
        assert plane.inbound is None and not plane.outbound
    finally:
        backend.close()


async def test_an_http_upstream_without_l7_is_rejected(leaves: Leaves, plane: DataPlane) -> None:
    snapshot = outbound_snapshot(leaves, [("127.0.0.1", 1)], port=free_port(), protocol="http")
    with pytest.raises(SnapshotRejected, match="L7"):
        await plane.apply(snapshot)
    assert plane.version is None


# ---------------------------------------------------------------------------- processes


async def start_worker(*arguments: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *arguments,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@contextlib.asynccontextmanager
async def worker_process(*arguments: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A worker, killed by its PID whatever happens."""
    process = await start_worker(*arguments)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def ready_line(process: asyncio.subprocess.Process) -> None:
    assert process.stdout is not None
    async with asyncio.timeout(WAIT_S):
        line = await process.stdout.readline()
    if line != b"ready\n":
        assert process.stderr is not None
        error = await process.stderr.read()
        raise AssertionError(f"worker said {line!r}: {error.decode(errors='replace')}")


@pytest.mark.slow
async def test_worker_from_a_snapshot_file_end_to_end_and_sigterm(
    leaves: Leaves, tmp_path: Path
) -> None:
    backend = await echo_server()
    inbound_port, outbound_port = free_port(), free_port()
    path = tmp_path / "snapshot.bin"
    path.write_bytes(
        encode(host_snapshot(leaves, address_of(backend), inbound_port, outbound_port))
    )
    path.chmod(0o600)
    try:
        async with worker_process("--snapshot", str(path)) as process:
            await ready_line(process)
            outbound = ("127.0.0.1", outbound_port)
            assert await exchange(outbound, b"through a worker") == b"through a worker"
            # An open connection does not hold the worker up.
            _, writer = await asyncio.open_connection(*outbound)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(WAIT_S):
                assert await process.wait() == 0
            writer.close()
    finally:
        backend.close()


def test_worker_refuses_a_bad_snapshot_file(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.bin"
    path.write_bytes(msgpack.packb({"version": 1}))
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--snapshot", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "trust_domain" in done.stderr or "missing" in done.stderr, done.stderr


class Agent:
    """The test playing the agent: a unix socket the worker connects to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connections: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.connections.put((reader, writer))

        self.server = await asyncio.start_unix_server(accepted, str(self.path))
        os.chmod(self.path, 0o600)

    async def accept(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with asyncio.timeout(WAIT_S):
            return await self.connections.get()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def next_of(reader: asyncio.StreamReader, kind: str) -> list[Any]:
    """The next message of ``kind`` (skipping stats unless asked for)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            message = await read_frame(reader)
            if message[0] == kind:
                return message
            assert message[0] == "stats", message


def send_snapshot(writer: asyncio.StreamWriter, snapshot: Snapshot | bytes) -> None:
    data = snapshot if isinstance(snapshot, bytes) else encode(snapshot)
    writer.write(encode_frame("snapshot", data))


def stat(dump: dict[str, Any], name: str, **labels: str) -> float:
    total = 0.0
    for metric, series, value in dump["counters"]:
        if metric == f"meshnode_proxy_{name}_total" and all(
            dict(map(tuple, series)).get(k) == v for k, v in labels.items()
        ):
            total += value
    return total


@pytest.mark.slow
async def test_control_socket_snapshots_intention_switch_rejection_and_stats(
    leaves: Leaves, tmp_path: Path
) -> None:
    backend = await echo_server()
    agent = Agent(tmp_path / "proxy.sock")
    await agent.start()
    inbound_port, outbound_port = free_port(), free_port()
    outbound = ("127.0.0.1", outbound_port)
    snapshot = host_snapshot(leaves, address_of(backend), inbound_port, outbound_port)
    try:
        async with worker_process("--control", str(agent.path)) as process:
            reader, writer = await agent.accept()
            hello = await next_of(reader, "hello")
            assert hello[1] == {"pid": process.pid, "protocol": 1}
            send_snapshot(writer, snapshot)
            assert await next_of(reader, "applied") == ["applied", 1]
            await ready_line(process)
            # An open connection under the allow intention.
            open_reader, open_writer = await asyncio.open_connection(*outbound)
            open_writer.write(b"allowed")
            assert await open_reader.readexactly(7) == b"allowed"
            # allow → deny: new connections refused, the open one cut.
            denied = host_snapshot(
                leaves,
                address_of(backend),
                inbound_port,
                outbound_port,
                version=2,
                intentions=(DENY_WEB,),
            )
            send_snapshot(writer, denied)
            assert await next_of(reader, "applied") == ["applied", 2]
            await refused(outbound)
            assert await asyncio.wait_for(open_reader.read(), WAIT_S) == b""
            open_writer.close()
            # A snapshot that does not decode, and one that cannot bind: rejected, and
            # version 2 still serves.
            send_snapshot(writer, b"\x93garbage")
            rejected = await next_of(reader, "rejected")
            assert rejected[1] == -1 and "msgpack" in rejected[2]
            squatter = await echo_server()
            taken = outbound_snapshot(
                leaves, [("127.0.0.1", inbound_port)], port=address_of(squatter)[1]
            )
            bad = replace(denied, version=3, upstreams=denied.upstreams + taken.upstreams)
            send_snapshot(writer, bad)
            rejected = await next_of(reader, "rejected")
            assert rejected[1] == 3 and "in use" in rejected[2]
            squatter.close()
            await refused(outbound)
            # Plaintext to the inbound port: refused, and counted in the stats.
            plain_reader, plain_writer = await asyncio.open_connection("127.0.0.1", inbound_port)
            plain_writer.write(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
            assert await asyncio.wait_for(plain_reader.read(), WAIT_S) == b""
            plain_writer.close()
            async with asyncio.timeout(WAIT_S):
                while True:
                    stats = (await next_of(reader, "stats"))[1]
                    if stat(stats, "tls_handshake_failures", reason="plaintext"):
                        break
            # Two new connections refused, one open connection revoked.
            assert stat(stats, "intention_denials", level="l4") == 3
            assert stat(stats, "tcp_connections_opened", direction="inbound") == 1
            gauges = {metric: value for metric, _, value in stats["gauges"]}
            assert gauges["meshnode_proxy_snapshot_version"] == 2
            # The agent goes away: the worker keeps serving (and reconnects).
            writer.close()
            await agent.close()
            await asyncio.sleep(0.2)
            assert process.returncode is None
            await refused(outbound)  # still version 2: deny
            # A new agent on the same path: the worker comes back within a second or so.
            agent = Agent(agent.path)
            agent.path.unlink()
            await agent.start()
            reader, writer = await agent.accept()
            assert (await next_of(reader, "hello"))[1]["pid"] == process.pid
            send_snapshot(writer, replace(snapshot, version=4))
            assert await next_of(reader, "applied") == ["applied", 4]
            assert await exchange(outbound, b"allowed again") == b"allowed again"
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(WAIT_S):
                assert await process.wait() == 0
    finally:
        await agent.close()
        backend.close()


@pytest.mark.slow
async def test_exit_with_agent(leaves: Leaves, tmp_path: Path) -> None:
    agent = Agent(tmp_path / "proxy.sock")
    await agent.start()
    inbound_port, outbound_port = free_port(), free_port()
    try:
        async with worker_process("--control", str(agent.path), "--exit-with-agent") as process:
            reader, writer = await agent.accept()
            await next_of(reader, "hello")
            send_snapshot(
                writer, host_snapshot(leaves, ("127.0.0.1", 9), inbound_port, outbound_port)
            )
            assert await next_of(reader, "applied") == ["applied", 1]
            await ready_line(process)
            writer.close()
            await agent.close()
            async with asyncio.timeout(WAIT_S):
                assert await process.wait() == 0
    finally:
        await agent.close()


async def _presented_leaf(leaves: Leaves, inbound_port: int) -> bytes:
    """The DER leaf the inbound port presents for SNI ``api`` now."""
    web = leaves.web
    context = tls.client_context([leaves.pki.root_pem], web.chain_pem, web.key_pem)
    async with asyncio.timeout(WAIT_S):
        _, writer = await asyncio.open_connection(
            "127.0.0.1", inbound_port, ssl=context, server_hostname="api"
        )
        der: bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
    return der


def _der(chain_pem: str) -> bytes:
    first = chain_pem.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    return ssl.PEM_cert_to_DER_cert(first)


async def test_certificate_rotation_under_load_fails_nothing(
    leaves: Leaves, plane: DataPlane
) -> None:
    backend = await echo_server()
    inbound_port, outbound_port = free_port(), free_port()
    outbound = ("127.0.0.1", outbound_port)
    first = host_snapshot(leaves, address_of(backend), inbound_port, outbound_port)
    failures: list[BaseException] = []
    done = 0
    stop = asyncio.Event()

    async def client(index: int) -> None:
        nonlocal done
        while not stop.is_set():
            payload = f"request {index} {done}".encode()
            try:
                assert await exchange(outbound, payload) == payload
                done += 1
            except (OSError, AssertionError, asyncio.IncompleteReadError) as exc:
                failures.append(exc)

    try:
        await plane.apply(first)
        open_reader, open_writer = await asyncio.open_connection(*outbound)
        async with asyncio.TaskGroup() as group:
            for index in range(4):
                group.create_task(client(index))
            await asyncio.sleep(0.3)
            api, web = leaves.pki.leaf("api"), leaves.pki.leaf("web")
            api, web = leaves.pki.leaf("api"), leaves.pki.leaf("web")
            rotated = host_snapshot(
                leaves,
                address_of(backend),
                inbound_port,
                outbound_port,
                version=2,
                leaf=api,
                web=web,
            )
            before = done
            await plane.apply(rotated)
            await asyncio.sleep(0.3)
            stop.set()
        assert not failures, failures[:3]
        assert done > before > 0
        assert await _presented_leaf(leaves, inbound_port) == _der(api.chain_pem)
        open_writer.write(b"opened before the rotation")
        assert await open_reader.readexactly(26) == b"opened before the rotation"
        open_writer.close()
    finally:
        backend.close()


async def test_ejections_are_counted(leaves: Leaves, plane: DataPlane) -> None:
    backend = await echo_server()
    dead = await echo_server()
    dead_address = address_of(dead)
    dead.close()
    await dead.wait_closed()
    inbound_port, outbound_port = free_port(), free_port()
    snapshot = host_snapshot(leaves, address_of(backend), inbound_port, outbound_port)
    upstream = snapshot.upstreams[0]
    cluster = upstream.clusters["api"]
    cluster = replace(
        cluster,
        endpoints=(*cluster.endpoints, Endpoint(*dead_address, "api")),
        outlier=Outlier(consecutive_5xx=2, max_ejection_percent=50),
    )
    snapshot = replace(snapshot, upstreams=(replace(upstream, clusters={"api": cluster}),))
    try:
        await plane.apply(snapshot)
        for index in range(6):
            payload = b"x%d" % index
            assert await exchange(("127.0.0.1", outbound_port), payload) == payload
        await wait_for(
            lambda: counter(plane.telemetry, "outlier_ejections", destination="api") == 1,
            "counted",
        )
    finally:
        backend.close()


async def test_the_access_log_goes_to_a_file(
    leaves: Leaves, plane: DataPlane, tmp_path: Path
) -> None:
    backend = await echo_server()
    inbound_port, outbound_port = free_port(), free_port()
    path = tmp_path / "access.log"
    snapshot = replace(
        host_snapshot(leaves, address_of(backend), inbound_port, outbound_port),
        access_log=AccessLog(path=str(path)),
    )
    try:
        await plane.apply(snapshot)
        assert await exchange(("127.0.0.1", outbound_port), b"logged") == b"logged"
        await wait_for(lambda: path.exists() and len(path.read_text().splitlines()) == 2, "logged")
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert {r["direction"] for r in records} == {"inbound", "outbound"}
        inbound = next(r for r in records if r["direction"] == "inbound")
        assert inbound["source_id"] == leaves.web.spiffe_id
        assert inbound["upstream"] == "{}:{}".format(*address_of(backend))
        await plane.apply(replace(snapshot, version=2, access_log=AccessLog(path="off")))
        assert await exchange(("127.0.0.1", outbound_port), b"quiet") == b"quiet"
        await asyncio.sleep(0.1)
        assert len(path.read_text().splitlines()) == 2
    finally:
        backend.close()


# ---------------------------------------------------------------------------- http


class _HttpBackend(asyncio.Protocol):
    """Answers every request ``200 ok`` with keep-alive (requests without bodies)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


async def http_get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[int, dict[str, str], bytes]:
    """One keep-alive request on an open connection: status, headers, body."""
    writer.write(b"GET /hello HTTP/1.1\r\nHost: api\r\n\r\n")
    async with asyncio.timeout(WAIT_S):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def http_host(
    leaves: Leaves, backend: tuple[str, int], inbound_port: int, outbound_port: int, **inbound: Any
) -> Snapshot:
    snapshot = host_snapshot(
        leaves, backend, inbound_port, outbound_port, protocol="http", **inbound
    )
    return replace(snapshot, upstreams=(replace(snapshot.upstreams[0], protocol="http"),))


async def test_http_service_end_to_end_with_an_intention_switch(leaves: Leaves) -> None:
    pytest.importorskip("proxy.l7")
    plane = DataPlane()
    backend = await asyncio.get_running_loop().create_server(_HttpBackend, "127.0.0.1", 0)
    inbound_port, outbound_port = free_port(), free_port()
    try:
        await plane.apply(http_host(leaves, address_of(backend), inbound_port, outbound_port))
        reader, writer = await asyncio.open_connection("127.0.0.1", outbound_port)
        for _ in range(3):  # keep-alive through both proxies
            status, _, body = await http_get(reader, writer)
            assert (status, body) == (200, b"ok")
        await plane.apply(
            http_host(
                leaves,
                address_of(backend),
                inbound_port,
                outbound_port,
                version=2,
                intentions=(DENY_WEB,),
            )
        )
        status, headers, _ = await http_get(reader, writer)  # the same client connection
        assert status == 403
        assert headers["x-meshnode-error"].startswith("intention: ")
        writer.close()
        assert counter(plane.telemetry, "requests", code_class="2xx", direction="outbound") >= 3
        # The inbound connection handed to L7 is still counted as one.
        assert counter(plane.telemetry, "tcp_connections_opened", direction="inbound") == 1
    finally:
        await plane.aclose()
        backend.close()


@pytest.mark.slow
async def test_worker_process_serves_an_http_service(leaves: Leaves, tmp_path: Path) -> None:
    pytest.importorskip("proxy.l7")
    backend = await asyncio.get_running_loop().create_server(_HttpBackend, "127.0.0.1", 0)
    inbound_port, outbound_port = free_port(), free_port()
    path = tmp_path / "snapshot.bin"
    path.touch(0o600)
    path.write_bytes(encode(http_host(leaves, address_of(backend), inbound_port, outbound_port)))
    try:
        async with worker_process("--snapshot", str(path)) as process:
            await ready_line(process)
            reader, writer = await asyncio.open_connection("127.0.0.1", outbound_port)
            for _ in range(2):
                status, _, body = await http_get(reader, writer)
                assert (status, body) == (200, b"ok")
            writer.close()
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(WAIT_S):
                assert await process.wait() == 0
    finally:
        backend.close()


async def test_a_protocol_change_replaces_the_outbound_listener(leaves: Leaves) -> None:
    pytest.importorskip("proxy.l7")
    plane = DataPlane()
    backend = await asyncio.get_running_loop().create_server(_HttpBackend, "127.0.0.1", 0)
    inbound_port, outbound_port = free_port(), free_port()
    outbound = ("127.0.0.1", outbound_port)
    try:
        await plane.apply(host_snapshot(leaves, address_of(backend), inbound_port, outbound_port))
        tcp_listener = plane.outbound[outbound]
        reader, writer = await asyncio.open_connection(*outbound)
        status, _, body = await http_get(reader, writer)  # HTTP spliced as bytes
        assert (status, body) == (200, b"ok")
        await plane.apply(
            replace(http_host(leaves, address_of(backend), inbound_port, outbound_port), version=2)
        )
        assert plane.outbound[outbound] is not tcp_listener
        with contextlib.suppress(ConnectionResetError):  # closed with its listener
            assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
        writer.close()
        reader, writer = await asyncio.open_connection(*outbound)
        status, _, body = await http_get(reader, writer)
        assert (status, body) == (200, b"ok")
        writer.close()
    finally:
        await plane.aclose()
        backend.close()
