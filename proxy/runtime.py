"""A snapshot compiled into the objects the data path asks on every connection and
request. Pure: no asyncio, no clock — callers pass ``now`` (loop time, monotonic s).

INTERFACE DRAFT (session 2026-11-26): signatures and semantics are fixed here so the
L4/L7 data path and the worker can be built against them in parallel; bodies are
filled in by the runtime's own change.

Theory of operation
-------------------
:func:`compile_snapshot` turns a :class:`proxy.snapshot.Snapshot` into a
:class:`Compiled`: one :class:`InboundRuntime` (intentions, rate limits, local
targets) and one :class:`UpstreamRuntime` per outbound listener (routes, splits,
clusters). State that must survive a snapshot — token buckets, circuit-breaker and
retry-budget counts, outlier-detection history, round-robin positions — is carried
over from the previous ``Compiled`` for the services, (source, destination) pairs and
clusters whose names persist, so a new snapshot (which arrives for every catalog
change) does not reset a rate limit or forget an ejection; in-flight counts of
requests that started under the old snapshot are released on the same objects.

The per-request path (``route`` → ``split`` → ``resolve`` → ``ClusterRuntime.pick``)
does dictionary lookups and one RNG draw; everything else is done at compile time.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from proxy.match import HttpRequest
from proxy.resilience import CircuitBreaker, OutlierDetector, RetryBudget
from proxy.snapshot import (
    Cluster,
    Endpoint,
    Inbound,
    InboundTarget,
    LocalService,
    Route,
    Snapshot,
    Upstream,
)

if TYPE_CHECKING:
    from random import Random

#: Outcomes reported to ``ClusterRuntime.record`` besides HTTP statuses (the same
#: values as ``proxy.resilience``'s ``CONNECT_FAILED``/``TIMEOUT``/``RESET``).


class Verdict(NamedTuple):
    allowed: bool
    rule: str
    """What decided: an intention's name (``web => api``), or ``default deny`` /
    ``default allow`` when none matched. Goes in the ``x-meshnode-error`` header and
    in logs on a denial."""


def source_service(spiffe_id: str | None, trust_domain: str) -> str:
    """The service name in ``spiffe://<trust_domain>/ns/<ns>/dc/<dc>/svc/<name>``;
    "" for None, another trust domain, or another shape (agents' IDs)."""
    raise NotImplementedError


class InboundRuntime:
    """The host's inbound port: which local service an SNI name reaches, who may
    call it, and its rate limits."""

    inbound: Inbound
    trust_domain: str

    def target(self, sni: str) -> InboundTarget | None:
        """The local target for a TLS server name, None when unknown."""
        raise NotImplementedError

    def service(self, name: str) -> LocalService | None:
        raise NotImplementedError

    def authorize_connection(self, peer_id: str | None, service: str) -> Verdict:
        """At connect (L4 services, and the connection of an L7 service): the first
        intention whose source matches (exact name, then ``*``, in the snapshot's
        order) decides; an L7 intention (permissions) lets the connection in; no
        match → ``default_allow``. A peer without a SPIFFE service ID (or from
        another trust domain) only matches ``*`` rules."""
        raise NotImplementedError

    def authorize_request(self, peer_id: str | None, service: str, request: HttpRequest) -> Verdict:
        """Per HTTP request: as ``authorize_connection``, and for an L7 intention the
        first permission whose match holds decides; none holds → denied (rule name
        is the intention's)."""
        raise NotImplementedError

    def rate_limit(self, source: str, service: str, now: float) -> float:
        """Take a token from the service's bucket and the (source, service) bucket:
        0.0 when the request may go; else the seconds until one would be available
        (for ``Retry-After``, rounded up by the caller); nothing is taken then."""
        raise NotImplementedError

    def local_address(self, target: InboundTarget) -> tuple[str, int]:
        """The next local instance of ``target`` (round robin)."""
        raise NotImplementedError


class ClusterRuntime:
    """One cluster: endpoints, balancer, breaker, retry budget, outlier detector."""

    cluster: Cluster
    breaker: CircuitBreaker
    budget: RetryBudget
    outlier: OutlierDetector[Endpoint] | None
    active: dict[Endpoint, int]
    """Requests in flight per endpoint (least_request reads it; the data path adds
    and removes)."""

    def pick(
        self, now: float, exclude: Collection[Endpoint] = (), hash_key: int | None = None
    ) -> Endpoint | None:
        """An endpoint that is neither ejected nor in ``exclude``; None when none is.
        (When every endpoint is ejected, an ejected one is still better than none:
        falls back to ignoring ejections, as Envoy's panic threshold does.)"""
        raise NotImplementedError

    def record(self, endpoint: Endpoint, outcome: int, now: float) -> None:
        """An exchange's outcome for outlier detection: an HTTP status, or 200 for
        a TCP connection made, or ``CONNECT_FAILED``/``TIMEOUT``/``RESET``."""
        raise NotImplementedError

    def has_endpoints(self) -> bool:
        raise NotImplementedError

    def timer(self) -> float | None:
        """When ``handle_timer`` is due next (outlier returns), loop time."""
        raise NotImplementedError

    def handle_timer(self, now: float) -> None:
        raise NotImplementedError


class UpstreamRuntime:
    """One outbound listener."""

    upstream: Upstream
    clusters: Mapping[str, ClusterRuntime]

    def route(self, request: HttpRequest | None) -> Route:
        """The first route whose match holds (None, for TCP: the first route)."""
        raise NotImplementedError

    def split(self, route: Route) -> ClusterRuntime:
        """A cluster for one request (or TCP connection) by the route's weights."""
        raise NotImplementedError

    def resolve(self, cluster: ClusterRuntime) -> ClusterRuntime | None:
        """``cluster`` when it has endpoints, else its first failover cluster that
        has; None when no cluster in the chain has an endpoint."""
        raise NotImplementedError

    def hash_key(
        self, cluster: ClusterRuntime, request: HttpRequest | None, source_ip: str
    ) -> int | None:
        """ring_hash: the hash of the first ``hash_on`` item present; None otherwise."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Compiled:
    snapshot: Snapshot
    inbound: InboundRuntime | None
    upstreams: Mapping[tuple[str, int], UpstreamRuntime]
    """By listener address (host, port)."""


def compile_snapshot(snapshot: Snapshot, previous: Compiled | None, rng: Random) -> Compiled:
    """``snapshot`` compiled, carrying state over from ``previous`` (see module doc)."""
    raise NotImplementedError
