"""Agent-to-agent requests: answers, errors, timeouts, and where answers go."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import msgpack
import pytest

from meshnode.rpc import REQUEST_TAG, RESPONSE_TAG, Address, Rpc, RpcError


class Network:
    """Delivers messages between Rpc instances by address, on the next loop turn
    (as the gossip transport does), and records where each went."""

    def __init__(self) -> None:
        self.nodes: dict[Address, Rpc] = {}
        self.addresses: dict[str, Address] = {}
        self.sent: list[tuple[Address, bytes]] = []
        self.drop_to: set[Address] = set()

    def add(self, name: str, port: int) -> Rpc:
        address = ("127.0.0.1", port)

        def send(to: Address, payload: bytes) -> None:
            self.sent.append((to, payload))
            if to in self.nodes and to not in self.drop_to:
                asyncio.get_running_loop().call_soon(self.nodes[to].receive, payload)

        rpc = Rpc(name, send, self.addresses.get, random.Random(port))
        self.nodes[address] = rpc
        self.addresses[name] = address
        return rpc


async def test_call_and_answer() -> None:
    network = Network()
    client, server = network.add("a", 1), network.add("b", 2)

    async def echo(node: str, body: Any) -> Any:
        return {"from": node, "body": body}

    server.register("echo", echo)
    answer = await client.call(("127.0.0.1", 2), "echo", [1, b"x"])
    assert answer == {"from": "a", "body": [1, b"x"]}
    assert server.served == {"echo": 1}


async def test_errors_travel_back_with_their_code() -> None:
    network = Network()
    client, server = network.add("a", 1), network.add("b", 2)

    async def refuse(node: str, body: Any) -> Any:
        raise RpcError("not_registered", "web is not registered on a")

    async def crash(node: str, body: Any) -> Any:
        raise KeyError("bug")

    server.register("sign", refuse)
    server.register("crash", crash)
    with pytest.raises(RpcError) as caught:
        await client.call(("127.0.0.1", 2), "sign", {})
    assert (caught.value.code, caught.value.message) == (
        "not_registered",
        "web is not registered on a",
    )
    with pytest.raises(RpcError) as caught:
        await client.call(("127.0.0.1", 2), "crash", {})
    assert caught.value.code == "internal"
    with pytest.raises(RpcError) as caught:
        await client.call(("127.0.0.1", 2), "nope", {})
    assert caught.value.code == "unknown_method"


async def test_timeout_when_nobody_answers() -> None:
    network = Network()
    client = network.add("a", 1)
    network.add("b", 2)
    network.drop_to.add(("127.0.0.1", 2))
    with pytest.raises(RpcError) as caught:
        await client.call(("127.0.0.1", 2), "echo", {}, within=0.05)
    assert caught.value.code == "timeout"
    assert client._pending == {}


async def test_answer_goes_to_the_member_address_not_the_sender() -> None:
    """A member claiming to be node "a" does not get a's answers."""
    network = Network()
    victim, server = network.add("a", 1), network.add("b", 2)
    impostor_address = ("127.0.0.1", 3)

    async def echo(node: str, body: Any) -> Any:
        return "secret for " + node

    server.register("echo", echo)
    request = REQUEST_TAG + msgpack.packb([7, "echo", "a", None], use_bin_type=True)
    server.receive(request)
    await asyncio.sleep(0.01)
    destinations = [to for to, payload in network.sent if payload[:1] == RESPONSE_TAG]
    assert destinations == [("127.0.0.1", 1)]
    assert impostor_address not in destinations
    assert victim.dropped == {"unsolicited": 1}  # a did not ask: dropped


@pytest.mark.parametrize(
    "message",
    [
        REQUEST_TAG + b"\xc1",
        REQUEST_TAG + msgpack.packb([1, 2]),
        REQUEST_TAG + msgpack.packb(["id", "m", "a", None]),
        REQUEST_TAG + msgpack.packb([1, "m", "", None]),
        RESPONSE_TAG + msgpack.packb([1, 5, None]),
        REQUEST_TAG + bytes(70_000),
    ],
)
async def test_malformed_messages_are_dropped_and_counted(message: bytes) -> None:
    network = Network()
    server = network.add("b", 2)
    server.receive(message)
    await asyncio.sleep(0)
    assert sum(server.dropped.values()) == 1
    assert not network.sent


async def test_requests_from_unknown_nodes_are_dropped() -> None:
    network = Network()
    server = network.add("b", 2)
    server.register("echo", lambda node, body: asyncio.sleep(0, body))
    server.receive(REQUEST_TAG + msgpack.packb([1, "echo", "ghost", None]))
    await asyncio.sleep(0)
    assert server.dropped == {"unknown_node": 1}


async def test_aclose_fails_pending_calls() -> None:
    network = Network()
    client = network.add("a", 1)
    network.add("b", 2)
    network.drop_to.add(("127.0.0.1", 2))
    call = asyncio.create_task(client.call(("127.0.0.1", 2), "echo", {}))
    await asyncio.sleep(0.01)
    await client.aclose()
    with pytest.raises(RpcError) as caught:
        await call
    assert caught.value.code == "closed"
