"""A deterministic discrete-event simulator that runs real ``Swim`` cores.

Theory of operation
-------------------
Every member is a real ``gossip.swim.Swim`` with its own seeded ``Random``. The
simulator owns one virtual clock and one event heap ``(time, seq, kind, member,
payload)``; ``seq`` breaks ties in insertion order, so a seed reproduces a run bit for
bit. After each event that touched a member, it drains the core's outputs exactly as
the asyncio adapter does, and (re)schedules that member's single timer.

The network model:

* latency — each directed link has a fixed base drawn from ``[0.5, 1.5] × latency``
  (derived from a hash of the pair, so no N² table), plus exponential jitter with mean
  ``0.1 × latency`` per packet;
* loss — every datagram is dropped with probability ``loss``; streams (TCP) are
  reliable but pay two round trips of latency to connect and answer;
* partitions — members carry a group number; datagrams between groups vanish and
  streams time out;
* crashes — a crashed member handles nothing; streams to it are refused after one
  round trip (RST), datagrams vanish;
* slow members — now and then (every ``stall_every`` seconds on average) a slow
  member handles messages late for ``stall_min..stall_max`` seconds: what arrives
  waits, and is handled in arrival order when the episode ends, while the member's
  own timers keep firing on time. It keeps probing but cannot see the acks, so it
  suspects healthy peers: the overloaded member of Lifeguard §II.

Bytes on the wire are counted per member with headers: 28 bytes per datagram (IPv4 +
UDP) and, per stream, the payloads plus about 6 segments of 52 bytes per side.

``main()`` runs the scenarios behind ``meshnode sim`` and prints a table and one JSON
line.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gossip.broadcast import BroadcastQueue
from gossip.codec import MemberRecord
from gossip.config import GossipConfig, preset
from gossip.delegate import Delegate
from gossip.events import (
    Address,
    Event,
    MemberFailed,
    MemberJoined,
    MemberRecovered,
    MemberState,
    MemberSuspected,
)
from gossip.keyring import Envelope, Keyring
from gossip.swim import StreamRequest, Swim

UDP_HEADER_BYTES = 28
TCP_SEGMENT_HEADER_BYTES = 52
TCP_SEGMENTS_PER_SIDE = 6  # handshake share, FIN, ACKs of a short request/response

_TIMER, _PACKET, _STREAM_REQUEST, _STREAM_REPLY, _STREAM_TIMEOUT, _ACTION, _EXT_TIMER = range(7)
_INBOUND = frozenset((_PACKET, _STREAM_REQUEST, _STREAM_REPLY))


# ----------------------------------------------------------------------------- extensions


class Extension(Protocol):
    """A sans-IO component that rides on a simulated member (leader election, say).

    It sends through ``node.core.send_user(...)``; the simulator hands it every user
    message first (``on_message`` returns True if it was its own), every member event,
    and fires its one timer.
    """

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...

    def on_message(self, payload: bytes, now: float) -> bool: ...

    def on_event(self, event: Event, now: float) -> None: ...


ExtensionFactory = Callable[["Simulation", int], Extension]


# ----------------------------------------------------------------------------- delegate


class SimDelegate(Delegate):
    """A layer above gossip that spreads numbered "updates" (user broadcasts) and keeps
    the set it has seen as its push-pull state, so missed updates are repaired by
    anti-entropy exactly as the catalog will be."""

    def __init__(self, sim: Simulation, index: int, config: GossipConfig) -> None:
        self.sim = sim
        self.index = index
        self.known: set[int] = set()
        self.queue = BroadcastQueue(
            config.retransmit_mult, lambda: len(sim.members), retransmit_min=config.retransmit_min
        )
        self._digest = 0

    def originate(self, update: int) -> None:
        self._learn(update)

    def _learn(self, update: int) -> None:
        if update in self.known:
            return
        self.known.add(update)
        self._digest ^= hash((update, 0x5F3759DF)) & 0xFFFFFFFFFFFFFFFF
        self.sim.on_update(self.index, update)
        self.queue.queue(update.to_bytes(8, "big"))

    def broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        messages = self.queue.get(overhead, limit)
        for message in messages:
            self.sim.on_transmit(int.from_bytes(message, "big"))
        return messages

    def notify_message(self, message: bytes) -> None:
        extension = self.sim.members[self.index].extension
        if extension is not None and extension.on_message(message, self.sim.now):
            return
        if len(message) == 8:
            self._learn(int.from_bytes(message, "big"))

    def local_state(self, join: bool) -> bytes:
        return b"".join(u.to_bytes(8, "big") for u in sorted(self.known))

    def merge_remote_state(self, state: bytes, join: bool) -> None:
        for offset in range(0, len(state) - len(state) % 8, 8):
            update = int.from_bytes(state[offset : offset + 8], "big")
            if update not in self.known:
                self.sim.repaired_by_push_pull += 1
                self.sim.updates_repaired.add(update)
                # Learned by anti-entropy: remember it, but do not re-gossip it.
                self.known.add(update)
                self._digest ^= hash((update, 0x5F3759DF)) & 0xFFFFFFFFFFFFFFFF
                self.sim.on_update(self.index, update)

    def state_digest(self) -> bytes:
        return self._digest.to_bytes(8, "big") if self.known else b""


# ----------------------------------------------------------------------------- simulation


@dataclass(slots=True)
class _Node:
    index: int
    name: str
    address: Address
    core: Swim
    delegate: SimDelegate
    crashed: bool = False
    group: int = 0
    stalled_until: float = 0.0
    slow: bool = False
    timer_at: float | None = None
    timer_version: int = 0
    extension: Extension | None = None
    extension_timer_at: float | None = None
    extension_timer_version: int = 0
    pending_streams: dict[int, int] = field(default_factory=dict)  # stream id -> token


class Simulation:
    """N ``Swim`` cores on a simulated network with a virtual clock."""

    def __init__(
        self,
        nodes: int,
        config: GossipConfig,
        *,
        seed: int,
        loss: float = 0.0,
        latency: float = 0.001,
        slow_fraction: float = 0.0,
        stall_min: float = 1.0,
        stall_max: float = 5.0,
        stall_every: float = 30.0,
        keys: Sequence[bytes] = (),
        cluster: str = "sim",
        formed: bool = True,
        extensions: ExtensionFactory | None = None,
    ) -> None:
        self.config = config
        self.seed = seed
        self.rng = random.Random(seed)
        self.loss = loss
        self.latency = latency
        self.stall_min, self.stall_max, self.stall_every = stall_min, stall_max, stall_every
        self.now = 0.0
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._seq = 0
        self._stream_token = 0
        self.members: list[_Node] = []
        self.by_address: dict[Address, int] = {}
        self.update_seen: dict[int, dict[int, float]] = {}
        self.update_origin: dict[int, float] = {}
        self.update_transmissions: dict[int, int] = {}
        self.repaired_by_push_pull = 0
        self.updates_repaired: set[int] = set()
        """Updates that some member learned only through push-pull."""
        self.event_hooks: list[Callable[[int, Event, float], None]] = []
        for i in range(nodes):
            name = f"m{i:05d}"
            address = (f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 7946)
            keyring = Keyring(keys) if keys else None
            envelope = Envelope(cluster, keyring)
            node_rng = random.Random(seed * 1_000_003 + i)
            delegate = SimDelegate(self, i, config)
            core = Swim(
                name, address, config, rng=node_rng, now=0.0, delegate=delegate, envelope=envelope
            )
            node = _Node(i, name, address, core, delegate)
            self.members.append(node)
            self.by_address[address] = i
        if formed:
            records = [
                MemberRecord(n.name, n.address, b"", 0, MemberState.ALIVE) for n in self.members
            ]
            for node in self.members:
                node.core.preload(records, 0.0)
        if extensions is not None:
            for node in self.members:
                node.extension = extensions(self, node.index)
        slow_count = round(slow_fraction * nodes)
        for index in self.rng.sample(range(nodes), slow_count):
            node = self.members[index]
            node.slow = True
            self._push(self.rng.expovariate(1 / stall_every), _ACTION, index, self._stall)
        for node in self.members:
            self._reschedule(node)

    # -- scheduling

    def _push(self, at: float, kind: int, index: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, index, payload))

    def at(self, when: float, action: Callable[[Simulation], None]) -> None:
        """Run ``action(sim)`` at virtual time ``when``."""
        self._push(when, _ACTION, -1, action)

    def _reschedule(self, node: _Node) -> None:
        deadline = node.core.get_timer()
        if deadline != node.timer_at:
            node.timer_at = deadline
            node.timer_version += 1
            if deadline is not None:
                self._push(max(deadline, self.now), _TIMER, node.index, node.timer_version)
        extension = node.extension
        if extension is not None:
            deadline = extension.get_timer()
            if deadline != node.extension_timer_at:
                node.extension_timer_at = deadline
                node.extension_timer_version += 1
                if deadline is not None:
                    version = node.extension_timer_version
                    self._push(max(deadline, self.now), _EXT_TIMER, node.index, version)

    def _link_latency(self, source: int, target: int) -> float:
        mixed = ((source * 2_654_435_761) ^ (target * 40_503)) & 0xFFFF
        base = self.latency * (0.5 + mixed / 0xFFFF)
        return base + self.rng.expovariate(10.0 / self.latency)

    def _reachable(self, source: _Node, target: _Node) -> bool:
        return source.group == target.group

    # -- driving a node

    def _flush(self, node: _Node) -> None:
        core = node.core
        for data, address in core.packets_to_send():
            self._deliver(node, data, address)
        for request in core.streams_to_open():
            self._open_stream(node, request)
        events = []
        while (event := core.next_event()) is not None:
            events.append(event)
            for hook in self.event_hooks:
                hook(node.index, event, self.now)
        if node.extension is not None and events:
            for event in events:
                node.extension.on_event(event, self.now)
            # The extension may have sent something in response.
            for data, address in core.packets_to_send():
                self._deliver(node, data, address)
            for request in core.streams_to_open():
                self._open_stream(node, request)
        self._reschedule(node)

    def _deliver(self, node: _Node, data: bytes, address: Address) -> None:
        target_index = self.by_address.get(address)
        if target_index is None:
            return
        target = self.members[target_index]
        if not self._reachable(node, target) or self.rng.random() < self.loss:
            return
        delay = self._link_latency(node.index, target_index)
        self._push(self.now + delay, _PACKET, target_index, (data, node.address))

    def _open_stream(self, node: _Node, request: StreamRequest) -> None:
        self._stream_token += 1
        token = self._stream_token
        node.pending_streams[request.stream_id] = token
        self._push(self.now + request.timeout, _STREAM_TIMEOUT, node.index, request.stream_id)
        target_index = self.by_address.get(request.address)
        if target_index is None:
            return
        target = self.members[target_index]
        if not self._reachable(node, target):
            return  # SYNs vanish: the client times out
        rtt = self._link_latency(node.index, target_index) * 2
        if target.crashed:
            self._push(self.now + rtt, _STREAM_REPLY, node.index, (request.stream_id, None))
            return
        # Connect (one round trip) then the request's one-way trip.
        arrival = self.now + rtt + rtt / 2
        payload = (request.payload, node.address, node.index, request.stream_id)
        self._push(arrival, _STREAM_REQUEST, target_index, payload)

    def _stall(self, sim: Simulation, index: int) -> None:
        node = self.members[index]
        if not node.crashed:
            node.stalled_until = self.now + self.rng.uniform(self.stall_min, self.stall_max)
        self._push(
            node.stalled_until + self.rng.expovariate(1 / self.stall_every),
            _ACTION,
            index,
            self._stall,
        )

    def crash(self, index: int) -> None:
        node = self.members[index]
        node.crashed = True
        node.pending_streams.clear()

    def partition(self, groups: Callable[[int], int]) -> None:
        for node in self.members:
            node.group = groups(node.index)

    def heal(self) -> None:
        for node in self.members:
            node.group = 0

    def inject_update(self, index: int, update: int) -> None:
        self.update_origin[update] = self.now
        self.update_seen[update] = {}
        self.update_transmissions[update] = 0
        node = self.members[index]
        node.delegate.originate(update)
        self._flush(node)

    def on_update(self, index: int, update: int) -> None:
        seen = self.update_seen.get(update)
        if seen is not None and index not in seen:
            seen[index] = self.now

    def on_transmit(self, update: int) -> None:
        if update in self.update_transmissions:
            self.update_transmissions[update] += 1

    def run_until(self, end: float, progress: Callable[[float], None] | None = None) -> None:
        heap = self._heap
        members = self.members
        last_report = time.monotonic()
        while heap and heap[0][0] <= end:
            when, _, kind, index, payload = heapq.heappop(heap)
            self.now = when
            if kind == _ACTION:
                if index >= 0:
                    payload(self, index)
                else:
                    payload(self)
                continue
            node = members[index]
            if node.crashed:
                continue
            if node.stalled_until > when and kind in _INBOUND:
                # A slow member handles what arrives late, in arrival order, while its
                # own timers keep firing: it probes, but cannot see the acks in time.
                self._seq += 1
                heapq.heappush(heap, (node.stalled_until, self._seq, kind, index, payload))
                continue
            core = node.core
            if kind == _TIMER:
                if payload != node.timer_version:
                    continue
                node.timer_at = None
                core.handle_timer(when)
            elif kind == _PACKET:
                data, source = payload
                core.receive_packet(data, source, when)
            elif kind == _STREAM_REQUEST:
                data, source, client_index, stream_id = payload
                reply = core.receive_stream(data, source, when)
                delay = self._link_latency(index, client_index)
                self._push(when + delay, _STREAM_REPLY, client_index, (stream_id, reply))
            elif kind == _STREAM_REPLY:
                stream_id, reply = payload
                if node.pending_streams.pop(stream_id, None) is None:
                    continue
                core.receive_stream_reply(stream_id, reply, when)
            elif kind == _EXT_TIMER:
                extension = node.extension
                if extension is None or payload != node.extension_timer_version:
                    continue
                node.extension_timer_at = None
                extension.handle_timer(when)
            elif kind == _STREAM_TIMEOUT:
                if node.pending_streams.pop(payload, None) is None:
                    continue
                core.receive_stream_reply(payload, None, when)
            self._flush(node)
            if progress is not None and time.monotonic() - last_report > 0.5:
                last_report = time.monotonic()
                progress(when)
        self.now = max(self.now, end)

    # -- measurement

    def live(self) -> list[_Node]:
        return [n for n in self.members if not n.crashed]

    def wire_bytes_sent(self) -> int:
        total = 0
        for node in self.members:
            s = node.core.stats
            total += s.bytes_sent + UDP_HEADER_BYTES * s.packets_sent
            total += s.stream_bytes_sent
            streams = s.streams_opened + s.streams_accepted
            total += streams * TCP_SEGMENTS_PER_SIDE * TCP_SEGMENT_HEADER_BYTES
        return total


# ----------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, math.ceil(fraction * len(ordered)) - 1)
    return ordered[rank]


class _Progress:
    """A progress bar on stderr for long runs (one line, redrawn on a terminal)."""

    def __init__(self, total: float, label: str) -> None:
        self.total = total
        self.label = label
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last_decile = -1
        self.shown = False

    def __call__(self, now: float) -> None:
        if time.monotonic() - self.started < 2.0:
            return
        fraction = min(1.0, now / self.total) if self.total else 1.0
        if self.tty:
            filled = int(30 * fraction)
            sys.stderr.write(
                f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                f"{fraction:5.1%} t={now:7.1f}s wall={time.monotonic() - self.started:6.1f}s"
            )
            sys.stderr.flush()
            self.shown = True
        elif int(fraction * 10) > self.last_decile:
            self.last_decile = int(fraction * 10)
            sys.stderr.write(f"{self.label}: {fraction:.0%} (t={now:.0f}s)\n")

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


# ----------------------------------------------------------------------------- scenarios


@dataclass
class Options:
    """One simulator run; the defaults are ``meshnode sim``'s."""

    scenario: str = "crash"
    nodes: int = 100
    loss: float = 0.0
    seed: int = 1
    preset: str = "default"
    duration: float = 120.0
    repeat: int = 1
    slow: float = 0.0
    stall_min: float = 1.0
    stall_max: float = 5.0
    stall_every: float = 30.0
    latency_ms: float = 1.0
    crash_every: float = 5.0
    updates: int = 20
    partition_seconds: float = 60.0
    quiet: bool = True


class _Watch:
    """Follows member events of every simulated member."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.crash_times: dict[str, float] = {}
        self.dead_seen: dict[str, set[int]] = {}
        self.detected_at: dict[str, float] = {}
        self.false_dead: set[tuple[str, int]] = set()
        self.false_dead_slow: set[tuple[str, int]] = set()
        self.suspected: set[tuple[str, int]] = set()
        self.suspected_slow: set[tuple[str, int]] = set()
        self.slow_names = {n.name for n in sim.members if n.slow}
        sim.event_hooks.append(self.on_event)

    def on_event(self, index: int, event: Event, now: float) -> None:
        if isinstance(event, MemberSuspected):
            member = event.member
            if member.name not in self.crash_times:
                key = (member.name, member.incarnation)
                (self.suspected_slow if member.name in self.slow_names else self.suspected).add(key)
        elif isinstance(event, MemberFailed):
            member = event.member
            if member.name in self.crash_times:
                seen = self.dead_seen.setdefault(member.name, set())
                seen.add(index)
                if member.name not in self.detected_at:
                    live = sum(1 for n in self.sim.members if not n.crashed)
                    if len(seen) >= math.ceil(0.99 * live):
                        self.detected_at[member.name] = now - self.crash_times[member.name]
            else:
                key = (member.name, member.incarnation)
                (self.false_dead_slow if member.name in self.slow_names else self.false_dead).add(
                    key
                )

    def crash(self, index: int) -> None:
        node = self.sim.members[index]
        self.crash_times[node.name] = self.sim.now
        self.sim.crash(index)


def _crash(sim: Simulation, *, watch: _Watch, index: int) -> None:
    watch.crash(index)


def _inject(sim: Simulation, *, origin: int, update: int) -> None:
    sim.inject_update(origin, update)


def _keyring_step(sim: Simulation, *, keyring: Keyring, step: str, key: bytes) -> None:
    getattr(keyring, step)(key)


def _new_sim(options: Options, seed: int, **overrides: Any) -> Simulation:
    kwargs: dict[str, Any] = dict(
        seed=seed,
        loss=options.loss,
        latency=options.latency_ms / 1000.0,
        slow_fraction=options.slow,
        stall_min=options.stall_min,
        stall_max=options.stall_max,
        stall_every=options.stall_every,
    )
    kwargs.update(overrides)
    return Simulation(options.nodes, preset(options.preset), **kwargs)


def _views_converged(sim: Simulation, expected_alive: int) -> list[int]:
    """Indices of live members that see exactly ``expected_alive`` members alive."""
    done = []
    for node in sim.members:
        if node.crashed:
            continue
        if node.core.count(MemberState.ALIVE) == expected_alive:
            done.append(node.index)
    return done


def scenario_join(options: Options, seed: int) -> dict[str, Any]:
    """Members start over one second and join a random earlier member; how long
    until every member sees every other alive?"""
    sim = _new_sim(options, seed, formed=False)
    n = options.nodes
    spread = 1.0
    starts = sorted(sim.rng.uniform(0, spread) for _ in range(n))
    converged_at: dict[int, float] = {}
    alive_seen = [1] * n

    def on_event(index: int, event: Event, now: float) -> None:
        if isinstance(event, MemberJoined | MemberRecovered):
            alive_seen[index] = sim.members[index].core.count(MemberState.ALIVE)
            if alive_seen[index] == n and index not in converged_at:
                converged_at[index] = now

    sim.event_hooks.append(on_event)
    # Member 0 starts first; every later one joins a random member that started before.
    for i, when in enumerate(starts):
        if i == 0:
            continue
        seed_index = sim.rng.randrange(i)

        def start(s: Simulation, i: int = i, seed_index: int = seed_index) -> None:
            node = s.members[i]
            node.core.join([s.members[seed_index].address], s.now)
            s._flush(node)

        sim.at(when, start)
    last_start = starts[-1]
    progress = _Progress(options.duration, "join")
    sim.run_until(options.duration, None if options.quiet else progress)
    progress.done()
    times = [converged_at[i] - last_start for i in range(n) if i in converged_at]
    times = [max(0.0, t) for t in times]
    converged = len(times)
    return {
        "converge_p50_s": percentile(times, 0.5),
        "converge_p99_s": percentile(times, 0.99) if converged == n else None,
        "converge_max_s": max(times) if converged == n else None,
        "converged_members": converged,
        "bytes_per_member_s": sim.wire_bytes_sent() / n / options.duration,
    }


def scenario_crash(options: Options, seed: int) -> dict[str, Any]:
    """A formed cluster; a member crashes every ``crash_every`` seconds. Detection
    time is crash → dead at ≥ 99 % of live members."""
    sim = _new_sim(options, seed)
    watch = _Watch(sim)
    warmup = 10.0
    victims = sim.rng.sample(
        [n.index for n in sim.members if not n.slow],
        min(options.nodes // 2, int((options.duration - warmup - 20) // options.crash_every) + 1),
    )
    for k, victim in enumerate(victims):
        when = warmup + k * options.crash_every + sim.rng.uniform(0, 1)
        if when > options.duration - 20:
            break
        sim.at(when, functools.partial(_crash, watch=watch, index=victim))
    progress = _Progress(options.duration, "crash")
    sim.run_until(options.duration, None if options.quiet else progress)
    progress.done()
    detect = list(watch.detected_at.values())
    return {
        "crashes": len(watch.crash_times),
        "detected": len(detect),
        "detect_p50_s": percentile(detect, 0.5),
        "detect_p99_s": percentile(detect, 0.99),
        "detect_max_s": max(detect) if detect else None,
        "false_dead": len(watch.false_dead),
        "suspicions_healthy": len(watch.suspected),
        "bytes_per_member_s": sim.wire_bytes_sent() / options.nodes / options.duration,
        "_detect_samples": detect,
    }


def scenario_broadcast(options: Options, seed: int) -> dict[str, Any]:
    """A formed cluster; ``updates`` user broadcasts from random members, two seconds
    apart. Rounds = time for the update to reach every live member / gossip interval."""
    sim = _new_sim(options, seed)
    warmup = 5.0
    gap = 2.0
    updates = options.updates
    for u in range(updates):
        origin = sim.rng.randrange(options.nodes)
        sim.at(warmup + u * gap, functools.partial(_inject, origin=origin, update=u + 1))
    end = warmup + updates * gap + max(20.0, 2 * sim.config.push_pull_interval)
    duration = max(options.duration, end) if options.duration else end
    progress = _Progress(duration, "broadcast")
    sim.run_until(duration, None if options.quiet else progress)
    progress.done()
    interval = sim.config.gossip_interval
    rounds: list[float] = []
    never = 0
    n = options.nodes
    repaired_finish: list[float] = []
    for update, seen in sim.update_seen.items():
        injected_at = sim.update_origin[update]
        if len(seen) < n:
            never += 1
            continue
        finish = max(seen.values()) - injected_at
        rounds.append(finish / interval)
        if update in sim.updates_repaired:
            repaired_finish.append(finish)
    transmissions = [t / n for t in sim.update_transmissions.values()]
    return {
        "updates": updates,
        "rounds_p50": percentile(rounds, 0.5),
        "rounds_p99": percentile(rounds, 0.99),
        "rounds_max": max(rounds) if rounds else None,
        "transmissions_per_member": sum(transmissions) / len(transmissions) if transmissions else 0,
        "unreached": never,
        "repaired_updates": len(sim.updates_repaired),
        "repaired_max_s": max(repaired_finish) if repaired_finish else None,
        "push_pull_period_s": sim.config.push_pull_period(n),
        "bytes_per_member_s": sim.wire_bytes_sent() / n / duration,
        "_round_samples": rounds,
    }


def scenario_false_positives(options: Options, seed: int) -> dict[str, Any]:
    """A formed cluster under loss with some slow members; nobody crashes. Count
    suspicions and deaths of members that were never down."""
    sim = _new_sim(options, seed)
    watch = _Watch(sim)
    progress = _Progress(options.duration, "false-positives")
    sim.run_until(options.duration, None if options.quiet else progress)
    progress.done()
    return {
        "suspicions_healthy": len(watch.suspected),
        "suspicions_slow": len(watch.suspected_slow),
        "false_dead": len(watch.false_dead),
        "false_dead_slow": len(watch.false_dead_slow),
        "slow_members": len(watch.slow_names),
        "bytes_per_member_s": sim.wire_bytes_sent() / options.nodes / options.duration,
    }


def scenario_partition(options: Options, seed: int) -> dict[str, Any]:
    """Two halves lose contact for ``partition_seconds``, then the network heals.
    How long until every member sees every member alive again (no manual rejoin)?"""
    sim = _new_sim(options, seed)
    n = options.nodes
    start = 10.0
    heal_at = start + options.partition_seconds
    end = heal_at + max(options.duration, 60.0)
    healed_at: dict[int, float] = {}
    sim.at(start, lambda s: s.partition(lambda i: i % 2))
    sim.at(heal_at, lambda s: s.heal())

    def on_event(index: int, event: Event, now: float) -> None:
        if now < heal_at or index in healed_at:
            return
        if isinstance(event, MemberJoined | MemberRecovered):
            core = sim.members[index].core
            if core.count(MemberState.ALIVE) == n:
                healed_at[index] = now - heal_at

    sim.event_hooks.append(on_event)
    split_seen = [0]

    def check_split(s: Simulation) -> None:
        split_seen[0] = sum(
            1 for node in s.members if node.core.count(MemberState.ALIVE) <= n // 2 + 1
        )

    sim.at(heal_at - 0.001, check_split)
    progress = _Progress(end, "partition")
    sim.run_until(end, None if options.quiet else progress)
    progress.done()
    times = [healed_at[i] for i in range(n) if i in healed_at]
    return {
        "members_that_saw_split": split_seen[0],
        "healed_members": len(times),
        "heal_p50_s": percentile(times, 0.5),
        "heal_p99_s": percentile(times, 0.99) if len(times) == n else None,
        "heal_max_s": max(times) if len(times) == n else None,
        "bytes_per_member_s": sim.wire_bytes_sent() / n / end,
    }


def scenario_rotation(options: Options, seed: int) -> dict[str, Any]:
    """An encrypted cluster rotates its key under traffic in three cluster-wide steps
    (install, use, remove), each member taking each step at its own random moment
    within a five-second window. Packets no key could decrypt are counted."""
    old, new = bytes(range(32)), bytes(range(32, 64))
    sim = _new_sim(options, seed, keys=[old])
    watch = _Watch(sim)
    window = 5.0
    step_gap = window + 2.0
    install_at, use_at, remove_at = 10.0, 10.0 + step_gap, 10.0 + 2 * step_gap
    for node in sim.members:
        keyring = node.core.envelope.keyring
        assert keyring is not None
        for base, step in ((install_at, "install"), (use_at, "use"), (remove_at, "remove")):
            key = old if step == "remove" else new
            action = functools.partial(_keyring_step, keyring=keyring, step=step, key=key)
            sim.at(base + sim.rng.uniform(0, window), action)
    # Traffic: a broadcast every second throughout.
    end = max(options.duration, remove_at + window + 20)
    for u in range(int(end) - 2):
        origin = sim.rng.randrange(options.nodes)
        sim.at(1.0 + u, functools.partial(_inject, origin=origin, update=u + 1))
    progress = _Progress(end, "rotation")
    sim.run_until(end, None if options.quiet else progress)
    progress.done()
    dropped = sum(n.core.stats.dropped.get("decrypt_failed", 0) for n in sim.members)
    primaries_new = sum(
        1 for n in sim.members if n.core.envelope.keyring and n.core.envelope.keyring.primary == new
    )
    return {
        "dropped_packets": dropped,
        "false_dead": len(watch.false_dead),
        "members_on_new_key": primaries_new,
        "bytes_per_member_s": sim.wire_bytes_sent() / options.nodes / end,
    }


def scenario_idle(options: Options, seed: int) -> dict[str, Any]:
    """A formed, quiet cluster: what failure detection and anti-entropy cost."""
    sim = _new_sim(options, seed)
    warmup = min(30.0, options.duration / 4)
    sim.run_until(warmup)
    before = sim.wire_bytes_sent()
    progress = _Progress(options.duration, "idle")
    sim.run_until(options.duration, None if options.quiet else progress)
    progress.done()
    measured = options.duration - warmup
    return {"bytes_per_member_s": (sim.wire_bytes_sent() - before) / options.nodes / measured}


SCENARIOS: dict[str, Callable[[Options, int], dict[str, Any]]] = {
    "join": scenario_join,
    "crash": scenario_crash,
    "broadcast": scenario_broadcast,
    "false-positives": scenario_false_positives,
    "partition": scenario_partition,
    "rotation": scenario_rotation,
    "idle": scenario_idle,
}

_SAMPLE_KEYS = {"_detect_samples": ("detect", ()), "_round_samples": ("rounds", ())}


def run(options: Options) -> dict[str, Any]:
    """Run a scenario ``repeat`` times (seeds seed, seed+1, ...) and aggregate."""
    runs = []
    for r in range(options.repeat):
        runs.append(SCENARIOS[options.scenario](options, options.seed + r))
    result: dict[str, Any] = {
        "scenario": options.scenario,
        "nodes": options.nodes,
        "loss": options.loss,
        "preset": options.preset,
        "seed": options.seed,
        "repeat": options.repeat,
        "slow": options.slow,
    }
    if len(runs) == 1:
        result.update({k: v for k, v in runs[0].items() if not k.startswith("_")})
        return result
    # Aggregate: pooled samples for percentiles, sums for counts, means for rates.
    detect = [x for run_ in runs for x in run_.get("_detect_samples", [])]
    rounds = [x for run_ in runs for x in run_.get("_round_samples", [])]
    for key in runs[0]:
        if key.startswith("_"):
            continue
        values = [run_[key] for run_ in runs]
        if key == "detect_p50_s":
            result[key] = percentile(detect, 0.5)
        elif key == "detect_p99_s":
            result[key] = percentile(detect, 0.99)
        elif key == "rounds_p50":
            result[key] = percentile(rounds, 0.5)
        elif key == "rounds_p99":
            result[key] = percentile(rounds, 0.99)
        elif any(v is None for v in values):
            result[key] = None
        elif key.endswith(("_p50_s", "_p99_s", "_max_s", "_max")):
            result[key] = (
                max(values)
                if key.endswith("max_s") or key.endswith("_max")
                else (percentile(values, 0.5) if key.endswith("_p50_s") else max(values))
            )
        elif key in ("bytes_per_member_s", "transmissions_per_member"):
            result[key] = sum(values) / len(values)
        else:
            result[key] = sum(values)
    return result


def _format(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def print_table(results: Iterable[dict[str, Any]], out: Any = None) -> None:
    out = out or sys.stdout
    rows = list(results)
    keys: list[str] = []
    for row in rows:
        for key in row:
            if key not in keys:
                keys.append(key)
    width = max(len(k) for k in keys)
    for key in keys:
        cells = "  ".join(f"{_format(row.get(key)):>14}" for row in rows)
        out.write(f"{key:<{width}}  {cells}\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshnode sim",
        description="Run real SWIM+Lifeguard cores on a simulated network (virtual time).",
    )
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="crash")
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--loss", type=float, default=0.0, help="datagram loss rate, 0..1")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--preset", default="default", help="default, lan, swim, local, wan")
    p.add_argument("--duration", type=float, default=120.0, help="simulated seconds")
    p.add_argument("--repeat", type=int, default=1, help="runs with seeds seed, seed+1, ...")
    p.add_argument("--slow", type=float, default=0.0, help="fraction of members that stall")
    p.add_argument("--stall-min", type=float, default=1.0)
    p.add_argument("--stall-max", type=float, default=5.0)
    p.add_argument("--stall-every", type=float, default=30.0, help="mean gap between stalls")
    p.add_argument("--latency-ms", type=float, default=1.0, help="mean one-way latency")
    p.add_argument("--crash-every", type=float, default=5.0, help="crash scenario spacing")
    p.add_argument("--updates", type=int, default=20, help="broadcast scenario updates")
    p.add_argument("--partition-seconds", type=float, default=60.0)
    p.add_argument("--compare", default="", help="also run these presets, comma-separated")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.nodes < 2:
        print("--nodes must be at least 2", file=sys.stderr)
        return 2
    presets = [args.preset] + [p for p in args.compare.split(",") if p and p != args.preset]
    results = []
    for name in presets:
        try:
            preset(name)
        except KeyError as exc:
            print(exc.args[0], file=sys.stderr)
            return 2
        options = Options(
            scenario=args.scenario,
            nodes=args.nodes,
            loss=args.loss,
            seed=args.seed,
            preset=name,
            duration=args.duration,
            repeat=args.repeat,
            slow=args.slow,
            stall_min=args.stall_min,
            stall_max=args.stall_max,
            stall_every=args.stall_every,
            latency_ms=args.latency_ms,
            crash_every=args.crash_every,
            updates=args.updates,
            partition_seconds=args.partition_seconds,
            quiet=args.quiet,
        )
        started = time.monotonic()
        result = run(options)
        result["wall_s"] = round(time.monotonic() - started, 2)
        results.append(result)
    print_table(results)
    final: dict[str, Any] = dict(results[0])
    if len(results) > 1:
        final["compare"] = {r["preset"]: r for r in results[1:]}
    print(json.dumps(final, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
