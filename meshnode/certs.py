"""Trust and identity on every agent: the gossiped trust bundle and our leaf certificates.

Theory of operation
-------------------
:class:`BundleStore` holds the trust bundle this agent serves. The leader publishes a
new one on every CA change; it travels as a gossip broadcast (``B`` + the encoded
bundle) when it fits a packet and always in push-pull. A bundle replaces ours only if
its version is higher *and* it continues our trust (``ca.bundle.bundle_continues``:
it keeps one of our roots, or carries a root cross-signed by one): the first bundle is
taken on first use, after that nobody holding only the gossip key can swap the roots.
It is stored in ``data_dir`` and verifies policy signatures (``verify``).

:class:`LeafManager` keeps one leaf certificate per service registered here, plus
one for the agent itself (service ``""``). Keys are generated here and never leave
the node; the CSR goes to the leader (``request``) and the certificate comes back.
Each leaf is renewed at a random point between 40 % and 60 % of its life
(``ca.renewal.renew_at``), re-issued within a spread after a root rotation
(``reissue_at``), and kept - usable until it expires - while no leader answers;
failures are retried with capped exponential backoff. Leaves and keys are stored in
``data_dir`` (mode 0600), so a restarted agent presents them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgpack
import structlog

from ca.bundle import (
    LeafRejected,
    TrustBundle,
    bundle_continues,
    load_pem_certificate,
    same_public_key,
    verify_leaf,
    verify_signature,
)
from ca.errors import RemoteProtocolError
from ca.issuer import generate_key, make_csr, private_key_pem
from ca.renewal import reissue_at, renew_at
from ca.spiffe import SpiffeId
from gossip.broadcast import BroadcastQueue
from meshnode.connect import LocalLeaf, NoLeaderError, RequestRefusedError
from meshnode.persistence import DataDir, DataDirError

log = structlog.get_logger()

BUNDLE_TAG: Final = b"B"
BUNDLE_FILE: Final = "bundle.bin"
LEAVES_FILE: Final = "leaves.bin"
#: Largest bundle broadcast we queue; bigger ones travel by push-pull only.
BUNDLE_BROADCAST_MAX: Final = 1200
#: Retry backoff for a leaf the leader did not give us.
RETRY_INITIAL: Final = 1.0
RETRY_MAX: Final = 60.0
#: Leaves issued within this long are written to disk together.
SAVE_DELAY: Final = 0.2
#: Leaves requested at once (a node with many services, or a re-issue wave): enough
#: to hide the round trip to the leader, few enough not to flood it.
ISSUE_CONCURRENCY: Final = 8
#: Namespace of service identities (Consul OSS has only ``default``).
NAMESPACE: Final = "default"

Request = Callable[[str, str], Awaitable[dict[str, Any]]]
"""``request(service, csr_pem) -> answer`` from the leader (``CaServer._handle_sign``)."""


class BundleStore:
    """The trust bundle this agent serves (see the module docstring)."""

    def __init__(self, data_dir: DataDir, queue: BroadcastQueue) -> None:
        self._data_dir = data_dir
        self._queue = queue
        self.bundle: TrustBundle | None = None
        self._encoded = b""
        self._digest = b""
        self._fingerprint = ""
        self.index = 1
        self._listeners: list[Callable[[TrustBundle], None]] = []
        self.stats: dict[str, int] = {
            "applied": 0,
            "stale": 0,
            "discontinuous": 0,
            "malformed": 0,
        }
        data = data_dir.read_bytes(BUNDLE_FILE)
        if data is not None:
            try:
                self._set(TrustBundle.decode(data))
            except RemoteProtocolError as exc:
                log.error("bundle_unreadable", file=BUNDLE_FILE, error=str(exc))

    def on_change(self, callback: Callable[[TrustBundle], None]) -> None:
        self._listeners.append(callback)

    def _set(self, bundle: TrustBundle) -> None:
        self.bundle = bundle
        self._encoded = bundle.encode()
        self._digest = hashlib.blake2b(self._encoded, digest_size=8).digest()
        self._fingerprint = bundle.fingerprint()

    @property
    def encoded(self) -> bytes:
        return self._encoded

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 over the roots (``TrustBundle.fingerprint``); ``""`` if none."""
        return self._fingerprint

    def digest(self) -> bytes:
        return self._digest

    def apply(self, bundle: TrustBundle, *, authoritative: bool = False) -> bool:
        """Take ``bundle`` if it is newer and continues our trust (the leader's own
        bundle is ``authoritative``); True if it changed ours."""
        current = self.bundle
        if current is not None:
            if bundle.version < current.version or (
                bundle.version == current.version and bundle.encode() == self._encoded
            ):
                self.stats["stale"] += 1
                return False
            if bundle.version == current.version and not authoritative:
                self.stats["stale"] += 1  # two bundles, one version: keep ours
                return False
            if not authoritative and not bundle_continues(current, bundle):
                self.stats["discontinuous"] += 1
                log.warning(
                    "bundle_refused",
                    reason="shares no root with ours",
                    version=bundle.version,
                    trust_domain=bundle.trust_domain,
                )
                return False
        self._set(bundle)
        self.index += 1
        self.stats["applied"] += 1
        try:
            self._data_dir.atomic_write_bytes(BUNDLE_FILE, self._encoded)
        except DataDirError as exc:
            log.error("bundle_not_saved", error=str(exc))
        message = BUNDLE_TAG + self._encoded
        if len(message) <= BUNDLE_BROADCAST_MAX:
            self._queue.queue(message, "bundle")
        log.info(
            "bundle_changed",
            version=bundle.version,
            roots=len(bundle.roots),
            active=bundle.active_root_id,
            fingerprint=self._fingerprint[:16],
        )
        for listener in list(self._listeners):
            listener(bundle)
        return True

    def receive(self, data: bytes) -> bool:
        """A gossiped bundle (without the tag); malformed ones are counted."""
        try:
            bundle = TrustBundle.decode(data)
        except RemoteProtocolError:
            self.stats["malformed"] += 1
            return False
        return self.apply(bundle)

    def verify(self, payload: bytes, signature: bytes, key_id: str) -> bool:
        """``PolicyStore``'s verifier: signed by a key of our bundle."""
        bundle = self.bundle
        return bundle is not None and verify_signature(bundle, payload, signature, key_id)


def _leaf_to_wire(leaf: LocalLeaf) -> list[Any]:
    return [
        leaf.service,
        leaf.spiffe_id,
        leaf.cert_pem,
        leaf.leaf_pem,
        leaf.private_key_pem,
        str(leaf.serial_number),
        int(leaf.not_before.timestamp()),
        int(leaf.not_after.timestamp()),
        leaf.root_id,
    ]


def _leaf_from_wire(item: Any, index: int) -> LocalLeaf:
    (service, spiffe_id, cert_pem, leaf_pem, key_pem, serial, nb, na, root_id) = item
    return LocalLeaf(
        service=str(service),
        spiffe_id=str(spiffe_id),
        cert_pem=str(cert_pem),
        leaf_pem=str(leaf_pem),
        private_key_pem=str(key_pem),
        serial_number=int(serial),
        not_before=datetime.fromtimestamp(int(nb), UTC),
        not_after=datetime.fromtimestamp(int(na), UTC),
        root_id=str(root_id),
        index=index,
    )


class LeafManager:
    """This agent's leaf certificates (see the module docstring)."""

    def __init__(
        self,
        *,
        node: str,
        datacenter: str,
        data_dir: DataDir,
        bundles: BundleStore,
        request: Request,
        wanted: Callable[[], set[str]],
        spread: Callable[[], timedelta],
        rng: random.Random,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._node = node
        self._datacenter = datacenter
        self._data_dir = data_dir
        self._bundles = bundles
        self._request = request
        self._wanted = wanted
        self._spread = spread
        self._rng = rng
        self._now = now or (lambda: datetime.now(UTC))
        self._leaves: dict[str, LocalLeaf] = {}
        self._due: dict[str, datetime] = {}
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, datetime] = {}
        self._inflight: dict[str, asyncio.Future[LocalLeaf]] = {}
        self._wake = asyncio.Event()
        self._save_handle: asyncio.TimerHandle | None = None
        self.index = 1
        self._listeners: list[Callable[[int], None]] = []
        self.stats: dict[str, int] = {"issued": 0, "failed": 0, "renewed": 0, "reissued": 0}
        self._load()
        bundles.on_change(self._bundle_changed)

    # ------------------------------------------------------------------ views

    def on_change(self, callback: Callable[[int], None]) -> None:
        self._listeners.append(callback)

    def leaves(self) -> list[LocalLeaf]:
        return [self._leaves[k] for k in sorted(self._leaves)]

    def leaf(self, service: str) -> LocalLeaf | None:
        return self._leaves.get(service)

    def soonest_expiry(self) -> datetime | None:
        return min((leaf.not_after for leaf in self._leaves.values()), default=None)

    def _usable(self, leaf: LocalLeaf) -> bool:
        now = self._now()
        bundle = self._bundles.bundle
        trusted = bundle is None or any(root.id == leaf.root_id for root in bundle.roots)
        return leaf.not_before <= now < leaf.not_after and trusted

    # ------------------------------------------------------------------ disk

    def _load(self) -> None:
        data = self._data_dir.read_bytes(LEAVES_FILE)
        if data is None:
            return
        try:
            items = msgpack.unpackb(data, raw=False)
            for item in items:
                leaf = _leaf_from_wire(item, self.index)
                self._leaves[leaf.service] = leaf
                self._schedule_renewal(leaf)
        except Exception as exc:  # a corrupt file: start without leaves
            log.error("leaves_unreadable", file=LEAVES_FILE, error=str(exc))
            self._leaves.clear()
            self._due.clear()

    def _save_soon(self) -> None:
        """Batch the writes of a wave of issues (a crash before the write only costs
        re-issuing those leaves)."""
        if self._save_handle is None:
            self._save_handle = asyncio.get_running_loop().call_later(SAVE_DELAY, self._save)

    def close(self) -> None:
        """Write what is pending (at shutdown)."""
        if self._save_handle is not None:
            self._save()

    def _save(self) -> None:
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_handle = None
        data = msgpack.packb([_leaf_to_wire(leaf) for leaf in self.leaves()], use_bin_type=True)
        try:
            self._data_dir.atomic_write_bytes(LEAVES_FILE, data)
        except DataDirError as exc:
            log.error("leaves_not_saved", error=str(exc))

    # ------------------------------------------------------------------ obtaining

    def _identity(self, service: str, trust_domain: str) -> SpiffeId:
        if not service:
            return SpiffeId.agent(trust_domain, self._datacenter, self._node)
        return SpiffeId.service(trust_domain, self._datacenter, service, NAMESPACE)

    async def get(self, service: str) -> LocalLeaf:
        """The current leaf for ``service``, obtaining one if needed. ``LookupError``
        if ``service`` is not registered here; else as :meth:`issue`."""
        if service not in self._wanted():
            raise LookupError(service)
        leaf = self._leaves.get(service)
        if leaf is not None and self._usable(leaf):
            return leaf
        return await self.issue(service)

    async def issue(self, service: str) -> LocalLeaf:
        """Obtain a fresh leaf now (one request per service at a time). Raises
        :class:`NoLeaderError` or :class:`RequestRefusedError`."""
        pending = self._inflight.get(service)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[LocalLeaf] = asyncio.get_running_loop().create_future()
        self._inflight[service] = future
        try:
            leaf = await self._issue(service)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: nobody else may be waiting
            raise
        else:
            future.set_result(leaf)
            return leaf
        finally:
            self._inflight.pop(service, None)

    async def _issue(self, service: str) -> LocalLeaf:
        bundle = self._bundles.bundle
        if bundle is None:
            raise NoLeaderError("no trust bundle yet: the cluster has no CA leader")
        identity = self._identity(service, bundle.trust_domain)
        key = generate_key()
        csr = make_csr(key, identity)
        answer = await self._request(service, csr)
        try:
            cert_pem = str(answer["cert"])
            chain = [str(pem) for pem in answer.get("chain", [])]
            cert = load_pem_certificate(cert_pem)
            if not same_public_key(cert, key):
                raise RequestRefusedError("bad_answer", "certificate for another key")
            presented = verify_leaf(cert_pem, chain, self._bundles.bundle or bundle, self._now())
            if presented != identity:
                raise RequestRefusedError("bad_answer", f"certificate for {presented}")
        except (KeyError, TypeError, ValueError, LeafRejected) as exc:
            self.stats["failed"] += 1
            reason = f"leader's certificate unusable: {exc}"
            raise RequestRefusedError("bad_answer", reason) from None
        previous = self._leaves.get(service)
        self.index += 1
        leaf = LocalLeaf(
            service=service,
            spiffe_id=identity.uri,
            cert_pem=cert_pem + "".join(chain),
            leaf_pem=cert_pem,
            private_key_pem=private_key_pem(key),
            serial_number=cert.serial_number,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            root_id=str(answer.get("root", "")),
            index=self.index,
        )
        self._leaves[service] = leaf
        self._failures.pop(service, None)
        self._retry_at.pop(service, None)
        self._schedule_renewal(leaf)
        self._save_soon()
        self.stats["renewed" if previous else "issued"] += 1
        log.info(
            "leaf_issued",
            service=service or "(agent)",
            serial=format(leaf.serial_number, "x")[:16],
            not_after=leaf.not_after.isoformat(),
        )
        self._notify()
        return leaf

    def _notify(self) -> None:
        self._wake.set()
        for listener in list(self._listeners):
            listener(self.index)

    def _schedule_renewal(self, leaf: LocalLeaf) -> None:
        self._due[leaf.service] = renew_at(leaf.not_before, leaf.not_after, self._rng.random())

    def _bundle_changed(self, bundle: TrustBundle) -> None:
        now = self._now()
        spread = self._spread()
        for service, leaf in self._leaves.items():
            if leaf.root_id != bundle.active_root_id:
                due = reissue_at(now, spread, self._rng.random())
                self._due[service] = min(self._due.get(service, due), due)
        self._wake.set()

    def wake(self) -> None:
        """Local services changed: reconcile soon."""
        self._wake.set()

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Obtain missing leaves, renew due ones, drop those of gone services."""
        while True:
            self._wake.clear()
            delay = await self._reconcile()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def _is_due(self, service: str, now: datetime) -> bool:
        leaf = self._leaves.get(service)
        due = self._due.get(service)
        retry = self._retry_at.get(service)
        if retry is not None and now < retry:
            return False
        return leaf is None or due is None or now >= due or not self._usable(leaf)

    async def _obtain(self, service: str) -> None:
        """Issue or renew one leaf; on failure, schedule a retry with backoff."""
        previous = self._leaves.get(service)
        try:
            leaf = await self.issue(service)
        except (NoLeaderError, RequestRefusedError) as exc:
            failures = self._failures.get(service, 0) + 1
            self._failures[service] = failures
            backoff = min(RETRY_MAX, RETRY_INITIAL * 2 ** (failures - 1))
            backoff *= 0.5 + self._rng.random()
            self._retry_at[service] = self._now() + timedelta(seconds=backoff)
            self.stats["failed"] += 1
            log.info(
                "leaf_request_failed",
                service=service or "(agent)",
                error=str(exc),
                retry_in=round(backoff, 1),
            )
            return
        if previous is not None and previous.root_id != leaf.root_id:
            self.stats["reissued"] += 1

    async def _reconcile(self) -> float:
        wanted = self._wanted()
        gone = [service for service in self._leaves if service not in wanted]
        for service in gone:
            del self._leaves[service]
            self._due.pop(service, None)
        if gone:
            self._save()
            self._notify()
        now = self._now()
        if self._bundles.bundle is None:
            return 5.0
        due = [service for service in sorted(wanted) if self._is_due(service, now)]
        if due:
            limit = asyncio.Semaphore(ISSUE_CONCURRENCY)

            async def obtain(service: str) -> None:
                async with limit:
                    # Re-check: a request for the API may have obtained it meanwhile.
                    if self._is_due(service, self._now()):
                        await self._obtain(service)

            await asyncio.gather(*(obtain(service) for service in due))
        moments = [
            moment
            for service in wanted
            for moment in (self._due.get(service), self._retry_at.get(service))
            if moment is not None
        ]
        if any(service not in self._leaves for service in wanted) and not moments:
            return RETRY_INITIAL
        if not moments:
            return 60.0
        return max(0.05, min(60.0, (min(moments) - self._now()).total_seconds()))
