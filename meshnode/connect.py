"""What the Connect parts of the HTTP API need from the agent: trust, leaves, policy.

The agent (``meshnode.agent``) implements :class:`ConnectHandle`; the routes in
``meshnode.connect_api`` only call it. Reads are local (policy and the trust bundle
are replicated to every agent); writes are forwarded to the CA leader, which signs
them, so each write can fail with :class:`NoLeaderError` (HTTP 503) while reads and
enforcement go on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from ca.bundle import TrustBundle
from meshnode.errors import MeshError
from meshnode.policy import PolicyEntry, PolicyStore, PolicyValue


class NoLeaderError(MeshError):
    """No CA leader is known or it did not answer: writes and first certificates
    wait for one (HTTP 503 with this message)."""


class PermissionDeniedError(MeshError):
    """The leader refused the write's ACL token (HTTP 403)."""


class RequestRefusedError(MeshError):
    """The leader refused a request for a reason the caller can fix (HTTP 400):
    ``reason`` is a short code (``not_registered``, ``id_mismatch``...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LocalLeaf:
    """A leaf certificate this agent holds for one of its services (or itself)."""

    service: str
    """The service name (``""`` for the agent's own identity)."""
    spiffe_id: str
    cert_pem: str
    """The leaf, then the intermediates to send with it (a full chain for TLS)."""
    leaf_pem: str
    """The leaf alone."""
    private_key_pem: str
    serial_number: int
    not_before: datetime
    not_after: datetime
    root_id: str
    """``BundleRoot.id`` of the root that signed it."""
    index: int
    """Blocking-query index: bumps each time this service's leaf is replaced."""


class ConnectHandle(Protocol):
    """The agent as the Connect API routes see it."""

    @property
    def policy(self) -> PolicyStore:
        """The replicated policy (read it; never write it directly)."""
        ...

    @property
    def default_intention_policy(self) -> str:
        """``allow`` or ``deny``: the answer when no intention matches."""
        ...

    def trust_bundle(self) -> TrustBundle | None:
        """The trust bundle this agent serves; None before it has seen one."""
        ...

    def connect_index(self) -> int:
        """Bumps whenever the bundle or one of this agent's leaves changes."""
        ...

    def on_connect_change(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """Call ``callback(connect_index)`` after each such change; returns an
        unsubscribe function."""
        ...

    async def leaf_certificate(self, service: str) -> LocalLeaf:
        """The current leaf for ``service`` registered on this agent, obtaining one
        from the leader first if needed (this may take a round trip). Raises
        ``LookupError`` if no instance of ``service`` is registered here,
        :class:`NoLeaderError` if there is no usable leaf and no leader answered,
        :class:`RequestRefusedError` if the leader refused."""
        ...

    async def write_policy(self, value: PolicyValue, token: str | None) -> PolicyEntry:
        """Forward a validated write to the leader and return the signed entry once
        it is applied locally. Raises ``ValidationError`` (the leader's checks
        against its copy), :class:`NoLeaderError`, :class:`PermissionDeniedError`."""
        ...

    async def delete_policy(self, kind: str, name: str, token: str | None) -> bool:
        """Forward a delete; False if there was nothing to delete. Same errors."""
        ...

    async def rotate_ca(self, token: str | None) -> str:
        """Ask the leader to rotate the root; returns the new root's ID. Raises
        :class:`NoLeaderError`, :class:`PermissionDeniedError`, or
        :class:`RequestRefusedError` (an operator CA cannot be rotated here)."""
        ...

    def ca_status(self) -> dict[str, object]:
        """``GET /v1/mesh/ca/status``: per agent, the bundle fingerprint it serves and
        its soonest leaf expiry, with ``Lagging`` and ``ExpiringSoon`` flags."""
        ...
