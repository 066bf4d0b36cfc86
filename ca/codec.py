"""Wire format of the leader election: ``b"L"``, one type byte, then a msgpack array.

Theory of operation
-------------------
Election messages ride on the gossip layer's user-message channel
(``Swim.send_user``), which the agent shares with other users (CA requests, ...).
The leading ``b"L"`` lets the agent's message router hand a payload to the election
without decoding it; the type byte after it names the message, and the body is a
msgpack *array* whose field order the type fixes (as in ``gossip.codec``).

Every decoder is strict and bounded: a message is at most ``MAX_MESSAGE_SIZE``
bytes, msgpack may allocate nothing bigger than a few fields, every field's type and
range is checked, and anything wrong raises ``ca.errors.RemoteProtocolError`` with a
short reason the core counts. Nothing a peer sends can raise anything else out of
``decode``. Extra trailing fields are accepted so a newer version may append some.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

import msgpack

from ca.errors import LocalProtocolError, RemoteProtocolError

#: First byte of every election message: the agent's router dispatches on it.
MAGIC: Final = b"L"
#: Largest election message. The biggest real one is ~150 bytes (a 128-character name
#: and three integers); this leaves room for appended fields and still fits any MTU.
MAX_MESSAGE_SIZE: Final = 512
#: Longest server name; the same bound as gossip member names (``gossip.config``).
NAME_MAX_LENGTH: Final = 128
#: Terms and heartbeat rounds are non-negative and fit a signed 64-bit integer, so
#: another implementation (Go, Rust) can hold them in an ``int64``.
COUNTER_MAX: Final = 2**63 - 1
#: msgpack may build an array of at most this many fields: today's longest message
#: has 4, and the cap bounds what garbage can make the decoder allocate.
MAX_FIELDS: Final = 16


class MessageType(enum.IntEnum):
    PRE_VOTE_REQUEST = 1
    PRE_VOTE_RESPONSE = 2
    VOTE_REQUEST = 3
    VOTE_RESPONSE = 4
    HEARTBEAT = 5
    HEARTBEAT_ACK = 6


@dataclass(frozen=True, slots=True)
class PreVoteRequest:
    """Asks "would you vote for me in ``term``?" before raising our term (pre-vote)."""

    term: int
    """The term the candidate would start: its current term + 1."""
    candidate: str
    known_servers: int
    """How many servers (itself included) the candidate counts its majority over."""


@dataclass(frozen=True, slots=True)
class PreVoteResponse:
    term: int
    """The ``term`` of the request answered."""
    voter: str
    granted: bool
    voter_term: int
    """The voter's current term: a higher one tells the candidate it is behind."""


@dataclass(frozen=True, slots=True)
class VoteRequest:
    """Raft's RequestVote without the log fields (§5.2)."""

    term: int
    candidate: str
    known_servers: int
    """As in ``PreVoteRequest``: a voter that knows more servers refuses."""


@dataclass(frozen=True, slots=True)
class VoteResponse:
    term: int
    """The voter's current term after handling the request."""
    voter: str
    granted: bool


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Raft's empty AppendEntries: "I lead ``term``"."""

    term: int
    leader: str
    round: int
    """The leader's heartbeat round, echoed in the ack: the leader knows when it sent
    each round, so acks renew its lease without trusting anyone else's clock."""


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    term: int
    """The follower's current term: higher than the leader's means "step down"."""
    follower: str
    round: int
    success: bool


Message = PreVoteRequest | PreVoteResponse | VoteRequest | VoteResponse | Heartbeat | HeartbeatAck


# ---------------------------------------------------------------------------- encode


def _pack(kind: MessageType, body: list[object]) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return MAGIC + bytes((kind,)) + packed


def encode(message: Message) -> bytes:
    """The wire form of ``message``; ``LocalProtocolError`` if a field is out of range."""
    match message:
        case PreVoteRequest(term, candidate, known):
            fields: list[object] = [term, candidate, known]
            kind = MessageType.PRE_VOTE_REQUEST
        case PreVoteResponse(term, voter, granted, voter_term):
            fields = [term, voter, granted, voter_term]
            kind = MessageType.PRE_VOTE_RESPONSE
        case VoteRequest(term, candidate, known):
            fields = [term, candidate, known]
            kind = MessageType.VOTE_REQUEST
        case VoteResponse(term, voter, granted):
            fields = [term, voter, granted]
            kind = MessageType.VOTE_RESPONSE
        case Heartbeat(term, leader, round_):
            fields = [term, leader, round_]
            kind = MessageType.HEARTBEAT
        case HeartbeatAck(term, follower, round_, success):
            fields = [term, follower, round_, success]
            kind = MessageType.HEARTBEAT_ACK
        case _:  # pragma: no cover - exhaustive over Message
            raise LocalProtocolError(f"cannot encode {message!r}")
    for value in fields:
        if type(value) is int and not 0 <= value <= COUNTER_MAX:
            raise LocalProtocolError(f"counter {value} out of range")
        if type(value) is str and not 0 < len(value) <= NAME_MAX_LENGTH:
            raise LocalProtocolError("server name must be 1..128 characters")
    return _pack(kind, fields)


# ---------------------------------------------------------------------------- decode


def _unpack(body: bytes) -> list[object]:
    try:
        value = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_array_len=MAX_FIELDS,
            max_map_len=0,
            max_ext_len=0,
            max_bin_len=0,
            max_str_len=4 * NAME_MAX_LENGTH,  # UTF-8 bytes of a 128-character name
            use_list=True,
        )
    except (ValueError, msgpack.UnpackException, TypeError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError("malformed", type(exc).__name__) from None
    if not isinstance(value, list):
        raise RemoteProtocolError("malformed", "body is not an array")
    return value


def _counter(value: object) -> int:
    if type(value) is not int or not 0 <= value <= COUNTER_MAX:
        raise RemoteProtocolError("malformed", "bad counter")
    return value


def _name(value: object) -> str:
    if type(value) is not str or not 0 < len(value) <= NAME_MAX_LENGTH:
        raise RemoteProtocolError("malformed", "bad server name")
    return value


def _bool(value: object) -> bool:
    if type(value) is not bool:
        raise RemoteProtocolError("malformed", "bad boolean")
    return value


def _fields(body: list[object], count: int) -> list[object]:
    if len(body) < count:
        raise RemoteProtocolError("malformed", "too few fields")
    return body


def decode(data: bytes) -> Message:
    """Decode one election message, or raise ``RemoteProtocolError``."""
    if len(data) > MAX_MESSAGE_SIZE:
        raise RemoteProtocolError("oversize")
    if len(data) < 2:
        raise RemoteProtocolError("too_short")
    if data[:1] != MAGIC:
        raise RemoteProtocolError("not_election")
    kind, body = data[1], data[2:]
    if kind == MessageType.PRE_VOTE_REQUEST:
        f = _fields(_unpack(body), 3)
        return PreVoteRequest(_counter(f[0]), _name(f[1]), _counter(f[2]))
    if kind == MessageType.PRE_VOTE_RESPONSE:
        f = _fields(_unpack(body), 4)
        return PreVoteResponse(_counter(f[0]), _name(f[1]), _bool(f[2]), _counter(f[3]))
    if kind == MessageType.VOTE_REQUEST:
        f = _fields(_unpack(body), 3)
        return VoteRequest(_counter(f[0]), _name(f[1]), _counter(f[2]))
    if kind == MessageType.VOTE_RESPONSE:
        f = _fields(_unpack(body), 3)
        return VoteResponse(_counter(f[0]), _name(f[1]), _bool(f[2]))
    if kind == MessageType.HEARTBEAT:
        f = _fields(_unpack(body), 3)
        return Heartbeat(_counter(f[0]), _name(f[1]), _counter(f[2]))
    if kind == MessageType.HEARTBEAT_ACK:
        f = _fields(_unpack(body), 4)
        return HeartbeatAck(_counter(f[0]), _name(f[1]), _counter(f[2]), _bool(f[3]))
    raise RemoteProtocolError("unknown_type", str(kind))
