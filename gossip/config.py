"""Gossip protocol settings and the named presets.

``lan``, ``wan`` and ``local`` reproduce hashicorp/memberlist's ``DefaultLANConfig``,
``DefaultWANConfig`` and ``DefaultLocalConfig`` (config.go) parameter for parameter, and
switch off every meshnode extension, so that they behave like memberlist and serve as
the baseline our benchmarks compare against.

``default`` is meshnode's own tuning (see ``docs/gossip.md`` for the measurements that
chose each number), and ``swim`` is ``default`` with the Lifeguard extensions switched
off (fixed suspicion timeout, no awareness, no nacks, no buddy system), to measure what
Lifeguard buys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Final

#: Largest node metadata, as memberlist's MetaMaxSize: meta rides in every alive message.
META_MAX_SIZE: Final = 512
#: Longest member name we accept from the wire.
NAME_MAX_LENGTH: Final = 128
#: Default port for UDP and TCP (memberlist's BindPort).
DEFAULT_PORT: Final = 7946


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Every knob of the gossip protocol. Times are in seconds."""

    probe_interval: float = 1.0
    """Time between failure-detection probes (SWIM's protocol period)."""
    probe_timeout: float = 0.5
    """How long to wait for a direct ack before probing indirectly."""
    indirect_checks: int = 3
    """Members asked to probe on our behalf when a direct probe fails (SWIM's k)."""
    suspicion_mult: int = 4
    """Suspicion timeout = mult × max(1, log10(N)) × probe_interval (memberlist)."""
    suspicion_min_timeout: float = 0.0
    """meshnode: a floor under the minimum suspicion timeout, in seconds. log10(N)
    makes small clusters quick to declare death; a member that stalls for a few
    seconds (GC, a starved VM) would be declared dead and flap."""
    suspicion_max_timeout_mult: int = 6
    """Lifeguard: the timeout starts at this multiple of the minimum and shrinks."""
    retransmit_mult: int = 4
    """Each broadcast is sent mult × ceil(log10(N+1)) times."""
    retransmit_min: int = 0
    """meshnode: a floor under that limit, for small clusters (where log10 gives 2
    or 4 copies, and a member that joins later learns only what its seed knew)."""
    gossip_interval: float = 0.2
    """Time between dedicated gossip rounds."""
    gossip_nodes: int = 3
    """Members each gossip round sends to (fanout)."""
    gossip_to_the_dead_time: float = 30.0
    """Dead members still receive gossip for this long, to learn they are dead."""
    push_pull_interval: float = 30.0
    """Full state exchange with one random member; scaled up above 32 members."""
    tcp_timeout: float = 10.0
    """Limit for one stream exchange (push-pull, fallback ping)."""
    awareness_max_multiplier: int = 8
    """Lifeguard local health: the probe interval stretches up to this factor."""
    udp_buffer_size: int = 1400
    """Largest UDP payload we send; fits a 1500-byte MTU with room for headers."""
    lifeguard: bool = True
    """Awareness, dynamic suspicion, nacks and the buddy system (Lifeguard §III)."""
    relay_nack_fraction: float = 1.0
    """A relay nacks after this fraction of probe_timeout without an ack. memberlist
    waits the whole timeout, so nacks often reach the prober after its period ended
    and count as missing; Lifeguard's paper nacks at 80 %."""
    nack_gated_suspicion: bool = False
    """meshnode, with Lifeguard: a failed probe accuses the target only if at least
    one relay's nack came back; with none, we are the likelier fault (Lifeguard's own
    reading of missing nacks), so we only raise our awareness score."""
    tcp_fallback_probe: bool = True
    """Also probe over TCP when the UDP probe failed (memberlist protocol v3)."""
    reconnect_interval: float = 0.0
    """meshnode: every so often push-pull with one random dead member, so a healed
    partition merges without a manual rejoin (memberlist #222). 0 disables."""
    reconnect_timeout: float = 0.0
    """How long a dead member is kept (and reconnected to) before it is reaped.
    0 means memberlist's rule: reap after gossip_to_the_dead_time."""
    left_reap_timeout: float = 0.0
    """How long a member that left is remembered (a tombstone against stale alive
    messages). 0 means memberlist's rule: reap after gossip_to_the_dead_time."""
    push_pull_digest: bool = False
    """meshnode: push-pull sends a 16-byte state digest over UDP first; the full TCP
    exchange happens only when the digests differ, so anti-entropy can run often."""
    push_pull_settle: float = 2.0
    """With ``push_pull_digest``: differing digests start a full exchange only when
    both views have been unchanged this long (news in flight settles by gossip)."""
    structured_gossip: bool = False
    """meshnode: gossip rounds send to ring neighbours at fixed offsets instead of
    random members, and broadcasts ride only in gossip rounds (not on probes), so each
    member has exactly ``retransmit limit`` distinct senders for every message."""
    direct_refute: bool = False
    """meshnode: send a refutation straight to every member that accused us, as well
    as gossiping it, so the accuser's suspicion timer stops sooner."""
    max_members: int = 65536
    """Members beyond this are not learned (bounds memory against a hostile peer)."""
    max_stream_size: int = 32 * 1024 * 1024
    """Largest stream message accepted (push-pull state of ~300k members)."""

    def __post_init__(self) -> None:
        problems = []
        for field in ("probe_interval", "probe_timeout", "gossip_interval", "tcp_timeout"):
            if getattr(self, field) <= 0:
                problems.append(f"{field} must be > 0")
        if self.probe_timeout > self.probe_interval:
            problems.append("probe_timeout must not exceed probe_interval")
        for field in ("indirect_checks", "gossip_nodes", "retransmit_mult"):
            if getattr(self, field) < 0:
                problems.append(f"{field} must be >= 0")
        if self.suspicion_mult < 1 or self.suspicion_max_timeout_mult < 1:
            problems.append("suspicion multipliers must be >= 1")
        if self.awareness_max_multiplier < 1:
            problems.append("awareness_max_multiplier must be >= 1")
        if not 512 <= self.udp_buffer_size <= 65000:
            problems.append("udp_buffer_size must be between 512 and 65000")
        if self.push_pull_interval < 0 or self.reconnect_interval < 0:
            problems.append("intervals must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    def replace(self, **changes: object) -> GossipConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    # Formulas, as memberlist's util.go computes them (log10, not ln).

    def retransmit_limit(self, members: int) -> int:
        """Transmissions per broadcast: mult × ceil(log10(N+1))."""
        return max(self.retransmit_min, self.retransmit_mult * math.ceil(math.log10(members + 1)))

    def suspicion_timeouts(self, members: int) -> tuple[float, float]:
        """(min, max) suspicion timeout for a cluster of ``members``."""
        node_scale = max(1.0, math.log10(max(1, members)))
        minimum = self.suspicion_mult * node_scale * self.probe_interval
        minimum = max(minimum, self.suspicion_min_timeout)
        if not self.lifeguard:
            return minimum, minimum
        return minimum, self.suspicion_max_timeout_mult * minimum

    def push_pull_period(self, members: int) -> float:
        """memberlist's pushPullScale: the interval grows with log2(N) above 32.

        With ``push_pull_digest`` an idle exchange is one small datagram, so the
        interval stays fixed whatever the size of the cluster.
        """
        threshold = 32
        if self.push_pull_digest:
            return self.push_pull_interval
        if members <= threshold:
            return self.push_pull_interval
        multiplier = math.ceil(math.log2(members) - math.log2(threshold)) + 1
        return self.push_pull_interval * multiplier

    @property
    def reap_dead_after(self) -> float:
        return self.reconnect_timeout or self.gossip_to_the_dead_time

    @property
    def reap_left_after(self) -> float:
        return self.left_reap_timeout or self.gossip_to_the_dead_time


LAN: Final = GossipConfig()
"""memberlist DefaultLANConfig."""

WAN: Final = GossipConfig(
    probe_interval=5.0,
    probe_timeout=3.0,
    suspicion_mult=6,
    gossip_interval=0.5,
    gossip_nodes=4,
    gossip_to_the_dead_time=60.0,
    push_pull_interval=60.0,
    tcp_timeout=30.0,
)
"""memberlist DefaultWANConfig."""

LOCAL: Final = GossipConfig(
    probe_interval=1.0,
    probe_timeout=0.2,
    indirect_checks=1,
    suspicion_mult=3,
    retransmit_mult=2,
    gossip_interval=0.1,
    gossip_to_the_dead_time=15.0,
    push_pull_interval=15.0,
    tcp_timeout=1.0,
)
"""memberlist DefaultLocalConfig."""

DEFAULT: Final = GossipConfig(
    probe_interval=0.4,
    probe_timeout=0.2,
    indirect_checks=3,
    suspicion_mult=3,
    suspicion_min_timeout=4.0,
    suspicion_max_timeout_mult=4,
    retransmit_mult=2,
    retransmit_min=6,
    relay_nack_fraction=0.8,
    nack_gated_suspicion=True,
    gossip_interval=0.2,
    gossip_nodes=4,
    gossip_to_the_dead_time=30.0,
    push_pull_interval=2.0,
    push_pull_settle=1.0,
    tcp_timeout=5.0,
    reconnect_interval=5.0,
    reconnect_timeout=72 * 3600.0,
    left_reap_timeout=24 * 3600.0,
    push_pull_digest=True,
    structured_gossip=True,
    direct_refute=True,
)
"""meshnode's own tuning; docs/gossip.md gives the measurements behind it."""

SWIM: Final = DEFAULT.replace(lifeguard=False)
"""``default`` with Lifeguard off: the SWIM-only comparison point."""

PRESETS: Final[dict[str, GossipConfig]] = {
    "default": DEFAULT,
    "lan": LAN,
    "wan": WAN,
    "local": LOCAL,
    "swim": SWIM,
}


def preset(name: str) -> GossipConfig:
    """The preset called ``name``; raises KeyError naming the choices."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown gossip preset {name!r}; choose one of {sorted(PRESETS)}") from None
