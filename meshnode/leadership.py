"""The asyncio adapter that runs the ``ca.election`` core inside the agent, and the
node metadata through which every member learns who the servers and the leader are.

Theory of operation
-------------------
``ElectionDriver`` decides nothing (STYLE.md rules 1–3; ``gossip/transport.py`` is the
model). It feeds the ``Election`` core

* gossip member events of members whose metadata carries the server tag
  (``on_member_event``: joined / updated / recovered → ``server_joined``, failed →
  ``server_failed``, left → ``server_left``),
* election messages, the user messages that start with ``b"L"`` (``receive``),
* its one timer (a single ``loop.call_at`` handle),

and after every input it *flushes*, in this order:

1. persists ``(term, voted_for)`` and the server list to ``election.json`` when they
   changed. The write (temp file, fsync, rename, directory fsync) finishes *before*
   anything is sent: a vote must not leave the process unless it survives a crash, or
   a restarted server could vote twice in one term (Raft §5.2, "persistent state ...
   updated on stable storage before responding to RPCs"). It blocks the loop for the
   fsync, which is acceptable because the term moves only on elections (rare) and the
   file is a few hundred bytes. If the write fails, the batch of messages is dropped
   (to the peers, a lost datagram: the core resends on its own);
2. sends ``messages_to_send()`` as plain gossip user datagrams (the core resends
   requests and heartbeats itself, so a stream per message would only add latency);
3. re-arms the timer for ``get_timer()``;
4. logs every ``next_event()`` and tells the agent when the leader claim it publishes
   changed.

Inputs that arrive *inside* a gossip core call (a user message is delivered from
``Swim.receive_packet`` through the delegate) must not call back into the gossip
transport while the core is mid-packet, so a flush is scheduled with ``call_soon``
(coalescing bursts) rather than run in place. Timer flushes run at once.

Node metadata
-------------
Every member gossips a small msgpack map (``Swim.set_meta``; at most 512 bytes):

* ``"k"``: 4-byte fingerprints of its gossip keys, primary first (``keyring list``);
* ``"s"``: ``True`` on servers (CA-eligible, run an election);
* ``"l"``: ``[term, leader name]`` on a server that currently knows a leader;
* ``"b"``: the first 8 bytes of the fingerprint of the trust bundle it serves, and
  ``"x"``: the Unix time its soonest leaf certificate expires (``meshnode ca status``).

Clients run no election, yet ``/v1/status/leader`` must answer on them too. Options
were (a) clients ask a server, a request/response protocol with its own timeouts and
retries, or (b) servers publish the leader they follow in their metadata. We chose
(b): it reuses gossip's dissemination and needs no new protocol, at the cost of one
alive broadcast per server per leader change (new incarnation, piggybacked like any
other gossip), and leader changes are rare. A client takes the claim with the highest
term among live servers (terms only grow, so the newest claim wins while news
spreads) and answers ``""`` when no live server names a live leader.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import msgpack
import structlog

from ca.election import (
    MAX_SERVERS,
    Address,
    Election,
    ElectionStarted,
    LeaderContactLost,
    LeaderElected,
    LeadershipLost,
    TermChanged,
)
from gossip.events import (
    Member,
    MemberEvent,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    MemberRecovered,
    MemberState,
    MemberUpdated,
)
from meshnode.persistence import DataDir, DataDirError

log = structlog.get_logger()

#: First byte of an election message among gossip user messages (catalog messages
#: start with ``C``, keyring changes with ``K``).
ELECTION_TAG: Final = b"L"
ELECTION_FILE: Final = "election.json"
#: ``bootstrap_expect`` for a server configured with 0 ("join a cluster that already
#: has a leader"). The core has no "bootstrapped by hearing a leader" input, so such a
#: server must never count enough servers to stand on its own: it votes and follows,
#: but never starts an election. More than the core can ever count (itself + 64).
NEVER_BOOTSTRAP: Final = MAX_SERVERS + 2

LeaderClaim = tuple[int, str]
"""(term, leader name) that a server publishes in its metadata."""
SendFunction = Callable[[Address, bytes], None]
"""Sends one election datagram to a server's gossip address."""


# --------------------------------------------------------------------------- node metadata


def encode_node_meta(
    fingerprints: Sequence[bytes],
    *,
    server: bool,
    leader: LeaderClaim | None,
    bundle: bytes = b"",
    soonest_expiry: int | None = None,
) -> bytes:
    """Our gossip metadata (see the module docstring); ``b""`` when there is nothing
    to say, which is what a plain client without encryption has always sent.
    ``bundle`` is the first bytes of the fingerprint of the trust bundle we serve and
    ``soonest_expiry`` the Unix time our first leaf expires (``meshnode ca status``)."""
    value: dict[str, Any] = {}
    if fingerprints:
        value["k"] = list(fingerprints)
    if bundle:
        value["b"] = bundle
    if soonest_expiry is not None:
        value["x"] = soonest_expiry
    if server:
        value["s"] = True
        if leader is not None:
            value["l"] = [leader[0], leader[1]]
    if not value:
        return b""
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def decode_node_meta(meta: bytes) -> Mapping[str, object]:
    """A member's metadata map; empty if there is none or it is unreadable (metadata
    comes from the network: bad input is ignored, never raised)."""
    if not meta:
        return {}
    try:
        value = msgpack.unpackb(meta, raw=False, max_array_len=64, max_map_len=8)
    except (ValueError, TypeError, msgpack.UnpackException):
        return {}
    return value if isinstance(value, dict) else {}


def meta_is_server(meta: bytes) -> bool:
    return decode_node_meta(meta).get("s") is True


def meta_leader_claim(meta: bytes) -> LeaderClaim | None:
    claim = decode_node_meta(meta).get("l")
    if (
        isinstance(claim, list)
        and len(claim) == 2
        and isinstance(claim[0], int)
        and not isinstance(claim[0], bool)
        and claim[0] >= 0
        and isinstance(claim[1], str)
        and claim[1]
    ):
        return claim[0], claim[1]
    return None


def _live(member: Member) -> bool:
    return member.state in (MemberState.ALIVE, MemberState.SUSPECT)


def leader_from_members(members: Iterable[Member]) -> Member | None:
    """For a client: the leader that live servers claim with the highest term (ties,
    which a correct election never produces, go to the most claimed, then the name),
    if that leader is itself live in our view."""
    listed = list(members)
    votes: dict[LeaderClaim, int] = {}
    for member in listed:
        claim = meta_leader_claim(member.meta)
        if _live(member) and claim is not None and meta_is_server(member.meta):
            votes[claim] = votes.get(claim, 0) + 1
    if not votes:
        return None
    (_, leader), _ = max(votes.items(), key=lambda item: (item[0][0], item[1], item[0][1]))
    by_name = {m.name: m for m in listed}
    found = by_name.get(leader)
    return found if found is not None and _live(found) else None


def servers_from_members(members: Iterable[Member]) -> list[Member]:
    """For a client: the servers in our gossip view. Failed ones stay listed, as they
    stay counted in the election's server set; servers that left are gone."""
    return sorted(
        (m for m in members if m.state is not MemberState.LEFT and meta_is_server(m.meta)),
        key=lambda m: m.name,
    )


def format_address(address: Address) -> str:
    """``ip:port``, or ``[v6]:port``, as Consul writes addresses."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- persistence


def load_election_state(
    data_dir: DataDir,
) -> tuple[tuple[int, str | None] | None, list[tuple[str, Address]]]:
    """The saved ``(term, voted_for)`` (None if never saved or unreadable) and the
    saved server list. An unreadable file is logged: starting from term 0 is what a
    server with a lost disk does, and the stickiness of the others protects the
    current leader from it."""
    saved = data_dir.read_json(ELECTION_FILE)
    if saved is None:
        return None, []
    try:
        term = saved["term"]
        voted_for = saved["voted_for"]
        if not isinstance(term, int) or isinstance(term, bool) or term < 0:
            raise ValueError("term")
        if voted_for is not None and (not isinstance(voted_for, str) or not voted_for):
            raise ValueError("voted_for")
        servers: list[tuple[str, Address]] = []
        for name, host, port in saved["servers"]:
            if isinstance(name, str) and isinstance(host, str) and isinstance(port, int):
                servers.append((name, (host, port)))
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("election_state_unreadable", file=ELECTION_FILE, error=str(exc))
        return None, []
    return (term, voted_for), servers


# --------------------------------------------------------------------------- the driver


class ElectionDriver:
    """Runs one ``Election`` on the agent's loop. See the module docstring."""

    def __init__(
        self,
        election: Election,
        *,
        data_dir: DataDir,
        send: SendFunction,
        on_claim_changed: Callable[[], None],
    ) -> None:
        self.election = election
        self._data_dir = data_dir
        self._send = send
        self._on_claim_changed = on_claim_changed
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False
        self._closed = False
        self._saved: object = None
        self._claim: LeaderClaim | None = None

    @classmethod
    def create(
        cls,
        name: str,
        address: Address,
        *,
        bootstrap_expect: int,
        rng: random.Random,
        data_dir: DataDir,
        send: SendFunction,
        on_claim_changed: Callable[[], None],
    ) -> ElectionDriver:
        """An election restored from ``election.json``, started on the running loop."""
        persisted, servers = load_election_state(data_dir)
        election = Election(
            name,
            address,
            bootstrap_expect=bootstrap_expect if bootstrap_expect > 0 else NEVER_BOOTSTRAP,
            rng=rng,
            now=asyncio.get_running_loop().time(),
            persisted=persisted,
            servers=servers,
        )
        driver = cls(election, data_dir=data_dir, send=send, on_claim_changed=on_claim_changed)
        driver._saved = driver._durable_state()  # what the file already says
        log.info(
            "election_restored",
            term=election.term,
            voted_for=election.voted_for,
            servers=len(election.servers()),
            bootstrap_expect=bootstrap_expect,
        )
        driver._flush()
        return driver

    # ------------------------------------------------------------------ queries

    def leader_claim(self) -> LeaderClaim | None:
        """(term, leader) to publish in our metadata, None when we know no leader."""
        leader = self.election.leader()
        return (self.election.term, leader) if leader is not None else None

    # ------------------------------------------------------------------ inputs

    def on_member_event(self, event: MemberEvent) -> None:
        """Translate a gossip member event about a server into the core's inputs.
        Our own member is skipped: the core knows itself (``leave`` handles us)."""
        member = event.member
        if member.name == self.election.name or self._closed:
            return
        now = self._loop.time()
        if isinstance(event, MemberJoined | MemberUpdated | MemberRecovered):
            if not meta_is_server(member.meta):
                return
            self.election.server_joined(member.name, member.address, now)
        elif isinstance(event, MemberFailed):
            self.election.server_failed(member.name, now)  # a no-op for non-servers
        elif isinstance(event, MemberLeft):
            self.election.server_left(member.name, now)
        else:
            return  # suspected, reaped: the core does not care (failed stay counted)
        self._schedule_flush()

    def sync_members(self, members: Iterable[Member]) -> None:
        """Feed the servers gossip already knows (at start-up, after a restore)."""
        now = self._loop.time()
        for member in members:
            if member.name == self.election.name or not meta_is_server(member.meta):
                continue
            if member.state is MemberState.LEFT:
                continue
            self.election.server_joined(member.name, member.address, now)
            if member.state is MemberState.DEAD:
                self.election.server_failed(member.name, now)
        self._schedule_flush()

    def receive(self, data: bytes) -> None:
        """An election message (called from inside the gossip core: flush later)."""
        if self._closed:
            return
        self.election.receive(data, self._loop.time())
        self._schedule_flush()

    def leave(self) -> None:
        """We leave the cluster: step down and never stand again in this process."""
        if self._closed:
            return
        self.election.server_left(self.election.name, self._loop.time())
        self._flush()

    def close(self) -> None:
        """Stop the timer; later inputs are ignored."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------------ the flush

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and not self._closed:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        if self._closed:
            return
        election = self.election
        messages = election.messages_to_send()
        durable = self._durable_state()
        if durable != self._saved:
            try:
                self._save()
            except DataDirError as exc:
                # Sending now could announce a vote a crash would forget: drop the batch.
                log.error("election_state_not_saved", error=str(exc), dropped=len(messages))
                messages = []
            else:
                self._saved = durable
        for address, payload in messages:
            self._send(address, payload)
        self._arm_timer()
        while (event := election.next_event()) is not None:
            match event:
                case LeaderElected(term, leader):
                    log.info("leader_elected", term=term, leader=leader, us=leader == election.name)
                case LeadershipLost(term, reason):
                    log.warning("leadership_lost", term=term, reason=reason)
                case LeaderContactLost(term, leader):
                    log.warning("leader_contact_lost", term=term, leader=leader)
                case ElectionStarted(term):
                    log.info("election_started", term=term)
                case TermChanged(term):
                    log.debug("election_term_changed", term=term)
        claim = self.leader_claim()
        if claim != self._claim:
            self._claim = claim
            self._on_claim_changed()

    def _durable_state(self) -> tuple[int, str | None, tuple[tuple[str, Address], ...]]:
        election = self.election
        servers = tuple((s.name, s.address) for s in election.servers())
        return election.term, election.voted_for, servers

    def _save(self) -> None:
        election = self.election
        self._data_dir.atomic_write_json(
            ELECTION_FILE,
            {
                "term": election.term,
                "voted_for": election.voted_for,
                # Passed back on restart (``servers=``) so a restarted server does not
                # count a majority of one (ca/election.py, "Who is a server").
                "servers": [[s.name, s.address[0], s.address[1]] for s in election.servers()],
            },
        )

    def _arm_timer(self) -> None:
        deadline = self.election.get_timer()
        if deadline == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._timer_fired, deadline)

    def _timer_fired(self, deadline: float) -> None:
        self._timer = None
        self._timer_at = None
        if self._closed:
            return
        # asyncio may run a handle up to one clock resolution early; never hand the
        # core a time before the deadline it asked for, or it would ask again at once.
        self.election.handle_timer(max(self._loop.time(), deadline))
        self._flush()
