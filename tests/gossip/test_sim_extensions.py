"""Direct user messages (``Swim.send_user``) and simulator extensions riding on members."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from gossip.config import preset
from gossip.events import Event, MemberFailed
from gossip.sim import Simulation


@dataclass
class PingPong:
    """Member 0 pings member 1 every second; member 1 answers; both count."""

    sim: Simulation
    index: int
    reliable: bool
    next_at: float | None = 1.0
    received: list[tuple[float, bytes]] = field(default_factory=list)
    failures_seen: list[str] = field(default_factory=list)

    def get_timer(self) -> float | None:
        return self.next_at if self.index == 0 else None

    def handle_timer(self, now: float) -> None:
        peer = self.sim.members[1]
        self.sim.members[0].core.send_user(peer.address, b"E:ping", now, reliable=self.reliable)
        self.next_at = now + 1.0

    def on_message(self, payload: bytes, now: float) -> bool:
        if not payload.startswith(b"E:"):
            return False
        self.received.append((now, payload))
        if payload == b"E:ping":
            origin = self.sim.members[0].address
            self.sim.members[self.index].core.send_user(origin, b"E:pong", now)
        return True

    def on_event(self, event: Event, now: float) -> None:
        if isinstance(event, MemberFailed):
            self.failures_seen.append(event.member.name)


@pytest.mark.parametrize("reliable", [False, True])
def test_direct_messages_reach_only_their_target(reliable: bool) -> None:
    extensions: dict[int, PingPong] = {}

    def factory(sim: Simulation, index: int) -> PingPong:
        extensions[index] = PingPong(sim, index, reliable)
        return extensions[index]

    sim = Simulation(4, preset("default"), seed=2, extensions=factory)
    sim.run_until(10.5)
    pings = [p for _, p in extensions[1].received]
    pongs = [p for _, p in extensions[0].received]
    assert pings == [b"E:ping"] * 10
    assert pongs == [b"E:pong"] * 10
    assert extensions[2].received == [] and extensions[3].received == []
    # A message that is not the extension's own still reaches the layer below.
    assert all(not n.delegate.known for n in sim.members)


def test_extensions_hear_member_events_and_stop_with_a_crash() -> None:
    extensions: dict[int, PingPong] = {}

    def factory(sim: Simulation, index: int) -> PingPong:
        extensions[index] = PingPong(sim, index, reliable=False)
        return extensions[index]

    sim = Simulation(6, preset("default"), seed=4, extensions=factory)
    sim.run_until(3.0)
    sim.crash(0)
    sim.run_until(20.0)
    assert len(extensions[1].received) == 3  # the pings sent up to the crash, at t=3
    for index in range(1, 6):
        assert "m00000" in extensions[index].failures_seen


def test_a_message_too_big_for_a_datagram_must_go_reliably() -> None:
    sim = Simulation(2, preset("default"), seed=1)
    core = sim.members[0].core
    with pytest.raises(Exception, match="send it reliably"):
        core.send_user(sim.members[1].address, b"x" * 5000, 0.0)
    core.send_user(sim.members[1].address, b"x" * 5000, 0.0, reliable=True)
    assert core.streams_to_open()
