"""The CA: roots, CSR checks, leaf contents (SPIFFE X509-SVID), rotation, pruning,
operator CAs, replicated state, and the renewal arithmetic of ``ca.renewal``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.bundle import CaState, LeafRejected, TrustBundle, load_pem_certificate, verify_leaf
from ca.errors import LocalProtocolError, RemoteProtocolError
from ca.issuer import (
    CLOCK_SKEW_BACKDATE,
    DEFAULT_LEAF_TTL,
    DEFAULT_ROOT_TTL,
    PRUNE_GRACE,
    CertificateAuthority,
    CsrRejected,
    InvalidOperatorCa,
    LeafCertificate,
    generate_key,
    make_csr,
    private_key_pem,
)
from ca.renewal import (
    MIN_ROTATION_SPREAD,
    leaf_usable,
    needs_reissue,
    reissue_at,
    renew_at,
    rotation_spread,
    soonest_expiry,
)
from ca.spiffe import SpiffeId

TD = "0e2b3c4d-1111-4222-8333-444455556666.meshnode"
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
WEB = SpiffeId.service(TD, "dc1", "web")
HOUR = timedelta(hours=1)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create_root(TD, NOW)


@pytest.fixture(scope="module")
def agent_key() -> ec.EllipticCurvePrivateKey:
    return generate_key()


def fresh_ca() -> CertificateAuthority:
    return CertificateAuthority.create_root(TD, NOW)


def issue(
    authority: CertificateAuthority,
    now: datetime = NOW,
    identity: SpiffeId = WEB,
    ttl: timedelta = DEFAULT_LEAF_TTL,
) -> LeafCertificate:
    csr = make_csr(generate_key(), identity)
    return authority.sign_csr(csr, expected=identity, registered=True, now=now, ttl=ttl)


def ext(
    cert: x509.Certificate, kind: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(kind)


# ---------------------------------------------------------------------------- root


def test_root_is_a_consul_like_spiffe_ca(ca: CertificateAuthority) -> None:
    root = load_pem_certificate(ca.active_root.cert_pem)
    assert root.issuer == root.subject
    root.verify_directly_issued_by(root)
    key = root.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    constraints = ext(root, x509.BasicConstraints)
    assert constraints.critical and constraints.value == x509.BasicConstraints(True, 1)
    usage = ext(root, x509.KeyUsage)
    assert usage.critical
    assert isinstance(usage.value, x509.KeyUsage)
    assert usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    san = ext(root, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}"]
    ski = ext(root, x509.SubjectKeyIdentifier).value
    aki = ext(root, x509.AuthorityKeyIdentifier).value
    assert isinstance(ski, x509.SubjectKeyIdentifier)
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert aki.key_identifier == ski.digest
    assert root.not_valid_after_utc == NOW + DEFAULT_ROOT_TTL
    assert 0 < root.serial_number < 2**63  # Consul's API types it as uint64
    assert ca.trust_domain == TD


def test_naive_now_is_our_bug() -> None:
    with pytest.raises(LocalProtocolError):
        CertificateAuthority.create_root(TD, datetime(2025, 1, 1))


# ---------------------------------------------------------------------------- leaf contents


def test_leaf_is_an_x509_svid(
    ca: CertificateAuthority, agent_key: ec.EllipticCurvePrivateKey
) -> None:
    leaf = ca.sign_csr(make_csr(agent_key, WEB), expected=WEB, registered=True, now=NOW)
    cert = load_pem_certificate(leaf.cert_pem)
    assert cert.subject == x509.Name([])
    assert cert.serial_number == leaf.serial_number > 0
    assert cert.public_key() == agent_key.public_key()  # the key never left the agent
    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value == x509.BasicConstraints(False, None)
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and isinstance(usage.value, x509.KeyUsage)
    assert usage.value.digital_signature and usage.value.key_agreement
    assert not (usage.value.key_cert_sign or usage.value.crl_sign)
    eku = ext(cert, x509.ExtendedKeyUsage).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = ext(cert, x509.SubjectAlternativeName)
    assert san.critical and isinstance(san.value, x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [WEB.uri]
    assert len(list(san.value)) == 1
    root = load_pem_certificate(ca.active_root.cert_pem)
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    root_ski = ext(root, x509.SubjectKeyIdentifier).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert isinstance(root_ski, x509.SubjectKeyIdentifier)
    assert aki.key_identifier == root_ski.digest
    assert ext(cert, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        agent_key.public_key()
    )
    assert cert.not_valid_before_utc == leaf.not_before == NOW - CLOCK_SKEW_BACKDATE
    assert cert.not_valid_after_utc == leaf.not_after == NOW + DEFAULT_LEAF_TTL
    assert leaf.spiffe_id == WEB and leaf.root_id == ca.active_root.id
    assert leaf.intermediate_pems == () and leaf.chain_pem == leaf.cert_pem
    cert.verify_directly_issued_by(root)


def test_leaf_times_are_whole_seconds(ca: CertificateAuthority) -> None:
    leaf = issue(ca, now=NOW + timedelta(microseconds=700_000))
    assert leaf.not_after == NOW + DEFAULT_LEAF_TTL
    assert load_pem_certificate(leaf.cert_pem).not_valid_after_utc == leaf.not_after


def test_agent_identity_is_issued(ca: CertificateAuthority) -> None:
    agent = SpiffeId.agent(TD, "dc1", "node-1")
    leaf = issue(ca, identity=agent)
    assert verify_leaf(leaf.cert_pem, [], ca.bundle(), NOW) == agent


def test_leaf_never_outlives_its_ca() -> None:
    short = CertificateAuthority.create_root(TD, NOW, ttl=timedelta(hours=10))
    leaf = issue(short)
    root = load_pem_certificate(short.active_root.cert_pem)
    assert leaf.not_after == root.not_valid_after_utc
    with pytest.raises(LocalProtocolError):
        issue(short, now=NOW + timedelta(hours=11))


# ---------------------------------------------------------------------------- CSR checks


def csr_with(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    names: list[x509.GeneralName] | None,
    *,
    ca: bool | None = None,
) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")])
    )
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    pem = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    return pem.decode()


def tampered_csr() -> bytes:
    der = x509.load_pem_x509_csr(make_csr(generate_key(), WEB).encode()).public_bytes(
        serialization.Encoding.DER
    )
    # The last byte belongs to the ECDSA signature's s: still parses, no longer verifies.
    der = der[:-1] + bytes([der[-1] ^ 0x01])
    csr = x509.load_der_x509_csr(der)
    return csr.public_bytes(serialization.Encoding.PEM)


def uri(text: str) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(text)


CSR_CASES: list[tuple[str, object, dict[str, object]]] = [
    ("malformed", lambda: "not a CSR", {}),
    ("malformed", lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", {}),
    ("malformed", lambda: "x" * 9000, {}),
    ("bad_signature", tampered_csr, {}),
    ("ca_requested", lambda: csr_with(generate_key(), [uri(WEB.uri)], ca=True), {}),
    (
        "bad_key",
        lambda: csr_with(ec.generate_private_key(ec.SECP384R1()), [uri(WEB.uri)]),
        {},
    ),
    ("bad_key", lambda: csr_with(rsa.generate_private_key(65537, 2048), [uri(WEB.uri)]), {}),
    ("missing_uri_san", lambda: csr_with(generate_key(), None), {}),
    ("missing_uri_san", lambda: csr_with(generate_key(), [x509.DNSName("web.local")]), {}),
    (
        "multiple_uri_sans",
        lambda: csr_with(
            generate_key(), [uri(WEB.uri), uri(f"spiffe://{TD}/ns/default/dc/dc1/svc/db")]
        ),
        {},
    ),
    ("bad_spiffe_id", lambda: csr_with(generate_key(), [uri("https://example.org/web")]), {}),
    ("bad_spiffe_id", lambda: csr_with(generate_key(), [uri(f"spiffe://{TD}/web")]), {}),
    ("bad_spiffe_id", lambda: csr_with(generate_key(), [uri(f"spiffe://{TD}")]), {}),
    (
        "wrong_trust_domain",
        lambda: make_csr(generate_key(), SpiffeId.service("other.meshnode", "dc1", "web")),
        {},
    ),
    (
        "id_mismatch",
        lambda: make_csr(generate_key(), SpiffeId.service(TD, "dc1", "db")),
        {},
    ),
    ("id_mismatch", lambda: make_csr(generate_key(), SpiffeId.service(TD, "dc2", "web")), {}),
    ("not_registered", lambda: make_csr(generate_key(), WEB), {"registered": False}),
    ("ttl_out_of_bounds", lambda: make_csr(generate_key(), WEB), {"ttl": timedelta(seconds=30)}),
    ("ttl_out_of_bounds", lambda: make_csr(generate_key(), WEB), {"ttl": timedelta(days=400)}),
]


@pytest.mark.parametrize(
    ("reason", "make", "options"),
    CSR_CASES,
    ids=[f"{case[0]}-{i}" for i, case in enumerate(CSR_CASES)],
)
def test_every_csr_rejection(
    ca: CertificateAuthority, reason: str, make: object, options: dict[str, object]
) -> None:
    assert callable(make)
    csr = make()
    registered = options.get("registered", True)
    ttl = options.get("ttl", DEFAULT_LEAF_TTL)
    assert isinstance(registered, bool) and isinstance(ttl, timedelta)
    with pytest.raises(CsrRejected) as caught:
        ca.sign_csr(csr, expected=WEB, registered=registered, now=NOW, ttl=ttl)
    assert caught.value.reason == reason
    assert isinstance(caught.value, RemoteProtocolError)  # the requester's fault


def test_csr_for_a_service_not_registered_on_the_requesting_node_is_refused(
    ca: CertificateAuthority,
) -> None:
    """The issue's test: node-2 asks for ``web``, which only node-1 registered. The
    caller derives ``expected`` from the request and asks its catalog."""
    catalog = {("node-1", "web")}
    requesting_node, service = "node-2", "web"
    expected = SpiffeId.service(TD, "dc1", service)
    with pytest.raises(CsrRejected) as caught:
        ca.sign_csr(
            make_csr(generate_key(), expected),
            expected=expected,
            registered=(requesting_node, service) in catalog,
            now=NOW,
        )
    assert caught.value.reason == "not_registered"


def test_extra_csr_content_is_not_copied(ca: CertificateAuthority) -> None:
    """Only the key and the URI come from the CSR: a requested subject is dropped."""
    leaf = ca.sign_csr(
        csr_with(generate_key(), [uri(WEB.uri)], ca=False), expected=WEB, registered=True, now=NOW
    )
    assert load_pem_certificate(leaf.cert_pem).subject == x509.Name([])


# ---------------------------------------------------------------------------- rotation


def test_rotation_keeps_every_peer_verifying() -> None:
    authority = fresh_ca()
    old_bundle = authority.bundle()
    old_leaf = issue(authority)
    rotated_at = NOW + HOUR
    new_root_id = authority.rotate_root(rotated_at)
    new_bundle = authority.bundle()
    assert new_bundle.active_root_id == new_root_id != old_bundle.active_root_id
    assert len(new_bundle.roots) == 2 and new_bundle.version > old_bundle.version
    assert new_bundle.fingerprint() != old_bundle.fingerprint()
    new_leaf = issue(authority, now=rotated_at)
    assert new_leaf.root_id == new_root_id and len(new_leaf.intermediate_pems) == 1
    later = rotated_at + HOUR
    # A peer that still holds only the old root: the cross-signed intermediate.
    assert verify_leaf(new_leaf.cert_pem, new_leaf.intermediate_pems, old_bundle, later) == WEB
    with pytest.raises(LeafRejected):
        verify_leaf(new_leaf.cert_pem, [], old_bundle, later)  # without it: no path
    # A peer with the new bundle: new and old leaves alike.
    assert verify_leaf(new_leaf.cert_pem, [], new_bundle, later) == WEB
    assert verify_leaf(old_leaf.cert_pem, [], new_bundle, later) == WEB
    # The cross-signed certificate is the new key certified by the old root.
    cross = load_pem_certificate(new_leaf.intermediate_pems[0])
    new_root = load_pem_certificate(authority.active_root.cert_pem)
    old_root = load_pem_certificate(old_bundle.roots[0].cert_pem)
    assert cross.public_key() == new_root.public_key() and cross.subject == new_root.subject
    cross.verify_directly_issued_by(old_root)
    assert ext(cross, x509.BasicConstraints).value == x509.BasicConstraints(True, 0)


def test_prune_waits_for_the_last_leaf_of_the_old_root() -> None:
    authority = fresh_ca()
    old_root_id = authority.active_root.id
    last_old_leaf = issue(authority, now=NOW + 2 * HOUR)
    rotated_at = NOW + 3 * HOUR
    authority.rotate_root(rotated_at)
    new_leaf = issue(authority, now=rotated_at)
    # Bound: retirement + longest TTL signed under the old root (>= its last leaf).
    expected = rotated_at + DEFAULT_LEAF_TTL + PRUNE_GRACE
    assert expected > last_old_leaf.not_after
    assert authority.next_prune_at() == expected
    before = expected - timedelta(seconds=1)
    assert authority.prune(before) == ()
    assert (
        verify_leaf(last_old_leaf.cert_pem, [], authority.bundle(), last_old_leaf.not_after) == WEB
    )
    version = authority.state.version
    assert authority.prune(expected) == (old_root_id,)
    bundle = authority.bundle()
    assert [root.id for root in bundle.roots] == [bundle.active_root_id]
    assert bundle.intermediate_pems == ()  # the cross-sign went with its issuer
    assert authority.state.version > version and authority.next_prune_at() is None
    assert (
        verify_leaf(new_leaf.cert_pem, new_leaf.intermediate_pems, bundle, new_leaf.not_after)
        == WEB
    )
    assert issue(authority, now=expected).intermediate_pems == ()


def test_prune_bound_uses_the_latest_leaf_when_it_is_later() -> None:
    authority = fresh_ca()
    issue(authority, ttl=timedelta(hours=100))
    issue(authority, now=NOW + HOUR)  # shorter TTL afterwards
    authority.rotate_root(NOW + 2 * HOUR)
    assert authority.next_prune_at() == NOW + 2 * HOUR + timedelta(hours=100) + PRUNE_GRACE


def test_active_root_is_never_pruned() -> None:
    authority = fresh_ca()
    issue(authority)
    assert authority.prune(NOW + timedelta(days=3000)) == ()


# ---------------------------------------------------------------------------- replication


def test_a_new_leader_keeps_the_same_root_and_prune_bounds() -> None:
    authority = fresh_ca()
    issue(authority)
    authority.rotate_root(NOW + HOUR)
    replicated = CaState.from_bytes(authority.state.to_bytes())
    assert replicated == authority.state
    successor = CertificateAuthority(replicated)
    assert successor.bundle() == authority.bundle()
    assert successor.next_prune_at() == authority.next_prune_at()
    leaf = issue(successor, now=NOW + 2 * HOUR)
    assert leaf.root_id == authority.active_root.id
    assert verify_leaf(leaf.cert_pem, [], authority.bundle(), NOW + 2 * HOUR) == WEB


def test_state_does_not_show_private_keys() -> None:
    state = fresh_ca().state
    assert "PRIVATE KEY" not in repr(state)
    assert "PRIVATE KEY" in state.roots[0].signing_key_pem


def test_state_needs_one_active_root() -> None:
    state = fresh_ca().state
    import dataclasses

    idle = dataclasses.replace(state, roots=(dataclasses.replace(state.roots[0], active=False),))
    with pytest.raises(LocalProtocolError):
        CertificateAuthority(idle)


# ---------------------------------------------------------------------------- operator CA


def make_ca_cert(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey] | None = None,
    *,
    path_length: int | None = None,
    ca: bool = True,
    not_before: datetime = NOW - timedelta(days=1),
    not_after: datetime = NOW + timedelta(days=365),
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signer = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    issuer_key = signer.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), False)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, ca, ca, False, False), critical=True
        )
        .sign(signer, hashes.SHA256())
    )


def pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def test_operator_root_signs_leaves() -> None:
    key = rsa.generate_private_key(65537, 2048)
    root = make_ca_cert(key, "Operator Root")
    authority = CertificateAuthority.load_operator_ca(
        pem(root), private_key_pem(key), NOW, trust_domain=TD
    )
    leaf = issue(authority)
    assert load_pem_certificate(leaf.cert_pem).issuer == root.subject
    assert verify_leaf(leaf.cert_pem, [], authority.bundle(), NOW) == WEB
    with pytest.raises(LocalProtocolError):
        authority.rotate_root(NOW)


def test_operator_intermediate_chains_to_the_operators_root() -> None:
    root_key, inter_key = generate_key(), generate_key()
    root = make_ca_cert(root_key, "Operator Root", path_length=1)
    inter = make_ca_cert(inter_key, "Mesh Intermediate", (root, root_key), path_length=0)
    authority = CertificateAuthority.load_operator_ca(
        pem(inter, root), private_key_pem(inter_key), NOW, trust_domain=TD
    )
    bundle = authority.bundle()
    assert bundle.root_pems == (pem(root),)
    assert bundle.roots[0].intermediate_pems == (pem(inter),)
    leaf = issue(authority)
    assert leaf.intermediate_pems == (pem(inter),)
    assert load_pem_certificate(leaf.cert_pem).issuer == inter.subject
    assert verify_leaf(leaf.chain_pem, [], bundle, NOW) == WEB
    only_root = TrustBundle(TD, (bundle.roots[0].__class__(pem(root)),), bundle.active_root_id, 1)
    assert verify_leaf(leaf.cert_pem, leaf.intermediate_pems, only_root, NOW) == WEB
    with pytest.raises(LeafRejected):
        verify_leaf(leaf.cert_pem, [], only_root, NOW)


def test_operator_ca_is_validated() -> None:
    root_key, inter_key, other = generate_key(), generate_key(), generate_key()
    root = make_ca_cert(root_key, "Operator Root", path_length=1)
    inter = make_ca_cert(inter_key, "Mesh Intermediate", (root, root_key), path_length=0)
    expired = make_ca_cert(root_key, "Old", not_after=NOW - HOUR)
    future = make_ca_cert(root_key, "Future", not_before=NOW + HOUR)
    not_ca = make_ca_cert(root_key, "Leafish", ca=False)
    encrypted = root_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    small_rsa = rsa.generate_private_key(65537, 1024)
    cases: list[tuple[str | bytes, str | bytes, str]] = [
        ("garbage", private_key_pem(root_key), "no PEM certificate"),
        (pem(root), "garbage", "no PEM private key"),
        (pem(root), encrypted, "encrypted"),
        (pem(root), private_key_pem(other), "does not match"),
        (pem(expired), private_key_pem(root_key), "expired"),
        (pem(future), private_key_pem(root_key), "not valid before"),
        (pem(not_ca), private_key_pem(root_key), "not a CA"),
        (pem(inter), private_key_pem(inter_key), "must end with the operator's self-signed root"),
        (pem(inter, make_ca_cert(other, "Stranger")), private_key_pem(inter_key), "not signed by"),
        (pem(make_ca_cert(small_rsa, "Weak")), private_key_pem(small_rsa), "2048"),
    ]
    for cert_pem, key_pem, message in cases:
        with pytest.raises(InvalidOperatorCa, match=message):
            CertificateAuthority.load_operator_ca(cert_pem, key_pem, NOW, trust_domain=TD)


# ---------------------------------------------------------------------------- renewal


def test_renewal_happens_around_half_life_with_jitter() -> None:
    start, end = NOW, NOW + DEFAULT_LEAF_TTL
    assert renew_at(start, end, 0.0) == start + timedelta(hours=72 * 0.4)
    assert renew_at(start, end, 0.5) == start + timedelta(hours=36)
    assert renew_at(start, end, 1.0) == start + timedelta(hours=72 * 0.6)
    for bad in (-0.1, 1.1):
        with pytest.raises(LocalProtocolError):
            renew_at(start, end, bad)
    with pytest.raises(LocalProtocolError):
        renew_at(end, start, 0.5)


def test_a_leaf_stays_usable_until_it_expires(ca: CertificateAuthority) -> None:
    leaf = issue(ca)
    cert = load_pem_certificate(leaf.cert_pem)
    for item in (leaf, cert):
        assert leaf_usable(item, NOW)
        assert leaf_usable(item, leaf.not_after - timedelta(seconds=1))  # no leader needed
        assert leaf_usable(item, leaf.not_after)  # RFC 5280 §4.1.2.5: inclusive
        assert not leaf_usable(item, leaf.not_after + timedelta(seconds=1))
        assert not leaf_usable(item, leaf.not_before - timedelta(seconds=1))
    assert soonest_expiry([leaf, issue(ca, ttl=HOUR)]) == NOW + HOUR
    assert soonest_expiry([]) is None


def test_reissue_after_rotation_is_spread() -> None:
    authority = fresh_ca()
    leaf = issue(authority)
    assert not needs_reissue(leaf, authority.bundle())
    authority.rotate_root(NOW)
    assert needs_reissue(leaf, authority.bundle())
    assert rotation_spread(10, 1000.0) == MIN_ROTATION_SPREAD
    assert rotation_spread(100_000, 1000.0) == timedelta(seconds=200)
    assert reissue_at(NOW, timedelta(seconds=20), 0.25) == NOW + timedelta(seconds=5)
    with pytest.raises(LocalProtocolError):
        rotation_spread(1, 0.0)
