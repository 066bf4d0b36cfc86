"""Ten real ``meshnode member`` processes on loopback: join, crash, leave, rejoin, and a
three-step key rotation with no false failure.

Every process is started through ``meshnode.procs.spawn_member`` and killed and reaped
by the ``cluster`` fixture, whatever the test does.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from gossip.keyring import decode_key, generate_key
from meshnode.member import key_fingerprint
from meshnode.procs import (
    MemberProcess,
    fetch_json,
    kill_all,
    membership_views,
    spawn_member,
    stop_process,
    wait_ready,
)

pytestmark = pytest.mark.slow

SIZE = 10
Views = dict[str, dict[str, str]]


class Cluster:
    """The member processes of one test, and an HTTP session to watch them."""

    def __init__(self, workdir: Path, session: aiohttp.ClientSession) -> None:
        self.workdir = workdir
        self.session = session
        self.members: dict[str, MemberProcess] = {}
        self.started: list[MemberProcess] = []  # every process ever, for cleanup

    async def start(self, name: str, join: tuple[str, ...] = (), *extra: str) -> MemberProcess:
        process = await spawn_member(name, self.workdir, join=join, extra_args=extra)
        self.started.append(process)
        self.members[name] = process
        return process

    async def start_many(
        self, names: list[str], extra: Callable[[str], tuple[str, ...]] = lambda n: ()
    ) -> str:
        """Start ``names[0]`` as the seed and the rest joining it; returns the seed."""
        seed = await self.start(names[0], (), *extra(names[0]))
        await wait_ready(seed)
        seed_address = f"127.0.0.1:{seed.gossip_port}"
        rest = [await self.start(n, (seed_address,), *extra(n)) for n in names[1:]]
        await asyncio.gather(*(wait_ready(m) for m in rest))
        return seed_address

    def running(self) -> list[str]:
        return [name for name, m in self.members.items() if m.running]

    async def views(self) -> Views:
        return await membership_views(self.session, list(self.members.values()))

    async def wait_views(
        self, condition: Callable[[Views], bool], within: float, what: str
    ) -> None:
        deadline = time.monotonic() + within
        views: Views = {}
        while time.monotonic() < deadline:
            views = await self.views()
            if len(views) == len(self.running()) and condition(views):
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"not within {within} s: {what}; last views: {views}")

    async def gossip_status(self) -> dict[str, dict[str, object]]:
        names = self.running()
        replies = await asyncio.gather(
            *(fetch_json(self.session, self.members[n].http_url + "/v1/mesh/gossip") for n in names)
        )
        return {n: r for n, r in zip(names, replies, strict=True) if isinstance(r, dict)}


def everyone_sees(subject: str, status: str) -> Callable[[Views], bool]:
    def check(views: Views) -> bool:
        return all(view.get(subject) == status for observer, view in views.items())

    return check


def all_alive(names: list[str]) -> Callable[[Views], bool]:
    def check(views: Views) -> bool:
        return all(all(view.get(n) == "alive" for n in names) for view in views.values())

    return check


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    timeout = aiohttp.ClientTimeout(total=2, sock_connect=1)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        handle = Cluster(tmp_path, session)
        try:
            yield handle
        finally:
            await kill_all(handle.started)


async def test_join_crash_leave_and_rejoin(cluster: Cluster) -> None:
    names = [f"node{i}" for i in range(SIZE)]
    seed_address = await cluster.start_many(names)
    await cluster.wait_views(all_alive(names), 20, f"all {SIZE} members alive everywhere")

    victim = names[5]
    cluster.members[victim].kill()
    await cluster.members[victim].process.wait()
    await cluster.wait_views(everyone_sees(victim, "failed"), 25, f"{victim} (kill -9) failed")

    leaver = names[6]
    cluster.members[leaver].terminate()
    await cluster.wait_views(everyone_sees(leaver, "left"), 10, f"{leaver} (SIGTERM) left")
    code = await asyncio.wait_for(cluster.members[leaver].process.wait(), 10)
    assert code == 0, f"a member stopped with SIGTERM exits 0, not {code}"
    assert everyone_sees(victim, "failed")(await cluster.views()), "a leave is not a crash"

    # Same name, new process and port; only the restarted member is told a seed.
    await wait_ready(await cluster.start(victim, (seed_address,)))
    await cluster.wait_views(everyone_sees(victim, "alive"), 20, f"{victim} alive again")


async def test_key_rotation_without_false_failures(cluster: Cluster, tmp_path: Path) -> None:
    first, second = generate_key(), generate_key()
    first_print, second_print = (key_fingerprint(decode_key(k)) for k in (first, second))
    names = [f"node{i}" for i in range(SIZE)]
    keyring_files = {n: tmp_path / f"{n}.keyring.json" for n in names}

    def flags(name: str) -> tuple[str, ...]:
        return ("--encrypt", first, "--keyring-file", str(keyring_files[name]))

    await cluster.start_many(names, flags)
    await cluster.wait_views(all_alive(names), 20, f"all {SIZE} encrypted members alive")

    failures: list[str] = []
    polls = 0

    async def watch() -> None:
        nonlocal polls
        while True:
            for observer, view in (await cluster.views()).items():
                failures.extend(
                    f"{observer} saw {s} {st}" for s, st in view.items() if st != "alive"
                )
            polls += 1
            await asyncio.sleep(0.2)

    async def rotate_to(keys: list[str], expect_primary: str, expect: list[str]) -> None:
        for name in names:
            keyring_files[name].write_text(json.dumps(keys))
            cluster.members[name].signal(signal.SIGHUP)

        async def applied() -> bool:
            status = await cluster.gossip_status()
            return len(status) == SIZE and all(
                s["Keyring"] == {"Primary": expect_primary, "Keys": expect} for s in status.values()
            )

        await wait_until(applied, 10, f"every member has keyring {expect}")
        await asyncio.sleep(1.5)  # some probe periods on this step before the next

    watcher = asyncio.create_task(watch())
    try:
        await rotate_to([first, second], first_print, [first_print, second_print])
        await rotate_to([second, first], second_print, [second_print, first_print])
        await rotate_to([second], second_print, [second_print])
        probes_before = {n: s["Stats"] for n, s in (await cluster.gossip_status()).items()}
        await asyncio.sleep(2)
    finally:
        watcher.cancel()
        (outcome,) = await asyncio.gather(watcher, return_exceptions=True)
    assert isinstance(outcome, asyncio.CancelledError), f"the watcher itself failed: {outcome!r}"
    assert polls > 10, "the watcher polled throughout the rotation"
    assert not failures, f"members looked unhealthy during the rotation: {failures[:10]}"
    status = await cluster.gossip_status()
    for name, entry in status.items():
        stats = entry["Stats"]
        assert isinstance(stats, dict)
        assert stats["dropped"].get("decrypt_failed", 0) == 0, f"{name}: {stats['dropped']}"
        before = probes_before[name]
        assert isinstance(before, dict)
        assert stats["rtt_count"] > before["rtt_count"], f"{name} probes with the new key"

    # Every member stops cleanly (a graceful leave exits 0).
    codes = await asyncio.gather(*(stop_process(m) for m in cluster.members.values()))
    assert codes == [0] * SIZE, codes


async def wait_until(condition: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.1)
