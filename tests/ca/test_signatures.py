"""Policy signatures by the CA key, and which gossiped bundles may replace ours."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from ca.bundle import bundle_continues, verify_signature
from ca.issuer import CertificateAuthority

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
TD = "11111111-2222-3333-4444-555555555555.meshnode"


def test_signature_verifies_against_the_bundle_only() -> None:
    ca = CertificateAuthority.create_root(TD, NOW)
    signature, key_id = ca.sign_data(b"policy entry")
    bundle = ca.bundle()
    assert verify_signature(bundle, b"policy entry", signature, key_id)
    assert not verify_signature(bundle, b"policy entrY", signature, key_id)
    assert not verify_signature(bundle, b"policy entry", signature[:-1] + b"\x00", key_id)
    assert not verify_signature(bundle, b"policy entry", signature, "00:11")
    other = CertificateAuthority.create_root(TD, NOW)
    forged, forged_id = other.sign_data(b"policy entry")
    assert not verify_signature(bundle, b"policy entry", forged, forged_id)


def test_after_rotation_new_signatures_use_the_new_root_and_old_ones_still_verify() -> None:
    ca = CertificateAuthority.create_root(TD, NOW)
    old_signature, old_id = ca.sign_data(b"x")
    new_root = ca.rotate_root(NOW)
    signature, key_id = ca.sign_data(b"x")
    assert key_id == new_root != old_id
    bundle = ca.bundle()
    assert verify_signature(bundle, b"x", signature, key_id)
    assert verify_signature(bundle, b"x", old_signature, old_id)
    # Once the old root is pruned, what it signed no longer verifies: hence the
    # leader re-signs every policy entry after a rotation.
    ca.prune(NOW + timedelta(days=30))
    assert not verify_signature(ca.bundle(), b"x", old_signature, old_id)


def test_operator_rsa_ca_signatures_verify() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator root")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .sign(key, hashes.SHA256())
    )
    ca = CertificateAuthority.load_operator_ca(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        NOW,
        trust_domain=TD,
    )
    signature, key_id = ca.sign_data(b"rsa")
    assert verify_signature(ca.bundle(), b"rsa", signature, key_id)


def test_rotation_and_pruning_continue_the_trust() -> None:
    ca = CertificateAuthority.create_root(TD, NOW)
    first = ca.bundle()
    ca.rotate_root(NOW)
    rotated = ca.bundle()
    ca.prune(NOW + timedelta(days=30))
    pruned = ca.bundle()
    assert bundle_continues(first, rotated)  # keeps the old root
    assert bundle_continues(rotated, pruned)  # keeps the new root
    # An agent that slept through both steps: the new root is not in its bundle, but
    # the cross-signed certificate that vouched for it was dropped too.
    assert not bundle_continues(first, pruned)
    # A bundle carrying only the cross-signed new root continues the old trust.
    only_new = dataclasses.replace(
        rotated, roots=tuple(r for r in rotated.roots if r.id == rotated.active_root_id)
    )
    assert bundle_continues(first, only_new)


def test_unrelated_or_foreign_bundles_do_not_continue() -> None:
    ours = CertificateAuthority.create_root(TD, NOW).bundle()
    theirs = CertificateAuthority.create_root(TD, NOW).bundle()
    assert not bundle_continues(ours, dataclasses.replace(theirs, version=99))
    assert not bundle_continues(ours, dataclasses.replace(ours, trust_domain="other.meshnode"))
