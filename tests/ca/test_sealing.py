"""Sealed CA state: only the recipient opens it, and any change is detected."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ca.sealing import (
    OVERHEAD,
    SealError,
    load_private_key,
    new_private_key,
    private_key_bytes,
    public_key_bytes,
    seal,
    unseal,
)

RECIPIENT = new_private_key()


@given(plaintext=st.binary(max_size=4096), aad=st.binary(max_size=64))
def test_round_trip(plaintext: bytes, aad: bytes) -> None:
    sealed = seal(public_key_bytes(RECIPIENT), plaintext, aad)
    assert len(sealed) == len(plaintext) + OVERHEAD
    assert unseal(RECIPIENT, sealed, aad) == plaintext


def test_each_seal_differs() -> None:
    public = public_key_bytes(RECIPIENT)
    assert seal(public, b"state", b"") != seal(public, b"state", b"")


def test_another_key_cannot_open() -> None:
    sealed = seal(public_key_bytes(RECIPIENT), b"root key", b"aad")
    with pytest.raises(SealError) as caught:
        unseal(new_private_key(), sealed, b"aad")
    assert caught.value.reason == "forged"


def test_other_associated_data_is_refused() -> None:
    sealed = seal(public_key_bytes(RECIPIENT), b"root key", b"cluster-a\x00s1")
    with pytest.raises(SealError):
        unseal(RECIPIENT, sealed, b"cluster-b\x00s1")


@given(position=st.integers(min_value=0, max_value=OVERHEAD + 7))
def test_any_flipped_byte_is_detected(position: int) -> None:
    sealed = bytearray(seal(public_key_bytes(RECIPIENT), b"8 bytes!", b""))
    sealed[position] ^= 0x01
    with pytest.raises(SealError):
        unseal(RECIPIENT, bytes(sealed), b"")


@pytest.mark.parametrize("blob", [b"", b"\x01", b"\x02" + bytes(OVERHEAD), bytes(OVERHEAD - 1)])
def test_malformed_blobs(blob: bytes) -> None:
    with pytest.raises(SealError) as caught:
        unseal(RECIPIENT, blob, b"")
    assert caught.value.reason in ("malformed", "forged")


def test_private_key_survives_storage() -> None:
    restored = load_private_key(private_key_bytes(RECIPIENT))
    sealed = seal(public_key_bytes(RECIPIENT), b"x", b"")
    assert unseal(restored, sealed, b"") == b"x"
    with pytest.raises(ValueError):
        load_private_key(b"short")
    with pytest.raises(ValueError):
        seal(b"short", b"x", b"")
