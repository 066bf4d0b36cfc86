"""Keyring and Envelope: AES-GCM sealing, cluster labels, rotation and migration."""

from __future__ import annotations

import base64
import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.errors import LocalProtocolError, RemoteProtocolError
from gossip.keyring import (
    ENCRYPTED,
    LABEL,
    OVERHEAD,
    Envelope,
    Keyring,
    decode_key,
    generate_key,
)

OLD = bytes(range(32))
NEW = bytes(range(100, 132))
OTHER = bytes(range(200, 216))  # AES-128


def counter_nonces() -> Callable[[int], bytes]:
    """A deterministic nonce source (never repeats within one keyring)."""
    counter = itertools.count(1)
    return lambda size: next(counter).to_bytes(size, "big")


def keyring(*keys: bytes) -> Keyring:
    return Keyring(keys, nonce_source=counter_nonces())


def open_reason(envelope: Envelope, data: bytes) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        envelope.open(data)
    return info.value.reason


# ---------------------------------------------------------------------------- round trips


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    plaintext=st.binary(max_size=1500),
    cluster=st.text(max_size=40).filter(lambda c: len(c.encode()) <= 255),
    key_size=st.sampled_from([16, 24, 32]),
)
def test_sealed_round_trip(plaintext: bytes, cluster: str, key_size: int) -> None:
    key = bytes(range(key_size))
    sender = Envelope(cluster, keyring(key))
    receiver = Envelope(cluster, keyring(key))
    sealed = sender.seal(plaintext)
    assert sealed[0] == ENCRYPTED
    assert len(sealed) == len(plaintext) + OVERHEAD == len(plaintext) + sender.overhead
    if len(plaintext) >= 16:
        assert plaintext not in sealed  # it really is encrypted
    assert receiver.open(sealed) == plaintext


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    plaintext=st.binary(min_size=1, max_size=600).filter(lambda p: p[0] < 32),
    cluster=st.text(max_size=40).filter(lambda c: len(c.encode()) <= 255),
)
def test_plaintext_round_trip(plaintext: bytes, cluster: str) -> None:
    envelope = Envelope(cluster)
    sealed = envelope.seal(plaintext)
    assert len(sealed) == len(plaintext) + envelope.overhead
    if cluster:
        assert sealed[0] == LABEL
        assert sealed[2:].startswith(cluster.encode())
    else:
        assert sealed == plaintext
    assert Envelope(cluster).open(sealed) == plaintext


def test_nonces_come_from_the_source_and_differ() -> None:
    envelope = Envelope("c", Keyring([OLD]))  # the real os.urandom source
    first, second = envelope.seal(b"same"), envelope.seal(b"same")
    assert first != second
    counted = Envelope("c", keyring(OLD))
    assert counted.seal(b"x")[1:13] == (1).to_bytes(12, "big")


# ---------------------------------------------------------------------------- refusals


def test_wrong_key_fails_to_decrypt() -> None:
    sealed = Envelope("c", keyring(OLD)).seal(b"hello")
    assert open_reason(Envelope("c", keyring(NEW)), sealed) == "decrypt_failed"


def test_wrong_cluster_fails_to_decrypt_even_with_the_same_key() -> None:
    sealed = Envelope("prod", keyring(OLD)).seal(b"hello")
    assert open_reason(Envelope("staging", keyring(OLD)), sealed) == "decrypt_failed"
    assert open_reason(Envelope("", keyring(OLD)), sealed) == "decrypt_failed"


@pytest.mark.parametrize("position", [0, 1, 12, 13, -1])
def test_tampered_frame_fails_to_decrypt(position: int) -> None:
    envelope = Envelope("c", keyring(OLD))
    sealed = bytearray(envelope.seal(b"payload bytes"))
    sealed[position] ^= 0x01
    assert open_reason(Envelope("c", keyring(OLD)), bytes(sealed)) in {
        "decrypt_failed",
        "unencrypted",
    }


def test_short_frame_is_refused() -> None:
    envelope = Envelope("c", keyring(OLD))
    sealed = envelope.seal(b"")
    assert len(sealed) == OVERHEAD
    assert envelope.open(sealed) == b""
    assert open_reason(envelope, sealed[:-1]) == "decrypt_failed"
    assert open_reason(envelope, b"") == "too_short"


def test_plaintext_is_refused_when_encryption_is_required() -> None:
    receiver = Envelope("c", keyring(OLD))
    assert open_reason(receiver, Envelope("c").seal(b"\x02hi")) == "unencrypted"
    assert open_reason(receiver, b"\x02hi") == "unencrypted"


def test_sealed_packet_without_a_keyring_is_refused() -> None:
    sealed = Envelope("c", keyring(OLD)).seal(b"x")
    assert open_reason(Envelope("c"), sealed) == "unexpected_encryption"


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.binary(max_size=100))
def test_open_only_raises_remote_errors(data: bytes) -> None:
    for envelope in (
        Envelope(),
        Envelope("c"),
        Envelope("c", keyring(OLD)),
        Envelope("c", keyring(OLD), verify_incoming=False),
    ):
        try:
            envelope.open(data)
        except RemoteProtocolError as exc:
            assert exc.reason


# ---------------------------------------------------------------------------- labels


def test_label_mismatch_is_refused() -> None:
    assert open_reason(Envelope("b"), Envelope("a").seal(b"\x02x")) == "label_mismatch"
    # A labelled packet reaching an unlabelled member, and the other way round.
    assert open_reason(Envelope(""), Envelope("a").seal(b"\x02x")) == "label_mismatch"
    assert open_reason(Envelope("a"), Envelope("").seal(b"\x02x")) == "label_mismatch"
    # A label that is a prefix of ours is not ours.
    assert open_reason(Envelope("abc"), Envelope("ab").seal(b"\x02x")) == "label_mismatch"


def test_truncated_label_header_is_refused() -> None:
    envelope = Envelope("cluster")
    assert open_reason(envelope, bytes([LABEL])) == "label_mismatch"
    assert open_reason(envelope, bytes([LABEL, 7]) + b"clus") == "label_mismatch"


def test_cluster_name_longer_than_255_bytes_is_refused() -> None:
    Envelope("x" * 255)
    with pytest.raises(LocalProtocolError):
        Envelope("x" * 256)
    with pytest.raises(LocalProtocolError):
        Envelope("é" * 128)  # 256 bytes in UTF-8


# ---------------------------------------------------------------------------- the keyring


def test_keyring_basics() -> None:
    ring = keyring(OLD, NEW, OLD)
    assert ring.primary == OLD
    assert ring.keys() == [OLD, NEW]  # install is idempotent
    ring.use(NEW)
    assert ring.primary == NEW
    assert ring.keys() == [NEW, OLD]
    ring.remove(OLD)
    assert ring.keys() == [NEW]
    ring.remove(OTHER)  # not installed: nothing happens
    assert ring.keys() == [NEW]


def test_cannot_remove_the_primary() -> None:
    ring = keyring(OLD, NEW)
    with pytest.raises(LocalProtocolError):
        ring.remove(OLD)
    assert ring.keys() == [OLD, NEW]


def test_keyring_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        Keyring([])
    with pytest.raises(LocalProtocolError):
        keyring(b"short")
    ring = keyring(OLD)
    with pytest.raises(LocalProtocolError):
        ring.install(b"x" * 31)
    with pytest.raises(LocalProtocolError):
        ring.use(NEW)
    assert ring.keys() == [OLD]


def test_encrypts_with_primary_only_and_decrypts_with_any() -> None:
    ring = keyring(OLD, NEW)
    sealed = Envelope("c", ring).seal(b"msg")
    assert Envelope("c", keyring(OLD)).open(sealed) == b"msg"
    assert open_reason(Envelope("c", keyring(NEW)), sealed) == "decrypt_failed"
    # The receiver tries every installed key, primary first.
    assert Envelope("c", keyring(NEW, OLD)).open(sealed) == b"msg"


ROTATION_STEPS: list[Callable[[Keyring], None]] = [
    lambda ring: None,  # 0: old key only
    lambda ring: ring.install(NEW),  # 1: install everywhere
    lambda ring: ring.use(NEW),  # 2: use everywhere
    lambda ring: ring.remove(OLD),  # 3: remove everywhere
]


def ring_at_step(step: int) -> Keyring:
    ring = keyring(OLD)
    for action in ROTATION_STEPS[: step + 1]:
        action(ring)
    return ring


@pytest.mark.parametrize("a_step", range(4))
@pytest.mark.parametrize("b_step", range(4))
def test_rotation_keeps_every_packet_decryptable(a_step: int, b_step: int) -> None:
    """Peers at most one rotation step apart (each step finished cluster-wide before
    the next starts) always understand each other; two steps apart they may not."""
    a = Envelope("c", ring_at_step(a_step))
    b = Envelope("c", ring_at_step(b_step))
    if abs(a_step - b_step) <= 1:
        assert b.open(a.seal(b"from a")) == b"from a"
        assert a.open(b.seal(b"from b")) == b"from b"
    elif {a_step, b_step} in ({0, 2}, {0, 3}):
        # The member still at step 0 does not have the new key.
        newer, older = (a, b) if a_step > b_step else (b, a)
        assert open_reason(older, newer.seal(b"x")) == "decrypt_failed"


def test_rotation_in_place_keeps_a_live_pair_talking() -> None:
    ring_a, ring_b = keyring(OLD), keyring(OLD)
    a, b = Envelope("c", ring_a), Envelope("c", ring_b)
    for action in ROTATION_STEPS[1:]:
        # One member goes first; the pair must still talk in both directions.
        action(ring_a)
        assert b.open(a.seal(b"1")) == b"1" and a.open(b.seal(b"2")) == b"2"
        action(ring_b)
        assert b.open(a.seal(b"3")) == b"3" and a.open(b.seal(b"4")) == b"4"
    assert ring_a.keys() == ring_b.keys() == [NEW]
    assert open_reason(Envelope("c", keyring(OLD)), a.seal(b"x")) == "decrypt_failed"


# ---------------------------------------------------------------------------- migration


def test_verify_flags_move_a_plaintext_cluster_to_encryption() -> None:
    """memberlist's GossipVerifyIncoming/Outgoing: plaintext → accept both → send
    encrypted → require encrypted; neighbouring stages understand each other."""
    stages = [
        Envelope("c"),
        Envelope("c", keyring(OLD), verify_incoming=False, verify_outgoing=False),
        Envelope("c", keyring(OLD), verify_incoming=False, verify_outgoing=True),
        Envelope("c", keyring(OLD)),
    ]
    assert stages[1].seal(b"\x02p")[0] == LABEL  # still sends plaintext
    assert stages[1].overhead == len(b"c") + 2
    assert stages[2].seal(b"\x02p")[0] == ENCRYPTED
    assert stages[2].overhead == OVERHEAD
    for left, right in itertools.pairwise(stages):
        assert right.open(left.seal(b"\x02l")) == b"\x02l"
        assert left.open(right.seal(b"\x02r")) == b"\x02r"
    # Skipping a stage breaks: strict receivers refuse plaintext, and a member with no
    # keyring cannot read sealed packets.
    assert open_reason(stages[3], stages[1].seal(b"\x02x")) == "unencrypted"
    assert open_reason(stages[0], stages[2].seal(b"\x02x")) == "unexpected_encryption"


def test_lenient_receiver_still_checks_the_label_of_plaintext() -> None:
    lenient = Envelope("c", keyring(OLD), verify_incoming=False)
    assert open_reason(lenient, Envelope("other").seal(b"\x02x")) == "label_mismatch"
    assert open_reason(lenient, Envelope("c", keyring(NEW)).seal(b"x")) == "decrypt_failed"


# ---------------------------------------------------------------------------- key text


def test_generate_and_decode_key() -> None:
    text = generate_key()
    key = decode_key(text)
    assert len(key) == 32
    assert decode_key(f"  {text}\n") == key
    assert generate_key() != text


@pytest.mark.parametrize("size", [16, 24, 32])
def test_decode_key_accepts_aes_sizes(size: int) -> None:
    raw = bytes(range(size))
    assert decode_key(base64.b64encode(raw).decode()) == raw


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("not base64!!", "base64"),
        ("", "not 0"),
        (base64.b64encode(b"x" * 20).decode(), "not 20"),
        (base64.b64encode(b"x" * 33).decode(), "not 33"),
        ("QUJD", "not 3"),
    ],
)
def test_decode_key_errors(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        decode_key(text)
