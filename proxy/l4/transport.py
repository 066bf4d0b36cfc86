"""The L4 (TCP) mTLS data path: inbound and outbound listeners that splice bytes,
asking the compiled snapshot (``proxy.runtime``) what to do with each connection.

Theory of operation
-------------------
A proxied connection is a :class:`_Link` of two :class:`_Side` protocols, the
*downstream* (the socket the connection came in on) and the *upstream* (the socket
the proxy opened). Bytes read on one side are written to the other, untouched:

* **Protocols, not streams** (reference/proxy-speed.md: streams cost 30-40 % more
  CPU per request). Every side, TLS or plain, is an ``asyncio.Protocol`` whose
  ``data_received`` writes the ``bytes`` it got to the other side's transport, as
  they are: uvloop writes ``bytes`` on its fast path, whereas a ``memoryview`` (of a
  shared ``BufferedProtocol`` buffer, as this module once did) costs it a
  ``memoryview.cast`` and two more buffer views per write. Measured with callgrind,
  one keep-alive connection, 64-byte responses: 40.2k instructions per request
  per proxy with the shared buffer and a counting method, 34.3k with this, 33.4k
  for a bare forwarder. uvloop's TLS transport decrypts only what is pending (it
  checks ``SSLObject.pending()`` first), so the 256 KiB ``SSLObject.read`` of a
  copying protocol is one malloc/realloc from the heap — once the worker has fixed
  glibc's mmap threshold (``proxy.server.tune_allocator``); before, it was an
  ``mmap``/``mremap``/``munmap`` per read in some workers, the ~10 µs that
  reference/proxy-speed.md measured for reading into a fresh 256 KiB buffer.
* **Per read, one attribute update**: the link's byte count, in the reading
  side's class (:class:`_Downstream` or :class:`_Upstream`: no branch, no method
  call). Everything else (telemetry, access log, breaker and outlier bookkeeping)
  happens once per connection, when it opens and when it closes.
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
* **Idle timeout**: reads do not look at the clock. One timer per link ticks
  :data:`IDLE_TICKS` times per ``idle_timeout``; a tick that finds the byte counts
  changed notes its time as the last activity, and a tick ``idle_timeout`` after
  that closes the link (so between 1 and 1.25 timeouts after its last read).

An :class:`InboundListener` serves mTLS on the host's port. The handshake (client
certificate required, the SNI name switches to the context of the service it
reaches, see ``proxy.tls``) is done by the loop; the SNI callback also notes the
name on the ``SSLObject`` (per-instance names ``i<hex>.<service>`` share their
service's context, so the context alone cannot say which target was asked for).
Then, per connection, :class:`proxy.runtime.InboundRuntime` decides: the target of
the SNI name; a connection to an ``http`` service is handed to the L7 handler
(:class:`HttpHandoff`), which authorizes and rate-limits each request (a denial is a
403 naming the intention, more useful than a closed connection); for a ``tcp``
service the intention check (a denial closes), the per-connection rate limit and
``max_connections``, then a local instance (round robin) is connected and spliced.

An :class:`OutboundListener` serves plain TCP on loopback for one upstream (source
service → destination). Per connection, :class:`proxy.runtime.UpstreamRuntime` gives
the first route, a split, the resolved cluster (failover when it has no endpoint),
the circuit breaker's ``max_connections``, then an endpoint from the cluster's load
balancer. The endpoint (another host's inbound port) is connected over mTLS with the
endpoint's SNI, presenting the source service's leaf (session resumed per address
and SNI, ``proxy.tls.ClientContexts``), and the server's SPIFFE ID must be the
cluster's identity. A failed attempt (refused, timed out, TLS refused, wrong
identity) is reported to the cluster's outlier detector and retried on an endpoint
not tried yet, after ``proxy.resilience.backoff`` with jitter.

Both take their configuration as runtime objects plus TLS contexts; ``update()``
swaps them in one assignment, so new connections use the new snapshot and open ones
keep the objects they started with.

Telemetry (``proxy.telemetry.Telemetry``): connections opened/closed per (direction,
source, destination), one ``request`` (status 0) with duration and bytes when a
connection closes, handshake failures by reason, denials, rate limiting, breaker
trips, retries, no endpoint; one access-log line per sampled connection. Each
listener also keeps plain integer :class:`Counters` (``statistics()``) for tests and
debugging.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import ssl
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol, cast

from proxy import tls
from proxy.resilience import CONNECT_FAILED, MAX_CONNECTIONS, backoff
from proxy.runtime import ClusterRuntime, InboundRuntime, UpstreamRuntime
from proxy.snapshot import Endpoint, InboundTarget, LocalService
from proxy.telemetry import AccessLogger, Direction, Telemetry

log = logging.getLogger("proxy.l4")

#: The idle timer ticks this many times per ``idle_timeout``: a link is closed between
#: ``idle_timeout`` and ``idle_timeout * (1 + 1 / IDLE_TICKS)`` after its last read.
IDLE_TICKS: Final = 4
#: A side's transport pauses the other side's reading above this many buffered
#: bytes, and resumes it below the low mark. 256 KiB, like uvloop's TLS read side,
#: keeps a fast sender going through a short stall without unbounded memory.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
#: Connect attempts per outbound connection when the route's retry policy asks for
#: fewer: a failed connect sent nothing, so trying another endpoint is always safe
#: (Envoy's TCP proxy: ``max_connect_attempts``).
DEFAULT_MAX_ATTEMPTS: Final = 3
DEFAULT_BACKLOG: Final = 1024

#: ``x-meshnode-error`` kinds used in access-log lines of TCP connections.
ERROR_CONNECT_FAILURE: Final = "connect-failure"
ERROR_NO_ENDPOINT: Final = "no-healthy-endpoint"
ERROR_BREAKER: Final = "circuit-breaker"
ERROR_LOCAL_UNAVAILABLE: Final = "local-unavailable"

Address = tuple[str, int]


class HttpHandoff(Protocol):
    """What the inbound listener needs of the L7 handler (``proxy.l7``): take over
    an authorized mTLS connection to an ``http`` service (it calls
    ``transport.set_protocol`` itself) and call ``on_close`` once when it closes."""

    def take_over(
        self,
        transport: asyncio.Transport,
        service: LocalService,
        target: InboundTarget,
        peer_id: str | None,
        *,
        on_close: Callable[[], None] | None = None,
    ) -> None: ...


# ---------------------------------------------------------------------------- counters


@dataclass(slots=True)
class Counters:
    """What one listener counted since it started. ``statistics()`` returns a copy."""

    connections_opened: int = 0
    """Connections admitted (inbound: after the intention check and limits)."""
    connections_closed: int = 0
    bytes_received: int = 0
    """From downstream (the connecting client), forwarded upstream."""
    bytes_sent: int = 0
    """From upstream, forwarded to downstream."""
    handshake_failures: dict[str, int] = field(default_factory=dict)
    """By ``proxy.tls.FAILURE_LABELS``."""
    denied: int = 0
    """Inbound: connections the intention check refused."""
    rate_limited: int = 0
    """Inbound: connections refused by a rate limit or ``max_connections``."""
    unknown_service: int = 0
    """Inbound: handshakes whose SNI target left the configuration meanwhile."""
    handed_over: int = 0
    """Inbound: connections given to the L7 handler."""
    connect_failures: int = 0
    """Attempts to reach an upstream that failed (each retry counts)."""
    no_endpoint: int = 0
    """Connections closed because no endpoint could be reached (or the breaker
    refused)."""
    idle_timeouts: int = 0
    backpressure_pauses: int = 0
    """Times a side stopped reading because the other side's buffer was full."""

    @property
    def connections_active(self) -> int:
        return self.connections_opened - self.connections_closed

    def count_handshake_failure(self, reason: str) -> None:
        self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1

    def copy(self) -> Counters:
        copied = Counters(**{name: getattr(self, name) for name in self.__slots__})
        copied.handshake_failures = dict(self.handshake_failures)
        return copied


# ---------------------------------------------------------------------------- splicing


class _Side(asyncio.Protocol):
    """One socket of a link. ``peer`` is the other side's transport once both are
    connected; until then reading stays paused. Which byte count a read adds to is
    the subclass (:class:`_Downstream`, :class:`_Upstream`): no branch per read."""

    __slots__ = ("_link", "peer", "transport")

    _downstream: bool

    def __init__(self, link: _Link) -> None:
        self._link = link
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
        # Transport and protocol refer to each other (and the peer's to the link):
        # dropped here, a closed connection is freed by reference counting at once
        # instead of waiting, as garbage in cycles, for a full collection (~2 KB
        # per connection held until then).
        self.transport = None
        self.peer = None


class _Downstream(_Side):
    """The side a connection came in on: its reads are the link's ``bytes_in``."""

    __slots__ = ()

    _downstream = True

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            # Read before the other side is connected: the loop may deliver a first
            # read although connection_made paused reading. Kept for splice().
            self._link.hold(self, data)
            return
        peer.write(data)
        self._link.bytes_in += len(data)


class _Upstream(_Side):
    """The side the proxy opened: its reads are the link's ``bytes_out``."""

    __slots__ = ()

    _downstream = False

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        link = self._link
        if peer is None:
            link.hold(self, data)
            return
        peer.write(data)
        link.bytes_out += len(data)
        if link.first_upstream_read is not None:
            link.first_upstream_read()


class _Link:
    """A downstream and an upstream side spliced together, with the link's idle
    timer, its byte counts, and what its close must report (source, destination,
    cluster and endpoint)."""

    __slots__ = (
        "_closed",
        "_eofs",
        "_held",
        "_idle_handle",
        "_moved_at_tick",
        "_on_close",
        "admitted",
        "attempts",
        "breaker_cluster",
        "bytes_in",
        "bytes_out",
        "cluster",
        "counters",
        "destination",
        "downstream",
        "endpoint",
        "error",
        "first_upstream_read",
        "idle_timeout",
        "last_active",
        "loop",
        "peer_id",
        "route",
        "service_slot",
        "source",
        "started",
        "task",
        "upstream",
        "upstream_label",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        counters: Counters,
        on_close: Callable[[_Link], None],
    ) -> None:
        self.loop = loop
        self.counters = counters
        self._on_close = on_close
        self.downstream: _Side | None = None
        self.upstream: _Side | None = None
        self.task: asyncio.Task[None] | None = None
        self.first_upstream_read: Callable[[], None] | None = None
        self.last_active = loop.time()
        """Loop time of the idle tick that last saw bytes move (or of the start)."""
        self.started = self.last_active
        self.idle_timeout: float | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._moved_at_tick = 0
        self._eofs = 0
        self._held: list[tuple[_Side, bytes]] | None = None
        self._closed = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.admitted = False
        """Counted as opened (so its close is counted too)."""
        self.source = ""
        self.destination = ""
        self.peer_id = ""
        self.route = ""
        self.cluster = ""
        self.upstream_label = ""
        self.attempts = 0
        self.error = ""
        self.breaker_cluster: ClusterRuntime | None = None
        """The cluster whose breaker counts this connection (released at close)."""
        self.endpoint: Endpoint | None = None
        """The endpoint whose ``active`` count includes this connection."""
        self.service_slot: dict[str, int] | None = None
        """Inbound: the per-service open-connection counts this one is part of."""

    # ------------------------------------------------------------------ lifecycle

    @property
    def closed(self) -> bool:
        return self._closed

    def side_made(self, side: _Side) -> None:
        if side._downstream:
            self.downstream = side
        else:
            self.upstream = side
            if self._closed and side.transport is not None:
                side.transport.abort()  # the client left while we were connecting

    def start_idle_timer(self, idle_timeout: float) -> None:
        """Close the link after ``idle_timeout`` seconds without a read (0: never)."""
        if idle_timeout > 0 and not self._closed:
            self.idle_timeout = idle_timeout
            self._idle_handle = self.loop.call_at(
                self.last_active + idle_timeout / IDLE_TICKS, self._check_idle
            )

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
                    self.bytes_in += len(data)
                else:
                    self.bytes_out += len(data)
            self._held = None
        self.last_active = self.loop.time()
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
        self._on_close(self)
        self._forget()

    def _forget(self) -> None:
        """Drop what refers back to the link (sides, task, callbacks), so that no
        reference cycle keeps a closed link alive until the next full collection."""
        self.downstream = self.upstream = None
        self.task = None
        self.first_upstream_read = None
        self._held = None

    def detach(self) -> None:
        """Forget the link without closing its transport: the downstream connection
        now belongs to another protocol (the L7 handler)."""
        self._closed = True
        self.downstream = None
        self._on_close(self)

    def abort(self) -> None:
        """Close now, dropping buffered bytes (listener shutdown)."""
        for side in (self.downstream, self.upstream):
            if side is not None and side.transport is not None:
                side.transport.abort()
        self.close()

    def _check_idle(self) -> None:
        """A tick of the idle timer: bytes moved since the last tick are activity
        (noticed at this tick); none for ``idle_timeout`` since then closes."""
        assert self.idle_timeout is not None
        now = self.loop.time()
        moved = self.bytes_in + self.bytes_out
        if moved != self._moved_at_tick:
            self._moved_at_tick = moved
            self.last_active = now
        elif now - self.last_active >= self.idle_timeout:
            self._idle_handle = None
            self.counters.idle_timeouts += 1
            self.close()
            return
        self._idle_handle = self.loop.call_at(
            now + self.idle_timeout / IDLE_TICKS, self._check_idle
        )


class _Listener:
    """What both listeners share: the server, the links, counters and telemetry."""

    _direction: Direction

    def __init__(
        self,
        host: str,
        port: int,
        telemetry: Telemetry | None,
        access_log: AccessLogger | None,
    ) -> None:
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._counters = Counters()
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.access_log = access_log
        """Replaceable (the worker swaps it when the snapshot's access log changes)."""

    @property
    def address(self) -> Address:
        """Where it listens (the real port when it was started with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the listener is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    def statistics(self) -> Counters:
        counted = self._counters.copy()
        for link in self._links:
            counted.bytes_received += link.bytes_in
            counted.bytes_sent += link.bytes_out
        return counted

    @property
    def open_links(self) -> int:
        return len(self._links)

    def open_connections(self) -> int:
        """Connections open now (the worker reports it and waits for it in tests)."""
        return len(self._links)

    def _new_link(self) -> _Link:
        link = _Link(asyncio.get_running_loop(), self._counters, self._link_closed)
        self._links.add(link)
        return link

    def _opened(self, link: _Link, source: str, destination: str) -> None:
        """The link is a connection of ``source`` to ``destination`` from now on."""
        link.admitted = True
        link.source = source
        link.destination = destination
        self._counters.connections_opened += 1
        self.telemetry.connection_opened(self._direction, source, destination)

    def _link_closed(self, link: _Link) -> None:
        """Once per link: forget it, and report it when it was a connection."""
        self._links.discard(link)
        counters = self._counters
        counters.bytes_received += link.bytes_in
        counters.bytes_sent += link.bytes_out
        if link.breaker_cluster is not None:
            link.breaker_cluster.breaker.connection_closed()
            if link.endpoint is not None:
                link.breaker_cluster.request_finished(link.endpoint)
            link.breaker_cluster = None
        if link.service_slot is not None:
            link.service_slot[link.destination] -= 1
            link.service_slot = None
        if not link.admitted:
            return
        counters.connections_closed += 1
        telemetry = self.telemetry
        direction = self._direction
        seconds = link.loop.time() - link.started
        telemetry.connection_closed(direction, link.source, link.destination)
        telemetry.request(
            direction, link.source, link.destination, 0, seconds, link.bytes_in, link.bytes_out
        )
        access_log = self.access_log
        if access_log is not None and access_log.sampled():
            access_log.log(self._access_record(link, seconds))

    def _access_record(self, link: _Link, seconds: float) -> dict[str, object]:
        return {
            "time": time.time(),
            "direction": self._direction,
            "source": link.source,
            "source_id": link.peer_id,
            "destination": link.destination,
            "route": link.route,
            "cluster": link.cluster,
            "upstream": link.upstream_label,
            "protocol": "tcp",
            "method": "",
            "path": "",
            "status": 0,
            "duration_ms": round(seconds * 1000.0, 3),
            "bytes_in": link.bytes_in,
            "bytes_out": link.bytes_out,
            "attempts": link.attempts,
            "error": link.error,
        }

    def _handshake_failed(self, reason: str) -> None:
        self._counters.count_handshake_failure(reason)
        self.telemetry.handshake_failure(self._direction, reason)

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

    async def aclose(self, *, drain: bool = False) -> None:
        """Stop accepting and drop every open connection; with ``drain``, leave
        open connections to finish on their own (and do not wait for them: since
        Python 3.12 ``Server.wait_closed`` waits for every connection it accepted,
        including those handed to the L7 handler)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if not drain:
            for link in list(self._links):
                link.abort()
            if server is not None:
                await server.wait_closed()


# ---------------------------------------------------------------------------- inbound


class _SniSelector(tls.ServiceSelector):
    """``tls.ServiceSelector`` that also notes the SNI name on the ``SSLObject``:
    the listener needs the name itself (which target), not only its context."""

    def __call__(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        refused = super().__call__(ssl_object, server_name, _)
        if refused is None:
            ssl_object.mesh_server_name = server_name  # type: ignore[union-attr]
        return refused


def _server_name(ssl_object: ssl.SSLObject | None) -> str | None:
    name = getattr(ssl_object, "mesh_server_name", None)
    return name if isinstance(name, str) else None


class InboundListener(_Listener):
    """The host's mTLS port (``runtime.inbound.host``/``port``).

    ``contexts`` maps every SNI name of ``runtime.inbound.targets`` to the server
    context of its service (that service's leaf; the trust bundle that verifies
    clients). ``trust_bundle`` is only the base context's, which presents nothing and
    is switched by SNI. ``http`` takes connections to ``http`` services; without it
    they are closed."""

    _direction: Direction = "inbound"

    def __init__(
        self,
        runtime: InboundRuntime,
        contexts: Mapping[str, ssl.SSLContext],
        trust_bundle: Collection[str],
        telemetry: Telemetry | None = None,
        access_log: AccessLogger | None = None,
        *,
        http: HttpHandoff | None = None,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        super().__init__(runtime.inbound.host, runtime.inbound.port, telemetry, access_log)
        self._runtime = runtime
        self._selector = _SniSelector(contexts)
        self._context = tls.listener_context(trust_bundle, self._selector, self._handshake_failed)
        self._handshake_timeout = handshake_timeout
        self._per_service: dict[str, int] = {}
        self.http = http

    @property
    def runtime(self) -> InboundRuntime:
        return self._runtime

    def update(self, runtime: InboundRuntime, contexts: Mapping[str, ssl.SSLContext]) -> None:
        """New services, targets, certificates or intentions, for new connections; and
        open tcp connections the new intentions deny are closed (:meth:`_revoke`)."""
        self._selector.update(contexts)
        previous, self._runtime = self._runtime, runtime
        if runtime is not previous:
            self._revoke(runtime)

    def _revoke(self, runtime: InboundRuntime) -> None:
        """Close the open tcp connections ``runtime``'s intentions no longer allow.

        Consul (and Envoy's RBAC network filter) check a tcp intention only when a
        connection opens, so a deny leaves a long-lived connection (a database
        session, a stream) working until it closes. Here revoking access takes effect
        on those too, within the snapshot push (~100 ms): the decision is the same
        one the connection was admitted with, re-run for its (peer, service) — a dict
        lookup per open connection, once per snapshot. http connections are the L7
        handler's, which checks every request."""
        for link in list(self._links):
            if not link.admitted or link.closed:
                continue
            verdict = runtime.authorize_connection(link.peer_id or None, link.destination)
            if verdict.allowed:
                continue
            self._counters.denied += 1
            self.telemetry.denied(link.source, link.destination, "l4")
            log.info(
                "connection_revoked peer=%s service=%s rule=%s",
                link.peer_id,
                link.destination,
                verdict.rule,
            )
            link.error = f"intention: denied by {verdict.rule}"
            link.close()

    async def start(self) -> None:
        await self._serve(self._accepted, self._context, self._handshake_timeout)

    def _accepted(self) -> _Side:
        return _InboundDownstream(self._new_link(), self)

    def _admit(self, side: _InboundDownstream, transport: asyncio.Transport) -> None:
        """After the handshake: which target, who is calling, allowed or not."""
        runtime = self._runtime
        link = side._link
        ssl_object = transport.get_extra_info("ssl_object")
        sni = _server_name(ssl_object)
        target = runtime.target(sni) if sni is not None else None
        service = runtime.service(target.service) if target is not None else None
        if target is None or service is None:
            self._counters.unknown_service += 1
            link.close()
            return
        peer = tls.peer_spiffe_id(ssl_object)
        source = runtime.source(peer)
        if service.protocol == "http":
            # Every request is authorized by the L7 handler, and a denied one gets a
            # 403 naming the intention (x-meshnode-error), which a closed connection
            # could not say: as Consul's http services, no connect-time check.
            self._hand_over(link, transport, service, target, source, peer)
            return
        verdict = runtime.authorize_connection(peer, service.name)
        if not verdict.allowed:
            self._counters.denied += 1
            self.telemetry.denied(source, service.name, "l4")
            log.info(
                "connection_denied peer=%s service=%s rule=%s", peer, service.name, verdict.rule
            )
            link.close()
            return
        if not self._within_limits(link, runtime, source, service):
            link.close()
            return
        link.peer_id = peer or ""
        self._opened(link, source, service.name)
        link.start_idle_timer(service.idle_timeout)
        if not target.addresses:  # no local instance left (the agent's next snapshot)
            self._counters.no_endpoint += 1
            self.telemetry.no_endpoint(source, service.name)
            link.error = ERROR_LOCAL_UNAVAILABLE
            link.close()
            return
        address = runtime.local_address(target)
        link.upstream_label = f"{address[0]}:{address[1]}"
        link.attempts = 1
        link.task = asyncio.get_running_loop().create_task(
            self._connect(link, address, service.connect_timeout)
        )

    def _within_limits(
        self, link: _Link, runtime: InboundRuntime, source: str, service: LocalService
    ) -> bool:
        """The per-connection rate limit and ``max_connections`` of a tcp service;
        takes a connection slot when it may go."""
        name = service.name
        if runtime.rate_limit(source, name, link.loop.time()) > 0:
            self._counters.rate_limited += 1
            self.telemetry.rate_limited(source, name)
            return False
        if not self._take_slot(service):
            return False
        link.service_slot = self._per_service
        return True

    def _take_slot(self, service: LocalService) -> bool:
        """One of ``service.max_connections`` (0: unlimited), False when all are taken."""
        name = service.name
        open_now = self._per_service.get(name, 0)
        if service.max_connections and open_now >= service.max_connections:
            self._counters.rate_limited += 1
            self.telemetry.breaker_trip(name, "inbound", MAX_CONNECTIONS)
            return False
        self._per_service[name] = open_now + 1
        return True

    def _hand_over(
        self,
        link: _Link,
        transport: asyncio.Transport,
        service: LocalService,
        target: InboundTarget,
        source: str,
        peer: str | None,
    ) -> None:
        """An authorized connection to an http service goes to the L7 handler (which
        rate-limits and authorizes each request); the connection is still counted
        here, in ``max_connections`` and telemetry, until its ``on_close``."""
        http = self.http
        if http is None:
            log.warning("http_service_without_l7 service=%s", service.name)
            link.close()
            return
        if not self._take_slot(service):
            link.close()
            return
        self._counters.handed_over += 1
        self.telemetry.connection_opened("inbound", source, service.name)
        link.detach()
        on_close = functools.partial(self._http_closed, source, service.name)
        http.take_over(transport, service, target, peer, on_close=on_close)

    def _http_closed(self, source: str, service: str) -> None:
        self._per_service[service] -= 1
        self.telemetry.connection_closed("inbound", source, service)

    async def _connect(self, link: _Link, target: Address, connect_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout or None):
                await loop.create_connection(lambda: _Upstream(link), *target)
        except (OSError, TimeoutError):
            self._counters.connect_failures += 1
            self._counters.no_endpoint += 1
            self.telemetry.no_endpoint(link.source, link.destination)
            link.error = ERROR_LOCAL_UNAVAILABLE
            link.close()
            return
        if link.upstream is not None and not link.closed:
            link.splice()


class _InboundDownstream(_Downstream):
    __slots__ = ("_listener",)

    def __init__(self, link: _Link, listener: InboundListener) -> None:
        super().__init__(link)
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called after the handshake. Not paused yet: an http connection is handed
        # over as it is; a tcp one is paused until its upstream is connected.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self._link.side_made(self)
        self._listener._admit(self, transport)
        if not self._link.closed:
            transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
            transport.pause_reading()


# ---------------------------------------------------------------------------- outbound


class WrongIdentity(ssl.SSLError):
    """The server's certificate is valid but names another service."""


@dataclass(frozen=True, slots=True)
class _OutboundConfig:
    runtime: UpstreamRuntime
    contexts: tls.ClientContexts


class OutboundListener(_Listener):
    """A loopback port (``runtime.upstream.host``/``port``) for one upstream: the
    source service's connections to the destination's route chain. ``contexts`` are
    the source service's client contexts (its leaf, the trust bundle)."""

    _direction: Direction = "outbound"

    def __init__(
        self,
        runtime: UpstreamRuntime,
        contexts: tls.ClientContexts,
        telemetry: Telemetry | None = None,
        access_log: AccessLogger | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        upstream = runtime.upstream
        super().__init__(upstream.host, upstream.port, telemetry, access_log)
        self._config = _OutboundConfig(runtime, contexts)
        self._rng = rng or random.Random()

    @property
    def runtime(self) -> UpstreamRuntime:
        return self._config.runtime

    @property
    def contexts(self) -> tls.ClientContexts:
        return self._config.contexts

    def update(self, runtime: UpstreamRuntime, contexts: tls.ClientContexts) -> None:
        """New routes, endpoints, certificates or identities, for new connections."""
        self._config = _OutboundConfig(runtime, contexts)

    async def start(self) -> None:
        await self._serve(self._accepted)

    def _accepted(self) -> _Side:
        return _OutboundDownstream(self._new_link(), self)

    def _connect_soon(self, link: _Link) -> None:
        config = self._config
        upstream = config.runtime.upstream
        self._opened(link, upstream.source, upstream.destination)
        link.start_idle_timer(upstream.idle_timeout)
        link.task = asyncio.get_running_loop().create_task(self._connect(link, config))

    def _refuse(self, link: _Link, error: str) -> None:
        self._counters.no_endpoint += 1
        link.error = error
        link.close()

    async def _connect(self, link: _Link, config: _OutboundConfig) -> None:
        runtime = config.runtime
        route = runtime.route(None)
        link.route = route.name
        cluster = runtime.resolve(runtime.split(route), asyncio.get_running_loop().time())
        if cluster is None:
            self.telemetry.no_endpoint(link.source, link.destination)
            self._refuse(link, ERROR_NO_ENDPOINT)
            return
        name = cluster.cluster.name
        link.cluster = name
        breaker = cluster.breaker
        limit = breaker.allow_connection()
        if limit is not None:
            self.telemetry.breaker_trip(link.destination, name, limit)
            self._refuse(link, f"{ERROR_BREAKER}: {limit} ({name})")
            return
        breaker.connection_opened()
        link.breaker_cluster = cluster
        retry = route.retry
        attempts = (
            max(DEFAULT_MAX_ATTEMPTS, 1 + retry.num_retries) if retry.on_connect_failure else 1
        )
        hash_key = None
        if cluster.cluster.load_balancing.policy == "ring_hash":
            transport = link.downstream.transport if link.downstream is not None else None
            peer = transport.get_extra_info("peername") if transport is not None else None
            hash_key = runtime.hash_key(cluster, None, str(peer[0]) if peer else "")
        tried: set[Endpoint] = set()
        for attempt in range(attempts):
            if attempt:
                self.telemetry.retry(link.source, link.destination)
                fraction = self._rng.random()
                await asyncio.sleep(
                    backoff(
                        attempt,
                        base=retry.backoff_base,
                        max_interval=max(retry.backoff_max, retry.backoff_base),
                        fraction=fraction,
                    )
                )
            endpoint = cluster.pick(link.loop.time(), tried, hash_key)
            if endpoint is None:
                break
            tried.add(endpoint)
            link.attempts = attempt + 1
            if await self._attempt(link, config.contexts, cluster, endpoint):
                return
            if link.closed:
                return
        self.telemetry.no_endpoint(link.source, link.destination)
        self._refuse(link, ERROR_CONNECT_FAILURE if tried else ERROR_NO_ENDPOINT)

    async def _attempt(
        self,
        link: _Link,
        contexts: tls.ClientContexts,
        cluster: ClusterRuntime,
        endpoint: Endpoint,
    ) -> bool:
        """One connection to ``endpoint``; True when the link is spliced (or gone)."""
        loop = link.loop
        address = (endpoint.host, endpoint.port)
        context = contexts.context_for(address, endpoint.sni)
        timeout = cluster.cluster.connect_timeout
        transport: asyncio.Transport | None = None
        try:
            async with asyncio.timeout(timeout or None):
                transport, _ = await loop.create_connection(
                    lambda: _Upstream(link),
                    *address,
                    ssl=context,
                    server_hostname=endpoint.sni,
                    ssl_handshake_timeout=timeout or None,
                )
            ssl_object = transport.get_extra_info("ssl_object")
            if tls.peer_spiffe_id(ssl_object) != cluster.cluster.identity:
                self._handshake_failed(tls.WRONG_IDENTITY)
                raise WrongIdentity("wrong server identity")
        except (OSError, TimeoutError):
            self._counters.connect_failures += 1
            cluster.record(endpoint, CONNECT_FAILED, loop.time())
            if transport is not None:
                link.upstream = None
                transport.abort()
            return False
        cluster.record(endpoint, 200, loop.time())
        if link.closed:
            transport.abort()
            return True
        cluster.request_started(endpoint)
        link.endpoint = endpoint
        link.upstream_label = f"{endpoint.host}:{endpoint.port}"
        link.first_upstream_read = functools.partial(
            self._remember_session, link, context, ssl_object
        )
        link.splice()
        return True

    @staticmethod
    def _remember_session(link: _Link, context: tls.MeshContext, ssl_object: ssl.SSLObject) -> None:
        link.first_upstream_read = None
        context.remember_session(ssl_object)


class _OutboundDownstream(_Downstream):
    __slots__ = ("_listener",)

    def __init__(self, link: _Link, listener: OutboundListener) -> None:
        super().__init__(link)
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._listener._connect_soon(self._link)
