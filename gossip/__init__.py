"""SWIM + Lifeguard gossip membership: a sans-IO core, an asyncio adapter, a simulator."""

from gossip.broadcast import BroadcastQueue
from gossip.config import DEFAULT_PORT, PRESETS, GossipConfig, preset
from gossip.delegate import Delegate
from gossip.errors import GossipError, LocalProtocolError, RemoteProtocolError
from gossip.events import (
    Address,
    Event,
    JoinCompleted,
    LeaveCompleted,
    Member,
    MemberEvent,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    MemberReaped,
    MemberRecovered,
    MemberState,
    MemberSuspected,
    MemberUpdated,
    SuspicionRefuted,
)
from gossip.keyring import Envelope, Keyring, decode_key, generate_key
from gossip.swim import Statistics, StreamRequest, Swim

__all__ = [
    "DEFAULT_PORT",
    "PRESETS",
    "Address",
    "BroadcastQueue",
    "Delegate",
    "Envelope",
    "Event",
    "GossipConfig",
    "GossipError",
    "JoinCompleted",
    "Keyring",
    "LeaveCompleted",
    "LocalProtocolError",
    "Member",
    "MemberEvent",
    "MemberFailed",
    "MemberJoined",
    "MemberLeft",
    "MemberReaped",
    "MemberRecovered",
    "MemberState",
    "MemberSuspected",
    "MemberUpdated",
    "RemoteProtocolError",
    "Statistics",
    "StreamRequest",
    "SuspicionRefuted",
    "Swim",
    "decode_key",
    "generate_key",
    "preset",
]
