"""``meshnode.leadership``: node metadata, the client's view of the leader, and the
election driver (persist before send, one timer) on a real loop without sockets."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import msgpack

from ca.election import Address
from gossip.events import Member, MemberFailed, MemberJoined, MemberLeft, MemberState
from meshnode.agent import _meta_fingerprints
from meshnode.leadership import (
    ELECTION_FILE,
    ElectionDriver,
    SendFunction,
    decode_node_meta,
    encode_node_meta,
    format_address,
    leader_from_members,
    load_election_state,
    meta_is_server,
    meta_leader_claim,
    servers_from_members,
)
from meshnode.persistence import DataDir


def member(
    name: str,
    port: int,
    meta: bytes = b"",
    state: MemberState = MemberState.ALIVE,
) -> Member:
    return Member(name, ("127.0.0.1", port), meta, 1, state, 0.0)


def server_meta(leader: tuple[int, str] | None = None) -> bytes:
    return encode_node_meta([], server=True, leader=leader)


# --------------------------------------------------------------------------- metadata


def test_node_meta_round_trip_keeps_key_fingerprints() -> None:
    fingerprints = [b"\x01\x02\x03\x04", b"\x05\x06\x07\x08"]
    meta = encode_node_meta(fingerprints, server=True, leader=(7, "s2"))
    assert _meta_fingerprints(meta) == fingerprints
    assert meta_is_server(meta)
    assert meta_leader_claim(meta) == (7, "s2")
    # A client without encryption says nothing, as before servers existed.
    assert encode_node_meta([], server=False, leader=None) == b""
    # Only servers publish a claim.
    assert meta_leader_claim(encode_node_meta([], server=False, leader=(1, "x"))) is None


def test_bad_meta_is_ignored() -> None:
    for meta in (b"\xc1", b"garbage", msgpack.packb([1, 2]), msgpack.packb({"s": "yes"})):
        assert not meta_is_server(meta)
        assert meta_leader_claim(meta) is None
    for claim in ([-1, "a"], [True, "a"], [1, ""], [1], "s1", [1, 2]):
        assert meta_leader_claim(msgpack.packb({"s": True, "l": claim})) is None, claim
    assert decode_node_meta(b"") == {}


def test_client_takes_the_newest_claim_of_live_servers() -> None:
    members = [
        member("s1", 1, server_meta((3, "s1"))),
        member("s2", 2, server_meta((4, "s3"))),  # newer term wins
        member("s3", 3, server_meta((4, "s3"))),
        member("c1", 4),
    ]
    found = leader_from_members(members)
    assert found is not None and found.name == "s3"
    # A dead server's stale claim does not count; nor does a claim naming a dead leader.
    members[1] = member("s2", 2, server_meta((9, "s2")), MemberState.DEAD)
    found = leader_from_members(members)
    assert found is not None and found.name == "s3"
    members[2] = member("s3", 3, server_meta((4, "s3")), MemberState.DEAD)
    found = leader_from_members(members)
    assert found is not None and found.name == "s1"  # s1 still claims itself (term 3)
    members[0] = member("s1", 1, server_meta((4, "s3")))
    assert leader_from_members(members) is None, "the newest claim names a dead leader"
    # A non-server cannot claim.
    assert leader_from_members([member("c1", 4, msgpack.packb({"l": [5, "c1"]}))]) is None


def test_servers_from_members_keeps_failed_drops_left() -> None:
    members = [
        member("s2", 2, server_meta(), MemberState.DEAD),
        member("s1", 1, server_meta()),
        member("s3", 3, server_meta(), MemberState.LEFT),
        member("c1", 4),
    ]
    assert [m.name for m in servers_from_members(members)] == ["s1", "s2"]
    assert format_address(("::1", 80)) == "[::1]:80"
    assert format_address(("10.0.0.1", 80)) == "10.0.0.1:80"


def test_unreadable_election_file_starts_fresh(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path)
    data_dir.ensure()
    assert load_election_state(data_dir) == (None, [])
    data_dir.atomic_write_json(ELECTION_FILE, {"term": "x", "voted_for": None, "servers": []})
    assert load_election_state(data_dir) == (None, [])
    data_dir.atomic_write_json(
        ELECTION_FILE, {"term": 3, "voted_for": "s2", "servers": [["s2", "127.0.0.1", 2]]}
    )
    assert load_election_state(data_dir) == ((3, "s2"), [("s2", ("127.0.0.1", 2))])


# --------------------------------------------------------------------------- the driver


class Network:
    """Delivers election datagrams between drivers on the loop (no sockets), and
    checks at every send that the sender's vote is already on disk."""

    def __init__(self) -> None:
        self.drivers: dict[Address, ElectionDriver] = {}
        self.data_dirs: dict[Address, DataDir] = {}
        self.claims_published = 0
        self.unsaved_sends: list[str] = []
        self.down: set[Address] = set()

    def sender(self, source: Address) -> SendFunction:
        def send(address: Address, payload: bytes) -> None:
            election = self.drivers[source].election
            saved = self.data_dirs[source].read_json(ELECTION_FILE, {})
            if (saved.get("term", 0), saved.get("voted_for")) != election.state_to_persist():
                self.unsaved_sends.append(f"{election.name}: {saved} vs {election.term}")
            target = self.drivers.get(address)
            if target is not None and address not in self.down and source not in self.down:
                asyncio.get_running_loop().call_soon(target.receive, payload)

        return send

    def published(self) -> None:
        self.claims_published += 1


def start_drivers(tmp_path: Path, network: Network, names: list[str]) -> list[ElectionDriver]:
    addresses = {name: ("127.0.0.1", 7000 + n) for n, name in enumerate(names)}
    drivers = []
    for name in names:
        address = addresses[name]
        data_dir = DataDir(tmp_path / name)
        data_dir.ensure()
        network.data_dirs[address] = data_dir
        driver = ElectionDriver.create(
            name,
            address,
            bootstrap_expect=len(names),
            rng=random.Random(name),
            data_dir=data_dir,
            send=network.sender(address),
            on_claim_changed=network.published,
        )
        network.drivers[address] = driver
        drivers.append(driver)
    for driver in drivers:
        for name, address in addresses.items():
            driver.on_member_event(MemberJoined(member(name, address[1], server_meta())))
            driver.on_member_event(MemberJoined(member(name, address[1])))  # client: ignored
    return drivers


async def wait_for_one_leader(drivers: list[ElectionDriver], within: float) -> ElectionDriver:
    deadline = time.monotonic() + within
    while True:
        leaders = [d for d in drivers if d.election.is_leader]
        named = {d.election.leader() for d in drivers}
        if len(leaders) == 1 and named == {leaders[0].election.name}:
            return leaders[0]
        assert time.monotonic() < deadline, [(d.election.name, d.election.role) for d in drivers]
        await asyncio.sleep(0.05)


async def test_drivers_elect_persist_before_send_and_restore(tmp_path: Path) -> None:
    network = Network()
    drivers = start_drivers(tmp_path, network, ["s1", "s2", "s3"])
    try:
        leader = await wait_for_one_leader(drivers, 10)
        assert network.unsaved_sends == []
        assert all(
            d.leader_claim() == (leader.election.term, leader.election.name) for d in drivers
        )
        assert network.claims_published >= 3
        saved = network.data_dirs[leader.election.address].read_json(ELECTION_FILE)
        assert saved["term"] == leader.election.term
        assert saved["voted_for"] == leader.election.name
        assert [s[0] for s in saved["servers"]] == ["s1", "s2", "s3"]

        # The leader crashes: its timer stops, the others elect a new one.
        network.down.add(leader.election.address)
        leader.close()
        for driver in drivers:
            if driver is not leader:
                driver.on_member_event(MemberFailed(member(leader.election.name, 0)))
        survivors = [d for d in drivers if d is not leader]
        new_leader = await wait_for_one_leader(survivors, 10)
        assert new_leader.election.term > leader.election.term
        assert network.unsaved_sends == []
        # Failed servers stay counted: two of three still make a majority of three.
        assert len(new_leader.election.servers()) == 3

        # A graceful leave drops the server from the set.
        survivors[0].on_member_event(MemberLeft(member(leader.election.name, 0)))
        await asyncio.sleep(0)
        assert len(survivors[0].election.servers()) == 2
    finally:
        for driver in drivers:
            driver.close()

    # A restart restores term, vote and server list from the file.
    data_dir = network.data_dirs[new_leader.election.address]
    restored = ElectionDriver.create(
        new_leader.election.name,
        new_leader.election.address,
        bootstrap_expect=3,
        rng=random.Random(1),
        data_dir=data_dir,
        send=lambda address, payload: None,
        on_claim_changed=lambda: None,
    )
    try:
        assert restored.election.state_to_persist() == new_leader.election.state_to_persist()
        assert len(restored.election.servers()) == 3
        assert restored.election.bootstrapped
        assert restored.election.leader() is None
    finally:
        restored.close()
