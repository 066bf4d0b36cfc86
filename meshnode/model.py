"""The catalog's data model and Consul-compatible request parsing (pure: no I/O).

Theory of operation
-------------------
An API write arrives as a JSON body shaped like Consul's (``PUT
/v1/agent/service/register``, ``PUT /v1/agent/check/register``). ``parse_service`` and
``parse_check`` turn it into frozen ``ServiceDefinition`` / ``CheckDefinition`` values,
or raise ``ValidationError(path, message)`` naming the first thing wrong, so the HTTP
layer answers 400 with that text and nothing has changed (DESIGN.md principle 5).

Keys are matched case-insensitively and with underscores ignored: the Consul docs
accept CamelCase and snake_case, and py-consul really sends lowercase (``name``,
``enabletagoverride``, ``tagged_addresses``, ``tls_skip_verify``...). Unknown keys
are ignored, as Go's ``encoding/json`` does for Consul; ``null`` counts as absent.

The same module renders Consul's JSON *output* shapes (``agent_service_json``,
``catalog_service_json``, ``health_service_json``, ``check_json``), so the HTTP layer
only serializes. The persisted form of a registration is its API body
(``service_to_body`` / ``check_to_body``), so loading it revalidates it.

References: Consul API docs, agent/service.mdx ("Register Service"), agent/check.mdx
("Register Check"), catalog.mdx, health.mdx; Consul ``structs.ValidateServiceMetadata``
for the metadata limits.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

# --------------------------------------------------------------------------- limits

#: Consul's metadata limits (structs.ValidateServiceMetadata / metaMaxKeyPairs...).
META_MAX_KEYS: Final = 64
META_MAX_KEY_LENGTH: Final = 128
META_MAX_VALUE_LENGTH: Final = 512
#: Consul reserves this metadata key prefix for itself.
META_RESERVED_PREFIX: Final = "consul-"
_META_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
#: Longest service/check name or ID. Consul has no limit; ours keeps a node's
#: gossiped record small and bounded (names ride in every catalog broadcast).
NAME_MAX_LENGTH: Final = 256
#: Most tags on one service, longest tag: bounds the record (Consul has no limit).
TAGS_MAX: Final = 256
TAG_MAX_LENGTH: Final = 512
#: Longest address (a DNS name is at most 253 characters).
ADDRESS_MAX_LENGTH: Final = 256
#: Most checks on one service registration, most tagged addresses, most headers.
CHECKS_MAX: Final = 64
TAGGED_ADDRESSES_MAX: Final = 16
HEADERS_MAX: Final = 64
HEADER_VALUES_MAX: Final = 16
#: Longest free text (notes, output, bodies, URLs, script arguments).
TEXT_MAX_LENGTH: Final = 4096
#: Consul truncates check output to 4 KiB by default (check.mdx ``OutputMaxSize``).
OUTPUT_MAX_LENGTH: Final = 4096
ARGS_MAX: Final = 64
#: Proxy/Connect blocks are kept as opaque JSON, bounded in depth and size.
JSON_MAX_DEPTH: Final = 16
JSON_MAX_ITEMS: Final = 1024
#: Longest duration we accept (Go's time.Duration tops out at ~292 years).
DURATION_MAX_SECONDS: Final = 10 * 365 * 24 * 3600.0
#: Consul's default check timeout (check.mdx: "Timeout ... defaults to 10s").
DEFAULT_CHECK_TIMEOUT: Final = 10.0

#: Service kinds Consul knows (agent/service.mdx ``Kind``); "" is a typical service.
SERVICE_KINDS: Final = frozenset(
    {
        "",
        "connect-proxy",
        "mesh-gateway",
        "terminating-gateway",
        "ingress-gateway",
        "api-gateway",
    }
)


# --------------------------------------------------------------------------- errors


class ValidationError(ValueError):
    """A request body is wrong. ``str(error)`` is ``"<path>: <message>"`` for the 400."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        """Where in the body, Consul-style (``Checks[1].Interval``); "" for the root."""
        self.message = message


# --------------------------------------------------------------------------- values


class HealthStatus(enum.StrEnum):
    """Consul's check statuses (api.HealthPassing...). ``MAINTENANCE`` is only an
    aggregate: maintenance checks themselves are critical, as in Consul."""

    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"
    MAINTENANCE = "maintenance"


#: Statuses a check may be registered with or set to.
CHECK_STATUSES: Final = frozenset(
    {HealthStatus.PASSING, HealthStatus.WARNING, HealthStatus.CRITICAL}
)


class CheckKind(enum.StrEnum):
    """The check types meshnode runs (DESIGN.md: HTTP, TCP, TTL, script)."""

    HTTP = "http"
    TCP = "tcp"
    TTL = "ttl"
    SCRIPT = "script"


@dataclass(frozen=True, slots=True)
class TaggedAddress:
    """One entry of a service's ``TaggedAddresses`` (``{"lan": {Address, Port}}``)."""

    address: str
    port: int


@dataclass(frozen=True, slots=True)
class Weights:
    """DNS SRV weights by health (agent/service.mdx ``Weights``)."""

    passing: int = 1
    warning: int = 1


@dataclass(frozen=True, slots=True)
class ServiceDefinition:
    """One service instance registered on a node. Treat the mappings as read-only."""

    id: str
    """Unique on its node; defaults to ``name``."""
    name: str
    tags: tuple[str, ...] = ()
    address: str = ""
    """Empty means "use the node's address" (clients implement the fallback)."""
    port: int = 0
    meta: Mapping[str, str] = field(default_factory=dict)
    tagged_addresses: Mapping[str, TaggedAddress] = field(default_factory=dict)
    weights: Weights = Weights()
    enable_tag_override: bool = False
    kind: str = ""
    proxy: Mapping[str, Any] | None = None
    """Consul's ``Proxy`` block, kept as plain JSON (``connect_upstreams`` reads the
    upstreams of a ``connect-proxy`` registration from it)."""
    connect: Mapping[str, Any] | None = None
    """Consul's ``Connect`` block, kept as plain JSON (``connect_upstreams`` reads
    ``SidecarService.Proxy.Upstreams`` from it)."""


@dataclass(frozen=True, slots=True)
class CheckDefinition:
    """One health check as registered. Durations are seconds (None: not set)."""

    check_id: str
    name: str
    service_id: str = ""
    """The service this check belongs to; "" for a node-level check."""
    notes: str = ""
    status: HealthStatus = HealthStatus.CRITICAL
    """Initial status. Consul starts checks critical unless told otherwise."""
    interval: float | None = None
    timeout: float | None = None
    http: str | None = None
    method: str = ""
    header: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    body: str = ""
    tcp: str | None = None
    ttl: float | None = None
    args: tuple[str, ...] = ()
    tls_skip_verify: bool = False
    tls_server_name: str = ""
    deregister_critical_service_after: float | None = None
    success_before_passing: int = 0
    failures_before_critical: int = 0

    @property
    def kind(self) -> CheckKind:
        """Which of the supported check types this is (exactly one is set)."""
        if self.http is not None:
            return CheckKind.HTTP
        if self.tcp is not None:
            return CheckKind.TCP
        if self.ttl is not None:
            return CheckKind.TTL
        return CheckKind.SCRIPT


# --------------------------------------------------------------------------- durations

_UNITS: Final = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign, as Go prints it
    "μs": 1_000,  # U+03BC Greek mu, which Go also accepts
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION_PART = re.compile(r"([0-9]*\.?[0-9]*)(ns|us|µs|μs|ms|s|m|h)")


def _quote(value: object) -> str:
    """Values in messages as JSON shows them (``"10x"``), as the client wrote them."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _duration_ns(value: object, path: str) -> int:
    if isinstance(value, bool):
        raise ValidationError(path, f"invalid duration {_quote(value)}")
    if isinstance(value, int):
        # Consul's JSON accepts a number as nanoseconds (Go time.Duration).
        nanoseconds = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(path, f"invalid duration {_quote(value)}")
        nanoseconds = round(value)
    elif isinstance(value, str):
        nanoseconds = _parse_go_duration(value, path)
    else:
        raise ValidationError(
            path, f'invalid duration {_quote(value)}: expected a string like "10s"'
        )
    if nanoseconds < 0:
        raise ValidationError(path, f"invalid duration {_quote(value)}: must not be negative")
    if nanoseconds > DURATION_MAX_SECONDS * 1e9:
        raise ValidationError(path, f"invalid duration {_quote(value)}: too long")
    return nanoseconds


def _parse_go_duration(text: str, path: str) -> int:
    """Go's time.ParseDuration grammar: ``[-+]?([0-9]*(\\.[0-9]*)?[a-z]+)+`` or "0"."""
    original = text
    if len(text) > 64:
        raise ValidationError(path, f"invalid duration {_quote(original[:64])}...")
    sign = 1
    if text[:1] in "+-" and text:
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    if text == "0":
        return 0
    if not text:
        raise ValidationError(path, f"invalid duration {_quote(original)}")
    total = 0
    position = 0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None or match.group(1) in ("", "."):
            raise ValidationError(path, f"invalid duration {_quote(original)}")
        number, unit = match.groups()
        whole, _, fraction = number.partition(".")
        scale = _UNITS[unit]
        total += int(whole or "0") * scale
        if fraction:
            total += int(fraction) * scale // 10 ** len(fraction)
        position = match.end()
    return sign * total


def parse_duration(value: object, path: str = "") -> float:
    """A Consul/Go duration (``"10s"``, ``"1m30s"``, ``"500ms"``, or a number of
    nanoseconds) in seconds. Raises ``ValidationError`` naming ``path``."""
    return _duration_ns(value, path) / 1e9


def format_duration(seconds: float) -> str:
    """Seconds as a Go duration string (``"1m30s"``, ``"500ms"``, ``"0s"``), as Consul
    prints durations; ``parse_duration(format_duration(x)) == x`` for parsed values."""
    nanoseconds = round(seconds * 1e9)
    if nanoseconds == 0:
        return "0s"
    sign = "-" if nanoseconds < 0 else ""
    nanoseconds = abs(nanoseconds)

    def fixed(value: int, scale: int) -> str:
        whole, rest = divmod(value, scale)
        if not rest:
            return str(whole)
        digits = len(str(scale)) - 1
        return f"{whole}.{str(rest).rjust(digits, '0').rstrip('0')}"

    if nanoseconds < 1_000:
        return f"{sign}{nanoseconds}ns"
    if nanoseconds < 1_000_000:
        return f"{sign}{fixed(nanoseconds, 1_000)}µs"
    if nanoseconds < 1_000_000_000:
        return f"{sign}{fixed(nanoseconds, 1_000_000)}ms"
    hours, rest = divmod(nanoseconds, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    out = sign
    if hours:
        out += f"{hours}h"
    if hours or minutes:
        out += f"{minutes}m"
    return out + f"{fixed(rest, 1_000_000_000)}s"


# --------------------------------------------------------------------------- body access


def _normalize(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


class _Body:
    """A JSON object with keys matched case- and underscore-insensitively."""

    def __init__(self, value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise ValidationError(path, f"expected a JSON object, got {_type_name(value)}")
        self.path = path
        self.values: dict[str, object] = {}
        self.names: dict[str, str] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValidationError(path, "object keys must be strings")
            normal = _normalize(key)
            if normal in self.names:
                raise ValidationError(
                    path, f"duplicate key {key!r} (same as {self.names[normal]!r})"
                )
            self.names[normal] = key
            if item is not None:  # JSON null is "not set", as in Go
                self.values[normal] = item

    def has(self, *names: str) -> bool:
        return any(_normalize(n) in self.values for n in names)

    def get(self, name: str) -> object:
        return self.values.get(_normalize(name))

    def sub(self, name: str) -> str:
        """Path of a child, as the client spelled it if present, else canonical."""
        return _join(self.path, self.names.get(_normalize(name), name))

    def string(self, name: str, *, limit: int = NAME_MAX_LENGTH, default: str = "") -> str:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise ValidationError(self.sub(name), f"expected a string, got {_type_name(value)}")
        if len(value) > limit:
            raise ValidationError(self.sub(name), f"longer than {limit} characters")
        return value

    def boolean(self, name: str) -> bool:
        value = self.get(name)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise ValidationError(
                self.sub(name), f"expected true or false, got {_type_name(value)}"
            )
        return value

    def integer(self, name: str, *, low: int, high: int, default: int = 0) -> int:
        value = self.get(name)
        if value is None:
            return default
        return _integer(value, self.sub(name), low, high)

    def duration(self, name: str) -> float | None:
        value = self.get(name)
        if value is None or value == "":
            return None
        return parse_duration(value, self.sub(name))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _integer(value: object, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(path, f"expected an integer, got {_type_name(value)}")
    if not low <= value <= high:
        raise ValidationError(path, f"{value} is out of range {low}..{high}")
    return value


def _identifier(value: str, path: str, what: str) -> str:
    if not value:
        raise ValidationError(path, f"missing {what}")
    if len(value) > NAME_MAX_LENGTH:
        raise ValidationError(path, f"{what} longer than {NAME_MAX_LENGTH} characters")
    # IDs and names appear in URL paths (/v1/agent/service/deregister/:id) and in
    # DNS names; a slash or control character can only be a mistake.
    if "/" in value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValidationError(path, f"{what} {value!r} must not contain '/' or control characters")
    return value


def _string_list(value: object, path: str, *, most: int, limit: int) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValidationError(path, f"expected a list of strings, got {_type_name(value)}")
    if len(value) > most:
        raise ValidationError(path, f"more than {most} entries")
    for position, item in enumerate(value):
        if not isinstance(item, str):
            raise ValidationError(
                f"{path}[{position}]", f"expected a string, got {_type_name(item)}"
            )
        if len(item) > limit:
            raise ValidationError(f"{path}[{position}]", f"longer than {limit} characters")
    return tuple(value)


def validate_meta(value: object, path: str) -> dict[str, str]:
    """Consul's ``ValidateMetadata``: ≤64 pairs, keys ``[A-Za-z0-9_-]`` ≤128 chars not
    starting with ``consul-``, string values ≤512 chars."""
    if not isinstance(value, dict):
        raise ValidationError(path, f"expected an object of strings, got {_type_name(value)}")
    if len(value) > META_MAX_KEYS:
        raise ValidationError(path, f"more than {META_MAX_KEYS} keys")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ValidationError(path, "keys must be non-empty strings")
        where = f"{path}.{key}" if len(key) <= META_MAX_KEY_LENGTH else path
        if len(key) > META_MAX_KEY_LENGTH:
            raise ValidationError(where, f"key longer than {META_MAX_KEY_LENGTH} characters")
        if not _META_KEY.match(key):
            raise ValidationError(where, "keys may contain only letters, digits, '_' and '-'")
        if key.startswith(META_RESERVED_PREFIX):
            raise ValidationError(where, f"key prefix {META_RESERVED_PREFIX!r} is reserved")
        if not isinstance(item, str):
            raise ValidationError(where, f"expected a string, got {_type_name(item)}")
        if len(item) > META_MAX_VALUE_LENGTH:
            raise ValidationError(where, f"value longer than {META_MAX_VALUE_LENGTH} characters")
        out[key] = item
    return out


def check_json_value(value: object, path: str, depth: int = 0) -> int:
    """Validate plain JSON (objects with string keys, lists, scalars) bounded in depth;
    returns the number of items, so callers can bound the size too."""
    if depth > JSON_MAX_DEPTH:
        raise ValidationError(path, f"nested deeper than {JSON_MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | int | str):
        if isinstance(value, str) and len(value) > TEXT_MAX_LENGTH:
            raise ValidationError(path, f"string longer than {TEXT_MAX_LENGTH} characters")
        return 1
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(path, "numbers must be finite")
        return 1
    count = 1
    if isinstance(value, list):
        for position, item in enumerate(value):
            count += check_json_value(item, f"{path}[{position}]", depth + 1)
            if count > JSON_MAX_ITEMS:
                raise ValidationError(path, f"more than {JSON_MAX_ITEMS} values")
        return count
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or len(key) > NAME_MAX_LENGTH:
                raise ValidationError(path, "keys must be strings")
            count += check_json_value(item, f"{path}.{key}", depth + 1)
            if count > JSON_MAX_ITEMS:
                raise ValidationError(path, f"more than {JSON_MAX_ITEMS} values")
        return count
    raise ValidationError(path, f"not JSON: {_type_name(value)}")


#: Public names of the body helpers, for meshnode/policy.py, which parses intentions
#: and config entries with the same key rules and error messages.
Body = _Body
type_name = _type_name
string_list = _string_list
normalize_key = _normalize


# --------------------------------------------------------------------------- services


def parse_service(body: object) -> ServiceDefinition:
    """A ``PUT /v1/agent/service/register`` body as a ``ServiceDefinition``.

    Its checks (``Check`` and ``Checks``) are parsed by ``parse_service_checks``;
    call both before changing anything.
    """
    fields = _Body(body, "")
    name = _identifier(fields.string("Name"), fields.sub("Name"), "service name")
    service_id = fields.string("ID") or name
    _identifier(service_id, fields.sub("ID"), "service ID")
    tags: tuple[str, ...] = ()
    if fields.has("Tags"):
        tags = _string_list(
            fields.get("Tags"), fields.sub("Tags"), most=TAGS_MAX, limit=TAG_MAX_LENGTH
        )
    meta: dict[str, str] = {}
    if fields.has("Meta"):
        meta = validate_meta(fields.get("Meta"), fields.sub("Meta"))
    kind = fields.string("Kind")
    if kind not in SERVICE_KINDS:
        raise ValidationError(
            fields.sub("Kind"),
            f"unknown kind {kind!r}; one of {sorted(k for k in SERVICE_KINDS if k)}",
        )
    return ServiceDefinition(
        id=service_id,
        name=name,
        tags=tags,
        address=fields.string("Address", limit=ADDRESS_MAX_LENGTH),
        port=fields.integer("Port", low=0, high=65535),
        meta=meta,
        tagged_addresses=_tagged_addresses(fields),
        weights=_weights(fields),
        enable_tag_override=fields.boolean("EnableTagOverride"),
        kind=kind,
        proxy=_opaque(fields, "Proxy"),
        connect=_opaque(fields, "Connect"),
    )


def _tagged_addresses(fields: _Body) -> dict[str, TaggedAddress]:
    value = fields.get("TaggedAddresses")
    if value is None:
        return {}
    path = fields.sub("TaggedAddresses")
    if not isinstance(value, dict):
        raise ValidationError(path, f"expected an object, got {_type_name(value)}")
    if len(value) > TAGGED_ADDRESSES_MAX:
        raise ValidationError(path, f"more than {TAGGED_ADDRESSES_MAX} entries")
    out: dict[str, TaggedAddress] = {}
    for tag, entry in value.items():
        where = f"{path}.{tag}"
        if not isinstance(tag, str) or not 0 < len(tag) <= NAME_MAX_LENGTH:
            raise ValidationError(path, "keys must be non-empty strings")
        inner = _Body(entry, where)
        out[tag] = TaggedAddress(
            inner.string("Address", limit=ADDRESS_MAX_LENGTH),
            inner.integer("Port", low=0, high=65535),
        )
    return out


def _weights(fields: _Body) -> Weights:
    value = fields.get("Weights")
    if value is None:
        return Weights()
    inner = _Body(value, fields.sub("Weights"))
    # Consul: "Passing must be greater than 0"; Warning may be 0 (no traffic).
    return Weights(
        passing=inner.integer("Passing", low=1, high=65535, default=1),
        warning=inner.integer("Warning", low=0, high=65535, default=1),
    )


def _opaque(fields: _Body, name: str) -> dict[str, Any] | None:
    value = fields.get(name)
    if value is None:
        return None
    path = fields.sub(name)
    if not isinstance(value, dict):
        raise ValidationError(path, f"expected an object, got {_type_name(value)}")
    check_json_value(value, path)
    return value


# --------------------------------------------------------------------------- checks

#: Check types Consul has and we do not run; named in the 400 so the client knows.
_UNSUPPORTED_CHECKS: Final = (
    ("GRPC", "gRPC"),
    ("H2PING", "H2PING"),
    ("DockerContainerID", "Docker"),
    ("AliasService", "alias"),
    ("AliasNode", "alias"),
    ("OSService", "OS service"),
    ("UDP", "UDP"),
    ("Script", "Script (use Args)"),
    ("Shell", "Docker shell"),
)
_CHECK_TYPES: Final = ("HTTP", "TCP", "TTL", "Args")


def parse_check(body: object, *, service_id: str | None = None, path: str = "") -> CheckDefinition:
    """A check body (``PUT /v1/agent/check/register``, or one of a service's checks
    when ``service_id`` is given) as a ``CheckDefinition``.

    Defaults follow Consul: ``CheckID`` is ``Name`` (``service:<id>`` for a service's
    check); the initial status is critical; ``Timeout`` unset means 10 s
    (``DEFAULT_CHECK_TIMEOUT``). A registration with several checks numbers their
    default IDs: use ``parse_service_checks`` for those.
    """
    check = _parse_check(body, service_id, path)
    if service_id is not None and not check.check_id:
        check = _replace_check(check, check_id=f"service:{service_id}")
    if not check.name:
        check = _replace_check(check, name=check.check_id)
    return check


def _parse_check(body: object, service_id: str | None, path: str) -> CheckDefinition:
    fields = _Body(body, path)
    for key, label in _UNSUPPORTED_CHECKS:
        if fields.has(key) and fields.get(key) not in ("", [], False):
            raise ValidationError(fields.sub(key), f"{label} checks are not supported")
    present = [key for key in _CHECK_TYPES if fields.has(key)]
    if not present:
        raise ValidationError(
            path, "unknown check type: one of HTTP, TCP, TTL or Args (script) is required"
        )
    if len(present) > 1:
        raise ValidationError(path, f"only one check type allowed, got {', '.join(present)}")
    kind = present[0]

    name = fields.string("Name")
    check_id = fields.string("CheckID") or fields.string("ID")
    if fields.has("CheckID") and fields.has("ID") and fields.get("CheckID") != fields.get("ID"):
        raise ValidationError(path, "CheckID and ID disagree")
    id_path = fields.sub("CheckID") if fields.has("CheckID") else fields.sub("ID")
    if service_id is None:
        _identifier(name, fields.sub("Name"), "check name")  # Consul: "Missing check name"
        check_id = check_id or name
        owner = fields.string("ServiceID")
        if owner:
            _identifier(owner, fields.sub("ServiceID"), "service ID")
    else:
        owner = service_id
    if check_id:
        _identifier(check_id, id_path, "check ID")
    if name:
        _identifier(name, fields.sub("Name"), "check name")

    status_text = fields.string("Status") or HealthStatus.CRITICAL.value
    if status_text not in CHECK_STATUSES:
        raise ValidationError(
            fields.sub("Status"), f"invalid status {status_text!r}; passing, warning or critical"
        )

    interval = fields.duration("Interval")
    ttl = fields.duration("TTL")
    http: str | None = None
    tcp: str | None = None
    args: tuple[str, ...] = ()
    if kind == "TTL":
        if not ttl:
            raise ValidationError(fields.sub("TTL"), "TTL must be > 0")
    else:
        # Consul: "Interval must be > 0 for Script, HTTP, H2PING, or TCP checks".
        if not interval:
            raise ValidationError(fields.sub("Interval"), f"Interval must be > 0 for {kind} checks")
        if kind == "HTTP":
            http = fields.string("HTTP", limit=TEXT_MAX_LENGTH)
            if not re.match(r"^https?://[^/\s]+", http):
                raise ValidationError(fields.sub("HTTP"), f"not an http(s) URL: {http!r}")
        elif kind == "TCP":
            tcp = fields.string("TCP", limit=ADDRESS_MAX_LENGTH)
            host, _, port = tcp.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) <= 65535:
                raise ValidationError(fields.sub("TCP"), f"expected host:port, got {tcp!r}")
        else:
            args = _string_list(
                fields.get("Args"), fields.sub("Args"), most=ARGS_MAX, limit=TEXT_MAX_LENGTH
            )
            if not args:
                raise ValidationError(fields.sub("Args"), "must name a command")

    method = fields.string("Method", limit=32).upper()
    if method and not method.isalpha():
        raise ValidationError(fields.sub("Method"), f"invalid HTTP method {method!r}")
    return CheckDefinition(
        check_id=check_id,
        name=name,
        service_id=owner,
        notes=fields.string("Notes", limit=TEXT_MAX_LENGTH),
        status=HealthStatus(status_text),
        interval=interval,
        timeout=fields.duration("Timeout"),
        http=http,
        method=method,
        header=_headers(fields),
        body=fields.string("Body", limit=TEXT_MAX_LENGTH),
        tcp=tcp,
        ttl=ttl if kind == "TTL" else None,
        args=args,
        tls_skip_verify=fields.boolean("TLSSkipVerify"),
        tls_server_name=fields.string("TLSServerName", limit=ADDRESS_MAX_LENGTH),
        deregister_critical_service_after=fields.duration("DeregisterCriticalServiceAfter"),
        success_before_passing=fields.integer("SuccessBeforePassing", low=0, high=1_000_000),
        failures_before_critical=fields.integer("FailuresBeforeCritical", low=0, high=1_000_000),
    )


def _headers(fields: _Body) -> dict[str, tuple[str, ...]]:
    value = fields.get("Header")
    if value is None:
        return {}
    path = fields.sub("Header")
    if not isinstance(value, dict):
        raise ValidationError(path, f"expected an object of string lists, got {_type_name(value)}")
    if len(value) > HEADERS_MAX:
        raise ValidationError(path, f"more than {HEADERS_MAX} headers")
    out: dict[str, tuple[str, ...]] = {}
    for key, values in value.items():
        if not isinstance(key, str) or not key or len(key) > NAME_MAX_LENGTH:
            raise ValidationError(path, "header names must be non-empty strings")
        out[key] = _string_list(
            values, f"{path}.{key}", most=HEADER_VALUES_MAX, limit=TEXT_MAX_LENGTH
        )
    return out


def parse_service_checks(body: object, service: ServiceDefinition) -> tuple[CheckDefinition, ...]:
    """The ``Check`` and ``Checks`` of a service registration body.

    IDs and names default as in Consul's agent: ``service:<id>`` for a lone check,
    ``service:<id>:<n>`` (1-based) when there are several; the name defaults to
    ``Service '<name>' check``. Duplicate check IDs are an error.
    """
    fields = _Body(body, "")
    raw: list[tuple[object, str]] = []
    if fields.has("Check"):
        single = fields.get("Check")
        # An empty Check object means "no check" (Go's zero value).
        if not (isinstance(single, dict) and not single):
            raw.append((single, fields.sub("Check")))
    if fields.has("Checks"):
        many = fields.get("Checks")
        path = fields.sub("Checks")
        if not isinstance(many, list):
            raise ValidationError(path, f"expected a list of checks, got {_type_name(many)}")
        raw.extend((item, f"{path}[{position}]") for position, item in enumerate(many))
    if len(raw) > CHECKS_MAX:
        raise ValidationError(fields.sub("Checks"), f"more than {CHECKS_MAX} checks")
    checks: list[CheckDefinition] = []
    seen: set[str] = set()
    for position, (item, path) in enumerate(raw, start=1):
        check = _parse_check(item, service.id, path)
        check_id = check.check_id or (
            f"service:{service.id}" if len(raw) == 1 else f"service:{service.id}:{position}"
        )
        name = check.name or f"Service '{service.name}' check"
        if check_id in seen:
            raise ValidationError(path, f"duplicate check ID {check_id!r}")
        seen.add(check_id)
        checks.append(_replace_check(check, check_id=check_id, name=name))
    return tuple(checks)


def _replace_check(check: CheckDefinition, **changes: Any) -> CheckDefinition:
    values = {name: getattr(check, name) for name in CheckDefinition.__dataclass_fields__}
    values.update(changes)
    return CheckDefinition(**values)


def parse_registration(body: object) -> tuple[ServiceDefinition, tuple[CheckDefinition, ...]]:
    """A whole service registration: the service and its checks, all validated."""
    service = parse_service(body)
    _validate_sidecar_upstreams(service)
    return service, parse_service_checks(body, service)


def parse_check_update(body: object) -> tuple[HealthStatus, str]:
    """``PUT /v1/agent/check/update/:id`` body ``{"Status", "Output"}`` (Go's UpdateTTL)."""
    fields = _Body(body, "")
    status_text = fields.string("Status")
    if status_text not in CHECK_STATUSES:
        raise ValidationError(
            fields.sub("Status"), f"invalid status {status_text!r}; passing, warning or critical"
        )
    output = fields.string("Output", limit=1 << 20)[:OUTPUT_MAX_LENGTH]
    return HealthStatus(status_text), output


# --------------------------------------------------------------------------- round trip


def service_to_body(service: ServiceDefinition) -> dict[str, Any]:
    """The registration body that ``parse_service`` turns back into ``service``
    (without checks): the persisted form of a local registration."""
    body: dict[str, Any] = {
        "ID": service.id,
        "Name": service.name,
        "Tags": list(service.tags),
        "Address": service.address,
        "Port": service.port,
        "Meta": dict(service.meta),
        "TaggedAddresses": _tagged_json(service.tagged_addresses),
        "Weights": {"Passing": service.weights.passing, "Warning": service.weights.warning},
        "EnableTagOverride": service.enable_tag_override,
        "Kind": service.kind,
    }
    if service.proxy is not None:
        body["Proxy"] = service.proxy
    if service.connect is not None:
        body["Connect"] = service.connect
    return body


def check_to_body(check: CheckDefinition) -> dict[str, Any]:
    """The body that ``parse_check`` turns back into ``check``: its persisted form."""
    body: dict[str, Any] = {
        "CheckID": check.check_id,
        "Name": check.name,
        "ServiceID": check.service_id,
        "Notes": check.notes,
        "Status": check.status.value,
        "Method": check.method,
        "Header": {k: list(v) for k, v in check.header.items()},
        "Body": check.body,
        "TLSSkipVerify": check.tls_skip_verify,
        "TLSServerName": check.tls_server_name,
        "SuccessBeforePassing": check.success_before_passing,
        "FailuresBeforeCritical": check.failures_before_critical,
    }
    for key, seconds in (
        ("Interval", check.interval),
        ("Timeout", check.timeout),
        ("TTL", check.ttl),
        ("DeregisterCriticalServiceAfter", check.deregister_critical_service_after),
    ):
        if seconds is not None:
            body[key] = format_duration(seconds)
    if check.http is not None:
        body["HTTP"] = check.http
    if check.tcp is not None:
        body["TCP"] = check.tcp
    if check.args:
        body["Args"] = list(check.args)
    return body


# --------------------------------------------------------------------------- output shapes


def _tagged_json(tagged: Mapping[str, TaggedAddress]) -> dict[str, dict[str, Any]]:
    return {tag: {"Address": a.address, "Port": a.port} for tag, a in tagged.items()}


def _weights_json(weights: Weights) -> dict[str, int]:
    return {"Passing": weights.passing, "Warning": weights.warning}


def agent_service_json(service: ServiceDefinition, *, datacenter: str) -> dict[str, Any]:
    """One value of ``GET /v1/agent/services`` (and ``/v1/agent/service/:id``)."""
    out: dict[str, Any] = {
        "ID": service.id,
        "Service": service.name,
        "Tags": list(service.tags),
        "Meta": dict(service.meta),
        "Port": service.port,
        "Address": service.address,
        "TaggedAddresses": _tagged_json(service.tagged_addresses),
        "Weights": _weights_json(service.weights),
        "EnableTagOverride": service.enable_tag_override,
        "Datacenter": datacenter,
    }
    if service.kind:
        out["Kind"] = service.kind
    if service.proxy is not None:
        out["Proxy"] = service.proxy
    if service.connect is not None:
        out["Connect"] = service.connect
    return out


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What the output shapes need to know about a node."""

    name: str
    node_id: str
    address: str
    datacenter: str
    meta: Mapping[str, str] = field(default_factory=dict)
    tagged_addresses: Mapping[str, str] = field(default_factory=dict)
    """Node-level tagged addresses are plain strings in Consul (``{"lan": "10.0.0.1"}``)."""


def _node_tagged(node: NodeInfo) -> dict[str, str]:
    # Consul always reports lan/wan (and their ipv4 forms) for a node; default both
    # to the node address, as an agent with no separate WAN address does.
    tagged = {
        "lan": node.address,
        "lan_ipv4": node.address,
        "wan": node.address,
        "wan_ipv4": node.address,
    }
    tagged.update(node.tagged_addresses)
    return tagged


def catalog_service_json(
    node: NodeInfo, service: ServiceDefinition, *, create_index: int, modify_index: int
) -> dict[str, Any]:
    """One element of ``GET /v1/catalog/service/:name`` (catalog.mdx)."""
    return {
        "ID": node.node_id,
        "Node": node.name,
        "Address": node.address,
        "Datacenter": node.datacenter,
        "TaggedAddresses": _node_tagged(node),
        "NodeMeta": dict(node.meta),
        "ServiceKind": service.kind,
        "ServiceID": service.id,
        "ServiceName": service.name,
        "ServiceTags": list(service.tags),
        "ServiceAddress": service.address,
        "ServiceTaggedAddresses": _tagged_json(service.tagged_addresses),
        "ServiceWeights": _weights_json(service.weights),
        "ServiceMeta": dict(service.meta),
        "ServicePort": service.port,
        "ServiceEnableTagOverride": service.enable_tag_override,
        "ServiceProxy": dict(service.proxy) if service.proxy is not None else {},
        "ServiceConnect": dict(service.connect) if service.connect is not None else {},
        "CreateIndex": create_index,
        "ModifyIndex": modify_index,
    }


def node_json(node: NodeInfo, *, create_index: int, modify_index: int) -> dict[str, Any]:
    """A node as ``/v1/catalog/nodes`` and the ``Node`` of ``/v1/health/service`` show it."""
    return {
        "ID": node.node_id,
        "Node": node.name,
        "Address": node.address,
        "Datacenter": node.datacenter,
        "TaggedAddresses": _node_tagged(node),
        "Meta": dict(node.meta),
        "CreateIndex": create_index,
        "ModifyIndex": modify_index,
    }


@dataclass(frozen=True, slots=True)
class CheckView:
    """A check as the query side reports it: definition fields plus current state.

    Synthetic checks (``serfHealth``, maintenance) have no definition.
    """

    node: str
    check_id: str
    name: str
    status: HealthStatus
    notes: str = ""
    output: str = ""
    service_id: str = ""
    service_name: str = ""
    service_tags: tuple[str, ...] = ()
    definition: CheckDefinition | None = None
    create_index: int = 1
    modify_index: int = 1

    @property
    def kind(self) -> str:
        """Consul's ``Type``: ``http``/``tcp``/``ttl``/``script``; "" for serfHealth
        and maintenance checks."""
        return self.definition.kind.value if self.definition is not None else ""


def check_json(check: CheckView) -> dict[str, Any]:
    """A check as ``/v1/health/*``, ``/v1/agent/checks`` and ``Checks[]`` show it."""
    definition: dict[str, Any] = {}
    if check.definition is not None:
        d = check.definition
        if d.http is not None:
            definition.update(
                {
                    "HTTP": d.http,
                    "Header": {k: list(v) for k, v in d.header.items()},
                    "Method": d.method,
                    "Body": d.body,
                    "TLSServerName": d.tls_server_name,
                    "TLSSkipVerify": d.tls_skip_verify,
                }
            )
        if d.tcp is not None:
            definition["TCP"] = d.tcp
        for key, seconds in (
            ("Interval", d.interval),
            ("Timeout", d.timeout),
            ("DeregisterCriticalServiceAfter", d.deregister_critical_service_after),
        ):
            if seconds is not None:
                definition[key] = format_duration(seconds)
    return {
        "Node": check.node,
        "CheckID": check.check_id,
        "Name": check.name,
        "Status": check.status.value,
        "Notes": check.notes,
        "Output": check.output,
        "ServiceID": check.service_id,
        "ServiceName": check.service_name,
        "ServiceTags": list(check.service_tags),
        "Type": check.kind,
        "Definition": definition,
        "CreateIndex": check.create_index,
        "ModifyIndex": check.modify_index,
    }


def health_service_json(
    node: NodeInfo,
    service: ServiceDefinition,
    checks: Sequence[CheckView],
    *,
    node_index: tuple[int, int],
    service_index: tuple[int, int],
) -> dict[str, Any]:
    """One element of ``GET /v1/health/service/:name``: ``{Node, Service, Checks}``.

    ``checks`` must include the node's checks (``serfHealth`` first, as Consul lists
    it) so clients can fold them into the aggregate status.
    """
    service_out: dict[str, Any] = {
        "ID": service.id,
        "Service": service.name,
        "Tags": list(service.tags),
        "Address": service.address,
        "Meta": dict(service.meta),
        "Port": service.port,
        "TaggedAddresses": _tagged_json(service.tagged_addresses),
        "Weights": _weights_json(service.weights),
        "EnableTagOverride": service.enable_tag_override,
        "Kind": service.kind,
        "Proxy": dict(service.proxy) if service.proxy is not None else {},
        "Connect": dict(service.connect) if service.connect is not None else {},
        "CreateIndex": service_index[0],
        "ModifyIndex": service_index[1],
    }
    return {
        "Node": node_json(node, create_index=node_index[0], modify_index=node_index[1]),
        "Service": service_out,
        "Checks": [check_json(c) for c in checks],
    }


# --------------------------------------------------------------------------- upstreams

#: Where an upstream listens unless ``LocalBindAddress`` says otherwise (Consul's default).
DEFAULT_UPSTREAM_BIND_ADDRESS: Final = "127.0.0.1"
#: Upstreams one registration may declare (each is a listener in the proxy).
UPSTREAMS_MAX: Final = 256


@dataclass(frozen=True, slots=True)
class UpstreamDefinition:
    """One entry of ``Connect.SidecarService.Proxy.Upstreams`` (or of a
    ``connect-proxy`` registration's ``Proxy.Upstreams``): the local service reaches
    ``destination`` by connecting to ``bind_address:bind_port`` on this host."""

    destination: str
    bind_port: int
    bind_address: str = DEFAULT_UPSTREAM_BIND_ADDRESS
    path: str = ""
    """Where in the registration body it was declared (for error messages)."""


@dataclass(frozen=True, slots=True)
class ConnectUpstreams:
    """The upstreams a registration declares, and the service that calls them."""

    source: str
    """The local service whose identity the outbound connections carry: the service
    itself for ``Connect.SidecarService``, ``Proxy.DestinationServiceName`` for a
    ``connect-proxy`` registration."""
    upstreams: tuple[UpstreamDefinition, ...]
    http_proxy: UpstreamDefinition | None = None
    """``Proxy.Config.http_proxy_port`` (and ``http_proxy_address``): one HTTP
    forward-proxy listener for all of ``upstreams``, the upstream chosen per request by
    the ``Host`` header (``destination`` is "")."""

    def listeners(self) -> tuple[UpstreamDefinition, ...]:
        """Every address the proxy listens on for this registration."""
        if self.http_proxy is None:
            return self.upstreams
        return (*self.upstreams, self.http_proxy)


def _upstreams_block(service: ServiceDefinition) -> tuple[str, _Body] | None:
    """(source service, the ``Proxy`` block) of a registration that has one."""
    if service.kind == "connect-proxy":
        if service.proxy is None:
            return None
        proxy = _Body(service.proxy, "Proxy")
        source = proxy.string("DestinationServiceName")
        if not source:
            return None
        return source, proxy
    if service.connect is None:
        return None
    connect = _Body(service.connect, "Connect")
    sidecar = connect.get("SidecarService")
    if sidecar is None:
        return None
    sidecar_fields = _Body(sidecar, connect.sub("SidecarService"))
    proxy_value = sidecar_fields.get("Proxy")
    if proxy_value is None:
        return None
    return service.name, _Body(proxy_value, sidecar_fields.sub("Proxy"))


def _parse_upstream(value: object, path: str) -> UpstreamDefinition:
    fields = _Body(value, path)
    kind = fields.string("DestinationType") or "service"
    if kind != "service":
        raise ValidationError(
            fields.sub("DestinationType"), f"{kind!r} upstreams are not supported; use 'service'"
        )
    destination = fields.string("DestinationName")
    if not destination:
        raise ValidationError(fields.sub("DestinationName"), "missing DestinationName")
    _identifier(destination, fields.sub("DestinationName"), "DestinationName")
    if not fields.has("LocalBindPort"):
        raise ValidationError(fields.sub("LocalBindPort"), "missing LocalBindPort (1..65535)")
    port = fields.integer("LocalBindPort", low=1, high=65535)
    if fields.string("LocalBindSocketPath", limit=TEXT_MAX_LENGTH):
        raise ValidationError(
            fields.sub("LocalBindSocketPath"), "unix socket upstreams are not supported"
        )
    address = _bind_address(fields, "LocalBindAddress")
    return UpstreamDefinition(destination, port, address, path)


def _bind_address(fields: _Body, key: str) -> str:
    address = fields.string(key, limit=ADDRESS_MAX_LENGTH)
    if not address:
        return DEFAULT_UPSTREAM_BIND_ADDRESS
    import ipaddress  # only registrations with an address pay for it

    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        raise ValidationError(fields.sub(key), f"expected an IP address, got {address!r}") from None


def _http_proxy(proxy: _Body) -> UpstreamDefinition | None:
    """``Proxy.Config.http_proxy_port`` / ``http_proxy_address``, if set."""
    config = proxy.get("Config")
    if not isinstance(config, dict) or config.get("http_proxy_port") is None:
        return None
    fields = _Body(config, proxy.sub("Config"))
    port = fields.integer("http_proxy_port", low=1, high=65535)
    return UpstreamDefinition(
        "", port, _bind_address(fields, "http_proxy_address"), fields.sub("http_proxy_port")
    )


def connect_upstreams(service: ServiceDefinition) -> ConnectUpstreams | None:
    """The upstreams ``service`` declares (None: it declares none), validated:
    ``ValidationError`` names the first bad field (a missing ``DestinationName``, a
    ``LocalBindPort`` outside 1..65535, the same bind address and port twice)."""
    block = _upstreams_block(service)
    if block is None:
        return None
    source, proxy = block
    raw, path = proxy.get("Upstreams"), proxy.sub("Upstreams")
    http_proxy = _http_proxy(proxy)
    if raw is None:
        return ConnectUpstreams(source, (), http_proxy)
    if not isinstance(raw, list):
        raise ValidationError(path, f"expected a list of upstreams, got {_type_name(raw)}")
    if len(raw) > UPSTREAMS_MAX:
        raise ValidationError(path, f"more than {UPSTREAMS_MAX} upstreams")
    upstreams: list[UpstreamDefinition] = []
    seen: dict[tuple[str, int], str] = {}
    for position, item in enumerate(raw):
        upstream = _parse_upstream(item, f"{path}[{position}]")
        key = (upstream.bind_address, upstream.bind_port)
        if key in seen:
            raise ValidationError(
                f"{upstream.path}.LocalBindPort",
                f"{upstream.bind_address}:{upstream.bind_port} is also {seen[key]}'s bind address",
            )
        seen[key] = upstream.path
        upstreams.append(upstream)
    if http_proxy is not None:
        key = (http_proxy.bind_address, http_proxy.bind_port)
        if key in seen:
            raise ValidationError(
                http_proxy.path,
                f"{http_proxy.bind_address}:{http_proxy.bind_port} is also {seen[key]}'s"
                " bind address",
            )
    return ConnectUpstreams(source, tuple(upstreams), http_proxy)


def _validate_sidecar_upstreams(service: ServiceDefinition) -> None:
    """Refuse a malformed ``Connect.SidecarService.Proxy.Upstreams`` at registration.
    A ``connect-proxy`` registration's ``Proxy.Upstreams`` is checked where it is used
    (the snapshot builder skips a bad one): Consul clients have long registered those
    with fields we do not need."""
    if service.kind != "connect-proxy":
        connect_upstreams(service)
