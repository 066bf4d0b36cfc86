"""The CA service on servers: the leader signs, every server keeps the CA state.

Theory of operation
-------------------
Every server runs one :class:`CaServer`. It answers four requests (``meshnode.rpc``):

``ca.sign``
    An agent's CSR for one of its services (or for itself). Only the leader signs,
    and only when the catalog says the service is registered on the requesting node
    (``CertificateAuthority.sign_csr`` does every other check). The answer goes to
    that node's gossip address, whoever sent the request (``meshnode.rpc``).
``ca.state``
    A server asks for the CA state (root keys included), sending the X25519 public
    key it keeps in ``data_dir``; any server holding the state answers with a copy
    sealed for that key (``ca.sealing``), so it is encrypted on the wire whether or
    not gossip is. Followers ask the leader every :data:`REPLICATION_INTERVAL` and
    whenever the gossiped bundle is newer than their copy; a leader without state
    (elected before replication reached it) asks the other servers before anything
    else. State is stored in ``data_dir`` with mode 0600.
``ca.rotate``
    ``meshnode ca rotate``: a new root cross-signed by the old (``rotate_root``).
``policy.write`` / ``policy.delete``
    Policy writes forwarded by any agent: the leader checks the ACL token, validates
    the entry against its copy, stamps a version (its term, its hybrid logical
    clock), signs it with the CA key, applies it (which gossips it) and returns it.

On becoming leader, a server uses the state it has; else it pulls it from the other
servers; only when no server has any and no agent has seen a bundle does it create a
root (or load the operator's ``ca.cert_file``/``ca.key_file``) - a cluster never gets
a second, unrelated root by accident. The leader prunes retired roots once their last
leaf has expired, and after a rotation re-signs every policy entry with the new key
so the policy keeps verifying after the old root is dropped.

Signing runs on a one-thread executor: the CA is not thread-safe and ECDSA must not
block the event loop (DESIGN.md principle 2).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import structlog

from ca.bundle import CaState, TrustBundle
from ca.errors import CAError, RemoteProtocolError
from ca.issuer import CertificateAuthority, CsrRejected, LeafCertificate
from ca.sealing import (
    SealError,
    load_private_key,
    new_private_key,
    private_key_bytes,
    public_key_bytes,
    seal,
    unseal,
)
from ca.spiffe import SpiffeId, trust_domain_for
from meshnode.model import ValidationError
from meshnode.persistence import DataDir, DataDirError
from meshnode.policy import (
    PolicyEntry,
    PolicyStore,
    StaleTermError,
    encode_entry,
    parse_value,
    sign_entry,
    validate_against,
    validate_delete,
)
from meshnode.rpc import Address, Rpc, RpcError

log = structlog.get_logger()

CA_STATE_FILE: Final = "ca_state.bin"
SEAL_KEY_FILE: Final = "ca_seal.key"
#: Followers check their copy of the CA state this often (and at once when the
#: gossiped bundle is newer than it).
REPLICATION_INTERVAL: Final = 10.0
#: The leader tries to prune retired roots this often.
PRUNE_INTERVAL: Final = 60.0
#: How long one state request may take before the next server is asked.
STATE_REQUEST_TIMEOUT: Final = 3.0
#: How long the leader waits for a CSR's service registration to reach its catalog.
REGISTRATION_GRACE: Final = 2.0
#: At most this many CSRs wait for their registration at once; more are refused at
#: once, so requests for services that will never be registered cannot pile up.
MAX_REGISTRATION_WAITERS: Final = 32
#: Namespace of every service identity (Consul OSS has only ``default``).
NAMESPACE: Final = "default"


def _aad(trust_domain_hint: str, node: str) -> bytes:
    return b"meshnode ca state\x00" + trust_domain_hint.encode() + b"\x00" + node.encode()


@dataclass(frozen=True, slots=True)
class CaSettings:
    """What the CA service needs from the configuration."""

    node: str
    datacenter: str
    cluster: str
    leaf_ttl: timedelta
    trust_domain: str | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    acl_enabled: bool = False
    acl_token: str | None = None


class CaServer:
    """The CA and policy-signing service of one server (see the module docstring)."""

    def __init__(
        self,
        settings: CaSettings,
        *,
        rpc: Rpc,
        data_dir: DataDir,
        policy: PolicyStore,
        is_leader: Callable[[], bool],
        term: Callable[[], int],
        leader_address: Callable[[], Address | None],
        servers: Callable[[], Iterable[tuple[str, Address]]],
        is_server: Callable[[str], bool],
        registered: Callable[[str, str], bool],
        learn_record: Callable[[str, bytes], None] | None = None,
        known_bundle: Callable[[], TrustBundle | None],
        publish_bundle: Callable[[TrustBundle], None],
        now: Callable[[], datetime] | None = None,
        monotonic: Callable[[], float],
    ) -> None:
        self.settings = settings
        self._rpc = rpc
        self._data_dir = data_dir
        self._policy = policy
        self._is_leader = is_leader
        self._term = term
        self._leader_address = leader_address
        self._servers = servers
        self._is_server = is_server
        self._registered = registered
        self._learn_record = learn_record
        self._known_bundle = known_bundle
        self._publish_bundle = publish_bundle
        self._now = now or (lambda: datetime.now(UTC))
        self._monotonic = monotonic
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ca")
        self._ca: CertificateAuthority | None = None
        self._state: CaState | None = self._load_state()
        self._seal_key = self._load_seal_key()
        self._ensure_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._registration_waiters = 0
        self.stats: dict[str, int] = {
            "signed": 0,
            "refused": 0,
            "state_replicated": 0,
            "state_served": 0,
            "roots_created": 0,
            "rotations": 0,
            "policy_writes": 0,
        }
        for method, handler in (
            ("ca.sign", self._handle_sign),
            ("ca.state", self._handle_state),
            ("ca.rotate", self._handle_rotate),
            ("policy.write", self._handle_policy_write),
            ("policy.delete", self._handle_policy_delete),
        ):
            rpc.register(method, handler)

    # ------------------------------------------------------------------ state on disk

    def _load_state(self) -> CaState | None:
        data = self._data_dir.read_bytes(CA_STATE_FILE)
        if data is None:
            return None
        try:
            return CaState.from_bytes(data)
        except RemoteProtocolError as exc:
            log.error("ca_state_unreadable", file=CA_STATE_FILE, error=str(exc))
            return None

    def _load_seal_key(self) -> Any:
        raw = self._data_dir.read_bytes(SEAL_KEY_FILE)
        if raw is not None:
            with contextlib.suppress(ValueError):
                return load_private_key(raw)
        key = new_private_key()
        self._data_dir.atomic_write_bytes(SEAL_KEY_FILE, private_key_bytes(key))
        return key

    def _store(self, state: CaState) -> None:
        self._state = state
        try:
            self._data_dir.atomic_write_bytes(CA_STATE_FILE, state.to_bytes())
        except DataDirError as exc:
            log.error("ca_state_not_saved", error=str(exc))

    @property
    def state(self) -> CaState | None:
        return self._state

    @property
    def authority(self) -> CertificateAuthority | None:
        """The CA while we lead and hold state."""
        return self._ca if self._is_leader() else None

    # ------------------------------------------------------------------ lifecycle

    def leadership_changed(self) -> None:
        """Called when the election's leader claim changes: wake the loop."""
        self._wake.set()

    def bundle_seen(self, bundle: TrustBundle) -> None:
        """A gossiped bundle arrived: pull state if it is newer than our copy."""
        if self._state is None or bundle.version > self._state.version:
            self._wake.set()

    async def run(self) -> None:
        """Keep the CA state current: lead (ensure a CA, prune) or follow (replicate)."""
        last_prune = 0.0
        while True:
            try:
                if self._is_leader():
                    await self._ensure_ca()
                    now = self._monotonic()
                    if self._ca is not None and now - last_prune >= PRUNE_INTERVAL:
                        last_prune = now
                        await self._prune()
                else:
                    self._ca = None
                    await self._replicate()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ca_loop_failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REPLICATION_INTERVAL):
                    await self._wake.wait()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _in_executor(self, function: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    # ------------------------------------------------------------------ leader

    async def _ensure_ca(self) -> None:
        async with self._ensure_lock:
            if self._ca is not None:
                return
            if self._state is None:
                await self._pull_from_servers()
            state = self._state
            if state is None:
                if self._known_bundle() is not None:
                    # Somebody had a CA; creating another root would split the trust.
                    log.error(
                        "ca_state_missing",
                        hint="no server answered with the CA state; retrying",
                    )
                    return
                authority = await self._in_executor(self._new_authority)
                self.stats["roots_created"] += 1
                log.info(
                    "ca_root_created",
                    root=authority.active_root.id,
                    trust_domain=authority.trust_domain,
                    operator=authority.active_root.operator,
                )
            else:
                authority = CertificateAuthority(state)
            self._ca = authority
            self._store(authority.state)
            self._publish_bundle(authority.bundle())
            await self._resign_policy_if_needed()

    def _new_authority(self) -> CertificateAuthority:
        settings = self.settings
        # A new cluster's UUID is random: a cluster that lost every server's state
        # must not come back under the old identity.
        trust_domain = trust_domain_for(uuid.uuid4(), settings.trust_domain)
        if settings.cert_file is not None and settings.key_file is not None:
            return CertificateAuthority.load_operator_ca(
                settings.cert_file.read_bytes(),
                settings.key_file.read_bytes(),
                self._now(),
                trust_domain=trust_domain,
            )
        return CertificateAuthority.create_root(trust_domain, self._now())

    async def _prune(self) -> None:
        authority = self._ca
        if authority is None:
            return
        dropped = await self._in_executor(lambda: authority.prune(self._now()))
        if dropped:
            log.info("ca_roots_pruned", roots=list(dropped))
            self._commit(authority)

    def _commit(self, authority: CertificateAuthority) -> None:
        self._store(authority.state)
        self._publish_bundle(authority.bundle())

    def _require_leader(self) -> CertificateAuthority:
        if not self._is_leader():
            raise RpcError("not_leader", "this server is not the leader")
        if self._ca is None:
            self._wake.set()
            raise RpcError("no_ca", "the leader has no CA yet; retry shortly")
        return self._ca

    def _check_token(self, body: Any) -> None:
        settings = self.settings
        if not settings.acl_enabled:
            return
        token = body.get("token") if isinstance(body, dict) else None
        if (
            settings.acl_token is None
            or not isinstance(token, str)
            or not hmac.compare_digest(token.encode(), settings.acl_token.encode())
        ):
            raise RpcError("permission_denied", "Permission denied")

    async def _handle_sign(self, node: str, body: Any) -> Any:
        authority = self._require_leader()
        if not isinstance(body, dict):
            raise RpcError("malformed", "ca.sign body")
        service, csr = body.get("service"), body.get("csr")
        if not isinstance(service, str) or not isinstance(csr, str):
            raise RpcError("malformed", "ca.sign needs service and csr")
        record = body.get("record")
        if isinstance(record, bytes) and self._learn_record is not None:
            self._learn_record(node, record)
        td, dc = authority.trust_domain, self.settings.datacenter
        try:
            expected = (
                SpiffeId.agent(td, dc, node)
                if not service
                else SpiffeId.service(td, dc, service, NAMESPACE)
            )
        except CAError as exc:
            raise RpcError("bad_spiffe_id", str(exc)) from None
        registered = await self._wait_registered(node, service)
        ttl = self.settings.leaf_ttl

        def sign() -> LeafCertificate:
            return authority.sign_csr(
                csr, expected=expected, registered=registered, now=self._now(), ttl=ttl
            )

        try:
            leaf: LeafCertificate = await self._in_executor(sign)
        except CsrRejected as exc:
            self.stats["refused"] += 1
            log.info("csr_refused", node=node, service=service, reason=exc.reason)
            raise RpcError(exc.reason, str(exc)) from None
        self.stats["signed"] += 1
        if authority.state.version != (self._state.version if self._state else 0):
            self._store(authority.state)
        return {
            "cert": leaf.cert_pem,
            "chain": list(leaf.intermediate_pems),
            "serial": str(leaf.serial_number),
            "not_before": int(leaf.not_before.timestamp()),
            "not_after": int(leaf.not_after.timestamp()),
            "root": leaf.root_id,
        }

    async def _wait_registered(self, node: str, service: str) -> bool:
        """Whether ``service`` is registered on ``node`` in our catalog, allowing the
        registration a moment to arrive: an agent asks for a leaf as soon as a service
        is registered there, usually before gossip has brought us the news."""
        if self._registered(node, service):
            return True
        if not service or self._registration_waiters >= MAX_REGISTRATION_WAITERS:
            return False  # an agent ID needs no wait; many waiters smell of abuse
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REGISTRATION_GRACE
        self._registration_waiters += 1
        try:
            while not self._registered(node, service):
                if loop.time() >= deadline:
                    return False
                await asyncio.sleep(0.05)
        finally:
            self._registration_waiters -= 1
        return True

    async def _handle_rotate(self, node: str, body: Any) -> Any:
        self._check_token(body)
        authority = self._require_leader()
        try:
            root_id = await self._in_executor(lambda: authority.rotate_root(self._now()))
        except CAError as exc:
            raise RpcError("refused", str(exc)) from None
        self.stats["rotations"] += 1
        log.info("ca_root_rotated", root=root_id, requested_by=node)
        self._commit(authority)
        await self._resign_policy_if_needed()
        return {"root": root_id}

    # ------------------------------------------------------------------ policy

    async def _handle_policy_write(self, node: str, body: Any) -> Any:
        self._check_token(body)
        authority = self._require_leader()
        if not isinstance(body, dict):
            raise RpcError("malformed", "policy.write body")
        kind, name, value_body = body.get("kind"), body.get("name"), body.get("body")
        if not isinstance(kind, str) or not isinstance(name, str):
            raise RpcError("malformed", "policy.write needs kind and name")
        try:
            value = parse_value(kind, name, value_body)
            validate_against(value, self._policy.values())
        except ValidationError as exc:
            raise RpcError("invalid", str(exc)) from None
        try:
            entry = self._policy.prepare_write(value, self._term(), self._wall_ms())
        except StaleTermError as exc:
            raise RpcError("not_leader", str(exc)) from None
        return await self._sign_and_apply(authority, entry)

    async def _handle_policy_delete(self, node: str, body: Any) -> Any:
        self._check_token(body)
        authority = self._require_leader()
        if not isinstance(body, dict):
            raise RpcError("malformed", "policy.delete body")
        kind, name = body.get("kind"), body.get("name")
        if not isinstance(kind, str) or not isinstance(name, str):
            raise RpcError("malformed", "policy.delete needs kind and name")
        if self._policy.get(kind, name) is None:
            return {"entry": None}
        try:
            validate_delete(kind, name, self._policy.values())
        except ValidationError as exc:
            raise RpcError("invalid", str(exc)) from None
        try:
            entry = self._policy.prepare_delete(kind, name, self._term(), self._wall_ms())
        except StaleTermError as exc:
            raise RpcError("not_leader", str(exc)) from None
        return await self._sign_and_apply(authority, entry)

    async def _sign_and_apply(self, authority: CertificateAuthority, entry: PolicyEntry) -> Any:
        signed = await self._in_executor(lambda: sign_entry(entry, authority.sign_data))
        self._policy.apply(signed, self._monotonic())
        self.stats["policy_writes"] += 1
        return {"entry": encode_entry(signed)}

    async def _resign_policy_if_needed(self) -> None:
        """After a rotation (or on a new leader whose key differs), re-sign every
        entry signed by another key, so nothing depends on a root about to go."""
        authority = self._ca
        if authority is None or not self._is_leader():
            return
        key_id = authority.sign_data(b"")[1]
        stale = [e for e in self._policy.entries() if e.key_id != key_id]
        for old in stale:
            try:
                version = self._policy.next_version(self._term(), self._wall_ms())
            except StaleTermError:
                return
            fresh = (
                PolicyEntry.tombstone(old.kind, old.name, version)
                if old.deleted or old.value is None
                else PolicyEntry.for_value(old.value, version)
            )
            await self._sign_and_apply(authority, fresh)
        if stale:
            log.info("policy_resigned", entries=len(stale))

    def _wall_ms(self) -> int:
        return int(self._now().timestamp() * 1000)

    # ------------------------------------------------------------------ replication

    async def _handle_state(self, node: str, body: Any) -> Any:
        if not self._is_server(node):
            raise RpcError("not_server", "CA state is only given to servers")
        state = self._ca.state if self._ca is not None else self._state
        if state is None:
            raise RpcError("no_state", "this server has no CA state")
        if not isinstance(body, dict):
            raise RpcError("malformed", "ca.state body")
        public, have = body.get("pub"), body.get("version")
        if not isinstance(public, bytes) or not isinstance(have, int):
            raise RpcError("malformed", "ca.state needs pub and version")
        if have >= state.version:
            return {"version": state.version}
        try:
            sealed = seal(public, state.to_bytes(), _aad(self.settings.cluster, node))
        except ValueError as exc:
            raise RpcError("malformed", str(exc)) from None
        self.stats["state_served"] += 1
        return {"version": state.version, "sealed": sealed}

    async def _replicate(self) -> None:
        leader = self._leader_address()
        if leader is None:
            return
        await self._pull_from(leader)

    async def _pull_from_servers(self) -> None:
        for name, address in list(self._servers()):
            if name == self.settings.node:
                continue
            if await self._pull_from(address):
                return

    async def _pull_from(self, address: Address) -> bool:
        have = self._state.version if self._state is not None else 0
        try:
            answer = await self._rpc.call(
                address,
                "ca.state",
                {"pub": public_key_bytes(self._seal_key), "version": have},
                within=STATE_REQUEST_TIMEOUT,
            )
        except RpcError as exc:
            log.debug("ca_state_pull_failed", code=exc.code, error=exc.message)
            return False
        if not isinstance(answer, dict) or "sealed" not in answer:
            return self._state is not None
        sealed = answer["sealed"]
        if not isinstance(sealed, bytes):
            return False
        try:
            plain = unseal(self._seal_key, sealed, _aad(self.settings.cluster, self.settings.node))
            state = CaState.from_bytes(plain)
        except (SealError, RemoteProtocolError) as exc:
            log.warning("ca_state_rejected", reason=str(exc))
            return False
        if self._state is not None and state.version <= self._state.version:
            return True
        if self._state is not None and state.trust_domain != self._state.trust_domain:
            log.error("ca_state_foreign", trust_domain=state.trust_domain)
            return False
        self._store(state)
        self.stats["state_replicated"] += 1
        log.info("ca_state_replicated", version=state.version, roots=len(state.roots))
        return True


__all__ = ["CA_STATE_FILE", "CaServer", "CaSettings"]
