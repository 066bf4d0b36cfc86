"""GossipTransport on real loopback sockets: several members in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest

from gossip.config import DEFAULT, GossipConfig
from gossip.delegate import Delegate
from gossip.events import Event, JoinCompleted, MemberFailed, MemberLeft, MemberState
from gossip.keyring import Envelope, Keyring
from gossip.transport import GossipTransport, open_transport, parse_host_port

#: The default preset, sped up so a failure is detected in about a second:
#: suspicion timeout = 4 × 0.2 s at this cluster size (Lifeguard's k is 0 below 4).
FAST: GossipConfig = DEFAULT.replace(
    probe_interval=0.2,
    probe_timeout=0.1,
    gossip_interval=0.05,
    push_pull_interval=1.0,
    tcp_timeout=2.0,
)


async def wait_for(condition: Callable[[], bool], within: float, message: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"after {within} s: {message}")
        await asyncio.sleep(0.02)


def state_of(transport: GossipTransport, name: str) -> MemberState | None:
    member = transport.core.member(name)
    return member.state if member else None


def views(*transports: GossipTransport) -> str:
    return "; ".join(
        f"{t.core.name}: " + ", ".join(f"{m.name}={m.state.name}" for m in t.core.members())
        for t in transports
    )


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)


@contextlib.asynccontextmanager
async def member(
    name: str,
    host: str = "127.0.0.1",
    *,
    advertise: str | None = None,
    envelope: Envelope | None = None,
    on_event: Recorder | None = None,
) -> AsyncIterator[GossipTransport]:
    async with open_transport(
        name,
        FAST,
        bind_host=host,
        port=0,
        advertise_host=advertise,
        envelope=envelope,
        on_event=on_event,
    ) as transport:
        yield transport


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_parse_host_port() -> None:
    assert parse_host_port("10.0.0.1:8301") == ("10.0.0.1", 8301)
    assert parse_host_port("node.example") == ("node.example", 7946)
    assert parse_host_port("[::1]:9000") == ("::1", 9000)
    assert parse_host_port("fe80::1") == ("fe80::1", 7946)
    with pytest.raises(ValueError):
        parse_host_port("host:notaport")


async def test_port_zero_binds_udp_and_tcp_on_one_port() -> None:
    async with member("a") as a:
        host, port = a.bound_address
        assert port != 0 and a.address == ("127.0.0.1", port)
        # The TCP listener is on the same port as the UDP socket.
        _, writer = await asyncio.open_connection(host, port)
        writer.close()


async def test_join_failure_detection_and_leave() -> None:
    seen_by_a = Recorder()
    async with member("a", on_event=seen_by_a) as a, member("b") as b:
        c_transport = GossipTransport("c", FAST, bind_host="127.0.0.1", port=0)
        await c_transport.start()
        try:
            joined = await b.join([f"127.0.0.1:{a.address[1]}"])
            assert joined == JoinCompleted(1, ())
            assert (await c_transport.join([a.address])).contacted == 1
            everyone = (a, b, c_transport)
            await wait_for(
                lambda: all(t.core.count(MemberState.ALIVE) == 3 for t in everyone),
                5,
                f"all three alive everywhere: {views(*everyone)}",
            )
        finally:
            await c_transport.aclose()  # a crash as far as the others can tell
        await wait_for(
            lambda: state_of(a, "c") == state_of(b, "c") == MemberState.DEAD,
            10,
            f"a closed member is seen failed: {views(a, b)}",
        )
        assert any(isinstance(e, MemberFailed) and e.member.name == "c" for e in seen_by_a.events)

        assert await b.leave() is True
        await wait_for(lambda: state_of(a, "b") == MemberState.LEFT, 5, f"b seen left: {views(a)}")
        assert any(isinstance(e, MemberLeft) and e.member.name == "b" for e in seen_by_a.events)
        assert state_of(a, "c") == MemberState.DEAD, "a leave is not a failure"


async def test_join_resolves_host_names() -> None:
    async with member("a") as a, member("b") as b:
        result = await b.join([f"localhost:{a.address[1]}"])
        assert result.contacted == 1, result
        await wait_for(lambda: state_of(a, "b") == MemberState.ALIVE, 5, "a learns b")


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
async def test_ipv6_loopback() -> None:
    async with member("a", "::1") as a, member("b", "::1") as b:
        assert a.address[0] == "::1"
        assert (await b.join([f"[::1]:{a.address[1]}"])).contacted == 1
        await wait_for(
            lambda: state_of(a, "b") == state_of(b, "a") == MemberState.ALIVE,
            5,
            f"members over IPv6: {views(a, b)}",
        )
        # Probes (UDP) work too, not only the join push-pull (TCP).
        await wait_for(lambda: a.core.stats.rtt_count > 0, 5, "a probe over IPv6 succeeded")
        assert a.core.stats.dropped == {} and b.core.stats.dropped == {}


async def test_bind_wildcard_advertise_loopback() -> None:
    async with member("a", "0.0.0.0", advertise="127.0.0.1") as a, member("b") as b:
        assert a.bound_address[0] == "0.0.0.0"
        assert a.address == ("127.0.0.1", a.bound_address[1])
        assert (await b.join([a.address])).contacted == 1
        await wait_for(lambda: state_of(b, "a") == MemberState.ALIVE, 5, "b learns a")
        learned = b.core.member("a")
        assert learned is not None and learned.address == a.address
        await wait_for(lambda: a.core.stats.rtt_count > 0, 5, "a probes b successfully")


async def test_encrypted_cluster_rejects_plaintext_member() -> None:
    key = bytes(range(32))
    async with (
        member("a", envelope=Envelope("", Keyring([key]))) as a,
        member("b", envelope=Envelope("", Keyring([key]))) as b,
        member("plain") as plain,
    ):
        assert (await b.join([a.address])).contacted == 1
        refused = await plain.join([a.address])
        assert refused.contacted == 0 and refused.failed == (a.address,)
        await asyncio.sleep(0.5)  # time for any stray gossip to leak, if it could
        assert a.core.member("plain") is None and b.core.member("plain") is None
        assert plain.core.member("a") is None
        assert a.core.stats.dropped.get("unencrypted", 0) >= 1, a.core.stats.dropped
        assert state_of(a, "b") == MemberState.ALIVE


async def test_other_cluster_cannot_join() -> None:
    key = bytes(range(32))
    async with (
        member("a", envelope=Envelope("alpha")) as a,
        member("b", envelope=Envelope("beta")) as b,
        member("c", envelope=Envelope("alpha", Keyring([key]))) as c,
        member("d", envelope=Envelope("beta", Keyring([key]))) as d,
    ):
        assert (await b.join([a.address])).contacted == 0
        assert a.core.stats.dropped.get("label_mismatch", 0) >= 1, a.core.stats.dropped
        # With the same key, the cluster name (the AEAD's associated data) still differs.
        assert (await d.join([c.address])).contacted == 0
        assert c.core.stats.dropped.get("decrypt_failed", 0) >= 1, c.core.stats.dropped
        assert a.core.member("b") is None and c.core.member("d") is None


class Inbox(Delegate):
    """Records the user messages that arrive."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def notify_message(self, message: bytes) -> None:
        self.messages.append(message)


async def test_send_user_delivers_datagram_and_stream_messages() -> None:
    inbox = Inbox()
    async with (
        open_transport("a", FAST, bind_host="127.0.0.1", port=0, delegate=inbox) as a,
        member("b") as b,
    ):
        # No join needed: a user message goes to an address, not to a known member.
        b.send_user(a.address, b"Lhello")
        await wait_for(lambda: inbox.messages == [b"Lhello"], 2, f"datagram: {inbox.messages}")
        b.send_user(a.address, b"Lreliable", reliable=True)
        await wait_for(lambda: len(inbox.messages) == 2, 3, f"stream: {inbox.messages}")
        assert inbox.messages[1] == b"Lreliable"
    b.send_user(a.address, b"Llate")  # closed: a quiet no-op, like every late callback
    assert b.closed


async def test_oversize_stream_is_closed_and_counted() -> None:
    async with member("a") as a:
        reader, writer = await asyncio.open_connection(*a.address)
        writer.write((FAST.max_stream_size + 1).to_bytes(4, "big"))
        await writer.drain()
        async with asyncio.timeout(2):
            assert await reader.read() == b"", "the transport closes the stream"
        writer.close()
        assert a.core.stats.dropped.get("oversize") == 1


async def test_aclose_leaves_no_tasks_behind() -> None:
    async with member("a") as a, member("b") as b:
        await b.join([a.address])
        await asyncio.sleep(0.3)
    assert a.closed and b.closed
    others = asyncio.all_tasks() - {asyncio.current_task()}
    assert not others, others
