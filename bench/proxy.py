"""Proxy benchmark: a proxy pair (client → proxy A → mutual TLS → proxy B → backend)
against no proxy at all and against HAProxy configured as the same pair (issue 5).

    .venv/bin/python bench/proxy.py                  # 3 rounds, 5 s per wrk run
    .venv/bin/python bench/proxy.py --duration 10 --rounds 5
    .venv/bin/python bench/proxy.py --quick          # 1 round, 1 s runs (smoke test)

What runs, all on loopback and on this machine's two shared cores:

* **backend**: HAProxy answering every request itself (``http-request return``) with a
  64-byte body, keep-alive, one thread. Against nginx 1.22 (one process, ``return
  200``), interleaved, wrk -t1 -c32, on this machine while another session kept a core
  busy: 34-76k req/s for nginx and 34-73k for HAProxy, 12.2-17.0 and 12.5-17.3 µs of
  backend CPU per request: no more of a bottleneck than nginx, and no package beyond
  the HAProxy the baseline needs anyway. Not a Python server (uvloop + httptools):
  httptools is no dependency here, and proxy-speed.md's per-request costs of Python
  data paths are above these. The backend's CPU per request is reported
  (``backend_cpu_us_per_req``) so every run shows what it took from the proxies;
* **configurations**, each started afresh for its turn and stopped after it, in
  ``--rounds`` interleaved rounds, the order rotated every round (this machine is
  shared: figures move ±20 % between rounds, so only a comparison inside one run
  means anything):

  - ``direct``: wrk → backend;
  - ``haproxy-l7``: wrk → HAProxy A (HTTP mode, plaintext on loopback, ``nbthread 1``,
    ``http-reuse always``) → mutual TLS 1.3 (ECDSA P-256 leaves with SPIFFE URI SANs,
    each side verifying the other against the throwaway CA; B requires a client
    certificate, checked at start by a client without one being refused) → HAProxy B
    (HTTP mode, ``nbthread 1``) → backend;
  - ``haproxy-l4``: the same pair in TCP mode;
  - ``meshnode-l4``: wrk → meshnode worker A (``python -m proxy --snapshot FILE``, an
    outbound listener: route, split, load balancer, breaker, metrics) → mutual TLS 1.3
    → worker B (the inbound port, SNI, intention check, metrics) → backend
    (:func:`start_meshnode_l4`, snapshots from :func:`meshnode_snapshots`);
  - ``meshnode-l7``: the same pair in HTTP mode (:func:`start_meshnode_l7`): worker A
    parses each request (route, split, pooled keep-alive mTLS connections to B),
    worker B authorizes each request (intention, rate limit) → backend.

Per configuration and round:

* **keep-alive throughput**: ``wrk -t1 -c32 -d<duration>s --latency`` (no Lua):
  req/s, p50/p99 latency, and the CPU of the proxy processes (utime + stime from
  ``/proc/<pid>/stat`` before and after) per request;
* **new connection per request**: the same with ``-H "Connection: close"``;
* **added latency at a fixed rate**: wrk cannot pace, so a small open-loop client
  here sends ``--rate`` req/s (2,000) over 8 keep-alive connections, each request
  released at its scheduled time whether or not earlier ones have returned (latency
  counts from the release, so waiting for a free connection is included);
  ``rate × duration`` requests, the first 200 not counted. ``added`` is the p50/p99
  minus that of ``direct`` in the same round;
* **memory**: ``VmRSS`` of each proxy process while 1,000 client connections are open
  and idle (each has made one request first, so it is a real, used connection).

Reported: medians over rounds; ``vs_haproxy`` is the ratio of req/s to the HAProxy
pair of the same mode (for ``direct``: to ``haproxy-l7``), ``vs_direct`` to ``direct``,
each computed within a round and then the median taken. It prints a table and, last,
one JSON line ``{"bench": "proxy", "configurations": {name: {"rps", "p50_us",
"p99_us", "cpu_us_per_req", "vs_haproxy", "vs_direct", ...}}, ...}``.

HAProxy and wrk come from Debian's packages; when missing, the benchmark runs
``apt-get update && apt-get install -y haproxy wrk`` (as root) and says so, or stops
with a message saying why it cannot. Every process it starts is stopped by its PID on
any exit (error, Ctrl-C, SIGTERM) and its temporary directory removed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common, ca

from bench.common import poll_until, run_benchmark
from ca.issuer import CertificateAuthority, generate_key, make_csr, private_key_pem
from ca.spiffe import SpiffeId
from proxy.snapshot import (
    AccessLog,
    Certificate,
    Cluster,
    Endpoint,
    Inbound,
    InboundTarget,
    IntentionRule,
    LocalService,
    ProtocolName,
    Route,
    Snapshot,
    SplitTarget,
    Upstream,
    encode,
)

TRUST_DOMAIN: Final = "bench.meshnode"
DATACENTER: Final = "dc1"
#: The response body: 64 bytes, as in the measurements of proxy-speed.md.
BODY: Final = b"0123456789abcdef" * 4
#: The one request every client here sends (wrk sends its own, of the same shape).
REQUEST: Final = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
#: Executable → the Debian package that provides it.
TOOLS: Final = {"haproxy": "haproxy", "wrk": "wrk"}
#: Where Debian puts haproxy; not always on a non-root PATH.
EXTRA_PATH: Final = "/usr/sbin:/usr/local/sbin:/sbin"
#: apt-get may wait this long for another apt on the machine to finish.
APT_LOCK_WAIT_S: Final = 120
APT_TIMEOUT_S: Final = 600
#: Keep-alive connections of the paced client: a handful, so a request rarely waits
#: for a free one at 2,000 req/s and ~0.5 ms latency.
PACED_CONNECTIONS: Final = 8
#: First paced requests not counted (connections, caches and TLS sessions warming up).
PACED_WARMUP: Final = 200
#: Idle connections are opened this many at a time.
OPEN_BATCH: Final = 50
#: HAProxy's connection limit, per process: above the 1,000 idle connections plus
#: wrk's 32, within the 20,000 descriptors a process may have here (2 per connection).
HAPROXY_MAXCONN: Final = 4096
#: Bounds on every wait, so a broken configuration fails the bench instead of hanging it.
START_WITHIN_S: Final = 10.0
STOP_WITHIN_S: Final = 3.0
REQUEST_WITHIN_S: Final = 5.0
#: Targets of issue 5 for a candidate pair, relative to the HAProxy pair of its mode.
TARGET_RPS_RATIO: Final = 1.0
TARGET_CLOSE_RATIO: Final = 0.7
TARGET_RSS_MB: Final = 60.0
NOT_BUILT_MESSAGE: Final = "meshnode pair: not built yet (issue 5)"

CLOCK_TICKS_PER_S: Final = os.sysconf("SC_CLK_TCK")

# ---------------------------------------------------------------------------- tools


class ToolsUnavailable(RuntimeError):
    """haproxy or wrk is missing and cannot be installed here; the message says why."""


@dataclass(frozen=True, slots=True)
class Tools:
    haproxy: str
    wrk: str
    haproxy_version: str
    wrk_version: str


def _which(executable: str) -> str | None:
    return shutil.which(executable, path=os.environ.get("PATH", "") + ":" + EXTRA_PATH)


def _apt_get(*arguments: str) -> None:
    command = ["apt-get", "-o", f"DPkg::Lock::Timeout={APT_LOCK_WAIT_S}", *arguments]
    print("bench/proxy.py: running", " ".join(command), flush=True)
    try:
        done = subprocess.run(
            command,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=APT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ToolsUnavailable(f"{' '.join(command)} took over {APT_TIMEOUT_S} s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise ToolsUnavailable(f"{' '.join(command)} failed (exit {done.returncode}):\n{tail}")


def _version(argv: list[str], pattern: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    found = re.search(pattern, done.stdout + done.stderr)
    return found.group(1) if found else "unknown"


def ensure_tools() -> Tools:
    """haproxy and wrk, installed from Debian's packages first if missing.

    Raises :class:`ToolsUnavailable` when they are missing and this machine cannot
    install them (no apt-get, not root, or apt-get failed)."""
    missing = sorted({package for exe, package in TOOLS.items() if _which(exe) is None})
    if missing:
        wanted = " ".join(missing)
        if shutil.which("apt-get") is None:
            raise ToolsUnavailable(f"{wanted} not installed and no apt-get to install it")
        if os.geteuid() != 0:
            raise ToolsUnavailable(
                f"{wanted} not installed; installing needs root: apt-get install -y {wanted}"
            )
        print(f"bench/proxy.py: {wanted} missing: installing from Debian's packages", flush=True)
        _apt_get("update")
        _apt_get("install", "-y", *missing)
    haproxy, wrk = _which("haproxy"), _which("wrk")
    if haproxy is None or wrk is None:
        raise ToolsUnavailable("apt-get succeeded but haproxy or wrk is still not on PATH")
    if missing:
        print(f"bench/proxy.py: installed {' '.join(missing)}", flush=True)
    return Tools(
        haproxy=haproxy,
        wrk=wrk,
        haproxy_version=_version([haproxy, "-v"], r"version (\S+)"),
        wrk_version=_version([wrk, "-v"], r"wrk (?:debian/)?(\S+)"),
    )


# ---------------------------------------------------------------------------- certificates


@dataclass(frozen=True, slots=True)
class Identity:
    """A SPIFFE leaf in files: separate PEMs, and ``bundle`` (chain then key) as
    HAProxy's ``crt`` wants it."""

    spiffe_id: str
    cert: Path
    key: Path
    bundle: Path


@dataclass(frozen=True, slots=True)
class Certificates:
    ca: Path
    client: Identity
    backend: Identity


def make_certificates(directory: Path) -> Certificates:
    """A throwaway CA (ECDSA P-256) and two SPIFFE leaves signed through the real
    ``sign_csr`` path: serverAuth + clientAuth, URI SAN, empty subject."""
    now = datetime.now(UTC)
    authority = CertificateAuthority.create_root(TRUST_DOMAIN, now)
    ca_path = directory / "ca.pem"
    ca_path.write_text(authority.active_root.cert_pem)

    def leaf(service: str) -> Identity:
        spiffe_id = SpiffeId.service(TRUST_DOMAIN, DATACENTER, service)
        key = generate_key()
        signed = authority.sign_csr(
            make_csr(key, spiffe_id), expected=spiffe_id, registered=True, now=now
        )
        paths = [directory / f"{service}.{suffix}" for suffix in ("crt", "key", "pem")]
        paths[0].write_text(signed.chain_pem)
        paths[1].write_text(private_key_pem(key))
        paths[2].write_text(signed.chain_pem + private_key_pem(key))
        for path in paths[1:]:
            path.chmod(0o600)
        return Identity(spiffe_id.uri, *paths)

    return Certificates(ca_path, leaf("client"), leaf("backend"))


# ---------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _open_log(path: Path) -> IO[bytes]:
    return path.open("ab")


def _log_tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


async def _accepts(address: tuple[str, int]) -> bool:
    try:
        _, writer = await asyncio.open_connection(*address)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


class Processes:
    """The processes of one configuration (or the backend): started here, stopped by
    PID in :meth:`stop_all`, which the harness calls in a ``finally``."""

    def __init__(self, workdir: Path, label: str) -> None:
        self._workdir = workdir
        self._label = label
        self._started: list[tuple[str, asyncio.subprocess.Process, Path]] = []

    async def spawn(self, name: str, argv: Sequence[str], listens: tuple[str, int]) -> int:
        """Start ``argv`` (output to a log file) and wait until it accepts on
        ``listens``; its PID."""
        log_path = self._workdir / f"{self._label}-{name}.log"
        log = _open_log(log_path)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            log.close()
        self._started.append((name, process, log_path))

        async def ready() -> bool:
            if process.returncode is not None:
                raise RuntimeError(
                    f"{self._label}/{name} exited ({process.returncode}):\n{_log_tail(log_path)}"
                )
            return await _accepts(listens)

        try:
            await poll_until(
                ready, START_WITHIN_S, f"{self._label}/{name} on {listens}", every=0.02
            )
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{_log_tail(log_path)}") from None
        return process.pid

    def log_tails(self) -> str:
        return "\n".join(f"--- {name}\n{_log_tail(path)}" for name, _, path in self._started)

    async def stop_all(self) -> None:
        """SIGTERM each by PID, SIGKILL after STOP_WITHIN_S, and reap."""
        while self._started:
            _, process, _ = self._started.pop()
            if process.returncode is None:
                process.terminate()
                try:
                    async with asyncio.timeout(STOP_WITHIN_S):
                        await process.wait()
                except TimeoutError:
                    process.kill()
                    await process.wait()


# ---------------------------------------------------------------------------- registry


@dataclass(frozen=True, slots=True)
class Environment:
    """What a configuration's start function gets."""

    workdir: Path
    tools: Tools
    certificates: Certificates
    backend: tuple[str, int]
    processes: Processes
    """Start every process through it: the harness stops them after the turn."""


@dataclass(frozen=True, slots=True)
class Listening:
    """What a start function returns: where wrk and the clients connect, and the
    processes whose CPU and memory are the configuration's cost."""

    address: tuple[str, int]
    proxy_pids: tuple[int, ...]
    inbound: tuple[str, int] | None = None
    """B's mTLS port, for a pair: the harness checks that a client without a
    certificate gets no answer there."""


StartFunction = Callable[[Environment], Awaitable[Listening]]


@dataclass(frozen=True, slots=True)
class Configuration:
    name: str
    mode: str
    """``direct``, ``l7`` or ``l4``: a pair is compared with the HAProxy pair of its mode."""
    role: str
    """``direct``, ``reference`` (the HAProxy pairs) or ``candidate`` (checked against
    the targets of issue 5)."""
    description: str
    start: StartFunction


#: name → configuration, in table order. The meshnode pair goes here when proxy/ has
#: a data path, e.g.::
#:
#:     register(Configuration("meshnode-l7", "l7", "candidate",
#:                            "meshnode pair, HTTP/1.1", start_meshnode_pair_l7))
#:
#: where ``start_meshnode_pair_l7(env)`` spawns proxy A and B through
#: ``env.processes.spawn`` with ``env.certificates`` and ``env.backend``, and returns
#: ``Listening(A's outbound address, (A's pid, B's pid))``.
CONFIGURATIONS: dict[str, Configuration] = {}
#: The HAProxy pair each mode is compared with.
REFERENCE_FOR_MODE: Final = {"direct": "haproxy-l7", "l7": "haproxy-l7", "l4": "haproxy-l4"}
#: Configurations of issue 5 that have no start function yet; printed as such.
NOT_BUILT: Final = ("meshnode-l7", "meshnode-l4")


def register(configuration: Configuration) -> None:
    if configuration.name in CONFIGURATIONS:
        raise ValueError(f"configuration {configuration.name!r} registered twice")
    CONFIGURATIONS[configuration.name] = configuration


async def start_direct(env: Environment) -> Listening:
    return Listening(env.backend, ())


def _haproxy_global(mode: str) -> str:
    lines = [
        "global",
        "  nbthread 1",
        f"  maxconn {HAPROXY_MAXCONN}",
        "defaults",
        f"  mode {'http' if mode == 'l7' else 'tcp'}",
        "  timeout connect 5s",
        "  timeout client 120s",
        "  timeout server 120s",
    ]
    if mode == "l7":
        lines += ["  timeout http-keep-alive 120s", "  http-reuse always"]
    return "\n".join(lines) + "\n"


def _haproxy_pair_configs(env: Environment, mode: str, port_a: int, port_b: int) -> tuple[str, str]:
    certs = env.certificates
    tls_common = f"ca-file {certs.ca} verify required ssl-min-ver TLSv1.3"
    config_a = _haproxy_global(mode) + (
        "frontend outbound\n"
        f"  bind 127.0.0.1:{port_a}\n"
        "  default_backend peer\n"
        "backend peer\n"
        f"  server b 127.0.0.1:{port_b} ssl crt {certs.client.bundle} {tls_common}\n"
    )
    config_b = _haproxy_global(mode) + (
        "frontend inbound\n"
        f"  bind 127.0.0.1:{port_b} ssl crt {certs.backend.bundle} {tls_common}\n"
        "  default_backend local\n"
        "backend local\n"
        f"  server app {env.backend[0]}:{env.backend[1]}\n"
    )
    return config_a, config_b


async def _start_haproxy_pair(env: Environment, mode: str) -> Listening:
    port_a, port_b = free_port(), free_port()
    config_a, config_b = _haproxy_pair_configs(env, mode, port_a, port_b)
    paths = []
    for name, text in (("a", config_a), ("b", config_b)):
        path = env.workdir / f"haproxy-{mode}-{name}.cfg"
        path.write_text(text)
        paths.append(path)
    pid_b = await env.processes.spawn(
        "haproxy-b", [env.tools.haproxy, "-db", "-f", str(paths[1])], ("127.0.0.1", port_b)
    )
    pid_a = await env.processes.spawn(
        "haproxy-a", [env.tools.haproxy, "-db", "-f", str(paths[0])], ("127.0.0.1", port_a)
    )
    return Listening(("127.0.0.1", port_a), (pid_a, pid_b), inbound=("127.0.0.1", port_b))


async def start_haproxy_l7(env: Environment) -> Listening:
    return await _start_haproxy_pair(env, "l7")


async def start_haproxy_l4(env: Environment) -> Listening:
    return await _start_haproxy_pair(env, "l4")


register(Configuration("direct", "direct", "direct", "wrk → backend", start_direct))
register(
    Configuration(
        "haproxy-l7",
        "l7",
        "reference",
        "HAProxy pair, HTTP mode, http-reuse always, mTLS 1.3 between",
        start_haproxy_l7,
    )
)
register(
    Configuration(
        "haproxy-l4",
        "l4",
        "reference",
        "HAProxy pair, TCP mode, mTLS 1.3 between",
        start_haproxy_l4,
    )
)


#: How a meshnode proxy worker is started: ``python -m proxy`` with the repository
#: first on its path, whatever the working directory (run from ``bench/``, ``-m proxy``
#: would find this file).
MESHNODE_WORKER: Final = (
    sys.executable,
    "-c",
    f"import runpy, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r});"
    " runpy.run_module('proxy', run_name='__main__', alter_sys=True)",
)


def meshnode_snapshots(
    env: Environment, port_a: int, port_b: int, protocol: ProtocolName = "tcp"
) -> tuple[Snapshot, Snapshot]:
    """Worker A's snapshot (an outbound listener on loopback, source ``client``,
    upstream ``backend`` at worker B) and worker B's (the inbound port, SNI
    ``backend``, the one intention client → backend so the check runs, default deny,
    → the backend). Access logs off: the figures are the data path's."""
    certs = env.certificates
    bundle = (certs.ca.read_text(),)
    quiet = AccessLog(path="off")
    backend = LocalService(
        "backend",
        Certificate(
            certs.backend.cert.read_text(), certs.backend.key.read_text(), certs.backend.spiffe_id
        ),
        protocol,
        intentions=(IntentionRule("client", "allow", "client => backend"),),
    )
    target = InboundTarget("backend", (env.backend,))
    inbound = Inbound("127.0.0.1", port_b, {"backend": backend}, {"backend": target})
    snapshot_b = Snapshot(1, TRUST_DOMAIN, bundle, inbound=inbound, access_log=quiet)
    cluster = Cluster(
        "backend",
        "backend",
        certs.backend.spiffe_id,
        (Endpoint("127.0.0.1", port_b, "backend"),),
    )
    upstream = Upstream(
        "client",
        "backend",
        "127.0.0.1",
        port_a,
        Certificate(
            certs.client.cert.read_text(), certs.client.key.read_text(), certs.client.spiffe_id
        ),
        (Route("backend/default", (SplitTarget(10_000, "backend"),)),),
        {"backend": cluster},
        protocol,
    )
    snapshot_a = Snapshot(1, TRUST_DOMAIN, bundle, upstreams=(upstream,), access_log=quiet)
    return snapshot_a, snapshot_b


async def start_meshnode_pair(
    env: Environment, protocol: ProtocolName = "tcp", event_loop: str = "uvloop"
) -> Listening:
    """Two ``python -m proxy --snapshot FILE`` workers (see :func:`meshnode_snapshots`)."""
    port_a, port_b = free_port(), free_port()
    snapshot_a, snapshot_b = meshnode_snapshots(env, port_a, port_b, protocol)
    pids = []
    for name, snapshot, port in (("b", snapshot_b, port_b), ("a", snapshot_a, port_a)):
        path = env.workdir / f"meshnode-{protocol}-{name}.snapshot"
        path.touch(0o600)  # private keys
        path.write_bytes(encode(snapshot))
        argv = [*MESHNODE_WORKER, "--snapshot", str(path), "--event-loop", event_loop]
        pids.append(await env.processes.spawn(f"meshnode-{name}", argv, ("127.0.0.1", port)))
    return Listening(("127.0.0.1", port_a), (pids[1], pids[0]), inbound=("127.0.0.1", port_b))


async def start_meshnode_l4(env: Environment, event_loop: str = "uvloop") -> Listening:
    """Worker A: an outbound listener on loopback → mTLS → worker B: the inbound
    port, SNI, intention check → the backend, in TCP mode."""
    return await start_meshnode_pair(env, "tcp", event_loop)


register(
    Configuration(
        "meshnode-l4",
        "l4",
        "candidate",
        "meshnode pair, TCP (python -m proxy workers, uvloop), mTLS 1.3 between",
        start_meshnode_l4,
    )
)


async def start_meshnode_l7(env: Environment) -> Listening:
    """The pair in HTTP mode: worker A parses requests (route, split, pooled keep-alive
    mTLS connections to B), worker B authorizes each request (intention, rate limit)."""
    return await start_meshnode_pair(env, "http")


register(
    Configuration(
        "meshnode-l7",
        "l7",
        "candidate",
        "meshnode pair, HTTP/1.1 (python -m proxy workers, uvloop), pooled mTLS 1.3 between",
        start_meshnode_l7,
    )
)


async def start_meshnode_l4_asyncio(env: Environment) -> Listening:
    """The same pair on asyncio's own loop (uvloop's TLS memory growth, uvloop#565)."""
    return await start_meshnode_l4(env, "asyncio")


register(
    Configuration(
        "meshnode-l4-asyncio",
        "l4",
        "candidate",
        "the same meshnode TCP pair on asyncio's default loop",
        start_meshnode_l4_asyncio,
    )
)


# ---------------------------------------------------------------------------- clients


class HttpClient(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request in flight; just
    enough parsing for the backend's fixed responses (status line, Content-Length)."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[float] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is None or self._waiter.done():
            return
        header_end = self._buffer.find(b"\r\n\r\n")
        if header_end < 0:
            return
        found = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", self._buffer[:header_end])
        length = int(found.group(1)) if found else 0
        end = header_end + 4 + length
        if len(self._buffer) < end:
            return
        ok = self._buffer.startswith(b"HTTP/1.1 200")
        del self._buffer[:end]
        if ok:
            self._waiter.set_result(time.perf_counter())
        else:
            self._waiter.set_exception(RuntimeError("response other than 200"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection closed before the response"))

    async def request(self) -> float:
        """Send :data:`REQUEST`; when (``perf_counter``) its response was complete."""
        assert self._transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(REQUEST)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def open_client(address: tuple[str, int]) -> HttpClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(HttpClient, *address)
    return client


async def check_response(address: tuple[str, int]) -> None:
    """One request through the configuration: a 200 with the 64-byte body, or raise."""
    async with asyncio.timeout(REQUEST_WITHIN_S):
        reader, writer = await asyncio.open_connection(*address)
        try:
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            found = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            body = await reader.readexactly(int(found.group(1))) if found else b""
        finally:
            writer.close()
    if not head.startswith(b"HTTP/1.1 200") or body != BODY:
        raise RuntimeError(f"{address}: unexpected response {head[:60]!r} {body[:70]!r}")


async def check_client_certificate_required(
    address: tuple[str, int], certificates: Certificates
) -> None:
    """A TLS 1.3 client that trusts the CA but has no certificate must get no response
    from ``address`` (the inbound side of a pair), or raise."""
    context = ssl.create_default_context(cafile=str(certificates.ca))
    context.check_hostname = False
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    answer = b""
    try:
        async with asyncio.timeout(REQUEST_WITHIN_S):
            reader, writer = await asyncio.open_connection(*address, ssl=context)
            try:
                writer.write(REQUEST)
                answer = await reader.read(64)
            finally:
                writer.close()
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
        return  # refused, as it must be (TLS 1.3 reports it after the handshake)
    if answer:
        raise RuntimeError(f"{address} answered a client without a certificate: {answer!r}")


def _percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest rank."""
    index = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


async def paced_run(address: tuple[str, int], rate: float, total: int) -> dict[str, float]:
    """Open loop: request ``i`` is released at ``start + i / rate`` on a free connection
    of :data:`PACED_CONNECTIONS`; its latency runs from its release to its response.
    The loop's timers have ~1 ms resolution, so requests leave in small bursts; the
    same for every configuration, and ``direct`` is measured at the same rate."""
    loop = asyncio.get_running_loop()
    clients: list[HttpClient] = []
    latencies: list[float] = []
    free: asyncio.Queue[HttpClient] = asyncio.Queue()

    async def one(client: HttpClient, released: float, counted: bool) -> None:
        done = await client.request()
        if counted:
            latencies.append(done - released)
        free.put_nowait(client)

    try:
        async with asyncio.timeout(3 * total / rate + 30):
            for _ in range(PACED_CONNECTIONS):
                clients.append(await open_client(address))
                free.put_nowait(clients[-1])
            start = loop.time() + 0.01
            async with asyncio.TaskGroup() as group:
                for index in range(total):
                    delay = start + index / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    released = time.perf_counter()
                    client = await free.get()
                    group.create_task(one(client, released, index >= PACED_WARMUP))
    except* (OSError, RuntimeError) as failures:
        raise RuntimeError(f"paced client: {failures.exceptions[0]!r}") from None
    finally:
        for client in clients:
            client.close()
    latencies.sort()
    return {
        "p50_us": _percentile(latencies, 0.50) * 1e6,
        "p99_us": _percentile(latencies, 0.99) * 1e6,
        "achieved_rps": total / (loop.time() - start),
    }


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (proc(5): fields 14 and 15, after the command name)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def rss_with_open_connections(
    address: tuple[str, int], pids: Sequence[int], count: int
) -> list[float]:
    """VmRSS (MB) of each of ``pids`` while ``count`` used, idle connections are open."""
    clients: list[HttpClient] = []

    async def open_and_use() -> None:
        client = await open_client(address)
        clients.append(client)
        await client.request()

    try:
        async with asyncio.timeout(60):
            for first in range(0, count, OPEN_BATCH):
                async with asyncio.TaskGroup() as group:
                    for _ in range(min(OPEN_BATCH, count - first)):
                        group.create_task(open_and_use())
            await asyncio.sleep(0.3)  # let the proxies settle their buffers
            return [rss_mb(pid) for pid in pids]
    except* (OSError, RuntimeError) as failures:
        raise RuntimeError(
            f"connection {len(clients)} of {count}: {failures.exceptions[0]!r}"
        ) from None
    finally:
        for client in clients:
            client.close()


# ---------------------------------------------------------------------------- wrk


_UNIT_US: Final = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def parse_wrk(output: str) -> dict[str, float]:
    """Figures of ``wrk --latency`` output: rps, requests, p50/p99 (µs), errors."""

    def number(pattern: str) -> re.Match[str]:
        found = re.search(pattern, output, re.MULTILINE)
        if found is None:
            raise RuntimeError(f"wrk output without {pattern!r}:\n{output}")
        return found

    figures: dict[str, float] = {
        "rps": float(number(r"^Requests/sec:\s+([\d.]+)").group(1)),
        "requests": float(number(r"^\s*(\d+) requests in").group(1)),
    }
    for percent in (50, 99):
        found = number(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m|h)\s*$")
        figures[f"p{percent}_us"] = float(found.group(1)) * _UNIT_US[found.group(2)]
    errors = 0
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(count) for count in socket_errors.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    figures["errors"] = errors
    return figures


async def run_wrk(
    tools: Tools,
    address: tuple[str, int],
    *,
    seconds: int,
    connections: int,
    close: bool,
    sampled_pids: Sequence[int],
) -> dict[str, Any]:
    """One wrk run (1 thread: the machine has 2 cores) and the CPU seconds each of
    ``sampled_pids`` spent meanwhile."""
    argv = [tools.wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{address[0]}:{address[1]}/")
    before = [cpu_seconds(pid) for pid in sampled_pids]
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(seconds + 30):
            output, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    after = [cpu_seconds(pid) for pid in sampled_pids]
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"wrk exited {process.returncode}:\n{text}")
    figures: dict[str, Any] = dict(parse_wrk(text))
    figures["cpu_s"] = [end - begin for begin, end in zip(before, after, strict=True)]
    return figures


# ---------------------------------------------------------------------------- harness


@dataclass(frozen=True, slots=True)
class Options:
    rounds: int
    duration: int
    connections: int
    rate: float
    paced_requests: int
    idle_connections: int
    names: tuple[str, ...]


@dataclass(slots=True)
class RoundFigures:
    """One configuration's raw figures in one round."""

    keep_alive: dict[str, Any]
    close: dict[str, Any]
    paced: dict[str, float]
    rss_mb: list[float]
    proxies: int
    backend_cpu_us_per_req: float


def _cpu_us_per_request(cpu_s: Sequence[float], requests: float) -> float | None:
    return sum(cpu_s) / requests * 1e6 if cpu_s and requests else None


async def measure(
    configuration: Configuration, env: Environment, backend_pid: int, options: Options
) -> RoundFigures:
    listening = await configuration.start(env)
    await check_response(listening.address)
    if listening.inbound is not None:
        await check_client_certificate_required(listening.inbound, env.certificates)
    sampled = (*listening.proxy_pids, backend_pid)
    keep_alive = await run_wrk(
        env.tools,
        listening.address,
        seconds=options.duration,
        connections=options.connections,
        close=False,
        sampled_pids=sampled,
    )
    close = await run_wrk(
        env.tools,
        listening.address,
        seconds=options.duration,
        connections=options.connections,
        close=True,
        sampled_pids=sampled,
    )
    paced = await paced_run(listening.address, options.rate, options.paced_requests)
    memory = (
        await rss_with_open_connections(
            listening.address, listening.proxy_pids, options.idle_connections
        )
        if listening.proxy_pids
        else []
    )
    return RoundFigures(
        keep_alive=keep_alive,
        close=close,
        paced=paced,
        rss_mb=memory,
        proxies=len(listening.proxy_pids),
        backend_cpu_us_per_req=keep_alive["cpu_s"][-1] / keep_alive["requests"] * 1e6,
    )


def _median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _proxy_cpu_us_per_request(figures: RoundFigures, run: str) -> float | None:
    measured = getattr(figures, run)
    return _cpu_us_per_request(measured["cpu_s"][: figures.proxies], measured["requests"])


def _rps_ratio(
    figures: dict[str, RoundFigures], name: str, other: str, run: str = "keep_alive"
) -> float | None:
    if other not in figures:
        return None
    return _ratio(getattr(figures[name], run)["rps"], getattr(figures[other], run)["rps"])


def _added_latency(figures: dict[str, RoundFigures], name: str, percentile: str) -> float | None:
    if name == "direct" or "direct" not in figures:
        return None
    return figures[name].paced[percentile] - figures["direct"].paced[percentile]


def summarize_configuration(name: str, rounds: list[dict[str, RoundFigures]]) -> dict[str, Any]:
    """Medians over rounds; ratios and added latencies are taken within each round
    (against figures measured under the same load), then their median."""
    reference = REFERENCE_FOR_MODE[CONFIGURATIONS[name].mode]
    per_round = [figures[name] for figures in rounds]

    def median(values: list[float | None], digits: int) -> float | None:
        return _rounded(_median(values), digits)

    return {
        "rps": median([f.keep_alive["rps"] for f in per_round], 0),
        "p50_us": median([f.keep_alive["p50_us"] for f in per_round], 0),
        "p99_us": median([f.keep_alive["p99_us"] for f in per_round], 0),
        "cpu_us_per_req": median(
            [_proxy_cpu_us_per_request(f, "keep_alive") for f in per_round], 1
        ),
        "vs_haproxy": median([_rps_ratio(f, name, reference) for f in rounds], 3),
        "vs_direct": median([_rps_ratio(f, name, "direct") for f in rounds], 3),
        "rps_rounds": [round(f.keep_alive["rps"]) for f in per_round],
        "close_rps": median([f.close["rps"] for f in per_round], 0),
        "close_cpu_us_per_req": median(
            [_proxy_cpu_us_per_request(f, "close") for f in per_round], 1
        ),
        "close_vs_haproxy": median([_rps_ratio(f, name, reference, "close") for f in rounds], 3),
        "paced_p50_us": median([f.paced["p50_us"] for f in per_round], 0),
        "paced_p99_us": median([f.paced["p99_us"] for f in per_round], 0),
        "paced_rps": median([f.paced["achieved_rps"] for f in per_round], 0),
        "added_p50_us": median([_added_latency(f, name, "p50_us") for f in rounds], 0),
        "added_p99_us": median([_added_latency(f, name, "p99_us") for f in rounds], 0),
        "rss_mb": median([max(f.rss_mb) if f.rss_mb else None for f in per_round], 1),
        "rss_mb_per_process": [
            median([f.rss_mb[i] for f in per_round], 1) for i in range(per_round[0].proxies)
        ],
        "backend_cpu_us_per_req": median([f.backend_cpu_us_per_req for f in per_round], 1),
        "errors": sum(f.keep_alive["errors"] for f in per_round),
        "close_errors": sum(f.close["errors"] for f in per_round),
    }


def check_targets(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, bool | None]]:
    """Issue 5's targets for every candidate, against the HAProxy pair of its mode."""
    checks: dict[str, dict[str, bool | None]] = {}

    def at_most(mine: float | None, limit: float | None) -> bool | None:
        return None if mine is None or limit is None else mine <= limit

    def at_least(mine: float | None, limit: float) -> bool | None:
        return None if mine is None else mine >= limit

    for name, figures in summary.items():
        if CONFIGURATIONS[name].role != "candidate":
            continue
        reference = summary.get(REFERENCE_FOR_MODE[CONFIGURATIONS[name].mode], {})
        checks[name] = {
            "throughput": at_least(figures["vs_haproxy"], TARGET_RPS_RATIO),
            "added_p50": at_most(figures["added_p50_us"], reference.get("added_p50_us")),
            "added_p99": at_most(figures["added_p99_us"], reference.get("added_p99_us")),
            "cpu": at_most(figures["cpu_us_per_req"], reference.get("cpu_us_per_req")),
            "new_connection": at_least(figures["close_vs_haproxy"], TARGET_CLOSE_RATIO),
            "memory": at_most(figures["rss_mb"], TARGET_RSS_MB),
        }
    return checks


async def start_backend(workdir: Path, tools: Tools, processes: Processes) -> tuple[int, int]:
    """HAProxy answering every request itself with :data:`BODY`; its (port, pid)."""
    port = free_port()
    config = workdir / "backend.cfg"
    config.write_text(
        "global\n"
        "  nbthread 1\n"
        f"  maxconn {HAPROXY_MAXCONN}\n"
        "defaults\n"
        "  mode http\n"
        "  timeout client 120s\n"
        "  timeout http-keep-alive 120s\n"
        "frontend app\n"
        f"  bind 127.0.0.1:{port}\n"
        "  http-request return status 200 content-type text/plain"
        f' string "{BODY.decode()}"\n'
    )
    pid = await processes.spawn(
        "backend", [tools.haproxy, "-db", "-f", str(config)], ("127.0.0.1", port)
    )
    return port, pid


async def run(options: Options, tools: Tools, workdir: Path) -> dict[str, Any]:
    certificates = make_certificates(workdir)
    backend_processes = Processes(workdir, "backend")
    rounds: list[dict[str, RoundFigures]] = []
    try:
        port, backend_pid = await start_backend(workdir, tools, backend_processes)
        await check_response(("127.0.0.1", port))
        for round_index in range(options.rounds):
            shift = round_index % len(options.names)
            order = options.names[shift:] + options.names[:shift]
            figures: dict[str, RoundFigures] = {}
            for name in order:
                processes = Processes(workdir, f"{name}-r{round_index}")
                env = Environment(workdir, tools, certificates, ("127.0.0.1", port), processes)
                try:
                    figures[name] = await measure(CONFIGURATIONS[name], env, backend_pid, options)
                except RuntimeError as exc:
                    raise RuntimeError(f"{name}, round {round_index + 1}: {exc}") from None
                finally:
                    await processes.stop_all()
                print(
                    f"round {round_index + 1}/{options.rounds} {name}: "
                    f"{figures[name].keep_alive['rps']:,.0f} req/s",
                    file=sys.stderr,
                    flush=True,
                )
            rounds.append(figures)
    finally:
        await backend_processes.stop_all()
    summary = {name: summarize_configuration(name, rounds) for name in options.names}
    return {
        "bench": "proxy",
        "rounds": options.rounds,
        "duration_s": options.duration,
        "connections": options.connections,
        "paced_rate": options.rate,
        "paced_requests": options.paced_requests,
        "idle_connections": options.idle_connections,
        "haproxy": tools.haproxy_version,
        "wrk": tools.wrk_version,
        "backend": "haproxy http-request return, 64-byte body, nbthread 1",
        "configurations": summary,
        "not_built": [name for name in NOT_BUILT if name not in CONFIGURATIONS],
        "targets": check_targets(summary),
    }


# ---------------------------------------------------------------------------- output


def _cell(value: Any, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict[str, Any]) -> None:
    configurations: dict[str, dict[str, Any]] = results["configurations"]
    print(
        f"\nproxy pair benchmark: {results['rounds']} interleaved rounds, medians; "
        f"wrk {results['wrk']} -t1 -c{results['connections']} -d{results['duration_s']}s; "
        f"HAProxy {results['haproxy']}; backend: {results['backend']}"
    )
    for name in configurations:
        print(f"  {name}: {CONFIGURATIONS[name].description}")
    if results["not_built"]:
        print(f"{NOT_BUILT_MESSAGE}; not measured: {', '.join(results['not_built'])}")
    header = (
        f"{'configuration':<13} {'req/s':>9} {'per round':<24} {'p50 µs':>7} {'p99 µs':>7}"
        f" {'CPU µs/req':>10} {'vs HAProxy':>10} {'vs direct':>9} {'backend µs/req':>14}"
    )
    print("\nkeep-alive, 64-byte bodies\n" + header)
    for name, f in configurations.items():
        spread = "/".join(f"{rps / 1000:.1f}k" for rps in f["rps_rounds"])
        print(
            f"{name:<13} {_cell(f['rps']):>9} {spread:<24} {_cell(f['p50_us']):>7}"
            f" {_cell(f['p99_us']):>7} {_cell(f['cpu_us_per_req'], '.1f'):>10}"
            f" {_cell(f['vs_haproxy'], '.2f'):>10} {_cell(f['vs_direct'], '.2f'):>9}"
            f" {_cell(f['backend_cpu_us_per_req'], '.1f'):>14}"
        )
    rate = f"{results['paced_rate']:,.0f}"
    idle = f"{results['idle_connections']:,}"
    header = (
        f"{'configuration':<13} {'p50 µs':>7} {'p99 µs':>7} {'added p50':>9} {'added p99':>9}"
        f" {'close req/s':>11} {'vs HAProxy':>10} {'CPU µs/req':>10} {'RSS MB':>13}"
    )
    print(
        f"\npaced {rate} req/s ({results['paced_requests']:,} requests); new connection per"
        f" request (Connection: close); RSS per proxy with {idle} idle connections\n" + header
    )
    for name, f in configurations.items():
        memory = "/".join(_cell(mb, ".1f") for mb in f["rss_mb_per_process"]) or "-"
        print(
            f"{name:<13} {_cell(f['paced_p50_us']):>7} {_cell(f['paced_p99_us']):>7}"
            f" {_cell(f['added_p50_us'], '+,.0f'):>9} {_cell(f['added_p99_us'], '+,.0f'):>9}"
            f" {_cell(f['close_rps']):>11} {_cell(f['close_vs_haproxy'], '.2f'):>10}"
            f" {_cell(f['close_cpu_us_per_req'], '.1f'):>10} {memory:>13}"
        )
    errors = {
        name: (f["errors"], f["close_errors"])
        for name, f in configurations.items()
        if f["errors"] or f["close_errors"]
    }
    if errors:
        print(f"\nwrk errors (keep-alive, close) per configuration: {errors}")
    for name, checks in results["targets"].items():
        shown = ", ".join(f"{target} {'met' if ok else 'MISSED'}" for target, ok in checks.items())
        print(f"targets of issue 5, {name}: {shown}")
    if not results["targets"]:
        print("\ntargets of issue 5: nothing to check, no meshnode pair is registered")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3)")
    parser.add_argument("--duration", type=int, default=None, help="seconds per wrk run (5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--rate", type=float, default=2000.0, help="paced req/s (2,000)")
    parser.add_argument(
        "--idle-connections", type=int, default=None, help="open while RSS is read (1,000)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(CONFIGURATIONS),
        help="measure this configuration (repeatable); direct and the HAProxy pair of its"
        " mode are always added, for the ratios",
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s runs (smoke test)")
    options = parser.parse_args(argv)
    rounds = options.rounds or (1 if options.quick else 3)
    duration = options.duration or (1 if options.quick else 5)
    idle = options.idle_connections or (200 if options.quick else 1000)
    if not 1 <= rounds <= 20:
        parser.error("--rounds must be between 1 and 20")
    if not 1 <= duration <= 120:
        parser.error("--duration must be between 1 and 120 seconds")
    if not 1 <= options.connections <= 1000:
        parser.error("--connections must be between 1 and 1,000")
    if not 10 <= options.rate <= 20000:
        parser.error("--rate must be between 10 and 20,000 req/s")
    if not 1 <= idle <= 3000:
        parser.error("--idle-connections must be between 1 and 3,000")
    wanted = set(options.only or CONFIGURATIONS)
    for name in list(wanted):
        wanted |= {"direct", REFERENCE_FOR_MODE[CONFIGURATIONS[name].mode]}
    paced_seconds = 0.5 if options.quick else duration
    settings = Options(
        rounds=rounds,
        duration=duration,
        connections=options.connections,
        rate=options.rate,
        paced_requests=max(PACED_WARMUP + 100, round(options.rate * paced_seconds)),
        idle_connections=idle,
        names=tuple(name for name in CONFIGURATIONS if name in wanted),
    )
    try:
        tools = ensure_tools()
    except ToolsUnavailable as exc:
        print(f"bench/proxy.py: cannot run: {exc}", file=sys.stderr)
        return 1
    return run_benchmark("proxy", lambda workdir: run(settings, tools, workdir), print_table)


if __name__ == "__main__":
    sys.exit(main())
