"""The proxy snapshot builder: catalog + policy + certificates → ``proxy.snapshot.Snapshot``.

Theory of operation
-------------------
The proxy decides nothing from policy itself (``proxy/snapshot.py``): this module
compiles, for one host, everything its worker needs, as pure data. It is a pure
function of its inputs (:class:`SnapshotInputs`), and deterministic — every mapping
is walked in sorted order — so the agent can compare two encodings to skip pushing a
snapshot that did not change (:mod:`meshnode.proxy_control`).

Inbound (one mTLS port per host). Each service registered here with a leaf
certificate becomes a :class:`LocalService`: its protocol from ``service-defaults``,
the intentions toward it in Consul precedence order (``match_intentions``; the first
that matches a source decides, L7 intentions carry their permissions), the ACL
default policy for sources no intention names (the same default as
``/v1/agent/connect/authorize``), and its local limits. TLS server names lead to
targets: ``<service>`` to every local instance, ``instance_sni(service, id)`` to one.

Outbound (one loopback listener per declared upstream). Every local registration's
``Connect.SidecarService.Proxy.Upstreams`` (or a ``connect-proxy`` registration's
``Proxy.Upstreams``) becomes an :class:`Upstream` presenting the source service's
leaf. Its route chain is Consul's discovery chain, flattened:

1. **router** (http only): each ``service-router`` route becomes a :class:`Route`
   with its match, timeouts and retry policy, then a catch-all to the service;
2. **splitter**: a destination without a subset is split by the service's
   ``service-splitter``; a split to *another* service is split again by that service's
   splitter, weights multiplied (all in 1/100 %, rounded so they add up to 10,000);
3. **resolver**: ``Redirect`` is followed, an empty subset becomes ``DefaultSubset``,
   the subset's filter (and ``OnlyPassing``) selects instances, ``Failover`` targets
   become the cluster's failover list, ``LoadBalancer`` its balancing policy;
4. **cluster** ``<subset>.<service>`` or ``<service>``: per instance that is not
   critical, one :class:`Endpoint` at its node's inbound proxy port (published in
   gossip node metadata; nodes without one are skipped) with the instance's SNI, and
   the circuit-breaker limits, outlier detection and connect timeout from the
   *source* service's ``UpstreamConfig`` for this destination (Consul applies the
   caller's service-defaults to its upstreams).

References: Consul docs connect/manage-traffic (discovery chain), config-entries
service-router / service-splitter / service-resolver / service-defaults
(``UpstreamConfig``, ``RateLimits``), connect/intentions (precedence); Envoy
route retry_on semantics (``5xx``, ``gateway-error``, ``reset``, ``connect-failure``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final, Literal

import msgpack

from ca.spiffe import SpiffeId
from meshnode.catalog import Catalog, ServiceInstance
from meshnode.connect import LocalLeaf
from meshnode.leadership import decode_node_meta
from meshnode.model import (
    ConnectUpstreams,
    HealthStatus,
    ServiceDefinition,
    ValidationError,
    connect_upstreams,
)
from meshnode.policy import (
    DEFAULT_NAMESPACE,
    KIND_INTENTION,
    KIND_SERVICE_DEFAULTS,
    KIND_SERVICE_RESOLVER,
    KIND_SERVICE_ROUTER,
    KIND_SERVICE_SPLITTER,
    WEIGHT_TOTAL,
    HashPolicy,
    InstanceRateLimit,
    Intention,
    PolicyValue,
    RouteDestination,
    ServiceDefaults,
    ServiceResolver,
    ServiceRouter,
    ServiceSplitter,
    match_intentions,
)
from proxy.snapshot import (
    AccessLog,
    Certificate,
    Cluster,
    Endpoint,
    ForwardProxy,
    HttpMatch,
    Inbound,
    InboundTarget,
    IntentionRule,
    Limits,
    LoadBalancing,
    LocalService,
    Outlier,
    Permission,
    RateLimit,
    RetryPolicy,
    Route,
    Snapshot,
    SplitTarget,
    Upstream,
    instance_sni,
)

PolicyKey = tuple[str, str]

#: Where a local instance without an ``Address`` listens, seen from its own host.
LOCAL_INSTANCE_HOST: Final = "127.0.0.1"
#: Envoy's default route timeout, which Consul keeps when ``RequestTimeout`` is unset.
DEFAULT_REQUEST_TIMEOUT: Final = 15.0
#: Consul's default connect timeout (service-resolver ``ConnectTimeout``).
DEFAULT_CONNECT_TIMEOUT: Final = 5.0
#: Nested splitters / redirects deeper than this are a loop (policy validation does
#: not follow chains across services); the chain stops there.
MAX_CHAIN_DEPTH: Final = 8
#: Status codes Envoy's ``retriable-4xx`` retries.
_RETRIABLE_4XX: Final = (409,)
_GATEWAY_ERRORS: Final = (502, 503, 504)
_ALL_5XX: Final = tuple(range(500, 600))
#: Load-balancer names: Consul's → the snapshot's.
_LB_POLICIES: Final[
    Mapping[str, Literal["round_robin", "least_request", "random", "ring_hash"]]
] = {
    "": "round_robin",
    "round_robin": "round_robin",
    "least_request": "least_request",
    "random": "random",
    "ring_hash": "ring_hash",
}
_HASH_FIELDS: Final = {"header": "header", "cookie": "cookie", "query_parameter": "query"}
#: An inbound port bound to these takes its port on every address.
_WILDCARDS: Final = frozenset({"0.0.0.0", "::"})


@dataclass(frozen=True, slots=True)
class SnapshotInputs:
    """Everything a host's snapshot depends on (read-only)."""

    node: str
    """This node's name."""
    datacenter: str
    host: str
    """The inbound port's bind address."""
    port: int
    """The inbound port."""
    catalog: Catalog
    policy: Mapping[PolicyKey, PolicyValue]
    """Live policy values by (kind, name): ``PolicyStore.values()``."""
    leaves: Mapping[str, LocalLeaf]
    """This agent's leaf certificates by service name."""
    trust_domain: str
    """"" before the agent has a trust bundle (then nothing can be verified and the
    snapshot has no listeners)."""
    roots: tuple[str, ...]
    """The trust bundle's root certificates, PEM."""
    proxy_ports: Mapping[str, int]
    """Each node's inbound proxy port (gossip node metadata); absent or 0: no proxy."""
    default_allow: bool = False
    """The ACL default intention policy: ``allow`` when no intention matches."""
    access_log: AccessLog = field(default_factory=AccessLog)


def build_snapshot(inputs: SnapshotInputs, version: int = 0) -> Snapshot:
    """The snapshot for ``inputs`` (see the module docstring)."""
    if not inputs.trust_domain or not inputs.roots:
        return Snapshot(
            version,
            inputs.trust_domain,
            inputs.roots,
            access_log=inputs.access_log,
            node=inputs.node,
        )
    chains = _Chains(inputs)
    return Snapshot(
        version=version,
        trust_domain=inputs.trust_domain,
        trust_bundle=inputs.roots,
        inbound=_inbound(inputs),
        upstreams=(upstreams := tuple(_upstreams(inputs, chains))),
        forward_proxies=tuple(_forward_proxies(inputs, upstreams)),
        access_log=inputs.access_log,
        node=inputs.node,
    )


# ------------------------------------------------------------------------------ policy


def _defaults(policy: Mapping[PolicyKey, PolicyValue], service: str) -> ServiceDefaults:
    found = policy.get((KIND_SERVICE_DEFAULTS, service))
    return found if isinstance(found, ServiceDefaults) else ServiceDefaults(service)


def _protocol(policy: Mapping[PolicyKey, PolicyValue], service: str) -> Literal["tcp", "http"]:
    return "http" if _defaults(policy, service).protocol == "http" else "tcp"


def _resolver(policy: Mapping[PolicyKey, PolicyValue], service: str) -> ServiceResolver | None:
    found = policy.get((KIND_SERVICE_RESOLVER, service))
    return found if isinstance(found, ServiceResolver) else None


def _splitter(policy: Mapping[PolicyKey, PolicyValue], service: str) -> ServiceSplitter | None:
    found = policy.get((KIND_SERVICE_SPLITTER, service))
    return found if isinstance(found, ServiceSplitter) else None


def _router(policy: Mapping[PolicyKey, PolicyValue], service: str) -> ServiceRouter | None:
    found = policy.get((KIND_SERVICE_ROUTER, service))
    return found if isinstance(found, ServiceRouter) else None


def _rate_limit(limit: InstanceRateLimit | None) -> RateLimit | None:
    if limit is None:
        return None
    return RateLimit(float(limit.requests_per_second), float(limit.burst))


def _certificate(leaf: LocalLeaf) -> Certificate:
    return Certificate(
        chain_pem=leaf.cert_pem,
        key_pem=leaf.private_key_pem,
        spiffe_id=leaf.spiffe_id,
        not_after=leaf.not_after.timestamp(),
    )


# ----------------------------------------------------------------------------- inbound


def _intention_rule(intention: Intention) -> IntentionRule:
    name = f"{intention.source} => {intention.destination}"
    if intention.action is not None:
        return IntentionRule(intention.source, intention.action.value, name)
    permissions = tuple(Permission(p.action.value, p.http) for p in intention.permissions)
    return IntentionRule(intention.source, "", name, permissions)


def _local_instances(inputs: SnapshotInputs) -> dict[str, list[ServiceDefinition]]:
    """Local instances that can be a destination (plain services, not proxies or
    gateways) by service name, each list sorted by instance ID."""
    out: dict[str, list[ServiceDefinition]] = {}
    services = inputs.catalog.local.services
    for service_id in sorted(services):
        service = services[service_id]
        if not service.kind:
            out.setdefault(service.name, []).append(service)
    return out


def _address(service: ServiceDefinition) -> tuple[str, int]:
    return service.address or LOCAL_INSTANCE_HOST, service.port


def _inbound(inputs: SnapshotInputs) -> Inbound | None:
    policy = inputs.policy
    intentions = [
        v for k, v in policy.items() if k[0] == KIND_INTENTION and isinstance(v, Intention)
    ]
    services: dict[str, LocalService] = {}
    targets: dict[str, InboundTarget] = {}
    for name, instances in sorted(_local_instances(inputs).items()):
        leaf = inputs.leaves.get(name)
        if leaf is None:
            continue  # not reachable until it has an identity to present
        defaults = _defaults(policy, name)
        protocol = _protocol(policy, name)
        services[name] = LocalService(
            name=name,
            certificate=_certificate(leaf),
            protocol=protocol,
            intentions=tuple(
                _intention_rule(i) for i in match_intentions(intentions, "destination", name)
            ),
            default_allow=inputs.default_allow,
            rate_limit=_rate_limit(defaults.rate_limit),
            rate_limit_per_source=_rate_limit(defaults.rate_limit_per_source),
            max_connections=defaults.max_inbound_connections,
            connect_timeout=(defaults.local_connect_timeout_ms / 1000) or DEFAULT_CONNECT_TIMEOUT,
            request_timeout=defaults.local_request_timeout_ms / 1000,
        )
        reachable = [s for s in instances if s.port]
        targets[name] = InboundTarget(name, tuple(_address(s) for s in reachable))
        for instance in reachable:
            targets[instance_sni(name, instance.id)] = InboundTarget(name, (_address(instance),))
    if not services:
        return None
    return Inbound(inputs.host, inputs.port, services, targets)


# ---------------------------------------------------------------------------- outbound


def _declared(service: ServiceDefinition) -> ConnectUpstreams | None:
    try:
        return connect_upstreams(service)
    except ValidationError:
        return None  # a connect-proxy registration with a bad upstream: skipped


def _upstreams(inputs: SnapshotInputs, chains: _Chains) -> Iterable[Upstream]:
    """One listener per declared upstream, in (service ID, position) order; a bind
    address and port already taken (by the inbound port or an earlier upstream) is
    skipped, as is a source without a leaf yet."""
    taken = {(inputs.host, inputs.port)}
    wildcard_inbound = inputs.host in _WILDCARDS
    services = inputs.catalog.local.services
    for service_id in sorted(services):
        declared = _declared(services[service_id])
        if declared is None:
            continue
        leaf = inputs.leaves.get(declared.source)
        if leaf is None:
            continue
        for upstream in declared.upstreams:
            address = (upstream.bind_address, upstream.bind_port)
            if address in taken or (wildcard_inbound and upstream.bind_port == inputs.port):
                continue
            taken.add(address)
            routes, clusters = chains.compile(declared.source, upstream.destination)
            yield Upstream(
                source=declared.source,
                destination=upstream.destination,
                host=upstream.bind_address,
                port=upstream.bind_port,
                certificate=_certificate(leaf),
                routes=routes,
                clusters=clusters,
                protocol=_protocol(inputs.policy, upstream.destination),
            )


def _forward_proxies(
    inputs: SnapshotInputs, upstreams: tuple[Upstream, ...]
) -> Iterable[ForwardProxy]:
    """One HTTP forward-proxy listener per registration with
    ``Proxy.Config.http_proxy_port``, serving the upstreams that made it into the
    snapshot, by host name: ``api``, ``api.service.consul``, ``api.service.<dc>.consul``
    (the names Consul DNS gives them, so clients need no special names)."""
    taken = {(inputs.host, inputs.port)} | {(u.host, u.port) for u in upstreams}
    built = {(u.source, u.destination) for u in upstreams}
    services = inputs.catalog.local.services
    for service_id in sorted(services):
        declared = _declared(services[service_id])
        if declared is None or declared.http_proxy is None:
            continue
        if declared.source not in inputs.leaves:
            continue  # nothing to present yet, as for its upstreams
        address = (declared.http_proxy.bind_address, declared.http_proxy.bind_port)
        if address in taken:
            continue
        taken.add(address)
        hosts: dict[str, str] = {}
        for upstream in declared.upstreams:
            destination = upstream.destination
            if (declared.source, destination) not in built:
                continue
            for name in (
                destination,
                f"{destination}.service.consul",
                f"{destination}.service.{inputs.datacenter}.consul",
            ):
                hosts.setdefault(name.lower(), destination)
        yield ForwardProxy(declared.source, address[0], address[1], hosts)


@dataclass(frozen=True, slots=True)
class _Target:
    """A resolved (service, subset): one cluster."""

    service: str
    subset: str

    @property
    def cluster_name(self) -> str:
        return f"{self.subset}.{self.service}" if self.subset else self.service


class _Chains:
    """Compiles discovery chains for one snapshot (endpoint lists are cached per
    cluster: many upstreams of a host often name the same destination)."""

    def __init__(self, inputs: SnapshotInputs) -> None:
        self.inputs = inputs
        self.policy = inputs.policy
        self._instances: dict[str, list[ServiceInstance]] = {}

    # --------------------------------------------------------------- the chain

    def compile(
        self, source: str, destination: str
    ) -> tuple[tuple[Route, ...], dict[str, Cluster]]:
        """The routes and clusters of ``source`` calling ``destination``."""
        targets: set[_Target] = set()
        routes: list[Route] = []
        if _protocol(self.policy, destination) == "http":
            router = _router(self.policy, destination)
            for position, route in enumerate(router.routes if router else ()):
                routes.append(
                    self._route(
                        f"{destination}/route{position}",
                        destination,
                        route.destination,
                        route.match,
                        targets,
                    )
                )
        routes.append(
            self._route(
                f"{destination}/default", destination, RouteDestination(), HttpMatch(), targets
            )
        )
        clusters = self._clusters(source, targets)
        return tuple(routes), clusters

    def _route(
        self,
        name: str,
        router_service: str,
        destination: RouteDestination,
        match: HttpMatch,
        targets: set[_Target],
    ) -> Route:
        service = destination.service or router_service
        weights: dict[_Target, float]
        if destination.service_subset:
            weights = {self._resolve(service, destination.service_subset): WEIGHT_TOTAL}
        else:
            weights = self._split(service, WEIGHT_TOTAL, 0)
        splits = _normalized(weights)
        targets.update(target for target, _ in splits)
        resolver = _resolver(self.policy, service)
        request_timeout = destination.request_timeout
        if request_timeout is None and resolver is not None:
            request_timeout = resolver.request_timeout
        return Route(
            name=name,
            splits=tuple(SplitTarget(weight, target.cluster_name) for target, weight in splits),
            match=match,
            prefix_rewrite=destination.prefix_rewrite,
            request_timeout=DEFAULT_REQUEST_TIMEOUT if request_timeout is None else request_timeout,
            idle_timeout=destination.idle_timeout or 0.0,
            retry=_retry_policy(destination),
        )

    def _split(self, service: str, weight: float, depth: int) -> dict[_Target, float]:
        """``weight`` (1/100 %) of traffic to ``service``, spread by its splitter;
        splits to other services are split again by theirs (weights multiply)."""
        splitter = _splitter(self.policy, service)
        if splitter is None or depth >= MAX_CHAIN_DEPTH:
            return {self._resolve(service, ""): weight}
        out: dict[_Target, float] = {}
        for split in splitter.splits:
            share = weight * split.weight_units / WEIGHT_TOTAL
            if share <= 0:
                continue
            target_service = split.service or service
            if split.service_subset or target_service == service:
                parts = {self._resolve(target_service, split.service_subset): share}
            else:
                parts = self._split(target_service, share, depth + 1)
            for target, part in parts.items():
                out[target] = out.get(target, 0.0) + part
        return out or {self._resolve(service, ""): weight}

    def _resolve(self, service: str, subset: str, depth: int = 0) -> _Target:
        """Follow the resolver's redirect; an empty subset is its default subset."""
        resolver = _resolver(self.policy, service)
        if resolver is None:
            return _Target(service, "")
        redirect = resolver.redirect
        if redirect is not None and depth < MAX_CHAIN_DEPTH:
            return self._resolve(redirect.service or service, redirect.service_subset, depth + 1)
        subset = subset or resolver.default_subset
        return _Target(service, subset if resolver.subset_exists(subset) else "")

    # --------------------------------------------------------------- clusters

    def _clusters(self, source: str, primaries: set[_Target]) -> dict[str, Cluster]:
        """Clusters for the routed-to targets and their failover targets. Failover is
        one level, as Consul compiles it: a failover cluster has no failover of its own
        (unless it is also routed to)."""
        failovers: dict[_Target, tuple[_Target, ...]] = {}
        for target in primaries:
            failovers[target] = self._failover(target)
        everything = set(primaries)
        for chain in failovers.values():
            everything.update(chain)
        clusters: dict[str, Cluster] = {}
        for target in sorted(everything, key=lambda t: t.cluster_name):
            chain = failovers.get(target, ())
            clusters[target.cluster_name] = self._cluster(
                source, target, tuple(t.cluster_name for t in chain)
            )
        return clusters

    def _failover(self, target: _Target) -> tuple[_Target, ...]:
        resolver = _resolver(self.policy, target.service)
        if resolver is None:
            return ()
        failover = resolver.failover_for(target.subset)
        if failover is None:
            return ()
        out: list[_Target] = []
        for entry in failover.resolved_targets():
            resolved = self._resolve(entry.service or target.service, entry.service_subset)
            if resolved != target and resolved not in out:
                out.append(resolved)
        return tuple(out)

    def _cluster(self, source: str, target: _Target, failover: tuple[str, ...]) -> Cluster:
        resolver = _resolver(self.policy, target.service)
        upstream_config = _defaults(self.policy, source).upstream_config
        settings = upstream_config.for_upstream(target.service) if upstream_config else None
        limits = Limits()
        outlier = Outlier()
        connect_timeout = DEFAULT_CONNECT_TIMEOUT
        if resolver is not None and resolver.connect_timeout:
            connect_timeout = resolver.connect_timeout
        if settings is not None:
            if settings.connect_timeout_ms:
                connect_timeout = settings.connect_timeout_ms / 1000
            if settings.limits is not None:
                given = settings.limits
                limits = Limits(
                    max_connections=_or(given.max_connections, limits.max_connections),
                    max_pending_requests=_or(
                        given.max_pending_requests, limits.max_pending_requests
                    ),
                    max_requests=_or(given.max_concurrent_requests, limits.max_requests),
                )
            check = settings.passive_health_check
            if check is not None:
                outlier = Outlier(
                    consecutive_5xx=_or(check.max_failures, outlier.consecutive_5xx),
                    interval=check.interval or outlier.interval,
                    base_ejection_time=check.base_ejection_time or outlier.base_ejection_time,
                    max_ejection_percent=_or(
                        check.max_ejection_percent, outlier.max_ejection_percent
                    ),
                )
        return Cluster(
            name=target.cluster_name,
            service=target.service,
            identity=SpiffeId.service(
                self.inputs.trust_domain, self.inputs.datacenter, target.service, DEFAULT_NAMESPACE
            ).uri,
            endpoints=self._endpoints(target, resolver),
            subset=target.subset,
            load_balancing=_load_balancing(resolver),
            limits=limits,
            outlier=outlier,
            connect_timeout=connect_timeout,
            failover=failover,
        )

    def _endpoints(self, target: _Target, resolver: ServiceResolver | None) -> tuple[Endpoint, ...]:
        subset = resolver.subsets.get(target.subset) if resolver and target.subset else None
        only_passing = subset is not None and subset.only_passing
        endpoints: list[Endpoint] = []
        for instance in self._healthy(target.service):
            status = instance.status
            if only_passing and status != HealthStatus.PASSING:
                continue
            if subset is not None and not subset.matches(instance.service, instance.node):
                continue
            port = self.inputs.proxy_ports.get(instance.node.name, 0)
            if not port:
                continue  # that node runs no proxy: nothing to connect to
            weights = instance.service.weights
            weight = weights.passing if status == HealthStatus.PASSING else weights.warning
            if weight <= 0:
                continue
            endpoints.append(
                Endpoint(
                    host=instance.node.address,
                    port=port,
                    sni=instance_sni(target.service, instance.service.id),
                    weight=weight,
                    node=instance.node.name,
                    instance=instance.service.id,
                )
            )
        return tuple(endpoints)

    def _healthy(self, service: str) -> list[ServiceInstance]:
        """Instances of ``service`` that are passing or warning (not critical, not in
        maintenance), sorted by node and instance ID."""
        cached = self._instances.get(service)
        if cached is None:
            cached = [
                i
                for i in self.inputs.catalog.health_service(service)
                if not i.service.kind and i.status in (HealthStatus.PASSING, HealthStatus.WARNING)
            ]
            self._instances[service] = cached
        return cached


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _normalized(weights: Mapping[_Target, float]) -> list[tuple[_Target, int]]:
    """Integer weights in 1/100 % adding up to exactly 10,000 (largest remainders get
    the rounding), zero shares dropped, sorted by cluster name."""
    items = sorted(weights.items(), key=lambda item: item[0].cluster_name)
    total = sum(w for _, w in items) or 1.0
    scaled = [(target, w * WEIGHT_TOTAL / total) for target, w in items]
    floors = {target: int(w) for target, w in scaled}
    missing = WEIGHT_TOTAL - sum(floors.values())
    by_remainder = sorted(
        scaled, key=lambda item: (-(item[1] - int(item[1])), item[0].cluster_name)
    )
    for target, _ in by_remainder[:missing]:
        floors[target] += 1
    return [(target, floors[target]) for target, _ in items if floors[target] > 0]


def _retry_policy(destination: RouteDestination) -> RetryPolicy:
    """A router destination's retries in the proxy's terms (Envoy's ``retry_on``:
    ``5xx`` is any 5xx plus resets and connect failures, ``gateway-error`` 502-504
    plus the same, ``reset`` resets only, ``connect-failure`` connect failures)."""
    conditions = set(destination.retry_on)
    codes = set(destination.retry_on_status_codes)
    if "5xx" in conditions:
        codes.update(_ALL_5XX)
    if "gateway-error" in conditions:
        codes.update(_GATEWAY_ERRORS)
    if "retriable-4xx" in conditions:
        codes.update(_RETRIABLE_4XX)
    return RetryPolicy(
        num_retries=destination.num_retries,
        on_connect_failure=True,  # nothing was sent: always safe to try another endpoint
        on_reset=bool(conditions & {"reset", "5xx", "gateway-error"}),
        on_status_codes=tuple(sorted(codes)),
    )


def _load_balancing(resolver: ServiceResolver | None) -> LoadBalancing:
    balancer = resolver.load_balancer if resolver is not None else None
    if balancer is None:
        return LoadBalancing()
    default = LoadBalancing()
    return LoadBalancing(
        policy=_LB_POLICIES.get(balancer.policy, "round_robin"),
        choice_count=_or(balancer.choice_count, default.choice_count),
        minimum_ring_size=_or(balancer.minimum_ring_size, default.minimum_ring_size),
        maximum_ring_size=_or(balancer.maximum_ring_size, default.maximum_ring_size),
        hash_on=tuple(h for h in map(_hash_on, balancer.hash_policies) if h),
    )


def _hash_on(policy: HashPolicy) -> str:
    if policy.source_ip:
        return "source_ip"
    kind = _HASH_FIELDS.get(policy.field)
    return f"{kind}:{policy.field_value}" if kind and policy.field_value else ""


def with_version(snapshot: Snapshot, version: int) -> Snapshot:
    """``snapshot`` numbered ``version`` (the builder numbers nothing itself)."""
    return replace(snapshot, version=version)


__all__ = [
    "META_PROXY_PORT",
    "SnapshotInputs",
    "build_snapshot",
    "proxy_port_of",
    "with_proxy_port",
    "with_version",
]


# ----------------------------------------------------------------------- node metadata

#: Key of a node's inbound proxy port in its gossip metadata (``meshnode.leadership``
#: documents the others: ``k``, ``s``, ``l``, ``b``, ``x``).
META_PROXY_PORT: Final = "p"


def with_proxy_port(meta: bytes, port: int) -> bytes:
    """``meta`` (an encoded node metadata map, ``b""`` for none) with our inbound proxy
    port added; unchanged when ``port`` is 0 (no proxy)."""
    if not port:
        return meta
    value = dict(decode_node_meta(meta)) if meta else {}
    value[META_PROXY_PORT] = port
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def proxy_port_of(meta: bytes) -> int:
    """A member's inbound proxy port from its metadata; 0 when it has none."""
    port = decode_node_meta(meta).get(META_PROXY_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
        return 0
    return port
