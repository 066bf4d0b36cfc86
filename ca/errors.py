"""Errors of the ``ca`` package, split as h11 splits them: the peer's fault or ours."""

from __future__ import annotations


class CAError(Exception):
    """Base of every error the ``ca`` package raises."""


class RemoteProtocolError(CAError):
    """A peer sent something we cannot accept. Drop it, count it by ``reason``, go on."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        """A short, bounded label (``malformed``, ``unknown_type``...) used in metrics."""


class LocalProtocolError(CAError):
    """We asked a core to do something that makes no sense (our bug or misuse)."""
