"""Certificate authority and leader election (issue 4)."""

from ca.election import (
    Address,
    ElectionConfig,
    ElectionEvent,
    ElectionStarted,
    LeaderContactLost,
    LeaderElected,
    LeadershipLost,
    Role,
    ServerInfo,
    Statistics,
    TermChanged,
)
from ca.election import Election as Election
from ca.errors import CAError, LocalProtocolError, RemoteProtocolError

__all__ = [
    "Address",
    "CAError",
    "Election",
    "ElectionConfig",
    "ElectionEvent",
    "ElectionStarted",
    "LeaderContactLost",
    "LeaderElected",
    "LeadershipLost",
    "LocalProtocolError",
    "RemoteProtocolError",
    "Role",
    "ServerInfo",
    "Statistics",
    "TermChanged",
]
