"""The trust bundle an agent serves and the leaves it keeps, against a real CA."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ca.issuer import CertificateAuthority, CsrRejected
from ca.spiffe import SpiffeId
from gossip.broadcast import BroadcastQueue
from meshnode.certs import BUNDLE_TAG, BundleStore, LeafManager
from meshnode.connect import NoLeaderError, RequestRefusedError
from meshnode.persistence import DataDir

TD = "11111111-2222-3333-4444-555555555555.meshnode"
START = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def data_dir(tmp_path: Path, name: str = "d") -> DataDir:
    directory = DataDir(tmp_path / name)
    directory.ensure()
    return directory


def queue() -> BroadcastQueue:
    return BroadcastQueue(4, lambda: 3)


class Leader:
    """The leader's side of ``ca.sign``: a real CA and a registration table."""

    def __init__(self, clock: Clock, registered: set[str]) -> None:
        self.ca = CertificateAuthority.create_root(TD, clock())
        self.clock = clock
        self.registered = registered
        self.requests = 0
        self.down = False

    async def request(self, service: str, csr: str) -> dict[str, Any]:
        self.requests += 1
        if self.down:
            raise NoLeaderError("No cluster leader")
        expected = (
            SpiffeId.agent(TD, "dc1", "n1") if not service else SpiffeId.service(TD, "dc1", service)
        )
        try:
            leaf = self.ca.sign_csr(
                csr,
                expected=expected,
                registered=service in self.registered or not service,
                now=self.clock(),
                ttl=timedelta(hours=72),
            )
        except CsrRejected as exc:
            raise RequestRefusedError(exc.reason, str(exc)) from None
        return {"cert": leaf.cert_pem, "chain": list(leaf.intermediate_pems), "root": leaf.root_id}


def manager(
    tmp_path: Path, leader: Leader, clock: Clock, wanted: set[str], bundles: BundleStore
) -> LeafManager:
    return LeafManager(
        node="n1",
        datacenter="dc1",
        data_dir=data_dir(tmp_path),
        bundles=bundles,
        request=leader.request,
        wanted=lambda: wanted,
        spread=lambda: timedelta(seconds=30),
        rng=random.Random(1),
        now=clock,
    )


# ---------------------------------------------------------------------------- bundles


def test_bundle_store_takes_newer_continuing_bundles_only(tmp_path: Path) -> None:
    clock = Clock()
    ca = CertificateAuthority.create_root(TD, clock())
    q = queue()
    store = BundleStore(data_dir(tmp_path), q)
    first = ca.bundle()
    assert store.receive(first.encode())  # first use
    assert not store.receive(first.encode())  # duplicate
    ca.rotate_root(clock())
    rotated = ca.bundle()
    assert store.receive(rotated.encode())
    assert not store.apply(first)  # older
    foreign = CertificateAuthority.create_root(TD, clock()).bundle()
    assert not store.apply(dataclasses.replace(foreign, version=50))
    assert store.stats["discontinuous"] == 1
    assert store.bundle == rotated
    assert not store.receive(b"\x93garbage")
    assert store.stats["malformed"] == 1
    # The leader's own bundle is authoritative (operator CA replaced, say).
    assert store.apply(dataclasses.replace(foreign, version=50), authoritative=True)
    broadcasts = q.get(0, 10_000)
    assert broadcasts and all(b[:1] == BUNDLE_TAG for b in broadcasts)


def test_bundle_store_persists_and_verifies(tmp_path: Path) -> None:
    ca = CertificateAuthority.create_root(TD, START)
    store = BundleStore(data_dir(tmp_path), queue())
    signature, key_id = ca.sign_data(b"entry")
    assert not store.verify(b"entry", signature, key_id)  # no bundle yet
    store.apply(ca.bundle())
    assert store.verify(b"entry", signature, key_id)
    restarted = BundleStore(data_dir(tmp_path), queue())
    assert restarted.bundle == ca.bundle()
    assert restarted.fingerprint == ca.bundle().fingerprint()
    assert restarted.verify(b"entry", signature, key_id)


# ---------------------------------------------------------------------------- leaves


async def test_leaves_for_registered_services_and_the_agent(tmp_path: Path) -> None:
    clock = Clock()
    leader = Leader(clock, {"web"})
    bundles = BundleStore(data_dir(tmp_path, "b"), queue())
    bundles.apply(leader.ca.bundle())
    leaves = manager(tmp_path, leader, clock, {"", "web"}, bundles)
    web = await leaves.get("web")
    assert web.spiffe_id == f"spiffe://{TD}/ns/default/dc/dc1/svc/web"
    assert web.not_after - web.not_before == timedelta(hours=72, minutes=1)
    assert "PRIVATE KEY" in web.private_key_pem
    assert await leaves.get("web") == web  # cached
    agent = await leaves.get("")
    assert agent.spiffe_id == f"spiffe://{TD}/agent/client/dc/dc1/id/n1"
    with pytest.raises(LookupError):
        await leaves.get("db")  # not registered here
    assert leader.requests == 2
    assert leaves.soonest_expiry() == min(web.not_after, agent.not_after)


async def test_leader_refusal_and_no_leader(tmp_path: Path) -> None:
    clock = Clock()
    leader = Leader(clock, set())  # the leader's catalog does not know "web" here
    bundles = BundleStore(data_dir(tmp_path, "b"), queue())
    leaves = manager(tmp_path, leader, clock, {"web"}, bundles)
    with pytest.raises(NoLeaderError):
        await leaves.get("web")  # no bundle yet
    bundles.apply(leader.ca.bundle())
    with pytest.raises(RequestRefusedError) as caught:
        await leaves.get("web")
    assert caught.value.reason == "not_registered"
    leader.registered.add("web")
    leader.down = True
    with pytest.raises(NoLeaderError):
        await leaves.get("web")


async def test_renewal_rotation_and_restart(tmp_path: Path) -> None:
    clock = Clock()
    leader = Leader(clock, {"web"})
    bundles = BundleStore(data_dir(tmp_path, "b"), queue())
    bundles.apply(leader.ca.bundle())
    leaves = manager(tmp_path, leader, clock, {"web"}, bundles)
    run = asyncio.create_task(leaves.run())
    try:
        for _ in range(100):
            await asyncio.sleep(0.01)
            if leaves.leaf("web") is not None:
                break
        first = leaves.leaf("web")
        assert first is not None
        # Not due before 40 % of its life; due by 60 %.
        clock.now = first.not_before + (first.not_after - first.not_before) * 0.39
        leaves.wake()
        await asyncio.sleep(0.05)
        assert leaves.leaf("web") == first
        clock.now = first.not_before + (first.not_after - first.not_before) * 0.61
        leaves.wake()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if leaves.leaf("web") != first:
                break
        renewed = leaves.leaf("web")
        assert renewed is not None and renewed.serial_number != first.serial_number
        assert renewed.index > first.index
        # A rotation: re-issued under the new root within the spread (30 s here).
        leader.ca.rotate_root(clock())
        bundles.apply(leader.ca.bundle())
        clock.now += timedelta(seconds=31)
        leaves.wake()
        for _ in range(100):
            await asyncio.sleep(0.01)
            leaf = leaves.leaf("web")
            if leaf is not None and leaf.root_id == leader.ca.bundle().active_root_id:
                break
        rotated = leaves.leaf("web")
        assert rotated is not None and rotated.root_id == leader.ca.bundle().active_root_id
    finally:
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        leaves.close()
    restarted = manager(tmp_path, leader, clock, {"web"}, bundles)
    assert restarted.leaf("web") is not None
    assert restarted.leaf("web").serial_number == rotated.serial_number  # type: ignore[union-attr]
