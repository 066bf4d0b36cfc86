"""Discovery: ``RetryJoiner`` backoff with a fake join, ``MdnsDiscovery``'s offer rules
with a fake resolver, and the real thing -- mDNS between network namespaces.

The namespace test builds four "hosts" (namespaces ``mnt-<hex>-1..4``) on one bridge
that lives in its own namespace (``mnt-<hex>-br``), so nothing is added to the host's
own network: every link is created inside a namespace and vanishes with it
(``tests/netns.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from zeroconf import ServiceStateChange

from gossip.events import Address
from meshnode.discovery import SERVICE_TYPE, MdnsDiscovery, RetryJoiner
from tests.netns import NetnsLab, open_netns_lab

# ---------------------------------------------------------------------- RetryJoiner


class FakeJoin:
    """Fails ``failures`` times (raising ``errors[i]`` if given), then succeeds."""

    def __init__(self, failures: int, errors: Sequence[BaseException | None] = ()) -> None:
        self.failures = failures
        self.errors = list(errors)
        self.calls: list[tuple[str, ...]] = []
        self.called = asyncio.Event()

    async def __call__(self, addresses: Sequence[str]) -> bool:
        self.calls.append(tuple(addresses))
        self.called.set()
        index = len(self.calls) - 1
        if index < len(self.errors) and (error := self.errors[index]) is not None:
            raise error
        return index >= self.failures


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


async def test_retry_joiner_backs_off_exponentially_with_jitter_until_joined() -> None:
    join, sleep = FakeJoin(failures=7), FakeSleep()
    joiner = RetryJoiner(
        ["10.0.0.1:7946", "10.0.0.2"],
        join,
        rng=random.Random(7),
        initial_delay=1.0,
        max_delay=16.0,
        jitter=0.2,
        sleep=sleep,
    )
    assert await joiner.run() is True
    assert joiner.joined and joiner.attempts == 8
    assert join.calls == [("10.0.0.1:7946", "10.0.0.2")] * 8, "every attempt gets every address"
    assert len(sleep.delays) == 7, "no sleep after the successful attempt"
    bases = [1.0, 2.0, 4.0, 8.0, 16.0, 16.0, 16.0]
    for delay, base in zip(sleep.delays, bases, strict=True):
        assert base * 0.8 <= delay <= base * 1.2, (delay, base)
    # Jitter really varies (agents started together must not retry in lockstep) ...
    assert len({round(d / b, 6) for d, b in zip(sleep.delays, bases, strict=True)}) > 1
    # ... and is reproducible from the seed.
    replay = RetryJoiner(["x"], FakeJoin(0), rng=random.Random(7), max_delay=16.0)
    assert [replay.delay(n) for n in range(1, 8)] == sleep.delays


async def test_retry_joiner_counts_errors_as_failures_and_can_give_up() -> None:
    join = FakeJoin(failures=99, errors=[OSError("unreachable"), TimeoutError()])
    sleep = FakeSleep()
    joiner = RetryJoiner(["a"], join, rng=random.Random(1), max_attempts=4, sleep=sleep)
    assert await joiner.run() is False
    assert joiner.attempts == 4 and not joiner.joined
    assert len(sleep.delays) == 3


async def test_retry_joiner_without_jitter_is_plain_capped_backoff() -> None:
    joiner = RetryJoiner(
        ["a"], FakeJoin(0), rng=random.Random(0), initial_delay=0.5, max_delay=3.0, jitter=0.0
    )
    assert [joiner.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


async def test_retry_joiner_is_cancellable_while_waiting() -> None:
    join = FakeJoin(failures=99)
    joiner = RetryJoiner(["a"], join, rng=random.Random(3), initial_delay=60.0, max_delay=60.0)
    task = asyncio.create_task(joiner.run())
    await join.called.wait()
    await asyncio.sleep(0.01)  # now inside the 60 s backoff sleep
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert joiner.attempts == 1


def test_retry_joiner_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="at least one address"):
        RetryJoiner([], FakeJoin(0), rng=random.Random())
    with pytest.raises(ValueError, match="jitter"):
        RetryJoiner(["a"], FakeJoin(0), rng=random.Random(), jitter=1.5)


# ---------------------------------------------------------------------- MdnsDiscovery rules


class ScriptedDiscovery(MdnsDiscovery):
    """``MdnsDiscovery`` whose resolver is a dict (instance name -> address or None)."""

    def __init__(self, records: dict[str, Address | None], **kwargs: object) -> None:
        self.offers: list[Address] = []

        async def on_peer(address: Address) -> None:
            self.offers.append(address)
            if address[1] == 666:
                raise RuntimeError("callback bug")

        super().__init__(
            node="me",
            cluster="alpha",
            advertise_host="10.213.7.1",
            gossip_port=7946,
            on_peer=on_peer,
            **kwargs,  # type: ignore[arg-type]
        )
        self.records = records

    async def _resolve(self, name: str) -> Address | None:
        return self.records.get(name)

    def announce(self, name: str, change: ServiceStateChange = ServiceStateChange.Added) -> None:
        self._service_changed(
            zeroconf=None,  # type: ignore[arg-type]
            service_type=SERVICE_TYPE,
            name=name,
            state_change=change,
        )


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_discovery_offers_each_peer_once_and_again_after_it_left() -> None:
    peer_b, peer_c = f"b.{SERVICE_TYPE}", f"c.{SERVICE_TYPE}"
    discovery = ScriptedDiscovery(
        {peer_b: ("10.213.7.2", 7946), peer_c: ("10.213.7.3", 7946)}, min_spacing=0.0
    )
    worker = asyncio.create_task(discovery._resolve_loop())
    try:
        discovery.announce(discovery.instance_name)  # ourselves: never offered
        discovery.announce(peer_b)
        discovery.announce(peer_b, ServiceStateChange.Updated)
        await settle()
        discovery.announce(peer_b, ServiceStateChange.Updated)
        discovery.announce(f"other-cluster.{SERVICE_TYPE}")  # resolves to None
        await settle()
        assert discovery.offers == [("10.213.7.2", 7946)], "deduplicated"

        discovery.announce(peer_b, ServiceStateChange.Removed)
        discovery.announce(peer_c)
        discovery.announce(peer_b)
        await settle()
        assert discovery.offers == [
            ("10.213.7.2", 7946),
            ("10.213.7.3", 7946),
            ("10.213.7.2", 7946),
        ], "a peer that went away and came back is offered again"
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker


async def test_discovery_spaces_offers_and_survives_a_failing_callback() -> None:
    names = [f"n{i}.{SERVICE_TYPE}" for i in range(3)]
    discovery = ScriptedDiscovery(
        {names[0]: ("10.213.7.9", 666), names[1]: ("10.213.7.2", 1), names[2]: ("10.213.7.3", 1)},
        min_spacing=0.05,
    )
    worker = asyncio.create_task(discovery._resolve_loop())
    try:
        started = time.monotonic()
        for name in names:
            discovery.announce(name)
        while len(discovery.offers) < 3:
            await asyncio.sleep(0.01)
            assert time.monotonic() - started < 2, discovery.offers
        assert time.monotonic() - started >= 0.1, "three offers need two spacings"
        assert discovery.statistics().offered == 3
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker


def test_discovery_refuses_wildcard_and_ipv6_interfaces() -> None:
    async def on_peer(address: Address) -> None:
        pass

    common = {"node": "n", "cluster": "c", "gossip_port": 7946, "on_peer": on_peer}
    with pytest.raises(ValueError, match=r"0\.0\.0\.0"):
        MdnsDiscovery(advertise_host="0.0.0.0", **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="IPv4"):
        MdnsDiscovery(advertise_host="::1", **common)  # type: ignore[arg-type]
    # Behind NAT: advertise the public address, listen on the local one.
    nat = MdnsDiscovery(advertise_host="203.0.113.5", interface="10.0.0.5", **common)  # type: ignore[arg-type]
    assert nat.instance_name == f"n.{SERVICE_TYPE}"


# ---------------------------------------------------------------------- network namespaces

#: How long the cluster may take to form: mDNS probing takes ~0.75 s (RFC 6762 §8.1),
#: resolving and one push-pull a little more.
FORM_WITHIN = 20.0


@pytest.fixture
def netns_lab() -> Iterator[NetnsLab]:
    with open_netns_lab() as lab:
        yield lab


def _read_report(path: Path) -> dict[str, object] | None:
    try:
        report = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return report if isinstance(report, dict) else None


@pytest.mark.netns
@pytest.mark.slow
def test_mdns_forms_one_cluster_per_cluster_name(netns_lab: NetnsLab, tmp_path: Path) -> None:
    clusters = {"n1": "alpha", "n2": "alpha", "n3": "alpha", "n4": "beta"}
    reports: dict[str, Path] = {}
    logs: dict[str, Path] = {}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    for index, (name, cluster) in enumerate(clusters.items(), start=1):
        namespace, address = netns_lab.add_host(index)
        reports[name] = tmp_path / f"{name}.json"
        logs[name] = tmp_path / f"{name}.log"
        args = ["-m", "tests.meshnode.mdns_node", "--name", name, "--cluster", cluster]
        args += ["--host", address, "--report", str(reports[name])]
        processes[name] = netns_lab.spawn(namespace, args, logs[name])

    alpha = ["n1", "n2", "n3"]

    def settled(views: dict[str, dict[str, object]]) -> bool:
        if len(views) != 4:
            return False
        alpha_formed = all(views[n]["alive"] == alpha for n in alpha)
        # Proof that beta's isolation is a decision, not deafness: it has resolved the
        # alpha announcements and turned them down, and alpha has turned beta down.
        beta_saw = views["n4"]["discovery"]
        alpha_saw = [views[n]["discovery"] for n in alpha]
        return (
            alpha_formed
            and isinstance(beta_saw, dict)
            and beta_saw["other_cluster"] >= 3
            and all(isinstance(s, dict) and s["other_cluster"] >= 1 for s in alpha_saw)
        )

    deadline = time.monotonic() + FORM_WITHIN
    views: dict[str, dict[str, object]] = {}
    while time.monotonic() < deadline:
        views = {n: r for n, p in reports.items() if (r := _read_report(p)) is not None}
        exited = {n: p.returncode for n, p in processes.items() if p.poll() is not None}
        if exited or settled(views):
            break
        time.sleep(0.2)

    def diagnostics() -> str:
        tails = {n: logs[n].read_text(errors="replace")[-1500:] for n in logs}
        return f"views: {json.dumps(views, indent=1)}\nlogs: {json.dumps(tails, indent=1)}"

    assert all(p.poll() is None for p in processes.values()), "a member died\n" + diagnostics()
    assert settled(views), f"no single alpha cluster within {FORM_WITHIN} s\n" + diagnostics()
    # Beta stays alone for a while longer, with alpha's announcements in plain view.
    time.sleep(1.0)
    views = {n: r for n, p in reports.items() if (r := _read_report(p)) is not None}
    for name in alpha:
        assert views[name]["alive"] == alpha, diagnostics()
    assert views["n4"]["alive"] == ["n4"], diagnostics()

    # A clean stop: discovery sends its goodbye, closes zeroconf and the transport.
    for process in processes.values():
        process.send_signal(signal.SIGTERM)
    codes = {name: process.wait(timeout=10) for name, process in processes.items()}
    assert codes == dict.fromkeys(clusters, 0), diagnostics()
