"""A tiny in-memory wire for driving ``Swim`` cores by hand (aioquic/h11-style helpers).

No sockets, no real clock: every call takes the ``now`` you choose. Two ways to use it:

* step by step, for two-member tests: ``transfer(a, b, now)`` hands everything ``a``
  wants to send to ``b`` (packets and stream exchanges), ``drop(a, now)`` throws it away;
* ``Wire`` for a handful of members: ``wire.run_until(t)`` fires timers in time order
  and delivers packets after a fixed ``latency``, losing some with a seeded
  ``random.Random`` if ``loss`` is set. ``wire.down`` holds crashed members and
  ``wire.partition`` splits the wire into groups.

This is deliberately small; the big discrete-event simulator is ``gossip.sim``.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gossip import codec
from gossip.codec import Message
from gossip.config import GossipConfig
from gossip.events import Address, Event, MemberState
from gossip.keyring import Envelope
from gossip.swim import StreamRequest, Swim


def address_of(index: int) -> Address:
    return (f"10.0.0.{index + 1}", 7946)


def make_member(
    name: str,
    config: GossipConfig,
    *,
    index: int = 0,
    seed: int = 0,
    now: float = 0.0,
    envelope: Envelope | None = None,
    meta: bytes = b"",
    incarnation: int = 0,
) -> Swim:
    """A core at ``address_of(index)`` with its own seeded ``Random``."""
    return Swim(
        name,
        address_of(index),
        config,
        rng=random.Random(seed * 7919 + index),
        now=now,
        envelope=envelope,
        meta=meta,
        incarnation=incarnation,
    )


def drain_events(member: Swim) -> list[Event]:
    """Every event the core has queued, oldest first."""
    out: list[Event] = []
    while (event := member.next_event()) is not None:
        out.append(event)
    return out


def view(member: Swim) -> dict[str, tuple[int, MemberState]]:
    """``{name: (incarnation, state)}`` of everything ``member`` knows."""
    return {m.name: (m.incarnation, m.state) for m in member.members()}


def state_of(member: Swim, name: str) -> MemberState | None:
    record = member.member(name)
    return None if record is None else record.state


def run_stream(request: StreamRequest, opener: Swim, peer: Swim | None, now: float) -> None:
    """Run one stream exchange to completion: ``peer`` None means it failed."""
    reply = None if peer is None else peer.receive_stream(request.payload, opener.address, now)
    opener.receive_stream_reply(request.stream_id, reply, now)


def transfer(sender: Swim, receiver: Swim, now: float) -> int:
    """Deliver everything ``sender`` has to send that is addressed to ``receiver``.

    Packets go to ``receive_packet``; stream exchanges run at once. Anything addressed
    elsewhere is discarded (streams to elsewhere fail). Returns the number delivered.
    """
    delivered = 0
    for data, address in sender.packets_to_send():
        if address == receiver.address:
            receiver.receive_packet(data, sender.address, now)
            delivered += 1
    for request in sender.streams_to_open():
        if request.address == receiver.address:
            run_stream(request, sender, receiver, now)
            delivered += 1
        else:
            run_stream(request, sender, None, now)
    return delivered


def drop(member: Swim, now: float) -> int:
    """Lose everything ``member`` wants to send; its streams fail. Returns the count."""
    packets = member.packets_to_send()
    streams = member.streams_to_open()
    for request in streams:
        run_stream(request, member, None, now)
    return len(packets) + len(streams)


def fire_timers(member: Swim, until: float) -> float:
    """Run ``member``'s timers due by ``until``, each at its own deadline; returns the
    time of the last one fired (or -inf). Outputs are left for the caller to drain."""
    last = float("-inf")
    while (deadline := member.get_timer()) is not None and deadline <= until:
        member.handle_timer(deadline)
        last = deadline
    return last


PacketFilter = Callable[[Swim, Swim, bytes], bool]
"""``(sender, receiver, data) -> deliver?``: a test's hook to drop chosen packets."""


@dataclass
class Wire:
    """A handful of cores on an in-memory network with a manual clock."""

    latency: float = 0.005
    loss: float = 0.0
    seed: int = 0
    now: float = 0.0
    members: dict[str, Swim] = field(default_factory=dict)
    events: dict[str, list[Event]] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    """Crashed members: they handle nothing and send nothing."""
    groups: dict[str, int] = field(default_factory=dict)
    """Partition: members in different groups cannot reach each other (default 0)."""
    packet_filter: PacketFilter | None = None
    delivered: int = 0
    lost: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._by_address: dict[Address, Swim] = {}
        self._heap: list[tuple[float, int, Callable[[float], None]]] = []
        self._seq = 0

    # -------------------------------------------------------------- building

    def add(self, member: Swim) -> Swim:
        self.members[member.name] = member
        self.events[member.name] = []
        self._by_address[member.address] = member
        return member

    def spawn(self, count: int, config: GossipConfig, *, prefix: str = "m") -> list[Swim]:
        """``count`` fresh members named ``m0, m1...`` at addresses by index."""
        start = len(self.members)
        return [
            self.add(make_member(f"{prefix}{i}", config, index=i, seed=self.seed, now=self.now))
            for i in range(start, start + count)
        ]

    def partition(self, *sides: Iterable[str]) -> None:
        self.groups = {name: group for group, side in enumerate(sides) for name in side}

    def heal(self) -> None:
        self.groups = {}

    def reachable(self, a: str, b: str) -> bool:
        if a in self.down or b in self.down:
            return False
        return self.groups.get(a, 0) == self.groups.get(b, 0)

    # -------------------------------------------------------------- running

    def _schedule(self, at: float, action: Callable[[float], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, action))

    def _flush(self, sender: Swim) -> None:
        """Move ``sender``'s outputs onto the wire, and its events into ``events``."""
        self.events[sender.name].extend(drain_events(sender))
        packets = sender.packets_to_send()
        streams = sender.streams_to_open()
        if sender.name in self.down:
            return
        for data, address in packets:
            self._send_packet(sender, data, address)
        for request in streams:
            self._send_stream(sender, request)

    def _send_packet(self, sender: Swim, data: bytes, address: Address) -> None:
        limit = sender.config.udp_buffer_size
        assert len(data) <= limit, f"{sender.name} sent {len(data)} bytes; limit {limit}"
        receiver = self._by_address.get(address)
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return

        def deliver(now: float) -> None:
            if receiver is None or not self.reachable(sender.name, receiver.name):
                self.lost += 1
                return
            if self.packet_filter is not None and not self.packet_filter(sender, receiver, data):
                self.lost += 1
                return
            self.delivered += 1
            receiver.receive_packet(data, sender.address, now)
            self._flush(receiver)

        self._schedule(self.now + self.latency, deliver)

    def _send_stream(self, sender: Swim, request: StreamRequest) -> None:
        receiver = self._by_address.get(request.address)

        def answer(now: float) -> None:
            if receiver is None or not self.reachable(sender.name, receiver.name):
                # A refused or timed-out connection: the opener learns after the timeout.
                self._schedule(now + request.timeout, fail)
                return
            reply = receiver.receive_stream(request.payload, sender.address, now)
            self._flush(receiver)

            def finish(then: float) -> None:
                if sender.name not in self.down:
                    sender.receive_stream_reply(request.stream_id, reply, then)
                    self._flush(sender)

            self._schedule(now + self.latency, finish)

        def fail(now: float) -> None:
            if sender.name not in self.down:
                sender.receive_stream_reply(request.stream_id, None, now)
                self._flush(sender)

        self._schedule(self.now + self.latency, answer)

    def _next_timer(self) -> tuple[float, Swim] | None:
        best: tuple[float, Swim] | None = None
        for member in self.members.values():
            if member.name in self.down:
                continue
            deadline = member.get_timer()
            if deadline is not None and (best is None or deadline < best[0]):
                best = (deadline, member)
        return best

    def run_until(self, end: float) -> None:
        """Fire timers and deliver packets in time order up to ``end`` (inclusive)."""
        for member in self.members.values():
            self._flush(member)
        while True:
            timer = self._next_timer()
            wire_at = self._heap[0][0] if self._heap else None
            if timer is not None and (wire_at is None or timer[0] < wire_at):
                if timer[0] > end:
                    break
                self.now = max(self.now, timer[0])
                timer[1].handle_timer(self.now)
                self._flush(timer[1])
            elif wire_at is not None and wire_at <= end:
                at, _, action = heapq.heappop(self._heap)
                self.now = max(self.now, at)
                action(self.now)
            else:
                break
        self.now = max(self.now, end)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def join(self, member: Swim, *seeds: Swim) -> None:
        member.join([seed.address for seed in seeds], self.now)
        self._flush(member)

    def crash(self, name: str) -> None:
        self.down.add(name)

    def take_events(self, name: str) -> list[Event]:
        self._flush(self.members[name])
        events, self.events[name] = self.events[name], []
        return events

    def views(self, names: Iterable[str] | None = None) -> dict[str, dict[str, MemberState]]:
        chosen = self.members if names is None else {n: self.members[n] for n in names}
        return {n: {m.name: m.state for m in s.members()} for n, s in chosen.items()}


def packet_for(receiver: Swim, *messages: Message) -> bytes:
    """``messages`` as one sealed datagram ``receiver`` can open (one or a compound)."""
    parts = [codec.encode(m) for m in messages]
    payload = parts[0] if len(parts) == 1 else codec.encode_compound(parts)
    return receiver.envelope.seal(payload)


def opened(sender: Swim, data: bytes) -> list[Message]:
    """The messages inside a datagram ``sender`` produced."""
    return codec.decode_packet(sender.envelope.open(data))


def step_until(
    member: Swim, done: Callable[[], bool], *, limit: float, drop_output: bool = True
) -> float:
    """Fire ``member``'s timers one deadline at a time until ``done()``; returns the time
    of the timer that made it true. Outputs are thrown away unless ``drop_output`` is
    False (then the caller drains them). Fails if ``limit`` passes first."""
    while True:
        deadline = member.get_timer()
        assert deadline is not None and deadline <= limit, f"not done by t={limit}"
        member.handle_timer(deadline)
        if done():
            return deadline
        if drop_output:
            drop(member, deadline)
