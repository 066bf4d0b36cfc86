"""The L4 (TCP) mTLS data path: inbound and outbound listeners that splice bytes.

Theory of operation
-------------------
A proxied connection is a :class:`_Link` of two :class:`_Side` protocols, the
*downstream* (the socket the connection came in on) and the *upstream* (the socket
the proxy opened). Bytes read on one side are written to the other, untouched:

* **Protocols, not streams** (reference/proxy-speed.md: streams cost 30-40 % more
  CPU per request). TLS sides (:class:`_TlsSide`) are ``asyncio.BufferedProtocol``
  and all of a listener's TLS sides decrypt into one shared 64 KiB buffer
  (:class:`_ReadBuffer`) — the loop is single-threaded and a read is written on
  before the next one, so one buffer per listener is enough, and 1,000 connections
  do not cost 1,000 buffers. This replaces uvloop's 256 KiB ``SSLObject.read`` per
  read (~10 µs, against ~1.4 µs for 64 KiB into a reused buffer). Plain TCP sides
  (:class:`_TcpSide`) are ``asyncio.Protocol``: uvloop already reads those into one
  loop-wide buffer and hands over exact-size bytes.
* **One write per read, no copy**: a TLS read is written as a ``memoryview`` of the
  shared buffer. A transport that could not send it all keeps a reference to it, so
  in that case (and only then) the listener takes a fresh buffer.
* **Backpressure**: when a side's transport buffers more than its high-water mark
  it calls ``pause_writing`` on its protocol, which pauses *reading* on the other
  side; ``resume_writing`` resumes it. Memory per connection stays bounded by the
  two write buffers' limits.
* **Half-close**: EOF on a plain TCP side is passed on with ``write_eof`` when the
  other side supports it (plain TCP). TLS transports in asyncio and uvloop cannot
  half-close (``can_write_eof()`` is false, and a received ``close_notify`` shuts
  the whole TLS connection down), so across mTLS an EOF closes the other side after
  its buffered bytes are flushed: a protocol that needs half-close (send, shut
  down, then read) does not survive the mesh; TCP protocols that close after the
  exchange (HTTP, most RPC) are unaffected.
* **Idle timeout**: each side notes the loop time of its last read; one timer per
  link re-arms itself to ``last + idle_timeout`` and closes the link when it fires
  with nothing read in between.

An :class:`InboundListener` serves mTLS: the handshake (client certificate
required, SNI selects the local service and its leaf, see ``proxy.tls``) is done by
the loop; then the peer's SPIFFE ID and the service go to the injected
``authorize``; a denial closes the connection, an allow connects to the service's
local instance and splices.

An :class:`OutboundListener` serves plain TCP on loopback for one (source service,
upstream): per connection it picks an endpoint with the injected ``pick(exclude)``
(e.g. a ``proxy.balancer`` balancer), connects to it over mTLS with SNI = the
upstream service, presenting the source service's leaf, checks the server's SPIFFE
ID, and splices. A failed attempt (refused, timed out, TLS refused, wrong identity)
is retried on an endpoint not tried yet, after ``proxy.resilience.backoff`` with
jitter, up to ``max_attempts``.

Both take their settings as one frozen object (:class:`InboundSettings`,
:class:`OutboundSettings`); ``update()`` swaps it in one assignment, so new
connections use the new settings and open ones keep theirs.

Counters (:class:`Counters`) are plain integers, read with ``statistics()``; the
agent exports them (Prometheus) and labels stay bounded (handshake failures by
``proxy.tls.FAILURE_LABELS``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import ssl
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Final, cast

from proxy import tls
from proxy.resilience import backoff

log = logging.getLogger("proxy.l4")

#: The shared read buffer. 64 KiB: a TCP read rarely returns more on loopback, and a
#: TLS record is at most 16 KiB; bigger buffers made TLS reads slower
#: (reference/proxy-speed.md).
READ_BUFFER_BYTES: Final = 64 * 1024
#: A side's transport pauses the other side's reading above this many buffered
#: bytes, and resumes it below the low mark. 256 KiB, like uvloop's TLS read side,
#: keeps a fast sender going through a short stall without unbounded memory.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024
DEFAULT_CONNECT_TIMEOUT: Final = 5.0
#: Envoy's TCP proxy default idle timeout (1 hour).
DEFAULT_IDLE_TIMEOUT: Final = 3600.0
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
DEFAULT_MAX_ATTEMPTS: Final = 3
DEFAULT_BACKLOG: Final = 1024

Address = tuple[str, int]
Authorize = Callable[[str | None, str], tuple[bool, str]]
"""``authorize(peer_spiffe_id, service) -> (allowed, reason)``: the intention check."""
Pick = Callable[[Collection[Address]], Address | None]
"""``pick(exclude) -> endpoint | None``: the load balancer, honouring ``exclude``."""


# ---------------------------------------------------------------------------- counters


@dataclass(slots=True)
class Counters:
    """What one listener counted since it started. ``statistics()`` returns a copy."""

    connections_opened: int = 0
    connections_closed: int = 0
    bytes_received: int = 0
    """From downstream (the connecting client), forwarded upstream."""
    bytes_sent: int = 0
    """From upstream, forwarded to downstream."""
    handshake_failures: dict[str, int] = field(default_factory=dict)
    """By ``proxy.tls.FAILURE_LABELS``."""
    denied: int = 0
    """Inbound: connections the intention check refused."""
    unknown_service: int = 0
    """Inbound: handshakes whose service left the configuration meanwhile."""
    connect_failures: int = 0
    """Attempts to reach an upstream that failed (each retry counts)."""
    no_endpoint: int = 0
    """Connections closed because no endpoint could be reached."""
    idle_timeouts: int = 0
    backpressure_pauses: int = 0
    """Times a side stopped reading because the other side's buffer was full."""

    @property
    def connections_active(self) -> int:
        return self.connections_opened - self.connections_closed

    def count_handshake_failure(self, reason: str) -> None:
        self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1

    def copy(self) -> Counters:
        return Counters(
            self.connections_opened,
            self.connections_closed,
            self.bytes_received,
            self.bytes_sent,
            dict(self.handshake_failures),
            self.denied,
            self.unknown_service,
            self.connect_failures,
            self.no_endpoint,
            self.idle_timeouts,
            self.backpressure_pauses,
        )


# ---------------------------------------------------------------------------- splicing


class _ReadBuffer:
    """The buffer every side of one listener reads into (see the module docstring)."""

    __slots__ = ("view",)

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_BUFFER_BYTES))

    def renew(self) -> None:
        """A transport kept a reference to the current buffer: use another."""
        self.view = memoryview(bytearray(READ_BUFFER_BYTES))


class _Side(asyncio.BaseProtocol):
    """One socket of a link. ``peer`` is the other side's transport once both are
    connected; until then reading stays paused. The reading half is in the two
    subclasses: :class:`_TlsSide` reads into the shared buffer, :class:`_TcpSide`
    takes uvloop's bytes."""

    __slots__ = ("_downstream", "_link", "_reads", "peer", "transport")

    def __init__(self, link: _Link, reads: _ReadBuffer, downstream: bool) -> None:
        self._link = link
        self._reads = reads
        self._downstream = downstream
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        if self.peer is None:
            transport.pause_reading()
        self._link.side_made(self)

    def _count(self, nbytes: int) -> None:
        link = self._link
        link.last_read = link.loop.time()
        if self._downstream:
            link.counters.bytes_received += nbytes
        else:
            link.counters.bytes_sent += nbytes
            if link.first_upstream_read is not None:
                link.first_upstream_read()

    def eof_received(self) -> bool | None:
        return self._link.eof_from(self)

    def pause_writing(self) -> None:
        # Our transport is full: stop reading what would be written into it.
        if self.peer is not None and not self.peer.is_closing():
            self.peer.pause_reading()
            self._link.counters.backpressure_pauses += 1

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.is_closing():
            self.peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._link.side_lost(self)


class _TlsSide(_Side, asyncio.BufferedProtocol):
    """A TLS side: uvloop decrypts straight into the shared 64 KiB buffer
    (``SSLObject.read(n, buffer)``) instead of allocating 256 KiB per read."""

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reads.view

    def buffer_updated(self, nbytes: int) -> None:
        peer = self.peer
        if peer is None:
            # Read before the other side is connected: uvloop may deliver a first
            # read although connection_made paused reading. Keep it for splice().
            self._link.hold(self, bytes(self._reads.view[:nbytes]))
            return
        reads = self._reads
        peer.write(reads.view[:nbytes])
        if peer.get_write_buffer_size():
            reads.renew()
        self._count(nbytes)


class _TcpSide(_Side, asyncio.Protocol):
    """A plain TCP side. uvloop reads plain sockets into its own loop-wide buffer
    and hands over exactly the bytes read, so a ``Protocol`` copies no more than a
    ``BufferedProtocol`` would, with one Python call per read instead of two
    (``get_buffer`` + ``buffer_updated``)."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            self._link.hold(self, data)
            return
        peer.write(data)
        self._count(len(data))


class _Link:
    """A downstream and an upstream side spliced together, with the link's idle
    timer and its share of the listener's counters."""

    __slots__ = (
        "_closed",
        "_eofs",
        "_held",
        "_idle_handle",
        "_on_close",
        "counters",
        "downstream",
        "first_upstream_read",
        "idle_timeout",
        "last_read",
        "loop",
        "task",
        "upstream",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        counters: Counters,
        idle_timeout: float | None,
        on_close: Callable[[_Link], None],
    ) -> None:
        self.loop = loop
        self.counters = counters
        self.idle_timeout = idle_timeout
        self._on_close = on_close
        self.downstream: _Side | None = None
        self.upstream: _Side | None = None
        self.task: asyncio.Task[None] | None = None
        self.first_upstream_read: Callable[[], None] | None = None
        self.last_read = loop.time()
        self._idle_handle: asyncio.TimerHandle | None = None
        self._eofs = 0
        self._held: list[tuple[_Side, bytes]] | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def side_made(self, side: _Side) -> None:
        if side._downstream:
            self.downstream = side
            self.counters.connections_opened += 1
            if self.idle_timeout is not None:
                self._idle_handle = self.loop.call_at(
                    self.last_read + self.idle_timeout, self._check_idle
                )
        else:
            self.upstream = side
            if self._closed and side.transport is not None:
                side.transport.abort()  # the client left while we were connecting

    def splice(self) -> None:
        """Both sides are connected: start forwarding both ways."""
        downstream, upstream = self.downstream, self.upstream
        assert downstream is not None and upstream is not None
        assert downstream.transport is not None and upstream.transport is not None
        downstream.peer = upstream.transport
        upstream.peer = downstream.transport
        if self._held is not None:
            for side, data in self._held:
                assert side.peer is not None
                side.peer.write(data)
                if side._downstream:
                    self.counters.bytes_received += len(data)
                else:
                    self.counters.bytes_sent += len(data)
            self._held = None
        self.last_read = self.loop.time()
        downstream.transport.resume_reading()
        upstream.transport.resume_reading()

    def hold(self, side: _Side, data: bytes) -> None:
        """Bytes ``side`` read before the link was spliced (bounded: it is paused)."""
        if self._held is None:
            self._held = []
        self._held.append((side, data))
        if side.transport is not None:
            side.transport.pause_reading()

    def eof_from(self, side: _Side) -> bool:
        """``side`` read EOF: pass it on if the other side can half-close (keep
        ``side`` open to write the answer), else close the link after flushing."""
        peer = side.peer
        if peer is None or peer.is_closing():
            self.close()
            return False
        self._eofs += 1
        if self._eofs < 2 and peer.can_write_eof():
            peer.write_eof()
            # Keep ``side`` open to write the answer; a TLS side ignores this (and
            # warns), it shuts down on close_notify whatever we return.
            return side.transport is None or side.transport.can_write_eof()
        self.close()
        return False

    def side_lost(self, side: _Side) -> None:
        if side is self.downstream or side is self.upstream:
            self.close()  # not a failed attempt the outbound side dropped

    def close(self) -> None:
        """Close both sides (each flushes what it has buffered) and the timer."""
        if self._closed:
            return
        self._closed = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        if self.task is not None and not self.task.done():
            self.task.cancel()
        for side in (self.downstream, self.upstream):
            if side is not None and side.transport is not None:
                side.transport.close()
        if self.downstream is not None:
            self.counters.connections_closed += 1
        self._on_close(self)

    def abort(self) -> None:
        """Close now, dropping buffered bytes (listener shutdown)."""
        for side in (self.downstream, self.upstream):
            if side is not None and side.transport is not None:
                side.transport.abort()
        self.close()

    def _check_idle(self) -> None:
        assert self.idle_timeout is not None
        deadline = self.last_read + self.idle_timeout
        if self.loop.time() >= deadline:
            self._idle_handle = None
            self.counters.idle_timeouts += 1
            self.close()
        else:
            self._idle_handle = self.loop.call_at(deadline, self._check_idle)


class _Listener:
    """What both listeners share: the server, the links, the counters."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._reads = _ReadBuffer()
        self._counters = Counters()

    @property
    def address(self) -> Address:
        """Where it listens (the real port when it was started with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the listener is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    def statistics(self) -> Counters:
        return self._counters.copy()

    @property
    def open_links(self) -> int:
        return len(self._links)

    def _new_link(self, idle_timeout: float | None) -> _Link:
        link = _Link(asyncio.get_running_loop(), self._counters, idle_timeout, self._links.discard)
        self._links.add(link)
        return link

    async def _serve(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        context: ssl.SSLContext | None = None,
        handshake_timeout: float | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            factory,
            self._host,
            self._port,
            backlog=DEFAULT_BACKLOG,
            reuse_address=True,
            ssl=context,
            ssl_handshake_timeout=handshake_timeout,
        )

    async def aclose(self) -> None:
        """Stop accepting and drop every open connection."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


# ---------------------------------------------------------------------------- inbound


@dataclass(frozen=True, slots=True)
class LocalService:
    """A service this host's inbound port serves, chosen by SNI = ``name``."""

    name: str
    target: Address
    """The local instance to forward to."""
    context: ssl.SSLContext
    """Its server context (``proxy.tls.server_context``: its leaf, the trust bundle)."""


@dataclass(frozen=True, slots=True)
class InboundSettings:
    services: Mapping[str, LocalService]
    """By name, which is also the SNI a client sends."""
    authorize: Authorize
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
    by_context: Mapping[int, LocalService] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        by_context = {id(service.context): service for service in self.services.values()}
        object.__setattr__(self, "by_context", by_context)


class InboundListener(_Listener):
    """The host's mTLS port. ``trust_bundle`` is only the base context's (which
    presents nothing and is switched by SNI to a service's context); the roots that
    verify clients are those of the service contexts in ``settings``."""

    def __init__(
        self,
        host: str,
        port: int,
        trust_bundle: Collection[str],
        settings: InboundSettings,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        super().__init__(host, port)
        self._settings = settings
        self._selector = tls.ServiceSelector(self._contexts(settings))
        self._context = tls.listener_context(
            trust_bundle, self._selector, self._counters.count_handshake_failure
        )
        self._handshake_timeout = handshake_timeout

    @staticmethod
    def _contexts(settings: InboundSettings) -> dict[str, ssl.SSLContext]:
        return {name: service.context for name, service in settings.services.items()}

    def update(self, settings: InboundSettings) -> None:
        """New services, targets, certificates or intentions, for new connections."""
        self._selector.update(self._contexts(settings))
        self._settings = settings

    async def start(self) -> None:
        await self._serve(self._accepted, self._context, self._handshake_timeout)

    def _accepted(self) -> _Side:
        link = self._new_link(self._settings.idle_timeout)
        return _InboundDownstream(link, self._reads, self)

    def _admit(self, side: _Side) -> None:
        """After the handshake: which service, who is calling, allowed or not."""
        settings = self._settings
        link = side._link
        transport = side.transport
        assert transport is not None
        ssl_object = transport.get_extra_info("ssl_object")
        service = settings.by_context.get(id(ssl_object.context)) if ssl_object else None
        if service is None:
            self._counters.unknown_service += 1
            link.close()
            return
        peer = tls.peer_spiffe_id(ssl_object)
        allowed, reason = settings.authorize(peer, service.name)
        if not allowed:
            self._counters.denied += 1
            log.info("connection_denied peer=%s service=%s reason=%s", peer, service.name, reason)
            link.close()
            return
        link.task = asyncio.get_running_loop().create_task(
            self._connect(link, service.target, settings.connect_timeout)
        )

    async def _connect(self, link: _Link, target: Address, connect_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                await loop.create_connection(
                    lambda: _TcpSide(link, self._reads, downstream=False), *target
                )
        except (OSError, TimeoutError):
            self._counters.connect_failures += 1
            self._counters.no_endpoint += 1
            link.close()
            return
        if link.upstream is not None and not link._closed:
            link.splice()


class _InboundDownstream(_TlsSide):
    __slots__ = ("_listener",)

    def __init__(self, link: _Link, reads: _ReadBuffer, listener: InboundListener) -> None:
        super().__init__(link, reads, downstream=True)
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._listener._admit(self)


# ---------------------------------------------------------------------------- outbound


@dataclass(frozen=True, slots=True)
class OutboundSettings:
    upstream: str
    """The upstream service's name: the SNI sent to its endpoints' inbound ports."""
    expected_identity: str
    """The SPIFFE ID the server must present:
    ``spiffe://<td>/ns/default/dc/<dc>/svc/<upstream>``."""
    contexts: tls.ClientContexts
    """The source service's client contexts (its leaf, the trust bundle)."""
    pick: Pick
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    """Per attempt, TCP connect and TLS handshake together."""
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_base: float = 0.025


class WrongIdentity(ssl.SSLError):
    """The server's certificate is valid but names another service."""


class OutboundListener(_Listener):
    """A loopback port for one (source service, upstream)."""

    def __init__(
        self, host: str, port: int, settings: OutboundSettings, *, rng: random.Random | None = None
    ) -> None:
        super().__init__(host, port)
        self._settings = settings
        self._rng = rng or random.Random()

    def update(self, settings: OutboundSettings) -> None:
        """New endpoints, certificates or identity, for new connections."""
        self._settings = settings

    async def start(self) -> None:
        await self._serve(self._accepted)

    def _accepted(self) -> _Side:
        link = self._new_link(self._settings.idle_timeout)
        return _OutboundDownstream(link, self._reads, self)

    def _connect_soon(self, link: _Link) -> None:
        link.task = asyncio.get_running_loop().create_task(self._connect(link, self._settings))

    async def _connect(self, link: _Link, settings: OutboundSettings) -> None:
        loop = asyncio.get_running_loop()
        tried: set[Address] = set()
        for attempt in range(settings.max_attempts):
            if attempt:
                fraction = self._rng.random()
                await asyncio.sleep(backoff(attempt, base=settings.backoff_base, fraction=fraction))
            endpoint = settings.pick(tried)
            if endpoint is None:
                break
            tried.add(endpoint)
            context = settings.contexts.context_for(endpoint, settings.upstream)
            transport: asyncio.Transport | None = None
            try:
                async with asyncio.timeout(settings.connect_timeout):
                    transport, _ = await loop.create_connection(
                        lambda: _TlsSide(link, self._reads, downstream=False),
                        *endpoint,
                        ssl=context,
                        server_hostname=settings.upstream,
                        ssl_handshake_timeout=settings.connect_timeout,
                    )
                ssl_object = transport.get_extra_info("ssl_object")
                if tls.peer_spiffe_id(ssl_object) != settings.expected_identity:
                    self._counters.count_handshake_failure(tls.WRONG_IDENTITY)
                    raise WrongIdentity("wrong server identity")
            except (OSError, TimeoutError):
                self._counters.connect_failures += 1
                if transport is not None:
                    link.upstream = None
                    transport.abort()
                continue
            if link._closed:
                transport.abort()
                return
            link.first_upstream_read = functools.partial(
                self._remember_session, link, context, ssl_object
            )
            link.splice()
            return
        self._counters.no_endpoint += 1
        link.close()

    @staticmethod
    def _remember_session(link: _Link, context: tls.MeshContext, ssl_object: ssl.SSLObject) -> None:
        link.first_upstream_read = None
        context.remember_session(ssl_object)


class _OutboundDownstream(_TcpSide):
    __slots__ = ("_listener",)

    def __init__(self, link: _Link, reads: _ReadBuffer, listener: OutboundListener) -> None:
        super().__init__(link, reads, downstream=True)
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._listener._connect_soon(self._link)
