"""Finding a cluster to join: mDNS on a LAN, ``retry_join`` addresses elsewhere.

Theory of operation
-------------------
Discovery only *bootstraps* membership (DESIGN.md, Agent: Discovery). Once an agent has
joined one member, SWIM gossip tells it about everyone else and stays the authority on
who is alive; an mDNS record says nothing about health. So both mechanisms here end in
the same place: a call to the gossip transport's ``join``.

``MdnsDiscovery`` (RFC 6762 multicast DNS + RFC 6763 DNS-SD, through python-zeroconf):

* registers ``<node>._meshnode._tcp.local.`` with the *advertise* address and gossip
  port, and TXT ``cluster``, ``node`` and ``v`` (record format version);
* browses ``_meshnode._tcp.local.``; the browser's handler is synchronous and runs on
  the event loop, so it only puts the service name on a bounded queue;
* one worker task resolves each queued name (SRV/TXT/A, timeout in *milliseconds* in
  zeroconf's API), drops records of other clusters and our own, and calls
  ``on_peer((host, port))`` -- one peer at a time, at most once per ``repeat_interval``
  per address, and at least ``min_spacing`` seconds apart. A peer that disappears
  (mDNS goodbye or TTL expiry) is forgotten, so it is offered again when it returns.

zeroconf listens on exactly one interface, given by its IPv4 address, never
``InterfaceChoice.All``: on multi-NIC and Docker hosts "all" mixes broadcast domains and
has caused multicast storms (python-zeroconf#330, #54). IPv4 only: IPv6 loopback sockets
log "Network is unreachable" with ``IPVersion.All`` (python-zeroconf#1357).

The *bind* interface and the *advertised* address differ behind NAT or in a container:
we listen where we are, and tell peers where they can reach us.

``RetryJoiner`` is Consul's ``retry_join``: call ``join(addresses)`` until it succeeds,
sleeping with capped exponential backoff and jitter in between, so that agents started
together do not retry in lockstep. Its delays come from ``delay(attempt)``, a pure
function of the attempt number and the injected ``random.Random``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

import structlog
from zeroconf import IPVersion, NonUniqueNameException, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from gossip.events import Address
from meshnode.errors import MeshError

log = structlog.get_logger()

#: The DNS-SD service type every meshnode agent registers and browses.
SERVICE_TYPE: Final = "_meshnode._tcp.local."
#: Version of our TXT record layout; a peer with another version is ignored.
RECORD_VERSION: Final = "1"
#: Longest label DNS allows (RFC 1035 §2.3.4); an instance name is one label.
MAX_INSTANCE_LABEL: Final = 63
#: Service names waiting to be resolved. Each is one DNS-SD instance; a LAN with more
#: agents announcing at once than this just gets the rest on the browser's next
#: announcement (the browser re-reports on every update). Bounded, as every queue.
MAX_PENDING: Final = 256
#: How long to wait for a peer's SRV/TXT/A answers (zeroconf takes milliseconds).
RESOLVE_TIMEOUT_MS: Final = 3000
#: Offer the same peer again only after this long (it may have restarted, or our join
#: may have failed). Gossip does the rest; mDNS is only a hint.
REPEAT_INTERVAL: Final = 30.0
#: Minimum time between two ``on_peer`` calls, so a burst of announcements (a whole
#: rack booting) does not become a burst of push-pull exchanges.
MIN_SPACING: Final = 0.1

PeerCallback = Callable[[Address], Awaitable[None]]
JoinFunction = Callable[[Sequence[str]], Awaitable[bool]]


class DiscoveryError(MeshError):
    """mDNS discovery could not start (bad interface, name taken, no multicast)."""


@dataclass(frozen=True, slots=True)
class DiscoveryStatistics:
    """What ``MdnsDiscovery`` has seen so far (trio's ``statistics()`` convention)."""

    resolved: int
    """Other agents' service instances resolved (any cluster)."""
    offered: int
    """``on_peer`` calls made."""
    other_cluster: int
    """Instances ignored because their TXT ``cluster`` differs from ours."""
    unusable: int
    """Instances ignored because they did not resolve or had bad records."""
    dropped: int
    """Browser notifications dropped because the queue was full."""


def _instance_label(node: str) -> str:
    # A node name may contain dots (host.example.com); in an instance label a dot would
    # be a label separator, and zeroconf rejects the name. Replace, keep it readable.
    label = node.replace(".", "-")
    if not label or len(label.encode()) > MAX_INSTANCE_LABEL:
        raise ValueError(f"node name {node!r} does not fit a DNS-SD instance label")
    return label


def _ipv4(text: str, what: str) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{what} must be an IPv4 address, not {text!r}") from None
    if not isinstance(address, ipaddress.IPv4Address):
        raise ValueError(f"{what} must be an IPv4 address (mDNS runs IPv4-only), not {text!r}")
    return str(address)


class MdnsDiscovery:
    """Advertise this agent over mDNS and offer same-cluster peers to ``on_peer``.

    Args:
        node: Our gossip member name (also the DNS-SD instance name).
        cluster: Cluster name; peers with another one are never offered.
        advertise_host: IPv4 address peers should use to reach our gossip port.
        gossip_port: Our gossip port (UDP and TCP).
        on_peer: ``await on_peer((host, port))`` for each newly seen same-cluster peer;
            typically ``transport.join``. Exceptions are logged, never propagated.
        interface: IPv4 address of the one interface to run mDNS on; defaults to
            ``advertise_host``. Must be set when the advertised address is not local
            (NAT, containers). A wildcard address is refused.
        repeat_interval: Seconds before the same peer may be offered again.
        min_spacing: Minimum seconds between two ``on_peer`` calls.

    Call ``start()`` and later ``aclose()`` from the same task, or use ``async with``.
    """

    def __init__(
        self,
        *,
        node: str,
        cluster: str,
        advertise_host: str,
        gossip_port: int,
        on_peer: PeerCallback,
        interface: str | None = None,
        repeat_interval: float = REPEAT_INTERVAL,
        min_spacing: float = MIN_SPACING,
    ) -> None:
        self._advertise_host = _ipv4(advertise_host, "advertise_host")
        self._interface = _ipv4(interface or advertise_host, "the mDNS interface")
        if ipaddress.IPv4Address(self._interface).is_unspecified:
            raise ValueError(
                "mDNS needs one interface address, not 0.0.0.0: set the bind or "
                "advertise address (listening on all interfaces mixes networks)"
            )
        if not 0 < gossip_port < 65536:
            raise ValueError(f"gossip_port out of range: {gossip_port}")
        if not cluster:
            raise ValueError("cluster name must not be empty")
        self._node = node
        self._cluster = cluster
        self._gossip_port = gossip_port
        self._on_peer = on_peer
        self._repeat_interval = repeat_interval
        self._min_spacing = min_spacing
        self._instance = f"{_instance_label(node)}.{SERVICE_TYPE}"

        self._zeroconf: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._group: asyncio.TaskGroup | None = None
        self._worker: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[str] = asyncio.Queue(MAX_PENDING)
        self._queued: set[str] = set()  # names on the queue, so one name waits once
        self._offered_at: dict[Address, float] = {}
        self._address_of: dict[str, Address] = {}  # instance name -> address offered
        self._last_offer = float("-inf")
        self._started = False
        self._closed = False
        self._resolved = self._offered = self._other_cluster = 0
        self._unusable = self._dropped = 0

    async def __aenter__(self) -> MdnsDiscovery:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def instance_name(self) -> str:
        """Our DNS-SD instance name (``<node>._meshnode._tcp.local.``)."""
        return self._instance

    def statistics(self) -> DiscoveryStatistics:
        """Counters, as a frozen snapshot."""
        return DiscoveryStatistics(
            self._resolved, self._offered, self._other_cluster, self._unusable, self._dropped
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open zeroconf on the interface, register our service, start browsing.

        Raises:
            DiscoveryError: zeroconf cannot listen on the interface, or another host
                already announces our instance name.
        """
        if self._started or self._closed:
            raise RuntimeError("discovery already started (or closed); make a new one")
        self._started = True
        group = asyncio.TaskGroup()
        await group.__aenter__()
        self._group = group
        try:
            try:
                # One interface, IPv4 only: see the module docstring.
                self._zeroconf = AsyncZeroconf(
                    interfaces=[self._interface], ip_version=IPVersion.V4Only
                )
            except OSError as exc:
                raise DiscoveryError(
                    f"mDNS cannot listen on {self._interface}: {exc.strerror or exc}"
                ) from exc
            self._info = AsyncServiceInfo(
                SERVICE_TYPE,
                self._instance,
                addresses=[socket.inet_aton(self._advertise_host)],
                port=self._gossip_port,
                properties={"cluster": self._cluster, "node": self._node, "v": RECORD_VERSION},
                server=f"{_instance_label(self._node)}.local.",
            )
            try:
                # Registering probes the name first (RFC 6762 §8.1) and announces it.
                await self._zeroconf.async_register_service(self._info)
            except NonUniqueNameException as exc:
                raise DiscoveryError(
                    f"another host already announces {self._instance} on the LAN"
                ) from exc
            self._worker = group.create_task(self._resolve_loop())
            self._browser = AsyncServiceBrowser(
                self._zeroconf.zeroconf, [SERVICE_TYPE], handlers=[self._service_changed]
            )
        except BaseException:
            await self.aclose()
            raise
        log.info(
            "mdns_started",
            instance=self._instance,
            interface=self._interface,
            advertise=f"{self._advertise_host}:{self._gossip_port}",
            cluster=self._cluster,
        )

    async def aclose(self) -> None:
        """Unregister (peers get a goodbye), stop browsing, close zeroconf. Idempotent."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        # The worker first: it must not be halfway through a query on a closed socket.
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
        group, self._group = self._group, None
        if group is not None:
            await group.__aexit__(None, None, None)
        browser, self._browser = self._browser, None
        if browser is not None:
            await browser.async_cancel()
        aiozc, self._zeroconf = self._zeroconf, None
        info, self._info = self._info, None
        if aiozc is not None:
            if info is not None:
                # Best effort: if the network is gone, peers drop us when the TTL ends.
                with contextlib.suppress(Exception):
                    await aiozc.async_unregister_service(info)
            await aiozc.async_close()

    # ------------------------------------------------------------------ browsing

    def _service_changed(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """zeroconf's handler: synchronous, on the loop; it only records and enqueues."""
        if self._closed:
            return
        if state_change is ServiceStateChange.Removed:
            # Forget it, so it is offered at once when it comes back (restarted agent).
            address = self._address_of.pop(name, None)
            if address is not None:
                self._offered_at.pop(address, None)
            return
        if name == self._instance or name in self._queued:
            return
        try:
            self._queue.put_nowait(name)
        except asyncio.QueueFull:
            self._dropped += 1
            return
        self._queued.add(name)

    async def _resolve_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            name = await self._queue.get()
            self._queued.discard(name)
            address = await self._resolve(name)
            if address is None:
                continue
            now = loop.time()
            last = self._offered_at.get(address)
            if last is not None and now - last < self._repeat_interval:
                continue
            wait = self._last_offer + self._min_spacing - now
            if wait > 0:
                await asyncio.sleep(wait)
            self._last_offer = self._offered_at[address] = loop.time()
            self._address_of[name] = address
            self._offered += 1
            log.info("mdns_peer_found", instance=name, address=f"{address[0]}:{address[1]}")
            try:
                await self._on_peer(address)
            except Exception as exc:  # a failing callback must not stop discovery
                log.warning("mdns_peer_callback_failed", instance=name, error=repr(exc))

    async def _resolve(self, name: str) -> Address | None:
        """The gossip address of a same-cluster peer, or None (other cluster, bad)."""
        aiozc = self._zeroconf
        if aiozc is None:
            return None
        try:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            found = await info.async_request(aiozc.zeroconf, RESOLVE_TIMEOUT_MS)
            properties = info.decoded_properties if found else {}
        except Exception as exc:
            # Names and records come from anyone on the LAN: garbage is dropped and
            # counted, never allowed to stop discovery (STYLE.md rule 7).
            self._unusable += 1
            log.info("mdns_record_rejected", instance=name[:200], error=repr(exc))
            return None
        if not found:
            self._unusable += 1
            log.debug("mdns_resolve_failed", instance=name)
            return None
        self._resolved += 1
        if properties.get("v") != RECORD_VERSION:
            self._unusable += 1
            return None
        if properties.get("cluster") != self._cluster:
            self._other_cluster += 1
            log.debug("mdns_other_cluster", instance=name, cluster=properties.get("cluster"))
            return None
        if properties.get("node") == self._node:
            return None  # ourselves, seen under another instance name (a rename)
        addresses = info.parsed_addresses(IPVersion.V4Only)
        port = info.port
        if not addresses or port is None or not 0 < port < 65536:
            self._unusable += 1
            return None
        if (addresses[0], port) == (self._advertise_host, self._gossip_port):
            return None
        return addresses[0], port


class RetryJoiner:
    """Join ``addresses`` until one attempt succeeds (Consul's ``retry_join``).

    Between failed attempts it sleeps ``delay(attempt)``: ``initial_delay`` times
    ``multiplier`` per attempt, capped at ``max_delay``, then spread by ±``jitter`` (a
    fraction) drawn from ``rng`` so agents started together spread their retries.

    Args:
        addresses: Join addresses (``host``, ``host:port``), all passed to every attempt.
        join: ``await join(addresses) -> bool``; True means we are in a cluster now.
            An ``OSError`` or ``TimeoutError`` from it counts as a failed attempt.
        rng: Randomness for the jitter.
        initial_delay: Seconds after the first failure.
        max_delay: Cap on the delay before jitter.
        multiplier: Growth per failed attempt.
        jitter: Fraction of the delay to spread by, in [0, 1).
        max_attempts: Give up (``run`` returns False) after this many; None retries
            forever, as Consul does.
        sleep: Injected for tests; ``asyncio.sleep`` by default.

    ``run()`` is the whole job; cancel the task running it to stop early.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        join: JoinFunction,
        *,
        rng: random.Random,
        initial_delay: float = 1.0,
        max_delay: float = 30.0,
        multiplier: float = 2.0,
        jitter: float = 0.2,
        max_attempts: int | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not addresses:
            raise ValueError("RetryJoiner needs at least one address")
        if initial_delay <= 0 or max_delay < initial_delay or multiplier < 1:
            raise ValueError("need 0 < initial_delay <= max_delay and multiplier >= 1")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), not {jitter}")
        self._addresses = tuple(addresses)
        self._join = join
        self._rng = rng
        self._initial_delay = initial_delay
        self._max_delay = max_delay
        self._multiplier = multiplier
        self._jitter = jitter
        self._max_attempts = max_attempts
        self._sleep = sleep
        self.attempts = 0
        """Attempts made so far."""
        self.joined = False
        """True once an attempt succeeded."""

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self._max_delay, self._initial_delay * self._multiplier ** (attempt - 1))
        return base * (1 + self._jitter * self._rng.uniform(-1.0, 1.0))

    async def run(self) -> bool:
        """Attempt, back off, repeat; True once joined, False after ``max_attempts``."""
        while True:
            self.attempts += 1
            try:
                ok = await self._join(self._addresses)
            except (OSError, TimeoutError) as exc:
                ok = False
                log.info("retry_join_error", attempt=self.attempts, error=repr(exc))
            if ok:
                self.joined = True
                log.info("retry_join_succeeded", attempt=self.attempts)
                return True
            if self._max_attempts is not None and self.attempts >= self._max_attempts:
                log.warning(
                    "retry_join_gave_up", attempts=self.attempts, addresses=list(self._addresses)
                )
                return False
            delay = self.delay(self.attempts)
            log.info(
                "retry_join_failed",
                attempt=self.attempts,
                retry_in=round(delay, 3),
                addresses=list(self._addresses),
            )
            await self._sleep(delay)
