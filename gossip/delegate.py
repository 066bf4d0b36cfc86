"""The interface between the gossip core and the layer above it (memberlist's Delegate).

The core calls these synchronously; implementations must be quick and must not do
I/O. Every method has a harmless default, so a layer overrides only what it needs.
"""

from __future__ import annotations


class Delegate:
    """Hooks the gossip core calls. Subclass and override what you need."""

    def node_meta(self, limit: int) -> bytes:
        """Metadata gossiped with our alive message; at most ``limit`` bytes."""
        return b""

    def broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        """User broadcasts to piggyback on the next packet.

        Each returned message costs ``overhead`` bytes of framing plus its length;
        the total must stay within ``limit``. Use ``gossip.broadcast.BroadcastQueue``
        to get transmit limits and invalidation for free.
        """
        return []

    def notify_message(self, message: bytes) -> None:
        """A user broadcast (or direct user message) arrived."""

    def local_state(self, join: bool) -> bytes:
        """Our full state, sent in a push-pull exchange."""
        return b""

    def merge_remote_state(self, state: bytes, join: bool) -> None:
        """A peer's full state, received in a push-pull exchange."""

    def state_digest(self) -> bytes:
        """A short digest of ``local_state``: equal digests mean nothing to exchange.

        Mixed into the push-pull digest; return b"" if the layer has no state.
        """
        return b""
