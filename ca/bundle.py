"""Trust bundle, replicated CA state, leaf verification and Consul's JSON shapes.

Theory of operation
-------------------
Two things leave the leader:

* :class:`CaState` - everything another *server* needs to take over as CA without
  changing the root: the root certificates, their private keys, cross-signed and
  operator intermediates, which root is active, and for each root the latest expiry
  of any leaf it signed (so a new leader prunes an old root no earlier than the old
  leader would have). Private keys are in clear here: the caller encrypts the bytes
  of :meth:`CaState.to_bytes` before they touch the wire and stores them mode 0600.
* :class:`TrustBundle` - the public part every *agent* needs: root certificates and
  the intermediates that chain leaves to them. It spreads by gossip; agents gossip
  its :meth:`~TrustBundle.fingerprint` so operators can see convergence.

During a root rotation the bundle holds both roots, and the new root's
intermediates hold the new root *cross-signed by the old one* (as Consul does in
``Roots[].IntermediateCerts``), so a peer that still trusts only the old root
accepts leaves of the new one, and a peer with the new bundle still accepts leaves
of the old one: no handshake fails while the new bundle spreads.

:func:`verify_leaf` checks a peer's certificate with ``cryptography.x509.
verification`` (an RFC 5280 / CA/B-style path builder) plus the SPIFFE X509-SVID
rules it does not know: exactly one URI SAN, a well-formed SPIFFE ID, in our trust
domain (X509-SVID §5).

Decoders are strict and bounded (sizes and counts capped, every field checked);
anything wrong raises ``RemoteProtocolError`` and nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, TypeAlias

import msgpack
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ca.errors import LocalProtocolError, RemoteProtocolError
from ca.spiffe import InvalidSpiffeId, SpiffeId, validate_trust_domain

#: Roots in one bundle: normally 1, 2 during a rotation; a few more tolerates
#: rotations in quick succession. More is garbage.
MAX_ROOTS: Final = 8
#: Certificates served between a leaf and its root: an operator's intermediate chain
#: (rarely over 2) plus one cross-signed certificate.
MAX_INTERMEDIATES_PER_ROOT: Final = 4
#: One DER certificate; ours are ~600 bytes, operator RSA-4096 ones ~2 KiB.
MAX_CERT_BYTES: Final = 16 * 1024
#: One DER private key (PKCS#8); an RSA-4096 key is ~2.4 KiB.
MAX_KEY_BYTES: Final = 8 * 1024
#: Whole encoded bundle: MAX_ROOTS * (1 + MAX_INTERMEDIATES_PER_ROOT) certs fit.
MAX_BUNDLE_BYTES: Final = 1024 * 1024
#: Whole encoded CA state: the bundle plus one key per root.
MAX_STATE_BYTES: Final = MAX_BUNDLE_BYTES + MAX_ROOTS * MAX_KEY_BYTES
#: Longest string field (trust domain, root ID) we accept from the wire.
MAX_STRING: Final = 512
#: First element of every encoded bundle/state; bump on an incompatible change.
BUNDLE_FORMAT: Final = 1
STATE_FORMAT: Final = 1

Pem: TypeAlias = str
#: Keys a CA may sign with: ours are ECDSA P-256; an operator's may also be RSA.
SigningKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

#: What cryptography raises on certificates and keys it cannot parse or use. Caught
#: only around cryptography calls on untrusted input, and translated at once.
CRYPTO_ERRORS: Final = (
    ValueError,
    TypeError,
    InvalidSignature,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


# ---------------------------------------------------------------------------- helpers


def colon_hex(data: bytes) -> str:
    """``aa:bb:cc``: how Consul prints IDs, key IDs and leaf serials (``HexString``)."""
    return ":".join(f"{b:02x}" for b in data)


def cert_id(cert: x509.Certificate) -> str:
    """Consul's root ID: SHA-256 of the DER certificate in colon hex
    (``connect.CalculateCertFingerprint``)."""
    return colon_hex(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())


@functools.lru_cache(maxsize=256)
def pem_id(pem: Pem) -> str:
    """:func:`cert_id` of a PEM certificate (cached: asked on every signature)."""
    return cert_id(load_pem_certificate(pem))


def key_id(cert: x509.Certificate) -> str:
    """The certificate's Subject Key Identifier in colon hex (Consul ``SigningKeyID``)."""
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return colon_hex(ski.digest)
    except x509.ExtensionNotFound:
        return colon_hex(x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest)


@functools.lru_cache(maxsize=256)
def load_pem_certificate(pem: Pem) -> x509.Certificate:
    """Parse one PEM certificate (cached: bundles are re-read on every verification)."""
    return x509.load_pem_x509_certificate(pem.encode("ascii"))


def certificate_pem(cert: x509.Certificate) -> Pem:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def utc(now: datetime) -> datetime:
    """``now`` as an aware UTC datetime; a naive one is our bug (we never guess zones)."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise LocalProtocolError("now must be timezone-aware (UTC)")
    return now.astimezone(UTC)


def rfc3339(moment: datetime) -> str:
    """Go's ``time.Time`` JSON form at second precision, as Consul's API returns it."""
    return utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The URI SANs of a certificate (empty if it has no SAN extension)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


# ---------------------------------------------------------------------------- bundle


@dataclass(frozen=True, slots=True)
class BundleRoot:
    """One trust anchor and what chains its leaves to it (Consul ``CARoot``)."""

    cert_pem: Pem
    """The self-signed root certificate."""
    intermediate_pems: tuple[Pem, ...] = ()
    """Served with every leaf this root's key (or intermediate) signs: an operator's
    intermediate chain (signing certificate first), then, during a rotation, this
    root cross-signed by its predecessor (Consul appends it the same way)."""
    signing_key_id: str = ""
    """Colon-hex SKI of the key that signs leaves under this root (Consul
    ``SigningKeyID``); the root's own SKI unless an operator intermediate signs."""

    @property
    def id(self) -> str:
        return pem_id(self.cert_pem)


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The public trust material of a cluster, as gossiped to every agent."""

    trust_domain: str
    roots: tuple[BundleRoot, ...]
    active_root_id: str
    """``BundleRoot.id`` of the root that signs new leaves."""
    version: int
    """Bumped by the leader on every change (rotation, pruning); newer wins in gossip."""

    @property
    def root_pems(self) -> tuple[Pem, ...]:
        return tuple(root.cert_pem for root in self.roots)

    @property
    def intermediate_pems(self) -> tuple[Pem, ...]:
        return tuple(pem for root in self.roots for pem in root.intermediate_pems)

    @property
    def active_root(self) -> BundleRoot:
        for root in self.roots:
            if root.id == self.active_root_id:
                return root
        raise LocalProtocolError("bundle has no active root")

    def fingerprint(self) -> str:
        """Hex SHA-256 over the sorted DER roots: what agents gossip so that every
        node's trust can be compared at a glance. Order-independent; DER is
        self-delimiting, so plain concatenation is unambiguous."""
        ders = sorted(
            load_pem_certificate(pem).public_bytes(serialization.Encoding.DER)
            for pem in self.root_pems
        )
        return hashlib.sha256(b"".join(ders)).hexdigest()

    def roots_pem(self) -> str:
        """All roots, concatenated: ``ssl.SSLContext.load_verify_locations(cadata=)``."""
        return "".join(self.root_pems)

    # ------------------------------------------------------------------ codec

    def encode(self) -> bytes:
        """msgpack ``[format, trust_domain, active_root_id, version, roots]``; a root is
        ``[root_der, [intermediate_der...], signing_key_id]``."""
        roots = [
            [
                _der(root.cert_pem),
                [_der(pem) for pem in root.intermediate_pems],
                root.signing_key_id,
            ]
            for root in self.roots
        ]
        packed: bytes = msgpack.packb(
            [BUNDLE_FORMAT, self.trust_domain, self.active_root_id, self.version, roots],
            use_bin_type=True,
        )
        return packed

    @classmethod
    def decode(cls, data: bytes) -> TrustBundle:
        """Parse and validate a gossiped bundle. Raises only ``RemoteProtocolError``."""
        if len(data) > MAX_BUNDLE_BYTES:
            raise RemoteProtocolError("oversize", "bundle")
        body = _unpack(data, max(MAX_ROOTS, MAX_INTERMEDIATES_PER_ROOT, 5))
        if len(body) < 5 or body[0] != BUNDLE_FORMAT:
            raise RemoteProtocolError("malformed", "bundle header")
        trust_domain = _trust_domain(body[1])
        active_root_id = _string(body[2])
        version = _int(body[3])
        roots = tuple(_bundle_root(item) for item in _array(body[4], MAX_ROOTS))
        return _checked_bundle(cls(trust_domain, roots, active_root_id, version))


def _bundle_root(item: object) -> BundleRoot:
    fields = _array(item, 3)
    if len(fields) != 3:
        raise RemoteProtocolError("malformed", "bundle root")
    root = _cert_from_der(fields[0])
    intermediates = tuple(
        _cert_from_der(der) for der in _array(fields[1], MAX_INTERMEDIATES_PER_ROOT)
    )
    return BundleRoot(
        certificate_pem(root),
        tuple(certificate_pem(cert) for cert in intermediates),
        _string(fields[2]),
    )


def _checked_bundle(bundle: TrustBundle) -> TrustBundle:
    """Roots must be distinct self-signed CAs, and the active one must be among them."""
    if not bundle.roots:
        raise RemoteProtocolError("malformed", "bundle without roots")
    ids = [root.id for root in bundle.roots]
    if len(set(ids)) != len(ids):
        raise RemoteProtocolError("malformed", "duplicate root")
    if bundle.active_root_id not in ids:
        raise RemoteProtocolError("malformed", "active root not in bundle")
    for root in bundle.roots:
        cert = load_pem_certificate(root.cert_pem)
        try:
            if not is_ca(cert):
                raise RemoteProtocolError("malformed", "root is not a CA")
            cert.verify_directly_issued_by(cert)
        except CRYPTO_ERRORS:
            raise RemoteProtocolError("malformed", "root is not self-signed") from None
    return bundle


# ---------------------------------------------------------------------------- signatures


def sign_data(key: SigningKey, payload: bytes) -> bytes:
    """The CA's signature over ``payload`` (policy entries): ECDSA with SHA-256, or
    RSA PKCS#1 v1.5 with SHA-256 for an operator's RSA key."""
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(payload, ec.ECDSA(hashes.SHA256()))


def verify_signature(bundle: TrustBundle, payload: bytes, signature: bytes, key_id: str) -> bool:
    """Whether ``signature`` over ``payload`` was made by the key of the bundle
    certificate (root or served intermediate) whose :func:`pem_id` is ``key_id``.
    Never raises for a bad signature or an unknown key: returns False."""
    for pem in _bundle_certificates(bundle):
        if pem_id(pem) != key_id:
            continue
        public_key = load_pem_certificate(pem).public_key()
        try:
            if isinstance(public_key, rsa.RSAPublicKey):
                public_key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
            elif isinstance(public_key, ec.EllipticCurvePublicKey):
                public_key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
            else:
                return False
        except (InvalidSignature, ValueError):
            return False
        return True
    return False


def _bundle_certificates(bundle: TrustBundle) -> list[Pem]:
    return [pem for root in bundle.roots for pem in (root.cert_pem, *root.intermediate_pems)]


def bundle_continues(current: TrustBundle, new: TrustBundle) -> bool:
    """Whether ``new`` may replace ``current``: same trust domain, and it keeps one of
    our roots or carries a certificate (a cross-signed root) that one of our roots
    issued. A gossiped bundle with neither is refused: a member holding only the
    gossip key must not be able to swap the cluster's trust anchors."""
    if new.trust_domain != current.trust_domain:
        return False
    ours = {root.id for root in current.roots}
    if any(root.id in ours for root in new.roots):
        return True
    trusted = [load_pem_certificate(pem) for pem in current.root_pems]
    for pem in new.intermediate_pems:
        cert = load_pem_certificate(pem)
        for anchor in trusted:
            try:
                cert.verify_directly_issued_by(anchor)
            except CRYPTO_ERRORS:
                continue
            return True
    return False


# ---------------------------------------------------------------------------- verification


class LeafRejected(RemoteProtocolError):
    """A peer's certificate is not a valid SVID of our trust domain.

    ``reason``: ``malformed``, ``expired``, ``not_yet_valid``, ``untrusted`` (no
    path to a bundle root: a foreign CA, a bad signature, a CA or non-client leaf),
    ``missing_uri_san``, ``multiple_uri_sans``, ``bad_spiffe_id`` or
    ``wrong_trust_domain``.
    """


def verify_leaf(
    leaf: Pem | bytes,
    intermediates: Iterable[Pem | bytes],
    bundle: TrustBundle,
    now: datetime,
) -> SpiffeId:
    """Verify a peer's X.509-SVID against ``bundle`` at ``now``; return its SPIFFE ID.

    ``leaf`` is PEM (possibly followed by its chain, as Consul's ``CertPEM``) or DER;
    ``intermediates`` are untrusted extra certificates (the peer's chain). The bundle's
    own intermediates (cross-signed roots) are always offered to the path builder, so
    a leaf sent without its chain still verifies.

    The path is built by ``cryptography``'s client verifier (RFC 5280 path validation:
    signatures, validity of every certificate, CA basic constraints and path lengths,
    leaf not a CA, ``clientAuth`` EKU). Then X509-SVID §5: exactly one URI SAN that
    is a SPIFFE ID of ``bundle.trust_domain``. Raises :class:`LeafRejected`.
    """
    moment = utc(now)
    chain = _load_any(leaf)
    if not chain:
        raise LeafRejected("malformed", "no certificate")
    certificate, extra = chain[0], chain[1:]
    for item in intermediates:
        extra.extend(_load_any(item))
    extra.extend(load_pem_certificate(pem) for pem in bundle.intermediate_pems)
    # Told apart before path building so that an expired leaf is counted as such,
    # not as "untrusted" (the verifier would refuse it either way).
    if moment > certificate.not_valid_after_utc:
        raise LeafRejected("expired", rfc3339(certificate.not_valid_after_utc))
    if moment < certificate.not_valid_before_utc:
        raise LeafRejected("not_yet_valid", rfc3339(certificate.not_valid_before_utc))
    store = Store([load_pem_certificate(pem) for pem in bundle.root_pems])
    verifier = PolicyBuilder().store(store).time(moment).build_client_verifier()
    try:
        verifier.verify(certificate, extra)
    except VerificationError as exc:
        raise LeafRejected("untrusted", str(exc)[:200]) from None
    except CRYPTO_ERRORS as exc:
        raise LeafRejected("malformed", type(exc).__name__) from None
    try:
        uris = uri_sans(certificate)
    except CRYPTO_ERRORS:
        raise LeafRejected("malformed", "subject alternative names") from None
    if not uris:
        raise LeafRejected("missing_uri_san")
    if len(uris) > 1:  # X509-SVID §2: "MUST contain exactly one URI SAN"
        raise LeafRejected("multiple_uri_sans")
    try:
        identity = SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise LeafRejected("bad_spiffe_id", exc.reason) from None
    if identity.trust_domain != bundle.trust_domain:
        raise LeafRejected("wrong_trust_domain", identity.trust_domain)
    return identity


def _load_any(data: Pem | bytes) -> list[x509.Certificate]:
    raw = data.encode("ascii", "replace") if isinstance(data, str) else data
    if len(raw) > MAX_CERT_BYTES * (1 + MAX_INTERMEDIATES_PER_ROOT):
        raise LeafRejected("malformed", "oversize")
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return list(x509.load_pem_x509_certificates(raw))
        return [x509.load_der_x509_certificate(raw)]
    except CRYPTO_ERRORS:
        raise LeafRejected("malformed", "not a certificate") from None


# ---------------------------------------------------------------------------- Consul JSON


def roots_json(bundle: TrustBundle) -> dict[str, object]:
    """``GET /v1/agent/connect/ca/roots`` (Consul API docs, "Connect CA: List CA Root
    Certificates"): ``{ActiveRootID, TrustDomain, Roots: [...]}``.

    ``SerialNumber`` is a uint64 in Consul's Go types; like Consul
    (``SerialNumber.Uint64()``) we report the low 64 bits of longer serials.
    """
    roots: list[dict[str, object]] = []
    for root in bundle.roots:
        cert = load_pem_certificate(root.cert_pem)
        roots.append(
            {
                "ID": root.id,
                "Name": common_name(cert),
                "SerialNumber": cert.serial_number & (2**64 - 1),
                "SigningKeyID": root.signing_key_id or key_id(cert),
                "NotBefore": rfc3339(cert.not_valid_before_utc),
                "NotAfter": rfc3339(cert.not_valid_after_utc),
                "RootCert": root.cert_pem,
                "IntermediateCerts": list(root.intermediate_pems),
                "Active": root.id == bundle.active_root_id,
            }
        )
    return {
        "ActiveRootID": bundle.active_root_id,
        "TrustDomain": bundle.trust_domain,
        "Roots": roots,
    }


def leaf_json(cert_chain_pem: Pem, private_key_pem: Pem, service: str) -> dict[str, object]:
    """``GET /v1/agent/connect/ca/leaf/:service`` (Consul API docs): ``{SerialNumber,
    CertPEM, PrivateKeyPEM, Service, ServiceURI, ValidAfter, ValidBefore}``.

    ``cert_chain_pem`` is the leaf followed by its intermediates, which is what Consul
    returns in ``CertPEM``; the key is the agent's own (it never left the node).
    ``SerialNumber`` is colon hex, as Consul's ``HexString(cert.SerialNumber.Bytes())``.
    """
    cert = x509.load_pem_x509_certificates(cert_chain_pem.encode("ascii"))[0]
    serial = cert.serial_number
    uris = uri_sans(cert)
    return {
        "SerialNumber": colon_hex(serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big")),
        "CertPEM": cert_chain_pem,
        "PrivateKeyPEM": private_key_pem,
        "Service": service,
        "ServiceURI": uris[0] if uris else "",
        "ValidAfter": rfc3339(cert.not_valid_before_utc),
        "ValidBefore": rfc3339(cert.not_valid_after_utc),
    }


# ---------------------------------------------------------------------------- CA state


@dataclass(frozen=True, slots=True)
class CaRoot:
    """One root of the CA with its private material (Consul keeps the same in Raft)."""

    cert_pem: Pem
    """The self-signed trust anchor that goes into the bundle."""
    signing_key_pem: Pem = field(repr=False)
    """PKCS#8 PEM, unencrypted: the caller encrypts state before the wire/disk."""
    chain_pems: tuple[Pem, ...] = ()
    """Operator intermediates, signing certificate first; empty when the root signs."""
    cross_signed_pem: Pem | None = None
    """This root's key certified by the previous active root (set by a rotation)."""
    active: bool = False
    max_leaf_not_after: datetime | None = None
    """Latest NotAfter of any leaf signed under this root (pruning waits for it)."""
    max_leaf_ttl: timedelta = timedelta(0)
    """Longest leaf lifetime signed under this root: a bound that survives a failover
    even if the latest ``max_leaf_not_after`` was not replicated yet."""
    retired_at: datetime | None = None
    """When a rotation made another root active (no leaf is signed under it after)."""
    operator: bool = False
    """Supplied by the operator (``ca.cert_file``) rather than created by us."""

    @property
    def id(self) -> str:
        return pem_id(self.cert_pem)

    @property
    def signing_cert_pem(self) -> Pem:
        """The certificate whose key signs leaves: the first operator intermediate, or
        the root itself."""
        return self.chain_pems[0] if self.chain_pems else self.cert_pem

    @property
    def served_intermediate_pems(self) -> tuple[Pem, ...]:
        """Certificates sent with each leaf: operator chain, then the cross-sign."""
        extra = (self.cross_signed_pem,) if self.cross_signed_pem else ()
        return self.chain_pems + extra

    def leaves_expire_by(self) -> datetime | None:
        """When the last leaf signed under this root has certainly expired; None while
        the root is active (it may still sign)."""
        if self.retired_at is None:
            return None
        bound = self.retired_at + self.max_leaf_ttl
        if self.max_leaf_not_after is not None:
            bound = max(bound, self.max_leaf_not_after)
        return bound


@dataclass(frozen=True, slots=True)
class CaState:
    """Everything a server replicates so that any leader signs under the same root."""

    trust_domain: str
    roots: tuple[CaRoot, ...]
    version: int
    """Bumped on every change; a follower keeps the highest it has seen."""

    @property
    def active_root(self) -> CaRoot:
        for root in self.roots:
            if root.active:
                return root
        raise LocalProtocolError("CA state has no active root")

    def bundle(self) -> TrustBundle:
        """The public part, for gossip and the ``connect/ca/roots`` endpoint."""
        roots = tuple(
            BundleRoot(
                root.cert_pem,
                root.served_intermediate_pems,
                key_id(load_pem_certificate(root.signing_cert_pem)),
            )
            for root in self.roots
        )
        return TrustBundle(self.trust_domain, roots, self.active_root.id, self.version)

    def to_bytes(self) -> bytes:
        """msgpack; contains private keys in clear - encrypt before sending/storing."""
        roots = [
            [
                _der(root.cert_pem),
                _key_der(root.signing_key_pem),
                [_der(pem) for pem in root.chain_pems],
                _der(root.cross_signed_pem) if root.cross_signed_pem else None,
                root.active,
                _timestamp(root.max_leaf_not_after),
                int(root.max_leaf_ttl.total_seconds()),
                _timestamp(root.retired_at),
                root.operator,
            ]
            for root in self.roots
        ]
        packed: bytes = msgpack.packb(
            [STATE_FORMAT, self.trust_domain, self.version, roots], use_bin_type=True
        )
        return packed

    @classmethod
    def from_bytes(cls, data: bytes) -> CaState:
        """Parse and validate replicated state. Raises only ``RemoteProtocolError``."""
        if len(data) > MAX_STATE_BYTES:
            raise RemoteProtocolError("oversize", "CA state")
        body = _unpack(data, max(MAX_ROOTS, MAX_INTERMEDIATES_PER_ROOT, 9))
        if len(body) < 4 or body[0] != STATE_FORMAT:
            raise RemoteProtocolError("malformed", "CA state header")
        state = cls(
            _trust_domain(body[1]),
            tuple(_ca_root(item) for item in _array(body[3], MAX_ROOTS)),
            _int(body[2]),
        )
        if sum(root.active for root in state.roots) != 1:
            raise RemoteProtocolError("malformed", "not exactly one active root")
        _checked_bundle(state.bundle())
        return state


def _ca_root(item: object) -> CaRoot:
    fields = _array(item, 9)
    if len(fields) != 9:
        raise RemoteProtocolError("malformed", "CA root")
    cert = _cert_from_der(fields[0])
    key = _key_from_der(fields[1])
    chain = tuple(_cert_from_der(der) for der in _array(fields[2], MAX_INTERMEDIATES_PER_ROOT))
    cross = None if fields[3] is None else _cert_from_der(fields[3])
    signing = chain[0] if chain else cert
    if not same_public_key(signing, key):
        raise RemoteProtocolError("malformed", "key does not match signing certificate")
    return CaRoot(
        cert_pem=certificate_pem(cert),
        signing_key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii"),
        chain_pems=tuple(certificate_pem(c) for c in chain),
        cross_signed_pem=None if cross is None else certificate_pem(cross),
        active=_bool(fields[4]),
        max_leaf_not_after=_optional_time(fields[5]),
        max_leaf_ttl=timedelta(seconds=_int(fields[6])),
        retired_at=_optional_time(fields[7]),
        operator=_bool(fields[8]),
    )


# ---------------------------------------------------------------------------- codec helpers

#: Latest timestamp we accept (year 9999): beyond it ``datetime`` overflows.
_MAX_TIMESTAMP: Final = 253_402_300_799


def _der(pem: Pem) -> bytes:
    return load_pem_certificate(pem).public_bytes(serialization.Encoding.DER)


def _key_der(pem: Pem) -> bytes:
    key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _timestamp(moment: datetime | None) -> int | None:
    # Rounded up: these are pruning bounds, and later is the safe side.
    return None if moment is None else math.ceil(utc(moment).timestamp())


def _unpack(data: bytes, max_array: int) -> list[object]:
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_array_len=max_array,
            max_map_len=0,
            max_ext_len=0,
            max_bin_len=MAX_CERT_BYTES,
            max_str_len=MAX_STRING,
            use_list=True,
        )
    except (ValueError, msgpack.UnpackException, TypeError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError("malformed", type(exc).__name__) from None
    if not isinstance(value, list):
        raise RemoteProtocolError("malformed", "not an array")
    return value


def _array(value: object, limit: int) -> list[object]:
    if type(value) is not list or len(value) > limit:
        raise RemoteProtocolError("malformed", "bad array")
    return value


def _int(value: object) -> int:
    if type(value) is not int or not 0 <= value <= 2**63 - 1:
        raise RemoteProtocolError("malformed", "bad integer")
    return value


def _bool(value: object) -> bool:
    if type(value) is not bool:
        raise RemoteProtocolError("malformed", "bad boolean")
    return value


def _string(value: object) -> str:
    if type(value) is not str or len(value) > MAX_STRING:
        raise RemoteProtocolError("malformed", "bad string")
    return value


def _trust_domain(value: object) -> str:
    try:
        return validate_trust_domain(_string(value))
    except InvalidSpiffeId:
        raise RemoteProtocolError("malformed", "bad trust domain") from None


def _optional_time(value: object) -> datetime | None:
    if value is None:
        return None
    seconds = _int(value)
    if seconds > _MAX_TIMESTAMP:
        raise RemoteProtocolError("malformed", "bad timestamp")
    return datetime.fromtimestamp(seconds, UTC)


def _cert_from_der(value: object) -> x509.Certificate:
    if type(value) is not bytes or not 0 < len(value) <= MAX_CERT_BYTES:
        raise RemoteProtocolError("malformed", "bad certificate field")
    try:
        cert = x509.load_der_x509_certificate(value)
        # Touch what we read later, so lazy parse errors surface here, translated.
        cert.extensions  # noqa: B018
        cert.not_valid_after_utc  # noqa: B018
        cert.public_key()
    except CRYPTO_ERRORS:
        raise RemoteProtocolError("malformed", "bad certificate") from None
    return cert


def _key_from_der(value: object) -> SigningKey:
    if type(value) is not bytes or not 0 < len(value) <= MAX_KEY_BYTES:
        raise RemoteProtocolError("malformed", "bad key field")
    try:
        key = serialization.load_der_private_key(value, password=None)
    except CRYPTO_ERRORS:
        raise RemoteProtocolError("malformed", "bad key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise RemoteProtocolError("malformed", "key is neither ECDSA nor RSA")
    return key


def same_public_key(cert: x509.Certificate, key: SigningKey) -> bool:
    """Whether ``key`` is the private half of ``cert``'s public key."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    try:
        return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)
    except CRYPTO_ERRORS:
        return False


def is_ca(cert: x509.Certificate) -> bool:
    """Whether ``cert`` has BasicConstraints ``ca=True``."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca


def certificates_in(pems: Sequence[Pem]) -> list[x509.Certificate]:
    """Parse PEM certificates we produced ourselves (a failure is our bug)."""
    try:
        return [load_pem_certificate(pem) for pem in pems]
    except CRYPTO_ERRORS as exc:
        raise LocalProtocolError(f"bad certificate: {type(exc).__name__}") from None
