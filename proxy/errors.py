"""Errors of the ``proxy`` package, split as h11 splits them: the peer's fault or ours."""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error the ``proxy`` package raises."""


class RemoteProtocolError(ProxyError):
    """A peer sent something we cannot accept. Drop it, count it by ``reason``, go on."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        """A short, bounded label (``malformed``, ``bad_header``...) used in metrics."""


class LocalProtocolError(ProxyError):
    """We asked a core to do something that makes no sense (our bug or misuse)."""
