"""The L7 (HTTP/1.1) data path: the inbound connection handler and the outbound
listener, with pooled keep-alive upstream connections.

Theory of operation
-------------------
A downstream connection is a :class:`_Client` (an ``asyncio`` protocol and an
``http.RequestReader``): each request it parses becomes an :class:`_Exchange`, which
decides (intention, rate limit on the inbound side; route, split, breaker, endpoint on
the outbound side — all asked of the runtime), takes an upstream connection
(:class:`_Server`, a ``ResponseReader``) from a :class:`_Pool` or opens one, streams the
request to it and the response back, and finishes: it reports telemetry, gives the
upstream connection back to the pool when both messages ended cleanly, and tells the
client, which starts its next request. Everything on the happy path is a callback;
a task exists only to open a connection (``create_connection`` is a coroutine), and
a retry waits with ``call_later``.

What makes it fast (reference/proxy-speed.md):

* **Protocols, one write per read.** Within one read, what an exchange produces for a
  side is staged in a list and written with one ``write`` after the parser returns
  (:meth:`_Exchange.flush`): a small request is one TLS record and one system call
  each way. Heads are rebuilt with one ``bytes.join`` of pre-serialized header lines
  (``http.request_bytes``).
* **TLS reads into one shared 64 KiB buffer** (``BufferedProtocol``), as in
  ``proxy/l4``; llhttp copies what it hands over, so the buffer is free again when the
  parser returns. Plain TCP sides are ``Protocol``: uvloop already reads those into
  its own buffer.
* **Pooled keep-alive connections**: per (endpoint host, port, SNI) on the outbound
  side (mutual TLS; a new one resumes the TLS session of the last full handshake to
  that key, ``proxy.tls``), per local address on the inbound side (plain TCP). At most
  :data:`MAX_IDLE_PER_KEY` idle ones per key, most recently used first, closed after
  :data:`POOL_IDLE_TIMEOUT` idle by one sweep timer per pool.
* **No garbage cycles per connection or request**: a connection's reader and its
  llhttp parser refer to each other, so a closed connection drops its parser
  (``release``) instead of leaving both to the cycle collector; exchanges and heads
  hold no back references once finished.

Where the time goes (py-spy and perf on the benchmark pair, keep-alive, 64-byte
bodies): about a third of each worker's time is in ``transport.write`` (the loopback
send, which runs the peer's TCP receive path, plus TLS on the mesh side), a third in
the loop itself (reads, epoll, uvloop's TLS layer and ``ssl.SSLObject``'s Python
wrappers), and a quarter in this module and ``http`` (~25 us per request per proxy
in-process on the shared benchmark machine, spread over ~50 small steps; halving the
number of Python calls, e.g. a second llhttp parser with three callbacks, measured no
gain). System calls are the ideal ones: per proxy and request, one read and one write
each way.

Streaming and backpressure: bodies are forwarded piece by piece as they are read
(re-chunked when chunked). When a side's transport buffers more than
:data:`WRITE_HIGH_WATER` it pauses reading on the side that feeds it, and resumes it
below the low mark; a client whose request waits for a connection stops being read
beyond :data:`REPLAY_LIMIT` buffered bytes.

Pipelining: requests are answered in order. A request parsed while another is in
flight is queued (its body buffered) and the client stops being read until the queue
drains.

Retries (outbound): a request whose body so far fits in :data:`REPLAY_LIMIT` keeps a
copy of what was sent, and can be replayed on another endpoint — on connect failure,
on a reset or a per-try timeout (``on_reset``), on a listed status (for idempotent
methods unless ``retry_non_idempotent``), within ``num_retries``, the cluster's retry
budget and ``max_retries`` breaker, after ``proxy.resilience.backoff``. A retry is
only possible before anything of the response went downstream. Independently of the
policy, a request that fails on a *reused* pooled connection before any response byte
(the peer closed an idle connection as we wrote: a race every pool has) is sent
again once on a new connection, on both sides.

Upgrades (WebSocket, h2c; not CONNECT): the upgrade request is routed, authorized,
limited and retried like any other, sent with ``Connection: upgrade``; the client is
not read further until the response. A 101 makes a :class:`_Tunnel` of the client and
the upstream connection (which leaves its pool for good): bytes both ways untouched,
backpressure and the listener's idle timeout as for any connection, and the exchange
reported when the tunnel closes, with its bytes and duration. Any other answer goes
to the client with ``connection: close``. On the inbound side a new snapshot
re-authorizes every open tunnel's upgrade request and closes the ones now denied.

Errors the proxy generates carry ``x-meshnode-error`` (``http.error_response``). A
failure after a response has started can only be reported by closing the client.

Timeouts: the route's (outbound) or the service's (inbound) request timeout runs from
the request's start until the response's head arrives, checked every
:data:`DEADLINE_TICK` by one timer per listener (:class:`_Deadlines`); a retry's
``per_try_timeout`` likewise per attempt, with its own timer (only when set). A
streaming response body is then limited by neither. A route's ``idle_timeout`` limits
the time between reads from upstream while the response is in flight (504 before
anything went downstream, else the client is closed), checked by the same timer.

Idle downstream connections (no request in flight, nothing read) are closed after the
upstream's (outbound) or the service's (inbound) ``idle_timeout`` by one sweep timer
per listener (:class:`_IdleClients`). Neither clock costs a clock call per read: a
read sets a flag, and the timer turns flags into times. A snapshot whose clusters lose
an endpoint closes the idle pooled connections to it (``_Pool.retire``).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

from proxy import tls
from proxy.errors import RemoteProtocolError
from proxy.l7.http import (
    CHUNKED,
    LAST_CHUNK,
    SOURCE_HEADER,
    UNTIL_CLOSE,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    chunk,
    error_response,
    informational_bytes,
    request_bytes,
    response_bytes,
    rewrite_target,
)
from proxy.resilience import CONNECT_FAILED, RESET, TIMEOUT, backoff

if TYPE_CHECKING:
    from proxy.resilience import CircuitBreaker
    from proxy.runtime import ClusterRuntime, InboundRuntime, UpstreamRuntime, Verdict
    from proxy.snapshot import Endpoint, InboundTarget, LocalService, Route
    from proxy.telemetry import AccessLogger, Direction, Telemetry

#: The shared TLS read buffer (see proxy/l4: bigger TLS reads are slower).
READ_BUFFER_BYTES: Final = 64 * 1024
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024
#: Request bytes kept for a replay (a retry), and buffered while waiting for a
#: connection before the client stops being read. Envoy's default
#: ``per_request_buffer_limit_bytes`` is 1 MiB; 64 KiB covers API requests, and a
#: bigger body streams and is simply not retried.
REPLAY_LIMIT: Final = 64 * 1024
#: Idle connections kept per pool key: enough for a burst of concurrent requests to
#: find warm connections again, few enough that a pool of a thousand keys stays small.
MAX_IDLE_PER_KEY: Final = 64
#: Idle pooled connections are closed after this long. Below the inbound side's own
#: idle timeout, so the client end (which reuses) closes first; typical application
#: servers keep idle connections 5-75 s, and a reuse that races their close is retried.
POOL_IDLE_TIMEOUT: Final = 30.0
DEFAULT_BACKLOG: Final = 1024
#: A client's request body read after the proxy answered (e.g. a 403) is drained up to
#: this many bytes to keep the connection; beyond, the connection is closed.
DRAIN_LIMIT: Final = 64 * 1024

Address = tuple[str, int]

# Why a client is not being read (a bit each; it reads when none is set).
_PAUSE_QUEUE: Final = 1
_PAUSE_PEER: Final = 2
_PAUSE_PENDING: Final = 4
_PAUSE_UPGRADE: Final = 8


class _ReadBuffer:
    __slots__ = ("view",)

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_BUFFER_BYTES))


class _ConnectFailure(Exception):
    pass


#: How often request timeouts are checked: their precision.
DEADLINE_TICK: Final = 0.05


class _Deadlines:
    """The request timeouts of one listener, checked by one ticking timer: a timer
    handle per request (made and cancelled) costs more than routing the request.

    Also the route idle timeouts of the exchanges in ``idle``: a read from the
    upstream only sets ``_Exchange.touched``; a tick turns that into a time
    (``quiet_since``), so the idle clock needs no clock call per read and has the
    tick's precision."""

    __slots__ = ("_handle", "_loop", "entries", "idle")

    def __init__(self) -> None:
        self.entries: dict[_Exchange, float] = {}
        self.idle: set[_Exchange] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Tick from now on (``entries`` or ``idle`` has one)."""
        if self._handle is None:
            self._loop = loop
            self._handle = loop.call_later(DEADLINE_TICK, self._tick)

    def watch_idle(self, exchange: _Exchange, loop: asyncio.AbstractEventLoop) -> None:
        self.idle.add(exchange)
        if self._handle is None:
            self.start(loop)

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        entries = self.entries
        for exchange in [e for e, deadline in entries.items() if deadline <= now]:
            if entries.pop(exchange, None) is not None:
                exchange.deadline_passed()
        idle = self.idle
        if idle:
            for exchange in list(idle):
                if exchange.touched:
                    exchange.touched = False
                    exchange.quiet_since = now
                elif now - exchange.quiet_since >= exchange.idle_limit and exchange in idle:
                    idle.discard(exchange)
                    exchange.idle_passed()
        self._handle = loop.call_later(DEADLINE_TICK, self._tick) if entries or idle else None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.entries.clear()
        self.idle.clear()


#: Idle downstream connections are looked for at least this often (and at most every
#: :data:`DEADLINE_TICK`): a quarter of the shortest idle timeout otherwise.
IDLE_SWEEP_MAX: Final = 30.0


class _IdleClients:
    """Closes a listener's downstream connections that have had no request in flight
    and nothing read for their idle timeout, with one sweep timer per listener.

    A read only sets ``_Client.touched``; a sweep turns that (or a request in flight)
    into a time, ``quiet_since``. So a connection closes between its timeout and
    the timeout plus one sweep interval, and a read costs one attribute store."""

    __slots__ = ("_handle", "_loop", "_timeout_of", "clients")

    def __init__(self, clients: set[_Client], timeout_of: Callable[[_Client], float]) -> None:
        self.clients = clients
        self._timeout_of = timeout_of
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def added(self, client: _Client) -> None:
        """``client`` (now in ``clients``) was accepted."""
        client.quiet_since = client.loop.time()
        if self._handle is None:
            self._loop = client.loop
            self.reschedule()

    def reschedule(self) -> None:
        """Sweep at a quarter of the shortest idle timeout (again: it may have
        changed with a snapshot); not at all while none is set."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        loop = self._loop
        if loop is None or not self.clients:
            return
        timeout_of = self._timeout_of
        shortest = min((t for t in map(timeout_of, self.clients) if t > 0), default=0.0)
        if shortest > 0:
            interval = min(max(shortest / 4, DEADLINE_TICK), IDLE_SWEEP_MAX)
            self._handle = loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        self._handle = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        timeout_of = self._timeout_of
        for client in list(self.clients):
            if client.touched or client._active is not None:
                client.touched = False
                client.quiet_since = now
                continue
            timeout = timeout_of(client)
            if 0 < timeout <= now - client.quiet_since:
                client.close()
        self.reschedule()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


# ------------------------------------------------------------------------------- pool


class _Pool:
    """Idle upstream connections by key. ``generation`` moves on when what the
    connections were made with (certificates) changes: older ones are not reused."""

    __slots__ = ("_handle", "_idle", "_loop", "generation", "live")

    def __init__(self) -> None:
        self._idle: dict[object, list[_Server]] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.generation = 0
        self.live: set[_Server] = set()

    def take(self, key: object) -> _Server | None:
        idle = self._idle.get(key)
        while idle:
            server = idle.pop()
            if server.generation == self.generation and not server.transport.is_closing():
                server.reused = True
                return server
            server.close()
        return None

    def put(self, server: _Server) -> None:
        """``server`` finished an exchange cleanly and may be reused."""
        if server.generation != self.generation or server.transport.is_closing():
            server.close()
            return
        idle = self._idle.get(server.key)
        if idle is None:
            idle = self._idle[server.key] = []
        if len(idle) >= MAX_IDLE_PER_KEY:
            server.close()
            return
        loop = server.loop
        server.idle_since = loop.time()
        server.exchange = None
        if server.paused:
            server.paused = False
            server.transport.resume_reading()  # an idle connection must see a close
        idle.append(server)
        if self._handle is None:
            self._loop = loop
            self._handle = loop.call_later(POOL_IDLE_TIMEOUT / 2, self._sweep)

    def forget(self, server: _Server) -> None:
        idle = self._idle.get(server.key)
        if idle is not None and server in idle:
            idle.remove(server)
            if not idle:
                del self._idle[server.key]

    def _sweep(self) -> None:
        assert self._loop is not None
        self._handle = None
        deadline = self._loop.time() - POOL_IDLE_TIMEOUT
        for key, idle in list(self._idle.items()):
            for server in [s for s in idle if s.idle_since < deadline]:
                server.close()  # connection_lost forgets it
            if not idle:
                self._idle.pop(key, None)
        if self._idle:
            self._handle = self._loop.call_later(POOL_IDLE_TIMEOUT / 2, self._sweep)

    def retire(self, wanted: set[object]) -> None:
        """Stop using connections whose key is not in ``wanted`` (endpoints gone
        from the snapshot): idle ones are closed now, busy ones when their exchange
        ends (``put`` sees the stale generation)."""
        for server in list(self.live):
            if server.key not in wanted:
                server.generation = -1
                if server.exchange is None and not server.draining and server.tunnel is None:
                    self.forget(server)
                    server.close()

    def idle_count(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        for server in list(self.live):
            server.transport.abort()
        self._idle.clear()


# --------------------------------------------------------------------------- upstream


class _Server(ResponseReader):
    """An upstream connection (to a local instance, or mTLS to another host's
    inbound port). Serves one exchange at a time; idle in its pool between them."""

    __slots__ = (
        "breaker",
        "draining",
        "exchange",
        "generation",
        "idle_since",
        "informational",
        "key",
        "loop",
        "paused",
        "pool",
        "reused",
        "session_context",
        "transport",
        "tunnel",
    )

    def __init__(self, pool: _Pool, key: object) -> None:
        super().__init__()
        self.pool = pool
        self.key = key
        self.generation = pool.generation
        self.exchange: _Exchange | None = None
        self.breaker: CircuitBreaker | None = None
        self.session_context: tls.MeshContext | None = None
        self.idle_since = 0.0
        self.informational = False
        self.reused = False
        self.draining = False
        self.paused = False
        self.tunnel: _Tunnel | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.pool.live.add(self)

    def _feed(self, data: bytes | memoryview) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.from_server(data if type(data) is bytes else bytes(data))
            return
        exchange = self.exchange
        if exchange is None and not self.draining:
            self.transport.abort()  # bytes nobody asked for: not reusable
            return
        try:
            self.feed(data)
        except RemoteProtocolError as exc:
            self.transport.abort()
            if exchange is not None and exchange.server is self:
                exchange.server_failed(self, f"malformed response: {exc.reason}")
            return
        if exchange is not None:
            exchange.touched = True  # for a route idle timeout (_Deadlines)
            if exchange._up or exchange._down:
                exchange.flush()

    def head_received(self, head: ResponseHead) -> None:
        self.informational = head.informational
        exchange = self.exchange
        if exchange is not None:
            exchange.response_head(self, head)

    def upgraded(self, rest: bytes) -> None:
        """After a 101 (``_Exchange.switch`` made the tunnel): ``rest`` is the new
        protocol's first bytes."""
        tunnel = self.tunnel
        if tunnel is None:
            raise RemoteProtocolError("upgrade", "switched protocols without a tunnel")
        if rest:
            tunnel.from_server(rest)

    def on_body(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.response_body(data)

    def message_complete(self) -> None:
        self._open = False
        if self.informational:
            return
        exchange = self.exchange
        if exchange is not None:
            exchange.response_end(self, self._head.keep_alive)
        elif self.draining:
            self.draining = False
            if self._head.keep_alive:
                self.pool.put(self)
            else:
                self.close()

    # llhttp calls it directly: one Python frame less per response.
    on_message_complete = message_complete

    def pause_writing(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.client.pause(_PAUSE_PEER)
        elif self.tunnel is not None:
            self.tunnel.client.pause(_PAUSE_PEER)

    def resume_writing(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.client.resume(_PAUSE_PEER)
        elif self.tunnel is not None:
            self.tunnel.client.resume(_PAUSE_PEER)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.release()
        self.pool.live.discard(self)
        self.pool.forget(self)
        if self.breaker is not None:
            self.breaker.connection_closed()
            self.breaker = None
        exchange = self.exchange
        self.exchange = None
        if exchange is not None and exchange.server is self:
            exchange.server_lost(self)
        elif self.tunnel is not None:
            self.tunnel.close()

    def close(self) -> None:
        self.exchange = None
        self.transport.close()


class _TcpServer(_Server, asyncio.Protocol):
    __slots__ = ()

    data_received = _Server._feed


class _TlsServer(_Server, asyncio.BufferedProtocol):
    __slots__ = ("reads",)

    def __init__(self, pool: _Pool, key: object, reads: _ReadBuffer) -> None:
        super().__init__(pool, key)
        self.reads = reads

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reads.view

    def buffer_updated(self, nbytes: int) -> None:
        context = self.session_context
        if context is not None:
            # TLS 1.3 tickets arrive after the handshake: the first read has them.
            self.session_context = None
            ssl_object = self.transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                context.remember_session(ssl_object)
        self._feed(self.reads.view[:nbytes])


# ------------------------------------------------------------------------- downstream


class _Frontend(ABC):
    """What a client's requests are exchanged with: ``exchange_class(client, head,
    frontend)`` makes the exchange objects."""

    exchange_class: Callable[[_Client, RequestHead, Any], _Exchange]

    @abstractmethod
    def client_closed(self, client: _Client) -> None:
        """``client``'s connection is gone: forget it (and count it)."""


class _Client(RequestReader):
    """A downstream connection: parses requests, runs their exchanges in order."""

    __slots__ = (
        "_active",
        "_eof",
        "_frontend",
        "_parsing",
        "_paused",
        "_queue",
        "_starting",
        "closed",
        "loop",
        "quiet_since",
        "touched",
        "transport",
        "tunnel",
        "upgrade_rest",
    )

    def __init__(self, frontend: _Frontend) -> None:
        super().__init__()
        self._frontend = frontend
        self.touched = False
        self.quiet_since = 0.0
        self._active: _Exchange | None = None
        self._parsing: _Exchange | None = None
        self._queue: deque[_Exchange] = deque()
        self._paused = 0
        self._starting = False
        self._eof = False
        self.closed = False
        self.tunnel: _Tunnel | None = None
        self.upgrade_rest = b""
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def _feed(self, data: bytes | memoryview) -> None:
        self.touched = True  # for _IdleClients
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.from_client(data if type(data) is bytes else bytes(data))
            return
        try:
            self.feed(data)
        except RemoteProtocolError as exc:
            self._bad_request(exc)
        active = self._active
        if active is not None and (active._up or active._down):
            active.flush()

    def _bad_request(self, exc: RemoteProtocolError) -> None:
        """Answer 400 after what is in flight (or now) and close."""
        self.pause(_PAUSE_QUEUE)
        response = error_response(400, f"bad-request: {exc}", close=True)
        if self._active is None:
            self.transport.write(response)
            self.transport.close()
        else:
            self._queue.clear()
            self._active.bad_request_after = response

    # ------------------------------------------------------ parser callbacks

    def head_received(self, head: RequestHead) -> None:
        frontend = self._frontend
        exchange = frontend.exchange_class(self, head, frontend)
        self._parsing = exchange
        if self._active is None and not self._queue:
            self._active = exchange
            exchange.start()
        else:
            self._queue.append(exchange)
            self.pause(_PAUSE_QUEUE)

    def on_body(self, data: bytes) -> None:
        exchange = self._parsing
        if exchange is not None:
            exchange.request_body(data)

    def upgraded(self, rest: bytes) -> None:
        """The request just parsed asks to switch protocols: nothing more is parsed.
        Keep what followed it and stop reading until the response decides: a 101
        makes a tunnel (``tunnel_to``), anything else closes the connection after it."""
        if self.closed:
            return
        self.upgrade_rest = rest
        self.pause(_PAUSE_UPGRADE)

    def tunnel_to(self, tunnel: _Tunnel) -> None:
        """From now on this connection's bytes go through ``tunnel`` untouched."""
        self.tunnel = tunnel
        self._active = self._parsing = None
        self._queue.clear()
        self.release()
        rest, self.upgrade_rest = self.upgrade_rest, b""
        if rest:
            tunnel.from_client(rest)
        if self._paused & ~_PAUSE_PEER:
            self._paused &= _PAUSE_PEER
            if not self._paused and not self.closed:
                self.transport.resume_reading()

    def message_complete(self) -> None:
        self._open = False
        exchange = self._parsing
        self._parsing = None
        if exchange is not None:
            exchange.request_end()

    on_message_complete = message_complete  # called by llhttp: a frame less

    # ---------------------------------------------------------- exchanges

    def exchange_finished(self, exchange: _Exchange, keep_alive: bool) -> None:
        if exchange is not self._active:
            return
        self._active = None
        if exchange.bad_request_after is not None:
            if not self.closed:
                self.transport.write(exchange.bad_request_after)
            keep_alive = False
        if not keep_alive or self.closed or self._eof:
            self._queue.clear()
            self.close()
            return
        if self._starting:
            return  # the loop below starts the next one
        self._starting = True
        try:
            while self._active is None and self._queue and not self.closed:
                following = self._active = self._queue.popleft()
                following.start()
                following.flush()
        finally:
            self._starting = False
        if self._paused and not self._queue:
            self.resume(_PAUSE_QUEUE)

    def pause(self, reason: int) -> None:
        if not self._paused and not self.closed:
            self.transport.pause_reading()
        self._paused |= reason

    def resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    # ---------------------------------------------------------- transport

    def pause_writing(self) -> None:
        active = self._active
        if active is not None:
            active.pause_server()
        elif self.tunnel is not None:
            self.tunnel.pause_server()

    def resume_writing(self) -> None:
        active = self._active
        if active is not None:
            active.resume_server()
        elif self.tunnel is not None:
            self.tunnel.resume_server()

    def eof_received(self) -> bool | None:
        # A client may half-close after its request (plain TCP): answer, then close.
        if self._active is None:
            return False
        self._eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.release()
        active = self._active
        self._active = None
        self._queue.clear()
        if active is not None:
            active.client_lost()
        elif self.tunnel is not None:
            self.tunnel.close()
        self._frontend.client_closed(self)


class _TcpClient(_Client, asyncio.Protocol):
    __slots__ = ()

    data_received = _Client._feed


class _TlsClient(_Client, asyncio.BufferedProtocol):
    __slots__ = ("reads",)

    def __init__(self, frontend: _Frontend, reads: _ReadBuffer) -> None:
        super().__init__(frontend)
        self.reads = reads

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reads.view

    def buffer_updated(self, nbytes: int) -> None:
        self._feed(self.reads.view[:nbytes])

    def eof_received(self) -> bool | None:
        return False  # TLS cannot half-close (see proxy/l4)


# --------------------------------------------------------------------------- exchange


class _Exchange(ABC):
    """One request and its response (see the module docstring). Subclasses decide
    (``start``), connect (``_attempt``) and handle failures (``_attempt_failed``)."""

    __slots__ = (
        "_connecting",
        "_deadlines",
        "_down",
        "_drained",
        "_finished",
        "_idle_watch",
        "_limit",
        "_request_done",
        "_response_done",
        "_retry_handle",
        "_up",
        "_up_bytes",
        "attempts",
        "bad_request_after",
        "bytes_in",
        "bytes_out",
        "chunked_out",
        "client",
        "close_after",
        "error",
        "head",
        "idle_limit",
        "quiet_since",
        "replay",
        "replay_bytes",
        "response",
        "server",
        "started",
        "status",
        "touched",
        "upstream_address",
    )

    def __init__(self, client: _Client, head: RequestHead) -> None:
        self.client = client
        self.head = head
        self.started = client.loop.time()
        self.server: _Server | None = None
        self.response: ResponseHead | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._deadlines: _Deadlines | None = None
        self._idle_watch: _Deadlines | None = None
        self.touched = False
        self._retry_handle: asyncio.TimerHandle | None = None
        self._limit = 0.0
        self._up: list[bytes] = []
        self._up_bytes = 0
        self._down: list[bytes] = []
        self.replay: list[bytes] | None = []
        self.replay_bytes = 0
        self._request_done = False
        self._response_done = False
        self._finished = False
        self._drained = 0
        self.chunked_out = False
        self.close_after = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = 0
        self.error = ""
        self.attempts = 0
        self.upstream_address: tuple[str, int] | None = None
        """Formatted only for the access log."""
        self.bad_request_after: bytes | None = None

    # --------------------------------------------------------- to subclass

    @abstractmethod
    def start(self) -> None:
        """Decide where the request goes (or answer it) and make the first attempt."""

    @abstractmethod
    def _attempt(self) -> None:
        """Get a connection for the request and send it."""

    @abstractmethod
    def _attempt_failed(self, outcome: int, status: int, error: str) -> None:
        """An attempt failed before a response: retry, or answer ``status``."""

    def _end_attempt(self, outcome: int | None) -> None:
        """The current attempt ended (``outcome`` for outlier detection, or None).
        Nothing to do by default: only outbound exchanges count attempts."""
        return

    def _released(self) -> None:
        """The exchange is over: release what ``start`` counted. Nothing by default:
        only outbound exchanges take breaker and budget slots."""
        return

    @abstractmethod
    def _report(self) -> None:
        """Telemetry and the access log, once per exchange."""

    # ----------------------------------------------------------- request

    def send_up(self, data: bytes) -> None:
        replay = self.replay
        if replay is not None:
            self.replay_bytes += len(data)
            if self.replay_bytes <= REPLAY_LIMIT:
                replay.append(data)
            else:
                self.replay = None
        self._up.append(data)
        if self.server is None:
            self._up_bytes += len(data)
            if self._up_bytes > REPLAY_LIMIT:
                self.client.pause(_PAUSE_PENDING)

    def request_body(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self._response_done:
            self._drained += len(data)
            if self._drained > DRAIN_LIMIT:
                self.close_after = True
                self.client.close()
            return
        self.send_up(chunk(data) if self.head.framing == CHUNKED else data)

    def request_end(self) -> None:
        self._request_done = True
        if self._response_done:
            self._maybe_finish()
            return
        if self.head.framing == CHUNKED:
            self.send_up(LAST_CHUNK)

    def flush(self) -> None:
        up = self._up
        if up:
            server = self.server
            if server is not None:
                server.transport.write(up[0] if len(up) == 1 else b"".join(up))
                up.clear()
        down = self._down
        if down:
            if not self.client.closed:
                self.client.transport.write(down[0] if len(down) == 1 else b"".join(down))
            down.clear()

    # --------------------------------------------------------- upstream

    def attach(self, server: _Server) -> None:
        """Send the request (so far) on ``server``."""
        self.server = server
        self.attempts += 1
        server.exchange = self
        server.no_body = self.head.method == "HEAD"
        self._up_bytes = 0
        client = self.client
        if client._paused:
            client.resume(_PAUSE_PENDING)
        self.flush()

    def _restage(self) -> bool:
        """Stage the whole request again for another attempt; False if not kept."""
        if self.replay is None:
            return False
        self._up = list(self.replay)
        self._up_bytes = self.replay_bytes
        return True

    def _detach(self, reusable: bool) -> None:
        """Stop using the current upstream connection: back to its pool (once its
        response has been read, if ``reusable``) or closed."""
        server = self.server
        if server is None:
            return
        self.server = None
        server.exchange = None
        if reusable:
            server.draining = True  # message_complete gives it back
        else:
            server.transport.abort()
        self.client.resume(_PAUSE_PEER)

    def pause_server(self) -> None:
        server = self.server
        if server is not None and not server.paused:
            server.paused = True
            server.transport.pause_reading()

    def resume_server(self) -> None:
        server = self.server
        if server is not None and server.paused:
            server.paused = False
            server.transport.resume_reading()

    def response_head(self, server: _Server, head: ResponseHead) -> None:
        if head.informational:
            if self.response is None:
                self._down.append(informational_bytes(head))
            return
        if head.status == 101:
            upgrade = self.head.upgrade
            if upgrade is None:
                raise RemoteProtocolError("upgrade", "101 to a request that did not ask for it")
            if head.upgrade is None:
                head.upgrade = upgrade
        if not self._accept_response(head):
            return
        if self._deadlines is not None or self._retry_handle is not None:
            self._cancel_timers()
        self.status = head.status
        self.response = head
        client = self.client
        http10 = self.head.version == b"1.0"
        self.chunked_out = head.framing in (CHUNKED, UNTIL_CLOSE) and not http10
        self.close_after = close = (
            self.close_after
            or not self.head.keep_alive
            or (head.framing == UNTIL_CLOSE and http10)
            or self.bad_request_after is not None
            or client.closed
            # an upgrade that was declined: the client's parser stopped at its request
            or (self.head.upgrade is not None and head.status != 101)
        )
        self._down.append(
            response_bytes(head, chunked=self.chunked_out, close=close, http10_client=http10)
        )

    def _accept_response(self, head: ResponseHead) -> bool:
        """Whether to forward this response (False: retried instead)."""
        return True

    def response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self._down.append(chunk(data) if self.chunked_out else data)

    def response_end(self, server: _Server, keep_alive: bool) -> None:
        if self.status == 101:
            self.switch(server)
            return
        if self.chunked_out:
            self._down.append(LAST_CHUNK)
        self.flush()
        if self._idle_watch is not None:
            self._unwatch_idle()
        # (the attempt's end: the outbound override has done it; nothing inbound)
        self.server = None
        server.exchange = None
        if keep_alive and self._request_done and not server.transport.is_closing():
            server.pool.put(server)
        else:
            server.close()
        client = self.client
        if client._paused:
            client.resume(_PAUSE_PEER)
        self._response_done = True
        self._maybe_finish()

    def switch(self, server: _Server) -> None:
        """The 101 to an upgrade request went downstream: from now on the client and
        ``server`` are spliced by a :class:`_Tunnel`. The exchange is over as a
        request (timers, breaker and budget slots released); it is reported when
        the tunnel closes, with the tunnel's bytes and duration (as Envoy does)."""
        self.flush()
        if self._idle_watch is not None:
            self._unwatch_idle()
        if self._deadlines is not None or self._retry_handle is not None:
            self._cancel_timers()
        self.server = None
        server.exchange = None
        self._response_done = self._request_done = self._finished = True
        self._released()
        tunnel = _Tunnel(self, self.client, server)
        server.tunnel = tunnel
        self.client.tunnel_to(tunnel)

    def server_lost(self, server: _Server) -> None:
        """The upstream connection closed while this exchange used it."""
        self.server = None
        head = self.response
        if head is not None and head.framing == UNTIL_CLOSE and not self._response_done:
            # The close is the end of the body.
            if self.chunked_out:
                self._down.append(LAST_CHUNK)
            self.flush()
            self._end_attempt(None)
            self._response_done = True
            self._maybe_finish()
            return
        self.server_failed(server, "upstream connection reset")

    def server_failed(self, server: _Server, detail: str) -> None:
        self.server = None
        server.exchange = None
        if self.response is not None:
            # Part of the response went downstream: only a close can tell.
            self._end_attempt(RESET)
            self.error = f"reset: {detail}"
            self.close_after = True
            self.client.transport.abort()
            self.client.closed = True
            self._response_done = True
            self._request_done = True
            self._maybe_finish()
            return
        if server.reused and self.attempts == 1 and not self.bytes_out and self._restage():
            # A pooled connection closed as we reused it: once more on a new one.
            self._end_attempt(None)
            self._attempt_fresh()
            return
        self._attempt_failed(RESET, 502, f"reset: {detail}")

    def _attempt_fresh(self) -> None:
        self._attempt()

    # ------------------------------------------------------------ ending

    def respond_error(self, status: int, error: str, retry_after: int | None = None) -> None:
        """A proxy-generated response (see the module docstring)."""
        self._cancel_timers()
        self.status = status
        self.error = error
        if self.response is not None or self.client.closed:
            if not self.client.closed:
                self.client.closed = True
                self.client.transport.abort()
            self._response_done = self._request_done = True
            self._maybe_finish()
            return
        close = (
            not self.head.keep_alive
            or self.bad_request_after is not None
            or self.head.upgrade is not None  # the client's parser stopped at it
        )
        self.close_after = close
        self._down.append(error_response(status, error, close=close, retry_after=retry_after))
        self.flush()
        self._response_done = True
        self._up.clear()
        self.replay = None
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._finished or not self._response_done:
            return
        if not self._request_done and not self.client.closed:
            return  # still draining the request body (see request_body)
        self._finished = True
        if self._deadlines is not None or self._retry_handle is not None:
            self._cancel_timers()
        if self._idle_watch is not None:
            self._unwatch_idle()
        self._released()
        self._report()
        self.client.exchange_finished(self, not self.close_after)

    def client_lost(self) -> None:
        """The client went away: drop the upstream side, count what happened."""
        if self._finished:
            return
        if self._connecting is not None:
            self._abandon_connect()
        if self.server is not None:
            self._end_attempt(None)
            self._detach(False)
        if not self.status or not self._response_done:
            self.status = self.status or 499
            self.error = self.error or "client closed the connection"
        self._response_done = self._request_done = True
        self.close_after = True
        self._maybe_finish()

    def _abandon_connect(self) -> None:
        task = self._connecting
        self._connecting = None
        if task is not None:
            task.cancel()

    def _set_deadline(self, limit: float, deadlines: _Deadlines) -> None:
        self._limit = limit
        self._deadlines = deadlines
        deadlines.entries[self] = self.started + limit
        if deadlines._handle is None:
            deadlines.start(self.client.loop)

    def _cancel_timers(self) -> None:
        deadlines = self._deadlines
        if deadlines is not None:
            self._deadlines = None
            deadlines.entries.pop(self, None)
        handle = self._retry_handle
        if handle is not None:
            self._retry_handle = None
            handle.cancel()

    def deadline_passed(self) -> None:
        self._deadlines = None
        self._timed_out(self._limit)

    def _watch_idle(self, limit: float, deadlines: _Deadlines) -> None:
        """Limit the time between reads from upstream to ``limit`` (a route's idle
        timeout) until the response has ended."""
        self.idle_limit = limit
        self.quiet_since = self.started
        self._idle_watch = deadlines
        deadlines.watch_idle(self, self.client.loop)

    def _unwatch_idle(self) -> None:
        watch = self._idle_watch
        if watch is not None:
            self._idle_watch = None
            watch.idle.discard(self)

    def idle_passed(self) -> None:
        """Nothing read from upstream for ``idle_limit``: 504 when nothing went
        downstream yet, else the client is closed (only a close can tell then)."""
        self._idle_watch = None
        if self._finished or self._response_done:
            return
        limit = self.idle_limit
        if self.response is None:
            self._timed_out(limit, "nothing read for {:g}s (idle)")
            return
        if self.server is not None:
            self._end_attempt(None)  # its status was recorded with the head
            self._detach(False)
        self._on_timeout()
        self.error = f"timeout: nothing read for {limit:g}s (idle)"
        self.close_after = True
        client = self.client
        if not client.closed:
            client.closed = True
            client.transport.abort()
        self._response_done = self._request_done = True
        self._maybe_finish()

    def _timed_out(self, limit: float, detail: str = "no response within {:g}s") -> None:
        if self._finished or self.response is not None:
            return
        if self._connecting is not None:
            self._abandon_connect()
        if self.server is not None:
            self._detach(False)
        self._end_attempt(TIMEOUT)
        self._on_timeout()
        self.respond_error(504, "timeout: " + detail.format(limit))

    @abstractmethod
    def _on_timeout(self) -> None:
        """A deadline passed, just before the 504 is sent: count the timeout."""

    def _log_record(
        self,
        direction: Direction,
        source: str,
        source_id: str,
        destination: str,
        route: str,
        cluster: str,
    ) -> dict[str, object]:
        return {
            "time": time.time(),
            "direction": direction,
            "source": source,
            "source_id": source_id,
            "destination": destination,
            "route": route,
            "cluster": cluster,
            "upstream": "{}:{}".format(*self.upstream_address) if self.upstream_address else "",
            "protocol": "http",
            "method": self.head.method,
            "path": self.head.target.decode("latin-1"),
            "status": self.status,
            "duration_ms": round((self.client.loop.time() - self.started) * 1000.0, 3),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "attempts": self.attempts,
            "error": self.error,
        }


class _Tunnel:
    """A client connection and an upstream connection after a 101 (WebSocket, h2c):
    bytes are passed on untouched both ways, as in ``proxy/l4``. Reads count as the
    client's activity (the listener's idle timeout closes a silent tunnel); a full
    write buffer on one side pauses reading on the other; either side closing
    closes both, and the upgrade request is reported then."""

    __slots__ = ("client", "exchange", "over", "server")

    def __init__(self, exchange: _Exchange, client: _Client, server: _Server) -> None:
        self.exchange = exchange
        self.client = client
        self.server = server
        self.over = False

    def from_client(self, data: bytes) -> None:
        self.exchange.bytes_in += len(data)
        server = self.server
        if not server.transport.is_closing():
            server.transport.write(data)

    def from_server(self, data: bytes) -> None:
        self.exchange.bytes_out += len(data)
        client = self.client
        client.touched = True
        if not client.closed:
            client.transport.write(data)

    def pause_server(self) -> None:
        server = self.server
        if not server.paused:
            server.paused = True
            server.transport.pause_reading()

    def resume_server(self) -> None:
        server = self.server
        if server.paused:
            server.paused = False
            server.transport.resume_reading()

    def close(self) -> None:
        """One side is gone (or closing): close the other after what it has
        buffered, and report the exchange once."""
        if self.over:
            return
        self.over = True
        self.client.close()
        if not self.server.transport.is_closing():
            self.server.close()
        self.exchange._report()


# ---------------------------------------------------------------------------- inbound


class _InboundConnection(_Frontend):
    """One mTLS connection taken over from the L4 inbound listener."""

    __slots__ = (
        "current_service",
        "inbound",
        "on_close",
        "peer_id",
        "service",
        "service_runtime",
        "source",
        "source_header",
        "target",
        "verdict",
        "verdict_runtime",
    )

    def __init__(
        self,
        inbound: HttpInbound,
        service: LocalService,
        target: InboundTarget,
        peer_id: str | None,
        on_close: Callable[[], None] | None,
    ) -> None:
        self.inbound = inbound
        self.service = service
        self.target = target
        self.peer_id = peer_id
        self.source = inbound._runtime.source(peer_id)
        self.source_header = b"%b: %b\r\n" % (SOURCE_HEADER, self.source.encode("latin-1"))
        self.on_close = on_close
        self.current_service = service
        self.service_runtime: InboundRuntime | None = None
        """The runtime ``current_service`` was looked up in."""
        self.verdict: Verdict | None = None
        self.verdict_runtime: InboundRuntime | None = None
        """The runtime ``verdict`` was decided with: a verdict that does not depend on
        the request (no L7 intention decides for this source) holds for every request
        of the connection until the next snapshot."""

    def authorize(self, runtime: InboundRuntime, service: str, head: RequestHead) -> Verdict:
        if self.verdict_runtime is runtime and self.verdict is not None:
            return self.verdict
        rule = runtime.rule(self.source, service)
        if rule is not None and rule.permissions:
            return runtime.authorize_request(self.peer_id, service, head.request())
        verdict = self.verdict = runtime.authorize_request(self.peer_id, service, head.request())
        self.verdict_runtime = runtime
        return verdict

    def client_closed(self, client: _Client) -> None:
        self.inbound._clients.discard(client)
        if self.on_close is not None:
            self.on_close()


class _InboundExchange(_Exchange):
    __slots__ = ("_address", "_connection", "_fresh", "_runtime", "_service")

    def __init__(self, client: _Client, head: RequestHead, connection: _InboundConnection) -> None:
        super().__init__(client, head)
        self._connection = connection
        self._fresh = False

    def start(self) -> None:
        connection = self._connection
        inbound = connection.inbound
        runtime = self._runtime = inbound._runtime
        if connection.service_runtime is runtime:
            service = connection.current_service
        else:  # a new snapshot: look the service up once for the connection
            service = runtime.service(connection.service.name) or connection.service
            connection.current_service = service
            connection.service_runtime = runtime
        self._service = service
        name = service.name
        head = self.head
        verdict = connection.authorize(runtime, name, head)
        if not verdict.allowed:
            inbound._telemetry.denied(connection.source, name, "l7")
            self.respond_error(403, f"intention: denied by {verdict.rule}")
            return
        wait = 0.0
        if service.rate_limit is not None or service.rate_limit_per_source is not None:
            wait = runtime.rate_limit(connection.source, name, self.client.loop.time())
        if wait > 0:
            inbound._telemetry.rate_limited(connection.source, name)
            self.respond_error(429, f"rate-limit: {name}", retry_after=max(1, math.ceil(wait)))
            return
        addresses = connection.target.addresses
        address = self._address = (
            addresses[0] if len(addresses) == 1 else runtime.local_address(connection.target)
        )
        self.upstream_address = address
        # The head goes first in _up: body pieces parsed later are appended after it.
        self._up.insert(0, request_bytes(head, head.target, connection.source_header))
        if self.replay is not None:
            self.replay.insert(0, self._up[0])
            self.replay_bytes += len(self._up[0])
        if service.request_timeout > 0:
            self._set_deadline(service.request_timeout, inbound._deadlines)
        self._attempt()

    def _attempt(self) -> None:
        pool = self._connection.inbound._pool
        server = None if self._fresh else pool.take(self._address)
        if server is not None:
            self.attach(server)
            return
        loop = self.client.loop
        self._connecting = loop.create_task(self._connect(loop, pool))

    def _attempt_fresh(self) -> None:
        self._fresh = True
        self._attempt()

    async def _connect(self, loop: asyncio.AbstractEventLoop, pool: _Pool) -> None:
        address = self._address
        timeout = self._service.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                _, server = await loop.create_connection(
                    lambda: _TcpServer(pool, address), *address
                )
        except (OSError, TimeoutError) as exc:
            self._connecting = None
            if self._finished:
                return
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            self._attempt_failed(
                CONNECT_FAILED, 503, f"local-unavailable: {address[0]}:{address[1]}: {reason}"
            )
            return
        self._connecting = None
        if self._finished or self.response is not None:
            pool.put(server)
            return
        self.attach(server)

    def _attempt_failed(self, outcome: int, status: int, error: str) -> None:
        if outcome == RESET:
            error = error.replace("reset:", "reset: local instance", 1)
        self.respond_error(status, error)

    def _on_timeout(self) -> None:
        self._connection.inbound._telemetry.timeout(self._connection.source, self._service.name)

    def _report(self) -> None:
        connection = self._connection
        inbound = connection.inbound
        seconds = self.client.loop.time() - self.started
        name = connection.service.name
        inbound._telemetry.request(
            "inbound", connection.source, name, self.status, seconds, self.bytes_in, self.bytes_out
        )
        if inbound._access_log.sampled():
            record = self._log_record(
                "inbound", connection.source, connection.peer_id or "", name, "", ""
            )
            inbound._access_log.log(record)


_InboundConnection.exchange_class = _InboundExchange


class HttpInbound:
    """One per inbound listener: HTTP connections for services whose protocol is http."""

    def __init__(
        self,
        runtime: InboundRuntime,
        telemetry: Telemetry,
        access_log: AccessLogger,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._runtime = runtime
        self._telemetry = telemetry
        self._access_log = access_log
        self._rng = rng or random.Random()
        self._reads = _ReadBuffer()
        self._pool = _Pool()
        self._deadlines = _Deadlines()
        self._clients: set[_Client] = set()
        self._idle = _IdleClients(self._clients, self._idle_timeout)

    def update(self, runtime: InboundRuntime) -> None:
        """A new snapshot: new requests use it. Pooled connections to local
        addresses no target has any more are closed (busy ones once done), and so
        are the tunnels (WebSockets) whose upgrade request it denies."""
        previous = self._runtime
        self._runtime = runtime
        if runtime is not previous:
            self._revoke_tunnels(runtime)
        if previous.inbound is not runtime.inbound:
            wanted: set[object] = {
                address
                for target in runtime.inbound.targets.values()
                for address in target.addresses
            }
            self._pool.retire(wanted)
            self._idle.reschedule()

    def _revoke_tunnels(self, runtime: InboundRuntime) -> None:
        """Requests are authorized one by one, but a tunnel outlives its request: as
        for tcp connections (``proxy.l4``), each open tunnel's upgrade request is
        authorized again with the new intentions, and closed when now denied."""
        for client in list(self._clients):
            tunnel = client.tunnel
            if tunnel is None or tunnel.over:
                continue
            connection = cast(_InboundConnection, client._frontend)
            service = connection.current_service.name
            head = tunnel.exchange.head
            verdict = runtime.authorize_request(connection.peer_id, service, head.request())
            if verdict.allowed:
                continue
            self._telemetry.denied(connection.source, service, "l7")
            tunnel.exchange.error = f"intention: denied by {verdict.rule}"
            tunnel.close()

    def _idle_timeout(self, client: _Client) -> float:
        connection = cast(_InboundConnection, client._frontend)
        name = connection.service.name
        service = self._runtime.service(name) or connection.service
        return service.idle_timeout

    def take_over(
        self,
        transport: asyncio.Transport,
        service: LocalService,
        target: InboundTarget,
        peer_id: str | None,
        *,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        """From now on ``transport`` (mTLS, handshake done, nothing read) speaks HTTP
        to ``service``. ``on_close`` is called once when the connection closes (the
        caller's connection accounting: it no longer sees ``connection_lost``)."""
        connection = _InboundConnection(self, service, target, peer_id, on_close)
        client = _TlsClient(connection, self._reads)
        self._clients.add(client)
        self._idle.added(client)
        transport.set_protocol(client)
        client.connection_made(transport)
        if not transport.is_reading():
            transport.resume_reading()

    def open_connections(self) -> int:
        return len(self._clients)

    async def aclose(self) -> None:
        """Close idle pooled connections and open ones."""
        for client in list(self._clients):
            client.transport.abort()
        self._pool.close()
        self._deadlines.close()
        self._idle.close()
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- outbound


class _OutboundExchange(_Exchange):
    __slots__ = (
        "_cluster",
        "_counts_active",
        "_endpoint",
        "_fresh",
        "_hash_key",
        "_in_retry",
        "_listener",
        "_pending",
        "_retries",
        "_route",
        "_runtime",
        "_tried",
        "_try_timer",
    )

    def __init__(self, client: _Client, head: RequestHead, listener: HttpOutboundListener) -> None:
        super().__init__(client, head)
        self._listener = listener
        self._runtime = listener._runtime
        self._cluster: ClusterRuntime | None = None
        self._route: Route | None = None
        self._endpoint: Endpoint | None = None
        self._tried: list[Endpoint] | None = None
        self._retries = 0
        self._in_retry = False
        self._counts_active = False
        self._pending = False
        self._fresh = False
        self._try_timer: asyncio.TimerHandle | None = None
        self._hash_key: int | None = None

    def start(self) -> None:
        listener = self._listener
        runtime = self._runtime = listener._runtime
        upstream = runtime.upstream
        head = self.head
        fixed = listener._fixed
        request = None
        if fixed is not None and fixed[0] is runtime:
            route = self._route = fixed[1]
            cluster = fixed[2]
        else:
            request = head.request() if listener._needs_request else None
            route = self._route = runtime.route(request)
            cluster = runtime.resolve(runtime.split(route), self.client.loop.time())
        if cluster is None:
            listener._telemetry.no_endpoint(upstream.source, upstream.destination)
            self.respond_error(503, f"no-healthy-endpoint: {upstream.destination}")
            return
        name = cluster.cluster.name
        limit = cluster.breaker.allow_request()
        if limit is not None:
            listener._telemetry.breaker_trip(upstream.destination, name, limit)
            self.respond_error(503, f"circuit-breaker: {limit} ({name})")
            return
        cluster.breaker.request_started()
        cluster.budget.request_started()
        self._cluster = cluster  # from here on, _released() ends what was started
        if cluster.cluster.load_balancing.policy == "ring_hash":
            self._hash_key = runtime.hash_key(cluster, request, "127.0.0.1")
        target = head.target
        if route.prefix_rewrite:
            match = route.match
            target = rewrite_target(
                target, match.path_prefix or match.path_exact, route.prefix_rewrite
            )
        first = request_bytes(head, target)
        self._up.insert(0, first)
        if self.replay is not None:
            self.replay.insert(0, first)
            self.replay_bytes += len(first)
        if route.request_timeout > 0:
            self._set_deadline(route.request_timeout, listener._deadlines)
        if route.idle_timeout > 0:
            self._watch_idle(route.idle_timeout, listener._deadlines)
        self._attempt()

    # ----------------------------------------------------------- attempts

    def _attempt(self) -> None:
        self._retry_handle = None
        if self._finished:
            return
        cluster = self._cluster
        assert cluster is not None
        loop = self.client.loop
        now = loop.time()
        tried = self._tried
        endpoint = cluster.pick(now, tried or (), self._hash_key)
        if endpoint is None and tried:
            endpoint = cluster.pick(now, (), self._hash_key)
        if endpoint is None:
            upstream = self._runtime.upstream
            self._listener._telemetry.no_endpoint(upstream.source, upstream.destination)
            self.respond_error(503, f"no-healthy-endpoint: {cluster.cluster.name}")
            return
        if tried is None:
            self._tried = [endpoint]
        else:
            tried.append(endpoint)
        self._endpoint = endpoint
        if cluster.cluster.load_balancing.policy == "least_request":
            # Only least_request reads the in-flight counts; an Endpoint's hash is
            # computed from all its fields, twice per request otherwise.
            cluster.request_started(endpoint)
            self._counts_active = True
        if self._retries:
            self._in_retry = True
            cluster.breaker.retry_started()
            cluster.budget.retry_started()
        self.upstream_address = (endpoint.host, endpoint.port)
        assert self._route is not None
        per_try = self._route.retry.per_try_timeout
        if per_try > 0:
            self._try_timer = loop.call_later(per_try, self._try_timed_out, per_try)
        key = (endpoint.host, endpoint.port, endpoint.sni)
        listener = self._listener
        server = None if self._fresh else listener._pool.take(key)
        if server is not None:
            self.attach(server)
            return
        breaker = cluster.breaker
        limit = breaker.allow_pending() or breaker.allow_connection()
        if limit is not None:
            name = cluster.cluster.name
            listener._telemetry.breaker_trip(self._runtime.upstream.destination, name, limit)
            self._end_attempt(None)
            self.respond_error(503, f"circuit-breaker: {limit} ({name})")
            return
        breaker.pending_added()
        self._pending = True
        self._connecting = loop.create_task(self._connect(loop, endpoint, key, cluster))

    def _attempt_fresh(self) -> None:
        self._fresh = True
        self._attempt()

    async def _connect(
        self,
        loop: asyncio.AbstractEventLoop,
        endpoint: Endpoint,
        key: tuple[str, int, str],
        cluster: ClusterRuntime,
    ) -> None:
        listener = self._listener
        pool = listener._pool
        address = (endpoint.host, endpoint.port)
        context = listener._contexts.context_for(address, endpoint.sni)
        timeout = cluster.cluster.connect_timeout
        server: _Server
        try:
            async with asyncio.timeout(timeout):
                transport, server = await loop.create_connection(
                    lambda: _TlsServer(pool, key, listener._reads),
                    *address,
                    ssl=context,
                    server_hostname=endpoint.sni,
                    ssl_handshake_timeout=timeout,
                )
            ssl_object = transport.get_extra_info("ssl_object")
            if tls.peer_spiffe_id(ssl_object) != cluster.cluster.identity:
                listener._telemetry.handshake_failure("outbound", tls.WRONG_IDENTITY)
                transport.abort()
                raise _ConnectFailure("wrong server identity")
        except (OSError, TimeoutError, _ConnectFailure) as exc:
            self._connect_done()
            if isinstance(exc, TimeoutError):
                reason = "timed out"
            elif isinstance(exc, OSError) and exc.strerror:
                reason = exc.strerror
            else:
                reason = str(exc) or type(exc).__name__
            if self._endpoint is endpoint and not self._finished:
                self._attempt_failed(
                    CONNECT_FAILED,
                    503,
                    f"connect-failure: {endpoint.host}:{endpoint.port}: {reason}",
                )
            return
        self._connect_done()
        server.session_context = context
        server.breaker = cluster.breaker
        cluster.breaker.connection_opened()
        if self._finished or self._endpoint is not endpoint or self.response is not None:
            pool.put(server)
            return
        self.attach(server)

    def _connect_done(self) -> None:
        self._connecting = None
        if self._pending:
            self._pending = False
            assert self._cluster is not None
            self._cluster.breaker.pending_removed()

    def _abandon_connect(self) -> None:
        super()._abandon_connect()
        if self._pending:
            self._pending = False
            assert self._cluster is not None
            self._cluster.breaker.pending_removed()

    def _end_attempt(self, outcome: int | None) -> None:
        endpoint = self._endpoint
        if endpoint is None:
            return
        self._endpoint = None
        cluster = self._cluster
        assert cluster is not None
        timer = self._try_timer
        if timer is not None:
            self._try_timer = None
            timer.cancel()
        if self._counts_active:
            self._counts_active = False
            cluster.request_finished(endpoint)
        if self._in_retry:
            self._in_retry = False
            cluster.breaker.retry_finished()
            cluster.budget.retry_finished()
        if outcome is not None:
            self._record(cluster, endpoint, outcome)

    def _record(self, cluster: ClusterRuntime, endpoint: Endpoint, outcome: int) -> None:
        # Ejections are pulled from the runtime (Compiled.take_events) and counted by
        # the worker: the detector outlives this snapshot's objects.
        cluster.record(endpoint, outcome, self.client.loop.time())

    def _accept_response(self, head: ResponseHead) -> bool:
        cluster = self._cluster
        endpoint = self._endpoint
        assert cluster is not None
        if endpoint is not None:
            if cluster.cluster.outlier is not None:
                self._record(cluster, endpoint, head.status)
            timer = self._try_timer
            if timer is not None:
                self._try_timer = None
                timer.cancel()
        assert self._route is not None
        if head.status in self._route.retry.on_status_codes and self._may_retry(head.status):
            self._endpoint = None  # recorded above
            self._end_attempt_counts(cluster, endpoint)
            self._detach(self._request_done)
            self._retry()
            return False
        return True

    def _end_attempt_counts(self, cluster: ClusterRuntime, endpoint: Endpoint | None) -> None:
        if endpoint is not None and self._counts_active:
            self._counts_active = False
            cluster.request_finished(endpoint)
        if self._in_retry:
            self._in_retry = False
            cluster.breaker.retry_finished()
            cluster.budget.retry_finished()

    def response_end(self, server: _Server, keep_alive: bool) -> None:
        endpoint = self._endpoint
        if endpoint is not None:  # its head was recorded: end it without a record
            self._endpoint = None
            if self._counts_active or self._in_retry:
                assert self._cluster is not None
                self._end_attempt_counts(self._cluster, endpoint)
        _Exchange.response_end(self, server, keep_alive)

    def _endpoint_done(self) -> None:
        """The response head was recorded already: end the attempt without a record."""
        cluster = self._cluster
        if cluster is not None and self._endpoint is not None:
            endpoint, self._endpoint = self._endpoint, None
            self._end_attempt_counts(cluster, endpoint)

    def server_lost(self, server: _Server) -> None:
        if self.response is not None:
            self._endpoint_done()
        super().server_lost(server)

    def _may_retry(self, outcome: int) -> bool:
        route = self._route
        cluster = self._cluster
        assert route is not None and cluster is not None
        policy = route.retry
        if self.response is not None or self._retries >= policy.num_retries:
            return False
        if outcome == CONNECT_FAILED:
            if not policy.on_connect_failure:
                return False
        else:
            if outcome in (RESET, TIMEOUT) and not (
                policy.on_reset or (outcome == TIMEOUT and 504 in policy.on_status_codes)
            ):
                return False
            if not (self.head.idempotent or policy.retry_non_idempotent):
                return False
        if self.replay is None:
            return False
        if not cluster.budget.can_retry():
            return False
        limit = cluster.breaker.allow_retry()
        if limit is not None:
            upstream = self._runtime.upstream
            self._listener._telemetry.breaker_trip(
                upstream.destination, cluster.cluster.name, limit
            )
            return False
        return True

    def _retry(self) -> None:
        assert self._route is not None
        policy = self._route.retry
        self._retries += 1
        self._restage()
        upstream = self._runtime.upstream
        self._listener._telemetry.retry(upstream.source, upstream.destination)
        delay = backoff(
            self._retries,
            base=policy.backoff_base,
            max_interval=max(policy.backoff_max, policy.backoff_base),
            fraction=self._listener._rng.random(),
        )
        self._retry_handle = self.client.loop.call_later(delay, self._attempt)

    def _attempt_failed(self, outcome: int, status: int, error: str) -> None:
        self._end_attempt(outcome)
        if self._may_retry(outcome):
            self._retry()
            return
        if outcome == TIMEOUT:
            upstream = self._runtime.upstream
            self._listener._telemetry.timeout(upstream.source, upstream.destination)
        self.respond_error(status, error)

    def _try_timed_out(self, limit: float) -> None:
        self._try_timer = None
        if self._finished or self.response is not None:
            return
        if self._connecting is not None:
            self._abandon_connect()
        self._detach(False)
        self._attempt_failed(TIMEOUT, 504, f"timeout: no response within {limit:g}s (per try)")

    def _on_timeout(self) -> None:
        upstream = self._runtime.upstream
        self._listener._telemetry.timeout(upstream.source, upstream.destination)

    def _released(self) -> None:
        cluster = self._cluster
        if cluster is None:
            return
        if self._connecting is not None:
            self._abandon_connect()
        if self._endpoint is not None:
            self._end_attempt(None)
        timer = self._try_timer
        if timer is not None:
            self._try_timer = None
            timer.cancel()
        cluster.breaker.request_finished()
        cluster.budget.request_finished()

    def _report(self) -> None:
        listener = self._listener
        upstream = self._runtime.upstream
        seconds = self.client.loop.time() - self.started
        listener._telemetry.request(
            "outbound",
            upstream.source,
            upstream.destination,
            self.status,
            seconds,
            self.bytes_in,
            self.bytes_out,
        )
        if listener._access_log.sampled():
            route = self._route.name if self._route is not None else ""
            cluster = self._cluster.cluster.name if self._cluster is not None else ""
            record = self._log_record(
                "outbound", upstream.source, "", upstream.destination, route, cluster
            )
            listener._access_log.log(record)


def _needs_request(runtime: UpstreamRuntime) -> bool:
    """Whether routing looks at the request: not for one catch-all route and no
    ring hash (then ``route(None)`` is that route, and no ``HttpRequest`` is built)."""
    routes = runtime.upstream.routes
    ring = any(c.cluster.load_balancing.policy == "ring_hash" for c in runtime.clusters.values())
    return ring or len(routes) != 1 or not routes[0].match.empty


def _fixed_choice(
    runtime: UpstreamRuntime, needs_request: bool
) -> tuple[UpstreamRuntime, Route, ClusterRuntime | None] | None:
    """(runtime, route, cluster) when every request takes the same route to the same
    cluster (one catch-all route, one split target): decided once per snapshot."""
    if needs_request:
        return None
    route = runtime.route(None)
    if len(route.splits) != 1:
        return None
    cluster = runtime.split(route)
    if len(cluster.failover_chain) > 1:
        return None  # which cluster depends on ejections: resolved per request
    return runtime, route, cluster.failover_target


class HttpOutboundListener(_Frontend):
    """A loopback listener for one (source service, upstream) in http mode."""

    exchange_class = _OutboundExchange

    def __init__(
        self,
        runtime: UpstreamRuntime,
        contexts: tls.ClientContexts,
        telemetry: Telemetry,
        access_log: AccessLogger,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._runtime = runtime
        self._contexts = contexts
        self._telemetry = telemetry
        self._access_log = access_log
        self._rng = rng or random.Random()
        self._reads = _ReadBuffer()
        self._pool = _Pool()
        self._deadlines = _Deadlines()
        self._clients: set[_Client] = set()
        self._idle = _IdleClients(self._clients, self._idle_timeout)
        self._server: asyncio.Server | None = None
        self._needs_request = _needs_request(runtime)
        self._fixed = _fixed_choice(runtime, self._needs_request)

    @property
    def address(self) -> Address:
        """Where it listens (the real port when the upstream's port is 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the listener is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        upstream = self._runtime.upstream
        self._server = await asyncio.get_running_loop().create_server(
            self._accepted,
            upstream.host,
            upstream.port,
            backlog=DEFAULT_BACKLOG,
            reuse_address=True,
        )

    def _accepted(self) -> asyncio.BaseProtocol:
        client = _TcpClient(self)
        self._clients.add(client)
        self._idle.added(client)
        upstream = self._runtime.upstream
        self._telemetry.connection_opened("outbound", upstream.source, upstream.destination)
        return client

    def update(self, runtime: UpstreamRuntime, contexts: tls.ClientContexts) -> None:
        """New routes, clusters or certificates, for new requests. New certificates:
        pooled connections made with the old ones are not reused; pooled connections
        to endpoints no cluster has any more are closed (busy ones once done)."""
        previous = self._runtime
        self._runtime = runtime
        self._needs_request = _needs_request(runtime)
        self._fixed = _fixed_choice(runtime, self._needs_request)
        if contexts is not self._contexts:
            self._contexts = contexts
            self._pool.generation += 1
        if previous.upstream.clusters is not runtime.upstream.clusters:
            wanted: set[object] = {
                (e.host, e.port, e.sni)
                for cluster in runtime.clusters.values()
                for e in cluster.cluster.endpoints
            }
            self._pool.retire(wanted)
        if previous.upstream.idle_timeout != runtime.upstream.idle_timeout:
            self._idle.reschedule()

    def _idle_timeout(self, client: _Client) -> float:
        return self._runtime.upstream.idle_timeout

    def client_closed(self, client: _Client) -> None:
        self._clients.discard(client)
        upstream = self._runtime.upstream
        self._telemetry.connection_closed("outbound", upstream.source, upstream.destination)

    def open_connections(self) -> int:
        return len(self._clients)

    async def aclose(self) -> None:
        """Stop accepting; drop open and pooled connections."""
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            client.transport.abort()
        self._pool.close()
        self._deadlines.close()
        self._idle.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
