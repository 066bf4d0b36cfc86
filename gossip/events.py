"""Events the gossip core reports to the layer above, in the past tense.

Pull them with ``Swim.next_event()``. A member event carries a frozen ``Member``
snapshot taken when the change happened.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

Address = tuple[str, int]
"""(host, port) of a member's gossip endpoint; the host is an IPv4 or IPv6 literal."""


class MemberState(enum.IntEnum):
    """A member's liveness. The order is the precedence at equal incarnation."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclass(frozen=True, slots=True)
class Member:
    """What we know about one member, at one moment."""

    name: str
    address: Address
    meta: bytes
    incarnation: int
    state: MemberState
    state_changed_at: float
    """Our clock (the ``now`` we were given) when the state last changed."""


@dataclass(frozen=True, slots=True)
class MemberJoined:
    member: Member


@dataclass(frozen=True, slots=True)
class MemberUpdated:
    """Address or metadata changed (with a higher incarnation)."""

    member: Member


@dataclass(frozen=True, slots=True)
class MemberSuspected:
    member: Member
    accuser: str


@dataclass(frozen=True, slots=True)
class MemberRecovered:
    """A suspected member refuted the suspicion."""

    member: Member


@dataclass(frozen=True, slots=True)
class MemberFailed:
    """The suspicion timed out: the member is dead."""

    member: Member


@dataclass(frozen=True, slots=True)
class MemberLeft:
    """The member left gracefully."""

    member: Member


@dataclass(frozen=True, slots=True)
class MemberReaped:
    """A dead or departed member was forgotten after its timeout."""

    member: Member


@dataclass(frozen=True, slots=True)
class SuspicionRefuted:
    """Someone suspected *us*; we raised our incarnation to refute it."""

    incarnation: int
    accuser: str


@dataclass(frozen=True, slots=True)
class JoinCompleted:
    """A join attempt finished: how many seeds answered and which did not."""

    contacted: int
    failed: tuple[Address, ...]


@dataclass(frozen=True, slots=True)
class LeaveCompleted:
    """Our leave message was broadcast; the adapter may stop."""


MemberEvent = (
    MemberJoined
    | MemberUpdated
    | MemberSuspected
    | MemberRecovered
    | MemberFailed
    | MemberLeft
    | MemberReaped
)
Event = MemberEvent | SuspicionRefuted | JoinCompleted | LeaveCompleted
