"""The proxy's whole configuration as pure data: the snapshot the agent builds and
pushes to its proxy worker.

Theory of operation
-------------------
A :class:`Snapshot` says everything one host's proxy does: its inbound mTLS port and
the local services behind it (certificates, targets, intentions, limits), and one
:class:`Upstream` per outbound loopback listener (source service, route chain,
clusters of endpoints). The agent builds it from catalog + policy + certificates
(``meshnode/sidecar.py``); the worker compiles it into runtime objects
(``proxy/runtime.py``) and swaps them in as one assignment, so a new snapshot applies
atomically, open connections keep the objects they started with, and new ones get the
new ones.

Everything is decided by the agent, so the proxy does no policy lookups: intentions
arrive already ordered by Consul precedence per destination (first match decides),
the route chain arrives flattened (router routes → weighted splits → clusters, each
cluster one resolved (service, subset) with its healthy endpoints, its load-balancing
policy, limits and failover clusters).

An endpoint is another host's inbound proxy (``host``, ``port``) plus the TLS server
name (``sni``) that selects the service — and optionally one instance of it — behind
that port: ``<service>`` for any local instance, ``<instance-label>.<service>`` for one
(see :func:`instance_sni`), which is how subsets reach the instance they chose when a
host runs several instances of a service.

The codec (:func:`encode` / :func:`decode`) is generic over these frozen dataclasses:
a dataclass is a msgpack map of its init fields, tuples are arrays, mappings are maps.
``decode`` checks every type against the annotations and names the path of the first
wrong value (``upstreams[1].clusters.api.endpoints[0].port: expected int``), so a
worker refuses a bad snapshot with a clear error and keeps the one it has.
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias, Union

import msgpack

from proxy.match import HeaderMatch, HttpMatch, QueryParamMatch

__all__ = [
    "AccessLog",
    "Certificate",
    "Cluster",
    "Endpoint",
    "ForwardProxy",
    "HeaderMatch",
    "HttpMatch",
    "Inbound",
    "InboundTarget",
    "IntentionRule",
    "Limits",
    "LoadBalancing",
    "LocalService",
    "Outlier",
    "Permission",
    "QueryParamMatch",
    "RateLimit",
    "RetryPolicy",
    "Route",
    "Snapshot",
    "SnapshotError",
    "SplitTarget",
    "Upstream",
    "decode",
    "encode",
    "instance_sni",
]

ProtocolName: TypeAlias = Literal["tcp", "http"]
Action: TypeAlias = Literal["allow", "deny"]

#: The default inbound mTLS port (``proxy.port``).
DEFAULT_PROXY_PORT: Final = 20000
#: Largest snapshot the worker accepts on its control socket.
MAX_SNAPSHOT_BYTES: Final = 64 * 1024 * 1024


class SnapshotError(ValueError):
    """A snapshot that does not decode or is inconsistent; the message names the path."""


def instance_sni(service: str, instance_id: str) -> str:
    """The TLS server name that reaches one instance of ``service`` behind a host's
    inbound port: a DNS-safe label derived from the instance ID, then the service."""
    label = hashlib.sha256(instance_id.encode()).hexdigest()[:16]
    return f"i{label}.{service}"


# ------------------------------------------------------------------------------- TLS


@dataclass(frozen=True, slots=True)
class Certificate:
    """A leaf certificate chain (leaf first) and its private key, PEM."""

    chain_pem: str
    key_pem: str
    spiffe_id: str
    """The identity the certificate carries (for logs and the source of outbound calls)."""
    not_after: float = 0.0
    """Expiry, Unix seconds (for metrics); 0 when unknown."""


# --------------------------------------------------------------------------- inbound


@dataclass(frozen=True, slots=True)
class Permission:
    """An L7 permission of an intention: ``action`` for requests matching ``match``."""

    action: Action
    match: HttpMatch


@dataclass(frozen=True, slots=True)
class IntentionRule:
    """One intention toward a local service, already in precedence order.

    ``source`` is a service name or ``"*"``. An L4 rule has an ``action`` and no
    permissions. An L7 rule (http services) has ``action`` "" and ``permissions``: the
    first matching permission decides, and a request none matches is denied (Consul);
    at connect time an L7 rule lets the connection in (requests are checked one by one).
    """

    source: str
    action: Literal["allow", "deny", ""]
    """"" for an L7 intention (decided by ``permissions``)."""
    name: str
    """What the debug header and logs name, e.g. ``web => api``."""
    permissions: tuple[Permission, ...] = ()


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: ``requests_per_second`` refill, ``burst`` capacity."""

    requests_per_second: float
    burst: float


@dataclass(frozen=True, slots=True)
class InboundTarget:
    """Where an SNI name leads: a local service's instance(s)."""

    service: str
    addresses: tuple[tuple[str, int], ...]
    """Local instances (host, port); more than one are balanced round robin."""


@dataclass(frozen=True, slots=True)
class LocalService:
    """A service with instances on this host, reachable through the inbound port."""

    name: str
    certificate: Certificate
    protocol: ProtocolName = "tcp"
    intentions: tuple[IntentionRule, ...] = ()
    default_allow: bool = False
    """What happens when no intention matches (ACL default policy; deny in production)."""
    rate_limit: RateLimit | None = None
    """Per destination: all requests to this service through this host's proxy."""
    rate_limit_per_source: RateLimit | None = None
    """Per (source service, this service)."""
    max_connections: int = 0
    """Inbound connections to this service; 0: no limit."""
    connect_timeout: float = 5.0
    request_timeout: float = 0.0
    """http: limit on the local instance's answer; 0: none."""
    idle_timeout: float = 3600.0


@dataclass(frozen=True, slots=True)
class Inbound:
    """The host's one mTLS port."""

    host: str
    port: int
    services: Mapping[str, LocalService]
    """By service name."""
    targets: Mapping[str, InboundTarget]
    """By SNI name: ``<service>`` and ``instance_sni(service, id)`` for each instance."""


# -------------------------------------------------------------------------- outbound


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Another host's inbound port and the server name that selects the service."""

    host: str
    port: int
    sni: str
    weight: int = 1
    node: str = ""
    """For logs and metrics: the node the instance runs on."""
    instance: str = ""
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Endpoints key the runtime's per-endpoint state (in-flight counts, outlier
        # history), looked up on every request: hash the seven fields once, not per
        # lookup (~1 µs each).
        key = (self.host, self.port, self.sni, self.weight, self.node, self.instance)
        object.__setattr__(self, "_hash", hash(key))

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True, slots=True)
class LoadBalancing:
    policy: Literal["round_robin", "least_request", "random", "ring_hash"] = "round_robin"
    choice_count: int = 2
    minimum_ring_size: int = 1024
    maximum_ring_size: int = 8 * 1024 * 1024
    hash_on: tuple[str, ...] = ()
    """ring_hash: what to hash, in order, first present wins: ``header:<name>``,
    ``cookie:<name>``, ``query:<name>``, ``source_ip``."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Circuit-breaker thresholds for one cluster; Envoy's defaults."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3


@dataclass(frozen=True, slots=True)
class Outlier:
    """Passive health checking (``PassiveHealthCheck``)."""

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 0
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10
    always_eject_one_host: bool = True
    """Eject one endpoint even when ``max_ejection_percent`` would forbid it (small
    clusters: with 10 % and fewer than 10 endpoints nothing would ever be ejected)."""


@dataclass(frozen=True, slots=True)
class Cluster:
    """One resolved target: a (service, subset) and its healthy endpoints."""

    name: str
    """Unique in its upstream, e.g. ``api`` or ``v2.api``."""
    service: str
    identity: str
    """The SPIFFE ID the endpoints must present."""
    endpoints: tuple[Endpoint, ...]
    subset: str = ""
    load_balancing: LoadBalancing = LoadBalancing()
    limits: Limits = Limits()
    outlier: Outlier | None = None
    connect_timeout: float = 5.0
    failover: tuple[str, ...] = ()
    """Clusters (names in the same upstream) to use, in order, when this one has no
    healthy endpoint."""


@dataclass(frozen=True, slots=True)
class SplitTarget:
    weight: int
    """In 1/100 percent; the splits of a route add up to 10,000."""
    cluster: str


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    num_retries: int = 0
    on_connect_failure: bool = True
    """Connect failures are retried on another endpoint (also for non-idempotent
    requests: nothing was sent)."""
    on_reset: bool = False
    on_status_codes: tuple[int, ...] = ()
    per_try_timeout: float = 0.0
    """0: only the route's request timeout."""
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    retry_non_idempotent: bool = False
    budget_percent: float = 20.0
    min_retry_concurrency: int = 3


@dataclass(frozen=True, slots=True)
class Route:
    """A router route flattened: the first whose ``match`` holds takes the request."""

    name: str
    """For metrics and the access log, e.g. ``api/route0`` or ``api/default``."""
    splits: tuple[SplitTarget, ...]
    match: HttpMatch = HttpMatch()  # noqa: RUF009 -- frozen default
    prefix_rewrite: str = ""
    request_timeout: float = 15.0
    """Envoy's default route timeout; 0: none."""
    idle_timeout: float = 0.0
    retry: RetryPolicy = RetryPolicy()


@dataclass(frozen=True, slots=True)
class Upstream:
    """One outbound listener: connections from ``source`` to the ``destination`` chain."""

    source: str
    """The local service calling out (its certificate is presented)."""
    destination: str
    host: str
    port: int
    certificate: Certificate
    routes: tuple[Route, ...]
    """tcp: the first route's splits are applied per connection; http: per request."""
    clusters: Mapping[str, Cluster]
    protocol: ProtocolName = "tcp"
    idle_timeout: float = 3600.0


@dataclass(frozen=True, slots=True)
class ForwardProxy:
    """An HTTP forward-proxy listener for one local service: the upstream is chosen per
    request by the ``Host`` header (or an absolute-form request target, as clients
    configured with ``HTTP_PROXY`` send), so one port serves all of the service's
    upstreams. Each request then goes through that upstream's route chain, exactly as
    on the upstream's own listener."""

    source: str
    host: str
    port: int
    hosts: Mapping[str, str]
    """Lowercase host name (without port) → the destination of one of ``source``'s
    :class:`Upstream` entries."""
    idle_timeout: float = 3600.0


@dataclass(frozen=True, slots=True)
class AccessLog:
    path: str = ""
    """"" for the worker's stdout; ``off`` for none."""
    sample: float = 1.0
    """The share of requests (http) or connections (tcp) logged, 0..1."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    trust_domain: str
    trust_bundle: tuple[str, ...]
    """Root certificates, PEM."""
    inbound: Inbound | None = None
    upstreams: tuple[Upstream, ...] = ()
    forward_proxies: tuple[ForwardProxy, ...] = ()
    access_log: AccessLog = AccessLog()
    node: str = ""


# ---------------------------------------------------------------------------- codec

_Hints: TypeAlias = dict[str, Any]
_HINTS: dict[type, _Hints] = {}


def _hints(cls: type) -> _Hints:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = hints
    return hints


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init
        }
    if isinstance(value, tuple | list):
        return [_to_wire(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _to_wire(item) for key, item in value.items()}
    return value


def encode(snapshot: Snapshot) -> bytes:
    """The snapshot as msgpack."""
    data: bytes = msgpack.packb(_to_wire(snapshot), use_bin_type=True)
    return data


def _from_wire(kind: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(kind):
            choices = ", ".join(repr(a) for a in typing.get_args(kind))
            raise SnapshotError(f"{path}: {value!r} is not one of {choices}")
        return value
    if origin is Union or origin is types.UnionType:
        arguments = typing.get_args(kind)
        if value is None:
            if type(None) in arguments:
                return None
            raise SnapshotError(f"{path}: missing value")
        inner = [a for a in arguments if a is not type(None)]
        if len(inner) != 1:
            raise SnapshotError(f"{path}: unsupported union {kind}")
        return _from_wire(inner[0], value, path)
    if origin is tuple:
        arguments = typing.get_args(kind)
        if not isinstance(value, list | tuple):
            raise SnapshotError(f"{path}: expected a list")
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(
                _from_wire(arguments[0], item, f"{path}[{i}]") for i, item in enumerate(value)
            )
        if len(arguments) != len(value):
            raise SnapshotError(f"{path}: expected {len(arguments)} items")
        return tuple(
            _from_wire(a, item, f"{path}[{i}]")
            for i, (a, item) in enumerate(zip(arguments, value, strict=True))
        )
    if origin is Mapping or origin is dict:
        key_kind, value_kind = typing.get_args(kind)
        if not isinstance(value, dict):
            raise SnapshotError(f"{path}: expected a map")
        return {
            _from_wire(key_kind, key, path): _from_wire(value_kind, item, f"{path}.{key}")
            for key, item in value.items()
        }
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise SnapshotError(f"{path}: expected a map")
        hints = _hints(kind)
        known = {f.name for f in dataclasses.fields(kind) if f.init}
        unknown = set(value) - known
        if unknown:
            raise SnapshotError(f"{path}: unknown field {sorted(map(str, unknown))[0]!r}")
        fields = {
            name: _from_wire(hints[name], item, f"{path}.{name}" if path else name)
            for name, item in value.items()
        }
        try:
            return kind(**fields)
        except TypeError as exc:
            raise SnapshotError(f"{path or kind.__name__}: {exc}") from None
        except ValueError as exc:  # a bad regex in a match, a bad value
            raise SnapshotError(f"{path or kind.__name__}: {exc}") from None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SnapshotError(f"{path}: expected a number")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SnapshotError(f"{path}: expected int")
        return value
    if kind in (str, bool):
        if not isinstance(value, kind):
            raise SnapshotError(f"{path}: expected {kind.__name__}")
        return value
    raise SnapshotError(f"{path}: unsupported type {kind}")


def decode(data: bytes) -> Snapshot:
    """A snapshot from :func:`encode`'s bytes; :class:`SnapshotError` names what is
    wrong. Cross-references are checked too (splits and failovers name clusters in
    their upstream, SNI targets name local services)."""
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError(f"snapshot of {len(data)} bytes exceeds {MAX_SNAPSHOT_BYTES}")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise SnapshotError(f"not msgpack: {exc}") from None
    snapshot = _from_wire(Snapshot, raw, "")
    assert isinstance(snapshot, Snapshot)
    check(snapshot)
    return snapshot


def check(snapshot: Snapshot) -> None:
    """Raise :class:`SnapshotError` for dangling references and impossible values."""
    ports: set[tuple[str, int]] = set()
    if snapshot.inbound is not None:
        inbound = snapshot.inbound
        ports.add((inbound.host, inbound.port))
        for sni, target in inbound.targets.items():
            if target.service not in inbound.services:
                raise SnapshotError(
                    f"inbound.targets.{sni}.service: {target.service!r} is not a local service"
                )
    for i, upstream in enumerate(snapshot.upstreams):
        where = f"upstreams[{i}]"
        if (upstream.host, upstream.port) in ports:
            raise SnapshotError(f"{where}: {upstream.host}:{upstream.port} is used twice")
        ports.add((upstream.host, upstream.port))
        if not upstream.routes:
            raise SnapshotError(f"{where}.routes: at least one route is needed")
        for j, route in enumerate(upstream.routes):
            if sum(s.weight for s in route.splits) != 10_000:
                raise SnapshotError(f"{where}.routes[{j}].splits: weights must add up to 10000")
            for split in route.splits:
                if split.cluster not in upstream.clusters:
                    raise SnapshotError(
                        f"{where}.routes[{j}].splits: unknown cluster {split.cluster!r}"
                    )
        for name, cluster in upstream.clusters.items():
            for other in cluster.failover:
                if other not in upstream.clusters:
                    raise SnapshotError(
                        f"{where}.clusters.{name}.failover: unknown cluster {other!r}"
                    )
    declared = {(u.source, u.destination) for u in snapshot.upstreams}
    for i, forward in enumerate(snapshot.forward_proxies):
        where = f"forward_proxies[{i}]"
        if (forward.host, forward.port) in ports:
            raise SnapshotError(f"{where}: {forward.host}:{forward.port} is used twice")
        ports.add((forward.host, forward.port))
        for name, destination in forward.hosts.items():
            if (forward.source, destination) not in declared:
                raise SnapshotError(
                    f"{where}.hosts.{name}: {forward.source!r} has no upstream {destination!r}"
                )
