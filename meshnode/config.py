"""The agent's configuration: read once, here, into frozen dataclasses (STYLE.md rule 6).

Theory of operation
-------------------
Settings come from five layers; a later layer wins key by key:

1. built-in defaults (a different set with ``dev = true``, see ``DEV_DEFAULTS``);
2. the TOML file given by ``--config`` (a ``.json`` name is read as JSON);
3. every ``*.toml`` and ``*.json`` file in ``config_dir``, in file-name order;
4. ``MESHNODE_*`` environment variables;
5. command-line flags (``add_agent_arguments``).

Each layer is parsed and type-checked on its own, so an error names the key and the
layer it came from (``ConfigError``: key, file, message). The merged result is then
checked as a whole (cross-key rules such as "``bootstrap_expect`` needs ``server``"),
blaming the key in the layer that set it. Unknown keys are errors, with a "did you
mean" hint: a typo must not silently leave a default in place.

Key names are the same in every file format, and every key has one environment
variable. A key with a flag reads the variable named after the flag (``--node`` →
``MESHNODE_NODE``, ``--join`` → ``MESHNODE_JOIN``): scripts set the two
interchangeably. Any other key reads ``MESHNODE_`` + the dotted key in upper case with
``.`` written ``__`` (``gossip.probe_interval`` → ``MESHNODE_GOSSIP__PROBE_INTERVAL``).
Lists in the environment are comma-separated, booleans ``true``/``false``/``1``/``0``,
and an empty variable counts as unset. Unknown ``MESHNODE_*`` variables are errors.
Tables in files merge key by key; a list replaces the list of an earlier layer, except
service definitions (``service``/``services``), which accumulate from every file.

Relative paths are resolved against the directory of the file that contains them, or
against the working directory for environment variables and flags (a systemd unit
runs in ``/``, so "relative to the working directory" would not mean the config file's
neighbour).

This module only reads: it creates no directory and opens no socket. ``--dev`` leaves
``data_dir`` None and the agent makes a temporary directory; ``advertise_addr`` None
means the gossip transport picks one when it binds (``gossip.transport``: the bind
address, or the outbound address when binding a wildcard).

docs/configuration.md is the reference for users; the docstrings here say the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal, NamedTuple, cast, get_type_hints

from gossip.config import DEFAULT_PORT, NAME_MAX_LENGTH, PRESETS, GossipConfig
from gossip.keyring import decode_key
from meshnode.errors import ConfigError
from meshnode.logging import LEVELS, LogFormat

IntentionPolicy = Literal["allow", "deny"]

#: Largest config or service file we read. Real ones are a few kilobytes; the limit
#: only keeps a wrong path (a log, a disk image) from being read into memory.
MAX_CONFIG_FILE_BYTES: Final = 1024 * 1024
ENV_PREFIX: Final = "MESHNODE_"
#: Consul's default sidecar port range starts here.
DEFAULT_PROXY_PORT: Final = 20000
#: Consul's default reconnect_timeout and leaf certificate TTL.
DEFAULT_RECONNECT_TIMEOUT: Final = 72 * 3600.0
DEFAULT_LEAF_TTL: Final = 72 * 3600.0
#: Leaf TTL bounds: a shorter leaf than a minute renews faster than a CSR round
#: trip under load; a year is Consul's upper bound.
LEAF_TTL_MIN: Final = 60.0
LEAF_TTL_MAX: Final = 365 * 24 * 3600.0
#: An ACL token shorter than this is guessable; Consul's tokens are 36-character UUIDs.
ACL_TOKEN_MIN_LENGTH: Final = 16
#: Longest duration accepted anywhere (ten years): larger values are typos.
DURATION_MAX: Final = 10 * 365 * 24 * 3600.0


# ------------------------------------------------------------------ the result


class HostPort(NamedTuple):
    """A host (IP literal, or a DNS name for join addresses) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


#: Consul's default HTTP API address (loopback: the API is local by default).
DEFAULT_HTTP_ADDR: Final = HostPort("127.0.0.1", 8500)


@dataclass(frozen=True, slots=True)
class ServiceSource:
    """One raw service definition, as found in a file; ``meshnode`` parses it elsewhere."""

    source: Path
    """The file it came from (for error messages: key and file, rule 7)."""
    key: str
    """Where in that file: ``service``, ``service[2]`` or ``services[0]``."""
    definition: Mapping[str, object]
    """The table as the file had it (read-only view; nested values are plain)."""


@dataclass(frozen=True, slots=True)
class MdnsConfig:
    """Zeroconf discovery: advertise ``_meshnode._tcp.local.`` and browse for peers."""

    enabled: bool = True
    """Advertise and browse with mDNS (off with ``--dev``)."""
    interface: str | None = None
    """Interface name (``eth0``) or IP address to advertise on; None: all interfaces."""


@dataclass(frozen=True, slots=True)
class AclConfig:
    """Access control of the HTTP API."""

    enabled: bool = False
    """With ACLs on, every write to the HTTP API needs ``token``; reads stay open."""
    token: str | None = field(default=None, repr=False)
    """The token writes must present (``X-Consul-Token`` or ``?token=``); required
    with ``enabled``, at least 16 characters. Not shown in ``repr``."""


@dataclass(frozen=True, slots=True)
class CaConfig:
    """The built-in certificate authority (used on servers)."""

    cert_file: Path | None = None
    """Operator-supplied CA certificate (PEM); None: the first leader creates a root."""
    key_file: Path | None = None
    """Private key of ``cert_file`` (PEM); set both or neither."""
    leaf_ttl: float = DEFAULT_LEAF_TTL
    """Lifetime of service and agent leaf certificates, seconds (renewed at ~half)."""
    trust_domain: str | None = None
    """SPIFFE trust domain; None: the first leader picks one and keeps it in CA state."""


ProxyEventLoop = Literal["auto", "uvloop", "asyncio"]


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """The local mTLS proxy."""

    enabled: bool = True
    """Serve proxy snapshots on ``<data_dir>/proxy.sock`` and publish ``port`` to
    the cluster (off: this host has no proxy; other hosts do not route to it)."""
    port: int = DEFAULT_PROXY_PORT
    """Inbound mTLS port; 0 picks a free port when the agent starts."""
    bind_address: str | None = None
    """Address of the inbound port; None: ``bind_addr``."""
    managed: bool = True
    """The agent starts the worker and restarts it when it exits (off: run
    ``meshnode proxy`` yourself)."""
    event_loop: ProxyEventLoop = "auto"
    """The worker's event loop: ``auto`` (uvloop if installed), ``uvloop``, ``asyncio``."""
    access_log: str = ""
    """Access log: "" for the worker's stdout, ``off``, or a file path."""
    access_log_sample: float = 1.0
    """Share of requests (http) or connections (tcp) logged, 0 to 1."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything ``meshnode agent`` is configured with. Times are in seconds."""

    node_name: str
    """This node's name, unique in the cluster (default: the host name)."""
    data_dir: Path | None
    """State directory; required unless ``dev`` (then None: the agent creates a
    temporary directory and deletes it on exit)."""
    datacenter: str = "dc1"
    """Datacenter name, used in SPIFFE IDs and the Consul-compatible API."""
    cluster: str = "meshnode"
    """Cluster name: agents of other clusters are refused (gossip label / AEAD data)
    and mDNS only finds peers of the same cluster."""
    dev: bool = False
    """Single-node development agent: in-memory defaults, temporary data dir."""
    bind_addr: str = "0.0.0.0"
    """IP address the gossip (UDP+TCP) and proxy listeners bind to."""
    advertise_addr: str | None = None
    """IP address peers are told to use (NAT, containers); None: the bind address, or
    the outbound address when ``bind_addr`` is a wildcard."""
    gossip_port: int = DEFAULT_PORT
    """Gossip port, UDP and TCP; 0 picks a free one."""
    http_addr: HostPort = DEFAULT_HTTP_ADDR
    """Address of the HTTP API; port 0 picks a free one."""
    retry_join: tuple[HostPort, ...] = ()
    """Addresses to join (``host``, ``host:port``, ``[v6]:port``; default port 7946),
    retried with backoff until one answers; for networks without multicast."""
    retry_interval: float = 0.5
    """Wait before the second join attempt; doubles per attempt up to the maximum."""
    retry_max_interval: float = 10.0
    """Longest wait between join attempts."""
    retry_max: int = 0
    """Join attempts before the agent gives up and exits; 0: never give up."""
    server: bool = False
    """CA-eligible: takes part in leader election, may sign certificates and policy."""
    bootstrap_expect: int = 0
    """Servers to wait for before the first election; 0: never start the first election
    (join a cluster that has a leader). Needs ``server``."""
    encrypt: bytes | None = field(default=None, repr=False)
    """Gossip encryption key (decoded from base64); None: no encryption. Not in repr."""
    log_level: str = "info"
    """One of debug, info, warning, error, critical."""
    log_format: LogFormat = "auto"
    """``json``, ``console``, or ``auto`` (JSON unless stdout is a terminal)."""
    enable_script_checks: bool = False
    """Allow health checks that run a command (off: a script check is rejected)."""
    reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT
    """How long a failed node is kept (and reconnected to) before it and its services
    are reaped; also the gossip layer's ``reconnect_timeout``."""
    default_intention_policy: IntentionPolicy = "deny"
    """Connections no intention matches: ``deny`` (``allow`` with ``--dev``)."""
    gossip_preset: str = "default"
    """Name of the gossip preset ``gossip`` started from (``gossip.config.PRESETS``)."""
    gossip: GossipConfig = field(default_factory=GossipConfig)
    """Gossip protocol settings: the preset with the ``[gossip]`` overrides applied."""
    mdns: MdnsConfig = field(default_factory=MdnsConfig)
    """Zeroconf discovery."""
    acl: AclConfig = field(default_factory=AclConfig)
    """HTTP API access control."""
    ca: CaConfig = field(default_factory=CaConfig)
    """Certificate authority."""
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    """Local proxy."""
    services: tuple[ServiceSource, ...] = ()
    """Raw service definitions from the config file and ``config_dir``, in load order."""
    config_file: Path | None = None
    """The ``--config`` file, if one was given."""
    config_dir: Path | None = None
    """The directory of extra config and service files, if one was given."""
    sources: tuple[str, ...] = ()
    """What was read, in precedence order (for ``meshnode info``): ``defaults``,
    ``--dev defaults``, file paths, ``environment: MESHNODE_A, …``, ``flags: --a, …``."""


# ------------------------------------------------------------------ parsing values


class _Invalid(ValueError):
    """A value is wrong; the caller adds key and source."""


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a value came from."""

    description: str
    """For messages: a file path, ``environment variable MESHNODE_X``, ``flag --x``."""
    base_dir: Path
    """Relative paths are resolved against this."""
    textual: bool
    """Values are text (environment, flags): numbers and booleans come as strings."""


Parser = Callable[[object, _Origin], object]


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _boolean(value: object, origin: _Origin) -> bool:
    if isinstance(value, bool):
        return value
    if origin.textual and isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1"):
            return True
        if text in ("false", "0"):
            return False
    raise _Invalid(f"expected true or false, got {_describe(value)}")


def _integer(low: int, high: int, what: str = "an integer") -> Parser:
    def parse(value: object, origin: _Origin) -> int:
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif origin.textual and isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
            number = int(value)
        if number is None:
            raise _Invalid(f"expected {what}, got {_describe(value)}")
        if not low <= number <= high:
            raise _Invalid(f"must be between {low} and {high}, got {number}")
        return number

    return parse


_port = _integer(0, 65535, "a port number")

_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_NUMBER: Final = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_duration(text: str) -> float:
    """Seconds in ``"1h30m"``, ``"10s"``, ``"500ms"``, ``"2d"`` or ``"1.5"`` (seconds).

    Go's duration syntax (Consul's), without signs and sub-millisecond units, plus ``d``.
    Raises ValueError.
    """
    text = text.strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    total, position = 0.0, 0
    for part in _DURATION_PART.finditer(text):
        if part.start() != position:
            break
        total += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        position = part.end()
    if not text or position != len(text):
        raise ValueError(f'expected a duration like "1s" or "500ms", got {json.dumps(text)}')
    return total


def _duration(low: float = 0.0, high: float = DURATION_MAX) -> Parser:
    def parse(value: object, origin: _Origin) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str):
            try:
                seconds = parse_duration(value)
            except ValueError as error:
                raise _Invalid(str(error)) from None
        else:
            raise _Invalid(f'expected a duration like "1s" or "500ms", got {_describe(value)}')
        if not math.isfinite(seconds) or not low <= seconds <= high:
            raise _Invalid(f"must be between {_format_seconds(low)} and {_format_seconds(high)}")
        return seconds

    return parse


def _format_seconds(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 0.001)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _fraction(value: object, origin: _Origin) -> float:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    is_text_number = origin.textual and isinstance(value, str) and _NUMBER.fullmatch(value.strip())
    if not (is_number or is_text_number):
        raise _Invalid(f"expected a number between 0 and 1, got {_describe(value)}")
    number = float(cast("float | str", value))
    if not 0.0 < number <= 1.0:
        raise _Invalid(f"must be > 0 and <= 1, got {number:g}")
    return number


def _text(value: object, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected {what}, got {_describe(value)}")
    return value


def _matching(pattern: str, what: str) -> Parser:
    compiled = re.compile(pattern)

    def parse(value: object, origin: _Origin) -> str:
        text = _text(value)
        if not compiled.fullmatch(text):
            raise _Invalid(f"expected {what}, got {_describe(text)}")
        return text

    return parse


def _choice(*choices: str) -> Parser:
    def parse(value: object, origin: _Origin) -> str:
        text = _text(value)
        folded = text.strip().lower()
        if folded not in choices:
            raise _Invalid(f"expected one of {', '.join(choices)}, got {_describe(text)}")
        return folded

    return parse


def _ip_address(*, allow_wildcard: bool) -> Parser:
    def parse(value: object, origin: _Origin) -> str:
        text = _text(value, "an IP address").strip()
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise _Invalid(f"expected an IP address, got {_describe(text)}") from None
        if address.is_unspecified and not allow_wildcard:
            raise _Invalid(f"{text} is a wildcard; advertise an address peers can reach")
        return str(address)

    return parse


_HOSTNAME: Final = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


def _split_host_port(text: str) -> tuple[str, str | None]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 literal → (host, port)."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise _Invalid(f'expected "[IPv6]:port", got {_describe(text)}')
        return host, rest[1:] if rest else None
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, port
    return text, None


def _port_text(port: str, text: str) -> int:
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise _Invalid(f"bad port in {_describe(text)} (expected 0 to 65535)")
    return int(port)


def _http_address(value: object, origin: _Origin) -> HostPort:
    text = _text(value, '"host:port"').strip()
    host, port = _split_host_port(text)
    if port is None:
        raise _Invalid(f'expected "IP:port" or "[IPv6]:port", got {_describe(text)}')
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise _Invalid(f"expected an IP address before the port, got {_describe(host)}") from None
    return HostPort(host, _port_text(port, text))


def _join_address(text: str) -> HostPort:
    text = text.strip()
    host, port = _split_host_port(text)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            message = f"expected host, host:port or [IPv6]:port, got {_describe(text)}"
            raise _Invalid(message) from None
    return HostPort(host, DEFAULT_PORT if port is None else _port_text(port, text))


def _join_list(value: object, origin: _Origin) -> tuple[HostPort, ...]:
    if origin.textual and isinstance(value, str):
        items: list[object] = [item for item in value.split(",") if item.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise _Invalid(f"expected an array of addresses, got {_describe(value)}")
    return tuple(_join_address(_text(item, "an address")) for item in items)


def _path(value: object, origin: _Origin) -> Path:
    text = _text(value, "a path")
    if not text.strip():
        raise _Invalid("expected a path, got an empty string")
    return _joined(origin.base_dir, text)


def _joined(base: Path, text: str) -> Path:
    """``text`` against ``base`` (an absolute ``text`` stays as it is), with ``..``
    folded lexically: symlinks are kept, so messages show the path the user wrote."""
    return Path(os.path.normpath(base / text))


def _existing_file(value: object, origin: _Origin) -> Path:
    path = _path(value, origin)
    if not path.is_file():
        raise _Invalid(f"no such file: {path}")
    return path


def _encryption_key(value: object, origin: _Origin) -> bytes:
    try:
        return decode_key(_text(value, "a base64 key"))
    except ValueError as error:
        raise _Invalid(f"{error} (make one with `meshnode keygen`)") from None


def _acl_token(value: object, origin: _Origin) -> str:
    token = _text(value, "a token")
    if len(token) < ACL_TOKEN_MIN_LENGTH or any(char.isspace() for char in token):
        raise _Invalid(
            f"expected at least {ACL_TOKEN_MIN_LENGTH} characters without spaces (a UUID, say)"
        )
    return token


def _interface(value: object, origin: _Origin) -> str:
    text = _text(value, "an interface name or IP address").strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    # Linux IFNAMSIZ is 16 including the terminating NUL.
    if not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,15}", text):
        raise _Invalid(f"expected an interface name or IP address, got {_describe(text)}")
    return text


def _access_log(value: object, origin: _Origin) -> str:
    text = _text(value, '"", "off" or a file path')
    if text.strip() in ("", "off"):
        return text.strip()
    return str(_joined(origin.base_dir, text))


def _sample(value: object, origin: _Origin) -> float:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    is_text_number = origin.textual and isinstance(value, str) and _NUMBER.fullmatch(value.strip())
    if not (is_number or is_text_number):
        raise _Invalid(f"expected a number between 0 and 1, got {_describe(value)}")
    number = float(cast("float | str", value))
    if not 0.0 <= number <= 1.0:
        raise _Invalid(f"must be between 0 and 1, got {number:g}")
    return number


# ------------------------------------------------------------------ the schema


@dataclass(frozen=True, slots=True)
class _Flag:
    option: str
    """``--node``."""
    dest: str
    """argparse destination (``node``), the key in ``argv_options``."""
    metavar: str | None
    help: str


@dataclass(frozen=True, slots=True)
class _Key:
    path: str
    parse: Parser
    flag: _Flag | None = None

    @property
    def env(self) -> str:
        """The environment variable: named after the flag if there is one (scripts use
        both), else after the dotted key with ``.`` written ``__``."""
        if self.flag is not None:
            return ENV_PREFIX + self.flag.dest.upper()
        return ENV_PREFIX + self.path.upper().replace(".", "__")


_NODE_NAME = _matching(
    rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX_LENGTH - 1}}}",
    f"a name of letters, digits, '.', '_' and '-' (at most {NAME_MAX_LENGTH})",
)
_IDENTIFIER = _matching(
    r"[A-Za-z0-9_-]{1,64}", "letters, digits, '_' and '-' (at most 64 characters)"
)
_CLUSTER = _matching(
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", "letters, digits, '.', '_' and '-' (at most 64)"
)
# SPIFFE ID spec §2.1: a trust domain is lowercase letters, digits, '.', '-' and '_'.
_TRUST_DOMAIN = _matching(
    r"[a-z0-9._-]{1,255}", "a SPIFFE trust domain (lowercase letters, digits, '.', '-', '_')"
)


def _f(option: str, metavar: str | None, help: str) -> _Flag:
    return _Flag(option, option.removeprefix("--").replace("-", "_"), metavar, help)


_AGENT_KEYS: Final[tuple[_Key, ...]] = (
    _Key("dev", _boolean, _f("--dev", None, "single-node development agent, state in memory")),
    _Key("config_dir", _path, _f("--config-dir", "DIR", "directory of *.toml/*.json files")),
    _Key("data_dir", _path, _f("--data-dir", "DIR", "state directory (required unless --dev)")),
    _Key("node_name", _NODE_NAME, _f("--node", "NAME", "node name (default: host name)")),
    _Key("datacenter", _IDENTIFIER),
    _Key("cluster", _CLUSTER, _f("--cluster", "NAME", "cluster name (default: meshnode)")),
    _Key(
        "bind_addr",
        _ip_address(allow_wildcard=True),
        _f("--bind", "ADDR", "gossip and proxy bind address (default: 0.0.0.0)"),
    ),
    _Key(
        "advertise_addr",
        _ip_address(allow_wildcard=False),
        _f("--advertise", "ADDR", "address advertised to peers (NAT, containers)"),
    ),
    _Key("gossip_port", _port, _f("--gossip-port", "N", "gossip UDP+TCP port (default: 7946)")),
    _Key(
        "http_addr",
        _http_address,
        _f("--http-addr", "HOST:PORT", "HTTP API address (default: 127.0.0.1:8500)"),
    ),
    _Key(
        "retry_join",
        _join_list,
        _f("--join", "ADDR", "address to join, retried until one answers (repeatable)"),
    ),
    _Key("retry_interval", _duration(0.001)),
    _Key("retry_max_interval", _duration(0.001)),
    _Key("retry_max", _integer(0, 2**31 - 1)),
    _Key(
        "encrypt",
        _encryption_key,
        _f("--encrypt", "KEY", "base64 gossip key (prefer MESHNODE_ENCRYPT: flags show in ps)"),
    ),
    _Key("server", _boolean, _f("--server", None, "CA-eligible server (leader election)")),
    _Key(
        "bootstrap_expect",
        _integer(0, 2**31 - 1),
        _f("--bootstrap-expect", "N", "servers to wait for before the first election"),
    ),
    _Key(
        "log_level",
        _choice(*LEVELS),
        _f("--log-level", "LEVEL", f"{'|'.join(LEVELS)} (default: info)"),
    ),
    _Key(
        "log_format",
        _choice("auto", "json", "console"),
        _f("--log-format", "FORMAT", "auto|json|console (default: auto)"),
    ),
    _Key("enable_script_checks", _boolean),
    _Key("reconnect_timeout", _duration(1.0)),
    _Key("default_intention_policy", _choice("allow", "deny")),
    _Key("gossip.preset", _choice(*PRESETS)),
    _Key("mdns.enabled", _boolean),
    _Key("mdns.interface", _interface),
    _Key("acl.enabled", _boolean),
    _Key("acl.token", _acl_token),
    _Key("ca.cert_file", _existing_file),
    _Key("ca.key_file", _existing_file),
    _Key("ca.leaf_ttl", _duration(LEAF_TTL_MIN, LEAF_TTL_MAX)),
    _Key("ca.trust_domain", _TRUST_DOMAIN),
    _Key("proxy.enabled", _boolean),
    # dest "proxy__port": the variable stays MESHNODE_PROXY__PORT, as before the flag.
    _Key(
        "proxy.port",
        _port,
        _Flag("--proxy-port", "proxy__port", "N", "inbound mTLS proxy port (default: 20000)"),
    ),
    _Key("proxy.bind_address", _ip_address(allow_wildcard=True)),
    _Key("proxy.managed", _boolean),
    _Key("proxy.event_loop", _choice("auto", "uvloop", "asyncio")),
    _Key("proxy.access_log", _access_log),
    _Key("proxy.access_log_sample", _sample),
)

#: GossipConfig fields that are floats but not durations.
_GOSSIP_FRACTIONS: Final = frozenset({"relay_nack_fraction"})
#: GossipConfig fields the [gossip] table may not set: the top-level
#: ``reconnect_timeout`` sets it (one setting for catalog reaping and gossip reaping).
_GOSSIP_OWNED_ELSEWHERE: Final = frozenset({"reconnect_timeout"})


def _gossip_keys() -> Iterator[_Key]:
    """One key per GossipConfig field, typed from its annotation."""
    hints = get_type_hints(GossipConfig)
    for gossip_field in dataclasses.fields(GossipConfig):
        name = gossip_field.name
        if name in _GOSSIP_OWNED_ELSEWHERE:
            continue
        kind = hints[name]
        parse: Parser
        if kind is bool:
            parse = _boolean
        elif kind is int:
            parse = _integer(0, 2**31 - 1)
        elif kind is float:
            parse = _fraction if name in _GOSSIP_FRACTIONS else _duration()
        else:  # a new kind of field in GossipConfig: teach this module about it
            raise TypeError(f"GossipConfig.{name} has a type config.py cannot parse: {kind}")
        yield _Key(f"gossip.{name}", parse)


KEYS: Final[Mapping[str, _Key]] = MappingProxyType(
    {key.path: key for key in (*_AGENT_KEYS, *_gossip_keys())}
)
"""Every configuration key by dotted path."""
TABLES: Final = frozenset({"gossip", "mdns", "acl", "ca", "proxy"})
SERVICE_KEYS: Final = ("service", "services")
_ENV_KEYS: Final[Mapping[str, _Key]] = MappingProxyType({key.env: key for key in KEYS.values()})
if len(_ENV_KEYS) != len(KEYS):
    raise RuntimeError("two configuration keys share an environment variable")
_FLAG_KEYS: Final[tuple[_Key, ...]] = tuple(key for key in KEYS.values() if key.flag)

#: Names people bring from Consul (or from the flags), and ours.
_RENAMED: Final = {
    "node": "node_name",
    "bind": "bind_addr",
    "advertise": "advertise_addr",
    "join": "retry_join",
    "start_join": "retry_join",
    "client_addr": "http_addr",
    "addresses": "http_addr",
    "ports": "gossip_port, http_addr and proxy.port",
    "gossip.reconnect_timeout": "reconnect_timeout (top level; it drives gossip too)",
    "ca.leaf_cert_ttl": "ca.leaf_ttl",
}

DEFAULTS: Final[Mapping[str, object]] = MappingProxyType(
    {
        "dev": False,
        "datacenter": "dc1",
        "cluster": "meshnode",
        "bind_addr": "0.0.0.0",
        "gossip_port": DEFAULT_PORT,
        "http_addr": DEFAULT_HTTP_ADDR,
        "retry_join": (),
        "retry_interval": 0.5,
        "retry_max_interval": 10.0,
        "retry_max": 0,
        "server": False,
        "bootstrap_expect": 0,
        "log_level": "info",
        "log_format": "auto",
        "enable_script_checks": False,
        "reconnect_timeout": DEFAULT_RECONNECT_TIMEOUT,
        "default_intention_policy": "deny",
        "gossip.preset": "default",
        "mdns.enabled": True,
        "acl.enabled": False,
        "ca.leaf_ttl": DEFAULT_LEAF_TTL,
        "proxy.enabled": True,
        "proxy.port": DEFAULT_PROXY_PORT,
        "proxy.managed": True,
        "proxy.event_loop": "auto",
        "proxy.access_log": "",
        "proxy.access_log_sample": 1.0,
    }
)
"""Defaults of the keys that have one (``node_name`` defaults to the host name)."""

DEV_DEFAULTS: Final[Mapping[str, object]] = MappingProxyType(
    {
        "bind_addr": "127.0.0.1",
        "advertise_addr": "127.0.0.1",
        "server": True,
        "bootstrap_expect": 1,
        "default_intention_policy": "allow",
        "mdns.enabled": False,
        "log_format": "console",
    }
)
"""What ``dev = true`` changes in ``DEFAULTS`` (explicit settings still win)."""


def _unknown(path: str, source: str) -> ConfigError:
    known = [*KEYS, *TABLES, *SERVICE_KEYS]
    hint = _RENAMED.get(path)
    if hint is None:
        close = difflib.get_close_matches(path, known, n=1, cutoff=0.6)
        hint = close[0] if close else None
    return ConfigError(path, source, "unknown key" + (f"; did you mean {hint}?" if hint else ""))


# ------------------------------------------------------------------ layers

_Values = dict[str, tuple[object, str]]
"""Parsed values by dotted key, each with the description of its source."""


def _parse(key: _Key, value: object, origin: _Origin) -> object:
    try:
        return key.parse(value, origin)
    except _Invalid as error:
        raise ConfigError(key.path, origin.description, str(error)) from None


def _walk_table(table: Mapping[str, object], prefix: str, origin: _Origin, values: _Values) -> None:
    for name, value in table.items():
        path = prefix + name
        if path in TABLES:
            if not isinstance(value, dict):
                message = f"expected a table, got {_describe(value)}"
                raise ConfigError(path, origin.description, message)
            _walk_table(value, path + ".", origin, values)
        elif path in KEYS:
            values[path] = (_parse(KEYS[path], value, origin), origin.description)
        else:
            raise _unknown(path, origin.description)


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    table: dict[str, object] = {}
    for name, value in pairs:
        if name in table:
            raise _Invalid(f"key {json.dumps(name)} appears twice in one object")
        table[name] = value
    return table


def _read_file(path: Path) -> dict[str, object]:
    """A config file's top-level table; TOML unless the name ends in ``.json``."""
    source = str(path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as error:
        raise ConfigError(None, source, f"cannot read: {error.strerror or error}") from None
    if len(data) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(None, source, f"larger than {MAX_CONFIG_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(None, source, f"not UTF-8 text (byte {error.start})") from None
    if path.suffix.lower() == ".json":
        try:
            loaded = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
        except json.JSONDecodeError as error:
            message = f"invalid JSON: {error.msg} (at line {error.lineno}, column {error.colno})"
            raise ConfigError(None, source, message) from None
        except _Invalid as error:
            raise ConfigError(None, source, f"invalid JSON: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(None, source, f"expected a JSON object, got {_describe(loaded)}")
        return loaded
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        # tomllib's message ends with "(at line L, column C)".
        raise ConfigError(None, source, f"invalid TOML: {error}") from None


def _take_services(table: dict[str, object], path: Path) -> list[ServiceSource]:
    """Remove ``service``/``services`` from a file's table; either may be one table or
    an array of tables (Consul's agent config uses both spellings)."""
    found: list[ServiceSource] = []
    for name in SERVICE_KEYS:
        if name not in table:
            continue
        value = table.pop(name)
        items: list[tuple[str, object]]
        if isinstance(value, dict):
            items = [(name, value)]
        elif isinstance(value, list):
            items = [(f"{name}[{index}]", item) for index, item in enumerate(value)]
        else:
            message = f"expected a table or an array of tables, got {_describe(value)}"
            raise ConfigError(name, str(path), message)
        for key, item in items:
            if not isinstance(item, dict):
                message = f"expected a table (a service definition), got {_describe(item)}"
                raise ConfigError(key, str(path), message)
            found.append(ServiceSource(path, key, MappingProxyType(item)))
    return found


def _file_layer(
    path: Path, values: _Values, services: list[ServiceSource], *, in_config_dir: bool
) -> None:
    table = _read_file(path)
    services.extend(_take_services(table, path))
    if in_config_dir and "config_dir" in table:
        message = "cannot be set inside the config directory; set it in --config or a flag"
        raise ConfigError("config_dir", str(path), message)
    _walk_table(table, "", _Origin(str(path), path.parent, textual=False), values)


def _config_dir_files(directory: Path, source: str) -> list[Path]:
    try:
        entries = sorted(directory.iterdir())
    except OSError as error:
        message = f"cannot read directory {directory}: {error.strerror or error}"
        raise ConfigError("config_dir", source, message) from None
    return [
        entry
        for entry in entries
        if entry.suffix.lower() in (".toml", ".json")
        and not entry.name.startswith(".")
        and entry.is_file()
    ]


def _environment_layer(environ: Mapping[str, str], cwd: Path) -> _Values:
    values: _Values = {}
    for name in sorted(environ):
        text = environ[name]
        if not name.startswith(ENV_PREFIX) or not text:
            continue
        key = _ENV_KEYS.get(name)
        if key is None:
            hint = _environment_hint(name)
            message = "unknown variable" + (f"; did you mean {hint}?" if hint else "")
            raise ConfigError(name, "the environment", message)
        origin = _Origin(f"environment variable {name}", cwd, textual=True)
        values[key.path] = (_parse(key, text, origin), origin.description)
    return values


def _environment_hint(name: str) -> str | None:
    path = name.removeprefix(ENV_PREFIX).lower().replace("__", ".")
    path = _RENAMED.get(path, path)
    if path in KEYS:  # the key's name where the flag's name was expected, or a rename
        return KEYS[path].env
    close = difflib.get_close_matches(name, list(_ENV_KEYS), n=1, cutoff=0.6)
    return close[0] if close else None


def _flag_layer(argv_options: Mapping[str, object], cwd: Path) -> _Values:
    values: _Values = {}
    for key in _FLAG_KEYS:
        assert key.flag is not None
        value = argv_options.get(key.flag.dest)
        if value is None:
            continue
        origin = _Origin(f"flag {key.flag.option}", cwd, textual=True)
        values[key.path] = (_parse(key, value, origin), origin.description)
    return values


# ------------------------------------------------------------------ assembly


class _Merged:
    """The merged values with their sources, and typed accessors."""

    def __init__(self, values: _Values) -> None:
        self.values = values

    def get(self, path: str) -> object:
        entry = self.values.get(path)
        return None if entry is None else entry[0]

    def source(self, path: str) -> str:
        entry = self.values.get(path)
        return "the defaults" if entry is None else entry[1]

    def is_default(self, path: str) -> bool:
        return self.source(path) in ("the defaults", "the --dev defaults")

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(path, self.source(path), message)

    def text(self, path: str) -> str | None:
        return cast("str | None", self.get(path))

    def flag(self, path: str) -> bool:
        return cast(bool, self.get(path))

    def number(self, path: str) -> float:
        return cast(float, self.get(path))

    def integer(self, path: str) -> int:
        return cast(int, self.get(path))

    def path(self, path: str) -> Path | None:
        return cast("Path | None", self.get(path))


def _apply_defaults(values: _Values, hostname: str) -> None:
    dev = values.get("dev", (False, ""))[0] is True
    for path, value in DEFAULTS.items():
        values.setdefault(path, (value, "the defaults"))
    if dev:
        for path, value in DEV_DEFAULTS.items():
            if path not in values or values[path][1] == "the defaults":
                values[path] = (value, "the --dev defaults")
        if values["server"][0] is False and values["bootstrap_expect"][1] == "the --dev defaults":
            values["bootstrap_expect"] = (0, "the defaults")  # dev, but told not to be a server
    if "node_name" not in values:
        origin = _Origin(f"the defaults (host name {hostname!r})", Path("."), textual=False)
        values["node_name"] = (_parse(KEYS["node_name"], hostname, origin), "the defaults")


def _build_gossip(merged: _Merged) -> GossipConfig:
    name = merged.text("gossip.preset") or "default"
    overrides = {
        path.removeprefix("gossip."): value
        for path, (value, _) in merged.values.items()
        if path.startswith("gossip.") and path != "gossip.preset"
    }
    try:
        return PRESETS[name].replace(
            **overrides, reconnect_timeout=merged.number("reconnect_timeout")
        )
    except ValueError as error:
        # GossipConfig names fields in its message; blame the first one the user set.
        message = str(error)
        mentioned = sorted(
            (message.find(field_name), field_name)
            for field_name in overrides
            if re.search(rf"\b{field_name}\b", message)
        )
        if mentioned:
            key = f"gossip.{mentioned[0][1]}"
        elif overrides:
            key = f"gossip.{next(iter(overrides))}"
        else:
            key = "gossip.preset"
        raise merged.error(key, message) from None


def _check_ports(merged: _Merged, http_addr: HostPort) -> None:
    """Agents side by side on one host: two listeners of one agent on one port is a
    mistake (port 0, "any free port", never collides)."""
    ports = [("gossip_port", merged.integer("gossip_port")), ("http_addr", http_addr.port)]
    if merged.flag("proxy.enabled"):
        ports.append(("proxy.port", merged.integer("proxy.port")))
    for index, (path, port) in enumerate(ports):
        for other_path, other_port in ports[:index]:
            if port and port == other_port:
                blamed, other = (
                    (other_path, path) if merged.is_default(path) else (path, other_path)
                )
                raise merged.error(blamed, f"port {port} is also {other}'s port")


def _check(merged: _Merged, http_addr: HostPort, config_file: Path | None) -> None:
    dev = merged.flag("dev")
    data_dir = merged.path("data_dir")
    if data_dir is None and not dev:
        source = str(config_file) if config_file else "the defaults"
        message = "required unless --dev (set data_dir, MESHNODE_DATA_DIR or --data-dir)"
        raise ConfigError("data_dir", source, message)
    if data_dir is not None and data_dir.exists() and not data_dir.is_dir():
        raise merged.error("data_dir", f"{data_dir} exists and is not a directory")
    if merged.integer("bootstrap_expect") > 0 and not merged.flag("server"):
        raise merged.error("bootstrap_expect", "only servers bootstrap; set server = true")
    if merged.number("retry_max_interval") < merged.number("retry_interval"):
        raise merged.error("retry_max_interval", "must not be less than retry_interval")
    if merged.flag("acl.enabled") and merged.text("acl.token") is None:
        raise merged.error("acl.enabled", "ACLs are enabled but acl.token is not set")
    cert_file, key_file = merged.path("ca.cert_file"), merged.path("ca.key_file")
    if (cert_file is None) != (key_file is None):
        given, missing = ("ca.cert_file", "ca.key_file")
        if key_file is not None:
            given, missing = missing, given
        raise merged.error(given, f"set {missing} too (or neither)")
    if cert_file is not None and key_file is not None:
        _check_operator_ca(merged, cert_file, key_file)
    _check_ports(merged, http_addr)


def _check_operator_ca(merged: _Merged, cert_file: Path, key_file: Path) -> None:
    """Refuse to start with an operator CA the leader could not sign with (expired,
    not a CA, key not matching...), rather than failing at the first election."""
    from ca.issuer import CertificateAuthority, InvalidOperatorCa

    try:
        CertificateAuthority.load_operator_ca(
            cert_file.read_bytes(),
            key_file.read_bytes(),
            datetime.now(UTC),
            trust_domain=merged.text("ca.trust_domain") or "check.meshnode",
        )
    except InvalidOperatorCa as exc:
        raise merged.error("ca.cert_file", str(exc)) from None
    except OSError as exc:
        raise merged.error("ca.cert_file", f"cannot read: {exc.strerror or exc}") from None


def load_config(
    argv_options: Mapping[str, object],
    environ: Mapping[str, str],
    *,
    cwd: Path,
    hostname: str | None = None,
) -> AgentConfig:
    """The agent's configuration from flags, environment and files; raises ConfigError.

    ``argv_options`` maps argparse destinations (``vars(args)`` after
    ``add_agent_arguments``) to values, None meaning "not given"; other entries are
    ignored. ``environ`` is read for ``MESHNODE_*`` only. Relative paths in flags and
    the environment are resolved against ``cwd``. ``hostname`` is the default node
    name (default: ``socket.gethostname()``).
    """
    flags = _flag_layer(argv_options, cwd)
    environment = _environment_layer(environ, cwd)
    values: _Values = {}
    services: list[ServiceSource] = []
    sources = ["defaults"]

    config_file: Path | None = None
    config_option = argv_options.get("config")
    if config_option is not None:
        config_file = _joined(cwd, _text_option(config_option, "--config"))
        _file_layer(config_file, values, services, in_config_dir=False)
        sources.append(str(config_file))

    directory_entry = flags.get("config_dir") or environment.get("config_dir")
    directory_entry = directory_entry or values.get("config_dir")
    config_dir: Path | None = None
    if directory_entry is not None:
        config_dir = cast(Path, directory_entry[0])
        for path in _config_dir_files(config_dir, directory_entry[1]):
            _file_layer(path, values, services, in_config_dir=True)
            sources.append(str(path))

    values.update(environment)
    values.update(flags)
    if environment:
        names = ", ".join(KEYS[path].env for path in environment)
        sources.append(f"environment: {names}")
    if flags:
        options = [flag.option for path in flags if (flag := KEYS[path].flag) is not None]
        sources.append(f"flags: {', '.join(options)}")
    _apply_defaults(values, socket.gethostname() if hostname is None else hostname)
    merged = _Merged(values)
    if merged.flag("dev"):
        sources.insert(1, "--dev defaults")

    http_addr = cast(HostPort, merged.get("http_addr"))
    _check(merged, http_addr, config_file)
    reconnect_timeout = merged.number("reconnect_timeout")
    return AgentConfig(
        node_name=cast(str, merged.get("node_name")),
        data_dir=merged.path("data_dir"),
        datacenter=cast(str, merged.get("datacenter")),
        cluster=cast(str, merged.get("cluster")),
        dev=merged.flag("dev"),
        bind_addr=cast(str, merged.get("bind_addr")),
        advertise_addr=merged.text("advertise_addr"),
        gossip_port=merged.integer("gossip_port"),
        http_addr=http_addr,
        retry_join=cast("tuple[HostPort, ...]", merged.get("retry_join")),
        retry_interval=merged.number("retry_interval"),
        retry_max_interval=merged.number("retry_max_interval"),
        retry_max=merged.integer("retry_max"),
        server=merged.flag("server"),
        bootstrap_expect=merged.integer("bootstrap_expect"),
        encrypt=cast("bytes | None", merged.get("encrypt")),
        log_level=cast(str, merged.get("log_level")),
        log_format=cast(LogFormat, merged.get("log_format")),
        enable_script_checks=merged.flag("enable_script_checks"),
        reconnect_timeout=reconnect_timeout,
        default_intention_policy=cast(IntentionPolicy, merged.get("default_intention_policy")),
        gossip_preset=cast(str, merged.get("gossip.preset")),
        gossip=_build_gossip(merged),
        mdns=MdnsConfig(
            enabled=merged.flag("mdns.enabled"), interface=merged.text("mdns.interface")
        ),
        acl=AclConfig(enabled=merged.flag("acl.enabled"), token=merged.text("acl.token")),
        ca=CaConfig(
            cert_file=merged.path("ca.cert_file"),
            key_file=merged.path("ca.key_file"),
            leaf_ttl=merged.number("ca.leaf_ttl"),
            trust_domain=merged.text("ca.trust_domain"),
        ),
        proxy=ProxyConfig(
            enabled=merged.flag("proxy.enabled"),
            port=merged.integer("proxy.port"),
            bind_address=merged.text("proxy.bind_address"),
            managed=merged.flag("proxy.managed"),
            event_loop=cast(ProxyEventLoop, merged.get("proxy.event_loop")),
            access_log=merged.text("proxy.access_log") or "",
            access_log_sample=merged.number("proxy.access_log_sample"),
        ),
        services=tuple(services),
        config_file=config_file,
        config_dir=config_dir,
        sources=tuple(sources),
    )


def _text_option(value: object, option: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(None, f"flag {option}", f"expected a file name, got {_describe(value)}")
    return value


# ------------------------------------------------------------------ command line


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``meshnode agent`` flags on ``parser``.

    Every default is None ("not given"), so ``load_config(vars(args), ...)`` can tell a
    flag from a default. Values stay text: ``load_config`` checks them, and its errors
    name the flag.
    """
    parser.add_argument("--config", metavar="FILE", help="TOML agent configuration file")
    for key in _FLAG_KEYS:
        flag = key.flag
        assert flag is not None
        if key.parse is _boolean:
            parser.add_argument(
                flag.option, dest=flag.dest, action="store_true", default=None, help=flag.help
            )
        elif key.path == "retry_join":
            parser.add_argument(
                flag.option, dest=flag.dest, action="append", metavar=flag.metavar, help=flag.help
            )
        else:
            parser.add_argument(flag.option, dest=flag.dest, metavar=flag.metavar, help=flag.help)


def environment_variables() -> Sequence[str]:
    """Every ``MESHNODE_*`` variable the agent reads, sorted (for docs and tests)."""
    return sorted(_ENV_KEYS)
