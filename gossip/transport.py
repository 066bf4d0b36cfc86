"""The asyncio adapter that runs a ``Swim`` core on real sockets.

Theory of operation
-------------------
This module decides nothing (STYLE.md rule 1; aioquic's ``asyncio/protocol.py`` is the
model). It owns one UDP socket and one TCP listener bound to the *same* port, as
memberlist does, and after every input it gives the core -- a datagram, a stream
message, a stream reply, the timer -- it *transmits*:

1. sends every ``packets_to_send()`` datagram,
2. starts one task per ``streams_to_open()`` request (connect, write one framed
   message, read one framed reply, report it with ``receive_stream_reply``),
3. re-arms exactly one ``loop.call_at`` handle for ``get_timer()``,
4. hands every ``next_event()`` to the ``on_event`` callback.

A stream message is framed as a 4-byte big-endian length and the body; the length is
checked against ``config.max_stream_size`` before a byte of the body is read.

Addresses: the core only ever sees ``(ip_literal, port)`` pairs; IPv6 socket addresses
are cut to two fields, and IPv4-mapped IPv6 addresses (what a dual-stack ``::`` socket
reports for IPv4 peers) are unmapped. The address we *advertise* may differ from the
one we bind (NAT, containers).

Every task belongs to the transport's ``asyncio.TaskGroup``, entered by ``__aenter__``
(or ``open_transport``) and left by ``aclose``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from typing import Any, Final

from gossip.config import DEFAULT_PORT, GossipConfig
from gossip.delegate import Delegate
from gossip.events import Address, Event, JoinCompleted, LeaveCompleted
from gossip.keyring import Envelope
from gossip.swim import StreamRequest, Swim

#: Inbound stream exchanges served at once; more are refused (memberlist caps
#: concurrent push-pulls at 128 after hashicorp/consul#4511 showed thousands at once
#: holding gigabytes).
MAX_INBOUND_STREAMS: Final = 128
#: Attempts to find a port free for both UDP and TCP when the caller asked for port 0:
#: the kernel picks a free UDP port, which another process may hold for TCP.
BIND_ATTEMPTS: Final = 10
#: Socket buffer size requested for UDP, as memberlist's net_transport.go (2 MiB), so a
#: burst of gossip is not dropped by the kernel while the loop is busy.
UDP_SOCKET_BUFFER: Final = 2 * 1024 * 1024
#: How long ``leave()`` waits for the core to report ``LeaveCompleted`` by default.
LEAVE_TIMEOUT: Final = 5.0

EventCallback = Callable[[Event], None]


class _FrameTooLarge(Exception):
    """A peer announced a stream message over ``max_stream_size``."""


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    length = int.from_bytes(await reader.readexactly(4), "big")
    if length > limit:
        raise _FrameTooLarge(length)
    return await reader.readexactly(length)


def _normalize(address: tuple[object, ...]) -> Address:
    """(ip, port) as the core wants it, from a socket address of either family."""
    host, port = str(address[0]), int(str(address[1]))
    if "%" in host:  # a link-local zone is meaningless to peers
        host = host.split("%", 1)[0]
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            host = str(ip.ipv4_mapped)
    return host, port


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _guess_advertise_host(family: socket.AddressFamily) -> str:
    """The address other hosts most likely reach us at when we bind a wildcard.

    A connected UDP socket makes the kernel choose a source address for a public
    destination without sending a packet (TEST-NET addresses, RFC 5737 / RFC 3849).
    """
    target = "2001:db8::1" if family == socket.AF_INET6 else "192.0.2.1"
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((target, 9))
            return _normalize(probe.getsockname())[0]
    except OSError:
        return "::1" if family == socket.AF_INET6 else "127.0.0.1"


def _bind_sockets(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket bound to the same (host, port); port 0 picks one."""
    infos = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
    )
    family, _, _, _, sockaddr = infos[0]
    last_error: OSError | None = None
    for _ in range(BIND_ATTEMPTS if port == 0 else 1):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):  # a smaller buffer still works
                    udp.setsockopt(socket.SOL_SOCKET, option, UDP_SOCKET_BUFFER)
            udp.bind(sockaddr)
            actual_port = udp.getsockname()[1]
            # SO_REUSEADDR lets a restarted member take its port back from TIME_WAIT.
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((sockaddr[0], actual_port, *sockaddr[2:]))
            tcp.listen(socket.SOMAXCONN)
        except OSError as exc:
            udp.close()
            tcp.close()
            last_error = exc
            continue
        udp.setblocking(False)
        tcp.setblocking(False)
        return udp, tcp
    assert last_error is not None
    raise last_error


def parse_host_port(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 literal → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:  # a bare name, IPv4 literal or IPv6 literal
        host, port = text, ""
    if not host:
        raise ValueError(f"no host in address {text!r}")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port in address {text!r}")
    return host, int(port)


class _DatagramProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: GossipTransport) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self._owner._datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP "port unreachable" for an earlier datagram to a dead member: the
        # failure detector notices the missing ack on its own, so nothing to do.
        pass


class GossipTransport:
    """Runs one ``Swim`` core over UDP + TCP. Use ``async with`` or ``open_transport``."""

    def __init__(
        self,
        name: str,
        config: GossipConfig,
        *,
        bind_host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        advertise_host: str | None = None,
        envelope: Envelope | None = None,
        delegate: Delegate | None = None,
        on_event: EventCallback | None = None,
        rng: random.Random | None = None,
        meta: bytes = b"",
        max_inbound_streams: int = MAX_INBOUND_STREAMS,
        leave_timeout: float = LEAVE_TIMEOUT,
    ) -> None:
        self._name = name
        self._config = config
        self._bind_host = bind_host
        self._port = port
        self._advertise_host = advertise_host
        self._envelope = envelope
        self._delegate = delegate
        self._on_event = on_event
        self._rng = rng or random.Random()
        self._meta = meta
        self._max_inbound = max_inbound_streams
        self._leave_timeout = leave_timeout

        self._core: Swim | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._family = socket.AF_INET
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._inbound = 0
        self._join_lock = asyncio.Lock()
        self._join_waiter: asyncio.Future[JoinCompleted] | None = None
        self._left: asyncio.Event | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> GossipTransport:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        # The exception goes to the TaskGroup: it must know whether a CancelledError
        # is one it caused itself (a stream task crashed) or one from outside.
        if not self._closed and self._loop is not None:
            await self._shutdown(exc)

    async def start(self) -> None:
        """Bind the sockets and start the core. Call ``aclose`` from the same task."""
        if self._loop is not None:
            raise RuntimeError("transport already started")
        loop = self._loop = asyncio.get_running_loop()
        udp_sock, tcp_sock = _bind_sockets(self._bind_host, self._port)
        self._family = socket.AddressFamily(udp_sock.family)
        bound_port = udp_sock.getsockname()[1]
        advertise = self._advertise_host
        if advertise is None:
            bound_host = _normalize(udp_sock.getsockname())[0]
            wildcard = _is_wildcard(bound_host)
            advertise = _guess_advertise_host(self._family) if wildcard else bound_host
        self._core = Swim(
            self._name,
            (advertise, bound_port),
            self._config,
            rng=self._rng,
            now=loop.time(),
            delegate=self._delegate,
            envelope=self._envelope,
            meta=self._meta,
        )
        self._left = asyncio.Event()
        group = asyncio.TaskGroup()
        await group.__aenter__()
        self._group = group
        try:
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _DatagramProtocol(self), sock=udp_sock
            )
            self._server = await asyncio.start_server(self._accept, sock=tcp_sock)
        except BaseException:
            udp_sock.close()
            tcp_sock.close()
            await self._shutdown(None)
            raise
        self._transmit()

    async def aclose(self) -> None:
        """Stop at once (peers will see us fail; ``leave()`` first to be seen leaving)."""
        if self._closed or self._loop is None:
            return
        await self._shutdown(None)

    async def _shutdown(self, exc: BaseException | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._udp is not None:
            self._udp.close()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._join_waiter is not None and not self._join_waiter.done():
            self._join_waiter.cancel()
        if self._server is not None:
            await self._server.wait_closed()
        group, self._group = self._group, None
        if group is not None:
            await group.__aexit__(type(exc) if exc else None, exc, None)

    # ------------------------------------------------------------------ state

    @property
    def core(self) -> Swim:
        if self._core is None:
            raise RuntimeError("transport not started")
        return self._core

    @property
    def address(self) -> Address:
        """The advertised (host, port)."""
        return self.core.address

    @property
    def bound_address(self) -> Address:
        """The local (host, port) both sockets are bound to."""
        if self._udp is None:
            raise RuntimeError("transport not started")
        return _normalize(self._udp.get_extra_info("sockname"))

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ commands

    async def resolve(self, seeds: Iterable[str | Address]) -> list[Address]:
        """Seed specs ("host", "host:port", "[v6]:port", (host, port)) → IP addresses.

        Unresolvable names are left out; the caller sees them missing from the result.
        """
        loop = asyncio.get_running_loop()
        resolved: list[Address] = []
        for seed in seeds:
            host, port = parse_host_port(seed) if isinstance(seed, str) else seed
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except OSError:
                continue
            # An IPv4 socket cannot reach IPv6 peers; an IPv6 one reaches both.
            usable = [i for i in infos if self._family == socket.AF_INET6 or i[0] == self._family]
            if usable:
                address = _normalize(usable[0][4])
                if address not in resolved:
                    resolved.append(address)
        return resolved

    async def join(self, seeds: Sequence[str | Address]) -> JoinCompleted:
        """Resolve ``seeds`` and push-pull with each; returns the core's report.

        Bounded by the core's own stream timeout (each push-pull ends by then); wrap
        it in ``asyncio.timeout`` for a shorter bound.
        """
        async with self._join_lock:
            addresses = await self.resolve(seeds)
            if not addresses:
                return JoinCompleted(0, ())
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[JoinCompleted] = loop.create_future()
            self._join_waiter = waiter
            core = self.core
            core.join(addresses, loop.time())
            self._transmit()
            async with asyncio.timeout(core.config.tcp_timeout + 1.0):
                return await waiter

    async def leave(self) -> bool:
        """Announce that we leave and wait until the core says the notice went out.

        True if ``LeaveCompleted`` arrived within ``leave_timeout``. The transport stays
        open (still answering pings) until ``aclose``.
        """
        left = self._left
        if left is None or self._closed:
            return False
        loop = asyncio.get_running_loop()
        self.core.leave(loop.time())
        self._transmit()
        try:
            async with asyncio.timeout(self._leave_timeout):
                await left.wait()
        except TimeoutError:
            return False
        return True

    def send_user(self, address: Address, payload: bytes, *, reliable: bool = False) -> None:
        """Send ``payload`` to the member at ``address`` only (``Swim.send_user``): one
        datagram, or over a stream when ``reliable``; it arrives at that member's
        ``delegate.notify_message``. Sent at once; a no-op once the transport is closed.
        ``LocalProtocolError`` if an unreliable payload does not fit a datagram."""
        if self._closed or self._loop is None:
            return
        self.core.send_user(address, payload, self._loop.time(), reliable=reliable)
        self._transmit()

    # ------------------------------------------------------------------ the core loop

    def _transmit(self) -> None:
        """Carry out everything the core produced (aioquic's ``transmit``)."""
        core, udp = self._core, self._udp
        if core is None or self._closed:
            return
        if udp is not None:
            for data, address in core.packets_to_send():
                udp.sendto(data, self._socket_address(address))
        for request in core.streams_to_open():
            self._spawn(self._open_stream(request))
        self._arm_timer()
        # Drained into a list first: a callback may call back into the transport.
        events: list[Event] = []
        while (event := core.next_event()) is not None:
            events.append(event)
        for event in events:
            if isinstance(event, JoinCompleted):
                waiter = self._join_waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(event)
            elif isinstance(event, LeaveCompleted) and self._left is not None:
                self._left.set()
            if self._on_event is not None:
                self._on_event(event)

    def _arm_timer(self) -> None:
        deadline = self.core.get_timer()
        if deadline == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None and self._loop is not None:
            self._timer = self._loop.call_at(deadline, self._timer_fired, deadline)

    def _timer_fired(self, deadline: float) -> None:
        self._timer = None
        self._timer_at = None
        if self._closed or self._loop is None:
            return
        # asyncio runs a handle up to one clock resolution early; never tell the core
        # a time before the deadline it asked for, or it would ask again at once.
        self.core.handle_timer(max(self._loop.time(), deadline))
        self._transmit()

    def _datagram_received(self, data: bytes, addr: tuple[object, ...]) -> None:
        if self._closed or self._loop is None:
            return
        self.core.receive_packet(data, _normalize(addr), self._loop.time())
        self._transmit()

    def _socket_address(self, address: Address) -> tuple[str, int]:
        host, port = address
        if self._family == socket.AF_INET6 and "." in host and ":" not in host:
            host = "::ffff:" + host  # a dual-stack socket reaches IPv4 peers this way
        return host, port

    # ------------------------------------------------------------------ streams

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        group = self._group
        assert group is not None
        task: asyncio.Task[None] = group.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_stream(self, request: StreamRequest) -> None:
        core = self.core
        reply: bytes | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(request.timeout):
                host, port = self._socket_address(request.address)
                reader, writer = await asyncio.open_connection(host, port, family=self._family)
                writer.write(_frame(request.payload))
                await writer.drain()
                reply = await _read_frame(reader, core.config.max_stream_size)
        except _FrameTooLarge:
            core.stats.drop("oversize")
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the core treats a missing reply as a failed exchange
        finally:
            if writer is not None:
                writer.close()
        if self._closed or self._loop is None:
            return
        core.receive_stream_reply(request.stream_id, reply, self._loop.time())
        self._transmit()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed or self._group is None:
            writer.close()
            return
        if self._inbound >= self._max_inbound:
            self.core.stats.drop("stream_limit")
            writer.close()
            return
        self._inbound += 1
        self._spawn(self._serve_stream(reader, writer))

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        core = self.core
        try:
            async with asyncio.timeout(core.config.tcp_timeout):
                data = await _read_frame(reader, core.config.max_stream_size)
                assert self._loop is not None
                peer = _normalize(writer.get_extra_info("peername"))
                reply = core.receive_stream(data, peer, self._loop.time())
                self._transmit()
                if reply is not None:
                    writer.write(_frame(reply))
                    await writer.drain()
        except _FrameTooLarge:
            core.stats.drop("oversize")
        except TimeoutError:
            core.stats.drop("stream_timeout")
        except (OSError, asyncio.IncompleteReadError):
            core.stats.drop("stream_truncated")
        finally:
            self._inbound -= 1
            writer.close()


@contextlib.asynccontextmanager
async def open_transport(
    name: str,
    config: GossipConfig,
    *,
    bind_host: str = "0.0.0.0",
    port: int = DEFAULT_PORT,
    advertise_host: str | None = None,
    envelope: Envelope | None = None,
    delegate: Delegate | None = None,
    on_event: EventCallback | None = None,
    rng: random.Random | None = None,
    meta: bytes = b"",
) -> AsyncIterator[GossipTransport]:
    """A started ``GossipTransport`` that is closed (not left) on exit."""
    transport = GossipTransport(
        name,
        config,
        bind_host=bind_host,
        port=port,
        advertise_host=advertise_host,
        envelope=envelope,
        delegate=delegate,
        on_event=on_event,
        rng=rng,
        meta=meta,
    )
    async with transport:
        yield transport
