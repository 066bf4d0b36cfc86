"""The SWIM + Lifeguard core with a manual clock: no sockets, no real time."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from gossip import codec
from gossip.codec import Ack, Alive, Dead, IndirectPing, MemberRecord, Ping, PushPull, Suspect
from gossip.config import GossipConfig, preset
from gossip.delegate import Delegate
from gossip.errors import LocalProtocolError
from gossip.events import (
    JoinCompleted,
    LeaveCompleted,
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
from gossip.keyring import Envelope, Keyring
from gossip.swim import MAX_PENDING_STREAMS, MAX_RELAYS, Swim

from .helpers import (
    Wire,
    address_of,
    drain_events,
    drop,
    make_member,
    opened,
    packet_for,
    state_of,
    step_until,
    transfer,
    view,
)

ALIVE, SUSPECT, DEAD, LEFT = (
    MemberState.ALIVE,
    MemberState.SUSPECT,
    MemberState.DEAD,
    MemberState.LEFT,
)
LAN = preset("lan")
DEFAULT = preset("default")


def pair(config: GossipConfig, **kwargs: object) -> tuple[Swim, Swim]:
    """Two members, ``a`` joined to ``b`` by one push-pull at t=0; events drained."""
    a = make_member("a", config, index=0)
    b = make_member("b", config, index=1)
    a.join([b.address], 0.0)
    assert transfer(a, b, 0.0) == 1
    drain_events(a)
    drain_events(b)
    return a, b


def cluster(count: int, config: GossipConfig, *, seed: int = 1, settle: float = 5.0) -> Wire:
    """``count`` members all joined through m0 and settled."""
    wire = Wire(seed=seed)
    first, *rest = wire.spawn(count, config)
    for member in rest:
        wire.join(member, first)
    wire.run_for(settle)
    everyone = set(wire.members)
    for name, seen in wire.views().items():
        assert set(seen) == everyone, f"{name} did not learn everyone (seed {seed})"
        assert set(seen.values()) == {ALIVE}, f"{name}: {seen} (seed {seed})"
    for name in wire.members:
        wire.take_events(name)
    return wire


def assert_only_members_raise_their_incarnation(wire: Wire) -> None:
    for member in wire.members.values():
        for other in member.members():
            owner = wire.members[other.name]
            assert other.incarnation <= owner.incarnation, (
                f"{member.name} holds {other.name} at incarnation {other.incarnation}, "
                f"above its own {owner.incarnation}"
            )


# ---------------------------------------------------------------------------- joining


def test_two_members_join_by_push_pull() -> None:
    a = make_member("a", LAN, index=0)
    b = make_member("b", LAN, index=1)
    a.join([b.address, a.address], 0.0)  # our own address in the seed list is skipped
    (request,) = a.streams_to_open()
    assert request.address == b.address
    assert request.timeout == LAN.tcp_timeout
    reply = b.receive_stream(request.payload, a.address, 0.01)
    assert reply is not None
    a.receive_stream_reply(request.stream_id, reply, 0.02)

    assert view(a) == view(b) == {"a": (0, ALIVE), "b": (0, ALIVE)}
    a_events = drain_events(a)
    assert [type(e) for e in a_events] == [MemberJoined, JoinCompleted]
    assert a_events[-1] == JoinCompleted(1, ())
    (joined,) = drain_events(b)
    assert isinstance(joined, MemberJoined) and joined.member.name == "a"
    assert joined.member.address == a.address
    assert a.stats.push_pulls == b.stats.push_pulls == 1


def test_join_reports_seeds_that_did_not_answer() -> None:
    a = make_member("a", LAN, index=0)
    a.join([address_of(5), address_of(6)], 0.0)
    assert drop(a, 10.0) == 2
    assert drain_events(a) == [JoinCompleted(0, (address_of(5), address_of(6)))]
    assert view(a) == {"a": (0, ALIVE)}


def test_three_members_join_through_one_seed() -> None:
    wire = cluster(3, DEFAULT, settle=0.0 + 2.0)
    assert all(len(v) == 3 for v in wire.views().values())
    assert_only_members_raise_their_incarnation(wire)


def test_join_with_no_seeds_completes_at_once() -> None:
    a = make_member("a", LAN)
    a.join([], 0.0)
    assert drain_events(a) == [JoinCompleted(0, ())]


# ---------------------------------------------------------------------------- probing


def test_probe_and_ack() -> None:
    a, b = pair(LAN)
    sent = step_until(a, lambda: a.stats.probes == 1, limit=5.0, drop_output=False)
    pings = [
        (message, address)
        for data, address in a.packets_to_send()
        for message in opened(a, data)
        if isinstance(message, Ping)
    ]
    ((ping, address),) = pings
    assert address == b.address
    assert ping.target == "b" and ping.source_address == a.address
    b.receive_packet(a.envelope.seal(codec.encode(ping)), a.address, sent + 0.002)
    acks = [m for data, _ in b.packets_to_send() for m in opened(b, data) if isinstance(m, Ack)]
    assert acks == [Ack(ping.seq)]
    a.receive_packet(packet_for(a, acks[0]), b.address, sent + 0.004)
    assert a.stats.rtt_count == 1
    assert a.stats.rtt_sum == pytest.approx(0.004)
    # The probe period ends without a suspicion.
    step_until(a, lambda: a.stats.probes == 2, limit=sent + 10)
    assert a.stats.probes_failed == 0
    assert state_of(a, "b") == ALIVE


def test_a_ping_for_another_name_is_not_acked() -> None:
    a, b = pair(LAN)
    b.receive_packet(packet_for(b, Ping(7, "old-b", a.address)), a.address, 1.0)
    assert b.packets_to_send() == []
    assert b.stats.dropped == {"misdirected": 1}


def test_silent_member_is_suspected_then_declared_dead() -> None:
    config = LAN
    a, _b = pair(config)
    probed = step_until(a, lambda: a.stats.probes == 1, limit=5.0)
    suspected = step_until(a, lambda: state_of(a, "b") == SUSPECT, limit=probed + 5)
    assert suspected == pytest.approx(probed + config.probe_interval)
    assert a.stats.probes_failed == 1
    assert a.stats.suspicions_started == 1
    (event,) = drain_events(a)
    assert isinstance(event, MemberSuspected)
    assert event.accuser == "a" and event.member.incarnation == 0

    minimum, _ = config.suspicion_timeouts(2)  # too few members to confirm: k = 0
    dead_at = step_until(a, lambda: state_of(a, "b") == DEAD, limit=suspected + 60)
    assert dead_at == pytest.approx(suspected + minimum)
    (failed,) = drain_events(a)
    assert isinstance(failed, MemberFailed)
    assert failed.member.incarnation == 0, "only b may raise b's incarnation"


def test_silent_member_is_found_dead_in_a_cluster() -> None:
    wire = cluster(4, LAN, seed=2)
    wire.crash("m3")
    crashed_at = wire.now
    wire.run_for(30.0)  # crashed at t=5: found dead well before t=35, reaped after
    for name in ("m0", "m1", "m2"):
        assert wire.views([name])[name]["m3"] == DEAD, f"{name} (seed 2)"
        kinds = [type(e) for e in wire.take_events(name)]
        assert MemberSuspected in kinds and MemberFailed in kinds
        assert kinds.index(MemberSuspected) < kinds.index(MemberFailed)
    # Nobody healthy was ever suspected.
    for name in ("m0", "m1", "m2"):
        for other in ("m0", "m1", "m2"):
            assert wire.views([name])[name][other] == ALIVE
    assert wire.now - crashed_at == pytest.approx(30.0)
    assert_only_members_raise_their_incarnation(wire)
    wire.run_for(LAN.gossip_to_the_dead_time)
    for name in ("m0", "m1", "m2"):
        assert "m3" not in wire.views([name])[name]
        assert [type(e) for e in wire.take_events(name)] == [MemberReaped]


def test_lifeguard_suspicion_shrinks_with_independent_confirmations() -> None:
    config = LAN
    a = make_member("a", config, index=0)
    for index, name in enumerate(["b", "c", "d", "e"], start=1):
        alive = Alive(0, name, address_of(index), b"")
        a.receive_packet(packet_for(a, alive), address_of(index), 0.0)
    drain_events(a)
    members = 5
    minimum, maximum = config.suspicion_timeouts(members)
    k = config.suspicion_mult - 2
    a.receive_packet(packet_for(a, Suspect(0, "b", "c")), address_of(2), 10.0)
    a.receive_packet(packet_for(a, Suspect(0, "b", "c")), address_of(2), 10.0)  # duplicate
    a.receive_packet(packet_for(a, Suspect(0, "b", "d")), address_of(3), 10.0)
    expected = max(minimum, maximum - (maximum - minimum) * math.log(2) / math.log(k + 1))
    assert minimum < expected < maximum
    # Everyone answers a's probes, so a's own probes accuse no one.
    dead_at = None
    while dead_at is None:
        deadline = a.get_timer()
        assert deadline is not None and deadline < 200.0
        a.handle_timer(deadline)
        answer_pings(a, deadline)
        if state_of(a, "b") == DEAD:
            dead_at = deadline
    assert dead_at == pytest.approx(10.0 + expected)
    assert a.stats.suspicions_started == 0


def answer_pings(member: Swim, now: float) -> None:
    """Everyone ``member`` pings acks at once; everything else is lost."""
    for data, address in member.packets_to_send():
        for message in opened(member, data):
            if isinstance(message, Ping):
                member.receive_packet(packet_for(member, Ack(message.seq)), address, now)
    drop(member, now)


def test_direct_probe_failure_goes_indirect_and_the_relay_answers() -> None:
    wire = cluster(3, LAN, seed=4)
    m0, m1, m2 = (wire.members[n] for n in ("m0", "m1", "m2"))
    # m0 cannot reach m2 directly, but m1 can: indirect probes keep m2 alive.
    wire.packet_filter = lambda sender, receiver, data: (
        {sender.name, receiver.name}
        != {
            "m0",
            "m2",
        }
    )
    wire.run_for(20.0)
    assert m1.stats.probes > 0
    assert state_of(m0, "m2") == ALIVE
    assert m0.stats.probes_failed == 0, "the indirect (or TCP) ack should have counted"
    assert m2.stats.packets_received > 0


def test_missing_nacks_raise_awareness_and_success_lowers_it() -> None:
    config = DEFAULT.replace(probe_interval=1.0, tcp_fallback_probe=False)
    wire = cluster(3, config, seed=5)
    m0 = wire.members["m0"]
    wire.crash("m2")
    # m1 relays for m0 but its nacks are lost: m0 must blame itself.
    wire.packet_filter = lambda sender, receiver, data: (
        not any(isinstance(m, codec.Nack) for m in opened(sender, data))
    )
    highest = 0
    for _ in range(400):
        wire.run_for(0.01)
        highest = max(highest, m0.awareness)
        if m0.stats.probes_failed:
            break
    assert m0.stats.probes_failed >= 1
    assert highest >= 1, "no nack came back, yet awareness did not rise"
    # Successful probes of m1 bring it back down.
    wire.packet_filter = None
    wire.run_for(20.0)
    assert state_of(m0, "m2") == DEAD
    assert m0.awareness == 0


def watch_awareness(wire: Wire, seconds: float) -> dict[str, int]:
    highest = {name: 0 for name in wire.members}
    steps = round(seconds / 0.01)
    for _ in range(steps):
        wire.run_for(0.01)
        for name, member in wire.members.items():
            highest[name] = max(highest[name], member.awareness)
    return highest


def test_nacks_keep_a_healthy_prober_healthy_with_room_in_the_period() -> None:
    config = DEFAULT.replace(probe_interval=1.0, tcp_fallback_probe=False)
    wire = cluster(3, config, seed=6)
    wire.crash("m2")
    highest = watch_awareness(wire, 6.0)
    assert wire.members["m0"].stats.probes_failed + wire.members["m1"].stats.probes_failed
    assert highest["m0"] == highest["m1"] == 0, highest


@pytest.mark.parametrize("name", ["default", "local"])
def test_nacks_arrive_before_the_probe_period_ends(name: str) -> None:
    """Lifeguard §IV-A: a relay's nack must reach the prober inside its protocol period,
    or a healthy prober counts the nack as missing and slows itself down."""
    config = preset(name).replace(tcp_fallback_probe=False)
    wire = cluster(3, config, seed=6)
    wire.crash("m2")
    highest = watch_awareness(wire, 4.0)
    failed = {n: wire.members[n].stats.probes_failed for n in ("m0", "m1")}
    assert any(failed.values())
    assert highest["m0"] == highest["m1"] == 0, (
        f"healthy members raised their awareness {highest} after failed probes {failed}"
        f" (probe_interval={config.probe_interval}, probe_timeout={config.probe_timeout})"
    )


def test_swim_preset_has_no_awareness() -> None:
    wire = cluster(3, preset("swim"), seed=7)
    wire.crash("m2")
    highest = watch_awareness(wire, 3.0)
    assert highest["m0"] == highest["m1"] == 0


def test_buddy_system_pings_a_suspect_with_its_suspicion() -> None:
    a, b = pair(LAN)
    a.receive_packet(packet_for(a, Suspect(0, "b", "x")), address_of(9), 0.1)
    assert state_of(a, "b") == SUSPECT
    # Let the ordinary broadcast of the suspicion run out first.
    drop(a, step_until(a, lambda: a.broadcast_queue_depth == 0, limit=3.0))
    probes = a.stats.probes
    now = step_until(a, lambda: a.stats.probes == probes + 1, limit=4.0, drop_output=False)
    assert state_of(a, "b") == SUSPECT, f"suspicion ended before the probe at {now}"
    to_b = [opened(a, data) for data, address in a.packets_to_send() if address == b.address]
    probe_packets = [ms for ms in to_b if any(isinstance(m, Ping) for m in ms)]
    assert len(probe_packets) == 1
    assert Suspect(0, "b", "a") in probe_packets[0]


def test_without_lifeguard_a_suspect_gets_a_plain_ping() -> None:
    config = preset("swim").replace(suspicion_mult=10)  # time for two probes
    a, b = pair(config)
    a.receive_packet(packet_for(a, Suspect(0, "b", "x")), address_of(9), 0.1)
    drop(a, step_until(a, lambda: a.broadcast_queue_depth == 0, limit=3.0))
    probes = a.stats.probes
    step_until(a, lambda: a.stats.probes == probes + 1, limit=4.0, drop_output=False)
    assert state_of(a, "b") == SUSPECT
    to_b = [opened(a, data) for data, address in a.packets_to_send() if address == b.address]
    probe_packets = [ms for ms in to_b if any(isinstance(m, Ping) for m in ms)]
    assert len(probe_packets) == 1
    assert not any(isinstance(m, Suspect) for m in probe_packets[0])


# ---------------------------------------------------------------------------- refutation


def test_refutation_raises_incarnation_and_ends_the_suspicion() -> None:
    a, b = pair(DEFAULT)
    a.receive_packet(packet_for(a, Suspect(0, "b", "x")), address_of(9), 1.0)
    assert [type(e) for e in drain_events(a)] == [MemberSuspected]
    drop(a, 1.0)

    # a's next packet to b (the buddy ping or gossip) carries the suspicion.
    b.receive_packet(packet_for(b, Suspect(0, "b", "a")), a.address, 1.01)
    assert b.incarnation == 1
    assert drain_events(b) == [SuspicionRefuted(1, "a")]
    assert b.stats.refutations == 1
    assert view(b)["b"] == (1, ALIVE)
    # direct_refute: the refutation goes straight to the accuser.
    assert transfer(b, a, 1.02) >= 1
    assert view(a)["b"] == (1, ALIVE)
    (recovered,) = drain_events(a)
    assert isinstance(recovered, MemberRecovered)
    assert recovered.member.incarnation == 1
    # The suspicion timer is gone: nothing fails later.
    a.receive_packet(packet_for(a, Ack(0)), b.address, 1.03)
    for deadline in (5.0, 20.0, 60.0):
        while (timer := a.get_timer()) is not None and timer <= deadline:
            a.handle_timer(timer)
            transfer(a, b, timer)
            transfer(b, a, timer)
    assert state_of(a, "b") == ALIVE
    assert not any(isinstance(e, MemberFailed) for e in drain_events(a))


def test_refutation_outbids_a_higher_accusation() -> None:
    a = make_member("a", LAN, incarnation=3)
    a.receive_packet(packet_for(a, Suspect(7, "a", "z")), address_of(9), 1.0)
    assert a.incarnation == 8
    a.receive_packet(packet_for(a, Dead(8, "a", "z")), address_of(9), 1.1)
    assert a.incarnation == 9
    a.receive_packet(packet_for(a, Suspect(2, "a", "z")), address_of(9), 1.2)  # stale
    assert a.incarnation == 9
    assert view(a)["a"] == (9, ALIVE)
    assert [e for e in drain_events(a) if isinstance(e, SuspicionRefuted)] == [
        SuspicionRefuted(8, "z"),
        SuspicionRefuted(9, "z"),
    ]


def test_others_never_raise_a_members_incarnation() -> None:
    a, b = pair(LAN)
    a.receive_packet(packet_for(a, Suspect(0, "b", "x")), address_of(9), 1.0)
    a.receive_packet(packet_for(a, Dead(0, "b", "x")), address_of(9), 1.0)
    assert view(a)["b"] == (0, DEAD)
    assert b.incarnation == 0
    # A suspicion that times out declares death at the incarnation it suspected.
    c, _d = pair(DEFAULT)
    step_until(c, lambda: state_of(c, "b") == DEAD, limit=30.0)
    assert view(c)["b"] == (0, DEAD)


def test_a_dead_member_comes_back_only_with_a_higher_incarnation() -> None:
    a, b = pair(LAN)
    a.receive_packet(packet_for(a, Dead(0, "b", "x")), address_of(9), 1.0)
    drain_events(a)
    a.receive_packet(packet_for(a, Alive(0, "b", b.address, b"")), b.address, 1.1)
    assert view(a)["b"] == (0, DEAD)
    a.receive_packet(packet_for(a, Alive(1, "b", b.address, b"")), b.address, 1.2)
    assert view(a)["b"] == (1, ALIVE)
    assert [type(e) for e in drain_events(a)] == [MemberJoined]


def test_member_declared_dead_while_stalled_refutes_and_returns() -> None:
    """m2 stalls (a long pause, state kept) and is declared dead; when it wakes, a
    push-pull tells it so, it refutes with a higher incarnation and is alive again."""
    wire = cluster(3, LAN, seed=8)
    wire.crash("m2")
    wire.run_for(15.0)
    assert wire.views(["m0"])["m0"]["m2"] == DEAD
    wire.down.discard("m2")
    wire.run_for(2 * LAN.push_pull_interval)
    m2 = wire.members["m2"]
    assert m2.incarnation >= 1, "m2 never refuted its death (seed 8)"
    assert m2.stats.refutations >= 1
    for name in ("m0", "m1"):
        assert view(wire.members[name])["m2"] == (m2.incarnation, ALIVE), f"seed 8, {name}"
    assert_only_members_raise_their_incarnation(wire)


# ---------------------------------------------------------------------------- leaving


def test_graceful_leave_is_seen_as_left_not_dead() -> None:
    wire = cluster(3, LAN, seed=9)
    leaver = wire.members["m2"]
    leaver.leave(wire.now)
    assert state_of(leaver, "m2") == LEFT
    wire.run_for(1.0)
    assert LeaveCompleted() in wire.take_events("m2")
    wire.crash("m2")  # the adapter stops after LeaveCompleted
    wire.run_for(10.0)
    for name in ("m0", "m1"):
        assert wire.views([name])[name]["m2"] == LEFT
        kinds = [type(e) for e in wire.take_events(name)]
        assert kinds.count(MemberLeft) == 1
        assert MemberFailed not in kinds and MemberSuspected not in kinds


def test_leaving_member_does_not_refute() -> None:
    a, b = pair(LAN)
    a.leave(1.0)
    a.receive_packet(packet_for(a, Suspect(0, "a", "b")), b.address, 1.1)
    assert a.incarnation == 0
    assert state_of(a, "a") == LEFT


def test_left_member_is_reaped_after_its_timeout() -> None:
    config = DEFAULT.replace(left_reap_timeout=20.0)
    a, b = pair(config)
    a.receive_packet(packet_for(a, Dead(0, "b", "b")), b.address, 1.0)
    assert [type(e) for e in drain_events(a)] == [MemberLeft]
    reaped = step_until(a, lambda: a.member("b") is None, limit=100.0)
    assert reaped == pytest.approx(21.0)
    (event,) = drain_events(a)
    assert isinstance(event, MemberReaped) and event.member.state == LEFT


@pytest.mark.parametrize(
    ("config", "after"),
    [
        (LAN, LAN.gossip_to_the_dead_time),
        (DEFAULT.replace(reconnect_timeout=50.0), 50.0),
    ],
    ids=["lan", "default"],
)
def test_dead_member_is_reaped_after_its_timeout(config: GossipConfig, after: float) -> None:
    a, _b = pair(config)
    a.receive_packet(packet_for(a, Dead(0, "b", "x")), address_of(9), 2.0)
    drain_events(a)
    reaped = step_until(a, lambda: a.member("b") is None, limit=500.0)
    assert reaped == pytest.approx(2.0 + after)
    assert [type(e) for e in drain_events(a)] == [MemberReaped]
    assert view(a) == {"a": (0, ALIVE)}


# ---------------------------------------------------------------------------- metadata


def test_set_meta_propagates_with_a_new_incarnation() -> None:
    wire = cluster(3, LAN, seed=10)
    m0 = wire.members["m0"]
    m0.set_meta(b"role=db", wire.now)
    assert m0.incarnation == 1
    wire.run_for(3.0)
    for name in ("m1", "m2"):
        record = wire.members[name].member("m0")
        assert record is not None
        assert (record.meta, record.incarnation, record.state) == (b"role=db", 1, ALIVE)
        updates = [e for e in wire.take_events(name) if isinstance(e, MemberUpdated)]
        assert len(updates) == 1 and updates[0].member.meta == b"role=db"


def test_set_meta_refuses_oversize_metadata() -> None:
    a = make_member("a", LAN)
    with pytest.raises(LocalProtocolError):
        a.set_meta(b"x" * 513, 0.0)
    assert a.incarnation == 0


# ---------------------------------------------------------------------------- partitions


def partition_and_heal(config: GossipConfig, seed: int) -> Wire:
    wire = cluster(4, config, seed=seed)
    wire.partition(["m0", "m1"], ["m2", "m3"])
    wire.run_for(60.0)  # longer than gossip_to_the_dead_time: memberlist gives up
    assert wire.views(["m0"])["m0"].get("m2") in (DEAD, None)
    wire.heal()
    wire.run_for(30.0)
    return wire


def test_healed_partition_merges_without_a_join() -> None:
    wire = partition_and_heal(DEFAULT, seed=11)
    for name, seen in wire.views().items():
        assert seen == dict.fromkeys(wire.members, ALIVE), f"{name}: {seen} (seed 11)"
    assert_only_members_raise_their_incarnation(wire)


def test_lan_preset_does_not_reconnect_after_a_partition() -> None:
    wire = partition_and_heal(LAN, seed=11)
    for name in ("m0", "m1"):
        seen = wire.views([name])[name]
        assert seen.get("m2") in (DEAD, None) and seen.get("m3") in (DEAD, None), seen


# ---------------------------------------------------------------------------- hostile input


def snapshot(member: Swim) -> tuple[object, ...]:
    return (
        view(member),
        member.digest(),
        member.incarnation,
        member.broadcast_queue_depth,
        member.get_timer(),
        member.awareness,
    )


KEY = bytes(range(32))


def sealed_member() -> tuple[Swim, Swim]:
    a = Swim(
        "a",
        address_of(0),
        LAN,
        rng=random.Random(1),
        now=0.0,
        envelope=Envelope("prod", Keyring([KEY])),
    )
    b = Swim(
        "b",
        address_of(1),
        LAN,
        rng=random.Random(2),
        now=0.0,
        envelope=Envelope("prod", Keyring([KEY])),
    )
    a.join([b.address], 0.0)
    transfer(a, b, 0.0)
    drain_events(a)
    return a, b


ALIVE_X = codec.encode(Alive(5, "x", address_of(5), b""))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "too_short"),
        (ALIVE_X, "unencrypted"),
        (Envelope("prod").seal(ALIVE_X), "unencrypted"),
        (Envelope("prod", Keyring([bytes(32)])).seal(ALIVE_X), "decrypt_failed"),
        (Envelope("staging", Keyring([KEY])).seal(ALIVE_X), "decrypt_failed"),
        (Envelope("prod", Keyring([KEY])).seal(b"\xff\x00"), "unknown_type"),
        (Envelope("prod", Keyring([KEY])).seal(ALIVE_X[:-3]), "malformed"),
        (Envelope("prod", Keyring([KEY])).seal(b"\x07\x02\x00"), "compound_malformed"),
        (Envelope("prod", Keyring([KEY])).seal(b""), "too_short"),
    ],
)
def test_bad_packets_are_dropped_counted_and_change_nothing(data: bytes, reason: str) -> None:
    a, _ = sealed_member()
    before = snapshot(a)
    a.receive_packet(data, address_of(5), 1.0)
    assert a.stats.dropped == {reason: 1}
    assert snapshot(a) == before
    assert a.packets_to_send() == [] and a.streams_to_open() == []
    assert drain_events(a) == []


def test_good_sealed_packet_is_accepted() -> None:
    a, _ = sealed_member()
    a.receive_packet(Envelope("prod", Keyring([KEY])).seal(ALIVE_X), address_of(5), 1.0)
    assert a.stats.dropped == {}
    assert view(a)["x"] == (5, ALIVE)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x06", b"\x06\x93", b"\xff" * 40, bytes(range(256))],
    ids=["empty", "bare-type", "truncated", "ff", "ramp"],
)
def test_garbage_stream_returns_none_and_is_counted(data: bytes) -> None:
    a, b = pair(LAN)
    before = snapshot(b)
    assert b.receive_stream(data, a.address, 1.0) is None
    assert sum(b.stats.dropped.values()) == 1
    assert snapshot(b) == before
    assert drain_events(b) == []


def test_garbage_stream_reply_fails_the_join() -> None:
    a = make_member("a", LAN)
    a.join([address_of(3)], 0.0)
    (request,) = a.streams_to_open()
    a.receive_stream_reply(request.stream_id, b"\x06garbage", 1.0)
    assert drain_events(a) == [JoinCompleted(0, (address_of(3),))]
    assert a.stats.dropped == {"malformed": 1}
    assert view(a) == {"a": (0, ALIVE)}


def test_alive_flood_stops_at_max_members() -> None:
    config = LAN.replace(max_members=10)
    a = make_member("a", config)
    for i in range(50):
        alive = Alive(0, f"n{i}", (f"10.1.0.{i}", 7946), b"")
        a.receive_packet(packet_for(a, alive), address_of(9), 1.0)
    assert len(a.members()) == 10
    assert a.stats.dropped == {"member_limit": 41}
    assert sum(isinstance(e, MemberJoined) for e in drain_events(a)) == 9


def test_push_pull_flood_stops_at_max_members() -> None:
    config = LAN.replace(max_members=10)
    a = make_member("a", config)
    records = tuple(MemberRecord(f"n{i}", address_of(i + 1), b"", 0, ALIVE) for i in range(9))
    assert (
        a.receive_stream(
            a.envelope.seal(codec.encode(PushPull(False, records, b""))), address_of(1), 1.0
        )
        is not None
    )
    assert len(a.members()) == 10
    more = tuple(MemberRecord(f"m{i}", address_of(i + 20), b"", 0, ALIVE) for i in range(5))
    a.receive_stream(a.envelope.seal(codec.encode(PushPull(False, more, b""))), address_of(1), 2.0)
    assert len(a.members()) == 10
    assert a.stats.dropped.get("member_limit") == 5


def test_constructor_refuses_bad_arguments() -> None:
    with pytest.raises(LocalProtocolError):
        make_member("", LAN)
    with pytest.raises(LocalProtocolError):
        make_member("x" * 129, LAN)
    with pytest.raises(LocalProtocolError):
        make_member("a", LAN, meta=b"x" * 513)


def test_same_seed_same_run() -> None:
    def run() -> list[tuple[str, object]]:
        wire = cluster(4, DEFAULT, seed=12)
        wire.crash("m1")
        wire.run_for(20.0)
        return [(n, view(m)) for n, m in wire.members.items()] + [
            (n, m.stats.bytes_sent) for n, m in wire.members.items()
        ]

    assert run() == run()


# ---------------------------------------------------------------------------- bounds


def test_join_reports_every_seed_it_could_not_contact() -> None:
    """More seeds than concurrent streams: every seed is either contacted or reported
    failed in JoinCompleted, none silently forgotten."""
    a = make_member("a", LAN)
    seeds = [(f"10.2.{i // 256}.{i % 256}", 7946) for i in range(MAX_PENDING_STREAMS + 10)]
    a.join(seeds, 0.0)
    streams = a.streams_to_open()
    assert len(streams) <= MAX_PENDING_STREAMS
    for request in streams:
        a.receive_stream_reply(request.stream_id, None, 1.0)
    events = [e for e in drain_events(a) if isinstance(e, JoinCompleted)]
    assert len(events) == 1
    assert events[0].contacted == 0
    assert sorted(events[0].failed) == sorted(seeds)


def test_relayed_probes_are_bounded() -> None:
    a = make_member("a", LAN)
    for seq in range(MAX_RELAYS + 50):
        request = IndirectPing(seq, "t", address_of(3), True, "s", address_of(4))
        a.receive_packet(packet_for(a, request), address_of(4), 1.0)
    pings = [p for p in a.packets_to_send() if p[1] == address_of(3)]
    assert len(pings) == MAX_RELAYS
    assert a.stats.dropped == {"relay_limit": 50}


def test_relay_forwards_the_ack_and_nacks_when_the_target_is_silent() -> None:
    relay = make_member("r", LAN)
    relay.receive_packet(
        packet_for(relay, IndirectPing(41, "t", address_of(3), True, "s", address_of(4))),
        address_of(4),
        1.0,
    )
    ((data, address),) = relay.packets_to_send()
    assert address == address_of(3)
    (ping,) = opened(relay, data)
    assert isinstance(ping, Ping) and ping.target == "t"
    relay.receive_packet(packet_for(relay, Ack(ping.seq)), address_of(3), 1.1)
    forwarded = [(opened(relay, d), a) for d, a in relay.packets_to_send()]
    assert forwarded == [([Ack(41)], address_of(4))]
    # A second request whose target stays silent: a nack after the relay's wait.
    relay.receive_packet(
        packet_for(relay, IndirectPing(42, "t", address_of(3), True, "s", address_of(4))),
        address_of(4),
        2.0,
    )
    relay.packets_to_send()
    nacks: list[codec.Message] = []
    while not nacks:
        deadline = relay.get_timer()
        assert deadline is not None and deadline <= 2.0 + LAN.probe_timeout
        relay.handle_timer(deadline)
        nacks = [
            m
            for d, a in relay.packets_to_send()
            if a == address_of(4)
            for m in opened(relay, d)
            if isinstance(m, codec.Nack)
        ]
    assert nacks == [codec.Nack(42)]


def test_refuting_raises_awareness_and_awareness_stretches_the_probe_interval() -> None:
    config = LAN
    a = make_member("a", config)
    a.receive_packet(packet_for(a, Alive(0, "b", address_of(1), b"")), address_of(1), 0.0)
    for incarnation in range(3):
        a.receive_packet(packet_for(a, Suspect(incarnation, "a", "b")), address_of(1), 0.1)
    assert a.incarnation == 3
    assert a.awareness == 3
    probe_times: list[float] = []
    while len(probe_times) < 3:
        deadline = a.get_timer()
        assert deadline is not None and deadline < 60.0
        probes = a.stats.probes
        a.handle_timer(deadline)
        if a.stats.probes > probes:
            probe_times.append(deadline)
        answer_pings(a, deadline)  # every probe succeeds: awareness falls by one each
    # The next probe is timed at each tick with the score then: 3, then 2 after a success.
    intervals = [later - earlier for earlier, later in itertools.pairwise(probe_times)]
    assert intervals == pytest.approx([4 * config.probe_interval, 3 * config.probe_interval])
    assert a.awareness == 0


def test_awareness_is_capped() -> None:
    a = make_member("a", LAN)
    for incarnation in range(20):
        a.receive_packet(packet_for(a, Suspect(incarnation, "a", "b")), address_of(1), 0.1)
    assert a.awareness == LAN.awareness_max_multiplier - 1


class ChattyDelegate(Delegate):
    """Offers as many user broadcasts as fit, of awkward sizes."""

    def __init__(self) -> None:
        self.sizes = itertools.cycle([1, 37, 300, 999, 5])
        self.received = 0

    def broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        out: list[bytes] = []
        while True:
            size = next(self.sizes)
            if sum(len(m) + overhead for m in out) + size + overhead > limit:
                return out
            out.append(b"u" * size)

    def notify_message(self, message: bytes) -> None:
        self.received += 1


def test_packets_never_exceed_the_udp_buffer_size() -> None:
    """Big metadata everywhere, encryption overhead and user broadcasts competing for
    room: every datagram still fits (the Wire asserts it on each send)."""
    config = DEFAULT.replace(udp_buffer_size=1400)
    wire = Wire(seed=13)
    delegates = []
    for i in range(12):
        delegate = ChattyDelegate()
        delegates.append(delegate)
        wire.add(
            Swim(
                f"m{i}",
                address_of(i),
                config,
                rng=random.Random(13 + i),
                now=0.0,
                delegate=delegate,
                envelope=Envelope("prod", Keyring([KEY])),
                meta=bytes([i]) * 512,
            )
        )
    first = wire.members["m0"]
    for name, member in wire.members.items():
        if name != "m0":
            wire.join(member, first)
    wire.run_for(10.0)
    assert wire.delivered > 100
    assert all(d.received > 0 for d in delegates)
    for seen in wire.views().values():
        assert len(seen) == 12 and set(seen.values()) == {ALIVE}
    for member in wire.members.values():
        assert member.stats.dropped == {}, member.stats.dropped
