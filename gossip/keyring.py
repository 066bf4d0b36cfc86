"""Encryption and cluster labels for every gossip packet and stream.

Theory of operation
-------------------
With a keyring, every datagram and stream message is sealed with AES-GCM
(``ENCRYPTED | nonce(12) | ciphertext | tag(16)``, 29 bytes of overhead, the layout of
memberlist's version-1 frame). The *cluster name* is the associated data: it is not
sent, but a packet sealed for another cluster fails authentication, so two clusters
that share a LAN (or even a key) never merge.

The keyring holds several keys and one primary. We encrypt with the primary only and
try every installed key to decrypt, primary first. That makes rotation safe when it is
done in three cluster-wide steps: install the new key everywhere, make it primary
everywhere, remove the old one everywhere (Consul's ``keyring -install/-use/-remove``).

Without a keyring, a non-empty cluster name is sent in clear as a label header
(``LABEL | len | name``), as memberlist's labels, and checked on receipt.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Iterable
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gossip.errors import LocalProtocolError, RemoteProtocolError

LABEL: Final = 244
"""First byte of a labelled plaintext packet (memberlist's label header code)."""
ENCRYPTED: Final = 245
"""First byte of a sealed packet. Message type bytes are all below 32."""
NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16
OVERHEAD: Final = 1 + NONCE_SIZE + TAG_SIZE
VALID_KEY_SIZES: Final = (16, 24, 32)


def generate_key() -> str:
    """A new random AES-256 key, base64 encoded (what ``meshnode keygen`` prints)."""
    return base64.b64encode(os.urandom(32)).decode()


def decode_key(text: str) -> bytes:
    """Parse a base64 key; raises ValueError saying what is wrong."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("encryption key is not valid base64") from None
    if len(key) not in VALID_KEY_SIZES:
        raise ValueError(f"encryption key must decode to 16, 24 or 32 bytes, not {len(key)}")
    return key


class Keyring:
    """The installed keys; ``primary`` encrypts, all of them decrypt."""

    def __init__(
        self,
        keys: Iterable[bytes],
        *,
        nonce_source: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._keys: list[bytes] = []
        self._ciphers: dict[bytes, AESGCM] = {}
        self._nonce = nonce_source
        for key in keys:
            self.install(key)
        if not self._keys:
            raise LocalProtocolError("a keyring needs at least one key")

    @property
    def primary(self) -> bytes:
        return self._keys[0]

    def keys(self) -> list[bytes]:
        """Installed keys, primary first."""
        return list(self._keys)

    def install(self, key: bytes) -> None:
        """Add a key for decryption (idempotent). The primary does not change."""
        if len(key) not in VALID_KEY_SIZES:
            raise LocalProtocolError("key must be 16, 24 or 32 bytes")
        if key not in self._ciphers:
            self._keys.append(key)
            self._ciphers[key] = AESGCM(key)

    def use(self, key: bytes) -> None:
        """Make an installed key the primary."""
        if key not in self._ciphers:
            raise LocalProtocolError("cannot use a key that is not installed")
        self._keys.remove(key)
        self._keys.insert(0, key)

    def remove(self, key: bytes) -> None:
        """Uninstall a key; the primary cannot be removed."""
        if key == self._keys[0]:
            raise LocalProtocolError("cannot remove the primary key")
        if key in self._ciphers:
            self._keys.remove(key)
            del self._ciphers[key]

    def encrypt(self, plaintext: bytes, associated: bytes) -> bytes:
        nonce = self._nonce(NONCE_SIZE)
        sealed = self._ciphers[self._keys[0]].encrypt(nonce, plaintext, associated)
        return bytes((ENCRYPTED,)) + nonce + sealed

    def decrypt(self, frame: bytes, associated: bytes) -> bytes:
        if len(frame) < OVERHEAD or frame[0] != ENCRYPTED:
            raise RemoteProtocolError("decrypt_failed", "short or unsealed frame")
        nonce, sealed = frame[1 : 1 + NONCE_SIZE], frame[1 + NONCE_SIZE :]
        for key in self._keys:
            try:
                return self._ciphers[key].decrypt(nonce, sealed, associated)
            except InvalidTag:
                continue
        raise RemoteProtocolError("decrypt_failed", "no installed key could decrypt")


class Envelope:
    """Seals and opens packets for one cluster, with or without a keyring.

    ``verify_incoming=False`` accepts plaintext too while a keyring is installed, and
    ``verify_outgoing=False`` still sends plaintext: the two steps of moving a running
    plaintext cluster to encryption (as memberlist's GossipVerifyIncoming/Outgoing).
    """

    def __init__(
        self,
        cluster: str = "",
        keyring: Keyring | None = None,
        *,
        verify_incoming: bool = True,
        verify_outgoing: bool = True,
    ) -> None:
        label = cluster.encode()
        if len(label) > 255:
            raise LocalProtocolError("cluster name is longer than 255 bytes")
        self.cluster = cluster
        self.keyring = keyring
        self.verify_incoming = verify_incoming
        self.verify_outgoing = verify_outgoing
        self._label = label
        self._label_header = bytes((LABEL, len(label))) + label if label else b""

    @property
    def overhead(self) -> int:
        """Bytes the envelope adds to a message."""
        if self.keyring is not None and self.verify_outgoing:
            return OVERHEAD
        return len(self._label_header)

    def seal(self, plaintext: bytes) -> bytes:
        if self.keyring is not None and self.verify_outgoing:
            return self.keyring.encrypt(plaintext, self._label)
        return self._label_header + plaintext

    def open(self, data: bytes) -> bytes:
        """The plaintext of a packet, or ``RemoteProtocolError`` naming why not."""
        if not data:
            raise RemoteProtocolError("too_short")
        if data[0] == ENCRYPTED:
            if self.keyring is None:
                raise RemoteProtocolError("unexpected_encryption")
            return self.keyring.decrypt(data, self._label)
        if self.keyring is not None and self.verify_incoming:
            raise RemoteProtocolError("unencrypted")
        if data[0] == LABEL:
            if len(data) < 2 or data[2 : 2 + data[1]] != self._label or not self._label:
                raise RemoteProtocolError("label_mismatch")
            return data[2 + data[1] :]
        if self._label:
            raise RemoteProtocolError("label_mismatch", "no label")
        return data
