"""Leader election among the CA-eligible agents ("servers"), as a sans-IO state machine.

Theory of operation
-------------------
``Election`` is Raft's leader election (Ongaro & Ousterhout, "In Search of an
Understandable Consensus Algorithm", 2014, §5.2) without the replicated log: the
leader runs the CA and signs policy, and it needs no log because CA state is
replicated separately. It never touches a socket or a clock. The layer above feeds it

* ``server_joined`` / ``server_failed`` / ``server_left`` from gossip member events of
  members whose metadata carries the server tag,
* ``receive(data, now)`` for every user message that starts with ``b"L"``,
* ``handle_timer(now)`` when ``get_timer()`` comes due,

and after each call persists ``state_to_persist()`` if it changed, then sends
``messages_to_send()`` and drains ``next_event()`` (the aioquic shape; STYLE.md 1–3).

Terms and votes (§5.2). Time is divided into terms numbered upward; each term has at
most one leader because a leader needs the votes of a majority and each server votes
at most once per term. The (term, vote) pair is what must survive a restart, or a
restarted server could vote twice in one term: the agent persists it before sending
anything we produced. Any message carrying a higher term makes us adopt it and become
a follower (a leader steps down).

Timers. A follower that hears no heartbeat for a randomized election timeout in
``[T, 2T]`` starts an election; randomization makes split votes rare (§5.2, §9.3 of
the paper). The leader sends heartbeats (Raft's empty AppendEntries) every
``heartbeat_interval`` (about T/4, so a lost heartbeat or two does not start an
election). Failover is driven by missed heartbeats alone, never by gossip's failure
detector, so it takes about T–2T plus one round trip whatever gossip's timing is.

Refinements from Ongaro's dissertation ("Consensus: Bridging Theory and Practice",
2014):

* Pre-vote (§9.6). Before raising its term a would-be candidate asks "would you vote
  for me in term t+1?"; only with a majority of yeses does it start a real election.
  A server cut off by a partition therefore does not inflate its term, and when it
  rejoins it does not depose a healthy leader.
* Leader stickiness (§4.2.3). A server that heard from a live leader within the
  minimum election timeout T refuses votes and pre-votes and does not adopt the
  candidate's term.
* Check-quorum (§6.2). A leader that has not had heartbeat acks from a majority
  (itself included) for an election timeout steps down: "a server that loses contact
  with the majority stops acting as leader". Acks echo the heartbeat *round*, and the
  leader remembers when it sent each round, so this uses only the leader's clock.
  With stickiness it works as a lease (§6.4.1): a majority acked a round sent at s,
  each of them refuses votes until T after receiving it, so no new leader can exist
  before s + T, when this one steps down (assuming clocks run at about the same rate).

Who is a server, and what is a majority. Raft counts the majority over a configured
membership committed in its log. We have no log; the server set is learned from
gossip, so views can differ for a moment. The rules, chosen so that a shrinking view
cannot let a minority elect itself:

1. The set grows with ``server_joined`` (gossip join, or a member seen again).
2. A server that *failed* (gossip declared it dead: crash or partition) stays in the
   set and keeps counting toward the majority. Otherwise both sides of a partition
   would shrink their sets and each elect a leader. Two dead servers out of five leave
   three, which is still a majority of five; three dead stop elections — correct,
   since the survivors cannot tell a crash from a partition.
3. A server that *left* gracefully (``server_left``) is removed: it announced it will
   not vote again. The agent also calls ``server_left`` when an operator removes a
   dead server by hand (like ``consul operator raft remove-peer``).
4. No election starts before ``bootstrap_expect`` servers (ourselves included) are
   known, so a new cluster does not elect a leader among the first two of five. A
   server that hears a leader's heartbeat is bootstrapped too: the cluster it joined
   already is (Consul's servers with ``bootstrap_expect = 0`` join this way).
5. Requests carry the number of servers the candidate counts; a voter that knows more
   servers refuses, since the candidate's majority may be too small. A mitigation for
   views that are still converging, not a proof.

Trade-off against Consul: Consul's autopilot removes dead servers automatically
(``cleanup_dead_servers``) once enough healthy servers remain, so a cluster that
permanently lost servers regains a smaller quorum without an operator. We keep dead
servers counted until they leave or an operator removes them: a cluster that loses a
majority of its servers for good needs a human, but a partition can never produce two
leaders in one term from the shrinking of a view. Joins and leaves arrive by gossip,
not through a committed configuration, so the set can still differ between servers
while news spreads; the agent should persist ``servers()`` and pass it back on
restart (``servers=``) so a restarted server does not count a majority of one.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from ca import codec
from ca.codec import (
    Heartbeat,
    HeartbeatAck,
    Message,
    PreVoteRequest,
    PreVoteResponse,
    VoteRequest,
    VoteResponse,
)
from ca.errors import LocalProtocolError, RemoteProtocolError

if TYPE_CHECKING:  # the core takes a Random; it never makes one (sans-IO rule)
    import random

Address = tuple[str, int]
"""(host, port) of a server's gossip endpoint, where its user messages arrive."""

#: Most servers we track. Raft clusters have 3–7 voters; this bounds memory if a
#: misconfigured agent tags every member as a server.
MAX_SERVERS: Final = 64


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    """Asking for pre-votes; our term is unchanged."""
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class ElectionConfig:
    """Election timing. The defaults give a failover p99 under 3 s with 5 servers."""

    election_timeout: float = 1.0
    """T: a follower waits a random time in [T, 2T] without heartbeats before it
    stands; also the leader's check-quorum window and the stickiness window."""
    heartbeat_interval: float = 0.25
    """How often the leader sends heartbeats, and candidates resend unanswered
    requests. About T/4: three heartbeats in a row may be lost before anyone stands."""
    pre_vote: bool = True
    """Ask for pre-votes before raising the term (dissertation §9.6)."""
    check_quorum: bool = True
    """A leader without acks from a majority for T steps down (dissertation §6.2)."""
    leader_stickiness: bool = True
    """Refuse votes within T of hearing from a live leader (dissertation §4.2.3)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.election_timeout) and self.election_timeout > 0):
            raise LocalProtocolError("election_timeout must be a positive number of seconds")
        if not 0 < self.heartbeat_interval <= self.election_timeout / 2:
            raise LocalProtocolError("heartbeat_interval must be in (0, election_timeout / 2]")


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """A server in our view, for ``/v1/status/peers`` and persistence."""

    name: str
    address: Address
    failed: bool
    """Gossip declared it dead. It still counts toward the majority."""


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class TermChanged:
    """Our current term changed (we stood, or saw a higher term)."""

    term: int


@dataclass(frozen=True, slots=True)
class ElectionStarted:
    """We became a candidate in ``term`` (after a successful pre-vote)."""

    term: int


@dataclass(frozen=True, slots=True)
class LeaderElected:
    """We learned who leads ``term``: ourselves, or a server whose heartbeat arrived."""

    term: int
    leader: str


@dataclass(frozen=True, slots=True)
class LeadershipLost:
    """We were the leader of ``term`` and stopped. ``reason``: ``higher_term`` (someone
    has a newer term), ``lost_quorum`` (no acks from a majority for an election
    timeout), ``removed`` (we left the server set)."""

    term: int
    reason: str


@dataclass(frozen=True, slots=True)
class LeaderContactLost:
    """No heartbeat from ``leader`` for an election timeout: we no longer name it."""

    term: int
    leader: str


ElectionEvent = TermChanged | ElectionStarted | LeaderElected | LeadershipLost | LeaderContactLost


@dataclass(slots=True)
class Statistics:
    """Counters for metrics. Read them; do not change them."""

    leader_changes: int = 0
    """Times we learned a new (term, leader): the ``meshnode_ca_leader_changes`` metric."""
    pre_votes_started: int = 0
    elections_started: int = 0
    """Real elections: our term went up because a pre-vote succeeded."""
    leadership_acquired: int = 0
    leadership_lost: int = 0
    votes_granted: int = 0
    votes_denied: int = 0
    pre_votes_granted: int = 0
    pre_votes_denied: int = 0
    heartbeats_sent: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Messages received and dropped, by reason."""

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class _Server:
    __slots__ = ("address", "failed")

    def __init__(self, address: Address) -> None:
        self.address = address
        self.failed = False


class Election:
    """One server's view of the election. See the module docstring."""

    def __init__(
        self,
        name: str,
        address: Address,
        *,
        bootstrap_expect: int,
        rng: random.Random,
        now: float,
        config: ElectionConfig | None = None,
        persisted: tuple[int, str | None] | None = None,
        servers: Iterable[tuple[str, Address]] = (),
    ) -> None:
        """``persisted`` is a saved ``state_to_persist()``; ``servers`` a saved
        ``servers()`` (name, address) list: both from before a restart."""
        if not 0 < len(name) <= codec.NAME_MAX_LENGTH:
            raise LocalProtocolError("server name must be 1..128 characters")
        if bootstrap_expect < 1:
            raise LocalProtocolError("bootstrap_expect must be at least 1")
        self.name = name
        self.address = address
        self.config = config or ElectionConfig()
        self.bootstrap_expect = bootstrap_expect
        self.rng = rng
        self.stats = Statistics()
        self._now = now

        term, voted_for = persisted if persisted is not None else (0, None)
        if term < 0 or (voted_for is not None and not voted_for):
            raise LocalProtocolError(f"bad persisted election state {persisted!r}")
        self._term = term
        self._voted_for = voted_for

        self._servers: dict[str, _Server] = {}  # every server but us
        self._bootstrapped = False
        self._removed = False
        self._role = Role.FOLLOWER
        self._leader: str | None = None
        self._leader_heard_at: float | None = None  # last valid heartbeat (followers)

        self._election_deadline: float | None = None
        self._retransmit_at: float | None = None
        self._grants: set[str] = set()
        self._responded: set[str] = set()

        self._heartbeat_at: float | None = None
        self._round = 0
        self._round_sent_at: dict[int, float] = {}
        self._acked_at: dict[str, float] = {}  # follower -> send time of its newest acked round
        self._leader_since = 0.0
        self._quorum_deadline: float | None = None

        self._outbox: list[tuple[Address, bytes]] = []
        self._events: deque[ElectionEvent] = deque()

        for server_name, server_address in servers:
            if server_name != name and len(self._servers) < MAX_SERVERS:
                self._servers[server_name] = _Server(server_address)
        self._check_bootstrap(now)

    # ------------------------------------------------------------------ queries

    @property
    def term(self) -> int:
        return self._term

    @property
    def role(self) -> Role:
        return self._role

    @property
    def is_leader(self) -> bool:
        return self._role is Role.LEADER

    @property
    def voted_for(self) -> str | None:
        return self._voted_for

    @property
    def bootstrapped(self) -> bool:
        """``bootstrap_expect`` servers have been seen; elections may start."""
        return self._bootstrapped

    def leader(self) -> str | None:
        """The leader of our current term as far as we know (``/v1/status/leader``)."""
        return self._leader

    def leader_address(self) -> Address | None:
        if self._leader is None:
            return None
        if self._leader == self.name:
            return self.address
        server = self._servers.get(self._leader)
        return server.address if server else None

    def servers(self) -> list[ServerInfo]:
        """Every server in our view, ourselves first (``/v1/status/peers``)."""
        info = [ServerInfo(self.name, self.address, False)]
        info.extend(
            ServerInfo(name, server.address, server.failed)
            for name, server in sorted(self._servers.items())
        )
        return info

    def quorum(self) -> int:
        """Votes (or acks) needed: a majority of the known server set, ourselves included."""
        return (len(self._servers) + 1) // 2 + 1

    def state_to_persist(self) -> tuple[int, str | None]:
        """(current term, vote in that term). Save it whenever it changes, *before*
        sending ``messages_to_send()``: a vote must not be forgotten once announced."""
        return self._term, self._voted_for

    def statistics(self) -> Statistics:
        return self.stats

    # ------------------------------------------------------------------ outputs

    def messages_to_send(self) -> list[tuple[Address, bytes]]:
        messages, self._outbox = self._outbox, []
        return messages

    def next_event(self) -> ElectionEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        deadlines = [
            t
            for t in (
                self._election_deadline,
                self._retransmit_at,
                self._heartbeat_at,
                self._quorum_deadline,
            )
            if t is not None
        ]
        return min(deadlines) if deadlines else None

    # ------------------------------------------------------------------ inputs: servers

    def server_joined(self, name: str, address: Address, now: float) -> None:
        """A server joined, came back or changed address (a gossip member event)."""
        self._now = now
        if name == self.name:
            return
        server = self._servers.get(name)
        if server is None:
            if len(self._servers) >= MAX_SERVERS:
                self.stats.drop("too_many_servers")
                return
            self._servers[name] = _Server(address)
        else:
            server.address = address
            server.failed = False
        self._check_bootstrap(now)
        if self._role is Role.LEADER:
            self._update_quorum_deadline()

    def server_failed(self, name: str, now: float) -> None:
        """Gossip declared the server dead. It keeps counting toward the majority."""
        self._now = now
        server = self._servers.get(name)
        if server is not None:
            server.failed = True

    def server_left(self, name: str, now: float) -> None:
        """The server left gracefully (or an operator removed it): it no longer votes."""
        self._now = now
        if name == self.name:
            # We left the server set: never lead or stand again in this process.
            if self._role is Role.LEADER:
                self._lose_leadership("removed", now)
            self._role = Role.FOLLOWER
            self._bootstrapped = False
            self._removed = True
            self._election_deadline = self._retransmit_at = None
            return
        if self._servers.pop(name, None) is None:
            return
        self._grants.discard(name)
        self._responded.discard(name)
        self._acked_at.pop(name, None)
        if self._leader == name and self._role is Role.FOLLOWER:
            self._forget_leader(now)
        if self._role is Role.LEADER:
            self._update_quorum_deadline()
        elif self._role is Role.PRE_CANDIDATE and self._has_quorum(self._grants):
            self._start_election(now)
        elif self._role is Role.CANDIDATE and self._has_quorum(self._grants):
            self._become_leader(now)

    # ------------------------------------------------------------------ inputs: network

    def receive(self, data: bytes, now: float) -> None:
        """An election message arrived (a user message starting with ``b"L"``).
        Bad or unexpected input is dropped and counted, never raised."""
        self._now = now
        self.stats.messages_received += 1
        try:
            message = codec.decode(data)
        except RemoteProtocolError as exc:
            self.stats.drop(exc.reason)
            return
        sender = _sender(message)
        if sender == self.name:
            self.stats.drop("from_self")
            return
        server = self._servers.get(sender)
        if server is None:
            # Not a server we know: we could not answer it, and its vote must not count.
            self.stats.drop("unknown_server")
            return
        match message:
            case PreVoteRequest():
                self._on_pre_vote_request(message, server, now)
            case PreVoteResponse():
                self._on_pre_vote_response(message, now)
            case VoteRequest():
                self._on_vote_request(message, server, now)
            case VoteResponse():
                self._on_vote_response(message, now)
            case Heartbeat():
                self._on_heartbeat(message, server, now)
            case HeartbeatAck():
                self._on_heartbeat_ack(message, now)

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now``."""
        self._now = now
        if self._role is Role.LEADER:
            if self._quorum_deadline is not None and now >= self._quorum_deadline:
                self._lose_leadership("lost_quorum", now)
                return
            if self._heartbeat_at is not None and now >= self._heartbeat_at:
                self._send_heartbeats(now)
            return
        if self._election_deadline is not None and now >= self._election_deadline:
            self._election_timeout(now)
        elif self._retransmit_at is not None and now >= self._retransmit_at:
            self._resend_requests(now)

    # ------------------------------------------------------------------ handlers

    def _on_pre_vote_request(self, message: PreVoteRequest, server: _Server, now: float) -> None:
        # A pre-vote changes nothing here: no term, no vote, no timer (§9.6).
        granted = (
            message.term > self._term
            and not self._leader_is_fresh(now)
            and message.known_servers >= len(self._servers) + 1
        )
        if granted:
            self.stats.pre_votes_granted += 1
        else:
            self.stats.pre_votes_denied += 1
        reply = PreVoteResponse(message.term, self.name, granted, self._term)
        self._send(server.address, reply)

    def _on_pre_vote_response(self, message: PreVoteResponse, now: float) -> None:
        if message.voter_term > self._term:
            self._adopt_term(message.voter_term, now)
            return
        if self._role is not Role.PRE_CANDIDATE or message.term != self._term + 1:
            self.stats.drop("stale")
            return
        self._responded.add(message.voter)
        if message.granted:
            self._grants.add(message.voter)
            if self._has_quorum(self._grants):
                self._start_election(now)

    def _on_vote_request(self, message: VoteRequest, server: _Server, now: float) -> None:
        if self._leader_is_fresh(now):
            # Stickiness (§4.2.3): a live leader exists; do not even adopt the term.
            granted = False
        else:
            if message.term > self._term:
                self._adopt_term(message.term, now)
            granted = (
                message.term == self._term
                and self._voted_for in (None, message.candidate)
                and self._role is not Role.LEADER
                and message.known_servers >= len(self._servers) + 1
            )
        if granted:
            self._voted_for = message.candidate
            self.stats.votes_granted += 1
            # Granting a vote resets the election timer (§5.2): give the candidate time.
            self._election_deadline = now + self._random_timeout()
        else:
            self.stats.votes_denied += 1
        self._send(server.address, VoteResponse(self._term, self.name, granted))

    def _on_vote_response(self, message: VoteResponse, now: float) -> None:
        if message.term > self._term:
            self._adopt_term(message.term, now)
            return
        if self._role is not Role.CANDIDATE or message.term != self._term:
            self.stats.drop("stale")
            return
        self._responded.add(message.voter)
        if message.granted:
            self._grants.add(message.voter)
            if self._has_quorum(self._grants):
                self._become_leader(now)

    def _on_heartbeat(self, message: Heartbeat, server: _Server, now: float) -> None:
        if message.term < self._term:
            # A deposed leader: tell it our term so it steps down.
            self.stats.drop("stale")
            self._send(server.address, HeartbeatAck(self._term, self.name, message.round, False))
            return
        if message.term > self._term:
            self._adopt_term(message.term, now)
        if self._role is Role.LEADER or (
            self._leader is not None and self._leader != message.leader
        ):
            # Two leaders in one term: impossible unless server views diverged badly.
            self.stats.drop("conflicting_leader")
            return
        if self._role is not Role.FOLLOWER:
            self._become_follower(now)
        self._leader_heard_at = now
        if not self._bootstrapped and not self._removed:
            self._bootstrapped = True  # the cluster we joined has a leader: it is
        self._election_deadline = now + self._random_timeout()
        if self._leader != message.leader:
            self._leader = message.leader
            self.stats.leader_changes += 1
            self._events.append(LeaderElected(self._term, message.leader))
        self._send(server.address, HeartbeatAck(self._term, self.name, message.round, True))

    def _on_heartbeat_ack(self, message: HeartbeatAck, now: float) -> None:
        if message.term > self._term:
            self._adopt_term(message.term, now)
            return
        if self._role is not Role.LEADER or message.term != self._term or not message.success:
            self.stats.drop("stale")
            return
        sent_at = self._round_sent_at.get(message.round)
        if sent_at is None:
            self.stats.drop("stale")  # too old to matter, or a round we never sent
            return
        if sent_at > self._acked_at.get(message.follower, -math.inf):
            self._acked_at[message.follower] = sent_at
            self._update_quorum_deadline()

    # ------------------------------------------------------------------ transitions

    def _election_timeout(self, now: float) -> None:
        if not self._bootstrapped:
            self._election_deadline = None
            return
        if self._leader is not None:
            self._forget_leader(now)
        if self.config.pre_vote:
            self._start_pre_vote(now)
        else:
            self._start_election(now)

    def _start_pre_vote(self, now: float) -> None:
        self._role = Role.PRE_CANDIDATE
        self.stats.pre_votes_started += 1
        self._grants = {self.name}
        self._responded = {self.name}
        self._election_deadline = now + self._random_timeout()
        if self._has_quorum(self._grants):
            self._start_election(now)
            return
        self._resend_requests(now)

    def _start_election(self, now: float) -> None:
        self._role = Role.CANDIDATE
        self._set_term(self._term + 1)
        self._voted_for = self.name
        self._leader = None
        self._leader_heard_at = None
        self.stats.elections_started += 1
        self._events.append(ElectionStarted(self._term))
        self._grants = {self.name}
        self._responded = {self.name}
        self._election_deadline = now + self._random_timeout()
        if self._has_quorum(self._grants):
            self._become_leader(now)
            return
        self._resend_requests(now)

    def _resend_requests(self, now: float) -> None:
        """Ask every server that has not answered yet (requests are datagrams)."""
        known = len(self._servers) + 1
        request: Message
        if self._role is Role.PRE_CANDIDATE:
            request = PreVoteRequest(self._term + 1, self.name, known)
        elif self._role is Role.CANDIDATE:
            request = VoteRequest(self._term, self.name, known)
        else:
            self._retransmit_at = None
            return
        encoded = codec.encode(request)
        for name, server in self._servers.items():
            if name not in self._responded:
                self._send_encoded(server.address, encoded)
        self._retransmit_at = now + self.config.heartbeat_interval

    def _become_leader(self, now: float) -> None:
        self._role = Role.LEADER
        self._leader = self.name
        self._leader_heard_at = None
        self._election_deadline = None
        self._retransmit_at = None
        self._leader_since = now
        self._acked_at = {}
        self._round_sent_at = {}
        self.stats.leadership_acquired += 1
        self.stats.leader_changes += 1
        self._events.append(LeaderElected(self._term, self.name))
        self._send_heartbeats(now)
        self._update_quorum_deadline()

    def _send_heartbeats(self, now: float) -> None:
        self._round += 1
        self._round_sent_at[self._round] = now
        # Rounds older than one election timeout cannot extend the lease any more.
        horizon = now - self.config.election_timeout
        for old in [r for r, t in self._round_sent_at.items() if t < horizon]:
            del self._round_sent_at[old]
        encoded = codec.encode(Heartbeat(self._term, self.name, self._round))
        for server in self._servers.values():
            self._send_encoded(server.address, encoded)
        self.stats.heartbeats_sent += 1
        self._heartbeat_at = now + self.config.heartbeat_interval

    def _update_quorum_deadline(self) -> None:
        """Check-quorum (§6.2): step down one election timeout after the newest round a
        majority (ourselves included) has acked; right after winning, one timeout
        after the win."""
        if not self.config.check_quorum:
            self._quorum_deadline = None
            return
        needed = self.quorum() - 1  # acks from others besides ourselves
        start = self._leader_since
        if needed > 0:
            acks = sorted(
                (t for name, t in self._acked_at.items() if name in self._servers), reverse=True
            )
            if len(acks) >= needed:
                start = max(start, acks[needed - 1])
        else:
            self._quorum_deadline = None  # alone: we are our own majority
            return
        self._quorum_deadline = start + self.config.election_timeout

    def _lose_leadership(self, reason: str, now: float) -> None:
        term = self._term
        self._become_follower(now)
        self._leader = None
        self.stats.leadership_lost += 1
        self._events.append(LeadershipLost(term, reason))

    def _become_follower(self, now: float) -> None:
        self._role = Role.FOLLOWER
        self._heartbeat_at = None
        self._quorum_deadline = None
        self._retransmit_at = None
        self._grants = set()
        self._responded = set()
        self._acked_at = {}
        self._round_sent_at = {}
        self._election_deadline = now + self._random_timeout() if self._bootstrapped else None

    def _adopt_term(self, term: int, now: float) -> None:
        """Someone has a higher term: adopt it and follow (§5.1)."""
        if self._role is Role.LEADER:
            self._lose_leadership("higher_term", now)
        elif self._role is not Role.FOLLOWER:
            self._become_follower(now)
        self._set_term(term)
        self._voted_for = None
        if self._leader is not None:
            self._leader = None
        self._leader_heard_at = None

    def _forget_leader(self, now: float) -> None:
        leader = self._leader
        self._leader = None
        self._leader_heard_at = None
        if leader is not None and leader != self.name:
            self._events.append(LeaderContactLost(self._term, leader))

    def _set_term(self, term: int) -> None:
        if term != self._term:
            self._term = term
            self._events.append(TermChanged(term))

    def _check_bootstrap(self, now: float) -> None:
        if self._bootstrapped or len(self._servers) + 1 < self.bootstrap_expect:
            return
        self._bootstrapped = True
        if self._role is Role.FOLLOWER and self._election_deadline is None:
            self._election_deadline = now + self._random_timeout()

    # ------------------------------------------------------------------ helpers

    def _leader_is_fresh(self, now: float) -> bool:
        """We lead, or heard from a live leader within the minimum election timeout."""
        if not self.config.leader_stickiness:
            return False
        if self._role is Role.LEADER:
            return True
        heard = self._leader_heard_at
        return (
            self._leader is not None
            and heard is not None
            and now - heard < self.config.election_timeout
        )

    def _has_quorum(self, voters: set[str]) -> bool:
        counted = sum(1 for name in voters if name == self.name or name in self._servers)
        return counted >= self.quorum()

    def _random_timeout(self) -> float:
        timeout = self.config.election_timeout
        return timeout + self.rng.random() * timeout

    def _send(self, address: Address, message: Message) -> None:
        self._send_encoded(address, codec.encode(message))

    def _send_encoded(self, address: Address, data: bytes) -> None:
        self.stats.messages_sent += 1
        self._outbox.append((address, data))


def _sender(message: Message) -> str:
    match message:
        case PreVoteRequest(candidate=name) | VoteRequest(candidate=name):
            return name
        case PreVoteResponse(voter=name) | VoteResponse(voter=name):
            return name
        case Heartbeat(leader=name):
            return name
        case HeartbeatAck(follower=name):
            return name
