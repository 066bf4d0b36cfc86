"""The Connect part of the HTTP API: CA roots and leaves, authorize, intentions,
config entries, and meshnode's CA operations (an aiohttp adapter over ``ConnectHandle``).

Theory of operation
-------------------
``meshnode.api.build_app(..., connect=handle)`` calls :func:`add_routes`, which mounts
the routes below on the same application, so they share its middlewares (ACL check,
``ValidationError`` → 400, the ``X-Consul-*`` headers on every response), its request
helpers (body cap, JSON decoding, ``?index``/``?wait`` parsing with jitter) and its
change signal, which wakes blocked queries. This module decides nothing of its own:
the shapes come from ``meshnode.policy`` and ``ca.bundle``, the decisions from
``IntentionIndex``, and everything else from the agent behind :class:`ConnectHandle`.

* **Reads are local.** Policy and the trust bundle are replicated to every agent, so
  every GET (and ``POST /v1/agent/connect/authorize``, a read that Consul happens to
  make a POST) is answered from this agent's copy, with or without a leader
  (DESIGN.md, "Agent → Policy": "reads and enforcement continue").
* **Writes are forwarded.** A write is parsed and checked against the local policy
  first (``parse_*`` then ``validate_against``/``validate_delete``), so an obviously
  bad one gets its 400 without a round trip and changes nothing; then the handle
  forwards it, with the request's ACL token, to the leader, which checks again
  against its own copy, signs it, and answers once the entry is applied here.
* **Errors of the handle** become Consul's statuses at this edge (httpcore-style, one
  translator, :func:`_translated`): ``NoLeaderError`` 503 with its message ("No
  cluster leader"), ``PermissionDeniedError`` 403 "Permission denied",
  ``RequestRefusedError`` 400, ``ValidationError`` 400 (by ``api``'s middleware).
* **ACLs** are ``api``'s middleware's: writes need the agent's token, and the leader
  checks it again (the handle gets it); ``POST /v1/agent/connect/authorize`` is
  exempt, being a read, and leaf reads need the token, as they return a private key.
* **Blocking queries** (Consul API docs, "Blocking Queries") use the same rules as the
  catalog's: ``?index=N`` holds the request while the endpoint's index is still ≤ N
  (an N above every index this agent has handed out comes from before a restart and
  is answered at once, so the client sees the index go back and resets). The roots
  block on ``connect_index()``, policy lists on ``PolicyStore.kind_index``, and a leaf
  on its own ``LocalLeaf.index``, which moves on renewal and after a root rotation.
  The handle's and the store's change callbacks feed ``api``'s change signal, which
  the server also closes on shutdown so no request waits out its ``wait``.

References: Consul API docs ``agent/connect`` (roots, leaf, authorize),
``connect/intentions``, ``config``; shared/reference/consul-api.md.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from aiohttp import web

from ca.bundle import leaf_json, roots_json
from ca.spiffe import SPIFFE_ID_MAX_BYTES, InvalidSpiffeId, SpiffeId
from meshnode.api import (
    API,
    PERMISSION_DENIED,
    _Api,
    _bad_request,
    _blocking_options,
    _Handler,
    _HTTPError,
    _json,
    _read_json,
    _reject_filter,
    _request_token,
    _wait_for_change,
)
from meshnode.connect import (
    ConnectHandle,
    LocalLeaf,
    NoLeaderError,
    PermissionDeniedError,
    RequestRefusedError,
)
from meshnode.model import Body, ValidationError
from meshnode.policy import (
    CONFIG_KINDS,
    DEFAULT_NAMESPACE,
    KIND_INTENTION,
    Intention,
    PolicyStore,
    PolicyValue,
    config_entry_json,
    intention_check_json,
    intention_json,
    intention_key,
    match_intentions,
    parse_config_entry,
    parse_intention,
    validate_against,
    validate_delete,
)

__all__ = ["CA_NOT_INITIALIZED", "NO_LEADER", "add_routes"]

#: Consul's text for a request that needs a leader when there is none
#: (``structs.ErrNoLeader``); used when ``NoLeaderError`` carries no message.
NO_LEADER: Final = "No cluster leader"
#: Our answer (503) before any trust bundle has reached this agent: the first leader
#: has not created the CA yet, or its bundle is still spreading.
CA_NOT_INITIALIZED: Final = "CA not initialized: this agent has not received a trust bundle yet"
#: The prefix Consul's own UI looks for, together with status 500, to tell the user an
#: intention for that pair already exists (consul-ui ``errorCreate``).
DUPLICATE_INTENTION: Final = "duplicate intention found"


@dataclass(frozen=True, slots=True)
class _Connect:
    """What the Connect handlers share (one per application)."""

    handle: ConnectHandle


CONNECT: Final = web.AppKey("meshnode_connect", _Connect)


# --------------------------------------------------------------------------- helpers


def _translated(handler: _Handler) -> _Handler:
    """``handler`` with the handle's errors turned into Consul's statuses."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except NoLeaderError as exc:
            raise _HTTPError(503, str(exc) or NO_LEADER) from None
        except PermissionDeniedError:
            raise _HTTPError(403, PERMISSION_DENIED) from None
        except RequestRefusedError as exc:
            raise _HTTPError(400, str(exc) or exc.reason) from None

    return wrapper


def _handle(request: web.Request) -> ConnectHandle:
    return request.app[CONNECT].handle


def _required(request: web.Request, name: str) -> str:
    """A query parameter the endpoint cannot do without (Consul: "required query
    parameter ... not set")."""
    value = request.query.get(name, "")
    if not value:
        raise _bad_request(f"required query parameter {name!r} not set")
    return value


async def _block(
    request: web.Request, index_of: Callable[[], int], ceiling: Callable[[], int]
) -> int:
    """Hold a blocking query while ``index_of()`` has not passed ``?index``; returns the
    index to report. ``ceiling()`` is the highest index this source has handed out: a
    client index above it predates a restart and is answered at once (api.py's rule)."""
    api = request.app[API]
    options = _blocking_options(request, api.rng)
    if options.index > 0 and index_of() <= options.index <= ceiling():
        await _wait_for_change(api, lambda: index_of() > options.index, options.wait)
    return max(1, index_of())


async def _wait_for_connect_change(
    api: _Api, handle: ConnectHandle, since: int, seconds: float
) -> None:
    await _wait_for_change(api, lambda: handle.connect_index() != since, seconds)


def _boolean(request: web.Request, value: bool = True) -> web.Response:
    """Consul answers these writes with a JSON boolean (the Go client ignores it;
    ``?cas`` callers read it)."""
    return _json(request, value)


def _intention_out(policy: PolicyStore, intention: Intention) -> dict[str, Any]:
    created, modified = policy.indexes(KIND_INTENTION, intention.name)
    return intention_json(intention, create_index=created, modify_index=modified)


async def _write(request: web.Request, value: PolicyValue) -> None:
    """Check ``value`` against our copy of the policy (fast 400, nothing changed), then
    have the leader sign and apply it."""
    handle = _handle(request)
    validate_against(value, handle.policy.values())
    await handle.write_policy(value, _request_token(request))


def _cas(request: web.Request) -> int | None:
    """``?cas=N`` of the config endpoints (Consul: check-and-set on ModifyIndex)."""
    raw = request.query.get("cas")
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) >= 2**64:
        raise _bad_request(f"Invalid cas index: {raw!r}")
    return int(raw)


def _cas_holds(policy: PolicyStore, kind: str, name: str, cas: int | None) -> bool:
    """Consul's check-and-set: 0 means "only if absent", N "only if ModifyIndex is N".

    Checked against this agent's copy, whose indexes are the ones it handed out; the
    leader does not re-check, so two writers racing through different agents can both
    pass (last writer wins, as for every policy write).
    """
    if cas is None:
        return True
    if policy.get(kind, name) is None:
        return cas == 0
    return cas != 0 and policy.indexes(kind, name)[1] == cas


def _config_kind(request: web.Request) -> str:
    kind = request.match_info["kind"].lower()
    if kind not in CONFIG_KINDS:
        raise _bad_request(
            f"unsupported config entry kind {kind!r}; one of {', '.join(CONFIG_KINDS)}"
        )
    return kind


# --------------------------------------------------------------------------- CA


async def _roots(request: web.Request) -> web.Response:
    """``GET /v1/agent/connect/ca/roots`` and ``/v1/connect/ca/roots``: ``{ActiveRootID,
    TrustDomain, Roots: [...]}``; blocks on ``connect_index``."""
    handle = _handle(request)
    index = await _block(request, handle.connect_index, handle.connect_index)
    bundle = handle.trust_bundle()
    if bundle is None:
        raise _HTTPError(503, CA_NOT_INITIALIZED)
    return _json(request, roots_json(bundle), index=index)


async def _local_leaf(handle: ConnectHandle, service: str) -> LocalLeaf:
    try:
        return await handle.leaf_certificate(service)
    except LookupError:
        raise _HTTPError(
            404, f"unknown service {service!r}: no instance of it is registered on this agent"
        ) from None


def _leaf_out(leaf: LocalLeaf) -> dict[str, object]:
    out = leaf_json(leaf.cert_pem, leaf.private_key_pem, leaf.service)
    out.update({"CreateIndex": leaf.index, "ModifyIndex": leaf.index})
    return out


async def _leaf(request: web.Request) -> web.Response:
    """``GET /v1/agent/connect/ca/leaf/:service``: the Consul leaf shape; with
    ``?index=N`` it waits until the leaf's index passes N (renewal, or re-issue after
    a root rotation) or the wait ends, then answers with the current leaf."""
    api = request.app[API]
    handle = _handle(request)
    service = request.match_info["service"]
    options = _blocking_options(request, api.rng)
    # Read before asking for the leaf: a change while we ask is then not missed.
    seen = handle.connect_index()
    leaf = await _local_leaf(handle, service)
    if options.index > 0 and leaf.index <= options.index <= max(leaf.index, seen):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + options.wait
        while leaf.index <= options.index and not api.changes.closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # A new leaf always bumps connect_index; wake on that, then look again.
            await _wait_for_connect_change(api, handle, seen, remaining)
            seen = handle.connect_index()
            leaf = await _local_leaf(handle, service)
    return _json(request, _leaf_out(leaf), index=leaf.index)


async def _ca_status(request: web.Request) -> web.Response:
    """``GET /v1/mesh/ca/status`` (meshnode only)."""
    return _json(request, _handle(request).ca_status())


async def _ca_rotate(request: web.Request) -> web.Response:
    """``PUT /v1/mesh/ca/rotate`` (meshnode only): ``{"ActiveRootID": new_id}``."""
    new_id = await _handle(request).rotate_ca(_request_token(request))
    return _json(request, {"ActiveRootID": new_id})


# --------------------------------------------------------------------------- authorize


async def _authorize(request: web.Request) -> web.Response:
    """``POST /v1/agent/connect/authorize`` with ``{Target, ClientCertURI,
    ClientCertSerial}``: may that client reach ``Target``? ``{Authorized, Reason}``.

    Like Consul (agent/connect_auth.go), an L4 intention decides by its action, an L7
    one denies (its permissions need a request, which this endpoint does not have),
    and with no intention the default policy decides. The certificate itself was
    verified by whoever calls us (TLS); we only refuse identities of another trust
    domain, which no certificate of ours can carry.
    """
    handle = _handle(request)
    fields = Body(await _read_json(request), "")
    target = fields.string("Target")
    uri = fields.string("ClientCertURI", limit=SPIFFE_ID_MAX_BYTES)
    fields.string("ClientCertSerial")  # type-checked; we keep no revocation list
    if not target:
        raise ValidationError(fields.sub("Target"), "Target service must be specified")
    if not uri:
        raise ValidationError(fields.sub("ClientCertURI"), "ClientCertURI must be specified")
    try:
        identity = SpiffeId.parse(uri)
    except InvalidSpiffeId as exc:
        raise ValidationError(
            fields.sub("ClientCertURI"), f"not a valid SPIFFE ID ({exc.reason}): {uri!r}"
        ) from None
    source = identity.service_name
    if source is None:
        raise ValidationError(
            fields.sub("ClientCertURI"),
            f"not a service identity (spiffe://<domain>/ns/<ns>/dc/<dc>/svc/<name>): {uri!r}",
        )
    bundle = handle.trust_bundle()
    if bundle is None:
        raise _HTTPError(503, CA_NOT_INITIALIZED)
    if identity.trust_domain != bundle.trust_domain:
        return _authorized(
            request,
            False,
            f"Identity from an external trust domain: {identity.trust_domain!r}"
            f" is not this cluster's {bundle.trust_domain!r}",
        )
    if identity.namespace != DEFAULT_NAMESPACE:
        return _authorized(
            request,
            False,
            f"Namespace {identity.namespace!r} does not exist: meshnode has only"
            f" {DEFAULT_NAMESPACE!r}",
        )
    default = handle.default_intention_policy
    index = handle.policy.intention_index(default)
    decision = index.decide(source, target)  # L7 intentions count as deny here
    intention = index.match(source, target)
    if intention is None:
        reason = (
            f"Default behavior: no intention matches {source} => {target}, and the"
            f" default intention policy is {default}"
        )
    elif intention.permissions:
        reason = f"Matched L7 intention: {intention}; only a proxy can check it per request"
    else:
        reason = f"Matched L4 intention: {intention}"
    return _authorized(request, decision.allowed, reason)


def _authorized(request: web.Request, allowed: bool, reason: str) -> web.Response:
    return _json(request, {"Authorized": allowed, "Reason": reason})


# --------------------------------------------------------------------------- intentions


async def _intentions(request: web.Request) -> web.Response:
    """``GET /v1/connect/intentions``: every intention in evaluation order."""
    policy = _handle(request).policy
    _reject_filter(request)
    index = await _block(request, lambda: policy.kind_index(KIND_INTENTION), lambda: policy.index)
    return _json(request, [_intention_out(policy, i) for i in policy.intentions()], index=index)


async def _intention_create(request: web.Request) -> web.Response:
    """``POST /v1/connect/intentions`` (legacy create): ``{"ID": id}``.

    An intention for the same pair is refused as Consul refuses it: 500 with
    "duplicate intention found: <existing>", the status and prefix Consul's UI keys on.
    """
    policy = _handle(request).policy
    intention = parse_intention(await _read_json(request))
    existing = policy.intention(intention.source, intention.destination)
    if existing is not None:
        raise _HTTPError(500, f"{DUPLICATE_INTENTION}: {existing}")
    await _write(request, intention)
    return _json(request, {"ID": intention.id})


def _exact_pair(request: web.Request) -> tuple[str, str]:
    return _required(request, "source"), _required(request, "destination")


async def _intention_exact_get(request: web.Request) -> web.Response:
    """``GET /v1/connect/intentions/exact?source=&destination=`` (404 if none)."""
    policy = _handle(request).policy
    source, destination = _exact_pair(request)
    intention = policy.intention(source, destination)
    if intention is None:
        raise _HTTPError(
            404, f"Intention with source {source!r} and destination {destination!r} not found"
        )
    out = _intention_out(policy, intention)
    return _json(request, out, index=out["ModifyIndex"])


async def _intention_exact_put(request: web.Request) -> web.Response:
    """``PUT /v1/connect/intentions/exact?source=&destination=`` (upsert): ``true``."""
    source, destination = _exact_pair(request)
    body = await _read_json(request)
    await _write(request, parse_intention(body, source=source, destination=destination))
    return _boolean(request)


async def _intention_exact_delete(request: web.Request) -> web.Response:
    """``DELETE /v1/connect/intentions/exact?source=&destination=``: ``true``, also when
    there was nothing to delete (as Consul)."""
    source, destination = _exact_pair(request)
    await _delete(request, KIND_INTENTION, intention_key(source, destination))
    return _boolean(request)


async def _delete(request: web.Request, kind: str, name: str) -> bool:
    """Refuse a delete that would break another entry (400), then forward it."""
    handle = _handle(request)
    validate_delete(kind, name, handle.policy.values())
    return await handle.delete_policy(kind, name, _request_token(request))


async def _intention_check(request: web.Request) -> web.Response:
    """``GET /v1/connect/intentions/check?source=&destination=``: ``{"Allowed": bool}``
    (an L4 answer: L7 intentions count as deny)."""
    handle = _handle(request)
    source, destination = _exact_pair(request)
    index = handle.policy.intention_index(handle.default_intention_policy)
    return _json(request, intention_check_json(index, source, destination))


async def _intention_match(request: web.Request) -> web.Response:
    """``GET /v1/connect/intentions/match?by=source|destination&name=``: for each
    ``name`` (repeatable), the intentions that apply to it, in evaluation order."""
    policy = _handle(request).policy
    by_value = _required(request, "by")
    by: Literal["source", "destination"]
    if by_value == "source":
        by = "source"
    elif by_value == "destination":
        by = "destination"
    else:
        raise _bad_request(f"'by' must be 'source' or 'destination', got {by_value!r}")
    names = [name for name in request.query.getall("name", []) if name]
    if not names:
        raise _bad_request("required query parameter 'name' not set")
    index = await _block(request, lambda: policy.kind_index(KIND_INTENTION), lambda: policy.index)
    intentions = policy.intentions()
    data = {
        name: [_intention_out(policy, i) for i in match_intentions(intentions, by, name)]
        for name in names
    }
    return _json(request, data, index=index)


def _intention_by_id(request: web.Request) -> Intention:
    policy = _handle(request).policy
    intention = policy.intention_by_id(request.match_info["intention_id"])
    if intention is None:
        raise _HTTPError(404, "Intention not found")
    return intention


async def _intention_get(request: web.Request) -> web.Response:
    """``GET /v1/connect/intentions/:uuid`` (legacy; 404 "Intention not found")."""
    intention = _intention_by_id(request)
    out = _intention_out(_handle(request).policy, intention)
    return _json(request, out, index=out["ModifyIndex"])


async def _intention_update(request: web.Request) -> web.Response:
    """``PUT /v1/connect/intentions/:uuid`` (legacy update): ``{"ID": id}``.

    IDs derive from the (source, destination) pair here, so an update cannot move an
    intention to another pair: delete it and create the new one instead. A body that
    leaves the names out keeps the intention's own.
    """
    existing = _intention_by_id(request)
    body = await _read_json(request)
    fields = Body(body, "")
    intention = parse_intention(
        body,
        source=None if fields.has("SourceName") else existing.source,
        destination=None if fields.has("DestinationName") else existing.destination,
    )
    if intention.name != existing.name:
        raise ValidationError(
            "",
            f"intention {existing.id} is {existing.source} => {existing.destination}; an"
            " update cannot change SourceName or DestinationName (delete it and create"
            " the new pair)",
        )
    await _write(request, intention)
    return _json(request, {"ID": existing.id})


async def _intention_delete(request: web.Request) -> web.Response:
    """``DELETE /v1/connect/intentions/:uuid`` (legacy): ``true``."""
    intention = _intention_by_id(request)
    await _delete(request, KIND_INTENTION, intention.name)
    return _boolean(request)


# --------------------------------------------------------------------------- config entries


async def _config_apply(request: web.Request) -> web.Response:
    """``PUT /v1/config[?cas=N]`` with a body naming ``Kind`` and ``Name``: ``true``,
    or ``false`` when ``cas`` does not match."""
    policy = _handle(request).policy
    cas = _cas(request)
    entry = parse_config_entry(None, None, await _read_json(request))
    if not _cas_holds(policy, entry.kind, entry.name, cas):
        return _boolean(request, False)
    await _write(request, entry)
    return _boolean(request)


async def _config_list(request: web.Request) -> web.Response:
    """``GET /v1/config/:kind``: every entry of that kind, by name."""
    policy = _handle(request).policy
    kind = _config_kind(request)
    index = await _block(request, lambda: policy.kind_index(kind), lambda: policy.index)
    data = []
    for entry in policy.config_entries(kind):
        created, modified = policy.indexes(kind, entry.name)
        data.append(config_entry_json(entry, create_index=created, modify_index=modified))
    return _json(request, data, index=index)


async def _config_get(request: web.Request) -> web.Response:
    """``GET /v1/config/:kind/:name`` (404 as Consul: "Config entry not found for ...")."""
    policy = _handle(request).policy
    kind = _config_kind(request)
    name = request.match_info["name"]
    index = await _block(request, lambda: policy.kind_index(kind), lambda: policy.index)
    entry = policy.get(kind, name)
    if entry is None or isinstance(entry, Intention):
        raise _HTTPError(404, f"Config entry not found for {kind!r} / {name!r}")
    created, modified = policy.indexes(kind, name)
    data = config_entry_json(entry, create_index=created, modify_index=modified)
    return _json(request, data, index=index)


async def _config_delete(request: web.Request) -> web.Response:
    """``DELETE /v1/config/:kind/:name[?cas=N]``: ``true`` (also when there was nothing
    to delete), ``false`` when ``cas`` does not match; 400 when another entry still
    depends on this one."""
    policy = _handle(request).policy
    kind = _config_kind(request)
    name = request.match_info["name"]
    if not _cas_holds(policy, kind, name, _cas(request)):
        return _boolean(request, False)
    await _delete(request, kind, name)
    return _boolean(request)


# --------------------------------------------------------------------------- application


def add_routes(app: web.Application, handle: ConnectHandle) -> None:
    """Mount the Connect routes on ``app`` (built by ``meshnode.api.build_app``, whose
    state they use) and wake its blocked queries on every Connect or policy change."""
    app[CONNECT] = _Connect(handle)
    changes = app[API].changes

    async def subscribe(app: web.Application) -> AsyncIterator[None]:
        unsubscribe_connect = handle.on_connect_change(changes.notify)
        unsubscribe_policy = handle.policy.on_change(changes.notify)
        try:
            yield
        finally:
            unsubscribe_policy()
            unsubscribe_connect()

    app.cleanup_ctx.append(subscribe)

    def get(path: str, handler: _Handler) -> None:
        app.router.add_get(path, _translated(handler))

    def add(method: str, path: str, handler: _Handler) -> None:
        app.router.add_route(method, path, _translated(handler))

    # CA
    get("/v1/agent/connect/ca/roots", _roots)
    get("/v1/connect/ca/roots", _roots)
    get("/v1/agent/connect/ca/leaf/{service}", _leaf)
    add("POST", "/v1/agent/connect/authorize", _authorize)
    # intentions: the fixed paths before ``{intention_id}``
    get("/v1/connect/intentions", _intentions)
    add("POST", "/v1/connect/intentions", _intention_create)
    get("/v1/connect/intentions/exact", _intention_exact_get)
    add("PUT", "/v1/connect/intentions/exact", _intention_exact_put)
    add("DELETE", "/v1/connect/intentions/exact", _intention_exact_delete)
    get("/v1/connect/intentions/check", _intention_check)
    get("/v1/connect/intentions/match", _intention_match)
    get("/v1/connect/intentions/{intention_id}", _intention_get)
    add("PUT", "/v1/connect/intentions/{intention_id}", _intention_update)
    add("DELETE", "/v1/connect/intentions/{intention_id}", _intention_delete)
    # config entries
    add("PUT", "/v1/config", _config_apply)
    get("/v1/config/{kind}", _config_list)
    get("/v1/config/{kind}/{name}", _config_get)
    add("DELETE", "/v1/config/{kind}/{name}", _config_delete)
    # meshnode
    get("/v1/mesh/ca/status", _ca_status)
    add("PUT", "/v1/mesh/ca/rotate", _ca_rotate)
