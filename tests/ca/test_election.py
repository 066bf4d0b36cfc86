"""Unit tests of the election core: a manual clock and a tiny in-memory network.

``Net`` holds a few ``Election`` cores keyed by name; ``deliver()`` hands every queued
message to its target at the current time (optionally dropping some by hand, as
aioquic's tests do), and ``advance(t)`` fires due timers in time order, delivering
after each. Nothing here uses a socket or a real clock.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ca import codec
from ca.codec import (
    Heartbeat,
    HeartbeatAck,
    PreVoteRequest,
    PreVoteResponse,
    VoteRequest,
    VoteResponse,
)
from ca.election import (
    Address,
    Election,
    ElectionConfig,
    ElectionEvent,
    ElectionStarted,
    LeaderContactLost,
    LeaderElected,
    LeadershipLost,
    Role,
    TermChanged,
)
from ca.errors import CAError, LocalProtocolError, RemoteProtocolError

T = 1.0  # the default election timeout


def address_of(name: str) -> Address:
    return (f"10.0.0.{ord(name[0]) - ord('a') + 1}", 7946)


def make(
    name: str,
    *,
    expect: int = 1,
    seed: int = 0,
    now: float = 0.0,
    persisted: tuple[int, str | None] | None = None,
    config: ElectionConfig | None = None,
) -> Election:
    return Election(
        name,
        address_of(name),
        bootstrap_expect=expect,
        rng=random.Random(seed * 31 + ord(name[0])),
        now=now,
        config=config,
        persisted=persisted,
    )


def events(election: Election) -> list[ElectionEvent]:
    out = []
    while (event := election.next_event()) is not None:
        out.append(event)
    return out


Drop = Callable[[str, str, codec.Message], bool]


class Net:
    """A few cores on an instant, lossless wire that tests can cut by hand."""

    def __init__(self, names: str, *, expect: int | None = None, seed: int = 0) -> None:
        self.now = 0.0
        self.nodes = {n: make(n, expect=expect or len(names), seed=seed, now=0.0) for n in names}
        self.by_address = {address_of(n): n for n in names}
        self.down: set[str] = set()
        self.cut: set[frozenset[str]] = set()
        self.delivered: list[tuple[str, str, codec.Message]] = []
        for election in self.nodes.values():
            for other in names:
                election.server_joined(other, address_of(other), 0.0)

    def isolate(self, name: str) -> None:
        for other in self.nodes:
            if other != name:
                self.cut.add(frozenset((name, other)))

    def deliver(self, drop: Drop | None = None) -> None:
        """Deliver until nobody has anything left to send."""
        for _ in range(1000):
            sent = False
            for source, election in self.nodes.items():
                for address, data in election.messages_to_send():
                    sent = True
                    target = self.by_address[address]
                    message = codec.decode(data)
                    if source in self.down or target in self.down:
                        continue
                    if frozenset((source, target)) in self.cut:
                        continue
                    if drop is not None and drop(source, target, message):
                        continue
                    self.delivered.append((source, target, message))
                    self.nodes[target].receive(data, self.now)
            if not sent:
                return
        raise AssertionError("messages never stop")

    def advance(self, until: float, drop: Drop | None = None) -> None:
        while True:
            due = [
                (timer, name)
                for name, e in self.nodes.items()
                if name not in self.down and (timer := e.get_timer()) is not None
            ]
            if not due or min(due)[0] > until:
                break
            timer, name = min(due)
            self.now = max(self.now, timer)
            self.nodes[name].handle_timer(self.now)
            self.deliver(drop)
        self.now = until

    def leaders(self) -> list[str]:
        return [n for n, e in self.nodes.items() if e.is_leader and n not in self.down]


# ----------------------------------------------------------------------------- basics


def test_a_single_server_elects_itself() -> None:
    election = make("a", expect=1)
    timer = election.get_timer()
    assert timer is not None and T <= timer <= 2 * T  # randomized in [T, 2T]
    election.handle_timer(timer)
    assert election.is_leader and election.term == 1
    assert election.leader() == "a" and election.leader_address() == address_of("a")
    assert events(election) == [TermChanged(1), ElectionStarted(1), LeaderElected(1, "a")]
    assert election.state_to_persist() == (1, "a")
    # Alone it is its own majority: it never steps down for lack of acks.
    election.handle_timer(100.0)
    assert election.is_leader
    stats = election.statistics()
    assert stats.leader_changes == 1 and stats.elections_started == 1


def test_no_election_before_bootstrap_expect_servers_are_known() -> None:
    election = make("a", expect=3)
    bootstrapped_at_start = election.bootstrapped
    assert election.get_timer() is None and not bootstrapped_at_start
    election.server_joined("b", address_of("b"), 0.5)
    assert election.get_timer() is None
    election.server_joined("c", address_of("c"), 1.0)
    assert election.bootstrapped
    timer = election.get_timer()
    assert timer is not None and 1.0 + T <= timer <= 1.0 + 2 * T


def test_three_servers_elect_exactly_one_leader() -> None:
    for seed in range(20):
        net = Net("abc", seed=seed)
        net.advance(5.0)
        leaders = net.leaders()
        assert len(leaders) == 1, (seed, leaders)
        (leader,) = leaders
        assert {e.leader() for e in net.nodes.values()} == {leader}
        assert {e.term for e in net.nodes.values()} == {1}
        followers = [e for n, e in net.nodes.items() if n != leader]
        assert all(e.role is Role.FOLLOWER for e in followers)
        assert all(LeaderElected(1, leader) in events(e) for e in followers)
        assert [s.name for s in net.nodes["a"].servers()] == ["a", "b", "c"]


def test_heartbeats_keep_the_leader_in_place() -> None:
    net = Net("abcde", seed=1)
    net.advance(5.0)
    (leader,) = net.leaders()
    net.advance(60.0)
    assert net.leaders() == [leader]
    assert {e.term for e in net.nodes.values()} == {1}
    assert net.nodes[leader].stats.heartbeats_sent >= 55 / 0.25 - 1


# ----------------------------------------------------------------------------- votes


def test_a_server_votes_at_most_once_per_term_even_after_a_restart() -> None:
    voter = make("a", expect=3)
    for name in "bc":
        voter.server_joined(name, address_of(name), 0.0)

    def ask(election: Election, candidate: str, term: int, now: float) -> bool:
        election.receive(codec.encode(VoteRequest(term, candidate, 3)), now)
        ((address, data),) = election.messages_to_send()
        assert address == address_of(candidate)
        reply = codec.decode(data)
        assert isinstance(reply, VoteResponse)
        return reply.granted

    assert ask(voter, "b", 1, 0.1)
    assert not ask(voter, "c", 1, 0.2)
    assert ask(voter, "b", 1, 0.3)  # a retransmitted request gets the same answer
    assert voter.state_to_persist() == (1, "b")
    assert voter.stats.votes_granted == 2 and voter.stats.votes_denied == 1

    restarted = make("a", expect=3, persisted=voter.state_to_persist(), now=10.0)
    for name in "bc":
        restarted.server_joined(name, address_of(name), 10.0)
    assert restarted.term == 1 and restarted.voted_for == "b"
    assert not ask(restarted, "c", 1, 10.1)
    assert ask(restarted, "c", 2, 10.2)  # a new term, a new vote
    assert restarted.state_to_persist() == (2, "c")


def test_stale_and_unknown_requests_are_refused_or_dropped() -> None:
    voter = make("a", expect=2, persisted=(5, None))
    voter.server_joined("b", address_of("b"), 0.0)
    voter.receive(codec.encode(VoteRequest(4, "b", 2)), 0.1)
    ((_, data),) = voter.messages_to_send()
    assert codec.decode(data) == VoteResponse(5, "a", False)  # tells b the newer term
    voter.receive(codec.encode(VoteRequest(6, "z", 2)), 0.2)  # not a server we know
    voter.receive(codec.encode(VoteRequest(6, "a", 2)), 0.3)  # from ourselves
    assert voter.messages_to_send() == []
    assert voter.term == 5
    assert voter.stats.dropped == {"unknown_server": 1, "from_self": 1}


def test_a_candidate_that_knows_fewer_servers_is_refused() -> None:
    voter = make("a", expect=1)
    for name in "bcd":
        voter.server_joined(name, address_of(name), 0.0)
    voter.receive(codec.encode(VoteRequest(1, "b", 3)), 0.1)  # b counts only 3 servers
    ((_, data),) = voter.messages_to_send()
    assert codec.decode(data) == VoteResponse(1, "a", False)
    voter.receive(codec.encode(PreVoteRequest(2, "b", 3)), 0.2)
    ((_, data),) = voter.messages_to_send()
    assert codec.decode(data) == PreVoteResponse(2, "a", False, 1)


def test_split_votes_resolve_in_a_later_term() -> None:
    # b and c both stand in term 1 at once; a and d each vote for one of them.
    net = Net("abcd", seed=3)
    for name in "bc":
        net.nodes[name]._start_election(0.0)  # force the split
    first_vote = {"a": "b", "d": "c"}

    def split(source: str, target: str, message: codec.Message) -> bool:
        return isinstance(message, VoteRequest) and first_vote.get(target) not in (
            None,
            message.candidate,
        )

    net.deliver(split)
    assert net.leaders() == []  # 2 of 4 each: no majority (3)
    net.advance(10.0)
    assert len(net.leaders()) == 1
    (leader,) = net.leaders()
    assert net.nodes[leader].term >= 2


# ----------------------------------------------------------------------------- terms


def _leader_of(net: Net) -> tuple[str, Election]:
    net.advance(5.0)
    (name,) = net.leaders()
    events(net.nodes[name])
    return name, net.nodes[name]


def test_a_higher_term_makes_the_leader_step_down() -> None:
    net = Net("abc", seed=2)
    name, leader = _leader_of(net)
    other = next(n for n in "abc" if n != name)
    leader.receive(codec.encode(Heartbeat(leader.term + 1, other, 1)), net.now)
    assert not leader.is_leader and leader.role is Role.FOLLOWER
    assert leader.leader() == other and leader.term == 2
    assert events(leader) == [
        LeadershipLost(1, "higher_term"),
        TermChanged(2),
        LeaderElected(2, other),
    ]
    assert leader.state_to_persist() == (2, None)


def test_a_heartbeat_ack_with_a_higher_term_deposes_the_leader() -> None:
    net = Net("abc", seed=2)
    name, leader = _leader_of(net)
    other = next(n for n in "abc" if n != name)
    leader.receive(codec.encode(HeartbeatAck(7, other, 1, False)), net.now)
    assert not leader.is_leader and leader.term == 7 and leader.leader() is None


def test_a_deposed_leader_is_told_the_newer_term() -> None:
    follower = make("a", expect=2, persisted=(3, None))
    follower.server_joined("b", address_of("b"), 0.0)
    follower.receive(codec.encode(Heartbeat(2, "b", 9)), 0.1)
    ((address, data),) = follower.messages_to_send()
    assert address == address_of("b")
    assert codec.decode(data) == HeartbeatAck(3, "a", 9, False)
    assert follower.leader() is None


def test_a_follower_that_hears_a_live_leader_ignores_candidates() -> None:
    net = Net("abc", seed=2)
    name, leader = _leader_of(net)
    follower_name = next(n for n in "abc" if n != name)
    candidate = next(n for n in "abc" if n not in (name, follower_name))
    follower = net.nodes[follower_name]
    follower.receive(codec.encode(VoteRequest(9, candidate, 3)), net.now)
    ((_, data),) = follower.messages_to_send()
    assert codec.decode(data) == VoteResponse(1, follower_name, False)
    assert follower.term == 1 and follower.leader() == name  # not even the term moved
    # The leader itself does the same (it is the live leader).
    leader.receive(codec.encode(VoteRequest(9, candidate, 3)), net.now)
    assert leader.is_leader and leader.term == 1


def test_a_leader_without_acks_from_a_majority_steps_down() -> None:
    net = Net("abcde", seed=4)
    name, leader = _leader_of(net)
    lost_at = net.now
    # Acks from only one follower: 2 of 5 is no majority.
    keep = next(n for n in net.nodes if n != name)

    def only_one(source: str, target: str, message: codec.Message) -> bool:
        return target == name and source != keep

    net.advance(lost_at + T + 0.3, only_one)
    assert not leader.is_leader
    assert LeadershipLost(1, "lost_quorum") in events(leader)
    assert leader.leader() is None


def test_a_leader_with_acks_from_a_bare_majority_stays() -> None:
    net = Net("abcde", seed=4)
    name, leader = _leader_of(net)
    keep = set([n for n in net.nodes if n != name][:2])  # 3 of 5 with the leader

    def majority_only(source: str, target: str, message: codec.Message) -> bool:
        return target == name and source not in keep

    net.advance(net.now + 10 * T, majority_only)
    assert leader.is_leader and leader.term == 1


def test_a_leader_cut_off_steps_down_and_the_rest_elect_another() -> None:
    net = Net("abc", seed=6)
    name, old = _leader_of(net)
    net.isolate(name)
    net.advance(net.now + 5 * T)
    assert not old.is_leader and old.term == 1  # pre-vote: its term did not grow
    others = [e for n, e in net.nodes.items() if n != name]
    (new,) = [e.name for e in others if e.is_leader]
    assert all(e.leader() == new and e.term == 2 for e in others)
    net.cut.clear()
    net.advance(net.now + 2 * T)
    assert net.leaders() == [new]
    assert old.leader() == new and old.term == 2


def test_after_a_leader_crash_a_new_one_is_elected() -> None:
    for seed in range(10):
        net = Net("abcde", seed=seed)
        name, _ = _leader_of(net)
        net.down.add(name)
        crashed_at = net.now
        net.advance(crashed_at + 3 * T)
        leaders = net.leaders()
        assert len(leaders) == 1 and leaders[0] != name, seed
        live = [e for n, e in net.nodes.items() if n != name]
        assert all(e.leader() == leaders[0] for e in live)
        assert any(isinstance(ev, LeaderContactLost) for e in live for ev in events(e))


# ----------------------------------------------------------------------------- pre-vote


def test_pre_vote_keeps_an_isolated_server_from_inflating_its_term() -> None:
    net = Net("abc", seed=5)
    name, leader = _leader_of(net)
    loner = next(n for n in "abc" if n != name)
    net.isolate(loner)
    net.advance(net.now + 20 * T)
    isolated = net.nodes[loner]
    assert isolated.term == 1 and isolated.stats.pre_votes_started >= 5
    assert isolated.stats.elections_started == 0
    net.cut.clear()
    net.advance(net.now + 2 * T)
    assert leader.is_leader and leader.term == 1  # not deposed on its return
    assert isolated.leader() == name and isolated.role is Role.FOLLOWER


def test_without_pre_vote_an_isolated_server_inflates_its_term() -> None:
    # The behaviour pre-vote exists to prevent (dissertation §9.6).
    config = ElectionConfig(pre_vote=False)
    loner = make("a", expect=3, config=config)
    for name in "bc":
        loner.server_joined(name, address_of(name), 0.0)
    while (timer := loner.get_timer()) is not None and timer < 10 * T:
        loner.handle_timer(timer)
        loner.messages_to_send()
    assert loner.term >= 4  # one new term per timeout in [T, 2T]


def test_a_pre_vote_changes_nothing_on_the_voter() -> None:
    voter = make("a", expect=2, persisted=(4, "a"))
    voter.server_joined("b", address_of("b"), 0.0)
    timer = voter.get_timer()
    voter.receive(codec.encode(PreVoteRequest(5, "b", 2)), 0.1)
    ((_, data),) = voter.messages_to_send()
    assert codec.decode(data) == PreVoteResponse(5, "a", True, 4)
    assert voter.state_to_persist() == (4, "a") and voter.get_timer() == timer
    assert voter.stats.pre_votes_granted == 1
    assert events(voter) == []


def test_a_pre_vote_refusal_with_a_higher_term_brings_the_candidate_up_to_date() -> None:
    candidate = make("a", expect=2)
    candidate.server_joined("b", address_of("b"), 0.0)
    timer = candidate.get_timer()
    assert timer is not None
    candidate.handle_timer(timer)
    assert candidate.role is Role.PRE_CANDIDATE and candidate.term == 0
    ((_, data),) = candidate.messages_to_send()
    assert codec.decode(data) == PreVoteRequest(1, "a", 2)
    candidate.receive(codec.encode(PreVoteResponse(1, "b", False, 8)), timer + 0.01)
    assert (candidate.role, candidate.term) == (Role.FOLLOWER, 8)


def test_unanswered_requests_are_resent_every_heartbeat_interval() -> None:
    candidate = make("a", expect=3)
    for name in "bc":
        candidate.server_joined(name, address_of(name), 0.0)
    timer = candidate.get_timer()
    assert timer is not None
    candidate.handle_timer(timer)
    assert len(candidate.messages_to_send()) == 2
    candidate.receive(codec.encode(PreVoteResponse(1, "b", False, 0)), timer)
    assert candidate.get_timer() == pytest.approx(timer + 0.25)
    candidate.handle_timer(timer + 0.25)
    ((address, _),) = candidate.messages_to_send()  # only c, which has not answered
    assert address == address_of("c")


# ----------------------------------------------------------------------------- server set


def test_failed_servers_still_count_and_left_servers_do_not() -> None:
    election = make("a", expect=1)
    for name in "bcde":
        election.server_joined(name, address_of(name), 0.0)
    assert election.quorum() == 3
    election.server_failed("b", 1.0)
    election.server_failed("c", 1.0)
    assert election.quorum() == 3  # a partition cannot shrink the majority
    assert [s.failed for s in election.servers()] == [False, True, True, False, False]
    election.server_left("d", 2.0)
    assert election.quorum() == 3  # 4 servers: majority is still 3
    election.server_left("e", 2.0)
    assert election.quorum() == 2
    election.server_joined("b", ("10.9.9.9", 1), 3.0)  # back, at a new address
    assert election.servers()[1].address == ("10.9.9.9", 1)
    assert not election.servers()[1].failed


def test_a_minority_with_the_rest_failed_cannot_elect() -> None:
    net = Net("abcde", seed=8)
    name, _ = _leader_of(net)
    minority = [n for n in net.nodes if n != name][:2]
    for n in net.nodes:
        if n not in minority:
            net.down.add(n)
    for n in minority:
        for gone in net.down:
            net.nodes[n].server_failed(gone, net.now)
    net.advance(net.now + 30 * T)
    assert net.leaders() == []
    assert all(net.nodes[n].term == 1 for n in minority)  # pre-vote fails: no inflation


def test_a_restart_with_the_saved_server_set_needs_the_old_majority() -> None:
    saved = [(n, address_of(n)) for n in "bcde"]
    restarted = Election(
        "a",
        address_of("a"),
        bootstrap_expect=3,
        rng=random.Random(1),
        now=0.0,
        servers=saved,
    )
    assert restarted.bootstrapped and restarted.quorum() == 3


def test_a_server_removed_from_the_set_stops_leading() -> None:
    election = make("a", expect=1)
    timer = election.get_timer()
    assert timer is not None
    election.handle_timer(timer)
    events(election)
    election.server_left("a", timer + 1)
    assert not election.is_leader and election.get_timer() is None
    assert events(election) == [LeadershipLost(1, "removed")]


# ----------------------------------------------------------------------------- misuse


@pytest.mark.parametrize(
    "kwargs",
    [
        {"election_timeout": 0.0},
        {"election_timeout": float("inf")},
        {"heartbeat_interval": 0.0},
        {"heartbeat_interval": 0.6},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(LocalProtocolError):
        ElectionConfig(**kwargs)  # type: ignore[arg-type]


def test_bad_constructor_arguments_are_refused() -> None:
    with pytest.raises(LocalProtocolError):
        make("a", expect=0)
    with pytest.raises(LocalProtocolError):
        make("a", persisted=(-1, None))
    with pytest.raises(LocalProtocolError):
        Election("", ("h", 1), bootstrap_expect=1, rng=random.Random(), now=0.0)
    assert issubclass(LocalProtocolError, CAError) and issubclass(RemoteProtocolError, CAError)


# ----------------------------------------------------------------------------- codec

names = st.text(min_size=1, max_size=codec.NAME_MAX_LENGTH)
counters = st.integers(min_value=0, max_value=codec.COUNTER_MAX)
messages = st.one_of(
    st.builds(PreVoteRequest, counters, names, counters),
    st.builds(PreVoteResponse, counters, names, st.booleans(), counters),
    st.builds(VoteRequest, counters, names, counters),
    st.builds(VoteResponse, counters, names, st.booleans()),
    st.builds(Heartbeat, counters, names, counters),
    st.builds(HeartbeatAck, counters, names, counters, st.booleans()),
)


@given(messages)
def test_codec_round_trips(message: codec.Message) -> None:
    data = codec.encode(message)
    assert data[:1] == b"L" and len(data) <= codec.MAX_MESSAGE_SIZE
    assert codec.decode(data) == message


@given(st.binary(max_size=600))
def test_arbitrary_bytes_only_raise_remote_protocol_error(data: bytes) -> None:
    try:
        codec.decode(data)
    except RemoteProtocolError as exc:
        assert exc.reason in {
            "malformed",
            "oversize",
            "too_short",
            "not_election",
            "unknown_type",
        }


@given(st.integers(min_value=1, max_value=6), st.binary(max_size=80))
def test_garbage_after_a_valid_header_only_raises_remote_protocol_error(
    kind: int, body: bytes
) -> None:
    with contextlib.suppress(RemoteProtocolError):
        codec.decode(b"L" + bytes((kind,)) + body)


@given(st.binary(max_size=600))
def test_the_core_counts_garbage_and_carries_on(data: bytes) -> None:
    election = make("a", expect=2)
    election.server_joined("b", address_of("b"), 0.0)
    election.receive(data, 0.1)  # never raises
    assert election.stats.messages_received == 1


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "too_short"),
        (b"L", "too_short"),
        (b"X\x01\x90", "not_election"),
        (b"L\x63\x90", "unknown_type"),
        (b"L\x01\x91\x01", "malformed"),  # too few fields
        (b"L\x01\x92\xff\xa1b", "malformed"),  # negative term
        (b"L\x05\x93\x01\xa0\x01", "malformed"),  # empty name
        (b"L\x01\x80", "malformed"),  # a map, not an array
        (b"L\x01" + b"\x92\x01\xda\x02\x00" + b"x" * 512, "oversize"),
    ],
)
def test_decode_errors_name_their_reason(data: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        codec.decode(data)
    assert info.value.reason == reason


def test_encode_refuses_out_of_range_fields() -> None:
    with pytest.raises(LocalProtocolError):
        codec.encode(VoteRequest(-1, "a", 1))
    with pytest.raises(LocalProtocolError):
        codec.encode(Heartbeat(1, "x" * 129, 1))
    with pytest.raises(LocalProtocolError):
        codec.encode(VoteResponse(2**63, "a", True))


def test_a_server_that_never_bootstraps_joins_through_the_leader_and_can_lead_later() -> None:
    """``bootstrap_expect = 0`` (the agent passes a number no cluster reaches): the server
    never starts the first election, but once it has heard a leader it is part of a
    bootstrapped cluster and stands when that leader dies."""
    net = Net("abc", expect=3)
    leader, _ = _leader_of(net)
    late = make("d", expect=99, seed=3, now=net.now)
    net.nodes["d"] = late
    net.by_address[address_of("d")] = "d"
    for name, election in net.nodes.items():
        for other in "abcd":
            if other != name:
                election.server_joined(other, address_of(other), net.now)
    assert not late.bootstrapped
    net.advance(net.now + 2 * T)
    assert late.bootstrapped and late.leader() == leader
    # Depose whoever leads (it comes back as a follower) until d has won an election:
    # with three of four live, a majority exists, and d is a candidate like the rest.
    for _ in range(20):
        if net.leaders() == ["d"]:
            break
        deposed = net.leaders()
        net.down.update(deposed)
        net.advance(net.now + 3 * T)
        net.down.difference_update(deposed)
        net.advance(net.now + 3 * T)
    assert net.leaders() == ["d"]


def test_a_server_that_left_does_not_bootstrap_again_on_a_stale_heartbeat() -> None:
    net = Net("abc", expect=3)
    leader, _ = _leader_of(net)
    follower = next(n for n in "abc" if n != leader)
    net.nodes[follower].server_left(follower, net.now)
    net.advance(net.now + 2 * T)
    assert not net.nodes[follower].bootstrapped
