"""When an agent renews its leaf certificates. Pure arithmetic on times.

Theory of operation
-------------------
A leaf is renewed at about half its lifetime, at a point drawn uniformly from
40 %-60 % of ``[NotBefore, NotAfter]`` (``rng_fraction`` is the caller's random
draw in ``[0, 1)``; cores take no ``random``). Two reasons for the window:

* **Half-life, not Consul's 60 %-90 %.** Consul's leaf cache
  (``calculateSoftExpiry``) renews between 60 % and 90 % of the lifetime. We renew
  earlier because a leaf must stay usable while no leader exists: renewing at
  ~50 % leaves half the TTL (36 h at the default 72 h) to elect a leader, instead
  of 7-29 h.
* **Jitter.** Leaves issued together (a cluster start, a root rotation) would
  otherwise come back together. Spreading them over 20 % of the TTL (14.4 h at
  72 h) turns a wave of N renewals into ~N / (0.2 × TTL) signatures per second.

A failed renewal is retried by the caller; nothing here stops a leaf from being
used until it expires (:func:`leaf_usable`).

After a root rotation the agent re-issues every leaf signed under an old root
(:func:`needs_reissue`), spread over :func:`rotation_spread` so that the leader is
not asked for every certificate of the cluster at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509

from ca.bundle import TrustBundle, utc
from ca.errors import LocalProtocolError
from ca.issuer import LeafCertificate

#: Start of the renewal window, as a fraction of the lifetime.
RENEW_WINDOW_START: Final = 0.4
#: End of the renewal window: mean renewal at exactly half-life.
RENEW_WINDOW_END: Final = 0.6
#: Shortest re-issue spread after a rotation: enough to smooth a small cluster.
MIN_ROTATION_SPREAD: Final = timedelta(seconds=30)
#: Share of the leader's measured signing capacity a re-issue wave may use, so that
#: ordinary renewals and new registrations still get through.
ROTATION_CAPACITY_SHARE: Final = 0.5


def renew_at(not_before: datetime, not_after: datetime, rng_fraction: float) -> datetime:
    """When to renew a leaf valid over ``[not_before, not_after]``.

    ``rng_fraction`` in ``[0, 1)`` places it uniformly in the 40 %-60 % window.
    """
    if not 0.0 <= rng_fraction <= 1.0:
        raise LocalProtocolError("rng_fraction must be in [0, 1]")
    lifetime = not_after - not_before
    if lifetime <= timedelta(0):
        raise LocalProtocolError("not_after must be after not_before")
    share = RENEW_WINDOW_START + (RENEW_WINDOW_END - RENEW_WINDOW_START) * rng_fraction
    return not_before + lifetime * share


def leaf_usable(cert: x509.Certificate | LeafCertificate, now: datetime) -> bool:
    """Whether a leaf may still be presented: inside its validity period (both ends
    inclusive, RFC 5280 §4.1.2.5, as ``verify_leaf`` checks). A leaf stays usable
    while no leader exists, until it expires."""
    moment = utc(now)
    if isinstance(cert, LeafCertificate):
        return cert.not_before <= moment <= cert.not_after
    return cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc


def needs_reissue(leaf: LeafCertificate, bundle: TrustBundle) -> bool:
    """Whether a leaf was signed under a root that is no longer the active one (a
    rotation happened): it still verifies, but must be replaced before the old root
    is pruned."""
    return leaf.root_id != bundle.active_root_id


def rotation_spread(certificates: int, signing_rate: float) -> timedelta:
    """How long to spread the re-issue of ``certificates`` leaves after a rotation so
    that the leader spends at most :data:`ROTATION_CAPACITY_SHARE` of its measured
    ``signing_rate`` (certificates/s, see ``bench/ca_sign.py``) on them."""
    if signing_rate <= 0 or certificates < 0:
        raise LocalProtocolError("signing_rate must be positive, certificates >= 0")
    seconds = certificates / (signing_rate * ROTATION_CAPACITY_SHARE)
    return max(MIN_ROTATION_SPREAD, timedelta(seconds=seconds))


def reissue_at(rotation_seen: datetime, spread: timedelta, rng_fraction: float) -> datetime:
    """When to re-issue one leaf after seeing a rotation: uniform over ``spread``."""
    if not 0.0 <= rng_fraction <= 1.0:
        raise LocalProtocolError("rng_fraction must be in [0, 1]")
    return rotation_seen + spread * rng_fraction


def soonest_expiry(leaves: Iterable[LeafCertificate]) -> datetime | None:
    """The earliest ``not_after`` among an agent's leaves: gossiped with the bundle
    fingerprint so operators see a node about to lose its identities."""
    return min((leaf.not_after for leaf in leaves), default=None)
