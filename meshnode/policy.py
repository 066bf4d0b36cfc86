"""Policy: intentions and config entries, validated, signed and replicated (pure: no I/O).

Theory of operation
-------------------
*Policy* is what the proxies enforce: **intentions** (which service may talk to which,
optionally per HTTP request) and four kinds of **config entries** (``service-defaults``,
``service-resolver``, ``service-splitter``, ``service-router``), all in the JSON shapes of
Consul's HTTP API so Consul clients and tools work unchanged.

Writing (DESIGN.md "Agent → Policy"). An API write is parsed here (``parse_intention``,
``parse_config_entry``), raising ``ValidationError(path, message)`` for the 400, then
checked against the other entries (``validate_against`` / ``validate_delete``: a splitter
naming a subset its resolver lacks, a router on a tcp service...). The agent forwards
it to the leader, which stamps a ``Version`` — (leader term, hybrid logical clock) —
with ``PolicyStore.prepare_write``, signs ``signing_payload(entry)`` (``sign_entry``)
and applies it to its own store, which gossips it.

Replicating. ``PolicyStore`` is a last-writer-wins map keyed by (kind, name): an entry
replaces ours only if its version is higher and its signature verifies against the
trust bundle (an injected ``verify`` callable). Deletions are tombstones (a versioned
entry with no value) kept ``tombstone_ttl`` and then collected by ``gc(now)``. Each
accepted entry is queued as a broadcast (messages start with ``b"P"``); push-pull
carries the whole map, and ``digest()`` — an order-independent sum over every entry's
signed bytes — lets gossip skip the exchange when two agents already agree.

Why (term, HLC): the term orders leaders (a new leader's writes beat anything an older
one signed, even if the old leader's clock ran ahead), and the hybrid logical clock
(Kulkarni et al., "Logical Physical Clocks", 2014) orders writes within a term while
staying close to wall time, so versions are unique, monotonic across leader changes
(the clock absorbs every version it sees) and readable as timestamps.

Enforcing. ``IntentionIndex.build(intentions)`` precompiles intentions into a dict
keyed by (source, destination) so ``decide`` is at most four lookups in Consul's
precedence order; ``authorize`` is the one-shot form. Config entries are plain frozen
values the proxy snapshot builder reads (``ServiceRouter.route``, ``Filter.matches``,
``UpstreamConfig.for_upstream``...). The per-request HTTP conditions (``HttpRequest``,
``HttpMatch``, ``HeaderMatch``, ``QueryParamMatch``) and their semantics are defined
once, in ``proxy.match`` where the proxy enforces them; this module re-exports them,
parses Consul's shapes into them and renders them back (``http_match_to_body``...).

References: Consul docs connect/intentions ("Precedence and match order"),
api-docs/connect/intentions, config-entries/service-intentions, service-defaults,
service-resolver, service-splitter, service-router; Consul ``structs``
(config_entry_discoverychain.go ``Validate``) for the error cases; go-bexpr for the
filter syntax; ``proxy.match`` for the Envoy route and header matching semantics.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Final, Literal, NoReturn, TypeAlias

import msgpack

from gossip.broadcast import BroadcastQueue
from gossip.errors import RemoteProtocolError
from meshnode.errors import MeshError
from meshnode.model import (
    NAME_MAX_LENGTH,
    TEXT_MAX_LENGTH,
    Body,
    NodeInfo,
    ServiceDefinition,
    ValidationError,
    format_duration,
    normalize_key,
    string_list,
    type_name,
    validate_meta,
)
from proxy.match import HeaderMatch as HeaderMatch
from proxy.match import HeaderMatchKind as HeaderMatchKind
from proxy.match import HttpMatch as HttpMatch
from proxy.match import HttpRequest as HttpRequest
from proxy.match import QueryParamMatch as QueryParamMatch
from proxy.match import compiled_regex

# --------------------------------------------------------------------------- constants

KIND_INTENTION: Final = "intention"
KIND_SERVICE_DEFAULTS: Final = "service-defaults"
KIND_SERVICE_RESOLVER: Final = "service-resolver"
KIND_SERVICE_SPLITTER: Final = "service-splitter"
KIND_SERVICE_ROUTER: Final = "service-router"
#: Config entry kinds served under ``/v1/config/:kind``.
CONFIG_KINDS: Final = (
    KIND_SERVICE_DEFAULTS,
    KIND_SERVICE_RESOLVER,
    KIND_SERVICE_SPLITTER,
    KIND_SERVICE_ROUTER,
)
#: Everything the store holds.
POLICY_KINDS: Final = frozenset({KIND_INTENTION, *CONFIG_KINDS})

#: Intentions use the wildcard ``*`` for "any service" (connect/intentions).
WILDCARD: Final = "*"
#: The only namespace we have: Consul CE's (namespaces are an Enterprise feature).
DEFAULT_NAMESPACE: Final = "default"
#: Consul's separator in an intention's display name and our store key ("web => db").
INTENTION_KEY_SEPARATOR: Final = "=>"
#: Namespace for intention IDs: uuid5(namespace, "src=>dst") is the same on every agent.
_INTENTION_ID_NAMESPACE: Final = uuid.UUID("5d1c8f7e-4a3b-5c2d-9e1f-6a7b8c9d0e1f")

#: Consul caps an intention's Description at 512 characters (metaValueMaxLength).
DESCRIPTION_MAX_LENGTH: Final = 512
#: Bounds that keep one entry small enough to gossip and cheap to evaluate per request.
PERMISSIONS_MAX: Final = 128
ROUTES_MAX: Final = 256
SPLITS_MAX: Final = 64
SUBSETS_MAX: Final = 128
FAILOVER_TARGETS_MAX: Final = 16
MATCHES_MAX: Final = 32
HASH_POLICIES_MAX: Final = 16
OVERRIDES_MAX: Final = 256
STATUS_CODES_MAX: Final = 32
#: Regexes run per request in Python's backtracking engine: keep them short.
REGEX_MAX_LENGTH: Final = 1024
FILTER_MAX_LENGTH: Final = 1024
#: Retries beyond this only multiply load on a failing service.
NUM_RETRIES_MAX: Final = 100
#: Envoy's ring hash bound (RingHashLbConfig.maximum_ring_size: 8M).
RING_SIZE_MAX: Final = 8_388_608
#: Milliseconds fields (ConnectTimeoutMs...) above a day are a mistake.
MILLISECONDS_MAX: Final = 24 * 3600 * 1000
#: Counters such as MaxConnections are uint32 in Consul.
COUNT_MAX: Final = 2**32 - 1

#: HTTP methods Consul accepts in routes and permissions (isValidHTTPMethod).
HTTP_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE"}
)
#: Consul service-subset names are DNS labels (structs.validateServiceSubset).
_SUBSET_NAME: Final = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
SUBSET_NAME_MAX_LENGTH: Final = 63

#: Protocols service-defaults may set. Consul also has http2 and grpc; our proxy speaks
#: HTTP/1.1 only, so those are refused rather than silently downgraded.
PROTOCOLS: Final = frozenset({"tcp", "http"})
_UNSUPPORTED_PROTOCOLS: Final = frozenset({"http2", "grpc"})
#: Load-balancing policies (Consul's validLBPolicies without maglev, which our proxy
#: does not implement; ring_hash gives the same consistent-hashing guarantees).
LB_POLICIES: Final = frozenset({"", "round_robin", "least_request", "random", "ring_hash"})
HASH_FIELDS: Final = frozenset({"header", "cookie", "query_parameter"})
#: Retry conditions (Consul's isValidRetryCondition) that mean something to an
#: HTTP/1.1 proxy. The others are HTTP/2, gRPC or Envoy specific.
RETRY_CONDITIONS: Final = frozenset(
    {"5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx"}
)
_UNSUPPORTED_RETRY_CONDITIONS: Final = frozenset(
    {
        "envoy-ratelimited",
        "refused-stream",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)

#: Split weights are percentages with at most two decimals (Consul scales them to
#: 1/10000 units: structs.scaleWeight); they must add up to exactly 100.00.
WEIGHT_SCALE: Final = 100
WEIGHT_TOTAL: Final = 100 * WEIGHT_SCALE

#: Tombstones live a week. That is longer than ``reconnect_timeout`` (72 h, Consul's
#: default): a member partitioned away for less than that still holds pre-deletion
#: entries and may push them back on reconnect; the tombstone (higher version) must
#: still be here to refuse them. Members gone longer are reaped from gossip.
DEFAULT_TOMBSTONE_TTL: Final = 7 * 24 * 3600.0

#: First byte of every policy gossip message (the catalog's is ``C``); the agent routes
#: gossip user messages and push-pull state by it.
WIRE_TYPE: Final = 0x50  # "P"
_ENTRY_MESSAGE, _STATE_MESSAGE = 1, 2
#: Prefix of every signed payload: a signature over policy can never be mistaken for
#: one over anything else the same key signs (domain separation).
SIGNING_DOMAIN: Final = "meshnode-policy-v1"
#: Largest broadcast we queue (a datagram share, as the catalog's); bigger entries
#: spread by push-pull only.
BROADCAST_MAX_BYTES: Final = 1024
#: Decoder bounds: one entry, a whole push-pull state (gossip's max_stream_size).
MAX_ENTRY_BYTES: Final = 256 * 1024
MAX_STATE_BYTES: Final = 32 * 1024 * 1024
MAX_ENTRIES: Final = 65_536
#: DER ECDSA P-256 signatures are ≤ 72 bytes; 512 leaves room for RSA-4096.
MAX_SIGNATURE_BYTES: Final = 512
KEY_ID_MAX_LENGTH: Final = 256
_UINT63: Final = 2**63


# --------------------------------------------------------------------------- errors


class PolicyDecodeError(RemoteProtocolError):
    """A peer's policy message is malformed or out of bounds: drop it and count it."""


class StaleTermError(MeshError):
    """This server tried to sign with a term older than one already seen in policy: it
    is not the leader any more (the API answers 503)."""


# --------------------------------------------------------------------------- helpers


def _path(base: str, key: str) -> str:
    return f"{base}.{key}" if base else key


def _known_fields(
    fields: Body, allowed: Iterable[str], what: str, unsupported: Iterable[str] = ()
) -> None:
    """Refuse keys we do not know, as Consul's config-entry decoder does
    (mapstructure ``ErrorUnused``): a typo must not silently change nothing."""
    known = {normalize_key(name) for name in allowed}
    refused = {normalize_key(name) for name in unsupported}
    for normal, original in fields.names.items():
        if normal in known:
            continue
        where = _path(fields.path, original)
        if normal in refused:
            raise ValidationError(where, f"{original} is not supported by meshnode")
        raise ValidationError(where, f"unknown field {original!r} in {what}")


def _namespace(fields: Body, *names: str) -> None:
    """Consul CE has one namespace and one partition, both "default"."""
    for name in names:
        value = fields.string(name)
        if value not in ("", DEFAULT_NAMESPACE):
            raise ValidationError(
                fields.sub(name), f'{value!r}: only the "default" namespace and partition exist'
            )


def _service_name(
    value: str, path: str, *, wildcard: bool = False, what: str = "service name"
) -> str:
    if not value:
        raise ValidationError(path, f"missing {what}")
    if value == WILDCARD:
        if not wildcard:
            raise ValidationError(path, "wildcard '*' is only valid in intentions")
        return value
    if WILDCARD in value:
        # Consul: "wildcard character '*' cannot be used with partial values".
        raise ValidationError(path, f"{value!r}: wildcard '*' cannot be used with partial values")
    if (
        "/" in value
        or INTENTION_KEY_SEPARATOR in value
        or any(ord(c) < 0x20 or ord(c) == 0x7F or c.isspace() for c in value)
    ):
        raise ValidationError(
            path, f"{what} {value!r} must not contain '/', '=>', spaces or control characters"
        )
    return value


def _optional_service(fields: Body, name: str) -> str:
    value = fields.string(name)
    return _service_name(value, fields.sub(name)) if value else ""


def _subset_name(value: str, path: str) -> str:
    if len(value) > SUBSET_NAME_MAX_LENGTH or not _SUBSET_NAME.match(value):
        raise ValidationError(
            path,
            f"subset name {value!r} must be a DNS label: lowercase letters, digits and '-',"
            f" at most {SUBSET_NAME_MAX_LENGTH} characters",
        )
    return value


def _optional_subset(fields: Body, name: str) -> str:
    value = fields.string(name)
    return _subset_name(value, fields.sub(name)) if value else ""


def _list(fields: Body, name: str, most: int) -> list[tuple[object, str]]:
    """A list field's items with their paths (``Routes[2]``); absent is empty."""
    value = fields.get(name)
    if value is None:
        return []
    path = fields.sub(name)
    if not isinstance(value, list):
        raise ValidationError(path, f"expected a list, got {type_name(value)}")
    if len(value) > most:
        raise ValidationError(path, f"more than {most} entries")
    return [(item, f"{path}[{position}]") for position, item in enumerate(value)]


def _object(fields: Body, name: str) -> Body | None:
    value = fields.get(name)
    return None if value is None else Body(value, fields.sub(name))


def _number(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(path, f"expected a number, got {type_name(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValidationError(path, "must be a finite number")
    return number


def _optional_count(fields: Body, name: str, high: int = COUNT_MAX) -> int | None:
    return None if fields.get(name) is None else fields.integer(name, low=0, high=high)


def _optional_duration(fields: Body, name: str) -> float | None:
    seconds = fields.duration(name)
    return seconds if seconds else None


def _regex(value: str, path: str) -> str:
    """Validate a regular expression. Consul (via Envoy) uses RE2; we refuse the
    Python-only constructs RE2 lacks, so an entry means the same thing everywhere."""
    if len(value) > REGEX_MAX_LENGTH:
        raise ValidationError(path, f"regex longer than {REGEX_MAX_LENGTH} characters")
    if re.search(r"\(\?<?[=!]|\\[1-9]|\(\?P=", value):
        raise ValidationError(path, f"regex {value!r}: lookaround and backreferences are not RE2")
    try:
        compiled_regex(value)
    except re.error as exc:
        raise ValidationError(path, f"invalid regex {value!r}: {exc}") from None
    return value


def _methods(fields: Body, name: str) -> tuple[str, ...]:
    if fields.get(name) is None:
        return ()
    path = fields.sub(name)
    methods = string_list(fields.get(name), path, most=len(HTTP_METHODS), limit=16)
    out: list[str] = []
    for method in methods:
        upper = method.upper()  # Consul's Normalize upper-cases methods
        if upper not in HTTP_METHODS:
            raise ValidationError(path, f"invalid HTTP method {method!r}")
        if upper in out:
            raise ValidationError(path, f"method {upper!r} appears more than once")
        out.append(upper)
    return tuple(out)


def _meta(fields: Body) -> dict[str, str]:
    value = fields.get("Meta")
    return {} if value is None else validate_meta(value, fields.sub("Meta"))


def _drop_empty(body: dict[str, Any]) -> dict[str, Any]:
    """Consul's ``json:",omitempty"``: leave out unset values in output shapes."""
    return {k: v for k, v in body.items() if v not in (None, "", [], {}, False, 0)}


def _duration_out(seconds: float | None) -> str | None:
    return None if seconds is None else format_duration(seconds)


# --------------------------------------------------------------------------- HTTP matching

# The matching types and their semantics live in ``proxy.match`` (the proxy evaluates
# them per request and may not import meshnode); here they are parsed from and rendered
# to Consul's JSON shapes.


def header_match_to_body(match: HeaderMatch) -> dict[str, Any]:
    """A ``Header`` condition in Consul's shape (one of Present/Exact/.../Regex)."""
    body: dict[str, Any] = {"Name": match.name}
    body["Present" if match.kind == "present" else match.kind.capitalize()] = (
        True if match.kind == "present" else match.value
    )
    if match.invert:
        body["Invert"] = True
    return body


def query_param_match_to_body(match: QueryParamMatch) -> dict[str, Any]:
    """A ``QueryParam`` condition in Consul's shape (one of Present/Exact/Regex)."""
    if match.kind == "present":
        return {"Name": match.name, "Present": True}
    return {"Name": match.name, match.kind.capitalize(): match.value}


def http_match_to_body(match: HttpMatch) -> dict[str, Any]:
    """An ``HTTP`` match (route ``Match.HTTP`` / permission ``HTTP``), unset keys left out."""
    return _drop_empty(
        {
            "PathExact": match.path_exact,
            "PathPrefix": match.path_prefix,
            "PathRegex": match.path_regex,
            "Header": [header_match_to_body(h) for h in match.headers],
            "QueryParam": [query_param_match_to_body(q) for q in match.query_params],
            "Methods": list(match.methods),
        }
    )


_HEADER_KINDS: Final[tuple[tuple[str, HeaderMatchKind], ...]] = (
    ("Present", "present"),
    ("Exact", "exact"),
    ("Prefix", "prefix"),
    ("Suffix", "suffix"),
    ("Regex", "regex"),
)


def _parse_header_match(value: object, path: str, *, strict: bool) -> HeaderMatch:
    fields = Body(value, path)
    if strict:
        _known_fields(fields, ("Name", "Invert", *(k for k, _ in _HEADER_KINDS)), "a header match")
    name = fields.string("Name")
    if not name:
        raise ValidationError(fields.sub("Name"), "missing required Name")
    chosen = [
        (key, kind)
        for key, kind in _HEADER_KINDS
        if (fields.boolean(key) if kind == "present" else fields.string(key, limit=TEXT_MAX_LENGTH))
    ]
    if len(chosen) != 1:
        # Consul: "should only contain one of Present, Exact, Prefix, Suffix, or Regex".
        raise ValidationError(path, "set exactly one of Present, Exact, Prefix, Suffix or Regex")
    key, kind = chosen[0]
    text = "" if kind == "present" else fields.string(key, limit=TEXT_MAX_LENGTH)
    if kind == "regex":
        _regex(text, fields.sub(key))
    return HeaderMatch(name, kind, text, fields.boolean("Invert"))


def _parse_query_match(value: object, path: str) -> QueryParamMatch:
    fields = Body(value, path)
    _known_fields(fields, ("Name", "Present", "Exact", "Regex"), "a query parameter match")
    name = fields.string("Name")
    if not name:
        raise ValidationError(fields.sub("Name"), "missing required Name")
    present = fields.boolean("Present")
    exact = fields.string("Exact", limit=TEXT_MAX_LENGTH)
    regex = fields.string("Regex", limit=TEXT_MAX_LENGTH)
    if sum((present, bool(exact), bool(regex))) != 1:
        raise ValidationError(path, "set exactly one of Present, Exact or Regex")
    if present:
        return QueryParamMatch(name, "present")
    if exact:
        return QueryParamMatch(name, "exact", exact)
    return QueryParamMatch(name, "regex", _regex(regex, fields.sub("Regex")))


def _parse_http_match(value: object, path: str, *, route: bool) -> HttpMatch:
    fields = Body(value, path)
    keys = ["PathExact", "PathPrefix", "PathRegex", "Header", "Methods"]
    if route:
        keys.append("QueryParam")
        _known_fields(fields, keys, "an HTTP match")
    exact = fields.string("PathExact", limit=TEXT_MAX_LENGTH)
    prefix = fields.string("PathPrefix", limit=TEXT_MAX_LENGTH)
    regex = fields.string("PathRegex", limit=TEXT_MAX_LENGTH)
    if sum(map(bool, (exact, prefix, regex))) > 1:
        raise ValidationError(path, "set at most one of PathExact, PathPrefix or PathRegex")
    for key, text in (("PathExact", exact), ("PathPrefix", prefix)):
        if text and not text.startswith("/"):
            raise ValidationError(fields.sub(key), f"{text!r} doesn't start with '/'")
    if regex:
        _regex(regex, fields.sub("PathRegex"))
    headers = tuple(
        _parse_header_match(item, where, strict=route)
        for item, where in _list(fields, "Header", MATCHES_MAX)
    )
    query = (
        tuple(
            _parse_query_match(item, where)
            for item, where in _list(fields, "QueryParam", MATCHES_MAX)
        )
        if route
        else ()
    )
    return HttpMatch(exact, prefix, regex, headers, query, _methods(fields, "Methods"))


# --------------------------------------------------------------------------- intentions


class IntentionAction(enum.StrEnum):
    """What an intention (or one of its permissions) does: Consul's ``Action``."""

    ALLOW = "allow"
    DENY = "deny"


def _action(fields: Body, *, permissions_allowed: bool) -> IntentionAction:
    text = fields.string("Action").lower()
    if not text:
        alternative = " (or set Permissions)" if permissions_allowed else ""
        raise ValidationError(
            fields.sub("Action"), f"missing Action: 'allow' or 'deny'{alternative}"
        )
    if text not in ("allow", "deny"):
        raise ValidationError(fields.sub("Action"), f"must be 'allow' or 'deny', got {text!r}")
    return IntentionAction(text)


@dataclass(frozen=True, slots=True)
class Permission:
    """One L7 permission (service-intentions ``Sources[].Permissions[]``)."""

    action: IntentionAction
    http: HttpMatch

    def to_body(self) -> dict[str, Any]:
        return {"Action": self.action.value, "HTTP": http_match_to_body(self.http)}


@dataclass(frozen=True, slots=True)
class Intention:
    """A Consul intention: ``source`` may (not) talk to ``destination``.

    Either ``action`` is set (an L4 intention) or ``permissions`` is non-empty (L7),
    never both. ``*`` as a name matches any service.
    """

    kind: ClassVar[str] = KIND_INTENTION

    source: str
    destination: str
    action: IntentionAction | None = None
    permissions: tuple[Permission, ...] = ()
    description: str = ""
    meta: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The store key: Consul's exact pair, ``"<source>=><destination>"``."""
        return intention_key(self.source, self.destination)

    @property
    def id(self) -> str:
        """A UUID derived from the pair, so every agent shows the same ``ID``."""
        return intention_id(self.source, self.destination)

    @property
    def precedence(self) -> int:
        return precedence(self.source, self.destination)

    def __str__(self) -> str:
        # Consul's Intention.String(): "web => db (allow)".
        what = self.action.value if self.action is not None else "L7"
        return f"{self.source} => {self.destination} ({what})"


def intention_key(source: str, destination: str) -> str:
    """The store name of the intention for this exact pair."""
    return f"{source}{INTENTION_KEY_SEPARATOR}{destination}"


def intention_id(source: str, destination: str) -> str:
    """Consul-style ``ID`` (a UUID) derived deterministically from the pair."""
    return str(uuid.uuid5(_INTENTION_ID_NAMESPACE, intention_key(source, destination)))


def precedence(source: str, destination: str) -> int:
    """Consul's intention precedence (connect/intentions, "Precedence and match order";
    structs.Intention.UpdatePrecedence). With namespaces always exact ("default"), the
    table's rows that apply are: exact → exact 9, * → exact 8, exact → * 6, * → * 5."""
    if destination != WILDCARD:
        return 9 if source != WILDCARD else 8
    return 6 if source != WILDCARD else 5


def parse_intention(
    body: object, *, source: str | None = None, destination: str | None = None
) -> Intention:
    """An intention body (``PUT /v1/connect/intentions/exact?source=&destination=``,
    ``POST /v1/connect/intentions``). ``source``/``destination`` come from the query
    string of the exact endpoint; a body naming a different pair is refused.

    Unknown keys are ignored, as Go's JSON decoder does for this endpoint (clients send
    back what they read: ``ID``, ``Precedence``, ``CreateIndex``...).
    """
    fields = Body(body, "")
    names: dict[str, str] = {}
    for key, given in (("SourceName", source), ("DestinationName", destination)):
        text = fields.string(key)
        if given is not None:
            if text and text != given:
                query = "source" if key == "SourceName" else "destination"
                raise ValidationError(fields.sub(key), f"{text!r} disagrees with ?{query}={given}")
            text = given
        names[key] = _service_name(text, fields.sub(key), wildcard=True, what=key)
    _namespace(fields, "SourceNS", "DestinationNS", "SourcePartition", "DestinationPartition")
    source_type = fields.string("SourceType")
    if source_type not in ("", "consul"):
        raise ValidationError(fields.sub("SourceType"), f"{source_type!r}: only 'consul' exists")
    if fields.string("SourcePeer") or fields.string("SamenessGroup"):
        raise ValidationError("", "cluster peering and sameness groups are not supported")

    permissions: list[Permission] = []
    for item, where in _list(fields, "Permissions", PERMISSIONS_MAX):
        inner = Body(item, where)
        if inner.get("HTTP") is None:
            raise ValidationError(
                inner.sub("HTTP"), "missing HTTP: permissions match HTTP requests"
            )
        http = _parse_http_match(inner.get("HTTP"), inner.sub("HTTP"), route=False)
        if http.empty:
            raise ValidationError(
                inner.sub("HTTP"),
                "match on at least one of PathExact, PathPrefix, PathRegex, Header or Methods",
            )
        permissions.append(Permission(_action(inner, permissions_allowed=False), http))

    action: IntentionAction | None = None
    if permissions:
        if fields.string("Action"):
            # Consul: "Action must be omitted if Permissions are specified".
            raise ValidationError(fields.sub("Action"), "must be omitted when Permissions are set")
        if names["DestinationName"] == WILDCARD:
            raise ValidationError(
                fields.sub("Permissions"), "L7 permissions need a named destination, not '*'"
            )
    else:
        action = _action(fields, permissions_allowed=True)
    return Intention(
        source=names["SourceName"],
        destination=names["DestinationName"],
        action=action,
        permissions=tuple(permissions),
        description=fields.string("Description", limit=DESCRIPTION_MAX_LENGTH),
        meta=_meta(fields),
    )


def intention_to_body(intention: Intention) -> dict[str, Any]:
    """The body ``parse_intention`` turns back into ``intention`` (its stored form)."""
    body: dict[str, Any] = {
        "SourceName": intention.source,
        "DestinationName": intention.destination,
        "SourceNS": DEFAULT_NAMESPACE,
        "DestinationNS": DEFAULT_NAMESPACE,
        "Description": intention.description,
        "Meta": dict(intention.meta),
    }
    if intention.action is not None:
        body["Action"] = intention.action.value
    if intention.permissions:
        body["Permissions"] = [p.to_body() for p in intention.permissions]
    return body


def intention_json(intention: Intention, *, create_index: int, modify_index: int) -> dict[str, Any]:
    """One intention as ``GET /v1/connect/intentions[/exact]`` shows it (api.Intention)."""
    out: dict[str, Any] = {
        "ID": intention.id,
        "Description": intention.description,
        "SourceNS": DEFAULT_NAMESPACE,
        "SourceName": intention.source,
        "DestinationNS": DEFAULT_NAMESPACE,
        "DestinationName": intention.destination,
        "SourcePartition": DEFAULT_NAMESPACE,
        "DestinationPartition": DEFAULT_NAMESPACE,
        "SourceType": "consul",
        "Meta": dict(intention.meta),
        "Precedence": intention.precedence,
        "CreateIndex": create_index,
        "ModifyIndex": modify_index,
    }
    if intention.action is not None:
        out["Action"] = intention.action.value
    if intention.permissions:
        out["Permissions"] = [p.to_body() for p in intention.permissions]
    return out


def sort_intentions(intentions: Iterable[Intention]) -> list[Intention]:
    """Evaluation order: precedence high to low, then by names (Consul's
    IntentionPrecedenceSorter), as ``/v1/connect/intentions`` lists them."""
    return sorted(intentions, key=lambda i: (-i.precedence, i.source, i.destination))


def match_intentions(
    intentions: Iterable[Intention], by: Literal["source", "destination"], name: str
) -> list[Intention]:
    """``GET /v1/connect/intentions/match?by=&name=``: the intentions that apply to
    ``name`` as a source (or destination), wildcards included, in evaluation order."""
    if by == "source":
        chosen = (i for i in intentions if i.source in (name, WILDCARD))
    else:
        chosen = (i for i in intentions if i.destination in (name, WILDCARD))
    return sort_intentions(chosen)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of authorizing a connection or request."""

    allowed: bool
    reason: str
    intention_id: str | None = None
    """The deciding intention's ID; None when the default policy decided."""
    precedence: int = 0
    has_permissions: bool = False
    """The deciding intention is L7: without a request, ``allowed`` is provisional."""


@dataclass(frozen=True, slots=True)
class IntentionIndex:
    """Intentions precompiled for the proxy: ``decide`` is at most four dict lookups.

    With namespaces fixed, the intentions that can match (src, dst) are exactly those
    keyed (src, dst), (*, dst), (src, *), (*, *), in that precedence order (9, 8, 6, 5),
    and at most one intention exists per key, so the first hit decides.
    """

    by_pair: Mapping[tuple[str, str], Intention]
    default_allow: bool

    @staticmethod
    def build(intentions: Iterable[Intention], default_policy: str = "deny") -> IntentionIndex:
        if default_policy not in ("allow", "deny"):
            raise ValueError(f"default policy must be 'allow' or 'deny', got {default_policy!r}")
        by_pair = {(i.source, i.destination): i for i in intentions}
        return IntentionIndex(by_pair, default_policy == "allow")

    def match(self, source: str, destination: str) -> Intention | None:
        """The intention that governs ``source`` → ``destination``, if any."""
        for key in (
            (source, destination),
            (WILDCARD, destination),
            (source, WILDCARD),
            (WILDCARD, WILDCARD),
        ):
            found = self.by_pair.get(key)
            if found is not None:
                return found
        return None

    def decide(
        self,
        source: str,
        destination: str,
        *,
        request: HttpRequest | None = None,
        allow_permissions: bool = False,
    ) -> Decision:
        """May ``source`` reach ``destination`` (and make ``request``, if given)?

        An L7 intention's permissions are tried in order and the first whose HTTP
        conditions match decides; when none match, the default policy applies (Consul
        docs, service-intentions ``Permissions``). Without a request an L7 intention
        cannot be decided: ``allow_permissions`` is the answer (Consul's
        ``IntentionDecision``: the proxy lets the connection in and decides per
        request, passing True; ``/intentions/check`` treats it as a deny, passing False).
        """
        intention = self.match(source, destination)
        if intention is None:
            return self._default(f"no intention matches {source} => {destination}")
        if intention.action is not None:
            return Decision(
                intention.action == IntentionAction.ALLOW,
                f"matched intention {intention}",
                intention.id,
                intention.precedence,
            )
        if request is None:
            return Decision(
                allow_permissions,
                f"intention {intention} has L7 permissions; decided per request",
                intention.id,
                intention.precedence,
                has_permissions=True,
            )
        for position, permission in enumerate(intention.permissions):
            if permission.http.matches(request):
                return Decision(
                    permission.action == IntentionAction.ALLOW,
                    f"matched permission {position} ({permission.action.value})"
                    f" of intention {intention}",
                    intention.id,
                    intention.precedence,
                    has_permissions=True,
                )
        default = self._default(f"no permission of intention {intention} matches the request")
        return replace(
            default,
            intention_id=intention.id,
            precedence=intention.precedence,
            has_permissions=True,
        )

    def _default(self, why: str) -> Decision:
        policy = "allow" if self.default_allow else "deny"
        return Decision(self.default_allow, f"{why}; default policy is {policy}")


def authorize(
    intentions: Iterable[Intention],
    source_service: str,
    destination_service: str,
    default_policy: str,
    *,
    request: HttpRequest | None = None,
    allow_permissions: bool = False,
) -> Decision:
    """One-shot ``IntentionIndex.build(...).decide(...)`` (see there)."""
    index = IntentionIndex.build(intentions, default_policy)
    return index.decide(
        source_service, destination_service, request=request, allow_permissions=allow_permissions
    )


def intention_check_json(index: IntentionIndex, source: str, destination: str) -> dict[str, bool]:
    """``GET /v1/connect/intentions/check``: an L4 answer, so L7 intentions count as
    deny (Consul docs, ``consul intention check``)."""
    return {"Allowed": index.decide(source, destination).allowed}


# --------------------------------------------------------------------------- filters
#
# A small subset of go-bexpr, the language of a resolver subset's ``Filter``, evaluated
# against a service instance (Consul's ServiceEntry: ``Service.*`` and ``Node.*``):
#
#   expression := or
#   or         := and ("or" and)*
#   and        := unary ("and" unary)*
#   unary      := "not" unary | "(" expression ")" | match
#   match      := selector ("==" | "!=") value
#               | selector "is" ["not"] "empty"
#               | value ["not"] "in" selector
#               | selector ["not"] ("contains" | "matches") value
#
# Values are "double-quoted", `raw`, or bare words (``Service.Meta.version == v1``).

_TOKEN: Final = re.compile(
    r"""\s*(?:(?P<paren>[()])|(?P<op>==|!=)|(?P<string>"(?:[^"\\]|\\.)*"|`[^`]*`)|(?P<word>[^\s()"`=!]+))"""
)
_KEYWORDS: Final = frozenset({"and", "or", "not", "in", "is", "empty", "contains", "matches"})
SelectorType = Literal["string", "list", "map"]
_SCALAR_SELECTORS: Final[Mapping[str, SelectorType]] = {
    "service.id": "string",
    "service.service": "string",
    "service.address": "string",
    "service.port": "string",
    "service.tags": "list",
    "service.meta": "map",
    "node.node": "string",
    "node.address": "string",
    "node.datacenter": "string",
    "node.meta": "map",
}
_SELECTOR_NAMES: Final = (
    "Service.ID, Service.Service, Service.Address, Service.Port, Service.Tags, "
    "Service.Meta[.key], Node.Node, Node.Address, Node.Datacenter, Node.Meta[.key]"
)


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # paren, op, string, word
    text: str


@dataclass(frozen=True, slots=True)
class FilterMatch:
    """One comparison of a filter."""

    selector: tuple[str, ...]
    """Lower-cased head (``service``, ``meta``), then the meta key as written."""
    operator: Literal["==", "!=", "in", "not in", "empty", "not empty", "matches", "not matches"]
    value: str = ""

    def evaluate(self, service: ServiceDefinition, node: NodeInfo | None) -> bool:
        found = _select(self.selector, service, node)
        op = self.operator
        if op in ("empty", "not empty"):
            return (len(found) == 0) == (op == "empty")
        if op in ("==", "!="):
            return (found == self.value) == (op == "==")
        if op in ("matches", "not matches"):
            assert isinstance(found, str)
            return (compiled_regex(self.value).search(found) is not None) == (op == "matches")
        # in: membership in a list, key of a map, or substring of a string.
        return (self.value in found) == (op == "in")


@dataclass(frozen=True, slots=True)
class FilterNot:
    operand: FilterNode

    def evaluate(self, service: ServiceDefinition, node: NodeInfo | None) -> bool:
        return not self.operand.evaluate(service, node)


@dataclass(frozen=True, slots=True)
class FilterAll:
    operands: tuple[FilterNode, ...]

    def evaluate(self, service: ServiceDefinition, node: NodeInfo | None) -> bool:
        return all(o.evaluate(service, node) for o in self.operands)


@dataclass(frozen=True, slots=True)
class FilterAny:
    operands: tuple[FilterNode, ...]

    def evaluate(self, service: ServiceDefinition, node: NodeInfo | None) -> bool:
        return any(o.evaluate(service, node) for o in self.operands)


FilterNode: TypeAlias = FilterMatch | FilterNot | FilterAll | FilterAny


def _select(
    selector: tuple[str, ...], service: ServiceDefinition, node: NodeInfo | None
) -> str | tuple[str, ...] | Mapping[str, str]:
    head = ".".join(selector[:2])
    if head == "service.meta":
        meta: Mapping[str, str] = service.meta
        return meta if len(selector) == 2 else meta.get(selector[2], "")
    if head == "node.meta":
        node_meta: Mapping[str, str] = node.meta if node is not None else {}
        return node_meta if len(selector) == 2 else node_meta.get(selector[2], "")
    values: dict[str, str | tuple[str, ...]] = {
        "service.id": service.id,
        "service.service": service.name,
        "service.address": service.address,
        "service.port": str(service.port),
        "service.tags": service.tags,
        "node.node": node.name if node is not None else "",
        "node.address": node.address if node is not None else "",
        "node.datacenter": node.datacenter if node is not None else "",
    }
    return values[head]


@dataclass(frozen=True, slots=True)
class Filter:
    """A compiled subset filter; ``str(filter)`` is the expression as written."""

    expression: str
    root: FilterNode

    def matches(self, service: ServiceDefinition, node: NodeInfo | None = None) -> bool:
        """Does this instance belong to the subset?"""
        return self.root.evaluate(service, node)

    def __str__(self) -> str:
        return self.expression


def parse_filter(expression: str, path: str = "Filter") -> Filter:
    """Compile a filter expression or raise ``ValidationError`` saying what is wrong."""
    if len(expression) > FILTER_MAX_LENGTH:
        raise ValidationError(path, f"longer than {FILTER_MAX_LENGTH} characters")
    return Filter(expression, _FilterParser(expression, path).parse())


class _FilterParser:
    def __init__(self, text: str, path: str) -> None:
        self.path = path
        self.text = text
        self.tokens: list[_Token] = []
        position = 0
        while position < len(text):
            if text[position:].strip() == "":
                break
            match = _TOKEN.match(text, position)
            if match is None or match.end() == position:
                self.fail(f"unexpected character {text[position:].strip()[:1]!r}")
            kind = match.lastgroup or "word"
            self.tokens.append(_Token(kind, match.group(kind)))
            position = match.end()
        self.position = 0

    def fail(self, message: str) -> NoReturn:
        raise ValidationError(self.path, f"invalid filter {self.text!r}: {message}")

    def peek(self, offset: int = 0) -> _Token | None:
        index = self.position + offset
        return self.tokens[index] if index < len(self.tokens) else None

    def keyword(self, word: str, offset: int = 0) -> bool:
        token = self.peek(offset)
        return token is not None and token.kind == "word" and token.text.lower() == word

    def take(self) -> _Token:
        token = self.peek()
        if token is None:
            self.fail("unexpected end of expression")
        self.position += 1
        return token

    def parse(self) -> FilterNode:
        if not self.tokens:
            self.fail("empty expression")
        node = self.parse_or()
        if self.peek() is not None:
            self.fail(f"unexpected {self.take().text!r}")
        return node

    def parse_or(self) -> FilterNode:
        operands = [self.parse_and()]
        while self.keyword("or"):
            self.position += 1
            operands.append(self.parse_and())
        return operands[0] if len(operands) == 1 else FilterAny(tuple(operands))

    def parse_and(self) -> FilterNode:
        operands = [self.parse_unary()]
        while self.keyword("and"):
            self.position += 1
            operands.append(self.parse_unary())
        return operands[0] if len(operands) == 1 else FilterAll(tuple(operands))

    def parse_unary(self) -> FilterNode:
        if self.keyword("not"):
            self.position += 1
            return FilterNot(self.parse_unary())
        token = self.peek()
        if token is not None and token.kind == "paren" and token.text == "(":
            self.position += 1
            node = self.parse_or()
            closing = self.take()
            if closing.text != ")":
                self.fail(f"expected ')', got {closing.text!r}")
            return node
        return self.parse_match()

    def value(self) -> str:
        token = self.take()
        if token.kind == "string":
            if token.text.startswith("`"):
                return token.text[1:-1]
            try:
                text = json.loads(token.text)
            except ValueError:
                self.fail(f"bad string {token.text}")
            if not isinstance(text, str):
                self.fail(f"bad string {token.text}")
            return text
        if token.kind != "word" or token.text.lower() in _KEYWORDS:
            self.fail(f"expected a value, got {token.text!r}")
        return token.text

    def selector(self, token: _Token) -> tuple[tuple[str, ...], SelectorType]:
        if token.kind != "word":
            self.fail(f"expected a selector, got {token.text!r}")
        parts = token.text.split(".")
        head = ".".join(parts[:2]).lower()
        kind = _SCALAR_SELECTORS.get(head)
        if kind is None or len(parts) > 3 or (len(parts) == 3 and kind != "map") or "" in parts:
            self.fail(f"unknown selector {token.text!r}; one of {_SELECTOR_NAMES}")
        if len(parts) == 3:
            return (parts[0].lower(), parts[1].lower(), parts[2]), "string"
        return (parts[0].lower(), parts[1].lower()), kind

    def parse_match(self) -> FilterNode:
        negated_in = self.keyword("not", 1) and self.keyword("in", 2)
        if self.keyword("in", 1) or negated_in:
            value = self.value()
            self.position += 2 if negated_in else 1
            selector, _ = self.selector(self.take())
            return FilterMatch(selector, "not in" if negated_in else "in", value)
        first = self.take()
        selector, kind = self.selector(first)
        token = self.peek()
        if token is not None and token.kind == "op":
            self.position += 1
            if kind != "string":
                self.fail(f"{first.text} is a {kind}; compare it with 'in' or 'is empty'")
            return FilterMatch(selector, "==" if token.text == "==" else "!=", self.value())
        if self.keyword("is"):
            self.position += 1
            negated = self.keyword("not")
            self.position += 1 if negated else 0
            if not self.keyword("empty"):
                self.fail("expected 'empty' after 'is'")
            self.position += 1
            return FilterMatch(selector, "not empty" if negated else "empty")
        negated = self.keyword("not")
        for word in ("contains", "matches"):
            if self.keyword(word, 1 if negated else 0):
                self.position += 2 if negated else 1
                value = self.value()
                if word == "contains":
                    return FilterMatch(selector, "not in" if negated else "in", value)
                if kind != "string":
                    self.fail(f"{first.text} is a {kind}; 'matches' needs a string")
                _regex(value, self.path)
                return FilterMatch(selector, "not matches" if negated else "matches", value)
        self.fail(f"expected ==, !=, in, is empty, contains or matches after {first.text!r}")


# --------------------------------------------------------------------------- service-defaults

_ENTRY_COMMON: Final = (
    "Kind",
    "Name",
    "Namespace",
    "Partition",
    "Meta",
    "CreateIndex",
    "ModifyIndex",
)


@dataclass(frozen=True, slots=True)
class UpstreamLimits:
    """Circuit-breaker thresholds toward an upstream (Consul ``UpstreamLimits``)."""

    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_concurrent_requests: int | None = None

    def to_body(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in (
                ("MaxConnections", self.max_connections),
                ("MaxPendingRequests", self.max_pending_requests),
                ("MaxConcurrentRequests", self.max_concurrent_requests),
            )
            if v is not None
        }


@dataclass(frozen=True, slots=True)
class PassiveHealthCheck:
    """Outlier detection toward an upstream (Consul ``PassiveHealthCheck``): eject an
    endpoint after ``max_failures`` consecutive 5xx, for ``base_ejection_time``, never
    more than ``max_ejection_percent`` of the endpoints."""

    interval: float | None = None
    max_failures: int | None = None
    enforcing_consecutive_5xx: int | None = None
    max_ejection_percent: int | None = None
    base_ejection_time: float | None = None

    def to_body(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in (
                ("Interval", _duration_out(self.interval)),
                ("MaxFailures", self.max_failures),
                ("EnforcingConsecutive5xx", self.enforcing_consecutive_5xx),
                ("MaxEjectionPercent", self.max_ejection_percent),
                ("BaseEjectionTime", _duration_out(self.base_ejection_time)),
            )
            if v is not None
        }


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """``UpstreamConfig.Defaults`` or one of ``UpstreamConfig.Overrides`` (``name`` set)."""

    name: str = ""
    connect_timeout_ms: int | None = None
    limits: UpstreamLimits | None = None
    passive_health_check: PassiveHealthCheck | None = None

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.name:
            body["Name"] = self.name
        if self.connect_timeout_ms is not None:
            body["ConnectTimeoutMs"] = self.connect_timeout_ms
        if self.limits is not None:
            body["Limits"] = self.limits.to_body()
        if self.passive_health_check is not None:
            body["PassiveHealthCheck"] = self.passive_health_check.to_body()
        return body


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """How a service's proxy treats its upstreams (service-defaults ``UpstreamConfig``)."""

    defaults: UpstreamSettings | None = None
    overrides: tuple[UpstreamSettings, ...] = ()

    def for_upstream(self, name: str) -> UpstreamSettings:
        """The settings toward ``name``: the override's fields on top of the defaults'."""
        base = self.defaults or UpstreamSettings()
        for override in self.overrides:
            if override.name == name:
                return UpstreamSettings(
                    name,
                    _first(override.connect_timeout_ms, base.connect_timeout_ms),
                    _first(override.limits, base.limits),
                    _first(override.passive_health_check, base.passive_health_check),
                )
        return replace(base, name=name)

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.defaults is not None:
            body["Defaults"] = self.defaults.to_body()
        if self.overrides:
            body["Overrides"] = [o.to_body() for o in self.overrides]
        return body


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


@dataclass(frozen=True, slots=True)
class InstanceRateLimit:
    """Inbound local rate limit per instance (``RateLimits.InstanceLevel``): a token
    bucket refilled at ``requests_per_second`` holding ``requests_max_burst`` tokens."""

    requests_per_second: int
    requests_max_burst: int = 0
    """0: same as ``requests_per_second`` (Consul's default)."""

    @property
    def burst(self) -> int:
        return self.requests_max_burst or self.requests_per_second


@dataclass(frozen=True, slots=True)
class ServiceDefaults:
    """A ``service-defaults`` config entry."""

    kind: ClassVar[str] = KIND_SERVICE_DEFAULTS

    name: str
    protocol: str = "tcp"
    """``tcp`` (L4) or ``http`` (L7, HTTP/1.1): routers, splitters and L7 intentions
    need ``http``. Consul's default is tcp too."""
    max_inbound_connections: int = 0
    """0: no limit."""
    local_connect_timeout_ms: int = 0
    """Proxy → local instance connect timeout; 0: the proxy's default (5 s in Consul)."""
    local_request_timeout_ms: int = 0
    """Proxy → local instance request timeout (http only); 0: the proxy's default."""
    upstream_config: UpstreamConfig | None = None
    rate_limit: InstanceRateLimit | None = None
    rate_limit_per_source: InstanceRateLimit | None = None
    """``RateLimits.PerSource`` (a meshnode extension, same fields as ``InstanceLevel``):
    one token bucket per calling service, so one noisy caller cannot use up the
    instance-level budget of the others."""
    meta: Mapping[str, str] = field(default_factory=dict)


_UPSTREAM_KEYS: Final = (
    "Name",
    "Namespace",
    "Partition",
    "ConnectTimeoutMs",
    "Limits",
    "PassiveHealthCheck",
)
_UPSTREAM_UNSUPPORTED: Final = (
    "Peer",
    "EnvoyListenerJSON",
    "EnvoyClusterJSON",
    "Protocol",
    "MeshGateway",
    "BalanceOutboundConnections",
)


def _parse_upstream(value: object, path: str, *, override: bool) -> UpstreamSettings:
    fields = Body(value, path)
    keys = _UPSTREAM_KEYS if override else _UPSTREAM_KEYS[3:]
    _known_fields(fields, keys, "an upstream configuration", _UPSTREAM_UNSUPPORTED)
    name = ""
    if override:
        _namespace(fields, "Namespace", "Partition")
        name = _service_name(fields.string("Name"), fields.sub("Name"), what="upstream Name")
    limits = None
    inner = _object(fields, "Limits")
    if inner is not None:
        _known_fields(
            inner, ("MaxConnections", "MaxPendingRequests", "MaxConcurrentRequests"), "Limits"
        )
        limits = UpstreamLimits(
            _optional_count(inner, "MaxConnections"),
            _optional_count(inner, "MaxPendingRequests"),
            _optional_count(inner, "MaxConcurrentRequests"),
        )
    check = None
    inner = _object(fields, "PassiveHealthCheck")
    if inner is not None:
        _known_fields(
            inner,
            (
                "Interval",
                "MaxFailures",
                "EnforcingConsecutive5xx",
                "MaxEjectionPercent",
                "BaseEjectionTime",
            ),
            "PassiveHealthCheck",
        )
        check = PassiveHealthCheck(
            _optional_duration(inner, "Interval"),
            _optional_count(inner, "MaxFailures"),
            _optional_count(inner, "EnforcingConsecutive5xx", 100),
            _optional_count(inner, "MaxEjectionPercent", 100),
            _optional_duration(inner, "BaseEjectionTime"),
        )
    return UpstreamSettings(
        name, _optional_count(fields, "ConnectTimeoutMs", MILLISECONDS_MAX), limits, check
    )


def _parse_service_defaults(fields: Body, name: str) -> ServiceDefaults:
    _known_fields(
        fields,
        (
            *_ENTRY_COMMON,
            "Protocol",
            "MaxInboundConnections",
            "LocalConnectTimeoutMs",
            "LocalRequestTimeoutMs",
            "UpstreamConfig",
            "RateLimits",
        ),
        "service-defaults",
        (
            "Mode",
            "TransparentProxy",
            "MutualTLSMode",
            "MeshGateway",
            "Expose",
            "ExternalSNI",
            "EnvoyExtensions",
            "Destination",
            "BalanceInboundConnections",
            "EnvoyListenerJSON",
            "EnvoyClusterJSON",
        ),
    )
    protocol = fields.string("Protocol").lower() or "tcp"
    if protocol in _UNSUPPORTED_PROTOCOLS:
        raise ValidationError(
            fields.sub("Protocol"),
            f"{protocol!r} is not supported: meshnode's proxy speaks HTTP/1.1; use 'http' or 'tcp'",
        )
    if protocol not in PROTOCOLS:
        raise ValidationError(
            fields.sub("Protocol"), f"unknown protocol {protocol!r}; 'tcp' or 'http'"
        )
    upstream_config = None
    inner = _object(fields, "UpstreamConfig")
    if inner is not None:
        _known_fields(inner, ("Defaults", "Overrides"), "UpstreamConfig")
        defaults = inner.get("Defaults")
        overrides: list[UpstreamSettings] = []
        for item, where in _list(inner, "Overrides", OVERRIDES_MAX):
            override = _parse_upstream(item, where, override=True)
            if any(o.name == override.name for o in overrides):
                raise ValidationError(
                    where, f"upstream {override.name!r} is overridden more than once"
                )
            overrides.append(override)
        upstream_config = UpstreamConfig(
            None
            if defaults is None
            else _parse_upstream(defaults, inner.sub("Defaults"), override=False),
            tuple(overrides),
        )
    rate_limit = rate_limit_per_source = None
    inner = _object(fields, "RateLimits")
    if inner is not None:
        _known_fields(inner, ("InstanceLevel", "PerSource"), "RateLimits")
        rate_limit = _parse_rate_limit(inner, "InstanceLevel")
        rate_limit_per_source = _parse_rate_limit(inner, "PerSource")
    local_request = fields.integer("LocalRequestTimeoutMs", low=0, high=MILLISECONDS_MAX)
    if local_request and protocol != "http":
        raise ValidationError(
            fields.sub("LocalRequestTimeoutMs"), "only applies to Protocol 'http'"
        )
    return ServiceDefaults(
        name=name,
        protocol=protocol,
        max_inbound_connections=fields.integer("MaxInboundConnections", low=0, high=COUNT_MAX),
        local_connect_timeout_ms=fields.integer(
            "LocalConnectTimeoutMs", low=0, high=MILLISECONDS_MAX
        ),
        local_request_timeout_ms=local_request,
        upstream_config=upstream_config,
        rate_limit=rate_limit,
        rate_limit_per_source=rate_limit_per_source,
        meta=_meta(fields),
    )


def _parse_rate_limit(fields: Body, name: str) -> InstanceRateLimit | None:
    """``RateLimits.InstanceLevel`` or ``RateLimits.PerSource``; None when unset or 0."""
    level = _object(fields, name)
    if level is None:
        return None
    _known_fields(level, ("RequestsPerSecond", "RequestsMaxBurst"), name, ("Routes",))
    per_second = level.integer("RequestsPerSecond", low=0, high=COUNT_MAX)
    burst = level.integer("RequestsMaxBurst", low=0, high=COUNT_MAX)
    if burst and not per_second:
        raise ValidationError(level.sub("RequestsMaxBurst"), "needs RequestsPerSecond")
    return InstanceRateLimit(per_second, burst) if per_second else None


def _rate_limit_body(limit: InstanceRateLimit) -> dict[str, Any]:
    body: dict[str, Any] = {"RequestsPerSecond": limit.requests_per_second}
    if limit.requests_max_burst:
        body["RequestsMaxBurst"] = limit.requests_max_burst
    return body


def _service_defaults_body(entry: ServiceDefaults) -> dict[str, Any]:
    body: dict[str, Any] = {"Protocol": entry.protocol}
    body.update(
        _drop_empty(
            {
                "MaxInboundConnections": entry.max_inbound_connections,
                "LocalConnectTimeoutMs": entry.local_connect_timeout_ms,
                "LocalRequestTimeoutMs": entry.local_request_timeout_ms,
            }
        )
    )
    if entry.upstream_config is not None:
        body["UpstreamConfig"] = entry.upstream_config.to_body()
    limits: dict[str, Any] = {}
    if entry.rate_limit is not None:
        limits["InstanceLevel"] = _rate_limit_body(entry.rate_limit)
    if entry.rate_limit_per_source is not None:
        limits["PerSource"] = _rate_limit_body(entry.rate_limit_per_source)
    if limits:
        body["RateLimits"] = limits
    return body


# --------------------------------------------------------------------------- service-resolver


@dataclass(frozen=True, slots=True)
class ResolverSubset:
    """A named subset of a service's instances (service-resolver ``Subsets``)."""

    filter: Filter | None = None
    """None: every instance."""
    only_passing: bool = False
    """Only instances whose checks all pass (otherwise warning counts as healthy)."""

    def matches(self, service: ServiceDefinition, node: NodeInfo | None = None) -> bool:
        return self.filter is None or self.filter.matches(service, node)


@dataclass(frozen=True, slots=True)
class ResolverTarget:
    """A service (and subset) traffic goes to: a ``Redirect`` or a failover target.
    An empty ``service`` means the resolver's own service."""

    service: str = ""
    service_subset: str = ""

    def to_body(self) -> dict[str, Any]:
        return _drop_empty({"Service": self.service, "ServiceSubset": self.service_subset})


@dataclass(frozen=True, slots=True)
class ResolverFailover:
    """Where to go when a subset has no healthy instance (``Failover[subset]``): the
    ``targets`` in order, or the single ``service``/``service_subset``."""

    service: str = ""
    service_subset: str = ""
    targets: tuple[ResolverTarget, ...] = ()

    def resolved_targets(self) -> tuple[ResolverTarget, ...]:
        return self.targets or (ResolverTarget(self.service, self.service_subset),)

    def to_body(self) -> dict[str, Any]:
        return _drop_empty(
            {
                "Service": self.service,
                "ServiceSubset": self.service_subset,
                "Targets": [t.to_body() for t in self.targets],
            }
        )


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """What a hash-based load balancer hashes (``LoadBalancer.HashPolicies[]``)."""

    field: str = ""
    """``header``, ``cookie`` or ``query_parameter``; "" with ``source_ip``."""
    field_value: str = ""
    source_ip: bool = False
    terminal: bool = False
    cookie_session: bool = False
    cookie_ttl: float | None = None
    cookie_path: str = ""

    def to_body(self) -> dict[str, Any]:
        body = _drop_empty(
            {
                "Field": self.field,
                "FieldValue": self.field_value,
                "SourceIP": self.source_ip,
                "Terminal": self.terminal,
            }
        )
        cookie = _drop_empty(
            {
                "Session": self.cookie_session,
                "TTL": _duration_out(self.cookie_ttl),
                "Path": self.cookie_path,
            }
        )
        if cookie:
            body["CookieConfig"] = cookie
        return body


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    """Load-balancing policy toward the service (``LoadBalancer``)."""

    policy: str = ""
    """"" means round_robin (Envoy's default)."""
    minimum_ring_size: int | None = None
    maximum_ring_size: int | None = None
    choice_count: int | None = None
    hash_policies: tuple[HashPolicy, ...] = ()

    @property
    def effective_policy(self) -> str:
        return self.policy or "round_robin"

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = _drop_empty(
            {"Policy": self.policy, "HashPolicies": [h.to_body() for h in self.hash_policies]}
        )
        ring = {
            k: v
            for k, v in (
                ("MinimumRingSize", self.minimum_ring_size),
                ("MaximumRingSize", self.maximum_ring_size),
            )
            if v is not None
        }
        if ring:
            body["RingHashConfig"] = ring
        if self.choice_count is not None:
            body["LeastRequestConfig"] = {"ChoiceCount": self.choice_count}
        return body


@dataclass(frozen=True, slots=True)
class ServiceResolver:
    """A ``service-resolver`` config entry."""

    kind: ClassVar[str] = KIND_SERVICE_RESOLVER

    name: str
    default_subset: str = ""
    subsets: Mapping[str, ResolverSubset] = field(default_factory=dict)
    connect_timeout: float | None = None
    request_timeout: float | None = None
    redirect: ResolverTarget | None = None
    failover: Mapping[str, ResolverFailover] = field(default_factory=dict)
    """Keyed by subset name, or ``*`` for any subset without its own entry."""
    load_balancer: LoadBalancer | None = None
    meta: Mapping[str, str] = field(default_factory=dict)

    def subset_exists(self, subset: str) -> bool:
        """ "" (the unnamed default subset) always exists."""
        return not subset or subset in self.subsets

    def failover_for(self, subset: str) -> ResolverFailover | None:
        return self.failover.get(subset) or self.failover.get(WILDCARD)


def _parse_target(fields: Body, what: str) -> ResolverTarget:
    _known_fields(
        fields,
        ("Service", "ServiceSubset", "Namespace", "Partition"),
        what,
        ("Datacenter", "Peer", "SamenessGroup", "ServiceKey"),
    )
    _namespace(fields, "Namespace", "Partition")
    return ResolverTarget(
        _optional_service(fields, "Service"), _optional_subset(fields, "ServiceSubset")
    )


def _parse_load_balancer(fields: Body) -> LoadBalancer:
    _known_fields(
        fields, ("Policy", "RingHashConfig", "LeastRequestConfig", "HashPolicies"), "LoadBalancer"
    )
    policy = fields.string("Policy")
    if policy == "maglev":
        raise ValidationError(
            fields.sub("Policy"), "'maglev' is not supported by meshnode's proxy; use 'ring_hash'"
        )
    if policy not in LB_POLICIES:
        raise ValidationError(
            fields.sub("Policy"),
            f"{policy!r} is not supported; one of {', '.join(sorted(p for p in LB_POLICIES if p))}",
        )
    minimum = maximum = choice = None
    ring = _object(fields, "RingHashConfig")
    if ring is not None:
        if policy != "ring_hash":
            # Consul: "RingHashConfig specified for incompatible load balancing policy".
            raise ValidationError(ring.path, f"only valid with Policy 'ring_hash', not {policy!r}")
        _known_fields(ring, ("MinimumRingSize", "MaximumRingSize"), "RingHashConfig")
        minimum = _optional_count(ring, "MinimumRingSize", RING_SIZE_MAX)
        maximum = _optional_count(ring, "MaximumRingSize", RING_SIZE_MAX)
        if minimum and maximum and minimum > maximum:
            raise ValidationError(ring.path, "MinimumRingSize is larger than MaximumRingSize")
    least = _object(fields, "LeastRequestConfig")
    if least is not None:
        if policy != "least_request":
            raise ValidationError(
                least.path, f"only valid with Policy 'least_request', not {policy!r}"
            )
        _known_fields(least, ("ChoiceCount",), "LeastRequestConfig")
        choice = _optional_count(least, "ChoiceCount", 64)
        if choice is not None and choice < 2:
            raise ValidationError(least.sub("ChoiceCount"), "must be at least 2")
    policies: list[HashPolicy] = []
    for item, where in _list(fields, "HashPolicies", HASH_POLICIES_MAX):
        if policy != "ring_hash":
            # Consul: "HashPolicies specified for non-hash-based Policy".
            raise ValidationError(where, f"HashPolicies need Policy 'ring_hash', not {policy!r}")
        policies.append(_parse_hash_policy(Body(item, where)))
    return LoadBalancer(policy, minimum, maximum, choice, tuple(policies))


def _parse_hash_policy(fields: Body) -> HashPolicy:
    _known_fields(
        fields, ("Field", "FieldValue", "CookieConfig", "SourceIP", "Terminal"), "a hash policy"
    )
    hash_field = fields.string("Field")
    value = fields.string("FieldValue", limit=TEXT_MAX_LENGTH)
    source_ip = fields.boolean("SourceIP")
    if hash_field and hash_field not in HASH_FIELDS:
        raise ValidationError(
            fields.sub("Field"), f"{hash_field!r} is not one of {', '.join(sorted(HASH_FIELDS))}"
        )
    if source_ip and (hash_field or value):
        raise ValidationError(fields.path, "SourceIP cannot be combined with Field or FieldValue")
    if hash_field and not value:
        raise ValidationError(fields.sub("FieldValue"), f"Field {hash_field!r} needs a FieldValue")
    if value and not hash_field:
        raise ValidationError(fields.sub("Field"), "FieldValue requires a Field to apply to")
    if not hash_field and not source_ip:
        raise ValidationError(fields.path, "set Field and FieldValue, or SourceIP")
    session, ttl, cookie_path = False, None, ""
    cookie = _object(fields, "CookieConfig")
    if cookie is not None:
        if hash_field != "cookie":
            raise ValidationError(
                cookie.path, f"only valid with Field 'cookie', not {hash_field!r}"
            )
        _known_fields(cookie, ("Session", "TTL", "Path"), "CookieConfig")
        session = cookie.boolean("Session")
        ttl = _optional_duration(cookie, "TTL")
        cookie_path = cookie.string("Path", limit=TEXT_MAX_LENGTH)
        if session and ttl:
            raise ValidationError(cookie.path, "a session cookie cannot have a TTL")
    return HashPolicy(
        hash_field, value, source_ip, fields.boolean("Terminal"), session, ttl, cookie_path
    )


def _parse_service_resolver(fields: Body, name: str) -> ServiceResolver:
    _known_fields(
        fields,
        (
            *_ENTRY_COMMON,
            "DefaultSubset",
            "Subsets",
            "Redirect",
            "Failover",
            "ConnectTimeout",
            "RequestTimeout",
            "LoadBalancer",
        ),
        "service-resolver",
        ("PrioritizeByLocality",),
    )
    subsets: dict[str, ResolverSubset] = {}
    raw_subsets = fields.get("Subsets")
    if raw_subsets is not None:
        path = fields.sub("Subsets")
        if not isinstance(raw_subsets, dict):
            raise ValidationError(
                path, f"expected an object of subsets, got {type_name(raw_subsets)}"
            )
        if len(raw_subsets) > SUBSETS_MAX:
            raise ValidationError(path, f"more than {SUBSETS_MAX} subsets")
        for subset_name, value in raw_subsets.items():
            where = _path(path, str(subset_name))
            _subset_name(str(subset_name), where)
            inner = Body(value, where)
            _known_fields(inner, ("Filter", "OnlyPassing"), "a subset")
            expression = inner.string("Filter", limit=FILTER_MAX_LENGTH)
            subsets[subset_name] = ResolverSubset(
                parse_filter(expression, inner.sub("Filter")) if expression else None,
                inner.boolean("OnlyPassing"),
            )
    default_subset = fields.string("DefaultSubset")
    if default_subset and default_subset not in subsets:
        raise ValidationError(
            fields.sub("DefaultSubset"), f"{default_subset!r} is not a subset defined in Subsets"
        )

    def own_subset(target: ResolverTarget, where: str) -> None:
        if (
            target.service_subset
            and target.service in ("", name)
            and target.service_subset not in subsets
        ):
            raise ValidationError(
                where, f"ServiceSubset {target.service_subset!r} is not a subset of {name!r}"
            )

    redirect = None
    redirect_fields = _object(fields, "Redirect")
    if redirect_fields is not None:
        where = redirect_fields.path
        redirect = _parse_target(redirect_fields, "Redirect")
        if redirect == ResolverTarget():
            raise ValidationError(where, "Redirect is empty: set Service and/or ServiceSubset")
        if not redirect.service and redirect.service_subset:
            raise ValidationError(where, "Redirect.ServiceSubset defined without Redirect.Service")
        if redirect.service == name and not redirect.service_subset:
            raise ValidationError(where, f"Redirect points {name!r} at itself")
        own_subset(redirect, where)

    failover: dict[str, ResolverFailover] = {}
    raw_failover = fields.get("Failover")
    if raw_failover is not None:
        path = fields.sub("Failover")
        if redirect is not None:
            raise ValidationError(path, "Redirect and Failover cannot both be set")
        if not isinstance(raw_failover, dict):
            raise ValidationError(
                path, f"expected an object keyed by subset, got {type_name(raw_failover)}"
            )
        if len(raw_failover) > SUBSETS_MAX + 1:
            raise ValidationError(path, f"more than {SUBSETS_MAX + 1} entries")
        for key, value in raw_failover.items():
            where = f'{path}["{key}"]'
            if key != WILDCARD and key not in subsets:
                raise ValidationError(where, f"{key!r} is not a subset defined in Subsets (or '*')")
            failover[key] = _parse_failover(Body(value, where), own_subset)

    balancer_fields = _object(fields, "LoadBalancer")
    balancer = None if balancer_fields is None else _parse_load_balancer(balancer_fields)
    return ServiceResolver(
        name=name,
        default_subset=default_subset,
        subsets=subsets,
        connect_timeout=_optional_duration(fields, "ConnectTimeout"),
        request_timeout=_optional_duration(fields, "RequestTimeout"),
        redirect=redirect,
        failover=failover,
        load_balancer=balancer,
        meta=_meta(fields),
    )


def _parse_failover(
    fields: Body, own_subset: Callable[[ResolverTarget, str], None]
) -> ResolverFailover:
    _known_fields(
        fields,
        ("Service", "ServiceSubset", "Namespace", "Targets"),
        "a failover",
        ("Datacenters", "SamenessGroup", "Policy"),
    )
    _namespace(fields, "Namespace")
    service = _optional_service(fields, "Service")
    subset = _optional_subset(fields, "ServiceSubset")
    targets: list[ResolverTarget] = []
    for item, where in _list(fields, "Targets", FAILOVER_TARGETS_MAX):
        target = _parse_target(Body(item, where), "a failover target")
        if target == ResolverTarget():
            raise ValidationError(where, "set Service and/or ServiceSubset")
        own_subset(target, where)
        targets.append(target)
    if targets and (service or subset):
        raise ValidationError(fields.path, "Targets cannot be set with Service or ServiceSubset")
    if not targets and not service and not subset:
        raise ValidationError(fields.path, "one of Service, ServiceSubset or Targets is required")
    failover = ResolverFailover(service, subset, tuple(targets))
    own_subset(ResolverTarget(service, subset), fields.path)
    return failover


def _service_resolver_body(entry: ServiceResolver) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if entry.default_subset:
        body["DefaultSubset"] = entry.default_subset
    if entry.subsets:
        body["Subsets"] = {
            name: _drop_empty(
                {"Filter": str(s.filter) if s.filter else "", "OnlyPassing": s.only_passing}
            )
            for name, s in entry.subsets.items()
        }
    if entry.redirect is not None:
        body["Redirect"] = entry.redirect.to_body()
    if entry.failover:
        body["Failover"] = {k: f.to_body() for k, f in entry.failover.items()}
    for key, seconds in (
        ("ConnectTimeout", entry.connect_timeout),
        ("RequestTimeout", entry.request_timeout),
    ):
        if seconds is not None:
            body[key] = format_duration(seconds)
    if entry.load_balancer is not None:
        body["LoadBalancer"] = entry.load_balancer.to_body()
    return body


# --------------------------------------------------------------------------- service-splitter


@dataclass(frozen=True, slots=True)
class Split:
    """One share of a splitter (``Splits[]``). Empty ``service``: the splitter's own."""

    weight: float
    service: str = ""
    service_subset: str = ""

    @property
    def weight_units(self) -> int:
        """The weight in 1/100 percent (0..10000), for exact arithmetic in the proxy."""
        return round(self.weight * WEIGHT_SCALE)


@dataclass(frozen=True, slots=True)
class ServiceSplitter:
    """A ``service-splitter`` config entry; weights add up to 100."""

    kind: ClassVar[str] = KIND_SERVICE_SPLITTER

    name: str
    splits: tuple[Split, ...]
    meta: Mapping[str, str] = field(default_factory=dict)


def _parse_service_splitter(fields: Body, name: str) -> ServiceSplitter:
    _known_fields(fields, (*_ENTRY_COMMON, "Splits"), "service-splitter")
    items = _list(fields, "Splits", SPLITS_MAX)
    if not items:
        raise ValidationError(fields.sub("Splits"), "no splits configured")
    splits: list[Split] = []
    seen: dict[tuple[str, str], str] = {}
    total = 0
    for item, where in items:
        inner = Body(item, where)
        _known_fields(
            inner,
            ("Weight", "Service", "ServiceSubset", "Namespace", "Partition"),
            "a split",
            ("RequestHeaders", "ResponseHeaders"),
        )
        _namespace(inner, "Namespace", "Partition")
        raw = inner.get("Weight")
        weight = 0.0 if raw is None else _number(raw, inner.sub("Weight"))
        if not 0 <= weight <= 100:
            raise ValidationError(inner.sub("Weight"), f"{weight:g} is not between 0 and 100")
        units = round(weight * WEIGHT_SCALE)
        if abs(weight * WEIGHT_SCALE - units) > 1e-6:
            raise ValidationError(
                inner.sub("Weight"),
                f"{weight!r} has more than 2 decimal places (0.01 is the smallest step)",
            )
        split = Split(
            units / WEIGHT_SCALE,
            _optional_service(inner, "Service"),
            _optional_subset(inner, "ServiceSubset"),
        )
        target = (split.service or name, split.service_subset)
        if target in seen:
            raise ValidationError(
                where,
                f"split destination occurs more than once: service {target[0]!r}, subset"
                f" {target[1]!r} (also {seen[target]})",
            )
        seen[target] = where
        total += units
        splits.append(split)
    if total != WEIGHT_TOTAL:
        # Consul: "the sum of all split weights must be 100, not %f".
        raise ValidationError(
            fields.sub("Splits"),
            f"the sum of all split weights must be 100, not {total / WEIGHT_SCALE:g}",
        )
    return ServiceSplitter(name, tuple(splits), _meta(fields))


def _service_splitter_body(entry: ServiceSplitter) -> dict[str, Any]:
    return {
        "Splits": [
            {
                "Weight": s.weight,
                **_drop_empty({"Service": s.service, "ServiceSubset": s.service_subset}),
            }
            for s in entry.splits
        ]
    }


# --------------------------------------------------------------------------- service-router


@dataclass(frozen=True, slots=True)
class RouteDestination:
    """Where a matching request goes and how it is retried (``Destination``)."""

    service: str = ""
    """"" means the router's own service."""
    service_subset: str = ""
    prefix_rewrite: str = ""
    request_timeout: float | None = None
    idle_timeout: float | None = None
    num_retries: int = 0
    retry_on_connect_failure: bool = False
    retry_on_status_codes: tuple[int, ...] = ()
    retry_on: tuple[str, ...] = ()

    def to_body(self) -> dict[str, Any]:
        return _drop_empty(
            {
                "Service": self.service,
                "ServiceSubset": self.service_subset,
                "PrefixRewrite": self.prefix_rewrite,
                "RequestTimeout": _duration_out(self.request_timeout),
                "IdleTimeout": _duration_out(self.idle_timeout),
                "NumRetries": self.num_retries,
                "RetryOnConnectFailure": self.retry_on_connect_failure,
                "RetryOnStatusCodes": list(self.retry_on_status_codes),
                "RetryOn": list(self.retry_on),
            }
        )


@dataclass(frozen=True, slots=True)
class Route:
    """One route: the first whose ``match`` holds decides (``Routes[]``)."""

    match: HttpMatch = HttpMatch()  # noqa: RUF009 -- frozen, so one shared default is safe
    """An empty match matches every request."""
    destination: RouteDestination = RouteDestination()


@dataclass(frozen=True, slots=True)
class ServiceRouter:
    """A ``service-router`` config entry."""

    kind: ClassVar[str] = KIND_SERVICE_ROUTER

    name: str
    routes: tuple[Route, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)

    def route(self, request: HttpRequest) -> RouteDestination:
        """The destination for ``request``: the first matching route's, else the
        implicit catch-all to the router's own service (Consul appends one)."""
        for route in self.routes:
            if route.match.matches(request):
                return route.destination
        return RouteDestination()


def _parse_route(value: object, path: str) -> Route:
    fields = Body(value, path)
    _known_fields(fields, ("Match", "Destination"), "a route")
    match = HttpMatch()
    prefix_ok = False
    inner = _object(fields, "Match")
    if inner is not None:
        _known_fields(inner, ("HTTP",), "Match")
        if inner.get("HTTP") is not None:
            match = _parse_http_match(inner.get("HTTP"), inner.sub("HTTP"), route=True)
            prefix_ok = bool(match.path_exact or match.path_prefix)
    destination = RouteDestination()
    inner = _object(fields, "Destination")
    if inner is not None:
        _known_fields(
            inner,
            (
                "Service",
                "ServiceSubset",
                "Namespace",
                "Partition",
                "PrefixRewrite",
                "RequestTimeout",
                "IdleTimeout",
                "NumRetries",
                "RetryOnConnectFailure",
                "RetryOnStatusCodes",
                "RetryOn",
            ),
            "a route destination",
            ("RequestHeaders", "ResponseHeaders"),
        )
        _namespace(inner, "Namespace", "Partition")
        rewrite = inner.string("PrefixRewrite", limit=TEXT_MAX_LENGTH)
        if rewrite and not prefix_ok:
            raise ValidationError(
                inner.sub("PrefixRewrite"), "needs a route matching PathExact or PathPrefix"
            )
        codes: list[int] = []
        for item, where in _list(inner, "RetryOnStatusCodes", STATUS_CODES_MAX):
            if isinstance(item, bool) or not isinstance(item, int) or not 100 <= item <= 599:
                raise ValidationError(where, f"{item!r} is not an HTTP status code (100-599)")
            codes.append(item)
        conditions: tuple[str, ...] = ()
        if inner.get("RetryOn") is not None:
            conditions = string_list(inner.get("RetryOn"), inner.sub("RetryOn"), most=16, limit=64)
        for condition in conditions:
            if condition in _UNSUPPORTED_RETRY_CONDITIONS:
                raise ValidationError(
                    inner.sub("RetryOn"),
                    f"{condition!r} is not supported by meshnode's HTTP/1.1 proxy",
                )
            if condition not in RETRY_CONDITIONS:
                known = ", ".join(sorted(RETRY_CONDITIONS))
                raise ValidationError(
                    inner.sub("RetryOn"), f"invalid retry condition {condition!r}; one of {known}"
                )
        destination = RouteDestination(
            service=_optional_service(inner, "Service"),
            service_subset=_optional_subset(inner, "ServiceSubset"),
            prefix_rewrite=rewrite,
            request_timeout=_optional_duration(inner, "RequestTimeout"),
            idle_timeout=_optional_duration(inner, "IdleTimeout"),
            num_retries=inner.integer("NumRetries", low=0, high=NUM_RETRIES_MAX),
            retry_on_connect_failure=inner.boolean("RetryOnConnectFailure"),
            retry_on_status_codes=tuple(codes),
            retry_on=conditions,
        )
    return Route(match, destination)


def _parse_service_router(fields: Body, name: str) -> ServiceRouter:
    _known_fields(fields, (*_ENTRY_COMMON, "Routes"), "service-router")
    routes = tuple(_parse_route(item, where) for item, where in _list(fields, "Routes", ROUTES_MAX))
    return ServiceRouter(name, routes, _meta(fields))


def _service_router_body(entry: ServiceRouter) -> dict[str, Any]:
    routes: list[dict[str, Any]] = []
    for route in entry.routes:
        body: dict[str, Any] = {}
        if not route.match.empty:
            body["Match"] = {"HTTP": http_match_to_body(route.match)}
        destination = route.destination.to_body()
        if destination:
            body["Destination"] = destination
        routes.append(body)
    return {"Routes": routes}


# --------------------------------------------------------------------------- config entries

ConfigEntry: TypeAlias = ServiceDefaults | ServiceResolver | ServiceSplitter | ServiceRouter
PolicyValue: TypeAlias = Intention | ConfigEntry

_PARSERS: Final[Mapping[str, Callable[[Body, str], ConfigEntry]]] = {
    KIND_SERVICE_DEFAULTS: _parse_service_defaults,
    KIND_SERVICE_RESOLVER: _parse_service_resolver,
    KIND_SERVICE_SPLITTER: _parse_service_splitter,
    KIND_SERVICE_ROUTER: _parse_service_router,
}


def parse_config_entry(kind: str | None, name: str | None, body: object) -> ConfigEntry:
    """A config entry body (``PUT /v1/config`` with Kind and Name in the body, or our
    ``PUT /v1/config/:kind/:name``). ``kind``/``name`` from the URL, when given, must
    agree with the body's. Unknown fields are refused, as Consul's decoder does."""
    fields = Body(body, "")
    body_kind = fields.string("Kind").lower()
    body_name = fields.string("Name")
    kind = (kind or "").lower() or body_kind
    if body_kind and body_kind != kind:
        raise ValidationError(
            fields.sub("Kind"), f"{body_kind!r} disagrees with the URL's {kind!r}"
        )
    if not kind:
        raise ValidationError("Kind", "missing Kind")
    if kind not in _PARSERS:
        raise ValidationError(
            "Kind", f"unsupported config entry kind {kind!r}; one of {', '.join(CONFIG_KINDS)}"
        )
    name = name or body_name
    if body_name and body_name != name:
        raise ValidationError(
            fields.sub("Name"), f"{body_name!r} disagrees with the URL's {name!r}"
        )
    _service_name(name, fields.sub("Name"), what="Name")
    _namespace(fields, "Namespace", "Partition")
    return _PARSERS[kind](fields, name)


def config_entry_to_body(entry: ConfigEntry) -> dict[str, Any]:
    """The body ``parse_config_entry(entry.kind, entry.name, body)`` turns back into
    ``entry``: the stored and signed form (without Kind/Name, which are the key)."""
    if isinstance(entry, ServiceDefaults):
        body = _service_defaults_body(entry)
    elif isinstance(entry, ServiceResolver):
        body = _service_resolver_body(entry)
    elif isinstance(entry, ServiceSplitter):
        body = _service_splitter_body(entry)
    else:
        body = _service_router_body(entry)
    if entry.meta:
        body["Meta"] = dict(entry.meta)
    return body


def config_entry_json(
    entry: ConfigEntry, *, create_index: int, modify_index: int
) -> dict[str, Any]:
    """``GET /v1/config/:kind/:name`` (and each element of ``GET /v1/config/:kind``)."""
    return {
        "Kind": entry.kind,
        "Name": entry.name,
        **config_entry_to_body(entry),
        "CreateIndex": create_index,
        "ModifyIndex": modify_index,
    }


def parse_value(kind: str, name: str, body: object) -> PolicyValue:
    """Any stored value from its body; the intention's pair must match ``name``."""
    if kind == KIND_INTENTION:
        intention = parse_intention(body)
        if intention.name != name:
            raise ValidationError("", f"intention {intention.name!r} stored under {name!r}")
        return intention
    return parse_config_entry(kind, name, body)


def value_to_body(value: PolicyValue) -> dict[str, Any]:
    """The stored (and signed) JSON form of any value."""
    if isinstance(value, Intention):
        return intention_to_body(value)
    return config_entry_to_body(value)


# --------------------------------------------------------------------------- cross-entry checks

PolicyKey: TypeAlias = tuple[str, str]


def validate_against(value: PolicyValue, current: Mapping[PolicyKey, PolicyValue]) -> None:
    """Refuse a write that would leave the policy graph inconsistent (Consul validates
    the discovery chain on every write): a splitter/router on a service whose protocol
    is not http, or naming a subset its target's resolver does not define; an L7
    intention on a tcp service; and a resolver or service-defaults change that would
    break an existing splitter, router or intention. ``current`` maps (kind, name) to
    every live value (``PolicyStore.values()``)."""
    proposed = dict(current)
    proposed[(value.kind, value.name)] = value
    _validate_graph(proposed, value.kind, value.name, "write")


def validate_delete(kind: str, name: str, current: Mapping[PolicyKey, PolicyValue]) -> None:
    """Refuse a delete that would break another entry (a resolver whose subset a
    splitter uses, the service-defaults that made a routed service http...)."""
    proposed = {k: v for k, v in current.items() if k != (kind, name)}
    _validate_graph(proposed, kind, name, "delete")


def _protocol(entries: Mapping[PolicyKey, PolicyValue], service: str) -> str:
    found = entries.get((KIND_SERVICE_DEFAULTS, service))
    return found.protocol if isinstance(found, ServiceDefaults) else "tcp"


def _references(value: PolicyValue) -> set[str]:
    """Service names whose entries this value depends on."""
    if isinstance(value, Intention):
        return {value.destination} if value.permissions else set()
    out = {value.name}
    if isinstance(value, ServiceSplitter):
        out.update(s.service for s in value.splits if s.service)
    elif isinstance(value, ServiceRouter):
        out.update(r.destination.service for r in value.routes if r.destination.service)
    elif isinstance(value, ServiceResolver):
        if value.redirect is not None and value.redirect.service:
            out.add(value.redirect.service)
        for failover in value.failover.values():
            out.update(t.service for t in failover.resolved_targets() if t.service)
    return out


def _validate_graph(
    entries: Mapping[PolicyKey, PolicyValue], kind: str, name: str, verb: str
) -> None:
    own = entries.get((kind, name))
    if own is not None:
        _check_value(own, entries)
    if kind not in (KIND_SERVICE_DEFAULTS, KIND_SERVICE_RESOLVER):
        return  # only protocols and subsets are depended on
    for key in sorted(entries):
        value = entries[key]
        if key == (kind, name) or name not in _references(value):
            continue
        try:
            _check_value(value, entries)
        except ValidationError as exc:
            raise ValidationError(
                "",
                f"cannot {verb} {kind} {name!r}: {value.kind} {value.name!r} depends on it ({exc})",
            ) from None


def _check_value(value: PolicyValue, entries: Mapping[PolicyKey, PolicyValue]) -> None:
    def subset_exists(service: str, subset: str, where: str) -> None:
        if not subset:
            return
        resolver = entries.get((KIND_SERVICE_RESOLVER, service))
        if not isinstance(resolver, ServiceResolver):
            raise ValidationError(
                where, f"subset {subset!r} of {service!r}: {service!r} has no service-resolver"
            )
        if not resolver.subset_exists(subset):
            raise ValidationError(
                where, f"subset {subset!r} is not defined by the service-resolver of {service!r}"
            )

    def needs_http(service: str, where: str, why: str) -> None:
        protocol = _protocol(entries, service)
        if protocol != "http":
            raise ValidationError(
                where,
                f"{why} needs service {service!r} to use protocol 'http', but it uses"
                f" {protocol!r} (set Protocol in its service-defaults)",
            )

    if isinstance(value, Intention):
        if value.permissions:
            needs_http(value.destination, "Permissions", "an intention with L7 Permissions")
    elif isinstance(value, ServiceSplitter):
        needs_http(value.name, "", f"service-splitter {value.name!r}")
        for position, split in enumerate(value.splits):
            target = split.service or value.name
            if target != value.name:
                needs_http(target, f"Splits[{position}].Service", "a split target")
            subset_exists(target, split.service_subset, f"Splits[{position}].ServiceSubset")
    elif isinstance(value, ServiceRouter):
        needs_http(value.name, "", f"service-router {value.name!r}")
        for position, route in enumerate(value.routes):
            target = route.destination.service or value.name
            where = f"Routes[{position}].Destination"
            if target != value.name:
                needs_http(target, f"{where}.Service", "a route destination")
            subset_exists(target, route.destination.service_subset, f"{where}.ServiceSubset")
    elif isinstance(value, ServiceResolver):
        targets: list[tuple[ResolverTarget, str]] = []
        if value.redirect is not None:
            targets.append((value.redirect, "Redirect"))
        for key, failover in value.failover.items():
            targets.extend((t, f'Failover["{key}"]') for t in failover.resolved_targets())
        for resolver_target, where in targets:
            service = resolver_target.service
            if service and service != value.name:
                subset_exists(service, resolver_target.service_subset, f"{where}.ServiceSubset")


# --------------------------------------------------------------------------- versions


@dataclass(frozen=True, slots=True, order=True)
class HlcTimestamp:
    """A hybrid logical clock reading: wall-clock milliseconds, then a counter that
    orders events within the same millisecond (or while the wall clock lags)."""

    wall_ms: int
    logical: int = 0


@dataclass(frozen=True, slots=True, order=True)
class Version:
    """An entry's version: ordered by the leader's term, then its HLC reading."""

    term: int
    hlc: HlcTimestamp

    def __str__(self) -> str:
        return f"{self.term}/{self.hlc.wall_ms}.{self.hlc.logical}"


class HybridClock:
    """A hybrid logical clock (Kulkarni et al. 2014, §3 "HLC algorithm").

    ``now(physical_ms)`` never repeats or goes backwards, and stays at or above both
    the wall clock and every timestamp passed to ``update``: a new leader that has
    absorbed the old leader's versions signs strictly newer ones even if its wall
    clock is behind.
    """

    __slots__ = ("_last",)

    def __init__(self, last: HlcTimestamp | None = None) -> None:
        self._last = last if last is not None else HlcTimestamp(0, 0)

    @property
    def last(self) -> HlcTimestamp:
        return self._last

    def now(self, physical_ms: int) -> HlcTimestamp:
        """A fresh timestamp for a local event at wall time ``physical_ms``."""
        last = self._last
        if physical_ms > last.wall_ms:
            self._last = HlcTimestamp(physical_ms, 0)
        else:
            self._last = HlcTimestamp(last.wall_ms, last.logical + 1)
        return self._last

    def update(self, received: HlcTimestamp) -> None:
        """Absorb a timestamp we received, so later ``now`` readings exceed it."""
        if received > self._last:
            self._last = received


# --------------------------------------------------------------------------- entries

Verifier: TypeAlias = Callable[[bytes, bytes, str], bool]
"""``verify(payload, signature, key_id) -> bool``: against the trust bundle. Must not
raise for a bad signature or an unknown key; return False."""
Signer: TypeAlias = Callable[[bytes], tuple[bytes, str]]
"""``signer(payload) -> (signature, key_id)``: the leader's signing key."""


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    """One replicated (kind, name) → value, or its tombstone."""

    kind: str
    name: str
    version: Version
    value: PolicyValue | None = None
    """The parsed value; None for a tombstone."""
    body: Mapping[str, Any] | None = None
    """The value's JSON form exactly as signed; None for a tombstone."""
    deleted: bool = False
    signature: bytes = b""
    key_id: str = ""

    @property
    def key(self) -> PolicyKey:
        return (self.kind, self.name)

    @staticmethod
    def for_value(value: PolicyValue, version: Version) -> PolicyEntry:
        """An unsigned entry carrying ``value``."""
        return PolicyEntry(value.kind, value.name, version, value, value_to_body(value))

    @staticmethod
    def tombstone(kind: str, name: str, version: Version) -> PolicyEntry:
        """An unsigned deletion of (kind, name)."""
        return PolicyEntry(kind, name, version, deleted=True)


def _canonical(value: Any) -> Any:
    """JSON-like data with every object's keys sorted, so the encoding is unique."""
    if isinstance(value, Mapping):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def signing_payload(entry: PolicyEntry) -> bytes:
    """The canonical bytes the leader signs: domain, key, body (keys sorted), version
    and deleted flag, as msgpack. The signature and key ID are not part of it."""
    body = None if entry.body is None else _canonical(entry.body)
    packed: bytes = msgpack.packb(
        [
            SIGNING_DOMAIN,
            entry.kind,
            entry.name,
            body,
            entry.version.term,
            entry.version.hlc.wall_ms,
            entry.version.hlc.logical,
            entry.deleted,
        ],
        use_bin_type=True,
    )
    return packed


def sign_entry(entry: PolicyEntry, signer: Signer) -> PolicyEntry:
    """``entry`` with the leader's signature over ``signing_payload(entry)``."""
    signature, key_id = signer(signing_payload(entry))
    return replace(entry, signature=signature, key_id=key_id)


# --------------------------------------------------------------------------- codec
#
# An entry travels as a msgpack array [kind, name, body|nil, term, wall_ms, logical,
# deleted, signature, key_id]. Decoding checks every field's type and bound and runs
# the same parser as the HTTP API, so a peer can never smuggle in what our API refuses.


def _entry_wire(entry: PolicyEntry) -> list[Any]:
    return [
        entry.kind,
        entry.name,
        None if entry.body is None else dict(entry.body),
        entry.version.term,
        entry.version.hlc.wall_ms,
        entry.version.hlc.logical,
        entry.deleted,
        entry.signature,
        entry.key_id,
    ]


def _pack(message: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return bytes((WIRE_TYPE,)) + packed


def encode_entry(entry: PolicyEntry) -> bytes:
    """One entry as a gossip broadcast."""
    return _pack([_ENTRY_MESSAGE, _entry_wire(entry)])


def encode_state(entries: Iterable[PolicyEntry]) -> bytes:
    """Every entry (tombstones included), for push-pull and for ``data_dir``."""
    return _pack([_STATE_MESSAGE, [_entry_wire(e) for e in entries]])


def _unpack(data: bytes, limit: int) -> object:
    if len(data) > limit:
        raise PolicyDecodeError("too_large", f"{len(data)} bytes")
    if not data or data[0] != WIRE_TYPE:
        raise PolicyDecodeError("wrong_type")
    try:
        return msgpack.unpackb(
            data[1:],
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=MAX_SIGNATURE_BYTES,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise PolicyDecodeError("malformed", type(exc).__name__) from None


def _wire_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _UINT63:
        raise PolicyDecodeError("malformed", what)
    return value


def _decode_entry_wire(value: object) -> PolicyEntry:
    if not isinstance(value, list) or len(value) != 9:
        raise PolicyDecodeError("malformed", "entry")
    kind, name, body, term, wall_ms, logical, deleted, signature, key_id = value
    if not isinstance(kind, str) or kind not in POLICY_KINDS:
        raise PolicyDecodeError("malformed", "kind")
    if not isinstance(name, str) or not 0 < len(name) <= 2 * NAME_MAX_LENGTH + 2:
        raise PolicyDecodeError("malformed", "name")
    if not isinstance(deleted, bool) or deleted != (body is None):
        raise PolicyDecodeError("malformed", "deleted")
    if not isinstance(signature, bytes) or not isinstance(key_id, str):
        raise PolicyDecodeError("malformed", "signature")
    if len(key_id) > KEY_ID_MAX_LENGTH:
        raise PolicyDecodeError("malformed", "key id")
    version = Version(
        _wire_int(term, "term"),
        HlcTimestamp(_wire_int(wall_ms, "wall"), _wire_int(logical, "logical")),
    )
    if deleted:
        return PolicyEntry(kind, name, version, deleted=True, signature=signature, key_id=key_id)
    if not isinstance(body, dict):
        raise PolicyDecodeError("malformed", "body")
    try:
        parsed = parse_value(kind, name, body)
    except ValidationError as exc:
        raise PolicyDecodeError("invalid", str(exc)[:200]) from None
    return PolicyEntry(kind, name, version, parsed, body, False, signature, key_id)


def decode_entry(data: bytes) -> PolicyEntry:
    """A policy broadcast; raises ``PolicyDecodeError`` (only) if it is bad."""
    message = _unpack(data, MAX_ENTRY_BYTES)
    if not isinstance(message, list) or len(message) != 2 or message[0] != _ENTRY_MESSAGE:
        raise PolicyDecodeError("malformed", "entry message")
    return _decode_entry_wire(message[1])


def decode_state(data: bytes) -> tuple[list[PolicyEntry], int]:
    """A push-pull (or persisted) state: the entries that decoded, and how many did
    not (one bad entry does not spoil the others). Raises ``PolicyDecodeError`` if
    the envelope itself is bad."""
    message = _unpack(data, MAX_STATE_BYTES)
    if not isinstance(message, list) or len(message) != 2 or message[0] != _STATE_MESSAGE:
        raise PolicyDecodeError("malformed", "state message")
    items = message[1]
    if not isinstance(items, list) or len(items) > MAX_ENTRIES:
        raise PolicyDecodeError("malformed", "entries")
    entries: list[PolicyEntry] = []
    bad = 0
    for item in items:
        try:
            entries.append(_decode_entry_wire(item))
        except PolicyDecodeError:
            bad += 1
    return entries, bad


# --------------------------------------------------------------------------- store


def _digest_term(entry: PolicyEntry) -> int:
    digest = hashlib.blake2b(signing_payload(entry), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class PolicyStore:
    """The replicated last-writer-wins map of policy (see the module docstring).

    ``stats`` counts outcomes by reason: ``applied``, ``duplicate`` (same version and
    content again: normal in gossip), ``stale`` (version at or below ours),
    ``bad_signature``, ``conflicts`` (two different signed entries with one version:
    a leader bug; the larger payload wins everywhere), ``collected`` (tombstones gc'd),
    ``oversized_broadcasts`` (entries left to push-pull).
    """

    def __init__(
        self,
        verify: Verifier,
        *,
        tombstone_ttl: float = DEFAULT_TOMBSTONE_TTL,
        queue: BroadcastQueue | None = None,
    ) -> None:
        self._verify = verify
        self.tombstone_ttl = tombstone_ttl
        self.queue = queue if queue is not None else BroadcastQueue(4, lambda: 1)
        """Broadcasts for gossip (memberlist's LAN retransmit multiplier by default;
        the agent passes one that knows the member count)."""
        self.clock = HybridClock()
        """Absorbs every accepted version; the leader reads new versions from it."""
        self.max_term = 0
        self._entries: dict[PolicyKey, PolicyEntry] = {}
        self._tombstone_since: dict[PolicyKey, float] = {}
        self._digest_terms: dict[PolicyKey, int] = {}
        self._digest = 0
        self.index = 1
        """Blocking-query index: bumps on every visible change."""
        self._indexes: dict[PolicyKey, tuple[int, int]] = {}
        self._kind_index: dict[str, int] = {}
        self._listeners: list[Callable[[int], None]] = []
        self._intention_cache: tuple[int, str, IntentionIndex] | None = None
        self.stats: dict[str, int] = {
            "applied": 0,
            "duplicate": 0,
            "stale": 0,
            "bad_signature": 0,
            "conflicts": 0,
            "collected": 0,
            "oversized_broadcasts": 0,
        }

    # ------------------------------------------------------------------ listeners

    def on_change(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """Call ``callback(index)`` after every visible change; returns an unsubscribe."""
        self._listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return unsubscribe

    # ------------------------------------------------------------------ writes

    def next_version(self, term: int, physical_ms: int) -> Version:
        """A version for a new write by the leader of ``term``, newer than every
        version this store has seen. Raises ``StaleTermError`` if a newer term's
        policy has been seen (this server is no longer the leader)."""
        if term < self.max_term:
            raise StaleTermError(
                f"term {term} is behind term {self.max_term} seen in policy: not the leader"
            )
        return Version(term, self.clock.now(physical_ms))

    def prepare_write(self, value: PolicyValue, term: int, physical_ms: int) -> PolicyEntry:
        """The unsigned entry the leader signs for a validated write."""
        return PolicyEntry.for_value(value, self.next_version(term, physical_ms))

    def prepare_delete(self, kind: str, name: str, term: int, physical_ms: int) -> PolicyEntry:
        """The unsigned tombstone the leader signs for a delete."""
        return PolicyEntry.tombstone(kind, name, self.next_version(term, physical_ms))

    def apply(self, entry: PolicyEntry, now: float, *, broadcast: bool = True) -> bool:
        """Take ``entry`` if it is newer than ours and its signature verifies; True if
        it changed the store. Stale entries are refused before the (costly) signature
        check, so replays cost nothing. Accepted entries are queued for gossip unless
        ``broadcast`` is False (loading from disk)."""
        current = self._entries.get(entry.key)
        if current is not None and entry.version <= current.version:
            if entry.version < current.version:
                self.stats["stale"] += 1
                return False
            ours, theirs = signing_payload(current), signing_payload(entry)
            if ours == theirs:
                self.stats["duplicate"] += 1
                return False
            if not self._verify(theirs, entry.signature, entry.key_id):
                self.stats["bad_signature"] += 1
                return False
            self.stats["conflicts"] += 1
            if theirs < ours:
                return False
        elif not self._verify(signing_payload(entry), entry.signature, entry.key_id):
            self.stats["bad_signature"] += 1
            return False
        self.clock.update(entry.version.hlc)
        self.max_term = max(self.max_term, entry.version.term)
        self._store(entry, now)
        self.stats["applied"] += 1
        if broadcast:
            message = encode_entry(entry)
            if len(message) <= BROADCAST_MAX_BYTES:
                self.queue.queue(message, f"policy:{entry.kind}/{entry.name}")
            else:
                self.stats["oversized_broadcasts"] += 1
        return True

    def _store(self, entry: PolicyEntry, now: float) -> None:
        key = entry.key
        previous = self._entries.get(key)
        self._digest = (self._digest - self._digest_terms.get(key, 0)) % 2**64
        term = _digest_term(entry)
        self._digest_terms[key] = term
        self._digest = (self._digest + term) % 2**64
        self._entries[key] = entry
        if entry.deleted:
            self._tombstone_since[key] = now
        else:
            self._tombstone_since.pop(key, None)
        was_live = previous is not None and not previous.deleted
        if entry.deleted and not was_live:
            return  # a tombstone for something we never showed: nothing visible changed
        self.index += 1
        if entry.deleted:
            self._indexes.pop(key, None)
        else:
            created = self._indexes[key][0] if was_live and key in self._indexes else self.index
            self._indexes[key] = (created, self.index)
        self._kind_index[entry.kind] = self.index
        for listener in list(self._listeners):
            listener(self.index)

    def gc(self, now: float) -> int:
        """Forget tombstones older than ``tombstone_ttl``; returns how many."""
        expired = [
            k for k, since in self._tombstone_since.items() if now - since >= self.tombstone_ttl
        ]
        for key in expired:
            del self._tombstone_since[key]
            del self._entries[key]
            self._digest = (self._digest - self._digest_terms.pop(key)) % 2**64
        self.stats["collected"] += len(expired)
        return len(expired)

    def get_timer(self) -> float | None:
        """When the next tombstone expires (call ``handle_timer`` then), or None."""
        if not self._tombstone_since:
            return None
        return min(self._tombstone_since.values()) + self.tombstone_ttl

    def handle_timer(self, now: float) -> None:
        self.gc(now)

    # ------------------------------------------------------------------ reads

    def digest(self) -> bytes:
        """Order-independent digest of every entry (tombstones included): equal
        digests mean equal stores, so push-pull can skip the exchange."""
        return self._digest.to_bytes(8, "big")

    def entries(self) -> list[PolicyEntry]:
        """Every entry, tombstones included, sorted by key (for push-pull and disk)."""
        return [self._entries[k] for k in sorted(self._entries)]

    def entry(self, kind: str, name: str) -> PolicyEntry | None:
        """The entry for (kind, name), tombstone included."""
        return self._entries.get((kind, name))

    def get(self, kind: str, name: str) -> PolicyValue | None:
        """The live value of (kind, name), or None."""
        entry = self._entries.get((kind, name))
        return None if entry is None else entry.value

    def values(self, kind: str | None = None) -> dict[PolicyKey, PolicyValue]:
        """Every live value (of ``kind``), by key, sorted: what ``validate_against``
        and the snapshot builder need."""
        return {
            key: entry.value
            for key, entry in sorted(self._entries.items())
            if entry.value is not None and (kind is None or key[0] == kind)
        }

    def config_entries(self, kind: str) -> list[ConfigEntry]:
        """``GET /v1/config/:kind``: live entries of ``kind`` sorted by name."""
        return [v for v in self.values(kind).values() if not isinstance(v, Intention)]

    def intentions(self) -> list[Intention]:
        """Every live intention in evaluation (precedence) order."""
        return sort_intentions(
            v for v in self.values(KIND_INTENTION).values() if isinstance(v, Intention)
        )

    def intention(self, source: str, destination: str) -> Intention | None:
        """``GET /v1/connect/intentions/exact``."""
        value = self.get(KIND_INTENTION, intention_key(source, destination))
        return value if isinstance(value, Intention) else None

    def intention_by_id(self, intention_id_: str) -> Intention | None:
        """``GET /v1/connect/intentions/:uuid``."""
        return next((i for i in self.intentions() if i.id == intention_id_), None)

    def intention_index(self, default_policy: str) -> IntentionIndex:
        """The compiled intentions, rebuilt only when policy changed."""
        cached = self._intention_cache
        if cached is not None and cached[0] == self.index and cached[1] == default_policy:
            return cached[2]
        index = IntentionIndex.build(self.intentions(), default_policy)
        self._intention_cache = (self.index, default_policy, index)
        return index

    def indexes(self, kind: str, name: str) -> tuple[int, int]:
        """(CreateIndex, ModifyIndex) of a live entry; (1, 1) if unknown."""
        return self._indexes.get((kind, name), (1, 1))

    def kind_index(self, kind: str) -> int:
        """Index at which anything of ``kind`` last changed (for blocking lists)."""
        return self._kind_index.get(kind, 1)


# --------------------------------------------------------------------------- gossip


class PolicyDelegate:
    """What the agent's gossip delegate routes policy traffic to (messages whose first
    byte is ``b"P"``). Mirrors ``CatalogDelegate``, but takes ``now`` explicitly and is
    not a ``gossip.Delegate``: the agent multiplexes catalog, policy and election."""

    def __init__(self, store: PolicyStore) -> None:
        self.store = store
        self.decode_errors: dict[str, int] = {}
        """Rejected policy messages by reason (for ``meshnode_policy_*`` metrics)."""
        self.repaired_by_push_pull = 0
        """Entries that push-pull brought us (news that gossip did not)."""

    def _reject(self, error: RemoteProtocolError) -> None:
        self.decode_errors[error.reason] = self.decode_errors.get(error.reason, 0) + 1

    def broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        return self.store.queue.get(overhead, limit)

    def notify_message(self, message: bytes, now: float) -> bool:
        """A policy broadcast arrived; True if it changed our store (it is then
        re-gossiped by the store's queue)."""
        try:
            entry = decode_entry(message)
        except PolicyDecodeError as exc:
            self._reject(exc)
            return False
        return self.store.apply(entry, now)

    def local_state(self, join: bool) -> bytes:
        return encode_state(self.store.entries())

    def merge_remote_state(self, state: bytes, join: bool, now: float) -> int:
        """A peer's push-pull state; returns how many entries were news."""
        try:
            entries, bad = decode_state(state)
        except PolicyDecodeError as exc:
            self._reject(exc)
            return 0
        for _ in range(bad):
            self._reject(PolicyDecodeError("invalid"))
        applied = sum(1 for entry in entries if self.store.apply(entry, now))
        self.repaired_by_push_pull += applied
        return applied

    def state_digest(self) -> bytes:
        return self.store.digest()
