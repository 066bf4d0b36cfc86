"""A snapshot compiled into the objects the data path asks on every connection and
request. Pure: no asyncio, no clock — callers pass ``now`` (loop time, monotonic s).

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
does dictionary lookups and one RNG draw; everything else is done at compile time:

* intentions become, per local service, a map from source name to the first rule
  that matches it (exact name or ``*``, in the snapshot's precedence order) plus the
  first ``*`` rule for everyone else, so a decision is one ``dict.get``;
* a route's splits become cumulative weights (zero weights dropped) for one bisect of
  one draw, or the cluster itself when there is one split;
* failover is resolved per cluster (endpoints do not change within a snapshot) into
  its chain of clusters with endpoints; a request walks it only when the chain has
  more than one and a cluster of it is fully ejected by outlier detection;
* ``hash_on`` is parsed into (kind, name) pairs.

What is carried over, and when (identity is the name; the *configuration* must also be
the same, else the object is new — a changed limit is a new limit):

* the destination token bucket of a local service: same ``rate_limit``;
* the (source, service) buckets: same ``rate_limit_per_source``;
* per cluster, keyed by (upstream listener address, cluster name): the circuit
  breaker (same ``Limits``), the retry budget (same percent and minimum), the outlier
  detector (same ``Outlier``; it is told the new endpoints with ``set_endpoints`` when
  the new runtime is first used, so removed endpoints are forgotten and kept ones keep
  their ejections), the
  least-request ``active`` map (always: it counts real requests in flight), and the
  balancer itself when endpoints and load-balancing settings are unchanged (so round
  robin continues where it was). A *new* breaker or budget starts at zero: requests in
  flight under the old snapshot release on the ``ClusterRuntime`` they started on
  (the data path keeps a reference to it), so counts never go negative; for the time
  those requests drain, the new limit does not see them.

Compiling changes nothing in ``previous``: the worker compiles, then builds TLS
contexts and binds ports, and a failure there must leave the serving snapshot as it
was. Values the cores would refuse are found first (:func:`check_values`) and raised
as a :class:`proxy.snapshot.SnapshotError` naming the path.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, NamedTuple, TypeAlias

from proxy.balancer import (
    DEFAULT_MAXIMUM_RING_SIZE,
    NOTHING,
    RING_HASH,
    Balancer,
    build_balancer,
    stable_hash,
)
from proxy.match import HttpRequest
from proxy.resilience import (
    DEFAULT_BUDGET_PERCENT,
    DEFAULT_MIN_RETRY_CONCURRENCY,
    CircuitBreaker,
    EndpointEjected,
    EndpointReturned,
    OutlierDetector,
    RetryBudget,
    TokenBucket,
)
from proxy.snapshot import (
    Cluster,
    Endpoint,
    ForwardProxy,
    Inbound,
    InboundTarget,
    IntentionRule,
    LocalService,
    RateLimit,
    RetryPolicy,
    Route,
    Snapshot,
    SnapshotError,
    Upstream,
)

if TYPE_CHECKING:
    from random import Random

__all__ = [
    "MAX_REMEMBERED_PEERS",
    "MAX_SOURCE_BUCKETS",
    "ClusterRuntime",
    "Compiled",
    "InboundRuntime",
    "OutlierEvent",
    "UpstreamRuntime",
    "Verdict",
    "check_values",
    "compile_snapshot",
    "source_service",
]

#: Per-(source, service) token buckets kept at most, the least recently used evicted
#: first. Sources are the mesh's services plus "" (peers without a service ID), so
#: few in practice; the bound is for a mesh with very many, since a bucket is made at
#: a source's first request. An evicted source starts again with a full bucket — as a
#: source idle for ``burst / rate`` seconds would, which an LRU victim usually is.
MAX_SOURCE_BUCKETS: Final = 4096

#: Peer SPIFFE IDs whose service name ``InboundRuntime.source`` remembers; the map is
#: emptied when full. Peers are workloads with certificates from our CA (a bounded
#: set); the bound is for a CA that issues many short-lived distinct IDs.
MAX_REMEMBERED_PEERS: Final = 4096

OutlierEvent: TypeAlias = "EndpointEjected[Endpoint] | EndpointReturned[Endpoint]"

DEFAULT_ALLOW: Final = "default allow"
DEFAULT_DENY: Final = "default deny"


class Verdict(NamedTuple):
    allowed: bool
    rule: str
    """What decided: an intention's name (``web => api``), or ``default deny`` /
    ``default allow`` when none matched. Goes in the ``x-meshnode-error`` header and
    in logs on a denial."""


def source_service(spiffe_id: str | None, trust_domain: str) -> str:
    """The service name in ``spiffe://<trust_domain>/ns/<ns>/dc/<dc>/svc/<name>``;
    "" for None, another trust domain, or another shape (agents' IDs)."""
    if not spiffe_id:
        return ""
    prefix = f"spiffe://{trust_domain}/"
    if not spiffe_id.startswith(prefix):
        return ""
    parts = spiffe_id[len(prefix) :].split("/")
    if (
        len(parts) != 6
        or parts[0] != "ns"
        or parts[2] != "dc"
        or parts[4] != "svc"
        or not all(parts[1::2])
    ):
        return ""
    return parts[5]


# --------------------------------------------------------------------------- inbound


class _Intentions:
    """One local service's intentions, precomputed: the deciding rule per source."""

    __slots__ = ("by_source", "default", "wildcard")

    def __init__(self, service: LocalService) -> None:
        by_source: dict[str, IntentionRule] = {}
        wildcard: IntentionRule | None = None
        for rule in service.intentions:
            if rule.source == "*":
                if wildcard is None:
                    wildcard = rule
            elif rule.source and rule.source not in by_source:
                # A ``*`` rule earlier in precedence order already decides for it.
                by_source[rule.source] = wildcard if wildcard is not None else rule
        self.by_source = by_source
        self.wildcard = wildcard
        self.default = Verdict(
            service.default_allow, DEFAULT_ALLOW if service.default_allow else DEFAULT_DENY
        )

    def rule(self, source: str) -> IntentionRule | None:
        if source:
            return self.by_source.get(source, self.wildcard)
        return self.wildcard


_UNKNOWN_SERVICE: Final = Verdict(False, DEFAULT_DENY)


def _same_rate(a: RateLimit | None, bucket: TokenBucket | None) -> bool:
    return (
        a is not None
        and bucket is not None
        and a.requests_per_second == bucket.rate_per_s
        and float(a.burst) == bucket.burst
    )


def _wait(bucket: TokenBucket, now: float) -> float:
    """0.0 when ``bucket`` has a token at ``now``, else the seconds until it has one
    (TokenBucket's own rule, read without taking)."""
    tokens = bucket.available(now)
    if tokens >= 1.0 - 1e-9:
        return 0.0
    return (1.0 - tokens) / bucket.rate_per_s


class InboundRuntime:
    """The host's inbound port: which local service an SNI name reaches, who may
    call it, and its rate limits."""

    __slots__ = (
        "_buckets",
        "_cursors",
        "_intentions",
        "_max_source_buckets",
        "_source_buckets",
        "_sources",
        "inbound",
        "trust_domain",
    )

    inbound: Inbound
    trust_domain: str

    def __init__(
        self,
        inbound: Inbound,
        trust_domain: str,
        previous: InboundRuntime | None = None,
        *,
        max_source_buckets: int = MAX_SOURCE_BUCKETS,
    ) -> None:
        self.inbound = inbound
        self.trust_domain = trust_domain
        self._sources: dict[str, str] = {}
        self._max_source_buckets = max_source_buckets
        self._intentions = {name: _Intentions(s) for name, s in inbound.services.items()}
        self._buckets: dict[str, TokenBucket] = {}
        self._source_buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        self._cursors: dict[InboundTarget, int] = {}
        for name, service in inbound.services.items():
            limit = service.rate_limit
            if limit is None:
                continue
            old = previous._buckets.get(name) if previous is not None else None
            self._buckets[name] = (
                old
                if old is not None and _same_rate(limit, old)
                else TokenBucket(limit.requests_per_second, limit.burst)
            )
        if previous is not None:
            services = inbound.services
            for key, bucket in previous._source_buckets.items():
                local = services.get(key[1])
                if local is not None and _same_rate(local.rate_limit_per_source, bucket):
                    self._source_buckets[key] = bucket
            targets = set(inbound.targets.values())
            self._cursors = {t: c for t, c in previous._cursors.items() if t in targets}

    # ------------------------------------------------------------------- lookups

    def target(self, sni: str) -> InboundTarget | None:
        """The local target for a TLS server name, None when unknown."""
        return self.inbound.targets.get(sni)

    def service(self, name: str) -> LocalService | None:
        return self.inbound.services.get(name)

    def local_address(self, target: InboundTarget) -> tuple[str, int]:
        """The next local instance of ``target`` (round robin)."""
        addresses = target.addresses
        if len(addresses) == 1:
            return addresses[0]
        cursor = self._cursors.get(target, 0)
        if cursor >= len(addresses):
            cursor = 0
        self._cursors[target] = cursor + 1
        return addresses[cursor]

    # ------------------------------------------------------------------ intentions

    def source(self, peer_id: str | None) -> str:
        """``source_service(peer_id, trust_domain)``, remembered: a peer presents the
        same ID on every connection, and parsing it is most of an authorization."""
        if not peer_id:
            return ""
        sources = self._sources
        source = sources.get(peer_id)
        if source is None:
            if len(sources) >= MAX_REMEMBERED_PEERS:
                sources.clear()
            source = sources[peer_id] = source_service(peer_id, self.trust_domain)
        return source

    def rule(self, source: str, service: str) -> IntentionRule | None:
        """The intention that decides for ``source`` (a service name, "" for none)
        calling ``service``; None when none matches (the default applies)."""
        intentions = self._intentions.get(service)
        return intentions.rule(source) if intentions is not None else None

    def authorize_connection(self, peer_id: str | None, service: str) -> Verdict:
        """At connect (L4 services, and the connection of an L7 service): the first
        intention whose source matches (exact name, then ``*``, in the snapshot's
        order) decides; an L7 intention (permissions) lets the connection in; no
        match → ``default_allow``. A peer without a SPIFFE service ID (or from
        another trust domain) only matches ``*`` rules."""
        intentions = self._intentions.get(service)
        if intentions is None:
            return _UNKNOWN_SERVICE
        rule = intentions.rule(self.source(peer_id))
        if rule is None:
            return intentions.default
        return Verdict(rule.action != "deny", rule.name)

    def authorize_request(self, peer_id: str | None, service: str, request: HttpRequest) -> Verdict:
        """Per HTTP request: as ``authorize_connection``, and for an L7 intention the
        first permission whose match holds decides; none holds → denied (rule name
        is the intention's)."""
        intentions = self._intentions.get(service)
        if intentions is None:
            return _UNKNOWN_SERVICE
        rule = intentions.rule(self.source(peer_id))
        if rule is None:
            return intentions.default
        if rule.action:
            return Verdict(rule.action == "allow", rule.name)
        for permission in rule.permissions:
            if permission.match.matches(request):
                return Verdict(permission.action == "allow", rule.name)
        return Verdict(False, rule.name)

    # ------------------------------------------------------------------ rate limits

    def rate_limit(self, source: str, service: str, now: float) -> float:
        """Take a token from the service's bucket and the (source, service) bucket:
        0.0 when the request may go; else the seconds until one would be available
        (for ``Retry-After``, rounded up by the caller); nothing is taken then.

        When both buckets are empty the wait is the longer one: the time until a
        request would pass both."""
        destination = self._buckets.get(service)
        per_source = self._source_bucket(source, service)
        if per_source is None:
            return destination.try_take(now) if destination is not None else 0.0
        if destination is None:
            return per_source.try_take(now)
        wait = max(_wait(destination, now), _wait(per_source, now))
        if wait > 0.0:
            return wait
        destination.try_take(now)
        per_source.try_take(now)
        return 0.0

    def _source_bucket(self, source: str, service: str) -> TokenBucket | None:
        buckets = self._source_buckets
        key = (source, service)
        bucket = buckets.get(key)
        if bucket is not None:
            buckets.move_to_end(key)
            return bucket
        local = self.inbound.services.get(service)
        limit = local.rate_limit_per_source if local is not None else None
        if limit is None:
            return None
        bucket = TokenBucket(limit.requests_per_second, limit.burst)
        buckets[key] = bucket
        if len(buckets) > self._max_source_buckets:
            buckets.popitem(last=False)
        return bucket

    @property
    def source_bucket_count(self) -> int:
        """Per-(source, service) buckets held now (≤ ``MAX_SOURCE_BUCKETS``)."""
        return len(self._source_buckets)


# -------------------------------------------------------------------------- clusters


def _endpoint_name(endpoint: Endpoint) -> str:
    """What the ring hashes for an endpoint: the same on every proxy."""
    return f"{endpoint.host}:{endpoint.port}/{endpoint.sni}"


class ClusterRuntime:
    """One cluster: endpoints, balancer, breaker, retry budget, outlier detector.

    A retry needs both ``breaker.allow_retry()`` and ``budget.can_retry()``."""

    __slots__ = (
        "_all",
        "_balancer",
        "_count",
        "_detector",
        "_has_endpoints",
        "_unsynced",
        "active",
        "breaker",
        "budget",
        "budget_settings",
        "cluster",
        "failover_chain",
        "failover_target",
    )

    cluster: Cluster
    breaker: CircuitBreaker
    budget: RetryBudget
    active: dict[Endpoint, int]
    """Requests in flight per endpoint (least_request reads it; the data path adds
    and removes, e.g. with ``request_started``/``request_finished``)."""

    def __init__(
        self,
        cluster: Cluster,
        rng: Random,
        previous: ClusterRuntime | None = None,
        *,
        budget_percent: float = DEFAULT_BUDGET_PERCENT,
        min_retry_concurrency: int = DEFAULT_MIN_RETRY_CONCURRENCY,
    ) -> None:
        self.cluster = cluster
        endpoints = tuple(dict.fromkeys(cluster.endpoints))  # a duplicate is one endpoint
        self._all = frozenset(endpoints)
        self._count = len(endpoints)
        self._has_endpoints = bool(endpoints)
        self.failover_target: ClusterRuntime | None = self if endpoints else None
        """What ``UpstreamRuntime.resolve`` answers for this cluster while no
        endpoint is ejected (set by it)."""
        self.failover_chain: tuple[ClusterRuntime, ...] = (self,) if endpoints else ()
        """This cluster and its failover clusters that have endpoints, in order:
        ``resolve`` passes over the ones whose endpoints are all ejected."""
        self.active = previous.active if previous is not None else {}
        self.breaker = self._breaker(cluster, previous)
        self.budget_settings = (budget_percent, min_retry_concurrency)
        """The retry budget's (budget_percent, min_retry_concurrency)."""
        self.budget = (
            previous.budget
            if previous is not None and previous.budget_settings == self.budget_settings
            else RetryBudget(budget_percent, min_retry_concurrency)
        )
        self._detector, self._unsynced = self._outlier(cluster, endpoints, previous, rng)
        self._balancer = self._build_balancer(cluster, endpoints, previous, rng)

    @staticmethod
    def _breaker(cluster: Cluster, previous: ClusterRuntime | None) -> CircuitBreaker:
        if previous is not None and previous.cluster.limits == cluster.limits:
            return previous.breaker
        limits = cluster.limits
        return CircuitBreaker(
            max_connections=limits.max_connections,
            max_pending_requests=limits.max_pending_requests,
            max_requests=limits.max_requests,
            max_retries=limits.max_retries,
        )

    @staticmethod
    def _outlier(
        cluster: Cluster,
        endpoints: tuple[Endpoint, ...],
        previous: ClusterRuntime | None,
        rng: Random,
    ) -> tuple[OutlierDetector[Endpoint] | None, tuple[Endpoint, ...] | None]:
        """The detector, and the endpoints it must still be told (when it is the
        previous snapshot's, told at first use: see ``outlier``)."""
        settings = cluster.outlier
        if settings is None:
            return None, None
        if (
            previous is not None
            and previous._detector is not None
            and previous.cluster.outlier == settings
        ):
            return previous._detector, endpoints
        detector: OutlierDetector[Endpoint] = OutlierDetector(
            endpoints,
            consecutive_5xx=settings.consecutive_5xx,
            consecutive_gateway_failure=settings.consecutive_gateway_failure,
            interval=settings.interval,
            base_ejection_time=settings.base_ejection_time,
            max_ejection_percent=settings.max_ejection_percent,
            always_eject_one_host=settings.always_eject_one_host,
            rng=rng,
        )
        return detector, None

    @property
    def outlier(self) -> OutlierDetector[Endpoint] | None:
        """The outlier detector, None when the cluster has no outlier detection.

        It is the previous snapshot's detector when the settings did not change, and
        it learns this snapshot's endpoints (``set_endpoints``) at the first use of
        this ``ClusterRuntime``, not at compile time: a snapshot that is compiled and
        then refused (a bad certificate, a port in use) leaves the one serving as it
        was."""
        if self._unsynced is not None:
            self._sync_outlier()
        return self._detector

    def _sync_outlier(self) -> None:
        if self._detector is not None and self._unsynced is not None:
            self._detector.set_endpoints(self._unsynced)
        self._unsynced = None

    def _build_balancer(
        self,
        cluster: Cluster,
        endpoints: tuple[Endpoint, ...],
        previous: ClusterRuntime | None,
        rng: Random,
    ) -> Balancer[Endpoint]:
        lb = cluster.load_balancing
        if (
            previous is not None
            and previous.cluster.endpoints == cluster.endpoints
            and previous.cluster.load_balancing == lb
        ):
            return previous._balancer
        # Rings are built in Python at ~1 µs an entry: Envoy's 8M-entry maximum would
        # stall the worker for seconds, so the balancer's own cap applies.
        maximum = min(lb.maximum_ring_size, DEFAULT_MAXIMUM_RING_SIZE)
        return build_balancer(
            lb.policy,
            [(endpoint, max(1, endpoint.weight)) for endpoint in endpoints],
            rng,
            active=self.active,
            choice_count=max(2, lb.choice_count),
            minimum_ring_size=max(1, min(lb.minimum_ring_size, maximum)),
            maximum_ring_size=maximum,
            name=_endpoint_name,
        )

    # -------------------------------------------------------------------- picking

    def pick(
        self, now: float, exclude: Collection[Endpoint] = (), hash_key: int | None = None
    ) -> Endpoint | None:
        """An endpoint that is neither ejected nor in ``exclude``; None when none is.
        (When every endpoint is ejected, an ejected one is still better than none:
        falls back to ignoring ejections, as Envoy's panic threshold does.)"""
        outlier = self._detector
        if outlier is not None:
            if self._unsynced is not None:
                self._sync_outlier()
            ejected = outlier.ejected(now)
            if ejected and not (len(ejected) >= self._count and self._all <= ejected):
                return self._balancer.pick(ejected.union(exclude) if exclude else ejected, hash_key)
        return self._balancer.pick(exclude or NOTHING, hash_key)

    def has_endpoints(self) -> bool:
        return self._has_endpoints

    def all_ejected(self, now: float) -> bool:
        """Every endpoint is ejected by outlier detection at ``now``."""
        outlier = self._detector
        if outlier is None:
            return False
        if self._unsynced is not None:
            self._sync_outlier()
        ejected = outlier.ejected(now)
        return len(ejected) >= self._count and self._all <= ejected

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._balancer.endpoints

    def request_started(self, endpoint: Endpoint) -> None:
        """Count a request in flight to ``endpoint`` (least_request reads it)."""
        active = self.active
        active[endpoint] = active.get(endpoint, 0) + 1

    def request_finished(self, endpoint: Endpoint) -> None:
        """Undo ``request_started``; an endpoint back at zero leaves ``active``."""
        active = self.active
        count = active.get(endpoint, 0) - 1
        if count > 0:
            active[endpoint] = count
        else:
            active.pop(endpoint, None)

    # ------------------------------------------------------------ outlier detection

    def record(self, endpoint: Endpoint, outcome: int, now: float) -> None:
        """An exchange's outcome for outlier detection: an HTTP status, or 200 for
        a TCP connection made, or ``CONNECT_FAILED``/``TIMEOUT``/``RESET``."""
        outlier = self._detector
        if outlier is not None:
            if self._unsynced is not None:
                self._sync_outlier()
            outlier.record(endpoint, outcome, now)

    def timer(self) -> float | None:
        """When ``handle_timer`` is due next (outlier returns), loop time."""
        outlier = self.outlier
        return outlier.get_timer() if outlier is not None else None

    def handle_timer(self, now: float) -> None:
        outlier = self.outlier
        if outlier is not None:
            outlier.handle_timer(now)

    def take_events(self) -> list[OutlierEvent]:
        """The outlier detector's ``EndpointEjected``/``EndpointReturned`` events since
        the last call, oldest first (for logs and metrics). The detector is shared
        with the next snapshot's ``ClusterRuntime`` for this cluster, so pull events
        from the current ``Compiled`` only; at most ``MAX_PENDING_EVENTS`` wait."""
        outlier = self.outlier
        if outlier is None:
            return []
        events: list[OutlierEvent] = []
        event = outlier.next_event()
        while event is not None:
            events.append(event)
            event = outlier.next_event()
        return events


# ------------------------------------------------------------------------- upstreams


class _Split:
    """A route's splits compiled: one cluster, or cumulative weights to bisect."""

    __slots__ = ("clusters", "cumulative", "last", "route", "single", "total")

    def __init__(self, route: Route, clusters: Mapping[str, ClusterRuntime]) -> None:
        self.route = route
        targets = [s for s in route.splits if s.weight > 0] or list(route.splits)
        self.clusters = [clusters[s.cluster] for s in targets]
        self.single = self.clusters[0] if len(self.clusters) == 1 else None
        cumulative: list[float] = []
        running = 0
        for split in targets:
            running += max(0, split.weight)
            cumulative.append(float(running))
        self.cumulative = cumulative
        self.total = float(running) if running else 1.0
        self.last = len(targets) - 1


def _parse_hash_on(items: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    parsed: list[tuple[str, str]] = []
    for item in items:
        kind, _, name = item.partition(":")
        if kind == "header":
            parsed.append((kind, name.lower()))
        elif kind in ("cookie", "query") or (kind == "source_ip" and not name):
            parsed.append((kind, name))
        # Anything else was refused by the agent; ignore it here rather than fail.
    return tuple(parsed)


def _cookie(header: str, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header (RFC 6265 §5.4 shape)."""
    for pair in header.split(";"):
        key, sep, value = pair.strip().partition("=")
        if sep and key == name:
            return value
    return None


class UpstreamRuntime:
    """One outbound listener."""

    __slots__ = ("_hash_on", "_matchers", "_random", "_splits", "clusters", "upstream")

    upstream: Upstream
    clusters: Mapping[str, ClusterRuntime]

    def __init__(
        self, upstream: Upstream, rng: Random, previous: UpstreamRuntime | None = None
    ) -> None:
        self.upstream = upstream
        self._random = rng.random
        clusters: dict[str, ClusterRuntime] = {}
        for name, cluster in upstream.clusters.items():
            percent, minimum = _budget_settings(upstream, name)
            clusters[name] = ClusterRuntime(
                cluster,
                rng,
                previous.clusters.get(name) if previous is not None else None,
                budget_percent=percent,
                min_retry_concurrency=minimum,
            )
        for runtime in clusters.values():
            runtime.failover_chain = _failover_chain(runtime, clusters)
            runtime.failover_target = runtime.failover_chain[0] if runtime.failover_chain else None
        self.clusters = clusters
        self._matchers = tuple(
            (route, None if route.match.empty else route.match) for route in upstream.routes
        )
        self._splits = {id(route): _Split(route, clusters) for route in upstream.routes}
        self._hash_on = {
            id(runtime): _parse_hash_on(runtime.cluster.load_balancing.hash_on)
            for runtime in clusters.values()
            if runtime.cluster.load_balancing.policy == RING_HASH
        }

    def route(self, request: HttpRequest | None) -> Route:
        """The first route whose match holds (None, for TCP: the first route). When
        none holds, the last route (the agent always ends with a catch-all)."""
        matchers = self._matchers
        if request is None:
            return matchers[0][0]
        for route, match in matchers:
            if match is None or match.matches(request):
                return route
        return matchers[-1][0]

    def split(self, route: Route) -> ClusterRuntime:
        """A cluster for one request (or TCP connection) by the route's weights."""
        split = self._splits.get(id(route))
        if split is None or split.route is not route:
            split = _Split(route, self.clusters)  # a route from elsewhere: slow path
        if split.single is not None:
            return split.single
        point = self._random() * split.total
        return split.clusters[bisect_right(split.cumulative, point, 0, split.last)]

    def resolve(self, cluster: ClusterRuntime, now: float) -> ClusterRuntime | None:
        """``cluster`` when it has endpoints, else its first failover cluster that
        has; None when no cluster in the chain has an endpoint. A cluster whose
        endpoints are *all* ejected by outlier detection at ``now`` is passed over
        for the next one in its failover chain that has one in service (Envoy counts
        ejected hosts as unhealthy for failover too); when every cluster of the chain
        is fully ejected, the first is used (``ClusterRuntime.pick`` then ignores
        ejections: panic mode)."""
        chain = cluster.failover_chain
        if len(chain) < 2:
            return cluster.failover_target
        for candidate in chain:
            if not candidate.all_ejected(now):
                return candidate
        return chain[0]

    def hash_key(
        self, cluster: ClusterRuntime, request: HttpRequest | None, source_ip: str
    ) -> int | None:
        """ring_hash: the hash of the first ``hash_on`` item present; None otherwise."""
        hash_on = self._hash_on.get(id(cluster))
        if not hash_on:
            return None
        for kind, name in hash_on:
            value: str | None = None
            if kind == "source_ip":
                value = source_ip or None
            elif request is None:
                continue
            elif kind == "header":
                value = request.headers.get(name)
            elif kind == "query":
                value = request.query.get(name)
            else:
                header = request.headers.get("cookie")
                value = _cookie(header, name) if header else None
            if value is not None:
                return stable_hash(value)
        return None


def _budget_settings(upstream: Upstream, cluster: str) -> tuple[float, int]:
    """The retry budget for ``cluster``: that of the first route sending to it whose
    retry policy retries (a cluster shared by routes with different budgets gets the
    first one's); Envoy's 20 % / 3 when none does."""
    for route in upstream.routes:
        if route.retry.num_retries > 0 and any(s.cluster == cluster for s in route.splits):
            return (route.retry.budget_percent, route.retry.min_retry_concurrency)
    return (DEFAULT_BUDGET_PERCENT, DEFAULT_MIN_RETRY_CONCURRENCY)


def _failover_chain(
    runtime: ClusterRuntime, clusters: Mapping[str, ClusterRuntime]
) -> tuple[ClusterRuntime, ...]:
    chain = [runtime] if runtime.has_endpoints() else []
    for name in runtime.cluster.failover:
        other = clusters.get(name)
        if other is not None and other.has_endpoints() and other not in chain:
            chain.append(other)
    return tuple(chain)


# ---------------------------------------------------------------------------- checks


def _check_rate(limit: RateLimit | None, path: str) -> None:
    if limit is None:
        return
    if not (0.0 < limit.requests_per_second < math.inf):
        raise SnapshotError(f"{path}.requests_per_second: must be a positive number")
    if not (1.0 <= limit.burst < math.inf):
        raise SnapshotError(f"{path}.burst: must be at least 1")


def _check_cluster(cluster: Cluster, path: str) -> None:
    limits = cluster.limits
    for name in ("max_connections", "max_pending_requests", "max_requests", "max_retries"):
        if getattr(limits, name) < 0:
            raise SnapshotError(f"{path}.limits.{name}: must be ≥ 0")
    outlier = cluster.outlier
    if outlier is None:
        return
    if outlier.consecutive_5xx < 0 or outlier.consecutive_gateway_failure < 0:
        raise SnapshotError(f"{path}.outlier: consecutive thresholds must be ≥ 0")
    if not (outlier.interval > 0 and outlier.base_ejection_time > 0):
        raise SnapshotError(f"{path}.outlier: interval and base_ejection_time must be > 0")
    if not 0 <= outlier.max_ejection_percent <= 100:
        raise SnapshotError(f"{path}.outlier.max_ejection_percent: must be in [0, 100]")


def _check_retry(retry: RetryPolicy, path: str) -> None:
    if not 0.0 <= retry.budget_percent <= 100.0:
        raise SnapshotError(f"{path}.budget_percent: must be in [0, 100]")
    if retry.min_retry_concurrency < 0:
        raise SnapshotError(f"{path}.min_retry_concurrency: must be ≥ 0")


def check_values(snapshot: Snapshot) -> None:
    """Raise :class:`SnapshotError` for values ``proxy.resilience`` would refuse
    (``proxy.snapshot.check`` covers references; this covers numbers)."""
    if snapshot.inbound is not None:
        for name, service in snapshot.inbound.services.items():
            where = f"inbound.services.{name}"
            _check_rate(service.rate_limit, f"{where}.rate_limit")
            _check_rate(service.rate_limit_per_source, f"{where}.rate_limit_per_source")
    for i, upstream in enumerate(snapshot.upstreams):
        where = f"upstreams[{i}]"
        if not upstream.routes:
            raise SnapshotError(f"{where}.routes: at least one route is needed")
        for name, cluster in upstream.clusters.items():
            _check_cluster(cluster, f"{where}.clusters.{name}")
        for j, route in enumerate(upstream.routes):
            _check_retry(route.retry, f"{where}.routes[{j}].retry")
            if not route.splits:
                raise SnapshotError(f"{where}.routes[{j}].splits: at least one split is needed")
            for split in route.splits:
                if split.cluster not in upstream.clusters:
                    raise SnapshotError(
                        f"{where}.routes[{j}].splits: unknown cluster {split.cluster!r}"
                    )


# -------------------------------------------------------------------------- compiled


@dataclass(frozen=True, slots=True)
class ForwardRuntime:
    """An HTTP forward-proxy listener: the upstream of each request by its host."""

    forward: ForwardProxy
    upstreams: Mapping[str, UpstreamRuntime]
    """Lowercase host name → the runtime of the source's upstream listener for it."""

    def runtime_for(self, host: str) -> UpstreamRuntime | None:
        """The upstream for a ``Host`` header or an absolute-form target's authority:
        case and a ``:port`` suffix are ignored."""
        name = host.lower()
        if ":" in name and not name.endswith("]"):
            name = name.rsplit(":", 1)[0]
        return self.upstreams.get(name)


@dataclass(frozen=True, slots=True)
class Compiled:
    snapshot: Snapshot
    inbound: InboundRuntime | None
    upstreams: Mapping[tuple[str, int], UpstreamRuntime]
    """By listener address (host, port)."""
    forwards: Mapping[tuple[str, int], ForwardRuntime] = field(default_factory=dict)
    """HTTP forward-proxy listeners by address; they share the upstreams' runtimes
    (their breakers, budgets and outlier state)."""

    def clusters(self) -> Iterator[tuple[UpstreamRuntime, ClusterRuntime]]:
        """Every cluster of every upstream, with its upstream."""
        for upstream in self.upstreams.values():
            for cluster in upstream.clusters.values():
                yield upstream, cluster

    def timer(self) -> float | None:
        """The earliest ``ClusterRuntime.timer()`` of all clusters: the worker's one
        timer for outlier returns."""
        due = [t for _, c in self.clusters() if (t := c.timer()) is not None]
        return min(due) if due else None

    def handle_timer(self, now: float) -> None:
        for _, cluster in self.clusters():
            cluster.handle_timer(now)

    def take_events(self) -> list[tuple[UpstreamRuntime, ClusterRuntime, OutlierEvent]]:
        """``ClusterRuntime.take_events`` of every cluster, with where they happened."""
        return [
            (upstream, cluster, event)
            for upstream, cluster in self.clusters()
            for event in cluster.take_events()
        ]


def compile_snapshot(snapshot: Snapshot, previous: Compiled | None, rng: Random) -> Compiled:
    """``snapshot`` compiled, carrying state over from ``previous`` (see module doc).

    Raises :class:`SnapshotError`, naming the path, for values the cores refuse (a
    rate of 0, a burst < 1, an ejection percent over 100...), before anything of
    ``previous`` is touched: the worker then keeps the snapshot it has."""
    check_values(snapshot)
    inbound = None
    if snapshot.inbound is not None:
        inbound = InboundRuntime(
            snapshot.inbound,
            snapshot.trust_domain,
            previous.inbound if previous is not None else None,
        )
    upstreams: dict[tuple[str, int], UpstreamRuntime] = {}
    for upstream in snapshot.upstreams:
        address = (upstream.host, upstream.port)
        old = previous.upstreams.get(address) if previous is not None else None
        upstreams[address] = UpstreamRuntime(upstream, rng, old)
    by_pair: dict[tuple[str, str], UpstreamRuntime] = {}
    for runtime in upstreams.values():
        by_pair.setdefault((runtime.upstream.source, runtime.upstream.destination), runtime)
    forwards = {
        (forward.host, forward.port): ForwardRuntime(
            forward,
            {
                name: by_pair[(forward.source, destination)]
                for name, destination in forward.hosts.items()
            },
        )
        for forward in snapshot.forward_proxies
    }
    return Compiled(snapshot, inbound, upstreams, forwards)
