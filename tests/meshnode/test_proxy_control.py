"""The agent's proxy control socket and worker supervisor (meshnode/proxy_control.py),
driven by an in-process fake worker speaking the control protocol, small ``python -c``
workers for supervision, and the real ``python -m proxy --control`` worker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshnode.metrics import ProxyMetricsSource, register_proxy_metrics
from meshnode.proxy_control import (
    ProxyControl,
    WorkerSupervisor,
    encode_frame,
    read_frame,
    worker_command,
)
from proxy.snapshot import (
    AccessLog,
    Certificate,
    Cluster,
    Route,
    Snapshot,
    SplitTarget,
    Upstream,
    decode,
)
from proxy.telemetry import Telemetry


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="mnpc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Source:
    """What the builder reads; tests change it and call ``changed()``."""

    def __init__(self) -> None:
        self.node = "n1"
        self.sample = 1.0
        self.builds = 0
        self.listener = False

    def build(self) -> Snapshot:
        self.builds += 1
        upstreams: tuple[Upstream, ...] = ()
        if self.listener:
            cluster = Cluster("api", "api", "spiffe://td/ns/default/dc/dc1/svc/api", ())
            upstreams = (
                Upstream(
                    source="web",
                    destination="api",
                    host="127.0.0.1",
                    port=1,
                    certificate=Certificate("chain", "key", "spiffe://td/svc/web"),
                    routes=(Route("api/default", (SplitTarget(10_000, "api"),)),),
                    clusters={"api": cluster},
                ),
            )
        return Snapshot(
            version=0,
            trust_domain="td",
            trust_bundle=(),
            upstreams=upstreams,
            access_log=AccessLog(sample=self.sample),
            node=self.node,
        )


class FakeWorker:
    """An in-process worker: connects, says hello, reads snapshots."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: Path, pid: int = 4242) -> FakeWorker:
        reader, writer = await asyncio.open_unix_connection(str(path))
        worker = cls(reader, writer)
        worker.send("hello", {"pid": pid, "protocol": 1})
        return worker

    def send(self, kind: str, *body: object) -> None:
        self.writer.write(encode_frame(kind, *body))

    async def snapshot(self, within: float = 1.0) -> Snapshot:
        async with asyncio.timeout(within):
            kind, data = await read_frame(self.reader)
        assert kind == "snapshot"
        return decode(data)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.fixture
async def control(short_dir: Path) -> AsyncIterator[tuple[ProxyControl, Source]]:
    source = Source()
    control = ProxyControl(short_dir / "proxy.sock", source.build, debounce=0.02)
    await control.start()
    try:
        yield control, source
    finally:
        await control.aclose()


async def test_hello_gets_the_snapshot_then_changes_within_100ms(
    control: tuple[ProxyControl, Source],
) -> None:
    proxy, source = control
    mode = proxy.socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    worker = await FakeWorker.connect(proxy.socket_path)
    first = await worker.snapshot()
    assert (first.version, first.node) == (1, "n1")
    worker.send("applied", 1)
    stats = await asyncio.wait_for(proxy.wait_for(lambda s: s.applied_version == 1), 1)
    assert stats.workers_connected == 1

    loop = asyncio.get_running_loop()
    source.node = "n2"
    started = loop.time()
    for _ in range(5):  # a burst of changes: one build, one push
        proxy.changed()
    builds = source.builds
    second = await worker.snapshot()
    assert loop.time() - started < 0.1
    assert (second.version, second.node) == (2, "n2")
    assert source.builds == builds + 1
    await worker.close()


async def test_no_push_when_only_the_version_would_change(
    control: tuple[ProxyControl, Source],
) -> None:
    proxy, source = control
    worker = await FakeWorker.connect(proxy.socket_path)
    assert (await worker.snapshot()).version == 1
    proxy.changed()
    with pytest.raises(TimeoutError):
        await worker.snapshot(within=0.15)
    assert source.builds >= 2 and proxy.stats().snapshot_version == 1
    source.sample = 0.5
    proxy.changed()
    assert (await worker.snapshot()).version == 2
    await worker.close()


async def test_rejections_stats_and_metrics(control: tuple[ProxyControl, Source]) -> None:
    proxy, _ = control
    worker = await FakeWorker.connect(proxy.socket_path)
    await worker.snapshot()
    worker.send("rejected", 1, "inbound.port: in use")
    telemetry = Telemetry()
    telemetry.request("outbound", "web", "api", 200, 0.003, 10, 20)
    telemetry.request("outbound", "web", "api", 503, 0.2, 10, 0)
    telemetry.connection_opened("inbound", "web", "api")
    telemetry.handshake_failure("inbound", "unknown_ca")
    worker.send("stats", telemetry.dump())
    stats = await asyncio.wait_for(
        proxy.wait_for(lambda s: s.dump is not None and s.snapshots_rejected == 1), 1
    )
    assert stats.last_rejection == "inbound.port: in use"

    registry = CollectorRegistry()

    def source() -> ProxyMetricsSource:
        current = proxy.stats()
        return ProxyMetricsSource(
            current.worker_restarts,
            current.applied_version,
            current.snapshots_rejected,
            current.dump,
        )

    register_proxy_metrics(registry, source)
    text = generate_latest(registry).decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("meshnode_proxy_snapshots_rejected_total") == 1
    assert value("meshnode_proxy_worker_restarts_total") == 0
    assert value("meshnode_proxy_snapshot_version") == 0
    ok = {"code_class": "2xx", "destination": "api", "direction": "outbound", "source": "web"}
    assert value("meshnode_proxy_requests_total", **ok) == 1
    assert value("meshnode_proxy_response_bytes_total", **ok) == 20
    # cumulative buckets: the 3 ms request counts in every bucket from 5 ms up
    bucket = "meshnode_proxy_request_duration_seconds_bucket"
    assert value(bucket, **ok, le="0.0025") == 0
    assert value(bucket, **ok, le="0.005") == 1
    assert value(bucket, **ok, le="+Inf") == 1
    assert value("meshnode_proxy_request_duration_seconds_count", **ok) == 1
    assert value("meshnode_proxy_request_duration_seconds_sum", **ok) == pytest.approx(0.003)
    tcp = {"direction": "inbound", "source": "web", "destination": "api"}
    assert value("meshnode_proxy_tcp_connections_active", **tcp) == 1
    failures = "meshnode_proxy_tls_handshake_failures_total"
    assert value(failures, direction="inbound", reason="unknown_ca") == 1
    await worker.close()


async def test_garbage_and_bad_hello_are_dropped(control: tuple[ProxyControl, Source]) -> None:
    proxy, _ = control
    reader, writer = await asyncio.open_unix_connection(str(proxy.socket_path))
    writer.write(encode_frame("hello", {"pid": 1, "protocol": 99}))
    assert await asyncio.wait_for(reader.read(), 1) == b""  # closed, nothing sent
    writer.close()
    reader, writer = await asyncio.open_unix_connection(str(proxy.socket_path))
    writer.write(b"\xff\xff\xff\xff")  # a 4 GiB frame
    assert await asyncio.wait_for(reader.read(), 1) == b""
    writer.close()
    assert proxy.stats().workers_connected == 0


async def test_stale_socket_file_is_replaced(short_dir: Path) -> None:
    path = short_dir / "proxy.sock"
    path.write_text("left over")
    proxy = ProxyControl(path, Source().build)
    await proxy.start()
    try:
        worker = await FakeWorker.connect(path)
        assert (await worker.snapshot()).version == 1
        await worker.close()
    finally:
        await proxy.aclose()
    assert not path.exists()


async def test_supervisor_restarts_an_exiting_worker_with_backoff(short_dir: Path) -> None:
    starts = short_dir / "starts"
    script = f"open({str(starts)!r}, 'a').write('x'); raise SystemExit(3)"
    supervisor = WorkerSupervisor(
        [sys.executable, "-c", script], backoff=(0.01, 0.04), reset_after=30
    )
    task = asyncio.get_running_loop().create_task(supervisor.run())
    try:
        async with asyncio.timeout(10):
            while supervisor.restarts < 3:  # noqa: ASYNC110 -- polling a plain counter
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert len(starts.read_text()) >= 3


async def test_supervisor_stops_its_worker_by_pid(short_dir: Path) -> None:
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    supervisor = WorkerSupervisor([sys.executable, "-c", script], stop_timeout=0.3)
    task = asyncio.get_running_loop().create_task(supervisor.run())
    try:
        async with asyncio.timeout(5):
            while supervisor.pid is None:  # noqa: ASYNC110 -- polling a plain attribute
                await asyncio.sleep(0.01)
        pid = supervisor.pid
        await asyncio.sleep(0.2)  # let it install its SIGTERM handler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert supervisor.restarts == 0
    assert supervisor.stats_pid() is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # SIGTERM was ignored, SIGKILL was not


async def test_stopping_agent_does_not_restart(short_dir: Path) -> None:
    supervisor = WorkerSupervisor([sys.executable, "-c", "pass"], backoff=(0.01, 0.01))
    supervisor.stopping = True
    await asyncio.wait_for(supervisor.run(), 5)
    assert supervisor.restarts == 0


async def test_worker_starts_with_the_first_snapshot_that_has_a_listener(
    short_dir: Path,
) -> None:
    source = Source()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    proxy = ProxyControl(short_dir / "proxy.sock", source.build, worker_command=sleeper)
    await proxy.start()
    try:
        await asyncio.sleep(0.1)
        assert proxy.supervisor is not None and proxy.supervisor.stats_pid() is None
        source.listener = True
        proxy.rebuild_now()
        async with asyncio.timeout(5):
            while proxy.supervisor.stats_pid() is None:  # noqa: ASYNC110 -- a plain attribute
                await asyncio.sleep(0.01)
    finally:
        await proxy.aclose()
    assert proxy.supervisor.stats_pid() is None


def test_worker_command() -> None:
    path = Path("/d/proxy.sock")
    assert worker_command(path, python="py") == [
        "py",
        "-m",
        "proxy",
        "--control",
        "/d/proxy.sock",
        "--exit-with-agent",
    ]
    assert worker_command(path, event_loop="asyncio", python="py")[-2:] == [
        "--event-loop",
        "asyncio",
    ]


@pytest.mark.slow
def managed_with_real_worker(path: Path, source: Source) -> ProxyControl:
    """A control socket at ``path`` supervising the real ``python -m proxy`` worker,
    started at once."""
    return ProxyControl(
        path,
        source.build,
        worker_command=worker_command(path, event_loop="asyncio"),
        start_worker_when_needed=False,
    )


async def test_real_worker_applies_and_reports(short_dir: Path) -> None:
    """The real ``python -m proxy --control`` worker, managed: it applies the snapshot,
    sends stats, and exits when the agent closes the socket."""
    source = Source()
    proxy = managed_with_real_worker(short_dir / "proxy.sock", source)
    await proxy.start()
    try:
        stats = await asyncio.wait_for(
            proxy.wait_for(lambda s: s.applied_version == 1 and s.dump is not None), 20
        )
        pid = stats.worker_pid
        assert pid is not None
        source.node = "n2"
        proxy.changed()
        await asyncio.wait_for(proxy.wait_for(lambda s: s.applied_version == 2), 5)
    finally:
        await proxy.aclose()
    assert proxy.stats().worker_restarts == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_a_data_dir_deeper_than_a_socket_address_still_gets_its_worker(
    short_dir: Path,
) -> None:
    """Nomad's alloc dirs are deep: a socket path over sun_path's 107 bytes is bound
    and connected to through a descriptor of its directory, by the agent and by the
    real worker."""
    deep = short_dir / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "proxy.sock"
    assert len(os.fsencode(path)) > 107
    proxy = managed_with_real_worker(path, Source())
    await proxy.start()
    try:
        assert path.is_socket() and (path.stat().st_mode & 0o777) == 0o600
        await asyncio.wait_for(proxy.wait_for(lambda s: s.applied_version == 1), 20)
    finally:
        await proxy.aclose()
    assert not path.exists()


@pytest.mark.slow
async def test_meshnode_proxy_command_connects_to_the_agent_socket(short_dir: Path) -> None:
    """``meshnode proxy -data-dir DIR`` execs the worker against ``DIR/proxy.sock``."""
    proxy = ProxyControl(short_dir / "proxy.sock", Source().build)
    await proxy.start()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshnode.cli",
        "proxy",
        "-data-dir",
        str(short_dir),
        "-event-loop",
        "asyncio",
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        await asyncio.wait_for(proxy.wait_for(lambda s: s.applied_version == 1), 20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await process.wait()
        await proxy.aclose()


@pytest.mark.slow
async def test_agent_pushes_registrations_and_policy_to_its_proxy(short_dir: Path) -> None:
    """A dev agent with ``proxy.managed = false``: a worker (the fake) gets a snapshot
    at hello, a new one when a service with upstreams registers and has its leaf, and
    another when an intention changes; the agent publishes its proxy port."""
    from meshnode.agent import Agent
    from meshnode.config import load_config
    from meshnode.model import parse_registration
    from meshnode.policy import parse_intention
    from meshnode.sidecar import proxy_port_of

    environ = {
        "MESHNODE_DEV": "true",
        "MESHNODE_DATA_DIR": str(short_dir / "d"),
        "MESHNODE_GOSSIP_PORT": "0",
        "MESHNODE_HTTP_ADDR": "127.0.0.1:0",
        "MESHNODE_PROXY__PORT": "0",
        "MESHNODE_PROXY__MANAGED": "false",
    }
    config = load_config({}, environ, cwd=short_dir, hostname="pc1")
    agent = Agent(config)
    up = asyncio.Event()
    run = asyncio.create_task(agent.run(ready=lambda _: up.set()))
    worker: FakeWorker | None = None
    try:
        async with asyncio.timeout(30):
            await up.wait()
            assert agent.proxy_port > 0
            assert proxy_port_of(agent.node_meta()) == agent.proxy_port
            worker = await FakeWorker.connect(short_dir / "d" / "proxy.sock")
            first = await worker.snapshot()
            assert first.upstreams == ()
            service, checks = parse_registration(
                {
                    "Name": "web",
                    "Port": 8080,
                    "Connect": {
                        "SidecarService": {
                            "Proxy": {
                                "Upstreams": [{"DestinationName": "api", "LocalBindPort": 15001}]
                            }
                        }
                    },
                }
            )
            agent.catalog.register_service(service, checks)
            agent.local_changed()
            while True:  # the leaf comes from the (local) leader, then the push
                snapshot = await worker.snapshot(within=20)
                if snapshot.upstreams and snapshot.inbound is not None:
                    break
            assert snapshot.upstreams[0].destination == "api"
            assert snapshot.inbound.port == agent.proxy_port
            assert snapshot.inbound.services["web"].default_allow  # --dev: allow
            intention = parse_intention(
                {"SourceName": "billing", "DestinationName": "web", "Action": "deny"}
            )
            await agent.write_policy(intention, None)
            while True:
                snapshot = await worker.snapshot(within=5)
                rules = snapshot.inbound.services["web"].intentions if snapshot.inbound else ()
                if rules:
                    break
            assert [(r.source, r.action) for r in rules] == [("billing", "deny")]
            control = agent.proxy_control
            assert control is not None
            worker.send("applied", snapshot.version)
            applied = snapshot.version
            await asyncio.wait_for(control.wait_for(lambda s: s.applied_version == applied), 5)
            proxy_stats = agent.self_info()["Stats"]
            assert isinstance(proxy_stats, dict)
            assert proxy_stats["proxy"]["applied_version"] == str(snapshot.version)
            assert proxy_stats["proxy"]["port"] == str(agent.proxy_port)
            agent.stop()
            await run
    finally:
        if worker is not None:
            await worker.close()
        if not run.done():
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run


_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
_json = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(
    st.dictionaries(
        st.sampled_from(["counters", "gauges", "histograms", "other"]), _json, max_size=4
    )
)
def test_any_dump_exports_without_raising(dump: dict[str, Any]) -> None:
    """A dump comes from another process: garbage is skipped, never raised."""
    registry = CollectorRegistry()
    register_proxy_metrics(registry, lambda: ProxyMetricsSource(0, 0, 0, dump))
    generate_latest(registry)


def test_malformed_series_are_skipped() -> None:
    dump = {
        "counters": [
            ["meshnode_proxy_retries_total", [["source", "web"]], 2],
            ["meshnode_proxy_retries_total", [["other", "x"]], 1],  # another label set
            ["not_ours_total", [], 1],
            ["meshnode_proxy_x_total", [["Bad-Label", "v"]], 1],
            ["meshnode_proxy_y_total", [], "many"],
            ["meshnode_proxy_worker_restarts_total", [], 99],  # the agent's own
        ],
        "histograms": [["meshnode_proxy_h", [], [0.1], [1], 0.05, 1]],  # counts too short
    }
    registry = CollectorRegistry()
    register_proxy_metrics(registry, lambda: ProxyMetricsSource(1, 0, 0, dump))
    text = generate_latest(registry).decode()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [
        "meshnode_proxy_worker_restarts_total 1.0",
        "meshnode_proxy_snapshot_version 0.0",
        "meshnode_proxy_snapshots_rejected_total 0.0",
        'meshnode_proxy_retries_total{source="web"} 2.0',
    ]
