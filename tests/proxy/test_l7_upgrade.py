"""proxy.l7: protocol upgrades (WebSocket) through the mesh — client → outbound
listener → mTLS → inbound → an aiohttp WebSocket server, and aiohttp's WebSocket
client, so both ends are an independent implementation of RFC 6455."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable

import aiohttp
import pytest

from tests.proxy.test_l7 import (
    WAIT_S,
    Knobs,
    Mesh,
    allow_only,
    client,
    mesh,
    update_service,
)
from tests.proxy.test_tls import Pki, make_pki


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki("test.meshnode")


def _access(m: Mesh, direction: str) -> list[dict[str, object]]:
    records = [json.loads(line) for line in m.log_lines]
    return [r for r in records if r["direction"] == direction]


async def _eventually(check: Callable[[], bool], seconds: float = WAIT_S) -> None:
    async with asyncio.timeout(seconds):
        while not check():  # noqa: ASYNC110 -- polling what the proxy logged
            await asyncio.sleep(0.02)


async def test_a_websocket_crosses_the_mesh_both_ways(pki: Pki) -> None:
    big = os.urandom(1 << 20)
    async with mesh(pki) as m, client() as session:
        async with session.ws_connect(m.url("/ws/chat")) as socket:
            assert (await socket.receive_str()) == "hello from b0"
            for i in range(20):
                await socket.send_str(f"message {i}")
                assert (await socket.receive_str()) == f"message {i}"
            await socket.send_bytes(big)  # 1 MiB: many TLS records and reads each way
            assert (await socket.receive_bytes()) == big
        # The client closed: both tunnels close and report the upgrade once each.
        await _eventually(lambda: len(m.log_lines) >= 2)
        for direction in ("outbound", "inbound"):
            (record,) = _access(m, direction)
            assert record["status"] == 101 and record["path"] == "/ws/chat"
            assert isinstance(record["bytes_in"], int) and isinstance(record["bytes_out"], int)
            assert record["bytes_in"] > len(big) and record["bytes_out"] > len(big)
        assert m.hosts[0].backend.hits["/ws/chat"] == 1
        # The same listener still serves plain requests afterwards.
        async with session.get(m.url("/after")) as response:
            assert response.status == 200 and await response.read() == b"b0"


async def test_the_server_closing_the_websocket_closes_the_client(pki: Pki) -> None:
    async with mesh(pki) as m, client() as session:
        async with session.ws_connect(m.url("/ws")) as socket:
            assert (await socket.receive_str()) == "hello from b0"
            await socket.send_str("close")
            message = await socket.receive(timeout=WAIT_S)
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        await _eventually(lambda: len(m.log_lines) >= 2)


async def test_bytes_sent_with_the_upgrade_request_and_the_101_arrive(pki: Pki) -> None:
    """A client may send its first frame in the same write as the upgrade request:
    the parser stops at the request's end, and what followed must reach the server."""
    async with mesh(pki) as m:
        reader, writer = await asyncio.open_connection(*m.outbound.address)
        try:
            mask = b"\x01\x02\x03\x04"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"early"))
            frame = b"\x81\x85" + mask + payload  # masked text frame "early"
            writer.write(
                b"GET /ws HTTP/1.1\r\nHost: api\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" + frame
            )
            async with asyncio.timeout(WAIT_S):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101 ")
                lowered = head.lower()
                assert b"upgrade: websocket\r\n" in lowered and b"connection: upgrade" in lowered
                assert b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in lowered
                greeting = b"\x81\x0dhello from b0"
                echo = b"\x81\x05early"
                received = b""
                while len(received) < len(greeting) + len(echo):
                    received += await reader.read(4096)
                assert received == greeting + echo
        finally:
            writer.close()


async def test_a_declined_upgrade_is_answered_and_the_connection_closed(pki: Pki) -> None:
    async with mesh(pki) as m:
        reader, writer = await asyncio.open_connection(*m.outbound.address)
        try:
            writer.write(
                b"GET /ws HTTP/1.1\r\nHost: api\r\nUpgrade: h2c\r\n"
                b"Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAoAAA\r\n\r\n"
            )
            async with asyncio.timeout(WAIT_S):
                answer = await reader.read(-1)  # the proxy closes after the answer
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 426 ")
        assert b"connection: close" in answer.lower() and answer.endswith(b"websocket only")


async def test_an_l7_intention_is_checked_on_the_upgrade_request(pki: Pki) -> None:
    async with mesh(pki, allow_only("/ws/open")) as m, client() as session:
        async with session.ws_connect(m.url("/ws/open")) as socket:
            assert (await socket.receive_str()) == "hello from b0"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(m.url("/ws/secret"))
        assert refused.value.status == 403
        assert refused.value.headers is not None
        assert refused.value.headers["x-meshnode-error"] == "intention: denied by web => api"
        assert m.hosts[0].backend.hits["/ws/secret"] == 0


async def test_connect_is_refused(pki: Pki) -> None:
    async with mesh(pki) as m:
        reader, writer = await asyncio.open_connection(*m.outbound.address)
        try:
            writer.write(b"CONNECT api:443 HTTP/1.1\r\nHost: api:443\r\n\r\n")
            async with asyncio.timeout(WAIT_S):
                answer = await reader.read(-1)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 400 ") and b"x-meshnode-error: bad-request" in answer


async def test_a_silent_tunnel_is_closed_after_the_idle_timeout(pki: Pki) -> None:
    async with mesh(pki, Knobs(upstream={"idle_timeout": 0.4})) as m, client() as session:
        async with session.ws_connect(m.url("/ws"), autoping=False, heartbeat=None) as socket:
            assert (await socket.receive_str()) == "hello from b0"
            for _ in range(4):  # activity keeps it open past the timeout
                await asyncio.sleep(0.2)
                await socket.send_str("ping")
                assert (await socket.receive_str()) == "ping"
            message = await socket.receive(timeout=WAIT_S)  # then silence: closed
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        await _eventually(lambda: len(_access(m, "outbound")) == 1)


async def test_a_deny_closes_open_websockets_and_an_allow_keeps_them(pki: Pki) -> None:
    async with mesh(pki) as m, client() as session:
        async with session.ws_connect(m.url("/ws")) as socket:
            assert (await socket.receive_str()) == "hello from b0"
            update_service(m, m.hosts[0], rate_limit=None)  # still allowed: kept
            await socket.send_str("still here")
            assert (await socket.receive_str()) == "still here"
            update_service(m, m.hosts[0], default_allow=False, intentions=())
            message = await socket.receive(timeout=WAIT_S)
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        await _eventually(lambda: len(_access(m, "inbound")) == 1)
        (record,) = _access(m, "inbound")
        assert record["status"] == 101 and record["error"] == "intention: denied by default deny"
        assert m.counter("intention_denials") == 1
