"""Wire format of the gossip protocol: one type byte, then a msgpack array.

Theory of operation
-------------------
A UDP datagram holds one message or a *compound* of several (memberlist's layout:
``COMPOUND | count:u8 | count × length:u16be | bodies``), so broadcasts ride along
with pings and acks. A stream (TCP) carries exactly one message per direction.

Bodies are msgpack *arrays*, not maps keyed by Go field names as memberlist's are:
a ping is about half the size, and field order is fixed by the message type.

Every decoder is strict and bounded: the container sizes msgpack may allocate are
capped, every field's type and range is checked, and anything wrong raises
``RemoteProtocolError`` with a short reason that the core counts. Nothing a peer
sends can raise anything else out of ``decode_packet`` or ``decode_stream``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import msgpack

from gossip.config import META_MAX_SIZE, NAME_MAX_LENGTH
from gossip.errors import LocalProtocolError, RemoteProtocolError
from gossip.events import Address, MemberState

#: A UDP datagram can never be larger; anything bigger is not from a real socket.
MAX_DATAGRAM: Final = 65_536
#: Most messages in one compound: the count is one byte, as in memberlist.
MAX_COMPOUND_PARTS: Final = 255
#: Framing cost of one part inside a compound: its u16 length.
COMPOUND_PART_OVERHEAD: Final = 2
#: Fixed cost of the compound header itself: type byte + count byte.
COMPOUND_HEADER: Final = 2
#: Longest host string: an IPv6 literal with a zone is well under this.
HOST_MAX_LENGTH: Final = 64
#: Largest user message inside a datagram or stream.
USER_MAX_SIZE: Final = 64 * 1024


class MessageType(enum.IntEnum):
    PING = 0
    INDIRECT_PING = 1
    ACK = 2
    SUSPECT = 3
    ALIVE = 4
    DEAD = 5
    PUSH_PULL = 6
    COMPOUND = 7
    USER = 8
    NACK = 9
    DIGEST = 10


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    target: str
    """The member we mean to probe: a restarted process at that address under
    another name must not ack for the old one."""
    source_address: Address
    """Where to send the ack (our advertised address, not the packet's source)."""


@dataclass(frozen=True, slots=True)
class IndirectPing:
    seq: int
    target: str
    target_address: Address
    want_nack: bool
    source: str
    source_address: Address


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    seq: int


@dataclass(frozen=True, slots=True)
class Suspect:
    incarnation: int
    node: str
    accuser: str


@dataclass(frozen=True, slots=True)
class Alive:
    incarnation: int
    node: str
    address: Address
    meta: bytes


@dataclass(frozen=True, slots=True)
class Dead:
    """A death notice; ``accuser == node`` means the member left on its own."""

    incarnation: int
    node: str
    accuser: str


@dataclass(frozen=True, slots=True)
class User:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Digest:
    """Anti-entropy probe: "my state hashes to this; if yours differs, push-pull me"."""

    digest: bytes
    members: int
    source: str
    source_address: Address
    stable_for: float
    """Seconds since the sender's view last changed: a fresh difference is news
    still spreading, not divergence."""


@dataclass(frozen=True, slots=True)
class MemberRecord:
    name: str
    address: Address
    meta: bytes
    incarnation: int
    state: MemberState


@dataclass(frozen=True, slots=True)
class PushPull:
    join: bool
    members: tuple[MemberRecord, ...]
    user_state: bytes


Message = Ping | IndirectPing | Ack | Nack | Suspect | Alive | Dead | User | Digest | PushPull


# ---------------------------------------------------------------------------- encode


def _pack(kind: MessageType, body: list[object]) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return bytes((kind,)) + packed


def _addr(address: Address) -> list[object]:
    return [address[0], address[1]]


def encode(message: Message) -> bytes:
    """One message as bytes: type byte + msgpack array."""
    match message:
        case Ping(seq, target, source_address):
            return _pack(MessageType.PING, [seq, target, *_addr(source_address)])
        case IndirectPing(seq, target, target_address, want_nack, source, source_address):
            return _pack(
                MessageType.INDIRECT_PING,
                [seq, target, *_addr(target_address), want_nack, source, *_addr(source_address)],
            )
        case Ack(seq):
            return _pack(MessageType.ACK, [seq])
        case Nack(seq):
            return _pack(MessageType.NACK, [seq])
        case Suspect(incarnation, node, accuser):
            return _pack(MessageType.SUSPECT, [incarnation, node, accuser])
        case Alive(incarnation, node, address, meta):
            return _pack(MessageType.ALIVE, [incarnation, node, *_addr(address), meta])
        case Dead(incarnation, node, accuser):
            return _pack(MessageType.DEAD, [incarnation, node, accuser])
        case User(payload):
            return bytes((MessageType.USER,)) + payload
        case Digest(digest, members, source, source_address, stable_for):
            stable_ms = min(max(0, round(stable_for * 1000)), 2**32 - 1)
            body = [digest, members, source, *_addr(source_address), stable_ms]
            return _pack(MessageType.DIGEST, body)
        case PushPull(join, members, user_state):
            records = [
                [r.name, r.address[0], r.address[1], r.meta, r.incarnation, int(r.state)]
                for r in members
            ]
            return _pack(MessageType.PUSH_PULL, [join, records, user_state])
    raise LocalProtocolError(f"cannot encode {message!r}")  # pragma: no cover


def encode_compound(parts: list[bytes]) -> bytes:
    """Pack already-encoded messages into one compound message."""
    if not 1 <= len(parts) <= MAX_COMPOUND_PARTS:
        raise LocalProtocolError(f"a compound holds 1..255 parts, not {len(parts)}")
    lengths = b"".join(struct.pack(">H", len(p)) for p in parts)
    return bytes((MessageType.COMPOUND, len(parts))) + lengths + b"".join(parts)


# ---------------------------------------------------------------------------- decode


def _unpack(body: bytes, max_array: int) -> list[object]:
    try:
        value = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_array_len=max_array,
            max_map_len=0,
            max_ext_len=0,
            use_list=True,
        )
    except (ValueError, msgpack.UnpackException, TypeError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError("malformed", type(exc).__name__) from None
    if not isinstance(value, list):
        raise RemoteProtocolError("malformed", "body is not an array")
    return value


def _int(value: object, limit: int = 2**64 - 1) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise RemoteProtocolError("malformed", "bad integer")
    return value


def _name(value: object) -> str:
    if type(value) is not str or not 0 < len(value) <= NAME_MAX_LENGTH:
        raise RemoteProtocolError("malformed", "bad member name")
    return value


def _bytes(value: object, limit: int) -> bytes:
    if type(value) is not bytes or len(value) > limit:
        raise RemoteProtocolError("malformed", "bad bytes field")
    return value


def _address(host: object, port: object) -> Address:
    if type(host) is not str or not 0 < len(host) <= HOST_MAX_LENGTH:
        raise RemoteProtocolError("malformed", "bad host")
    return host, _int(port, 65535)


def _bool(value: object) -> bool:
    if type(value) is not bool:
        raise RemoteProtocolError("malformed", "bad boolean")
    return value


def _fields(body: list[object], count: int) -> list[object]:
    # Extra trailing fields are allowed: a newer version may append some.
    if len(body) < count:
        raise RemoteProtocolError("malformed", "too few fields")
    return body


def decode_one(data: bytes) -> Message:
    """Decode one non-compound message (type byte + body)."""
    if not data:
        raise RemoteProtocolError("too_short")
    kind, body = data[0], data[1:]
    if kind == MessageType.USER:
        if len(body) > USER_MAX_SIZE:
            raise RemoteProtocolError("oversize", "user message")
        return User(bytes(body))
    if kind == MessageType.PING:
        f = _fields(_unpack(body, 16), 4)
        return Ping(_int(f[0]), _name(f[1]), _address(f[2], f[3]))
    if kind == MessageType.INDIRECT_PING:
        f = _fields(_unpack(body, 16), 8)
        return IndirectPing(
            _int(f[0]),
            _name(f[1]),
            _address(f[2], f[3]),
            _bool(f[4]),
            _name(f[5]),
            _address(f[6], f[7]),
        )
    if kind == MessageType.ACK:
        f = _fields(_unpack(body, 8), 1)
        return Ack(_int(f[0]))
    if kind == MessageType.NACK:
        f = _fields(_unpack(body, 8), 1)
        return Nack(_int(f[0]))
    if kind == MessageType.SUSPECT:
        f = _fields(_unpack(body, 8), 3)
        return Suspect(_int(f[0]), _name(f[1]), _name(f[2]))
    if kind == MessageType.ALIVE:
        f = _fields(_unpack(body, 8), 5)
        return Alive(_int(f[0]), _name(f[1]), _address(f[2], f[3]), _bytes(f[4], META_MAX_SIZE))
    if kind == MessageType.DEAD:
        f = _fields(_unpack(body, 8), 3)
        return Dead(_int(f[0]), _name(f[1]), _name(f[2]))
    if kind == MessageType.DIGEST:
        f = _fields(_unpack(body, 8), 6)
        stable_for = _int(f[5], 2**32 - 1) / 1000.0
        return Digest(_bytes(f[0], 64), _int(f[1]), _name(f[2]), _address(f[3], f[4]), stable_for)
    if kind == MessageType.PUSH_PULL:
        raise RemoteProtocolError("unexpected", "push-pull outside a stream")
    if kind == MessageType.COMPOUND:
        raise RemoteProtocolError("malformed", "nested compound")
    raise RemoteProtocolError("unknown_type", str(kind))


def iter_packet(data: bytes) -> Iterator[Message]:
    """Decode a datagram (plaintext, after decryption) into its messages.

    A broken part of a compound raises ``RemoteProtocolError`` when reached; parts
    before it have already been yielded, as memberlist handles them.
    """
    if len(data) > MAX_DATAGRAM:
        raise RemoteProtocolError("oversize", "datagram")
    if not data:
        raise RemoteProtocolError("too_short")
    if data[0] != MessageType.COMPOUND:
        yield decode_one(data)
        return
    if len(data) < 2:
        raise RemoteProtocolError("compound_malformed", "no count")
    count = data[1]
    header_end = 2 + 2 * count
    if count == 0 or len(data) < header_end:
        raise RemoteProtocolError("compound_malformed", "truncated header")
    lengths = struct.unpack(f">{count}H", data[2:header_end])
    if header_end + sum(lengths) != len(data):
        raise RemoteProtocolError("compound_malformed", "lengths do not add up")
    offset = header_end
    for length in lengths:
        part = data[offset : offset + length]
        offset += length
        yield decode_one(part)


def decode_packet(data: bytes) -> list[Message]:
    """All messages of a datagram, or ``RemoteProtocolError`` if any part is bad."""
    return list(iter_packet(data))


def decode_stream(data: bytes, max_members: int) -> Message:
    """Decode the one message a stream carries (push-pull, ping, ack, digest, user)."""
    if not data:
        raise RemoteProtocolError("too_short")
    if data[0] != MessageType.PUSH_PULL:
        return decode_one(data)
    # Let msgpack accept one record too many, so the count check below names it.
    f = _fields(_unpack(data[1:], max(max_members + 1, 8)), 3)
    join = _bool(f[0])
    raw_records = f[1]
    if not isinstance(raw_records, list):
        raise RemoteProtocolError("malformed", "members is not an array")
    if len(raw_records) > max_members:
        raise RemoteProtocolError("too_many_members")
    records = []
    for raw in raw_records:
        if not isinstance(raw, list) or len(raw) < 6:
            raise RemoteProtocolError("malformed", "bad member record")
        state = _int(raw[5], 3)
        records.append(
            MemberRecord(
                _name(raw[0]),
                _address(raw[1], raw[2]),
                _bytes(raw[3], META_MAX_SIZE),
                _int(raw[4]),
                MemberState(state),
            )
        )
    return PushPull(join, tuple(records), _bytes(f[2], 1 << 30))
