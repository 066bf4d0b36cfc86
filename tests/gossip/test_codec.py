"""Wire codec: round trips for every message type, and decoders that only ever refuse
with ``RemoteProtocolError`` whatever a peer sends (h11's "the peer did wrong")."""

from __future__ import annotations

import struct
from collections.abc import Callable

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gossip import codec
from gossip.codec import (
    Ack,
    Alive,
    Dead,
    Digest,
    IndirectPing,
    MemberRecord,
    Message,
    MessageType,
    Nack,
    Ping,
    PushPull,
    Suspect,
    User,
    decode_packet,
    decode_stream,
    encode,
    encode_compound,
)
from gossip.config import META_MAX_SIZE, NAME_MAX_LENGTH
from gossip.errors import LocalProtocolError, RemoteProtocolError
from gossip.events import Address, MemberState

MAX_MEMBERS = 64
FUZZ = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

# ---------------------------------------------------------------------------- strategies

u64 = st.integers(min_value=0, max_value=2**64 - 1)
names = st.text(min_size=1, max_size=NAME_MAX_LENGTH)
hosts = st.one_of(
    st.ip_addresses().map(str),
    st.text(min_size=1, max_size=codec.HOST_MAX_LENGTH),
)
ports = st.integers(min_value=0, max_value=65535)
addresses: st.SearchStrategy[Address] = st.tuples(hosts, ports)
metas = st.binary(max_size=META_MAX_SIZE)
states = st.sampled_from(list(MemberState))

pings = st.builds(Ping, u64, names, addresses)
indirect_pings = st.builds(IndirectPing, u64, names, addresses, st.booleans(), names, addresses)
acks = st.builds(Ack, u64)
nacks = st.builds(Nack, u64)
suspects = st.builds(Suspect, u64, names, names)
alives = st.builds(Alive, u64, names, addresses, metas)
deads = st.builds(Dead, u64, names, names)
users = st.builds(User, st.binary(max_size=2048))
#: stable_for travels in whole milliseconds (u32), so draw values on that grid.
stable_times = st.integers(0, 2**32 - 1).map(lambda ms: ms / 1000)
digests = st.builds(Digest, st.binary(max_size=64), u64, names, addresses, stable_times)
records = st.builds(MemberRecord, names, addresses, metas, u64, states)
push_pulls = st.builds(
    PushPull,
    st.booleans(),
    st.lists(records, max_size=8).map(tuple),
    st.binary(max_size=256),
)

packet_messages: st.SearchStrategy[Message] = st.one_of(
    pings, indirect_pings, acks, nacks, suspects, alives, deads, users, digests
)
stream_messages: st.SearchStrategy[Message] = st.one_of(packet_messages, push_pulls)


Decoder = Callable[[bytes], object]


def refused_reason(decoder: Decoder, data: bytes) -> str:
    """Call the decoder; it must refuse with RemoteProtocolError. Returns the reason."""
    with pytest.raises(RemoteProtocolError) as info:
        decoder(data)
    assert info.value.reason, "a refusal must name its reason"
    return info.value.reason


def decode_stream_default(data: bytes) -> Message:
    return decode_stream(data, MAX_MEMBERS)


def only_remote_errors(decoder: Decoder, data: bytes) -> None:
    """Feed ``data``; anything but success or RemoteProtocolError is a bug."""
    try:
        decoder(data)
    except RemoteProtocolError as exc:
        assert isinstance(exc.reason, str) and exc.reason
    except Exception as exc:  # pragma: no cover - only when the codec is broken
        raise AssertionError(
            f"{decoder.__name__}({data!r}) raised {type(exc).__name__}: {exc}"
        ) from exc


# ---------------------------------------------------------------------------- round trips


@settings(max_examples=300, deadline=None, derandomize=True)
@given(packet_messages)
def test_packet_round_trip(message: Message) -> None:
    assert decode_packet(encode(message)) == [message]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(stream_messages)
def test_stream_round_trip(message: Message) -> None:
    assert decode_stream(encode(message), MAX_MEMBERS) == message


@pytest.mark.parametrize(
    "message",
    [
        Ping(1, "a", ("10.0.0.1", 7946)),
        IndirectPing(2, "t", ("::1", 1), True, "s", ("10.0.0.2", 2)),
        Ack(3),
        Nack(4),
        Suspect(5, "n", "x"),
        Alive(6, "n", ("10.0.0.3", 3), b"meta"),
        Dead(7, "n", "n"),
        User(b"hello"),
        Digest(b"\x00" * 16, 3, "s", ("10.0.0.4", 4), 1.5),
        PushPull(True, (MemberRecord("n", ("h", 1), b"", 9, MemberState.LEFT),), b"state"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_type_has_its_type_byte(message: Message) -> None:
    expected = {
        Ping: MessageType.PING,
        IndirectPing: MessageType.INDIRECT_PING,
        Ack: MessageType.ACK,
        Nack: MessageType.NACK,
        Suspect: MessageType.SUSPECT,
        Alive: MessageType.ALIVE,
        Dead: MessageType.DEAD,
        User: MessageType.USER,
        Digest: MessageType.DIGEST,
        PushPull: MessageType.PUSH_PULL,
    }[type(message)]
    data = encode(message)
    assert data[0] == expected
    assert decode_stream(data, MAX_MEMBERS) == message


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(packet_messages, min_size=1, max_size=20))
def test_compound_round_trip(messages: list[Message]) -> None:
    compound = encode_compound([encode(m) for m in messages])
    assert compound[0] == MessageType.COMPOUND
    assert compound[1] == len(messages)
    assert decode_packet(compound) == messages


def test_compound_holds_at_most_255_parts() -> None:
    part = encode(Ack(1))
    assert len(decode_packet(encode_compound([part] * 255))) == 255
    with pytest.raises(LocalProtocolError):
        encode_compound([part] * 256)
    with pytest.raises(LocalProtocolError):
        encode_compound([])


def test_push_pull_is_refused_inside_a_datagram() -> None:
    data = encode(PushPull(False, (), b""))
    assert refused_reason(decode_packet, data) == "unexpected"


def test_nested_compound_is_refused() -> None:
    inner = encode_compound([encode(Ack(1))])
    assert refused_reason(decode_packet, encode_compound([inner])) == "malformed"


# ---------------------------------------------------------------------------- hostile input


@FUZZ
@given(st.binary(max_size=600))
@example(b"")
@example(bytes([MessageType.COMPOUND]))
@example(bytes([MessageType.COMPOUND, 0]))
@example(bytes([MessageType.COMPOUND, 1, 0, 0]))
@example(bytes([MessageType.PING]) + b"\x91" * 200 + b"\xc0")  # deep nesting
@example(bytes([MessageType.ALIVE]) + msgpack.packb({"a": 1}))
@example(bytes([MessageType.ALIVE]) + msgpack.packb([1, "n", "h", 1, b"m"]) + b"\x00")
@example(bytes([MessageType.ACK]) + msgpack.packb([-1]))
@example(bytes([MessageType.ACK]) + msgpack.packb([True]))
@example(bytes([MessageType.ACK]) + msgpack.packb([1.5]))
@example(bytes([MessageType.ACK]) + msgpack.packb([msgpack.ExtType(1, b"x")]))
@example(bytes([MessageType.SUSPECT]) + b"\x93\x01\xa1\xff\xa1a")  # invalid UTF-8
@example(bytes([255]))
def test_decoders_refuse_arbitrary_bytes(data: bytes) -> None:
    only_remote_errors(decode_packet, data)
    only_remote_errors(decode_stream_default, data)
    for kind in MessageType:
        only_remote_errors(decode_packet, bytes([kind]) + data)
        only_remote_errors(decode_stream_default, bytes([kind]) + data)


@FUZZ
@given(
    st.one_of(
        stream_messages.map(encode),
        st.lists(packet_messages, min_size=1, max_size=5).map(
            lambda ms: encode_compound([encode(m) for m in ms])
        ),
    ),
    st.data(),
)
def test_decoders_refuse_mutated_messages(valid: bytes, data: st.DataObject) -> None:
    mutated = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if action == "truncate":
            del mutated[data.draw(st.integers(0, len(mutated))) :]
        elif action == "insert":
            position = data.draw(st.integers(0, len(mutated)))
            mutated[position:position] = data.draw(st.binary(min_size=1, max_size=4))
        elif mutated:
            position = data.draw(st.integers(0, len(mutated) - 1))
            if action == "flip":
                mutated[position] = data.draw(st.integers(0, 255))
            else:
                del mutated[position]
    only_remote_errors(decode_packet, bytes(mutated))
    only_remote_errors(decode_stream_default, bytes(mutated))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    st.lists(st.integers(0, 2**16 - 1), min_size=1, max_size=6),
    st.binary(max_size=200),
)
def test_compound_header_lies_are_refused(lengths: list[int], tail: bytes) -> None:
    header = bytes((MessageType.COMPOUND, len(lengths)))
    header += b"".join(struct.pack(">H", n) for n in lengths)
    data = header + tail
    if sum(lengths) != len(tail):
        assert refused_reason(decode_packet, data) == "compound_malformed"
    else:
        only_remote_errors(decode_packet, data)


# ---------------------------------------------------------------------------- limits


def test_oversize_datagram_is_refused() -> None:
    data = encode(User(b"x" * 100)) + b"\x00" * codec.MAX_DATAGRAM
    assert refused_reason(decode_packet, data) == "oversize"


def test_oversize_user_message_is_refused() -> None:
    data = bytes((MessageType.USER,)) + b"x" * (codec.USER_MAX_SIZE + 1)
    assert refused_reason(decode_packet, data) == "oversize"
    assert refused_reason(decode_stream_default, data) == "oversize"


def test_user_message_at_the_limit_is_accepted() -> None:
    payload = b"x" * codec.USER_MAX_SIZE
    assert decode_stream_default(encode(User(payload))) == User(payload)


def _push_pull_with(count: int) -> bytes:
    records = tuple(
        MemberRecord(f"n{i}", ("10.0.0.1", i), b"", 0, MemberState.ALIVE) for i in range(count)
    )
    return encode(PushPull(False, records, b""))


@pytest.mark.parametrize("max_members", [1, 4, 8, 64, 1000])
def test_push_pull_member_limit(max_members: int) -> None:
    at_limit = decode_stream(_push_pull_with(max_members), max_members)
    assert isinstance(at_limit, PushPull)
    assert len(at_limit.members) == max_members

    with pytest.raises(RemoteProtocolError) as info:
        decode_stream(_push_pull_with(max_members + 1), max_members)
    # The codec has a dedicated reason for this limit, so the metric says what happened.
    assert info.value.reason == "too_many_members"


def test_meta_over_512_bytes_is_refused() -> None:
    ok = Alive(1, "n", ("h", 1), b"m" * META_MAX_SIZE)
    assert decode_packet(encode(ok)) == [ok]
    too_big = Alive(1, "n", ("h", 1), b"m" * (META_MAX_SIZE + 1))
    assert refused_reason(decode_packet, encode(too_big)) == "malformed"
    record = MemberRecord("n", ("h", 1), b"m" * (META_MAX_SIZE + 1), 0, MemberState.ALIVE)
    assert refused_reason(decode_stream_default, encode(PushPull(False, (record,), b""))) == (
        "malformed"
    )


@pytest.mark.parametrize(
    "message",
    [
        lambda name: Ping(1, name, ("h", 1)),
        lambda name: Suspect(1, name, "a"),
        lambda name: Suspect(1, "n", name),
        lambda name: Alive(1, name, ("h", 1), b""),
        lambda name: Dead(1, name, "a"),
        lambda name: Digest(b"", 1, name, ("h", 1), 0.0),
        lambda name: IndirectPing(1, name, ("h", 1), False, "s", ("h", 2)),
    ],
)
def test_names_over_128_characters_are_refused(message: object) -> None:
    assert callable(message)
    ok = message("é" * NAME_MAX_LENGTH)
    assert decode_packet(encode(ok)) == [ok]
    assert refused_reason(decode_packet, encode(message("n" * (NAME_MAX_LENGTH + 1)))) == (
        "malformed"
    )
    assert refused_reason(decode_packet, encode(message(""))) == "malformed"


def test_name_limit_inside_push_pull() -> None:
    record = MemberRecord("n" * (NAME_MAX_LENGTH + 1), ("h", 1), b"", 0, MemberState.ALIVE)
    assert refused_reason(decode_stream_default, encode(PushPull(False, (record,), b""))) == (
        "malformed"
    )


@pytest.mark.parametrize(
    "body",
    [
        [1, "n", "h", 70000, b""],  # port out of range
        [1, "n", "", 1, b""],  # empty host
        [1, "n", "h" * 65, 1, b""],  # host too long
        [-1, "n", "h", 1, b""],  # negative incarnation
        [1, "n", "h", 1, "not bytes"],  # meta of the wrong type
        [1, "n", "h", 1],  # too few fields
        [1, b"n", "h", 1, b""],  # name as bytes
    ],
)
def test_alive_field_checks(body: list[object]) -> None:
    data = bytes((MessageType.ALIVE,)) + msgpack.packb(body, use_bin_type=True)
    assert refused_reason(decode_packet, data) == "malformed"


def test_extra_trailing_fields_are_accepted() -> None:
    # A newer version may append fields; an older decoder ignores them.
    data = bytes((MessageType.ACK,)) + msgpack.packb([7, "future"], use_bin_type=True)
    assert decode_packet(data) == [Ack(7)]


def test_unknown_type_and_bad_state_are_refused() -> None:
    assert refused_reason(decode_packet, bytes([200]) + msgpack.packb([1])) == "unknown_type"
    body = [False, [["n", "h", 1, b"", 0, 4]], b""]
    data = bytes((MessageType.PUSH_PULL,)) + msgpack.packb(body, use_bin_type=True)
    assert refused_reason(decode_stream_default, data) == "malformed"


@pytest.mark.parametrize("stable_for", [0.0, 0.001, 4.35, 1.005, 86_400.123])
def test_digest_stable_for_survives_on_the_millisecond_grid(stable_for: float) -> None:
    message = Digest(b"d" * 16, 2, "s", ("h", 1), stable_for)
    assert decode_packet(encode(message)) == [message]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.floats(0.0, 1e9, allow_nan=False))
def test_digest_stable_for_encodes_within_a_millisecond(stable_for: float) -> None:
    (decoded,) = decode_packet(encode(Digest(b"", 0, "s", ("h", 1), stable_for)))
    assert isinstance(decoded, Digest)
    assert abs(decoded.stable_for - min(stable_for, (2**32 - 1) / 1000)) <= 0.001
