"""Errors of the gossip layer, split as h11 splits them: the peer's fault or ours."""

from __future__ import annotations


class GossipError(Exception):
    """Base of every error the gossip package raises."""


class RemoteProtocolError(GossipError):
    """A peer sent something we cannot accept. Drop it, count it by ``reason``, go on."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        """A short, bounded label (``malformed``, ``decrypt_failed``...) used in metrics."""


class LocalProtocolError(GossipError):
    """We asked the core to do something that makes no sense (our bug or misuse)."""
