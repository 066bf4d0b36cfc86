"""The certificate authority: roots, CSR signing, rotation and pruning. No I/O.

Theory of operation
-------------------
Keys are made where they are used and never leave that node: an agent calls
:func:`generate_key` and :func:`make_csr`, sends the CSR to the leader, and keeps the
key. The leader's :class:`CertificateAuthority` signs the CSR only if every check of
:meth:`~CertificateAuthority.sign_csr` passes (signature, one URI SAN, a well-formed
service or agent SPIFFE ID of our trust domain, equal to what the caller expects for
the requesting node, registered there, a P-256 key, no CA request, a sane TTL).
Only the public key and the URI are taken from the CSR; everything else in the leaf
is decided here, following SPIFFE X509-SVID §4-5:

* subject empty, so the URI SAN is the identity and is marked critical
  (RFC 5280 §4.2.1.6 requires that when the subject is empty);
* ``BasicConstraints(ca=False)`` critical, ``KeyUsage`` digitalSignature +
  keyAgreement critical (X509-SVID §4.3: leaf SVIDs MUST set digitalSignature and
  MUST NOT set keyCertSign or cRLSign), ``ExtendedKeyUsage`` serverAuth + clientAuth
  (§4.4) - every mesh endpoint is both a TLS server and a TLS client;
* SKI and AKI, so path builders match issuers by key and not only by name;
* NotBefore one minute in the past: a peer whose clock runs a little behind the
  leader's must not see a fresh certificate as "not yet valid".

The first leader of a new cluster calls :meth:`CertificateAuthority.create_root`
(ECDSA P-256, ten years, Consul-like: ``BasicConstraints`` CA critical, ``KeyUsage``
keyCertSign + cRLSign critical, SKI/AKI, URI SAN ``spiffe://<td>``) unless the
operator configured ``ca.cert_file``/``ca.key_file``
(:meth:`~CertificateAuthority.load_operator_ca`). Its :attr:`state` is replicated
to every server so a new leader keeps the same root.

Root rotation (``meshnode ca rotate``, :meth:`~CertificateAuthority.rotate_root`)
follows Consul's cross-signing scheme: a new root key and self-signed certificate,
plus the *same* key and subject certified by the old root (a cross-signed
intermediate). New leaves are signed by the new key and served with the
cross-signed certificate, so they chain to the new root for peers with the new
bundle and to the old root for peers still holding only the old one; old leaves
keep verifying because the old root stays in the bundle until
:meth:`~CertificateAuthority.prune` drops it - after the last leaf it signed has
expired. Hence our roots have ``path_length=1`` (room for that one cross-signed
intermediate below the old root) and the cross-signed certificate ``path_length=0``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.bundle import (
    CRYPTO_ERRORS,
    MAX_ROOTS,
    CaRoot,
    CaState,
    Pem,
    SigningKey,
    TrustBundle,
    cert_id,
    certificate_pem,
    is_ca,
    load_pem_certificate,
    pem_id,
    same_public_key,
    sign_data,
    uri_sans,
    utc,
)
from ca.errors import CAError, LocalProtocolError, RemoteProtocolError
from ca.spiffe import IdentityKind, InvalidSpiffeId, SpiffeId, validate_trust_domain

#: Consul's default ``leaf_cert_ttl`` (and meshnode's ``ca.leaf_ttl``).
DEFAULT_LEAF_TTL: Final = timedelta(hours=72)
#: Shortest leaf we sign: ``ca.leaf_ttl``'s lower bound in meshnode/config.py.
MIN_LEAF_TTL: Final = timedelta(minutes=1)
#: Longest leaf we sign: ``ca.leaf_ttl``'s upper bound; a year-long leaf already
#: defeats the point of short-lived certificates.
MAX_LEAF_TTL: Final = timedelta(days=365)
#: Lifetime of a root we create (Consul's built-in provider uses 10 years too).
DEFAULT_ROOT_TTL: Final = timedelta(days=3650)
#: NotBefore is backdated by this much so that peers with slightly slow clocks accept
#: a certificate the moment it is issued.
CLOCK_SKEW_BACKDATE: Final = timedelta(minutes=1)
#: An old root is pruned this long after its last leaf expired: room for peers whose
#: clocks run behind ours and still consider that leaf valid.
PRUNE_GRACE: Final = timedelta(minutes=5)
#: Largest CSR we parse: ours are ~400 bytes of PEM; more is garbage.
MAX_CSR_BYTES: Final = 8 * 1024
#: Our roots may have exactly one CA below them: the next root, cross-signed.
ROOT_PATH_LENGTH: Final = 1
#: The only curve we accept in CSRs; see ``sign_csr``.
LEAF_CURVE: Final = "secp256r1"


class CsrRejected(RemoteProtocolError):
    """The leader refuses to sign a CSR. ``reason`` is one of:

    ``malformed`` (not a PEM CSR), ``bad_signature``, ``ca_requested``, ``bad_key``,
    ``missing_uri_san``, ``multiple_uri_sans``, ``bad_spiffe_id``,
    ``wrong_trust_domain``, ``id_mismatch``, ``not_registered``,
    ``ttl_out_of_bounds``. It is sent back to the requesting agent and counted.
    """


class InvalidOperatorCa(CAError, ValueError):
    """``ca.cert_file``/``ca.key_file`` cannot be used; the message says why. The agent
    turns it into a ``ConfigError`` naming the keys."""


@dataclass(frozen=True, slots=True)
class LeafCertificate:
    """A signed X.509-SVID (Consul ``IssuedCert`` without the private key)."""

    cert_pem: Pem
    intermediate_pems: tuple[Pem, ...]
    """To present with the leaf (cross-signed root during a rotation, operator
    intermediates); peers need them to build a path to the root they trust."""
    spiffe_id: SpiffeId
    serial_number: int
    not_before: datetime
    not_after: datetime
    root_id: str
    """``BundleRoot.id`` of the root it chains to; when the bundle's active root
    changes, the agent re-issues (see ``ca.renewal``)."""

    @property
    def chain_pem(self) -> Pem:
        """Leaf then intermediates: the TLS certificate chain, and Consul's ``CertPEM``."""
        return self.cert_pem + "".join(self.intermediate_pems)


# ---------------------------------------------------------------------------- agent side


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key (made on the node that uses it; it never leaves)."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: SigningKey) -> Pem:
    """PKCS#8 PEM without encryption (for the local API / proxy; stored 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def make_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: SpiffeId) -> Pem:
    """A CSR carrying only the public key and the SPIFFE ID as a URI SAN."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id.uri)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


# ---------------------------------------------------------------------------- the CA


class CertificateAuthority:
    """The leader's CA. Build with :meth:`create_root`, :meth:`load_operator_ca` or
    from replicated state (``CertificateAuthority(state)``)."""

    def __init__(self, state: CaState) -> None:
        if sum(root.active for root in state.roots) != 1:
            raise LocalProtocolError("CA state needs exactly one active root")
        self._trust_domain = validate_trust_domain(state.trust_domain)
        self._roots: list[CaRoot] = list(state.roots)
        self._version = state.version
        self._keys: dict[str, SigningKey] = {}
        for root in self._roots:
            self._keys[root.id] = _load_signing_key(root.signing_key_pem)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def create_root(
        cls, trust_domain: str, now: datetime, ttl: timedelta = DEFAULT_ROOT_TTL
    ) -> CertificateAuthority:
        """A new CA with a self-signed ECDSA P-256 root (the first leader, once)."""
        validate_trust_domain(trust_domain)
        key = generate_key()
        cert = _self_signed_root(key, trust_domain, utc(now).replace(microsecond=0), ttl)
        root = CaRoot(certificate_pem(cert), private_key_pem(key), active=True)
        return cls(CaState(trust_domain, (root,), version=1))

    @classmethod
    def load_operator_ca(
        cls, cert_pem: Pem | bytes, key_pem: Pem | bytes, now: datetime, *, trust_domain: str
    ) -> CertificateAuthority:
        """A CA signing with the operator's root or intermediate (``ca.cert_file``).

        ``cert_pem`` is the signing certificate, then (for an intermediate) its chain
        up to and including the operator's self-signed root, which becomes the trust
        anchor in the bundle. Every certificate must be valid at ``now``, each must
        be signed by the next, the first must be a CA allowed to sign certificates,
        and ``key_pem`` must be its private key. Keys may be ECDSA (P-256/P-384) or
        RSA (2048 bits or more). Raises :class:`InvalidOperatorCa`.
        """
        validate_trust_domain(trust_domain)
        moment = utc(now)
        raw_cert = cert_pem.encode("ascii") if isinstance(cert_pem, str) else cert_pem
        raw_key = key_pem.encode("ascii") if isinstance(key_pem, str) else key_pem
        try:
            chain = x509.load_pem_x509_certificates(raw_cert)
        except CRYPTO_ERRORS:
            raise InvalidOperatorCa("ca.cert_file holds no PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(raw_key, password=None)
        except TypeError:
            raise InvalidOperatorCa("ca.key_file is encrypted; give an unencrypted key") from None
        except CRYPTO_ERRORS:
            raise InvalidOperatorCa("ca.key_file holds no PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise InvalidOperatorCa("the CA key must be ECDSA or RSA")
        if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 2048:
            raise InvalidOperatorCa("an RSA CA key must have at least 2048 bits")
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in (
            "secp256r1",
            "secp384r1",
        ):
            raise InvalidOperatorCa("an ECDSA CA key must be on P-256 or P-384")
        signing = chain[0]
        if not same_public_key(signing, key):
            raise InvalidOperatorCa("ca.key_file does not match the first certificate")
        for index, cert in enumerate(chain):
            where = "the signing certificate" if index == 0 else f"certificate #{index + 1}"
            if not is_ca(cert):
                raise InvalidOperatorCa(f"{where} is not a CA (BasicConstraints ca=true)")
            if not _may_sign_certificates(cert):
                raise InvalidOperatorCa(f"{where} lacks KeyUsage keyCertSign")
            if moment >= cert.not_valid_after_utc:
                raise InvalidOperatorCa(f"{where} expired at {cert.not_valid_after_utc}")
            if moment < cert.not_valid_before_utc:
                raise InvalidOperatorCa(f"{where} is not valid before {cert.not_valid_before_utc}")
            issuer = chain[index + 1] if index + 1 < len(chain) else cert
            try:
                cert.verify_directly_issued_by(issuer)
            except CRYPTO_ERRORS:
                raise InvalidOperatorCa(
                    f"{where} is not signed by the next certificate"
                    if index + 1 < len(chain)
                    else "the chain must end with the operator's self-signed root"
                ) from None
        if len(chain) - 1 > 4:
            raise InvalidOperatorCa("at most 4 intermediates are supported")
        root = CaRoot(
            cert_pem=certificate_pem(chain[-1]),
            signing_key_pem=private_key_pem(key),
            chain_pems=tuple(certificate_pem(cert) for cert in chain[:-1]),
            active=True,
            operator=True,
        )
        return cls(CaState(trust_domain, (root,), version=1))

    # ------------------------------------------------------------------ views

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def state(self) -> CaState:
        """A snapshot to replicate to the other servers (encrypt it first). Its
        ``version`` changes whenever the bundle or pruning bounds change; the
        per-leaf expiry horizon changes on every signature and needs no urgent
        replication, because pruning is also bounded by retirement + longest TTL."""
        return CaState(self._trust_domain, tuple(self._roots), self._version)

    def bundle(self) -> TrustBundle:
        """The public trust bundle to gossip."""
        return self.state.bundle()

    @property
    def active_root(self) -> CaRoot:
        return self._roots[self._active_index()]

    def next_prune_at(self) -> datetime | None:
        """When :meth:`prune` will next drop a root (for the caller's one timer)."""
        bounds = [
            bound + PRUNE_GRACE
            for root in self._roots
            if not root.active and (bound := root.leaves_expire_by()) is not None
        ]
        return min(bounds, default=None)

    # ------------------------------------------------------------------ signing

    def sign_csr(
        self,
        csr_pem: Pem | bytes,
        *,
        expected: SpiffeId,
        registered: bool,
        now: datetime,
        ttl: timedelta = DEFAULT_LEAF_TTL,
    ) -> LeafCertificate:
        """Sign an agent's CSR, or raise :class:`CsrRejected` saying why not.

        ``expected`` is the identity the *caller* derived from the authenticated
        request (the requesting node and the service it asks for), never from the
        CSR; ``registered`` is the caller's catalog answer to "is that service
        registered on the requesting node" (for an agent ID: "is it the requesting
        node's own"). The CSR must carry exactly that ID.

        Only P-256 keys are accepted: the mesh has one curve, matching the root
        (DESIGN.md), so every handshake costs the same and there is nothing to
        negotiate; P-384 would double signing and verification cost for no gain
        at a 72-hour lifetime.
        """
        # Whole seconds: X.509 times have no fractions, and LeafCertificate's times
        # must be exactly the certificate's.
        moment = utc(now).replace(microsecond=0)
        raw = csr_pem.encode("ascii", "replace") if isinstance(csr_pem, str) else csr_pem
        if len(raw) > MAX_CSR_BYTES:
            raise CsrRejected("malformed", "oversize")
        try:
            csr = x509.load_pem_x509_csr(raw)
            signature_ok = csr.is_signature_valid
            extensions = csr.extensions
            public_key = csr.public_key()
        except CRYPTO_ERRORS as exc:
            raise CsrRejected("malformed", type(exc).__name__) from None
        if not signature_ok:
            raise CsrRejected("bad_signature")
        try:
            constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            pass
        else:
            if constraints.ca:  # X509-SVID §4.1: leaf SVIDs MUST NOT be CAs
                raise CsrRejected("ca_requested")
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or (
            public_key.curve.name != LEAF_CURVE
        ):
            raise CsrRejected("bad_key", "only ECDSA P-256 keys are signed")
        try:
            san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if not uris:
            raise CsrRejected("missing_uri_san")
        if len(uris) > 1:  # X509-SVID §2: exactly one URI SAN
            raise CsrRejected("multiple_uri_sans")
        try:
            requested = SpiffeId.parse(uris[0])
        except InvalidSpiffeId as exc:
            raise CsrRejected("bad_spiffe_id", exc.reason) from None
        if requested.kind not in (IdentityKind.SERVICE, IdentityKind.AGENT):
            raise CsrRejected("bad_spiffe_id", "neither a service nor an agent ID")
        if requested.trust_domain != self._trust_domain:
            raise CsrRejected("wrong_trust_domain", requested.trust_domain)
        if requested != expected:
            raise CsrRejected("id_mismatch", f"{requested} is not {expected}")
        if not registered:
            raise CsrRejected("not_registered", str(requested))
        if not MIN_LEAF_TTL <= ttl <= MAX_LEAF_TTL:
            raise CsrRejected("ttl_out_of_bounds", str(ttl))
        return self._issue(public_key, requested, moment, ttl)

    def _issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        identity: SpiffeId,
        now: datetime,
        ttl: timedelta,
    ) -> LeafCertificate:
        index = self._active_index()
        root = self._roots[index]
        root_id = root.id
        signing_cert = load_pem_certificate(root.signing_cert_pem)
        # A leaf never outlives its issuer (a path through an expired CA fails).
        ca_not_after = min(
            signing_cert.not_valid_after_utc,
            load_pem_certificate(root.cert_pem).not_valid_after_utc,
        )
        if now >= ca_not_after:
            raise LocalProtocolError("the active CA certificate has expired; rotate the root")
        not_before = now - CLOCK_SKEW_BACKDATE
        not_after = min(now + ttl, ca_not_after)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))  # X509-SVID §2: the URI SAN is the identity
            .issuer_name(signing_cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
                critical=True,  # RFC 5280 §4.2.1.6: critical when the subject is empty
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_authority_key_identifier(signing_cert), critical=False)
            .sign(self._keys[root_id], hashes.SHA256())
        )
        self._record_leaf(index, not_after, ttl)
        return LeafCertificate(
            cert_pem=certificate_pem(cert),
            intermediate_pems=root.served_intermediate_pems,
            spiffe_id=identity,
            serial_number=serial,
            not_before=not_before,
            not_after=not_after,
            root_id=root_id,
        )

    def _record_leaf(self, index: int, not_after: datetime, ttl: timedelta) -> None:
        root = self._roots[index]
        # Every leaf under this root ends by (its signing time <= retirement) + ttl.
        longest = max(root.max_leaf_ttl, ttl)
        latest = (
            not_after
            if root.max_leaf_not_after is None
            else max(not_after, root.max_leaf_not_after)
        )
        if longest != root.max_leaf_ttl:
            self._version += 1  # a pruning bound changed: worth replicating promptly
        self._roots[index] = dataclasses.replace(
            root, max_leaf_not_after=latest, max_leaf_ttl=longest
        )

    def sign_data(self, payload: bytes) -> tuple[bytes, str]:
        """Sign ``payload`` (a policy entry) with the key that signs leaves; returns
        (signature, key ID): the :func:`~ca.bundle.pem_id` of the certificate in the
        bundle that verifies it (``ca.bundle.verify_signature``)."""
        root = self._roots[self._active_index()]
        return sign_data(self._keys[root.id], payload), pem_id(root.signing_cert_pem)

    # ------------------------------------------------------------------ rotation

    def rotate_root(self, now: datetime, ttl: timedelta = DEFAULT_ROOT_TTL) -> str:
        """Make a new root active, cross-signed by the current one; return its ID.

        The old root stays in the bundle (inactive) until :meth:`prune`. Agents see a
        new ``active_root_id`` in the bundle and re-issue their leaves (with jitter,
        ``ca.renewal.reissue_at``). Operator CAs are replaced by configuring new files,
        not rotated here: their key's path length may forbid the cross-signature.
        """
        moment = utc(now).replace(microsecond=0)
        index = self._active_index()
        old = self._roots[index]
        if old.operator:
            raise LocalProtocolError(
                "an operator CA is rotated by configuring a new ca.cert_file/ca.key_file"
            )
        if len(self._roots) >= MAX_ROOTS:
            raise LocalProtocolError("too many roots: prune before rotating again")
        old_cert = load_pem_certificate(old.cert_pem)
        key = generate_key()
        new_cert = _self_signed_root(key, self._trust_domain, moment, ttl)
        cross = _cross_sign(new_cert, old_cert, self._keys[old.id], moment)
        new = CaRoot(
            certificate_pem(new_cert),
            private_key_pem(key),
            cross_signed_pem=certificate_pem(cross),
            active=True,
        )
        self._roots[index] = dataclasses.replace(old, active=False, retired_at=moment)
        self._roots.append(new)
        self._keys[new.id] = key
        self._version += 1
        return new.id

    def prune(self, now: datetime) -> tuple[str, ...]:
        """Drop inactive roots whose last leaf expired (plus :data:`PRUNE_GRACE`).

        Also drops, from the remaining roots, cross-signed certificates issued by a
        dropped root: nobody trusts only that root any more. Returns the dropped IDs.
        """
        moment = utc(now)
        dropped = [
            root
            for root in self._roots
            if not root.active
            and (bound := root.leaves_expire_by()) is not None
            and moment >= bound + PRUNE_GRACE
        ]
        if not dropped:
            return ()
        dropped_certs = [load_pem_certificate(root.cert_pem) for root in dropped]
        kept: list[CaRoot] = []
        for root in self._roots:
            if root in dropped:
                continue
            if root.cross_signed_pem is not None and _issued_by_any(
                load_pem_certificate(root.cross_signed_pem), dropped_certs
            ):
                root = dataclasses.replace(root, cross_signed_pem=None)
            kept.append(root)
        self._roots = kept
        for root in dropped:
            self._keys.pop(root.id, None)
        self._version += 1
        return tuple(root.id for root in dropped)

    def _active_index(self) -> int:
        for index, root in enumerate(self._roots):
            if root.active:
                return index
        raise LocalProtocolError("CA has no active root")


# ---------------------------------------------------------------------------- builders


def _root_name(key: SigningKey) -> x509.Name:
    # Distinct names per root (like Consul's "pri-<id>.consul.ca..."), so a path
    # builder never confuses the old and the new root during a rotation.
    short = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest[:8].hex()
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshnode"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshnode CA {short}"),
        ]
    )


def _ca_extensions(
    builder: x509.CertificateBuilder, trust_domain: str, path_length: int
) -> x509.CertificateBuilder:
    return (
        builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=path_length), critical=True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            # Consul's roots carry the trust domain as a URI SAN; harmless for path
            # building and handy for humans reading the certificate.
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(SpiffeId.for_trust_domain(trust_domain).uri)]
            ),
            critical=False,
        )
    )


def _self_signed_root(
    key: ec.EllipticCurvePrivateKey, trust_domain: str, now: datetime, ttl: timedelta
) -> x509.Certificate:
    name = _root_name(key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        # Consul's API types a root's SerialNumber as uint64: keep ours in 63 bits.
        .serial_number((x509.random_serial_number() >> 96) or 1)
        .not_valid_before(now - CLOCK_SKEW_BACKDATE)
        .not_valid_after(now + ttl)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
    )
    return _ca_extensions(builder, trust_domain, ROOT_PATH_LENGTH).sign(key, hashes.SHA256())


def _cross_sign(
    new_root: x509.Certificate,
    old_root: x509.Certificate,
    old_key: SigningKey,
    now: datetime,
) -> x509.Certificate:
    """``new_root``'s subject and key, issued by ``old_root``: leaves of the new key
    chain to the old root through it. ``path_length=0``: only leaves below it."""
    trust_domain = SpiffeId.parse(uri_sans(new_root)[0]).trust_domain
    builder = (
        x509.CertificateBuilder()
        .subject_name(new_root.subject)
        .issuer_name(old_root.subject)
        .public_key(new_root.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_BACKDATE)
        .not_valid_after(min(new_root.not_valid_after_utc, old_root.not_valid_after_utc))
        .add_extension(
            new_root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value,
            critical=False,
        )
        .add_extension(_authority_key_identifier(old_root), critical=False)
    )
    return _ca_extensions(builder, trust_domain, 0).sign(old_key, hashes.SHA256())


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=True,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _may_sign_certificates(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True  # RFC 5280 §4.2.1.3: no KeyUsage extension means no restriction
    return usage.key_cert_sign


def _issued_by_any(cert: x509.Certificate, issuers: list[x509.Certificate]) -> bool:
    for issuer in issuers:
        try:
            cert.verify_directly_issued_by(issuer)
        except CRYPTO_ERRORS:
            continue
        return True
    return False


def _load_signing_key(pem: Pem) -> SigningKey:
    key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise LocalProtocolError("CA keys are ECDSA or RSA")
    return key


__all__ = [
    "CLOCK_SKEW_BACKDATE",
    "DEFAULT_LEAF_TTL",
    "DEFAULT_ROOT_TTL",
    "MAX_LEAF_TTL",
    "MIN_LEAF_TTL",
    "PRUNE_GRACE",
    "CertificateAuthority",
    "CsrRejected",
    "InvalidOperatorCa",
    "LeafCertificate",
    "cert_id",
    "generate_key",
    "make_csr",
    "private_key_pem",
]
