"""Trust bundle: verification (cryptography and a real stdlib-ssl TLS 1.3 handshake),
fingerprint, codecs (hypothesis: garbage only raises RemoteProtocolError), and the
Consul JSON shapes."""

from __future__ import annotations

import contextlib
import dataclasses
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ca.bundle import (
    MAX_BUNDLE_BYTES,
    BundleRoot,
    CaState,
    LeafRejected,
    TrustBundle,
    colon_hex,
    leaf_json,
    load_pem_certificate,
    roots_json,
    verify_leaf,
)
from ca.errors import LocalProtocolError, RemoteProtocolError
from ca.issuer import (
    DEFAULT_LEAF_TTL,
    CertificateAuthority,
    LeafCertificate,
    generate_key,
    make_csr,
    private_key_pem,
)
from ca.spiffe import SpiffeId

TD = "0e2b3c4d-1111-4222-8333-444455556666.meshnode"
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
WEB = SpiffeId.service(TD, "dc1", "web")
DB = SpiffeId.service(TD, "dc1", "db")
HOUR = timedelta(hours=1)


def issue(
    authority: CertificateAuthority,
    identity: SpiffeId = WEB,
    now: datetime = NOW,
    ttl: timedelta = DEFAULT_LEAF_TTL,
) -> tuple[LeafCertificate, ec.EllipticCurvePrivateKey]:
    key = generate_key()
    leaf = authority.sign_csr(
        make_csr(key, identity), expected=identity, registered=True, now=now, ttl=ttl
    )
    return leaf, key


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create_root(TD, NOW - timedelta(days=1))


@pytest.fixture(scope="module")
def rotated() -> tuple[CertificateAuthority, TrustBundle]:
    """A CA that rotated its root, and the bundle from before the rotation."""
    authority = CertificateAuthority.create_root(TD, NOW - timedelta(days=1))
    before = authority.bundle()
    authority.rotate_root(NOW)
    return authority, before


# ---------------------------------------------------------------------------- verify_leaf


def test_valid_leaf_verifies_end_to_end(ca: CertificateAuthority) -> None:
    leaf, _ = issue(ca)
    bundle = ca.bundle()
    assert verify_leaf(leaf.cert_pem, [], bundle, NOW) == WEB
    der = load_pem_certificate(leaf.cert_pem).public_bytes(serialization.Encoding.DER)
    assert verify_leaf(der, [], bundle, NOW) == WEB  # what ssl's getpeercert(True) gives
    assert verify_leaf(leaf.chain_pem, [], bundle, NOW + DEFAULT_LEAF_TTL) == WEB


def test_expired_leaf_is_refused(ca: CertificateAuthority) -> None:
    leaf, _ = issue(ca, ttl=HOUR)
    with pytest.raises(LeafRejected) as caught:
        verify_leaf(leaf.cert_pem, [], ca.bundle(), NOW + HOUR + timedelta(seconds=1))
    assert caught.value.reason == "expired"
    with pytest.raises(LeafRejected) as caught:
        verify_leaf(leaf.cert_pem, [], ca.bundle(), NOW - timedelta(minutes=2))
    assert caught.value.reason == "not_yet_valid"


def test_foreign_ca_leaf_is_refused(ca: CertificateAuthority) -> None:
    foreign = CertificateAuthority.create_root(TD, NOW - HOUR)  # same trust domain, other key
    leaf, _ = issue(foreign)
    with pytest.raises(LeafRejected) as caught:
        verify_leaf(leaf.cert_pem, [], ca.bundle(), NOW)
    assert caught.value.reason == "untrusted"
    # Offering the foreign root as an "intermediate" does not make it a trust anchor.
    with pytest.raises(LeafRejected) as caught:
        verify_leaf(leaf.cert_pem, [foreign.active_root.cert_pem], ca.bundle(), NOW)
    assert caught.value.reason == "untrusted"


def test_wrong_trust_domain_is_refused(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create_root("other.meshnode", NOW - HOUR)
    identity = SpiffeId.service("other.meshnode", "dc1", "web")
    leaf, _ = issue(other, identity)
    with pytest.raises(LeafRejected) as caught:
        verify_leaf(leaf.cert_pem, [], ca.bundle(), NOW)
    assert caught.value.reason == "untrusted"
    # Even when its root is trusted (a federated bundle, a mistake): the ID decides.
    merged = dataclasses.replace(ca.bundle(), roots=ca.bundle().roots + other.bundle().roots)
    with pytest.raises(LeafRejected) as caught:
        verify_leaf(leaf.cert_pem, [], merged, NOW)
    assert caught.value.reason == "wrong_trust_domain"


def test_ca_certificate_and_tampered_leaf_are_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(LeafRejected) as caught:
        verify_leaf(ca.active_root.cert_pem, [], ca.bundle(), NOW)
    assert caught.value.reason == "untrusted"
    leaf, _ = issue(ca)
    der = bytearray(load_pem_certificate(leaf.cert_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # signature no longer matches
    with pytest.raises(LeafRejected) as caught:
        verify_leaf(bytes(der), [], ca.bundle(), NOW)
    assert caught.value.reason in {"untrusted", "malformed"}
    for garbage in (b"", b"\x30\x03\x02\x01\x01", "-----BEGIN CERTIFICATE-----\nxx\n"):
        with pytest.raises(LeafRejected) as caught:
            verify_leaf(garbage, [], ca.bundle(), NOW)
        assert caught.value.reason == "malformed"


def test_verify_needs_an_aware_now(ca: CertificateAuthority) -> None:
    leaf, _ = issue(ca)
    with pytest.raises(LocalProtocolError):
        verify_leaf(leaf.cert_pem, [], ca.bundle(), NOW.replace(tzinfo=None))


def test_rotation_through_the_bundle(rotated: tuple[CertificateAuthority, TrustBundle]) -> None:
    authority, old_bundle = rotated
    new_bundle = authority.bundle()
    new_leaf, _ = issue(authority)
    assert verify_leaf(new_leaf.chain_pem, [], old_bundle, NOW) == WEB
    assert verify_leaf(new_leaf.cert_pem, [], new_bundle, NOW) == WEB
    assert new_bundle.active_root.intermediate_pems == new_leaf.intermediate_pems


# ---------------------------------------------------------------------------- stdlib ssl


def tls_context(
    tmp_path: Path,
    name: str,
    leaf: LeafCertificate,
    key: ec.EllipticCurvePrivateKey,
    trusted: TrustBundle,
    *,
    server_side: bool,
) -> ssl.SSLContext:
    """What the proxy does: mTLS 1.3, identity from the URI SAN, not a hostname."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # the default from Python 3.13
    context.load_verify_locations(cadata=trusted.roots_pem())
    cert_file, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_file.write_text(leaf.chain_pem)  # leaf, then cross-signed/operator intermediates
    key_file.write_text(private_key_pem(key))
    key_file.chmod(0o600)
    context.load_cert_chain(cert_file, key_file)
    return context


def handshake(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A real TLS handshake over memory BIOs, then one byte each way."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(client_in, client_out, server_side=False)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    pending = [client, server]
    for _ in range(20):
        for side in list(pending):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                continue
            pending.remove(side)
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if not pending:
            break
    assert not pending, "handshake did not finish"
    client.write(b"?")
    server_in.write(client_out.read())
    assert server.read(1) == b"?"  # the server has checked the client's certificate
    server.write(b"!")
    client_in.write(server_out.read())
    assert client.read(1) == b"!"
    assert client.version() == "TLSv1.3"
    return client, server


def peer_uri(side: ssl.SSLObject) -> object:
    peer = side.getpeercert()
    assert peer is not None
    return peer["subjectAltName"]


@pytest.fixture
def live_ca() -> CertificateAuthority:
    """OpenSSL checks validity against the real clock, so these run at real now."""
    return CertificateAuthority.create_root(TD, datetime.now(UTC) - timedelta(days=30))


def test_mutual_tls_with_stdlib_ssl(tmp_path: Path, live_ca: CertificateAuthority) -> None:
    now = datetime.now(UTC)
    web, web_key = issue(live_ca, WEB, now)
    db, db_key = issue(live_ca, DB, now)
    bundle = live_ca.bundle()
    client, server = handshake(
        tls_context(tmp_path, "web", web, web_key, bundle, server_side=False),
        tls_context(tmp_path, "db", db, db_key, bundle, server_side=True),
    )
    assert peer_uri(server) == (("URI", WEB.uri),)
    assert peer_uri(client) == (("URI", DB.uri),)
    # And the proxy's second opinion on the same bytes.
    peer_der = server.getpeercert(binary_form=True)
    assert peer_der is not None and verify_leaf(peer_der, [], bundle, now) == WEB


def test_no_handshake_fails_during_rotation(tmp_path: Path, live_ca: CertificateAuthority) -> None:
    now = datetime.now(UTC)
    old_bundle = live_ca.bundle()
    old_leaf, old_key = issue(live_ca, WEB, now - HOUR)
    live_ca.rotate_root(now - timedelta(minutes=30))
    new_bundle = live_ca.bundle()
    new_leaf, new_key = issue(live_ca, DB, now)
    # Every pairing of {old leaf, new leaf} x {old bundle, new bundle} succeeds.
    for client_leaf, client_key, client_id in ((old_leaf, old_key, WEB), (new_leaf, new_key, DB)):
        for server_bundle in (old_bundle, new_bundle):
            for client_bundle in (old_bundle, new_bundle):
                _, server = handshake(
                    tls_context(
                        tmp_path, "c", client_leaf, client_key, client_bundle, server_side=False
                    ),
                    tls_context(tmp_path, "s", new_leaf, new_key, server_bundle, server_side=True),
                )
                assert peer_uri(server) == (("URI", client_id.uri),)


def test_stdlib_ssl_refuses_expired_and_foreign(
    tmp_path: Path, live_ca: CertificateAuthority
) -> None:
    now = datetime.now(UTC)
    bundle = live_ca.bundle()
    server_leaf, server_key = issue(live_ca, DB, now)
    server = tls_context(tmp_path, "s", server_leaf, server_key, bundle, server_side=True)
    expired, expired_key = issue(live_ca, WEB, now - timedelta(days=2), ttl=HOUR)
    foreign_ca = CertificateAuthority.create_root(TD, now - HOUR)
    foreign, foreign_key = issue(foreign_ca, WEB, now)
    for leaf, key, why in (
        (expired, expired_key, "certificate has expired"),
        (foreign, foreign_key, "unable to get local issuer certificate"),
    ):
        client = tls_context(tmp_path, "c", leaf, key, bundle, server_side=False)
        with pytest.raises(ssl.SSLCertVerificationError, match=why):
            handshake(client, server)


# ---------------------------------------------------------------------------- fingerprint


def test_fingerprint_covers_roots_only_and_ignores_order(
    rotated: tuple[CertificateAuthority, TrustBundle],
) -> None:
    authority, old_bundle = rotated
    bundle = authority.bundle()
    reversed_roots = dataclasses.replace(bundle, roots=bundle.roots[::-1], version=99)
    assert reversed_roots.fingerprint() == bundle.fingerprint()
    assert bundle.fingerprint() != old_bundle.fingerprint()
    assert len(bundle.fingerprint()) == 64
    assert TrustBundle.decode(bundle.encode()).fingerprint() == bundle.fingerprint()


# ---------------------------------------------------------------------------- codecs


def test_bundle_round_trip(rotated: tuple[CertificateAuthority, TrustBundle]) -> None:
    authority, old_bundle = rotated
    for bundle in (authority.bundle(), old_bundle):
        assert TrustBundle.decode(bundle.encode()) == bundle


def test_state_round_trip(rotated: tuple[CertificateAuthority, TrustBundle]) -> None:
    authority, _ = rotated
    issue(authority)
    state = authority.state
    assert CaState.from_bytes(state.to_bytes()) == state


def test_bundle_decode_checks_meaning(ca: CertificateAuthority) -> None:
    bundle = ca.bundle()
    leaf, _ = issue(ca)
    bad = [
        dataclasses.replace(bundle, active_root_id="00:11"),
        dataclasses.replace(bundle, roots=()),
        dataclasses.replace(bundle, roots=bundle.roots * 2),
        dataclasses.replace(bundle, roots=(BundleRoot(leaf.cert_pem),)),  # not a CA
    ]
    for item in bad:
        with pytest.raises(RemoteProtocolError):
            TrustBundle.decode(item.encode())
    with pytest.raises(RemoteProtocolError) as caught:
        TrustBundle.decode(b"\x00" * (MAX_BUNDLE_BYTES + 1))
    assert caught.value.reason == "oversize"


def test_state_decode_checks_keys(rotated: tuple[CertificateAuthority, TrustBundle]) -> None:
    authority, _ = rotated
    state = authority.state
    swapped = dataclasses.replace(
        state,
        roots=(
            dataclasses.replace(state.roots[0], signing_key_pem=state.roots[1].signing_key_pem),
            state.roots[1],
        ),
    )
    with pytest.raises(RemoteProtocolError):
        CaState.from_bytes(swapped.to_bytes())
    two_active = dataclasses.replace(
        state, roots=tuple(dataclasses.replace(r, active=True) for r in state.roots)
    )
    with pytest.raises(RemoteProtocolError):
        CaState.from_bytes(two_active.to_bytes())


def only_remote_errors(data: bytes) -> None:
    for decode in (TrustBundle.decode, CaState.from_bytes):
        with contextlib.suppress(RemoteProtocolError):
            decode(data)


@settings(max_examples=300)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_only_raise_remote_protocol_error(data: bytes) -> None:
    only_remote_errors(data)


MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=6),
    max_leaves=30,
)


@settings(max_examples=150)
@given(st.lists(MSGPACK_VALUES, max_size=6), st.sampled_from([0, 1, 2]))
def test_structured_garbage_only_raises_remote_protocol_error(
    fields: list[object], header: int
) -> None:
    only_remote_errors(msgpack.packb([header, *fields], use_bin_type=True))


@pytest.fixture(scope="module")
def encodings(rotated: tuple[CertificateAuthority, TrustBundle]) -> tuple[bytes, bytes]:
    authority, _ = rotated
    return authority.bundle().encode(), authority.state.to_bytes()


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_corrupted_encodings_only_raise_remote_protocol_error(
    encodings: tuple[bytes, bytes], data: st.DataObject
) -> None:
    for encoded in encodings:
        mutable = bytearray(encoded)
        for _ in range(data.draw(st.integers(1, 4))):
            index = data.draw(st.integers(0, len(mutable) - 1))
            mutable[index] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(mutable)))
        only_remote_errors(bytes(mutable[:cut] if data.draw(st.booleans()) else mutable))


# ---------------------------------------------------------------------------- Consul JSON


def test_roots_json_has_consuls_shape(rotated: tuple[CertificateAuthority, TrustBundle]) -> None:
    authority, _ = rotated
    bundle = authority.bundle()
    body = roots_json(bundle)
    assert set(body) == {"ActiveRootID", "TrustDomain", "Roots"}
    assert body["TrustDomain"] == TD and body["ActiveRootID"] == bundle.active_root_id
    roots = body["Roots"]
    assert isinstance(roots, list) and len(roots) == 2
    fields = {
        "ID",
        "Name",
        "SerialNumber",
        "SigningKeyID",
        "NotBefore",
        "NotAfter",
        "RootCert",
        "IntermediateCerts",
        "Active",
    }
    assert all(set(root) == fields for root in roots)
    active = [root for root in roots if root["Active"]]
    assert len(active) == 1 and active[0]["ID"] == bundle.active_root_id
    assert active[0]["IntermediateCerts"] == list(bundle.active_root.intermediate_pems)
    cert = load_pem_certificate(bundle.active_root.cert_pem)
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert active[0]["SigningKeyID"] == colon_hex(ski.digest)
    assert active[0]["SerialNumber"] == cert.serial_number
    assert active[0]["NotAfter"] == cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert str(active[0]["Name"]).startswith("meshnode CA ")


def test_leaf_json_has_consuls_shape(ca: CertificateAuthority) -> None:
    leaf, key = issue(ca)
    body = leaf_json(leaf.chain_pem, private_key_pem(key), "web")
    assert set(body) == {
        "SerialNumber",
        "CertPEM",
        "PrivateKeyPEM",
        "Service",
        "ServiceURI",
        "ValidAfter",
        "ValidBefore",
    }
    assert body["ServiceURI"] == WEB.uri and body["Service"] == "web"
    assert body["ValidAfter"] == "2025-03-01T11:59:00Z"
    assert body["ValidBefore"] == "2025-03-04T12:00:00Z"
    serial = str(body["SerialNumber"])
    assert int(serial.replace(":", ""), 16) == leaf.serial_number
    assert body["CertPEM"] == leaf.chain_pem
