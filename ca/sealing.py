"""Sealing CA state for one recipient: X25519 + HKDF-SHA256 + AES-256-GCM. No I/O.

Why
---
The leader replicates its CA state (root private keys included) to every server
(DESIGN.md "CA and election"). Gossip encryption protects the wire only when the
cluster has a gossip key, and it protects nothing from a member that holds that key
but is not a server. So the state is sealed for one recipient: each server keeps an
X25519 key pair in its ``data_dir`` and sends its public key with every state request;
the leader seals a fresh copy for that key (an ephemeral X25519 exchange, HKDF-SHA256
to a one-time AES-256-GCM key, ECIES-style as in RFC 9180's base mode). The
associated data binds the ciphertext to its purpose and cluster, so a sealed blob
cannot be replayed as something else. Only a holder of the recipient's private key
can open it; a tampered blob fails authentication.
"""

from __future__ import annotations

import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ca.errors import RemoteProtocolError

#: Format byte: lets a later version change the construction.
SEAL_FORMAT: Final = 1
PUBLIC_KEY_SIZE: Final = 32
NONCE_SIZE: Final = 12
#: Format byte + ephemeral public key + nonce + GCM tag.
OVERHEAD: Final = 1 + PUBLIC_KEY_SIZE + NONCE_SIZE + 16
_INFO: Final = b"meshnode ca state seal v1"


class SealError(RemoteProtocolError):
    """A sealed blob could not be opened (``reason``: ``malformed`` or ``forged``)."""


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_key_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def load_private_key(raw: bytes) -> X25519PrivateKey:
    if len(raw) != PUBLIC_KEY_SIZE:
        raise ValueError("an X25519 private key is 32 bytes")
    return X25519PrivateKey.from_private_bytes(raw)


def public_key_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _aead_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    # Both public keys go into the derivation (as HPKE's kem_context does), so the
    # key is bound to this exact exchange.
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=ephemeral + recipient,
        info=_INFO,
    ).derive(shared)


def seal(recipient_public: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt ``plaintext`` so that only the holder of ``recipient_public``'s private
    key can read it. ``aad`` is authenticated, not sent: the opener must know it."""
    if len(recipient_public) != PUBLIC_KEY_SIZE:
        raise ValueError("an X25519 public key is 32 bytes")
    recipient = X25519PublicKey.from_public_bytes(recipient_public)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = public_key_bytes(ephemeral)
    key = _aead_key(ephemeral.exchange(recipient), ephemeral_public, recipient_public)
    nonce = os.urandom(NONCE_SIZE)
    ciphertext = AESGCM(key).encrypt(nonce, plaintext, aad)
    return bytes((SEAL_FORMAT,)) + ephemeral_public + nonce + ciphertext


def unseal(private_key: X25519PrivateKey, sealed: bytes, aad: bytes) -> bytes:
    """Open what :func:`seal` made for our key. Raises :class:`SealError`."""
    if len(sealed) < OVERHEAD or sealed[0] != SEAL_FORMAT:
        raise SealError("malformed", "sealed blob")
    ephemeral_public = sealed[1 : 1 + PUBLIC_KEY_SIZE]
    nonce = sealed[1 + PUBLIC_KEY_SIZE : 1 + PUBLIC_KEY_SIZE + NONCE_SIZE]
    ciphertext = sealed[1 + PUBLIC_KEY_SIZE + NONCE_SIZE :]
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
    except ValueError:  # an all-zero shared secret: a low-order point
        raise SealError("forged", "ephemeral key") from None
    key = _aead_key(shared, ephemeral_public, public_key_bytes(private_key))
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise SealError("forged", "authentication failed") from None
