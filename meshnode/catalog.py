"""The service catalog, spread by gossip (sans-IO: no sockets, no clock, no asyncio).

Theory of operation
-------------------
Every node owns one ``NodeRecord``: its address and metadata, its services, its
checks with their current results, its maintenance flags, and a ``version``. Only the
node itself writes its record (the ``register_*``/``update_check``/... methods of
``Catalog``), and each write bumps the version. Every agent keeps every node's record
and answers catalog and health queries for the whole cluster from them.

Spreading (DESIGN.md "Catalog"):

* each local write queues a broadcast in a transmit-limited ``BroadcastQueue`` with the
  node name as subject, so a newer broadcast replaces an older one still queued. The
  broadcast is the whole record when it fits a datagram share (``BROADCAST_MAX_BYTES``),
  else a *delta*: the entries changed since some base version, plus removals
  (tombstones). A receiver applies a delta only if it already has that node at
  ``base <= its version < new version``; otherwise it waits for anti-entropy;
* push-pull carries every record (``local_state``/``merge_remote_state``), and
  ``state_digest`` is an order-independent sum over (node, version) pairs, so the
  gossip layer's digest exchange starts a full exchange only when views differ.

Merge rule: a record replaces ours only if its version is higher (ties between
different contents, possible only after a node restarted without its state, are
broken by comparing encodings, so merging stays commutative). If someone shows us a
record of *our own* node at or above our version, we jump past it and rebroadcast,
as SWIM refutes with a higher incarnation.

Liveness is not in the record: it is what our gossip layer says. Each node gets a
node-level ``serfHealth`` check (Consul's name and outputs) that is critical while
gossip holds the member suspect, dead or left, so clients that fold node checks into
the aggregate status (consul-template, Prometheus, Traefik) stop routing to it at once
(Consul docs, health.mdx; "Serf Health Status"). ``MemberReaped`` removes the record.

Blocking queries (Consul docs, api-docs/features/blocking): ``index`` starts at 1 and
only grows; every change that alters some query's answer bumps it, and the index at
which each service name, node and the service list last changed is kept, so a query on
service X wakes when X changes. ``on_change`` listeners hear every bump.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import msgpack

from gossip.broadcast import BroadcastQueue
from gossip.delegate import Delegate
from gossip.errors import RemoteProtocolError
from gossip.events import (
    Member,
    MemberEvent,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    MemberReaped,
    MemberRecovered,
    MemberState,
    MemberSuspected,
    MemberUpdated,
)
from meshnode.model import (
    NAME_MAX_LENGTH,
    OUTPUT_MAX_LENGTH,
    TEXT_MAX_LENGTH,
    CheckDefinition,
    CheckView,
    ConnectUpstreams,
    HealthStatus,
    NodeInfo,
    ServiceDefinition,
    ValidationError,
    check_to_body,
    connect_upstreams,
    parse_check,
    parse_service,
    service_to_body,
    validate_meta,
)

# --------------------------------------------------------------------------- constants

#: Consul's node-level gossip health check (agent/consul/leader.go, structs.SerfCheckID).
SERF_CHECK_ID: Final = "serfHealth"
SERF_CHECK_NAME: Final = "Serf Health Status"
SERF_ALIVE_OUTPUT: Final = "Agent alive and reachable"
SERF_DEAD_OUTPUT: Final = "Agent not live or unreachable"
#: Consul's maintenance check IDs, names and default notes (agent/agent.go).
NODE_MAINTENANCE_CHECK_ID: Final = "_node_maintenance"
NODE_MAINTENANCE_NAME: Final = "Node Maintenance Mode"
NODE_MAINTENANCE_DEFAULT_REASON: Final = (
    "Maintenance mode is enabled for this node, but no reason was provided. "
    "This is a default message."
)
SERVICE_MAINTENANCE_PREFIX: Final = "_service_maintenance:"
SERVICE_MAINTENANCE_NAME: Final = "Service Maintenance Mode"
SERVICE_MAINTENANCE_DEFAULT_REASON: Final = (
    "Maintenance mode is enabled for this service, but no reason was provided. "
    "This is a default message."
)

#: First byte of every catalog gossip message, so a future multiplexing delegate
#: (catalog + policy + trust bundle on one gossip layer) can route by it.
WIRE_TYPE: Final = 0x43  # "C"
_FULL_STATE, _UPDATE = 1, 2
#: Largest broadcast we queue: a default 1400-byte datagram minus the envelope
#: (AES-GCM nonce and tag, label), the compound framing and room for membership news.
BROADCAST_MAX_BYTES: Final = 1024
#: Per-record bounds on what a peer may send (our own API enforces tighter ones).
MAX_SERVICES_PER_NODE: Final = 4096
MAX_CHECKS_PER_NODE: Final = 8192
#: Largest single record and largest push-pull state we decode. The state bound
#: matches gossip's ``max_stream_size`` default (32 MiB).
MAX_RECORD_BYTES: Final = 4 * 1024 * 1024
MAX_STATE_BYTES: Final = 32 * 1024 * 1024
MAX_NODES: Final = 65_536
#: Tombstones (removed services/checks) the local node remembers for deltas; older
#: removals are covered only by whole records (push-pull, or a full broadcast).
MAX_TOMBSTONES: Final = 1024
#: Service names whose last-change index we keep after their last instance left.
MAX_SERVICE_INDEXES: Final = 16_384

_SERVICE_KEYS: Final = (
    "ID",
    "Name",
    "Tags",
    "Address",
    "Port",
    "Meta",
    "TaggedAddresses",
    "Weights",
    "EnableTagOverride",
    "Kind",
    "Proxy",
    "Connect",
)
_CHECK_KEYS: Final = (
    "CheckID",
    "Name",
    "ServiceID",
    "Notes",
    "Status",
    "Interval",
    "Timeout",
    "HTTP",
    "Method",
    "Header",
    "Body",
    "TCP",
    "TTL",
    "Args",
    "TLSSkipVerify",
    "TLSServerName",
    "DeregisterCriticalServiceAfter",
    "SuccessBeforePassing",
    "FailuresBeforeCritical",
)
_DURATION_KEYS: Final = frozenset({"Interval", "Timeout", "TTL", "DeregisterCriticalServiceAfter"})


# --------------------------------------------------------------------------- errors


class CatalogDecodeError(RemoteProtocolError):
    """A peer's catalog message is malformed or out of bounds: drop it and count it."""


class NotFoundError(LookupError):
    """A local write names a service or check this node does not have (HTTP 404)."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class CheckState:
    """A check and its current result."""

    definition: CheckDefinition
    status: HealthStatus
    output: str = ""
    updated: int = 0
    """The record version at which this check last changed (for deltas)."""


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """One node's part of the catalog; written only by that node. Read-only mappings."""

    node: str
    node_id: str
    address: str
    datacenter: str
    meta: Mapping[str, str] = field(default_factory=dict)
    version: int = 0
    services: Mapping[str, ServiceDefinition] = field(default_factory=dict)
    checks: Mapping[str, CheckState] = field(default_factory=dict)
    service_versions: Mapping[str, int] = field(default_factory=dict)
    """Service ID → record version at which that service last changed."""
    node_maintenance: str | None = None
    """The reason, when the node is in maintenance mode."""
    service_maintenance: Mapping[str, str] = field(default_factory=dict)
    """Service ID → reason, for services in maintenance mode."""

    @property
    def info(self) -> NodeInfo:
        return NodeInfo(self.node, self.node_id, self.address, self.datacenter, self.meta)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (for persistence); ``from_dict`` revalidates it."""
        return {
            "Node": self.node,
            "ID": self.node_id,
            "Address": self.address,
            "Datacenter": self.datacenter,
            "Meta": dict(self.meta),
            "Version": self.version,
            "Services": [
                {**service_to_body(s), "Version": self.service_versions.get(i, 0)}
                for i, s in self.services.items()
            ],
            "Checks": [
                {
                    "Definition": check_to_body(c.definition),
                    "Status": c.status.value,
                    "Output": c.output,
                    "Version": c.updated,
                }
                for c in self.checks.values()
            ],
            "NodeMaintenance": self.node_maintenance,
            "ServiceMaintenance": dict(self.service_maintenance),
        }

    @classmethod
    def from_dict(cls, data: object) -> NodeRecord:
        """Inverse of ``to_dict``; raises ``ValidationError`` on anything wrong."""
        if not isinstance(data, dict):
            raise ValidationError("", "expected an object")
        try:
            return _record_from_fields(
                node=data["Node"],
                node_id=data["ID"],
                address=data["Address"],
                datacenter=data["Datacenter"],
                meta=data["Meta"],
                version=data["Version"],
                services=[
                    ({k: v for k, v in s.items() if k != "Version"}, s["Version"])
                    for s in data["Services"]
                ],
                checks=[
                    (
                        c["Definition"],
                        c["Status"],
                        c["Output"],
                        c["Version"],
                    )
                    for c in data["Checks"]
                ],
                node_maintenance=data["NodeMaintenance"],
                service_maintenance=data["ServiceMaintenance"],
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValidationError("", f"malformed node record: {exc!r}") from None


def _record_from_fields(
    *,
    node: object,
    node_id: object,
    address: object,
    datacenter: object,
    meta: object,
    version: object,
    services: Iterable[tuple[object, object]],
    checks: Iterable[tuple[object, object, object, object]],
    node_maintenance: object,
    service_maintenance: object,
) -> NodeRecord:
    """Build a record from untrusted parts, validating every one (ValidationError)."""
    name = _text(node, "Node", NAME_MAX_LENGTH, required=True)
    parsed_services: dict[str, ServiceDefinition] = {}
    service_versions: dict[str, int] = {}
    for body, service_version in services:
        service = parse_service(body)
        if service.id in parsed_services:
            raise ValidationError("Services", f"duplicate service ID {service.id!r}")
        parsed_services[service.id] = service
        service_versions[service.id] = _version(service_version)
    parsed_checks: dict[str, CheckState] = {}
    for body, status, output, check_version in checks:
        definition = parse_check(body)
        if definition.service_id and definition.service_id not in parsed_services:
            raise ValidationError("Checks", f"check {definition.check_id!r} has no service")
        if definition.check_id in parsed_checks:
            raise ValidationError("Checks", f"duplicate check ID {definition.check_id!r}")
        if status not in ("passing", "warning", "critical"):
            raise ValidationError("Checks", f"invalid status {status!r}")
        parsed_checks[definition.check_id] = CheckState(
            definition,
            HealthStatus(status),
            _text(output, "Output", OUTPUT_MAX_LENGTH),
            _version(check_version),
        )
    if not isinstance(service_maintenance, dict):
        raise ValidationError("ServiceMaintenance", "expected an object")
    maintenance: dict[str, str] = {}
    for service_id, reason in service_maintenance.items():
        if service_id not in parsed_services:
            raise ValidationError("ServiceMaintenance", f"unknown service {service_id!r}")
        maintenance[service_id] = _text(reason, "ServiceMaintenance", TEXT_MAX_LENGTH)
    return NodeRecord(
        node=name,
        node_id=_text(node_id, "ID", NAME_MAX_LENGTH),
        address=_text(address, "Address", NAME_MAX_LENGTH),
        datacenter=_text(datacenter, "Datacenter", NAME_MAX_LENGTH),
        meta=validate_meta(meta, "Meta"),
        version=_version(version),
        services=parsed_services,
        checks=parsed_checks,
        service_versions=service_versions,
        node_maintenance=(
            None
            if node_maintenance is None
            else _text(node_maintenance, "NodeMaintenance", TEXT_MAX_LENGTH)
        ),
        service_maintenance=maintenance,
    )


def _text(value: object, path: str, limit: int, *, required: bool = False) -> str:
    if not isinstance(value, str) or len(value) > limit or (required and not value):
        raise ValidationError(path, "expected a string" + (" (non-empty)" if required else ""))
    return value


def _version(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValidationError("Version", f"invalid version {value!r}")
    return value


# --------------------------------------------------------------------------- codec
#
# Records travel as msgpack arrays (fields in a fixed order, no key names), with each
# service and check as the values of its API body in ``_SERVICE_KEYS``/``_CHECK_KEYS``
# order (durations as integer nanoseconds). Decoding zips the keys back and runs the
# same validation as the HTTP API, so a peer can never smuggle in what our API refuses.


def _service_wire(service: ServiceDefinition, version: int) -> list[Any]:
    body = service_to_body(service)
    return [body.get(key) for key in _SERVICE_KEYS] + [version]


def _check_wire(state: CheckState) -> list[Any]:
    body = check_to_body(state.definition)
    definition = state.definition
    durations = {
        "Interval": definition.interval,
        "Timeout": definition.timeout,
        "TTL": definition.ttl,
        "DeregisterCriticalServiceAfter": definition.deregister_critical_service_after,
    }
    values = [
        _nanoseconds(durations[key]) if key in _DURATION_KEYS else body.get(key)
        for key in _CHECK_KEYS
    ]
    return [*values, state.status.value, state.output, state.updated]


def _nanoseconds(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1e9)


def _header_wire(record: NodeRecord) -> list[Any]:
    return [
        record.node,
        record.version,
        record.node_id,
        record.address,
        record.datacenter,
        dict(record.meta),
        record.node_maintenance,
        dict(record.service_maintenance),
    ]


def _record_wire(record: NodeRecord, since: int = 0) -> list[Any]:
    services = [
        _service_wire(s, record.service_versions.get(i, 0))
        for i, s in record.services.items()
        if record.service_versions.get(i, 0) > since or since == 0
    ]
    checks = [_check_wire(c) for c in record.checks.values() if c.updated > since or since == 0]
    return [*_header_wire(record), services, checks]


def _pack(message: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return bytes((WIRE_TYPE,)) + packed


def encode_record(record: NodeRecord) -> bytes:
    """One whole record as a catalog broadcast (base version 0)."""
    return _pack([_UPDATE, 0, _record_wire(record), [], []])


def encode_delta(
    record: NodeRecord, base: int, removed_services: Sequence[str], removed_checks: Sequence[str]
) -> bytes:
    """The changes of ``record`` since version ``base`` (0: the whole record)."""
    if base == 0:
        return encode_record(record)
    return _pack(
        [_UPDATE, base, _record_wire(record, base), list(removed_services), list(removed_checks)]
    )


def encode_state(records: Iterable[NodeRecord]) -> bytes:
    """Every record, for push-pull."""
    return _pack([_FULL_STATE, [_record_wire(r) for r in records]])


@dataclass(frozen=True, slots=True)
class Update:
    """A decoded broadcast: a whole record (``base == 0``) or a delta."""

    base: int
    record: NodeRecord
    """For a delta, only the changed services/checks (the header is complete)."""
    removed_services: tuple[str, ...] = ()
    removed_checks: tuple[str, ...] = ()


def _unpack(data: bytes, limit: int) -> object:
    if len(data) > limit:
        raise CatalogDecodeError("too_large", f"{len(data)} bytes")
    if not data or data[0] != WIRE_TYPE:
        raise CatalogDecodeError("wrong_type")
    try:
        return msgpack.unpackb(
            data[1:],
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=0,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise CatalogDecodeError("malformed", type(exc).__name__) from None


def _list(value: object, most: int, what: str) -> list[Any]:
    if not isinstance(value, list) or len(value) > most:
        raise CatalogDecodeError("malformed", what)
    return value


def _decode_record(value: object) -> NodeRecord:
    fields = _list(value, 16, "record")
    if len(fields) != 10:
        raise CatalogDecodeError("malformed", "record fields")
    node, version, node_id, address, datacenter, meta, node_maint, service_maint = fields[:8]
    raw_services = _list(fields[8], MAX_SERVICES_PER_NODE, "services")
    raw_checks = _list(fields[9], MAX_CHECKS_PER_NODE, "checks")
    services: list[tuple[object, object]] = []
    for item in raw_services:
        values = _list(item, 32, "service")
        if len(values) != len(_SERVICE_KEYS) + 1:
            raise CatalogDecodeError("malformed", "service fields")
        services.append((dict(zip(_SERVICE_KEYS, values, strict=False)), values[-1]))
    checks: list[tuple[object, object, object, object]] = []
    for item in raw_checks:
        values = _list(item, 32, "check")
        if len(values) != len(_CHECK_KEYS) + 3:
            raise CatalogDecodeError("malformed", "check fields")
        body = dict(zip(_CHECK_KEYS, values, strict=False))
        checks.append((body, values[-3], values[-2], values[-1]))
    try:
        return _record_from_fields(
            node=node,
            node_id=node_id,
            address=address,
            datacenter=datacenter,
            meta=meta,
            version=version,
            services=services,
            checks=checks,
            node_maintenance=node_maint,
            service_maintenance=service_maint,
        )
    except ValidationError as exc:
        raise CatalogDecodeError("invalid", str(exc)[:200]) from None


def _decode_ids(value: object) -> tuple[str, ...]:
    items = _list(value, MAX_CHECKS_PER_NODE, "removed ids")
    if not all(isinstance(i, str) and 0 < len(i) <= NAME_MAX_LENGTH for i in items):
        raise CatalogDecodeError("malformed", "removed ids")
    return tuple(items)


def decode_update(data: bytes) -> Update:
    """A catalog broadcast; raises ``CatalogDecodeError`` (only) if it is bad."""
    fields = _list(_unpack(data, MAX_RECORD_BYTES), 8, "update")
    if len(fields) != 5 or fields[0] != _UPDATE:
        raise CatalogDecodeError("malformed", "update")
    base = fields[1]
    if isinstance(base, bool) or not isinstance(base, int) or not 0 <= base < 2**63:
        raise CatalogDecodeError("malformed", "base")
    record = _decode_record(fields[2])
    if base >= record.version:
        raise CatalogDecodeError("malformed", "base not below version")
    return Update(base, record, _decode_ids(fields[3]), _decode_ids(fields[4]))


def decode_state(data: bytes) -> tuple[list[NodeRecord], int]:
    """A push-pull state: the records that decoded, and how many did not."""
    fields = _list(_unpack(data, MAX_STATE_BYTES), 4, "state")
    if len(fields) != 2 or fields[0] != _FULL_STATE:
        raise CatalogDecodeError("malformed", "state")
    records: list[NodeRecord] = []
    bad = 0
    for item in _list(fields[1], MAX_NODES, "records"):
        try:
            records.append(_decode_record(item))
        except CatalogDecodeError:
            bad += 1  # one bad record does not spoil the others
    return records, bad


def _newer(candidate: NodeRecord, current: NodeRecord | None) -> bool:
    """The merge rule: higher version wins; a tie between different contents goes to
    the larger encoding, so every replica picks the same one in any order."""
    if current is None or candidate.version > current.version:
        return True
    if candidate.version < current.version or candidate == current:
        return False
    return encode_record(candidate) > encode_record(current)


def _digest_term(node: str, version: int) -> int:
    material = node.encode() + b"\x00" + version.to_bytes(8, "big")
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big")


# --------------------------------------------------------------------------- query views


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    """One instance of a service with everything the catalog/health endpoints show."""

    node: NodeInfo
    service: ServiceDefinition
    checks: tuple[CheckView, ...]
    """Node checks (``serfHealth`` first, node maintenance) then the service's."""
    node_index: tuple[int, int]
    """(CreateIndex, ModifyIndex) of the node."""
    service_index: tuple[int, int]
    """(CreateIndex, ModifyIndex) of this instance."""

    @property
    def status(self) -> HealthStatus:
        return aggregate_status(self.checks)


def aggregate_status(checks: Iterable[CheckView]) -> HealthStatus:
    """Consul's ``HealthChecks.AggregatedStatus``: maintenance > critical > warning >
    passing; no checks is passing."""
    rank = {
        HealthStatus.PASSING: 0,
        HealthStatus.WARNING: 1,
        HealthStatus.CRITICAL: 2,
        HealthStatus.MAINTENANCE: 3,
    }
    worst = HealthStatus.PASSING
    for check in checks:
        status = check.status
        if check.check_id == NODE_MAINTENANCE_CHECK_ID or check.check_id.startswith(
            SERVICE_MAINTENANCE_PREFIX
        ):
            status = HealthStatus.MAINTENANCE
        if rank[status] > rank[worst]:
            worst = status
    return worst


@dataclass(slots=True)
class _Liveness:
    status: HealthStatus
    since: float


# --------------------------------------------------------------------------- catalog


class Catalog:
    """Every node's record; the local one written through the methods below."""

    def __init__(
        self,
        local: NodeInfo,
        *,
        queue: BroadcastQueue | None = None,
        version: int = 1,
        now: float = 0.0,
    ) -> None:
        """``queue`` receives our broadcasts (default: memberlist's LAN retransmit
        multiplier over the number of known nodes); ``version`` is where the local
        record starts (a restarted agent passes its persisted version)."""
        self.local_name = local.name
        self.queue = queue if queue is not None else BroadcastQueue(4, lambda: len(self._records))
        self._records: dict[str, NodeRecord] = {}
        # Service name -> nodes with an instance of it, so a health or catalog read of
        # one service does not scan every record (the API's hottest path).
        self._nodes_by_service: dict[str, set[str]] = {}
        self._liveness: dict[str, _Liveness] = {}
        self._reaped: dict[str, tuple[int, float]] = {}  # node -> (version, when)
        self._digest = 0
        self._tombstones: dict[tuple[str, str], int] = {}  # ("s"|"c", id) -> version
        self._tombstone_floor = 0
        self._now = now
        # Blocking-query indexes.
        self.index = 1
        self._node_index: dict[str, tuple[int, int]] = {}
        self._instance_index: dict[tuple[str, str], tuple[int, int]] = {}
        self._check_index: dict[tuple[str, str], tuple[int, int]] = {}
        self._service_name_index: dict[str, int] = {}
        self._service_index_floor = 1
        self._services_index = 1
        self._listeners: list[Callable[[int], None]] = []
        self.stats: dict[str, int] = {
            "decode_errors": 0,
            "merged": 0,
            "stale": 0,
            "deltas_applied": 0,
            "deltas_skipped": 0,
            "oversized_broadcasts": 0,
            "refuted": 0,
        }
        record = NodeRecord(
            local.name, local.node_id, local.address, local.datacenter, dict(local.meta), version
        )
        self._tombstone_floor = version
        self._store(record)
        self._broadcast(record)

    # ------------------------------------------------------------------ listeners

    def on_change(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """Call ``callback(index)`` after every change; returns an unsubscribe function."""
        self._listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return unsubscribe

    # ------------------------------------------------------------------ local writes

    @property
    def local(self) -> NodeRecord:
        """Our own record."""
        return self._records[self.local_name]

    def register_service(
        self,
        service: ServiceDefinition,
        checks: Sequence[CheckDefinition] = (),
        *,
        replace_existing_checks: bool = False,
    ) -> None:
        """Add or replace a local service and its checks (agent/service/register).

        A check that already exists keeps its current status and output, so an agent
        re-syncing its registrations (Nomad does, every few seconds) does not flap it.
        With ``replace_existing_checks`` the service's checks not listed are removed
        (Consul's ``?replace-existing-checks``).
        """
        for check in checks:
            if check.service_id != service.id:
                raise ValidationError("Checks", f"check {check.check_id!r} names another service")
            existing = self.local.checks.get(check.check_id)
            if existing is not None and existing.definition.service_id != service.id:
                raise ValidationError(
                    "Checks", f"check ID {check.check_id!r} is in use by another service or node"
                )
        self._check_upstream_ports(service)
        record = self.local
        version = record.version + 1
        services = dict(record.services)
        services[service.id] = service
        service_versions = dict(record.service_versions)
        if record.services.get(service.id) != service:
            service_versions[service.id] = version
        check_states = dict(record.checks)
        if replace_existing_checks:
            listed = {c.check_id for c in checks}
            for check_id, state in record.checks.items():
                if state.definition.service_id == service.id and check_id not in listed:
                    del check_states[check_id]
                    self._tombstone("c", check_id, version)
        for check in checks:
            check_states[check.check_id] = self._new_check_state(check, version)
        self._tombstones.pop(("s", service.id), None)
        self._write(
            replace(
                record,
                version=version,
                services=services,
                service_versions=service_versions,
                checks=check_states,
            )
        )

    def _check_upstream_ports(self, service: ServiceDefinition) -> None:
        """Two upstreams of this node's services cannot listen on one address and port
        (the proxy has one listener each): refuse the registration that would (400)."""
        declared = _declared_upstreams(service)
        if declared is None or not declared.listeners():
            return
        taken: dict[tuple[str, int], str] = {}
        for other in self.local.services.values():
            if other.id == service.id:
                continue  # being replaced
            theirs = _declared_upstreams(other)
            for upstream in theirs.listeners() if theirs is not None else ():
                taken[(upstream.bind_address, upstream.bind_port)] = other.id
        for upstream in declared.listeners():
            owner = taken.get((upstream.bind_address, upstream.bind_port))
            if owner is not None:
                where = f"{upstream.path}.LocalBindPort" if upstream.destination else upstream.path
                raise ValidationError(
                    where,
                    f"{upstream.bind_address}:{upstream.bind_port} is already an upstream"
                    f" of service {owner!r} on this agent",
                )

    def deregister_service(self, service_id: str) -> None:
        """Remove a local service with its checks and maintenance flag."""
        record = self.local
        if service_id not in record.services:
            raise NotFoundError(f"Unknown service ID {service_id!r}")
        version = record.version + 1
        services = {k: v for k, v in record.services.items() if k != service_id}
        checks = {}
        for check_id, state in record.checks.items():
            if state.definition.service_id == service_id:
                self._tombstone("c", check_id, version)
            else:
                checks[check_id] = state
        self._tombstone("s", service_id, version)
        self._write(
            replace(
                record,
                version=version,
                services=services,
                service_versions={
                    k: v for k, v in record.service_versions.items() if k != service_id
                },
                checks=checks,
                service_maintenance={
                    k: v for k, v in record.service_maintenance.items() if k != service_id
                },
            )
        )

    def register_check(self, check: CheckDefinition) -> None:
        """Add or replace a local check (agent/check/register). Its service must exist."""
        record = self.local
        if check.service_id and check.service_id not in record.services:
            raise ValidationError("ServiceID", f"service {check.service_id!r} does not exist")
        version = record.version + 1
        checks = dict(record.checks)
        checks[check.check_id] = self._new_check_state(check, version)
        self._write(replace(record, version=version, checks=checks))

    def deregister_check(self, check_id: str) -> None:
        """Remove a local check."""
        record = self.local
        if check_id not in record.checks:
            raise NotFoundError(f"Unknown check ID {check_id!r}")
        version = record.version + 1
        self._tombstone("c", check_id, version)
        checks = {k: v for k, v in record.checks.items() if k != check_id}
        self._write(replace(record, version=version, checks=checks))

    def update_check(self, check_id: str, status: HealthStatus, output: str = "") -> bool:
        """Record a check result. Returns False (and gossips nothing) when neither the
        status nor the output changed, as Consul's local state does."""
        record = self.local
        state = record.checks.get(check_id)
        if state is None:
            raise NotFoundError(f"Unknown check ID {check_id!r}")
        if status not in (HealthStatus.PASSING, HealthStatus.WARNING, HealthStatus.CRITICAL):
            raise ValidationError("Status", f"invalid status {status!r}")
        output = output[:OUTPUT_MAX_LENGTH]
        if state.status == status and state.output == output:
            return False
        version = record.version + 1
        checks = dict(record.checks)
        checks[check_id] = CheckState(state.definition, status, output, version)
        self._write(replace(record, version=version, checks=checks))
        return True

    def set_service_maintenance(self, service_id: str, enable: bool, reason: str = "") -> None:
        """Consul's service maintenance mode: a critical ``_service_maintenance:<id>``
        check while enabled."""
        record = self.local
        if service_id not in record.services:
            raise NotFoundError(f"Unknown service ID {service_id!r}")
        maintenance = dict(record.service_maintenance)
        if enable:
            maintenance[service_id] = reason[:TEXT_MAX_LENGTH] or SERVICE_MAINTENANCE_DEFAULT_REASON
        else:
            maintenance.pop(service_id, None)
        if maintenance == record.service_maintenance:
            return
        self._write(replace(record, version=record.version + 1, service_maintenance=maintenance))

    def set_node_maintenance(self, enable: bool, reason: str = "") -> None:
        """Consul's node maintenance mode: a critical ``_node_maintenance`` check."""
        record = self.local
        value = (reason[:TEXT_MAX_LENGTH] or NODE_MAINTENANCE_DEFAULT_REASON) if enable else None
        if value == record.node_maintenance:
            return
        self._write(replace(record, version=record.version + 1, node_maintenance=value))

    def set_local_node(self, info: NodeInfo) -> None:
        """Change our node's address, ID, datacenter or metadata (e.g. on reload)."""
        record = self.local
        if info.name != record.node:
            raise ValueError("the node name cannot change")
        if record.info == NodeInfo(
            info.name, info.node_id, info.address, info.datacenter, info.meta
        ):
            return
        self._write(
            replace(
                record,
                version=record.version + 1,
                node_id=info.node_id,
                address=info.address,
                datacenter=info.datacenter,
                meta=dict(info.meta),
            )
        )

    def restore_local(self, record: NodeRecord) -> None:
        """Load our persisted record (after a restart), at a version above both it
        and what we run with now, and gossip it."""
        if record.node != self.local_name:
            raise ValueError("not our record")
        version = max(record.version, self.local.version) + 1
        self._tombstones.clear()
        self._tombstone_floor = version
        services = dict(record.services)
        self._write(
            replace(
                record,
                version=version,
                services=services,
                service_versions=dict.fromkeys(services, version),
                checks={k: replace(c, updated=version) for k, c in record.checks.items()},
            )
        )

    def _new_check_state(self, check: CheckDefinition, version: int) -> CheckState:
        existing = self.local.checks.get(check.check_id)
        if existing is not None:
            if existing.definition == check:
                return existing
            return CheckState(check, existing.status, existing.output, version)
        return CheckState(check, check.status, "", version)

    def _tombstone(self, kind: str, item_id: str, version: int) -> None:
        self._tombstones[(kind, item_id)] = version
        if len(self._tombstones) > MAX_TOMBSTONES:
            oldest = min(self._tombstones, key=self._tombstones.__getitem__)
            self._tombstone_floor = max(self._tombstone_floor, self._tombstones.pop(oldest))

    def _write(self, record: NodeRecord) -> None:
        self._store(record)
        self._broadcast(record)

    def _broadcast(self, record: NodeRecord) -> None:
        """Queue the smallest-base message that fits: the whole record if possible."""
        message: bytes | None = encode_record(record)
        if message is not None and len(message) > BROADCAST_MAX_BYTES:
            message = self._delta_message(record)
        if message is None:
            # Too big even as a one-change delta: anti-entropy will carry it.
            self.stats["oversized_broadcasts"] += 1
            self.queue.invalidate(record.node)
            return
        self.queue.queue(message, record.node)

    def _delta_message(self, record: NodeRecord) -> bytes | None:
        floor = self._tombstone_floor
        versions = {floor, record.version - 1}
        versions.update(v for v in record.service_versions.values() if v > floor)
        versions.update(c.updated for c in record.checks.values() if c.updated > floor)
        versions.update(v for v in self._tombstones.values() if v > floor)
        bases = sorted(v for v in versions if 0 < v < record.version and v >= floor)

        def encode(base: int) -> bytes:
            removed = [(kind, i) for (kind, i), v in self._tombstones.items() if v > base]
            services = [i for kind, i in removed if kind == "s"]
            checks = [i for kind, i in removed if kind == "c"]
            return encode_delta(record, base, services, checks)

        # Smaller bases give bigger deltas: binary search for the smallest that fits.
        low, high = 0, len(bases)
        best: bytes | None = None
        while low < high:
            middle = (low + high) // 2
            message = encode(bases[middle])
            if len(message) <= BROADCAST_MAX_BYTES:
                best, high = message, middle
            else:
                low = middle + 1
        return best

    # ------------------------------------------------------------------ remote input

    def merge(self, record: NodeRecord) -> bool:
        """Apply a whole record from a peer; True if it changed our view."""
        if record.node == self.local_name:
            return self._refute(record)
        reaped = self._reaped.get(record.node)
        if reaped is not None and record.version <= reaped[0]:
            self.stats["stale"] += 1
            return False
        if not _newer(record, self._records.get(record.node)):
            self.stats["stale"] += 1
            return False
        self.stats["merged"] += 1
        self._store(record)
        return True

    def apply_update(self, update: Update) -> bool:
        """Apply a decoded broadcast (whole record or delta); True if it changed us."""
        if update.base == 0:
            return self.merge(update.record)
        delta = update.record
        current = self._records.get(delta.node)
        if delta.node == self.local_name:
            # Only a record of ourselves from a previous life can be newer: refute.
            if current is not None and delta.version >= current.version:
                self._refute(delta)
            return False
        if current is None or not update.base <= current.version < delta.version:
            self.stats["deltas_skipped"] += 1
            return False
        services = {k: v for k, v in current.services.items() if k not in update.removed_services}
        versions = {
            k: v for k, v in current.service_versions.items() if k not in update.removed_services
        }
        checks = {k: v for k, v in current.checks.items() if k not in update.removed_checks}
        services.update(delta.services)
        versions.update(delta.service_versions)
        checks.update(delta.checks)
        # A check whose service is gone went with it (its tombstone may be pruned).
        checks = {
            k: v
            for k, v in checks.items()
            if not v.definition.service_id or v.definition.service_id in services
        }
        merged = replace(
            delta,
            services=services,
            service_versions=versions,
            checks=checks,
            service_maintenance={
                k: v for k, v in delta.service_maintenance.items() if k in services
            },
        )
        self.stats["deltas_applied"] += 1
        self._store(merged)
        return True

    def _refute(self, record: NodeRecord) -> bool:
        current = self.local
        if record.version < current.version or record == current:
            return False
        # Someone holds a record of our node from a previous life at or above our
        # version: jump past it so ours wins everywhere (SWIM's refutation).
        self.stats["refuted"] += 1
        self._tombstone_floor = record.version + 1
        self._write(replace(current, version=record.version + 1))
        return False

    # ------------------------------------------------------------------ membership

    def on_member_event(self, event: MemberEvent, now: float) -> None:
        """Mirror gossip liveness into ``serfHealth`` (and reap departed nodes)."""
        self._now = now
        name = event.member.name
        if name == self.local_name:
            return  # our own serfHealth is always passing
        if isinstance(event, MemberReaped):
            self._reap(name, now)
        elif isinstance(event, MemberSuspected | MemberFailed | MemberLeft):
            self._set_liveness(name, HealthStatus.CRITICAL, now)
        elif isinstance(event, MemberJoined | MemberRecovered | MemberUpdated):
            self._reaped.pop(name, None)
            if event.member.state == MemberState.ALIVE:
                self._set_liveness(name, HealthStatus.PASSING, now)

    def sync_members(self, members: Iterable[Member], now: float) -> None:
        """Reconcile liveness with a full membership list (``Swim.members()``): nodes
        gossip does not know, or holds non-alive, are critical. For startup and as a
        periodic safety net against missed events."""
        states = {m.name: m.state for m in members}
        for name in list(self._records):
            if name == self.local_name:
                continue
            alive = states.get(name) == MemberState.ALIVE
            self._set_liveness(name, HealthStatus.PASSING if alive else HealthStatus.CRITICAL, now)

    def reap(self, now: float, after: float) -> list[str]:
        """Remove records of nodes whose ``serfHealth`` has been critical for ``after``
        seconds (``reconnect_timeout``), and forget old reap tombstones. Gossip's
        ``MemberReaped`` normally does this; this catches nodes gossip never knew."""
        self._now = now
        gone = [
            name
            for name, live in self._liveness.items()
            if live.status == HealthStatus.CRITICAL and now - live.since >= after
        ]
        for name in gone:
            self._reap(name, now)
        for name, (_, when) in list(self._reaped.items()):
            if now - when >= after:
                del self._reaped[name]
        return gone

    def _reap(self, name: str, now: float) -> None:
        record = self._records.get(name)
        if record is not None:
            self._reaped[name] = (record.version, now)
        self._liveness.pop(name, None)
        if record is not None:
            self._store(None, name=name)

    def _set_liveness(self, name: str, status: HealthStatus, now: float) -> None:
        current = self._liveness.get(name)
        if current is not None and current.status == status:
            return
        before = self._views(name)
        self._liveness[name] = _Liveness(status, now)
        self._changed(name, before, self._views(name))

    def liveness(self, name: str) -> HealthStatus:
        """The node's ``serfHealth`` status (passing until gossip says otherwise)."""
        if name == self.local_name:
            return HealthStatus.PASSING
        live = self._liveness.get(name)
        return live.status if live is not None else HealthStatus.PASSING

    # ------------------------------------------------------------------ storage + indexes

    def _store(self, record: NodeRecord | None, *, name: str = "") -> None:
        name = record.node if record is not None else name
        before = self._views(name)
        old = self._records.get(name)
        if old is not None:
            self._digest = (self._digest - _digest_term(name, old.version)) % 2**64
            for service in old.services.values():
                holders = self._nodes_by_service.get(service.name)
                if holders is not None:
                    holders.discard(name)
                    if not holders:
                        del self._nodes_by_service[service.name]
        if record is None:
            self._records.pop(name, None)
        else:
            self._records[name] = record
            self._digest = (self._digest + _digest_term(name, record.version)) % 2**64
            for service in record.services.values():
                self._nodes_by_service.setdefault(service.name, set()).add(name)
        self._changed(name, before, self._views(name))

    def _views(self, name: str) -> _NodeView | None:
        record = self._records.get(name)
        if record is None:
            return None
        return _NodeView.of(record, self.liveness(name))

    def _changed(self, name: str, before: _NodeView | None, after: _NodeView | None) -> None:
        if before == after:
            return
        index = self.index + 1
        names: set[str] = set()
        empty = _NodeView.empty()
        old, new = before or empty, after or empty
        node_changed = old.node != new.node or old.node_checks != new.node_checks
        if after is None:
            self._node_index.pop(name, None)
        elif before is None or old.node != new.node:
            created = self._node_index.get(name, (index, index))[0]
            self._node_index[name] = (created, index)
        for service_id in old.instances.keys() | new.instances.keys():
            was, now_ = old.instances.get(service_id), new.instances.get(service_id)
            key = (name, service_id)
            if now_ is None:
                self._instance_index.pop(key, None)
            elif was != now_:
                created = self._instance_index.get(key, (index, index))[0]
                self._instance_index[key] = (created, index)
            if was != now_ or node_changed:
                if was is not None:
                    names.add(was[0].name)
                if now_ is not None:
                    names.add(now_[0].name)
        for check_id in old.checks.keys() | new.checks.keys():
            was_check, now_check = old.checks.get(check_id), new.checks.get(check_id)
            key = (name, check_id)
            if now_check is None:
                self._check_index.pop(key, None)
            elif was_check != now_check:
                created = self._check_index.get(key, (index, index))[0]
                self._check_index[key] = (created, index)
        for service_id in old.service_checks.keys() | new.service_checks.keys():
            if old.service_checks.get(service_id) != new.service_checks.get(service_id):
                for view in (old, new):
                    if service_id in view.instances:
                        names.add(view.instances[service_id][0].name)
        for service_name in names:
            self._service_name_index[service_name] = index
        if old.tags != new.tags:
            self._services_index = index
        self._prune_service_indexes()
        self.index = index
        for listener in list(self._listeners):
            listener(index)

    def _prune_service_indexes(self) -> None:
        if len(self._service_name_index) <= MAX_SERVICE_INDEXES:
            return
        live = {s.name for r in self._records.values() for s in r.services.values()}
        for service_name, index in list(self._service_name_index.items()):
            if service_name not in live:
                # An unknown name reports the floor, which never goes below what
                # we forget, so no client sees its index go backwards.
                self._service_index_floor = max(self._service_index_floor, index)
                del self._service_name_index[service_name]

    # ------------------------------------------------------------------ gossip plumbing

    def state_digest(self) -> bytes:
        """Order-independent digest over (node, version) of every record."""
        return self._digest.to_bytes(8, "big")

    def records(self) -> list[NodeRecord]:
        """Every record, sorted by node name."""
        return [self._records[n] for n in sorted(self._records)]

    def record(self, node: str) -> NodeRecord | None:
        return self._records.get(node)

    # ------------------------------------------------------------------ queries: indexes

    def service_index(self, name: str) -> int:
        """Index at which anything in ``health_service(name)`` last changed (≥ 1)."""
        return max(self._service_name_index.get(name, 1), self._service_index_floor)

    def services_index(self) -> int:
        """Index at which ``services()`` (names and tags) last changed."""
        return self._services_index

    def node_index(self, node: str) -> int:
        """Index at which the node, its services or its checks last changed (or the
        global index when the node is unknown: its absence may be news)."""
        if node not in self._records:
            return self.index
        index = self._node_index.get(node, (1, 1))[1]
        for (n, _), (_, modify) in self._instance_index.items():
            if n == node:
                index = max(index, modify)
        for (n, _), (_, modify) in self._check_index.items():
            if n == node:
                index = max(index, modify)
        return index

    # ------------------------------------------------------------------ queries: data

    def services(self) -> dict[str, list[str]]:
        """``/v1/catalog/services``: every service name → its sorted, unique tags."""
        out: dict[str, set[str]] = {}
        for record in self._records.values():
            for service in record.services.values():
                out.setdefault(service.name, set()).update(service.tags)
        return {name: sorted(tags) for name, tags in sorted(out.items())}

    def nodes(self, node_meta: Mapping[str, str] | None = None) -> list[NodeInfo]:
        """``/v1/catalog/nodes``, optionally filtered by node metadata."""
        return [r.info for r in self.records() if _meta_matches(r.meta, node_meta)]

    def node(self, name: str) -> tuple[NodeInfo, list[ServiceDefinition]] | None:
        """``/v1/catalog/node/:node``: the node and its services."""
        record = self._records.get(name)
        if record is None:
            return None
        return record.info, [record.services[i] for i in sorted(record.services)]

    def node_indexes(self, name: str) -> tuple[int, int]:
        """(CreateIndex, ModifyIndex) of a node."""
        return self._node_index.get(name, (1, 1))

    def service_instances(
        self,
        name: str,
        tags: Sequence[str] = (),
        node_meta: Mapping[str, str] | None = None,
    ) -> list[ServiceInstance]:
        """``/v1/catalog/service/:name``: instances with every tag in ``tags`` (matched
        case-insensitively, as Consul's state store does) on nodes whose metadata
        has every ``node_meta`` pair. Sorted by node, then service ID."""
        wanted = [t.lower() for t in tags]
        out: list[ServiceInstance] = []
        for node in sorted(self._nodes_by_service.get(name, ())):
            record = self._records[node]
            if not _meta_matches(record.meta, node_meta):
                continue
            for service_id in sorted(record.services):
                service = record.services[service_id]
                if service.name != name:
                    continue
                have = {t.lower() for t in service.tags}
                if not all(t in have for t in wanted):
                    continue
                out.append(self._instance(record, service))
        return out

    def health_service(
        self,
        name: str,
        *,
        passing_only: bool = False,
        tags: Sequence[str] = (),
        node_meta: Mapping[str, str] | None = None,
    ) -> list[ServiceInstance]:
        """``/v1/health/service/:name``. With ``passing_only`` (``?passing``), only
        instances whose every check, node checks included, is passing."""
        instances = self.service_instances(name, tags, node_meta)
        if passing_only:
            instances = [
                i for i in instances if all(c.status == HealthStatus.PASSING for c in i.checks)
            ]
        return instances

    def checks_for_service(self, name: str) -> list[CheckView]:
        """``/v1/health/checks/:service``: the service's own checks on every node."""
        out: list[CheckView] = []
        for node in sorted(self._nodes_by_service.get(name, ())):
            record = self._records[node]
            for service_id in sorted(record.services):
                if record.services[service_id].name == name:
                    out.extend(self._service_checks(record, service_id))
        return out

    def node_checks(self, node: str) -> list[CheckView]:
        """``/v1/health/node/:node``: node checks (serfHealth first) and service checks."""
        record = self._records.get(node)
        if record is None:
            return []
        out = self._node_check_views(record)
        for service_id in sorted(record.services):
            out.extend(self._service_checks(record, service_id))
        return out

    def checks_in_state(self, state: str) -> list[CheckView]:
        """``/v1/health/state/:state`` (``any``, ``passing``, ``warning``, ``critical``)."""
        if state not in ("any", "passing", "warning", "critical"):
            raise ValidationError("state", f"unknown state {state!r}")
        out: list[CheckView] = []
        for record in self.records():
            out.extend(c for c in self.node_checks(record.node) if state in ("any", c.status))
        return out

    def local_services(self) -> dict[str, ServiceDefinition]:
        """``/v1/agent/services``: our services by ID."""
        return dict(sorted(self.local.services.items()))

    def local_checks(self) -> dict[str, CheckView]:
        """``/v1/agent/checks``: our checks by ID (maintenance included, no serfHealth,
        which is a cluster-side check in Consul)."""
        views = [c for c in self.node_checks(self.local_name) if c.check_id != SERF_CHECK_ID]
        return {c.check_id: c for c in views}

    # ------------------------------------------------------------------ view building

    def _instance(self, record: NodeRecord, service: ServiceDefinition) -> ServiceInstance:
        checks = self._node_check_views(record) + self._service_checks(record, service.id)
        return ServiceInstance(
            node=record.info,
            service=service,
            checks=tuple(checks),
            node_index=self._node_index.get(record.node, (1, 1)),
            service_index=self._instance_index.get((record.node, service.id), (1, 1)),
        )

    def _indexes(self, node: str, check_id: str) -> tuple[int, int]:
        return self._check_index.get((node, check_id), (1, 1))

    def _node_check_views(self, record: NodeRecord) -> list[CheckView]:
        node = record.node
        live = self.liveness(node)
        views = [
            CheckView(
                node,
                SERF_CHECK_ID,
                SERF_CHECK_NAME,
                live,
                output=SERF_ALIVE_OUTPUT if live == HealthStatus.PASSING else SERF_DEAD_OUTPUT,
                create_index=self._indexes(node, SERF_CHECK_ID)[0],
                modify_index=self._indexes(node, SERF_CHECK_ID)[1],
            )
        ]
        if record.node_maintenance is not None:
            created, modified = self._indexes(node, NODE_MAINTENANCE_CHECK_ID)
            views.append(
                CheckView(
                    node,
                    NODE_MAINTENANCE_CHECK_ID,
                    NODE_MAINTENANCE_NAME,
                    HealthStatus.CRITICAL,
                    notes=record.node_maintenance,
                    create_index=created,
                    modify_index=modified,
                )
            )
        for check_id in sorted(record.checks):
            state = record.checks[check_id]
            if not state.definition.service_id:
                views.append(self._check_view(record, state))
        return views

    def _service_checks(self, record: NodeRecord, service_id: str) -> list[CheckView]:
        service = record.services[service_id]
        views: list[CheckView] = []
        reason = record.service_maintenance.get(service_id)
        if reason is not None:
            check_id = SERVICE_MAINTENANCE_PREFIX + service_id
            created, modified = self._indexes(record.node, check_id)
            views.append(
                CheckView(
                    record.node,
                    check_id,
                    SERVICE_MAINTENANCE_NAME,
                    HealthStatus.CRITICAL,
                    notes=reason,
                    service_id=service_id,
                    service_name=service.name,
                    service_tags=service.tags,
                    create_index=created,
                    modify_index=modified,
                )
            )
        for check_id in sorted(record.checks):
            state = record.checks[check_id]
            if state.definition.service_id == service_id:
                views.append(self._check_view(record, state))
        return views

    def _check_view(self, record: NodeRecord, state: CheckState) -> CheckView:
        definition = state.definition
        service = record.services.get(definition.service_id)
        created, modified = self._indexes(record.node, definition.check_id)
        return CheckView(
            record.node,
            definition.check_id,
            definition.name,
            state.status,
            notes=definition.notes,
            output=state.output,
            service_id=definition.service_id,
            service_name=service.name if service is not None else "",
            service_tags=service.tags if service is not None else (),
            definition=definition,
            create_index=created,
            modify_index=modified,
        )


def _meta_matches(meta: Mapping[str, str], wanted: Mapping[str, str] | None) -> bool:
    return not wanted or all(meta.get(k) == v for k, v in wanted.items())


def _declared_upstreams(service: ServiceDefinition) -> ConnectUpstreams | None:
    """A service's upstreams; None when it declares none or they do not parse (a
    ``connect-proxy`` registration is not validated at registration)."""
    try:
        return connect_upstreams(service)
    except ValidationError:
        return None


@dataclass(frozen=True, slots=True)
class _NodeView:
    """What queries can see of one node, for diffing (indexes, change detection)."""

    node: tuple[str, str, str, tuple[tuple[str, str], ...]]
    instances: Mapping[str, tuple[ServiceDefinition, str | None]]
    checks: Mapping[str, tuple[str, str, str, CheckDefinition | None]]
    node_checks: tuple[tuple[str, str, str], ...]
    service_checks: Mapping[str, tuple[tuple[str, str, str], ...]]
    tags: tuple[tuple[str, tuple[str, ...]], ...]

    @staticmethod
    def empty() -> _NodeView:
        return _NodeView(("", "", "", ()), {}, {}, (), {}, ())

    @staticmethod
    def of(record: NodeRecord, live: HealthStatus) -> _NodeView:
        checks: dict[str, tuple[str, str, str, CheckDefinition | None]] = {
            SERF_CHECK_ID: (live.value, "", "", None)
        }
        if record.node_maintenance is not None:
            checks[NODE_MAINTENANCE_CHECK_ID] = ("critical", record.node_maintenance, "", None)
        for service_id, reason in record.service_maintenance.items():
            checks[SERVICE_MAINTENANCE_PREFIX + service_id] = ("critical", reason, service_id, None)
        for check_id, state in record.checks.items():
            checks[check_id] = (
                state.status.value,
                state.output,
                state.definition.service_id,
                state.definition,
            )
        node_checks = tuple(sorted((k, v[0], v[1]) for k, v in checks.items() if not v[2]))
        service_checks: dict[str, list[tuple[str, str, str]]] = {}
        for check_id, value in checks.items():
            if value[2]:
                service_checks.setdefault(value[2], []).append(
                    (check_id, value[0], repr(value[3]) + value[1])
                )
        return _NodeView(
            node=(
                record.node_id,
                record.address,
                record.datacenter,
                tuple(sorted(record.meta.items())),
            ),
            instances={
                i: (s, record.service_maintenance.get(i)) for i, s in record.services.items()
            },
            checks=checks,
            node_checks=node_checks,
            service_checks={k: tuple(sorted(v)) for k, v in service_checks.items()},
            tags=tuple(sorted((s.name, s.tags) for s in record.services.values())),
        )


# --------------------------------------------------------------------------- delegate


class CatalogDelegate(Delegate):
    """Plugs a ``Catalog`` into the gossip layer (``Swim(..., delegate=...)``)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.decode_errors: dict[str, int] = {}
        """Rejected catalog messages by reason (for ``meshnode_catalog_*`` metrics)."""
        self.repaired_by_push_pull = 0
        """Records that push-pull brought us (news that gossip did not)."""

    def _reject(self, error: RemoteProtocolError) -> None:
        self.decode_errors[error.reason] = self.decode_errors.get(error.reason, 0) + 1
        self.catalog.stats["decode_errors"] += 1

    def broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        return self.catalog.queue.get(overhead, limit)

    def notify_message(self, message: bytes) -> None:
        try:
            update = decode_update(message)
        except CatalogDecodeError as exc:
            self._reject(exc)
            return
        if self.catalog.apply_update(update):
            # Re-gossip what was news to us (memberlist's rebroadcast of user
            # messages): the queue's subject keeps only the newest per node.
            self.catalog.queue.queue(message, update.record.node)

    def local_state(self, join: bool) -> bytes:
        return encode_state(self.catalog.records())

    def merge_remote_state(self, state: bytes, join: bool) -> None:
        try:
            records, bad = decode_state(state)
        except CatalogDecodeError as exc:
            self._reject(exc)
            return
        for _ in range(bad):
            self._reject(CatalogDecodeError("invalid"))
        for record in records:
            if self.catalog.merge(record):
                self.repaired_by_push_pull += 1

    def state_digest(self) -> bytes:
        return self.catalog.state_digest()
