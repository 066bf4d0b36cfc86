"""The agent's Consul-compatible HTTP API (an aiohttp adapter over ``Catalog``).

Theory of operation
-------------------
Every agent answers the Consul HTTP API from its own gossiped catalog: there is no
server to forward to. The module decides nothing the catalog and the model do not
already decide; it translates:

* **requests in**: the body is read with a hard size cap, decoded as JSON, and
  validated *completely* by ``meshnode.model`` (and the agent's
  ``check_allowed``) before any write, so a 400 always means "nothing changed"
  (DESIGN.md principle 5). ``ValidationError`` becomes 400 with its text,
  ``catalog.NotFoundError`` 404, as Consul answers "Unknown service ID";
* **responses out**: the shapes come from ``meshnode.model``'s ``*_json`` functions,
  serialized here. Every response, errors included, carries ``X-Consul-Index`` (≥ 1),
  ``X-Consul-KnownLeader`` (``true`` when the agent knows a leader, as
  ``/v1/status/leader`` reports it) and ``X-Consul-LastContact: 0``: the Go client's
  ``parseQueryMeta`` turns a missing index into 0 and watchers silently stop blocking,
  and py-consul raises "Missing index header" (Consul API docs, "Blocking Queries";
  shared/reference/consul-api.md);
* **blocking queries** (Consul API docs, api-docs/features/blocking): ``?index=N``
  returns at once when the endpoint's index is past N (or N is 0), else waits until
  ``Catalog.on_change`` reports that it moved, or until ``wait`` (default 5m, at most
  10m) plus up to wait/16 of random jitter has passed, and then answers with the
  current data and index, which is N again when nothing changed. Agent-local reads
  (``/v1/agent/services``, ``/v1/agent/service/:id``, ``/v1/agent/checks``) block on
  ``?hash=`` and send ``X-Consul-ContentHash`` instead, as Consul's do;
* **ACLs**: with ``AclConfig.enabled`` every write (PUT, POST, DELETE) needs the token,
  from ``X-Consul-Token``, ``Authorization: Bearer`` or ``?token=`` (Consul API docs,
  "Authentication"), else 403 ``Permission denied``. Reads stay open, as the agent
  listens on loopback by default (DESIGN.md), except ``GET /v1/operator/keyring``,
  which lists the gossip encryption keys, and ``GET /v1/agent/connect/ca/leaf/:svc``,
  which returns a private key (Consul wants ``service:write`` for it), so they need
  the token too. ``POST /v1/agent/connect/authorize`` is a read despite its method.

The agent process itself is reached only through the small ``AgentHandle`` protocol,
so the API is tested with a real ``Catalog`` and a fake agent. The module never owns
the event loop: ``build_app`` returns an ``aiohttp.web.Application`` and ``serve``
starts it on a caller's loop (dependencies.md: AppRunner + TCPSite, no access log).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib.metadata
import json
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from gossip.events import Member, MemberState
from meshnode.catalog import Catalog, NotFoundError
from meshnode.config import AclConfig
from meshnode.connect import ConnectHandle
from meshnode.model import (
    CheckDefinition,
    CheckKind,
    HealthStatus,
    ServiceDefinition,
    ValidationError,
    agent_service_json,
    catalog_service_json,
    check_json,
    health_service_json,
    node_json,
    parse_check,
    parse_check_update,
    parse_duration,
    parse_registration,
)

__all__ = [
    "CONSUL_COMPATIBLE_VERSION",
    "DEFAULT_WAIT",
    "MAX_BODY_BYTES",
    "MAX_WAIT",
    "AgentHandle",
    "build_app",
    "serve",
]

# --------------------------------------------------------------------------- limits

#: Largest request body we read. Consul caps KV values (``limits.kv_max_value_size``)
#: and transactions (``limits.txn_max_req_len``) at raft's suggested entry size,
#: 512 KiB; a registration is far smaller, so nothing legitimate comes near it.
MAX_BODY_BYTES: Final = 512 * 1024
#: Blocking-query waits (Consul API docs, "Blocking Queries": "wait ... defaults to
#: 5 minutes ... limited to 10 minutes", "a small random amount of additional wait
#: time is added ... up to wait / 16").
DEFAULT_WAIT: Final = 5 * 60.0
MAX_WAIT: Final = 10 * 60.0
JITTER_FRACTION: Final = 16
#: Consul version we report in ``/v1/agent/self``: clients gate features on it (Nomad
#: parses ``Config.Version`` and ``Member.Tags.build``), so it names the Consul API
#: level we emulate, and meshnode's own version travels as ``Config.MeshnodeVersion``.
CONSUL_COMPATIBLE_VERSION: Final = "1.18.0"
#: serf's member status numbers, as Consul's ``/v1/agent/members`` reports them.
SERF_ALIVE: Final = 1
SERF_LEAVING: Final = 2
SERF_LEFT: Final = 3
SERF_FAILED: Final = 4
#: The text Consul answers a request without a valid token (acl.ErrPermissionDenied).
PERMISSION_DENIED: Final = "Permission denied"
#: Methods that change state and so need the ACL token.
_WRITE_METHODS: Final = frozenset({"PUT", "POST", "DELETE", "PATCH"})
#: Reads that need the token anyway because they reveal secrets (gossip keys).
_SECRET_READS: Final = frozenset({"/v1/operator/keyring"})
#: ... and paths under which every read does (leaf certificates carry private keys).
_SECRET_READ_PREFIXES: Final = ("/v1/agent/connect/ca/leaf/",)
#: POSTs that only read, so need no token (Consul: authorize is a read).
_POST_READS: Final = frozenset({"/v1/agent/connect/authorize"})


def _installed_version() -> str:
    try:
        return importlib.metadata.version("meshnode")
    except importlib.metadata.PackageNotFoundError:  # running from a bare source tree
        return "0.0.0"


#: meshnode's own version (``Config.MeshnodeVersion``, ``Member.Tags.build``).
MESHNODE_VERSION: Final = _installed_version()


# --------------------------------------------------------------------------- agent handle


class AgentHandle(Protocol):
    """What the API needs from the agent process (implemented by ``meshnode.agent``)."""

    def members(self) -> list[Member]:
        """The gossip view, this agent included."""
        ...

    def leader(self) -> str:
        """The elected leader's gossip address as ``ip:port`` (``[v6]:port``), or
        ``""`` when this agent knows no leader."""
        ...

    def peers(self) -> list[str]:
        """The servers' gossip addresses (``ip:port``), the leader's among them."""
        ...

    def self_info(self) -> dict[str, object]:
        """Extra fields for ``/v1/agent/self``, by section: ``{"Config": {...},
        "Stats": {...}}``. Each value that is an object is merged into that section
        (a new section is added); other values are dropped, because the Go client
        decodes the response as ``map[string]map[string]interface{}``."""
        ...

    async def join(self, address: str) -> None:
        """Join the cluster through ``address``; ``ValueError`` with a message when
        the address is bad or nobody answered."""
        ...

    async def leave(self) -> None:
        """Leave gracefully, then *schedule* the agent's stop and return: the HTTP
        response to ``PUT /v1/agent/leave`` is sent after this returns, so it must
        not wait for the HTTP server to shut down."""
        ...

    def reload(self) -> None:
        """Reload service definitions, checks and log level from the configuration
        files (what SIGHUP does); errors are logged by the agent."""
        ...

    def local_changed(self) -> None:
        """Called after every successful local write (persist, sync check runners)."""
        ...

    def ttl_update(self, check_id: str, status: HealthStatus, output: str) -> None:
        """Reset the TTL timer of ``check_id`` (the API writes the status to the
        catalog itself). ``KeyError`` if there is no such TTL check."""
        ...

    def check_allowed(self, check: CheckDefinition) -> None:
        """``ValidationError`` if this agent will not run ``check`` (e.g. script
        checks are disabled)."""
        ...

    def mesh_gossip_info(self) -> dict[str, object]:
        """The body of ``GET /v1/mesh/gossip``."""
        ...

    async def keyring(self, op: str, key: str | None) -> dict[str, object]:
        """Keyring operation ``list`` (key None), ``install``, ``use`` or ``remove``.
        For ``list``, returns fields of Consul's keyring response (``Keys``: key →
        number of members holding it, ``NumNodes``, optionally ``PrimaryKeys``).
        ``ValueError`` with a message on bad input."""
        ...


# --------------------------------------------------------------------------- app state


class _ChangeSignal:
    """Wakes blocked queries whenever the catalog changes (or the server stops).

    ``notify`` swaps in a fresh ``asyncio.Event`` and sets the old one, so every
    waiter parked on the old event wakes exactly once per change and then re-checks
    its own index. It must be called on the loop's thread (the catalog is driven by
    the agent on that loop).
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.closing = False
        """Set on shutdown: waiters answer at once instead of holding the server."""

    def notify(self, index: int = 0) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def close(self) -> None:
        self.closing = True
        self.notify()

    async def wait_until(self, ready: Callable[[], bool]) -> None:
        """Return once ``ready()`` is true (or the server is closing); callers bound
        the wait with ``asyncio.timeout``."""
        while not ready() and not self.closing:
            await self._event.wait()


@dataclass(slots=True)
class _Api:
    """Everything the handlers share (one per application)."""

    agent: AgentHandle
    catalog: Catalog
    acl: AclConfig
    registry: CollectorRegistry
    datacenter: str
    node_name: str
    rng: random.Random
    changes: _ChangeSignal = field(default_factory=_ChangeSignal)


API: Final = web.AppKey("meshnode_api", _Api)


# --------------------------------------------------------------------------- errors


class _HTTPError(Exception):
    """Answer ``status`` with the plain-text ``message`` (Consul's error bodies are
    plain text, e.g. "Unknown service ID"; clients print them)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _bad_request(message: str) -> _HTTPError:
    return _HTTPError(400, message)


# --------------------------------------------------------------------------- middleware

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _request_token(request: web.Request) -> str | None:
    """The ACL token, from where Consul looks (API docs, "Authentication"): the
    ``X-Consul-Token`` header, an ``Authorization: Bearer`` header, ``?token=``."""
    token = request.headers.get("X-Consul-Token")
    if token:
        return token
    authorization = request.headers.get("Authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.query.get("token") or None


@web.middleware
async def _acl_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    acl = request.app[API].acl
    needs_token = (
        (request.method in _WRITE_METHODS and request.path not in _POST_READS)
        or request.path in _SECRET_READS
        or request.path.startswith(_SECRET_READ_PREFIXES)
    )
    if acl.enabled and needs_token:
        presented = _request_token(request)
        # Fail closed: ACLs on without a configured token refuse every write.
        if (
            acl.token is None
            or presented is None
            or not hmac.compare_digest(presented.encode(), acl.token.encode())
        ):
            return web.Response(status=403, text=PERMISSION_DENIED)
    return await handler(request)


@web.middleware
async def _error_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except _HTTPError as exc:
        return web.Response(status=exc.status, text=exc.message)
    except ValidationError as exc:
        return web.Response(status=400, text=str(exc))
    except NotFoundError as exc:
        return web.Response(status=404, text=str(exc.args[0]) if exc.args else "Not found")


async def _add_consul_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every response, errors and 404s of the router included, carries the headers
    clients read on every call (Consul API docs, "Blocking Queries"; the Go client's
    ``parseQueryMeta``). Endpoints without an index of their own report the global
    catalog index, which is ≥ 1 and never goes backwards."""
    api = request.app[API]
    if "X-Consul-Index" not in response.headers:
        response.headers["X-Consul-Index"] = str(max(1, api.catalog.index))
    # Consul sets it from whether the server it asked has a leader; we ask our agent.
    response.headers["X-Consul-KnownLeader"] = "true" if api.agent.leader() else "false"
    response.headers["X-Consul-LastContact"] = "0"


# --------------------------------------------------------------------------- helpers


def _parse_bool(value: str, name: str) -> bool:
    """Go's ``strconv.ParseBool``, which Consul uses for ``?enable=`` and friends
    (py-consul sends Python's ``True``/``False``)."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise _bad_request(f"Invalid value for {name}: {value!r}")


def _flag(request: web.Request, name: str) -> bool:
    """A boolean query flag: absent is false, present without a value true (Consul's
    ``?passing``), otherwise parsed as ``strconv.ParseBool``."""
    if name not in request.query:
        return False
    value = request.query.get(name, "")
    return True if value == "" else _parse_bool(value, name)


def _node_meta(request: web.Request) -> dict[str, str] | None:
    """Repeatable ``?node-meta=key:value`` filters (catalog.mdx)."""
    pairs = request.query.getall("node-meta", [])
    if not pairs:
        return None
    wanted: dict[str, str] = {}
    for pair in pairs:
        key, _, value = pair.partition(":")
        if not key:
            raise _bad_request(f"Invalid node-meta filter {pair!r}: expected key:value")
        wanted[key] = value
    return wanted


def _reject_filter(request: web.Request) -> None:
    """We do not implement Consul's ``?filter=`` expressions; answering unfiltered data
    would be silently wrong, so a non-empty filter is refused (Nomad sends an empty
    one, which is fine)."""
    if request.query.get("filter"):
        raise _bad_request("filter expressions are not supported by meshnode")


def _dumps(request: web.Request) -> Callable[[object], str]:
    # ``?pretty`` indents, as Consul's HTTP server does.
    if "pretty" in request.query:
        return lambda value: json.dumps(value, indent=4)
    return lambda value: json.dumps(value, separators=(",", ":"))


def _json(
    request: web.Request,
    data: object,
    *,
    index: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    out_headers = dict(headers or {})
    if index is not None:
        out_headers["X-Consul-Index"] = str(max(1, index))
    return web.json_response(data, dumps=_dumps(request), headers=out_headers)


def _ok() -> web.Response:
    """Consul answers successful writes with 200 and an empty body; clients only look
    at the status (the Go client's ``requireOK``, py-consul's ``CB.boolean``)."""
    return web.Response(status=200)


def _reject_nan(constant: str) -> object:
    raise ValueError(f"{constant} is not valid JSON")


async def _read_json(request: web.Request) -> object:
    """The request body as JSON, at most ``MAX_BODY_BYTES``; a 400 otherwise."""
    too_large = _bad_request(f"Request body too large: the limit is {MAX_BODY_BYTES} bytes")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large
    try:
        raw = await request.read()  # the application's client_max_size caps this
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    if not raw.strip():
        raise _bad_request("Request decode failed: empty body")
    try:
        return json.loads(raw, parse_constant=_reject_nan)
    except (ValueError, RecursionError) as exc:
        raise _bad_request(f"Request decode failed: {exc}") from None


@dataclass(frozen=True, slots=True)
class _Blocking:
    index: int
    """The client's ``?index``; 0 means "answer now"."""
    wait: float
    """How long to hold the request, jitter included."""


def _blocking_options(request: web.Request, rng: random.Random) -> _Blocking:
    """``?index=`` and ``?wait=`` (Consul: "Invalid index", "Invalid wait time")."""
    raw_index = request.query.get("index", "")
    index = 0
    if raw_index:
        if not raw_index.isdigit() or int(raw_index) >= 2**64:
            raise _bad_request(f"Invalid index: {raw_index!r}")
        index = int(raw_index)
    wait = DEFAULT_WAIT
    raw_wait = request.query.get("wait", "")
    if raw_wait:
        try:
            wait = parse_duration(raw_wait)
        except ValidationError:
            raise _bad_request(f"Invalid wait time: {raw_wait!r}") from None
        wait = min(wait, MAX_WAIT)
    if wait > 0:
        wait += rng.uniform(0, wait / JITTER_FRACTION)
    return _Blocking(index, wait)


async def _wait_for_change(api: _Api, ready: Callable[[], bool], seconds: float) -> None:
    """Wait until ``ready()`` or for ``seconds``, whichever comes first."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await api.changes.wait_until(ready)


async def _block(request: web.Request, index_of: Callable[[], int]) -> int:
    """Hold a blocking query until ``index_of()`` passes ``?index`` or the wait ends;
    returns the index to report."""
    api = request.app[API]
    options = _blocking_options(request, api.rng)
    if options.index > 0 and index_of() <= options.index <= api.catalog.index:
        # An index above the catalog's own comes from before this agent restarted:
        # answering at once lets the client see the index go back and reset
        # (Consul API docs: "reset the index if it goes backwards").
        await _wait_for_change(api, lambda: index_of() > options.index, options.wait)
    return max(1, index_of())


def _content_hash(data: object) -> str:
    """A stable digest of a response body, for ``X-Consul-ContentHash``."""
    encoded = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


async def _hash_blocking(request: web.Request, render: Callable[[], object]) -> web.Response:
    """Agent-local blocking: with ``?hash=H``, wait while the body still hashes to H
    (Consul API docs, "Hash-based Blocking Queries")."""
    api = request.app[API]
    data = render()
    wanted = request.query.get("hash", "")
    if wanted and _content_hash(data) == wanted:
        options = _blocking_options(request, api.rng)
        current: list[object] = [data]

        def changed() -> bool:
            current[0] = render()
            return _content_hash(current[0]) != wanted

        await _wait_for_change(api, changed, options.wait)
        data = current[0]
    return _json(request, data, headers={"X-Consul-ContentHash": _content_hash(data)})


def _local_written(api: _Api) -> web.Response:
    api.agent.local_changed()
    return _ok()


# --------------------------------------------------------------------------- agent: services


async def _service_register(request: web.Request) -> web.Response:
    """``PUT /v1/agent/service/register[?replace-existing-checks]`` (agent/service.mdx)."""
    api = request.app[API]
    replace = _flag(request, "replace-existing-checks")
    service, checks = parse_registration(await _read_json(request))
    for check in checks:
        api.agent.check_allowed(check)
    api.catalog.register_service(service, checks, replace_existing_checks=replace)
    return _local_written(api)


async def _service_deregister(request: web.Request) -> web.Response:
    api = request.app[API]
    api.catalog.deregister_service(request.match_info["service_id"])
    return _local_written(api)


def _enable_and_reason(request: web.Request) -> tuple[bool, str]:
    """``?enable=`` (required) and ``?reason=`` of the maintenance endpoints."""
    if "enable" not in request.query:
        raise _bad_request("Missing value for enable")
    return _parse_bool(request.query["enable"], "enable"), request.query.get("reason", "")


async def _service_maintenance(request: web.Request) -> web.Response:
    """``PUT /v1/agent/service/maintenance/:id?enable=&reason=``."""
    api = request.app[API]
    enable, reason = _enable_and_reason(request)
    api.catalog.set_service_maintenance(request.match_info["service_id"], enable, reason)
    return _local_written(api)


def _agent_services(api: _Api) -> dict[str, Any]:
    return {
        service_id: agent_service_json(service, datacenter=api.datacenter)
        for service_id, service in api.catalog.local_services().items()
    }


async def _services(request: web.Request) -> web.Response:
    """``GET /v1/agent/services``: our services by ID."""
    api = request.app[API]
    _reject_filter(request)
    return await _hash_blocking(request, lambda: _agent_services(api))


async def _service(request: web.Request) -> web.Response:
    """``GET /v1/agent/service/:id`` (404 "unknown service ID", as Consul)."""
    api = request.app[API]
    service_id = request.match_info["service_id"]
    if service_id not in api.catalog.local_services():
        raise NotFoundError(f"unknown service ID: {service_id}")

    def render() -> object:
        service = api.catalog.local_services().get(service_id)
        if service is None:  # deregistered while we waited: answer what is left
            return None
        out = agent_service_json(service, datacenter=api.datacenter)
        out["ContentHash"] = _content_hash(agent_service_json(service, datacenter=api.datacenter))
        return out

    return await _hash_blocking(request, render)


# --------------------------------------------------------------------------- agent: checks


async def _checks(request: web.Request) -> web.Response:
    """``GET /v1/agent/checks``: our checks by ID (maintenance checks included)."""
    api = request.app[API]
    _reject_filter(request)
    return await _hash_blocking(
        request,
        lambda: {
            check_id: check_json(view) for check_id, view in api.catalog.local_checks().items()
        },
    )


async def _check_register(request: web.Request) -> web.Response:
    """``PUT /v1/agent/check/register`` (agent/check.mdx)."""
    api = request.app[API]
    check = parse_check(await _read_json(request))
    api.agent.check_allowed(check)
    api.catalog.register_check(check)
    return _local_written(api)


async def _check_deregister(request: web.Request) -> web.Response:
    api = request.app[API]
    api.catalog.deregister_check(request.match_info["check_id"])
    return _local_written(api)


def _set_ttl(api: _Api, check_id: str, status: HealthStatus, output: str) -> web.Response:
    """A TTL check result (Go's ``UpdateTTL``): reset the timer, record the status."""
    state = api.catalog.local.checks.get(check_id)
    if state is None:
        raise NotFoundError(f"Unknown check ID {check_id!r}")
    if state.definition.kind != CheckKind.TTL:
        raise _bad_request(f"CheckID {check_id!r} does not have associated TTL")
    try:
        api.agent.ttl_update(check_id, status, output)
    except KeyError:
        raise NotFoundError(f"Unknown check ID {check_id!r}") from None
    api.catalog.update_check(check_id, status, output)
    return _local_written(api)


def _ttl_handler(status: HealthStatus) -> _Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        """``PUT /v1/agent/check/{pass,warn,fail}/:id?note=`` (Go PassTTL/FailTTL)."""
        api = request.app[API]
        return _set_ttl(api, request.match_info["check_id"], status, request.query.get("note", ""))

    return handler


async def _check_update(request: web.Request) -> web.Response:
    """``PUT /v1/agent/check/update/:id`` with ``{"Status", "Output"}`` (Go UpdateTTL)."""
    api = request.app[API]
    status, output = parse_check_update(await _read_json(request))
    return _set_ttl(api, request.match_info["check_id"], status, output)


# --------------------------------------------------------------------------- agent: node


def _member_tags(api: _Api, name: str) -> dict[str, str]:
    record = api.catalog.record(name)
    tags = {"role": "node"}
    if record is not None:
        tags.update({"dc": record.datacenter, "id": record.node_id})
    if name == api.node_name:
        tags["build"] = f"{CONSUL_COMPATIBLE_VERSION}:meshnode-{MESHNODE_VERSION}"
        tags["dc"] = api.datacenter
    return tags


def _member_json(api: _Api, member: Member) -> dict[str, Any]:
    """One entry of ``/v1/agent/members``, with serf's status numbers. A suspect
    member is still alive to serf; we add ``"State": "suspect"`` for operators."""
    entry: dict[str, Any] = {
        "Name": member.name,
        "Addr": member.address[0],
        "Port": member.address[1],
        "Tags": _member_tags(api, member.name),
    }
    if member.state == MemberState.ALIVE:
        entry["Status"] = SERF_ALIVE
    elif member.state == MemberState.SUSPECT:
        entry["Status"] = SERF_ALIVE
        entry["State"] = "suspect"
    elif member.state == MemberState.DEAD:
        entry["Status"] = SERF_FAILED
    else:
        entry["Status"] = SERF_LEAVING if member.name == api.node_name else SERF_LEFT
    return entry


async def _members(request: web.Request) -> web.Response:
    """``GET /v1/agent/members`` (``?wan``: meshnode has no WAN pool, so none)."""
    api = request.app[API]
    if _flag(request, "wan"):
        return _json(request, [])
    members = sorted(api.agent.members(), key=lambda m: m.name)
    return _json(request, [_member_json(api, m) for m in members])


async def _self(request: web.Request) -> web.Response:
    """``GET /v1/agent/self``. Every top-level value is an object, because the Go
    client decodes it as ``map[string]map[string]interface{}``; Prometheus and Fabio
    read ``Config.Datacenter``, Nomad ``Config.Version`` and ``Member.Tags.build``."""
    api = request.app[API]
    local = api.catalog.local
    me = next((m for m in api.agent.members() if m.name == api.node_name), None)
    member: dict[str, Any] = (
        _member_json(api, me)
        if me is not None
        else {
            "Name": api.node_name,
            "Addr": local.address,
            "Port": 0,
            "Tags": _member_tags(api, api.node_name),
            "Status": SERF_ALIVE,
        }
    )
    out: dict[str, dict[str, Any]] = {
        "Config": {
            "Datacenter": api.datacenter,
            "PrimaryDatacenter": api.datacenter,
            "NodeName": api.node_name,
            "NodeID": local.node_id,
            "Revision": "",
            "Server": False,
            "Version": CONSUL_COMPATIBLE_VERSION,
            "MeshnodeVersion": MESHNODE_VERSION,
        },
        "DebugConfig": {},
        "Member": member,
        # Consul's Stats values are strings (map[string]map[string]string).
        "Stats": {
            "agent": {
                "services": str(len(local.services)),
                "checks": str(len(local.checks)),
            },
            "consul": {"known_datacenters": "1", "leader": "false", "server": "false"},
        },
        "Meta": dict(local.meta),
    }
    for section, extra in api.agent.self_info().items():
        if not isinstance(extra, dict):
            continue
        target = out.setdefault(section, {})
        for key, value in extra.items():
            # Merge one level deeper too (Member.Tags, Stats.consul): the agent adds
            # to what the API knows, it does not replace it.
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                target[key] = {**target[key], **value}
            else:
                target[key] = value
    return _json(request, out)


async def _join(request: web.Request) -> web.Response:
    """``PUT /v1/agent/join/:address``. A failed join is 500 with the reason, as in
    Consul (whose handler returns the join error)."""
    api = request.app[API]
    if _flag(request, "wan"):
        raise _bad_request("meshnode has no WAN pool: WAN join is not supported")
    try:
        await api.agent.join(request.match_info["address"])
    except ValueError as exc:
        raise _HTTPError(500, str(exc)) from None
    return _ok()


async def _leave(request: web.Request) -> web.Response:
    """``PUT /v1/agent/leave``: leave gracefully; the agent then stops."""
    await request.app[API].agent.leave()
    return _ok()


async def _reload(request: web.Request) -> web.Response:
    """``PUT /v1/agent/reload``: as SIGHUP."""
    request.app[API].agent.reload()
    return _ok()


async def _node_maintenance(request: web.Request) -> web.Response:
    """``PUT /v1/agent/maintenance?enable=&reason=``."""
    api = request.app[API]
    enable, reason = _enable_and_reason(request)
    api.catalog.set_node_maintenance(enable, reason)
    return _local_written(api)


def _metrics_json(registry: CollectorRegistry) -> dict[str, Any]:
    """A minimal form of Consul's JSON metrics (agent/metrics: Timestamp, Gauges,
    Points, Counters, Samples), built from the Prometheus registry."""
    gauges: list[dict[str, Any]] = []
    counters: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    for family in registry.collect():
        if family.type == "counter":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counters.append(
                        {
                            "Name": sample.name,
                            "Count": sample.value,
                            "Sum": sample.value,
                            "Labels": dict(sample.labels),
                        }
                    )
        elif family.type in ("histogram", "summary"):
            by_labels: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
            for sample in family.samples:
                suffix = sample.name.rsplit("_", 1)[-1]
                if suffix not in ("count", "sum"):
                    continue
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                entry = by_labels.setdefault(
                    labels, {"Name": family.name, "Count": 0, "Sum": 0.0, "Labels": dict(labels)}
                )
                entry["Count" if suffix == "count" else "Sum"] = sample.value
            samples.extend(by_labels.values())
        else:
            for sample in family.samples:
                if math.isfinite(sample.value):
                    gauges.append(
                        {"Name": sample.name, "Value": sample.value, "Labels": dict(sample.labels)}
                    )
    return {
        "Timestamp": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S +0000 UTC"),
        "Gauges": gauges,
        "Points": [],
        "Counters": counters,
        "Samples": samples,
    }


async def _metrics(request: web.Request) -> web.Response:
    """``GET /v1/agent/metrics[?format=prometheus]``."""
    registry = request.app[API].registry
    if request.query.get("format") == "prometheus":
        # The content type carries a charset, which aiohttp refuses in content_type=
        # (dependencies.md), so it goes in as a header.
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )
    return _json(request, _metrics_json(registry))


# --------------------------------------------------------------------------- catalog


def _services_with_meta(api: _Api, node_meta: Mapping[str, str]) -> dict[str, list[str]]:
    out: dict[str, set[str]] = {}
    for info in api.catalog.nodes(node_meta):
        found = api.catalog.node(info.name)
        for service in found[1] if found is not None else []:
            out.setdefault(service.name, set()).update(service.tags)
    return {name: sorted(tags) for name, tags in sorted(out.items())}


async def _catalog_services(request: web.Request) -> web.Response:
    """``GET /v1/catalog/services``: name → tags; blocks on the service-list index."""
    api = request.app[API]
    node_meta = _node_meta(request)
    _reject_filter(request)
    index = await _block(request, api.catalog.services_index)
    data = api.catalog.services() if node_meta is None else _services_with_meta(api, node_meta)
    return _json(request, data, index=index)


async def _catalog_service(request: web.Request) -> web.Response:
    """``GET /v1/catalog/service/:name?tag=&node-meta=`` (catalog.mdx)."""
    api = request.app[API]
    name = request.match_info["name"]
    tags = request.query.getall("tag", [])
    node_meta = _node_meta(request)
    _reject_filter(request)
    index = await _block(request, lambda: api.catalog.service_index(name))
    data = [
        catalog_service_json(
            instance.node,
            instance.service,
            create_index=instance.service_index[0],
            modify_index=instance.service_index[1],
        )
        for instance in api.catalog.service_instances(name, tags, node_meta)
    ]
    return _json(request, data, index=index)


async def _catalog_nodes(request: web.Request) -> web.Response:
    """``GET /v1/catalog/nodes?node-meta=``."""
    api = request.app[API]
    node_meta = _node_meta(request)
    _reject_filter(request)
    index = await _block(request, lambda: api.catalog.index)
    data = []
    for info in api.catalog.nodes(node_meta):
        created, modified = api.catalog.node_indexes(info.name)
        data.append(node_json(info, create_index=created, modify_index=modified))
    return _json(request, data, index=index)


def _node_service_json(api: _Api, node: str, service: ServiceDefinition) -> dict[str, Any]:
    out = agent_service_json(service, datacenter=api.datacenter)
    del out["Datacenter"]
    created, modified = next(
        (
            i.service_index
            for i in api.catalog.service_instances(service.name)
            if i.node.name == node and i.service.id == service.id
        ),
        (1, 1),
    )
    out.update({"CreateIndex": created, "ModifyIndex": modified})
    return out


async def _catalog_node(request: web.Request) -> web.Response:
    """``GET /v1/catalog/node/:node``: ``{Node, Services: {id: service}}``, or
    ``null`` for an unknown node, as Consul answers."""
    api = request.app[API]
    name = request.match_info["node"]
    index = await _block(request, lambda: api.catalog.node_index(name))
    found = api.catalog.node(name)
    if found is None:
        return _json(request, None, index=index)
    info, services = found
    created, modified = api.catalog.node_indexes(name)
    data = {
        "Node": node_json(info, create_index=created, modify_index=modified),
        "Services": {s.id: _node_service_json(api, name, s) for s in services},
    }
    return _json(request, data, index=index)


async def _catalog_datacenters(request: web.Request) -> web.Response:
    """``GET /v1/catalog/datacenters``: ours, plus any other a gossiped node names."""
    api = request.app[API]
    names = {api.datacenter} | {r.datacenter for r in api.catalog.records() if r.datacenter}
    return _json(request, sorted(names))


# --------------------------------------------------------------------------- health


async def _health_service(request: web.Request) -> web.Response:
    """``GET /v1/health/service/:name?passing&tag=&node-meta=`` (health.mdx). Each
    entry's ``Checks`` includes the node's ``serfHealth``."""
    api = request.app[API]
    name = request.match_info["name"]
    passing = _flag(request, "passing")
    tags = request.query.getall("tag", [])
    node_meta = _node_meta(request)
    _reject_filter(request)
    index = await _block(request, lambda: api.catalog.service_index(name))
    instances = api.catalog.health_service(
        name, passing_only=passing, tags=tags, node_meta=node_meta
    )
    data = [
        health_service_json(
            i.node,
            i.service,
            i.checks,
            node_index=i.node_index,
            service_index=i.service_index,
        )
        for i in instances
    ]
    return _json(request, data, index=index)


async def _health_checks(request: web.Request) -> web.Response:
    """``GET /v1/health/checks/:service``."""
    api = request.app[API]
    name = request.match_info["name"]
    _reject_filter(request)
    index = await _block(request, lambda: api.catalog.service_index(name))
    return _json(
        request, [check_json(c) for c in api.catalog.checks_for_service(name)], index=index
    )


async def _health_node(request: web.Request) -> web.Response:
    """``GET /v1/health/node/:node``."""
    api = request.app[API]
    name = request.match_info["node"]
    _reject_filter(request)
    index = await _block(request, lambda: api.catalog.node_index(name))
    return _json(request, [check_json(c) for c in api.catalog.node_checks(name)], index=index)


async def _health_state(request: web.Request) -> web.Response:
    """``GET /v1/health/state/:state`` (any, passing, warning, critical): a flat list
    of checks; Fabio watches ``any`` with blocking queries."""
    api = request.app[API]
    state = request.match_info["state"]
    if state not in ("any", "passing", "warning", "critical"):
        raise _bad_request(f"Invalid state {state!r}: one of any, passing, warning, critical")
    node_meta = _node_meta(request)
    _reject_filter(request)
    index = await _block(request, lambda: api.catalog.index)
    checks = api.catalog.checks_in_state(state)
    if node_meta is not None:
        allowed = {n.name for n in api.catalog.nodes(node_meta)}
        checks = [c for c in checks if c.node in allowed]
    return _json(request, [check_json(c) for c in checks], index=index)


# --------------------------------------------------------------------------- status


async def _status_leader(request: web.Request) -> web.Response:
    """``GET /v1/status/leader``: a JSON string, ``"ip:port"`` of the leader, ``""``
    when none is known (as Consul answers). Consul reports the leader's server RPC
    address; meshnode servers have no RPC port, so this is the leader's gossip address,
    where its election and CA messages arrive."""
    return _json(request, request.app[API].agent.leader())


async def _status_peers(request: web.Request) -> web.Response:
    """``GET /v1/status/peers``: the servers' gossip addresses (Consul: the raft
    peers). Failed servers stay listed until they leave: they still count toward the
    election's majority."""
    return _json(request, request.app[API].agent.peers())


# --------------------------------------------------------------------------- meshnode


async def _mesh_gossip(request: web.Request) -> web.Response:
    """``GET /v1/mesh/gossip``: the gossip layer's own view (meshnode only)."""
    return _json(request, request.app[API].agent.mesh_gossip_info())


async def _keyring_key(request: web.Request) -> str:
    body = await _read_json(request)
    if not isinstance(body, dict):
        raise _bad_request('Request decode failed: expected an object like {"Key": "..."}')
    keys = [v for k, v in body.items() if isinstance(k, str) and k.lower() == "key"]
    if len(keys) != 1 or not isinstance(keys[0], str) or not keys[0]:
        raise _bad_request('Key: expected a non-empty base64 string ({"Key": "..."})')
    return keys[0]


_KEYRING_OPS: Final = {"POST": "install", "PUT": "use", "DELETE": "remove"}


async def _keyring(request: web.Request) -> web.Response:
    """``/v1/operator/keyring`` (operator/keyring.mdx): GET lists
    ``[{WAN, Datacenter, Segment, Keys: {key: members}, NumNodes, ...}]``; POST
    installs, PUT makes primary, DELETE removes the body's ``{"Key"}``."""
    api = request.app[API]
    try:
        if request.method == "GET":
            result = await api.agent.keyring("list", None)
            entry: dict[str, object] = {
                "WAN": False,
                "Datacenter": api.datacenter,
                "Segment": "",
                "Messages": {},
                "Keys": {},
                "NumNodes": 0,
            }
            entry.update(result)
            return _json(request, [entry])
        key = await _keyring_key(request)
        await api.agent.keyring(_KEYRING_OPS[request.method], key)
    except ValueError as exc:
        raise _bad_request(str(exc)) from None
    return _ok()


# --------------------------------------------------------------------------- application


def build_app(
    agent: AgentHandle,
    catalog: Catalog,
    *,
    acl: AclConfig,
    registry: CollectorRegistry,
    datacenter: str,
    node_name: str,
    rng: random.Random | None = None,
    connect: ConnectHandle | None = None,
) -> web.Application:
    """The agent's HTTP API as an aiohttp application (not started).

    Args:
        agent: the running agent, as far as the API needs it.
        catalog: the catalog every read is answered from and local writes go to.
        acl: write access control.
        registry: the Prometheus registry ``/v1/agent/metrics`` exposes.
        datacenter: our datacenter, as reported in shapes and ``/v1/agent/self``.
        node_name: our node name.
        rng: source of blocking-query jitter (default: a fresh ``random.Random``).
        connect: the agent's Connect side; when given, the Connect routes
            (``meshnode.connect_api``) are mounted too.

    Returns:
        An application that subscribes to ``catalog.on_change`` (and to the Connect
        and policy changes) while it runs.
    """
    app = web.Application(
        middlewares=[_acl_middleware, _error_middleware],
        # Bodies past the cap are refused while reading (see ``_read_json``).
        client_max_size=MAX_BODY_BYTES,
    )
    api = _Api(agent, catalog, acl, registry, datacenter, node_name, rng or random.Random())
    app[API] = api

    async def subscribe(app: web.Application) -> AsyncIterator[None]:
        unsubscribe = catalog.on_change(api.changes.notify)
        try:
            yield
        finally:
            unsubscribe()

    async def wake_blocked(app: web.Application) -> None:
        # Answer blocked queries at once on shutdown, so the runner's cleanup does
        # not wait out their waits (up to 10 minutes).
        api.changes.close()

    app.cleanup_ctx.append(subscribe)
    app.on_shutdown.append(wake_blocked)
    app.on_response_prepare.append(_add_consul_headers)

    routes = app.router
    # agent: services
    routes.add_put("/v1/agent/service/register", _service_register)
    routes.add_put("/v1/agent/service/deregister/{service_id}", _service_deregister)
    routes.add_put("/v1/agent/service/maintenance/{service_id}", _service_maintenance)
    routes.add_get("/v1/agent/services", _services)
    routes.add_get("/v1/agent/service/{service_id}", _service)
    # agent: checks
    routes.add_get("/v1/agent/checks", _checks)
    routes.add_put("/v1/agent/check/register", _check_register)
    routes.add_put("/v1/agent/check/deregister/{check_id}", _check_deregister)
    routes.add_put("/v1/agent/check/pass/{check_id}", _ttl_handler(HealthStatus.PASSING))
    routes.add_put("/v1/agent/check/warn/{check_id}", _ttl_handler(HealthStatus.WARNING))
    routes.add_put("/v1/agent/check/fail/{check_id}", _ttl_handler(HealthStatus.CRITICAL))
    routes.add_put("/v1/agent/check/update/{check_id}", _check_update)
    # agent: node
    routes.add_get("/v1/agent/members", _members)
    routes.add_get("/v1/agent/self", _self)
    routes.add_put("/v1/agent/join/{address}", _join)
    routes.add_put("/v1/agent/leave", _leave)
    routes.add_put("/v1/agent/reload", _reload)
    routes.add_put("/v1/agent/maintenance", _node_maintenance)
    routes.add_get("/v1/agent/metrics", _metrics)
    # catalog
    routes.add_get("/v1/catalog/services", _catalog_services)
    routes.add_get("/v1/catalog/service/{name}", _catalog_service)
    routes.add_get("/v1/catalog/nodes", _catalog_nodes)
    routes.add_get("/v1/catalog/node/{node}", _catalog_node)
    routes.add_get("/v1/catalog/datacenters", _catalog_datacenters)
    # health
    routes.add_get("/v1/health/service/{name}", _health_service)
    routes.add_get("/v1/health/checks/{name}", _health_checks)
    routes.add_get("/v1/health/node/{node}", _health_node)
    routes.add_get("/v1/health/state/{state}", _health_state)
    # status
    routes.add_get("/v1/status/leader", _status_leader)
    routes.add_get("/v1/status/peers", _status_peers)
    # meshnode
    routes.add_get("/v1/mesh/gossip", _mesh_gossip)
    for method in ("GET", "POST", "PUT", "DELETE"):
        routes.add_route(method, "/v1/operator/keyring", _keyring)
    if connect is not None:
        # Imported here: connect_api builds on this module's helpers.
        from meshnode import connect_api

        connect_api.add_routes(app, connect)
    return app


async def serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start ``app`` on ``host:port`` in the running loop (port 0 picks a free one).

    Returns:
        The runner (``await runner.cleanup()`` stops the server) and the bound port.
    """
    # The access log costs a lot of throughput (aiohttp#2779); we log facts instead.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = port
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            bound = int(address[1])
            break
    return runner, bound
