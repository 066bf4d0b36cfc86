"""The SWIM + Lifeguard membership protocol as a sans-IO state machine.

Theory of operation
-------------------
``Swim`` owns one member's view of the cluster. It never touches a socket or a clock:
the adapter (``gossip.transport``) or the simulator (``gossip.sim``) feeds it

* ``receive_packet(data, address, now)`` for every datagram,
* ``receive_stream(data, address, now) -> reply`` for every inbound stream message,
* ``receive_stream_reply(stream_id, data | None, now)`` when a stream we asked for ends,
* ``handle_timer(now)`` when ``get_timer()`` comes due,

and after each call drains ``packets_to_send()``, ``streams_to_open()`` and
``next_event()``. Randomness comes from the ``rng`` it was given, so a seed reproduces
a run exactly (the aioquic shape; STYLE.md rules 1–3).

Failure detection (SWIM §3–4, Lifeguard §III–IV, memberlist state.go):

1. Every protocol period we probe the next member of a randomly shuffled round-robin
   list (SWIM §4.3 bounds first detection to 2n−1 periods). A suspect target gets the
   suspicion piggybacked on the ping itself (Lifeguard's *buddy system*), so it can
   refute at once.
2. No ack within ``probe_timeout``: ``indirect_checks`` random members ping the target
   for us and nack if they get nothing; a TCP ping goes out in parallel (it gets through
   where UDP is lost or filtered).
3. No ack by the end of the period: we suspect the target and broadcast it. Missing
   nacks mean *we* may be the slow one, so our awareness score rises, which stretches
   our probe interval (local health awareness); a success lowers it.
4. Each member that hears the suspicion starts a ``Suspicion`` timer that shrinks as
   independent accusers confirm it. Only the suspect may refute, by raising its
   incarnation; when the timer fires the member is declared dead.

State precedence (memberlist aliveNode/suspectNode/deadNode): a message about a member
is applied only if its incarnation is newer, or equal and the state is "worse"
(alive < suspect < dead). A dead or left member comes back only with a higher
incarnation, which only that member can produce.

Dissemination: every state change is queued in a ``BroadcastQueue`` and piggybacked on
every packet; a gossip round every ``gossip_interval`` sends queued news to
``gossip_nodes`` random members (including the recently dead, so they learn they were
declared dead and refute). Push-pull exchanges full state with a random member over a
stream (anti-entropy); joining is a push-pull with the seeds.

meshnode extensions, each behind a setting so the ``lan`` preset stays memberlist:
``push_pull_digest`` (a 16-byte UDP digest first; a full exchange only on mismatch, so
anti-entropy can run every few seconds for almost nothing), ``reconnect_interval``
(push-pull with a random dead member now and then: a healed partition merges by
itself, memberlist #222) and ``direct_refute`` (the refutation also goes straight to
the accuser, whose timer runs first).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from gossip import codec
from gossip.broadcast import BroadcastQueue
from gossip.codec import (
    Ack,
    Alive,
    Dead,
    Digest,
    IndirectPing,
    MemberRecord,
    Message,
    Nack,
    Ping,
    PushPull,
    Suspect,
    User,
)
from gossip.config import META_MAX_SIZE, GossipConfig
from gossip.delegate import Delegate
from gossip.errors import LocalProtocolError, RemoteProtocolError
from gossip.events import (
    Address,
    Event,
    JoinCompleted,
    LeaveCompleted,
    Member,
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
from gossip.keyring import Envelope
from gossip.suspicion import Suspicion

if TYPE_CHECKING:  # the core takes a Random; it never makes one (sans-IO rule)
    import random

ALIVE: Final = MemberState.ALIVE
SUSPECT: Final = MemberState.SUSPECT
DEAD: Final = MemberState.DEAD
LEFT: Final = MemberState.LEFT

#: Probe round-trip histogram buckets (seconds), for the adapter's metrics.
RTT_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: Bound on concurrent outgoing stream exchanges (memberlist caps push-pulls at 128).
MAX_PENDING_STREAMS: Final = 128
#: Bound on relayed probes we track for others: a flood of indirect pings cannot
#: grow memory (each entry lives one probe timeout anyway).
MAX_RELAYS: Final = 1024
#: Keys of the one-timer-per-core heap.
_PROBE, _PROBE_ACK_TIMEOUT, _PROBE_DEADLINE = "probe", "probe_ack_timeout", "probe_deadline"
_GOSSIP, _PUSH_PULL, _RECONNECT = "gossip", "push_pull", "reconnect"
_RELAY, _SUSPICION, _REAP, _LEAVE = "relay", "suspicion", "reap", "leave"
_RECHECK = "recheck"
#: Bound on peers whose differing digest we have promised to look at again.
MAX_RECHECKS: Final = 16


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """A stream exchange the adapter should run: connect, send ``payload`` as one
    framed message, read one framed reply, and report it with
    ``receive_stream_reply(stream_id, reply_or_None, now)``."""

    stream_id: int
    address: Address
    payload: bytes
    timeout: float


@dataclass(slots=True)
class Statistics:
    """Counters for metrics and the simulator. Read them; do not change them."""

    packets_sent: int = 0
    packets_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    streams_opened: int = 0
    streams_accepted: int = 0
    stream_bytes_sent: int = 0
    stream_bytes_received: int = 0
    probes: int = 0
    probes_failed: int = 0
    probes_inconclusive: int = 0
    """Failed probes not turned into suspicions because no relay answered either."""
    suspicions_started: int = 0
    """Suspicions this member raised from its own failed probes."""
    refutations: int = 0
    """Times this member refuted a suspicion about itself."""
    push_pulls: int = 0
    digests_sent: int = 0
    digest_mismatches: int = 0
    digests_unsettled: int = 0
    """Differing digests seen while news was still spreading (checked again later)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Packets and stream messages dropped, by reason."""
    rtt_buckets: list[int] = field(default_factory=lambda: [0] * (len(RTT_BUCKETS) + 1))
    rtt_sum: float = 0.0
    rtt_count: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def observe_rtt(self, seconds: float) -> None:
        index = 0
        while index < len(RTT_BUCKETS) and seconds > RTT_BUCKETS[index]:
            index += 1
        self.rtt_buckets[index] += 1
        self.rtt_sum += seconds
        self.rtt_count += 1


class _Record:
    """Our mutable knowledge of one member."""

    __slots__ = ("address", "incarnation", "meta", "name", "slot", "state", "state_changed_at")

    def __init__(
        self, name: str, address: Address, meta: bytes, incarnation: int, now: float
    ) -> None:
        self.name = name
        self.address = address
        self.meta = meta
        self.incarnation = incarnation
        self.state = ALIVE
        self.state_changed_at = now
        self.slot = -1  # index in Swim._others, for O(1) random choice and removal

    def snapshot(self) -> Member:
        return Member(
            self.name, self.address, self.meta, self.incarnation, self.state, self.state_changed_at
        )

    def digest_term(self) -> int:
        return _digest_term(self.name, self.incarnation, int(self.state))


@functools.lru_cache(maxsize=65536)
def _ring_key(name: str) -> int:
    """A member's place on the structured-gossip ring."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=256)
def _ring_offset_fraction(index: int) -> float:
    """Where, as a fraction of the ring, the ``index``-th gossip offset points.

    Independent pseudo-random fractions, the same on every member. (Multiples of one
    number, such as the golden ratio's, would make every offset a multiple of one
    step: the ring graph would then be a long cycle, and news would crawl along it.)
    """
    digest = hashlib.blake2b(b"meshnode-ring-offset-%d" % index, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@functools.lru_cache(maxsize=65536)
def _digest_term(name: str, incarnation: int, state: int) -> int:
    """One member's share of the order-independent state digest (a sum mod 2**64)."""
    text = f"{name}\x00{incarnation}\x00{state}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


class _Probe:
    __slots__ = ("acked", "expected_nacks", "nacks", "seq", "started", "target")

    def __init__(self, seq: int, target: str, started: float) -> None:
        self.seq = seq
        self.target = target
        self.started = started
        self.acked = False
        self.nacks = 0
        self.expected_nacks = 0


class _Relay:
    __slots__ = ("source_address", "source_seq", "want_nack")

    def __init__(self, source_seq: int, source_address: Address, want_nack: bool) -> None:
        self.source_seq = source_seq
        self.source_address = source_address
        self.want_nack = want_nack


class Swim:
    """One member's SWIM + Lifeguard protocol state. See the module docstring."""

    def __init__(
        self,
        name: str,
        address: Address,
        config: GossipConfig,
        *,
        rng: random.Random,
        now: float,
        delegate: Delegate | None = None,
        envelope: Envelope | None = None,
        meta: bytes | None = None,
        incarnation: int = 0,
    ) -> None:
        if not 0 < len(name) <= 128:
            raise LocalProtocolError("member name must be 1..128 characters")
        self.delegate = delegate or Delegate()
        if meta is None:
            meta = self.delegate.node_meta(META_MAX_SIZE)
        if len(meta) > META_MAX_SIZE:
            raise LocalProtocolError(f"metadata is {len(meta)} bytes; at most {META_MAX_SIZE}")
        self.name = name
        self.config = config
        self.rng = rng
        self.envelope = envelope or Envelope()
        self.stats = Statistics()

        self._members: dict[str, _Record] = {}
        self._others: list[_Record] = []  # every member but us, for random choice
        self._ring: list[tuple[int, str]] = []  # every member, by hash: structured gossip
        self._gossip_round = 0
        self._digest_sum = 0
        self._now = now
        self._digest_changed_at = now
        self._delegate_digest = b""
        self._self = _Record(name, address, meta, incarnation, now)
        self._add_record(self._self)

        self._queue = BroadcastQueue(
            config.retransmit_mult,
            lambda: len(self._members),
            retransmit_min=config.retransmit_min,
        )
        self._awareness = 0
        self._seq = 0
        self._stream_id = 0
        self._leaving = False
        self._left = False
        self._now = now

        self._probe_order: list[str] = []
        self._probe_index = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._rechecks: set[Address] = set()
        self._suspicions: dict[str, Suspicion] = {}
        self._pending_streams: dict[int, tuple[str, object, int]] = {}
        self._join_pending: set[int] = set()
        self._join_contacted = 0
        self._join_failed: list[Address] = []

        self._timers: list[tuple[float, int, str, object]] = []
        self._timer_keys: dict[tuple[str, object], int] = {}
        self._timer_seq = 0

        self._packets: list[tuple[bytes, Address]] = []
        self._streams: list[StreamRequest] = []
        self._events: deque[Event] = deque()

        # Stagger the periodic work so a cluster started at once does not tick in step.
        self._set_timer(_PROBE, None, now + rng.random() * config.probe_interval)
        self._set_timer(_GOSSIP, None, now + rng.random() * config.gossip_interval)
        if config.push_pull_interval > 0:
            self._set_timer(_PUSH_PULL, None, now + rng.random() * self._push_pull_period())
        if config.reconnect_interval > 0:
            self._set_timer(_RECONNECT, None, now + rng.random() * config.reconnect_interval)

    # ------------------------------------------------------------------ public: state

    @property
    def address(self) -> Address:
        return self._self.address

    @property
    def incarnation(self) -> int:
        return self._self.incarnation

    @property
    def awareness(self) -> int:
        """Lifeguard local health score: 0 is healthy; the probe interval is × (score+1)."""
        return self._awareness

    @property
    def broadcast_queue_depth(self) -> int:
        return len(self._queue)

    @property
    def broadcast_transmissions(self) -> int:
        return self._queue.transmissions

    def members(self) -> list[Member]:
        """Every member we know of, ourselves included."""
        return [record.snapshot() for record in self._members.values()]

    def member(self, name: str) -> Member | None:
        record = self._members.get(name)
        return record.snapshot() if record else None

    def count(self, state: MemberState) -> int:
        return sum(1 for record in self._members.values() if record.state == state)

    def digest(self) -> bytes:
        """16 bytes that are equal on two members exactly when their views (and their
        delegates' digests) are equal, with overwhelming probability."""
        delegate_digest = self.delegate.state_digest()
        if delegate_digest != self._delegate_digest:
            self._delegate_digest = delegate_digest
            self._digest_changed_at = self._now
        material = self._digest_sum.to_bytes(8, "big") + delegate_digest
        return hashlib.blake2b(material, digest_size=16).digest()

    # ------------------------------------------------------------------ public: outputs

    def packets_to_send(self) -> list[tuple[bytes, Address]]:
        packets, self._packets = self._packets, []
        return packets

    def streams_to_open(self) -> list[StreamRequest]:
        streams, self._streams = self._streams, []
        return streams

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        timers = self._timers
        while timers:
            deadline, seq, kind, key = timers[0]
            if self._timer_keys.get((kind, key)) == seq:
                return deadline
            heapq.heappop(timers)
        return None

    # ------------------------------------------------------------------ public: inputs

    def handle_timer(self, now: float) -> None:
        """Run every timer due at ``now``."""
        self._now = now
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, seq, kind, key = heapq.heappop(timers)
            if self._timer_keys.get((kind, key)) != seq:
                continue
            del self._timer_keys[(kind, key)]
            self._fire(kind, key, now)

    def receive_packet(self, data: bytes, address: Address, now: float) -> None:
        """A datagram arrived from ``address``."""
        self._now = now
        stats = self.stats
        stats.packets_received += 1
        stats.bytes_received += len(data)
        try:
            plain = self.envelope.open(data)
            for message in codec.iter_packet(plain):
                self._handle(message, address, now)
        except RemoteProtocolError as exc:
            stats.drop(exc.reason)

    def receive_stream(self, data: bytes, address: Address, now: float) -> bytes | None:
        """A stream message arrived; returns the reply to write back (None: close)."""
        self._now = now
        self.stats.streams_accepted += 1
        self.stats.stream_bytes_received += len(data)
        try:
            message = codec.decode_stream(self.envelope.open(data), self.config.max_members)
        except RemoteProtocolError as exc:
            self.stats.drop(exc.reason)
            return None
        reply: Message | None = None
        match message:
            case PushPull(join, records, user_state):
                self.stats.push_pulls += 1
                self._merge_remote(records, user_state, join, now)
                reply = self._local_push_pull(join=False)
            case Ping(seq, target, _):
                if target == self.name:
                    reply = Ack(seq)
                else:
                    self.stats.drop("misdirected")
            case User(payload):
                self.delegate.notify_message(payload)
                reply = Ack(0)  # delivered: the sender's stream ends cleanly
            case _:
                self.stats.drop("unexpected")
        if reply is None:
            return None
        sealed = self.envelope.seal(codec.encode(reply))
        self.stats.stream_bytes_sent += len(sealed)
        return sealed

    def receive_stream_reply(self, stream_id: int, data: bytes | None, now: float) -> None:
        """The stream exchange ``stream_id`` ended with ``data`` (None: it failed)."""
        self._now = now
        purpose = self._pending_streams.pop(stream_id, None)
        if purpose is None:
            return
        kind, detail, request_size = purpose
        message: Message | None = None
        if data is not None:
            # Counted once answered: a refused connection carries no payload.
            self.stats.stream_bytes_sent += request_size
            self.stats.stream_bytes_received += len(data)
            try:
                message = codec.decode_stream(self.envelope.open(data), self.config.max_members)
            except RemoteProtocolError as exc:
                self.stats.drop(exc.reason)
        if kind == "ping":
            probe = self._probe
            if isinstance(message, Ack) and probe is not None and probe.seq == message.seq:
                self._probe_succeeded(probe, now)
        elif kind == "push_pull":
            ok = isinstance(message, PushPull)
            if isinstance(message, PushPull):
                self.stats.push_pulls += 1
                self._merge_remote(message.members, message.user_state, message.join, now)
            if stream_id in self._join_pending:
                self._join_pending.discard(stream_id)
                if ok:
                    self._join_contacted += 1
                else:
                    assert isinstance(detail, tuple)
                    self._join_failed.append(detail)
                if not self._join_pending:
                    self._events.append(
                        JoinCompleted(self._join_contacted, tuple(self._join_failed))
                    )

    def join(self, seeds: Sequence[Address], now: float) -> None:
        """Push-pull with every seed; ``JoinCompleted`` reports how it went."""
        self._now = now
        self._join_contacted = 0
        self._join_failed = []
        # Announce ourselves too (memberlist's setAlive): the seeds spread us, and
        # so do we, to the members the seeds' state tells us about.
        self._broadcast_self_alive()
        for seed in seeds:
            if seed == self.address:
                continue
            stream_id = self._open_push_pull(seed, join=True)
            if stream_id is None:
                self._join_failed.append(seed)
            else:
                self._join_pending.add(stream_id)
        if not self._join_pending:
            self._events.append(JoinCompleted(0, tuple(seeds)))
            self._join_failed = []

    def preload(self, records: Sequence[MemberRecord], now: float) -> None:
        """Learn members without announcing them: no broadcasts, no events.

        For a simulator that starts with a formed cluster. A running member learns
        others only through messages (``join``, gossip, push-pull).
        """
        self._now = now
        ring = self._ring
        self._ring = []  # rebuilt once below instead of one insertion per record
        for r in records:
            if r.name == self.name or r.name in self._members:
                continue
            record = _Record(r.name, r.address, r.meta, r.incarnation, now)
            self._add_record(record)
            if r.state != ALIVE:
                self._set_state(record, r.state, now)
        ring.extend(self._ring)
        ring.sort()
        self._ring = ring

    def leave(self, now: float) -> None:
        """Tell the cluster we are leaving (others mark us *left*, not dead).

        The notice goes straight to a few members and into the broadcast queue;
        ``LeaveCompleted`` follows two gossip rounds later, when the adapter may stop.
        """
        self._now = now
        if self._leaving:
            return
        self._leaving = True
        record = self._self
        notice = Dead(record.incarnation, self.name, self.name)
        self._set_state(record, LEFT, now)
        encoded = codec.encode(notice)
        self._queue.queue(encoded, self.name)
        for target in self._random_members(2 * max(1, self.config.gossip_nodes), alive_only=True):
            self._send(target.address, encoded, now)
        self._set_timer(_LEAVE, None, now + 2 * self.config.gossip_interval)

    def send_user(
        self, address: Address, payload: bytes, now: float, *, reliable: bool = False
    ) -> None:
        """Send ``payload`` to the member at ``address`` only (memberlist SendBestEffort /
        SendReliable): one datagram, or over a stream when ``reliable``. It arrives at
        that member's ``delegate.notify_message``. The layer above (leader election,
        CA requests) rides on this."""
        self._now = now
        message = User(payload)
        if reliable:
            if len(self._pending_streams) >= MAX_PENDING_STREAMS:
                self.stats.drop("stream_limit")
                return
            self._open_stream(address, message, ("user", address))
            return
        encoded = codec.encode(message)
        if len(encoded) + self.envelope.overhead > self.config.udp_buffer_size:
            raise LocalProtocolError(
                f"a {len(payload)}-byte message does not fit a datagram; send it reliably"
            )
        self._emit_packet(address, encoded)

    def set_meta(self, meta: bytes, now: float) -> None:
        """Change our metadata: a new incarnation, broadcast to everyone."""
        if len(meta) > META_MAX_SIZE:
            raise LocalProtocolError(f"metadata is {len(meta)} bytes; at most {META_MAX_SIZE}")
        self._now = now
        record = self._self
        self._update_digest(record, remove=True)
        record.meta = meta
        record.incarnation += 1
        self._update_digest(record)
        self._broadcast_self_alive()

    # ------------------------------------------------------------------ timers

    def _set_timer(self, kind: str, key: object, deadline: float) -> None:
        self._timer_seq += 1
        self._timer_keys[(kind, key)] = self._timer_seq
        heapq.heappush(self._timers, (deadline, self._timer_seq, kind, key))

    def _cancel_timer(self, kind: str, key: object) -> None:
        self._timer_keys.pop((kind, key), None)

    def _fire(self, kind: str, key: object, now: float) -> None:
        if kind == _PROBE:
            self._probe_tick(now)
        elif kind == _GOSSIP:
            self._gossip_tick(now)
        elif kind == _PROBE_ACK_TIMEOUT:
            self._probe_ack_timeout(now)
        elif kind == _PROBE_DEADLINE:
            self._probe_deadline(now)
        elif kind == _RELAY:
            assert isinstance(key, int)
            self._relay_timeout(key, now)
        elif kind == _SUSPICION:
            assert isinstance(key, str)
            self._suspicion_timeout(key, now)
        elif kind == _PUSH_PULL:
            self._push_pull_tick(now)
        elif kind == _RECONNECT:
            self._reconnect_tick(now)
        elif kind == _REAP:
            assert isinstance(key, str)
            self._reap(key, now)
        elif kind == _RECHECK:
            assert isinstance(key, tuple)
            self._rechecks.discard(key)
            if not self._leaving:
                self._send_digest(key, now)
        elif kind == _LEAVE:
            self._left = True
            self._events.append(LeaveCompleted())

    # ------------------------------------------------------------------ membership table

    def _add_record(self, record: _Record) -> None:
        self._members[record.name] = record
        if record is not self._self:
            record.slot = len(self._others)
            self._others.append(record)
        self._update_digest(record)
        key = (_ring_key(record.name), record.name)
        self._ring.insert(bisect.bisect_left(self._ring, key), key)

    def _remove_record(self, record: _Record) -> None:
        self._update_digest(record, remove=True)
        key = (_ring_key(record.name), record.name)
        index = bisect.bisect_left(self._ring, key)
        if index < len(self._ring) and self._ring[index] == key:
            del self._ring[index]
        del self._members[record.name]
        last = self._others.pop()
        if last is not record:
            self._others[record.slot] = last
            last.slot = record.slot
        record.slot = -1

    def _update_digest(self, record: _Record, remove: bool = False) -> None:
        self._digest_changed_at = self._now
        term = record.digest_term()
        if remove:
            self._digest_sum = (self._digest_sum - term) % (1 << 64)
        else:
            self._digest_sum = (self._digest_sum + term) % (1 << 64)

    def _set_state(self, record: _Record, state: MemberState, now: float) -> None:
        self._update_digest(record, remove=True)
        record.state = state
        record.state_changed_at = now
        self._update_digest(record)

    def _random_members(self, count: int, *, alive_only: bool, exclude: str = "") -> list[_Record]:
        """Up to ``count`` distinct random members other than us (memberlist kRandomNodes)."""
        others = self._others
        if not others or count <= 0:
            return []
        chosen: list[_Record] = []
        seen: set[str] = set()
        horizon = self.config.gossip_to_the_dead_time
        now = self._now
        for _ in range(3 * len(others) if len(others) < 16 else 3 * count + 8):
            record = others[self.rng.randrange(len(others))]
            if record.name in seen or record.name == exclude:
                continue
            seen.add(record.name)
            if record.state in (ALIVE, SUSPECT) or (
                not alive_only and now - record.state_changed_at <= horizon
            ):
                chosen.append(record)
                if len(chosen) >= count:
                    break
        return chosen

    # ------------------------------------------------------------------ sending

    def _send(self, address: Address, message: bytes, now: float) -> None:
        """Send one message, with as many queued broadcasts piggybacked as fit."""
        if self.config.structured_gossip:
            # Broadcasts travel only in gossip rounds, to their structured targets.
            self._emit_packet(address, message)
            return
        envelope_cost = self.envelope.overhead
        budget = self.config.udp_buffer_size - envelope_cost - len(message)
        budget -= codec.COMPOUND_HEADER + codec.COMPOUND_PART_OVERHEAD
        extras = self._take_broadcasts(budget)
        if extras:
            payload = codec.encode_compound([message, *extras])
        else:
            payload = message
        self._emit_packet(address, payload)

    def _take_broadcasts(self, budget: int) -> list[bytes]:
        if budget <= codec.COMPOUND_PART_OVERHEAD:
            return []
        overhead = codec.COMPOUND_PART_OVERHEAD
        parts = self._queue.get(overhead, budget)
        used = sum(len(p) + overhead for p in parts)
        remaining = budget - used
        # User broadcasts are framed with one type byte.
        if remaining > overhead + 1:
            for user in self.delegate.broadcasts(overhead + 1, remaining):
                parts.append(bytes((codec.MessageType.USER,)) + user)
        return parts[: codec.MAX_COMPOUND_PARTS - 1]

    def _emit_packet(self, address: Address, payload: bytes) -> None:
        sealed = self.envelope.seal(payload)
        self.stats.packets_sent += 1
        self.stats.bytes_sent += len(sealed)
        self._packets.append((sealed, address))

    def _open_stream(self, address: Address, message: Message, purpose: tuple[str, object]) -> int:
        self._stream_id += 1
        sealed = self.envelope.seal(codec.encode(message))
        self.stats.streams_opened += 1
        self._pending_streams[self._stream_id] = (purpose[0], purpose[1], len(sealed))
        self._streams.append(
            StreamRequest(self._stream_id, address, sealed, self.config.tcp_timeout)
        )
        return self._stream_id

    def _open_push_pull(self, address: Address, *, join: bool) -> int | None:
        if len(self._pending_streams) >= MAX_PENDING_STREAMS:
            self.stats.drop("stream_limit")
            return None
        return self._open_stream(address, self._local_push_pull(join), ("push_pull", address))

    def _local_push_pull(self, join: bool) -> PushPull:
        records = tuple(
            MemberRecord(r.name, r.address, r.meta, r.incarnation, r.state)
            for r in self._members.values()
        )
        return PushPull(join, records, self.delegate.local_state(join))

    def _broadcast_self_alive(self) -> None:
        record = self._self
        alive = Alive(record.incarnation, self.name, record.address, record.meta)
        self._queue.queue(codec.encode(alive), self.name)

    # ------------------------------------------------------------------ dispatch

    def _handle(self, message: Message, address: Address, now: float) -> None:
        match message:
            case Ping(seq, target, source_address):
                if target != self.name:
                    self.stats.drop("misdirected")
                    return
                self._send(source_address, codec.encode(Ack(seq)), now)
            case IndirectPing():
                self._relay_probe(message, now)
            case Ack(seq):
                self._on_ack(seq, now)
            case Nack(seq):
                probe = self._probe
                if probe is not None and probe.seq == seq:
                    probe.nacks += 1
            case Alive():
                self._on_alive(message, now)
            case Suspect():
                self._on_suspect(message, now)
            case Dead():
                self._on_dead(message, now)
            case User(payload):
                self.delegate.notify_message(payload)
            case Digest(digest, _, source, source_address, stable_for):
                if source == self.name or digest == self.digest():
                    return
                # Views that differ while news is still spreading will agree in a
                # moment by gossip alone; a full exchange is for lasting divergence.
                settle = self.config.push_pull_settle
                if stable_for < settle or now - self._digest_changed_at < settle:
                    # Look again once things settle, rather than at the next random
                    # exchange: a miss is repaired in about ``settle`` seconds.
                    self.stats.digests_unsettled += 1
                    key = source_address
                    if key not in self._rechecks and len(self._rechecks) < MAX_RECHECKS:
                        self._rechecks.add(key)
                        self._set_timer(_RECHECK, key, now + settle)
                    return
                self.stats.digest_mismatches += 1
                self._open_push_pull(source_address, join=False)
            case _:
                self.stats.drop("unexpected")

    # ------------------------------------------------------------------ probing

    def _scaled_probe_interval(self) -> float:
        return self.config.probe_interval * (self._awareness + 1)

    def _apply_awareness(self, delta: int) -> None:
        if not self.config.lifeguard:
            return
        ceiling = self.config.awareness_max_multiplier - 1
        self._awareness = min(ceiling, max(0, self._awareness + delta))

    def _next_probe_target(self) -> _Record | None:
        for _ in range(2):
            while self._probe_index < len(self._probe_order):
                name = self._probe_order[self._probe_index]
                self._probe_index += 1
                record = self._members.get(name)
                if record is not None and record.state in (ALIVE, SUSPECT):
                    return record
            # End of a round: reshuffle (SWIM §4.3's randomized round-robin).
            self._probe_order = [r.name for r in self._others]
            self.rng.shuffle(self._probe_order)
            self._probe_index = 0
            if not self._probe_order:
                return None
        return None

    def _probe_tick(self, now: float) -> None:
        interval = self._scaled_probe_interval()
        self._set_timer(_PROBE, None, now + interval)
        if self._leaving or self._probe is not None:
            return
        target = self._next_probe_target()
        if target is None:
            return
        self._seq += 1
        probe = _Probe(self._seq, target.name, now)
        self._probe = probe
        self.stats.probes += 1
        ping = codec.encode(Ping(probe.seq, target.name, self.address))
        if target.state == SUSPECT and self.config.lifeguard:
            # Lifeguard's buddy system: tell the suspect directly so it can refute.
            suspect = codec.encode(Suspect(target.incarnation, target.name, self.name))
            budget = self.config.udp_buffer_size - self.envelope.overhead - len(ping) - len(suspect)
            budget -= codec.COMPOUND_HEADER + 2 * codec.COMPOUND_PART_OVERHEAD
            payload = codec.encode_compound([ping, suspect, *self._take_broadcasts(budget)])
            self._emit_packet(target.address, payload)
        else:
            self._send(target.address, ping, now)
        self._set_timer(_PROBE_ACK_TIMEOUT, None, now + self.config.probe_timeout)
        self._set_timer(_PROBE_DEADLINE, None, now + interval)

    def _on_ack(self, seq: int, now: float) -> None:
        probe = self._probe
        if probe is not None and probe.seq == seq:
            self._probe_succeeded(probe, now)
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:
            self._cancel_timer(_RELAY, seq)
            self._send(relay.source_address, codec.encode(Ack(relay.source_seq)), now)

    def _probe_succeeded(self, probe: _Probe, now: float) -> None:
        if probe.acked:
            return
        probe.acked = True
        self.stats.observe_rtt(now - probe.started)
        self._apply_awareness(-1)
        self._cancel_timer(_PROBE_ACK_TIMEOUT, None)
        self._cancel_timer(_PROBE_DEADLINE, None)
        self._probe = None

    def _probe_ack_timeout(self, now: float) -> None:
        probe = self._probe
        if probe is None or probe.acked:
            return
        target = self._members.get(probe.target)
        if target is None:
            return
        relays = self._random_members(
            self.config.indirect_checks, alive_only=True, exclude=target.name
        )
        request = IndirectPing(
            probe.seq,
            target.name,
            target.address,
            self.config.lifeguard,
            self.name,
            self.address,
        )
        encoded = codec.encode(request)
        for relay in relays:
            if relay.state != ALIVE:
                continue
            self._send(relay.address, encoded, now)
            if self.config.lifeguard:
                probe.expected_nacks += 1
        if self.config.tcp_fallback_probe:
            ping = Ping(probe.seq, target.name, self.address)
            if len(self._pending_streams) < MAX_PENDING_STREAMS:
                self._open_stream(target.address, ping, ("ping", probe.seq))

    def _probe_deadline(self, now: float) -> None:
        probe = self._probe
        self._probe = None
        if probe is None or probe.acked:
            return
        self.stats.probes_failed += 1
        if probe.expected_nacks > 0:
            self._apply_awareness(max(0, probe.expected_nacks - probe.nacks))
        else:
            self._apply_awareness(1)
        if self.config.nack_gated_suspicion and probe.expected_nacks > 0 and probe.nacks == 0:
            # Not one relay answered either: the likeliest broken party is us (we are
            # not seeing replies in time), not the target. Accusing now is how a slow
            # member produces false positives; someone healthy will probe it soon.
            self.stats.probes_inconclusive += 1
            return
        target = self._members.get(probe.target)
        if target is None or target.state not in (ALIVE, SUSPECT):
            return
        self.stats.suspicions_started += target.state == ALIVE
        self._on_suspect(Suspect(target.incarnation, target.name, self.name), now)

    def _relay_probe(self, request: IndirectPing, now: float) -> None:
        if len(self._relays) >= MAX_RELAYS:
            self.stats.drop("relay_limit")
            return
        self._seq += 1
        self._relays[self._seq] = _Relay(request.seq, request.source_address, request.want_nack)
        ping = Ping(self._seq, request.target, self.address)
        self._send(request.target_address, codec.encode(ping), now)
        # memberlist nacks after the full probe timeout; Lifeguard's paper at 80 % of it,
        # so the nack reaches the prober before its own period ends.
        wait = self.config.probe_timeout * self.config.relay_nack_fraction
        self._set_timer(_RELAY, self._seq, now + wait)

    def _relay_timeout(self, seq: int, now: float) -> None:
        relay = self._relays.pop(seq, None)
        if relay is not None and relay.want_nack:
            self._send(relay.source_address, codec.encode(Nack(relay.source_seq)), now)

    # ------------------------------------------------------------------ merge rules

    def _on_alive(self, message: Alive, now: float) -> None:
        name = message.node
        if name == self.name:
            me = self._self
            if message.incarnation < me.incarnation:
                return
            if (
                message.incarnation == me.incarnation
                and message.meta == me.meta
                and message.address == me.address
            ):
                return
            # Someone claims a newer (or conflicting) us: an old life of ours. Outbid it.
            if not self._leaving:
                self._refute(message.incarnation, None, now)
            return
        record = self._members.get(name)
        if record is None:
            if len(self._members) >= self.config.max_members:
                self.stats.drop("member_limit")
                return
            record = _Record(name, message.address, message.meta, message.incarnation, now)
            self._add_record(record)
            # A newcomer goes to a random place in the probe order, not the end.
            self._probe_order.insert(
                self.rng.randint(self._probe_index, len(self._probe_order)), name
            )
            self._queue.queue(codec.encode(message), name)
            self._events.append(MemberJoined(record.snapshot()))
            return
        if message.incarnation <= record.incarnation:
            return
        old_state = record.state
        changed = record.meta != message.meta or record.address != message.address
        self._update_digest(record, remove=True)
        record.incarnation = message.incarnation
        record.meta = message.meta
        record.address = message.address
        self._update_digest(record)
        if old_state != ALIVE:
            self._set_state(record, ALIVE, now)
        self._end_suspicion(name)
        self._cancel_timer(_REAP, name)
        self._queue.queue(codec.encode(message), name)
        snapshot = record.snapshot()
        if old_state in (DEAD, LEFT):
            self._events.append(MemberJoined(snapshot))
        elif old_state == SUSPECT:
            self._events.append(MemberRecovered(snapshot))
            if changed:
                self._events.append(MemberUpdated(snapshot))
        elif changed:
            self._events.append(MemberUpdated(snapshot))

    def _on_suspect(self, message: Suspect, now: float) -> None:
        name = message.node
        record = self._members.get(name)
        if record is None or message.incarnation < record.incarnation:
            return
        if record is self._self:
            if self._leaving:
                return
            self._refute(message.incarnation, message.accuser, now)
            return
        if record.state == SUSPECT:
            if message.incarnation > record.incarnation:
                self._update_digest(record, remove=True)
                record.incarnation = message.incarnation
                self._update_digest(record)
            suspicion = self._suspicions.get(name)
            if suspicion is not None and suspicion.confirm(message.accuser):
                self._set_timer(_SUSPICION, name, suspicion.deadline)
                self._queue.queue(codec.encode(message), name)
            return
        if record.state in (DEAD, LEFT):
            return
        self._update_digest(record, remove=True)
        record.incarnation = message.incarnation
        self._update_digest(record)
        self._set_state(record, SUSPECT, now)
        self._queue.queue(codec.encode(message), name)
        members = len(self._members)
        minimum, maximum = self.config.suspicion_timeouts(members)
        k = self.config.suspicion_mult - 2 if self.config.lifeguard else 0
        if members - 2 < k:
            k = 0
        suspicion = Suspicion(message.accuser, now, minimum, maximum, max(0, k))
        self._suspicions[name] = suspicion
        self._set_timer(_SUSPICION, name, suspicion.deadline)
        self._events.append(MemberSuspected(record.snapshot(), message.accuser))

    def _on_dead(self, message: Dead, now: float) -> None:
        name = message.node
        record = self._members.get(name)
        if record is None or message.incarnation < record.incarnation:
            return
        if record is self._self:
            if not self._leaving:
                self._refute(message.incarnation, message.accuser, now)
            return
        if record.state in (DEAD, LEFT):
            return
        left = message.accuser == name
        self._update_digest(record, remove=True)
        record.incarnation = message.incarnation
        self._update_digest(record)
        self._set_state(record, LEFT if left else DEAD, now)
        self._end_suspicion(name)
        self._queue.queue(codec.encode(message), name)
        reap_after = self.config.reap_left_after if left else self.config.reap_dead_after
        self._set_timer(_REAP, name, now + reap_after)
        snapshot = record.snapshot()
        self._events.append(MemberLeft(snapshot) if left else MemberFailed(snapshot))

    def _refute(self, incarnation: int, accuser: str | None, now: float) -> None:
        record = self._self
        if incarnation >= record.incarnation:
            self._update_digest(record, remove=True)
            record.incarnation = incarnation + 1
            self._update_digest(record)
            self._broadcast_self_alive()
            self._apply_awareness(1)
            self.stats.refutations += 1
            self._events.append(SuspicionRefuted(record.incarnation, accuser or ""))
        if self.config.direct_refute and accuser and accuser != self.name:
            target = self._members.get(accuser)
            if target is not None and target.state in (ALIVE, SUSPECT):
                alive = Alive(record.incarnation, self.name, record.address, record.meta)
                self._send(target.address, codec.encode(alive), now)

    def _end_suspicion(self, name: str) -> None:
        if self._suspicions.pop(name, None) is not None:
            self._cancel_timer(_SUSPICION, name)

    def _suspicion_timeout(self, name: str, now: float) -> None:
        suspicion = self._suspicions.pop(name, None)
        record = self._members.get(name)
        if suspicion is None or record is None or record.state != SUSPECT:
            return
        self._on_dead(Dead(record.incarnation, name, self.name), now)

    def _reap(self, name: str, now: float) -> None:
        record = self._members.get(name)
        if record is None or record.state not in (DEAD, LEFT):
            return
        self._remove_record(record)
        self._queue.invalidate(name)
        self._events.append(MemberReaped(record.snapshot()))

    def _merge_remote(
        self, records: Sequence[MemberRecord], user_state: bytes, join: bool, now: float
    ) -> None:
        """Apply a peer's full state (memberlist mergeState)."""
        for r in records:
            if r.state == ALIVE:
                self._on_alive(Alive(r.incarnation, r.name, r.address, r.meta), now)
            elif r.state == LEFT:
                self._on_dead(Dead(r.incarnation, r.name, r.name), now)
            else:
                # A remote "dead" becomes a local suspicion: we may still reach it, and
                # if it is us, the suspect message makes us refute.
                self._on_suspect(Suspect(r.incarnation, r.name, self.name), now)
        if user_state:
            self.delegate.merge_remote_state(user_state, join)

    # ------------------------------------------------------------------ dissemination

    def _gossip_tick(self, now: float) -> None:
        self._set_timer(_GOSSIP, None, now + self.config.gossip_interval)
        if self._left or not self._others:
            return
        if self.config.structured_gossip:
            self._gossip_structured(now)
            return
        count = self.config.gossip_nodes
        others = self._others
        seen: set[str] = set()
        sent = 0
        for _ in range(3 * count + 8):
            record = others[self.rng.randrange(len(others))]
            if record.name in seen:
                continue
            seen.add(record.name)
            if not self._gossip_eligible(record, now):
                continue
            if not self._gossip_to(record, now):
                return
            sent += 1
            if sent >= count or len(seen) >= len(others):
                return

    def _gossip_eligible(self, record: _Record, now: float) -> bool:
        if record.state in (ALIVE, SUSPECT):
            return True
        # The recently dead still hear gossip, so they learn it and refute.
        return now - record.state_changed_at <= self.config.gossip_to_the_dead_time

    def _gossip_to(self, record: _Record, now: float) -> bool:
        budget = self.config.udp_buffer_size - self.envelope.overhead - codec.COMPOUND_HEADER
        parts = self._take_broadcasts(budget)
        if not parts:
            return False
        payload = parts[0] if len(parts) == 1 else codec.encode_compound(parts)
        self._emit_packet(record.address, payload)
        return True

    def _gossip_structured(self, now: float) -> None:
        """Send queued news to ring neighbours at fixed, well-spread offsets.

        Members sit on a ring ordered by a hash of their names. Round r of a member
        sends to the members at offsets O[(r·f + k) mod L] (k < f) from itself, where
        L is the retransmit limit, so a message that lives L/f rounds goes to all L
        offsets. Every member then has exactly L distinct in-neighbours for every
        message, instead of a Poisson(L) number of random senders, of which e^-L·(1-loss)
        are zero: with 10 % loss a member misses an update only if all L copies are
        lost, and the ring with random offsets is an expander, so news still
        spreads in O(log N) rounds.
        """
        ring = self._ring
        size = len(ring)
        limit = max(1, self._queue.retransmit_limit())
        fanout = self.config.gossip_nodes
        position = bisect.bisect_left(ring, (_ring_key(self.name), self.name))
        chosen: set[str] = {self.name}
        sent = False
        for k in range(fanout):
            index = (self._gossip_round * fanout + k) % limit
            offset = 1 + int(_ring_offset_fraction(index) * (size - 1))
            record: _Record | None = None
            for step in range(size):
                name = ring[(position + offset + step) % size][1]
                if name in chosen:
                    continue
                candidate = self._members[name]
                if self._gossip_eligible(candidate, now):
                    record = candidate
                    break
            if record is None:
                break
            chosen.add(record.name)
            if not self._gossip_to(record, now):
                break
            sent = True
        if sent:
            self._gossip_round += 1

    def _push_pull_period(self) -> float:
        return self.config.push_pull_period(len(self._members))

    def _push_pull_tick(self, now: float) -> None:
        period = self._push_pull_period()
        # Jitter keeps exchanges from lining up across the cluster.
        self._set_timer(_PUSH_PULL, None, now + period * (0.5 + self.rng.random()))
        if self._leaving:
            return
        targets = self._random_members(1, alive_only=True)
        if not targets or targets[0].state != ALIVE:
            return
        target = targets[0]
        if self.config.push_pull_digest:
            self._send_digest(target.address, now)
        else:
            self._open_push_pull(target.address, join=False)

    def _send_digest(self, address: Address, now: float) -> None:
        self.stats.digests_sent += 1
        digest_value = self.digest()
        stable_for = max(0.0, now - self._digest_changed_at)
        digest = Digest(digest_value, len(self._members), self.name, self.address, stable_for)
        self._send(address, codec.encode(digest), now)

    def _reconnect_tick(self, now: float) -> None:
        interval = self.config.reconnect_interval
        self._set_timer(_RECONNECT, None, now + interval * (0.5 + self.rng.random()))
        if self._leaving:
            return
        dead = [r for r in self._others if r.state == DEAD]
        if not dead:
            return
        # Serf's rule: try with probability dead/alive, so the cluster as a whole
        # tries each dead member about once per interval, however large it is;
        # after a partition (half the members dead) everyone tries at once.
        alive = max(1, len(self._others) - len(dead))
        if self.rng.random() < len(dead) / alive:
            target = dead[self.rng.randrange(len(dead))]
            self._open_push_pull(target.address, join=False)
