"""The mesh across real "hosts": one agent and its proxy worker per network namespace.

Three namespaces on one bridge (``tests/netns.py``), ``h1``-``h3`` at
``SUBNET.1``-``SUBNET.3``. Each runs a ``meshnode agent`` bound to its own address, and
the agent's supervised proxy worker takes the *default* inbound port 20000 on every
host: each namespace has its own network stack, which is exactly why one fixed port
works in production and why the loopback e2e test (``test_mesh_proxy.py``) cannot show
it. ``h1`` is the server and hosts ``web`` and ``batch``, both declaring the upstream
``api`` on a loopback port of ``h1``; ``h2`` and ``h3`` each run one ``api`` instance
(a tiny HTTP server on 127.0.0.1:8080 *of its own host*) that echoes who it is and the
``x-meshnode-source`` header its proxy added.

Nothing in the root namespace can reach the hosts (the bridge lives in a namespace of
its own), so the test talks through a *driver*: one Python process inside ``h1`` that
reads JSON commands on stdin and answers on stdout (HTTP requests, raw TCP probes). It
plays ``web`` and ``batch`` and also calls every agent's HTTP API across the bridge.

Checked, in order (one test: the phases build on each other and the agents take a few
seconds to start):

1. ``web`` → ``api`` answers 200 through both proxies, from both ``h2`` and ``h3``, and
   the instance saw source ``web``; ``batch`` → ``api`` is refused (403, the deny);
2. the wire between hosts is TLS: plaintext HTTP from ``h1`` to ``SUBNET.2:20000`` gets
   no HTTP answer, and an ``AF_PACKET`` capture on ``h1``'s bridge port shows every
   mesh connection opening with a TLS handshake record and the request path never in
   the clear (while the plaintext probe's path is: the capture works);
3. a partition: ``h2``'s link goes down. Gossip suspects ``h2`` within a probe or two,
   its ``serfHealth`` turns critical at once and its endpoints leave ``h1``'s snapshot;
   it is declared failed after the suspicion timeout (~4-5 s). A request already
   written on a pooled connection to ``h2`` gets no answer and ends with the route's
   3 s timeout (504); new ones are retried on connect failure. Within a bounded time
   every request is served by ``h3``;
4. policy holds through the partition: the deny ``batch => api`` written at ``h1``
   before it still refuses (403 from ``h3``'s inbound side), and an allow written
   during it reaches ``h3``; when the link comes back ``h2`` serves ``web`` again and
   has caught up with the allow it missed.

Everything (processes, namespaces, the temporary directory) is removed whatever
happens. Timings are printed (run with ``-s``).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import pytest

from meshnode.procs import agent_environment
from tests.netns import SUBNET, NetnsLab, open_netns_lab, run_ip

pytestmark = [pytest.mark.netns, pytest.mark.slow]

HOSTS: Final = ("h1", "h2", "h3")
HTTP_PORT: Final = 8500
GOSSIP_PORT: Final = 7946
#: The default inbound port (``proxy.port``): every host uses it, no flag needed.
PROXY_PORT: Final = 20000
#: Where each ``api`` instance listens, on its own host's loopback.
API_PORT: Final = 8080
WEB_UPSTREAM: Final = 9191
BATCH_UPSTREAM: Final = 9192
INTENTIONS: Final = "/v1/connect/intentions/exact?source={}&destination=api"
#: Three agents and their workers start at once on a small, shared machine.
START_WITHIN: Final = 40.0
#: Registration → catalog on h1 → snapshot → listeners: well under a second each.
CONVERGE_WITHIN: Final = 20.0
#: Gossip's default preset: suspicion of a silent node lasts 4 s at least (16 s at most,
#: shortened by the other member's confirmation), after ~0.4 s of failed probes.
FAILOVER_WITHIN: Final = 25.0
#: The cut-off node is back once a reconnect attempt (every 5 s) or a refutation lands.
REJOIN_WITHIN: Final = 30.0
#: Requests in a row that must all be answered by h3 to call the failover done.
STREAK: Final = 20

#: The ``api`` instance: ``PORT NAME``; answers JSON naming itself and its caller.
API_SCRIPT: Final = """\
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, name = int(sys.argv[1]), sys.argv[2]

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        source = self.headers.get("x-meshnode-source", "")
        body = json.dumps({"instance": name, "source": source}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer.daemon_threads = True
server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
print("ready", flush=True)
server.serve_forever()
"""

#: The driver: one JSON command per stdin line, one JSON answer per stdout line.
#: ``{"op": "http", "method", "url", "body"}`` → ``{"status", "headers", "body"}``;
#: ``{"op": "raw", "host", "port", "data"}`` → ``{"received"}`` (what came back, as
#: latin-1, until close or 3 s); any failure → ``{"error"}``.
DRIVER_SCRIPT: Final = """\
import json, socket, sys, urllib.error, urllib.request

def http(command):
    body = command.get("body")
    request = urllib.request.Request(
        command["url"], data=None if body is None else body.encode(), method=command["method"]
    )
    try:
        with urllib.request.urlopen(request, timeout=command.get("timeout", 10)) as response:
            status, headers, text = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        status, headers, text = error.code, dict(error.headers), error.read()
    return {"status": status, "headers": headers, "body": text.decode("utf-8", "replace")}

def raw(command):
    received = b""
    with socket.create_connection((command["host"], command["port"]), timeout=3) as sock:
        sock.sendall(command["data"].encode())
        try:
            while len(received) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
        except (TimeoutError, ConnectionError):
            pass
    return {"received": received.decode("latin-1")}

for line in sys.stdin:
    command = json.loads(line)
    try:
        answer = http(command) if command["op"] == "http" else raw(command)
    except Exception as exc:
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(answer) + "\\n")
    sys.stdout.flush()
"""


#: Run in the bridge's namespace: ``DEVICE PORT MARKER...``. Captures every TCP segment
#: to or from PORT on DEVICE (one bridge port: all of a host's traffic) until a line
#: arrives on stdin, then prints one JSON line: the first payload bytes (hex) of each
#: flow toward PORT, and how many segments held each marker in the clear.
SNIFFER_SCRIPT: Final = """\
import json, select, socket, struct, sys

device, port, markers = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
sniffer.bind((device, 0))
first, clear, segments = {}, dict.fromkeys(markers, 0), 0

def take(frame):
    global segments
    if frame[12:14] != b"\\x08\\x00" or frame[23] != 6:  # IPv4, TCP
        return
    ip = frame[14:]
    header, total = (ip[0] & 15) * 4, struct.unpack("!H", ip[2:4])[0]
    tcp = ip[header:]
    source, destination = struct.unpack("!HH", tcp[:4])
    payload = ip[header + (tcp[12] >> 4) * 4 : total]
    if port not in (source, destination) or not payload:
        return
    segments += 1
    if destination == port:
        flow = f"{socket.inet_ntoa(ip[12:16])}:{source}->{socket.inet_ntoa(ip[16:20])}:{port}"
        first.setdefault(flow, payload[:3].hex())
    for marker in markers:
        clear[marker] += marker.encode() in payload

print("ready", flush=True)
while sys.stdin not in select.select([sniffer, sys.stdin], [], [])[0]:
    take(sniffer.recv(1 << 18))
sniffer.setblocking(False)  # stop: what is already queued still counts
try:
    while True:
        take(sniffer.recv(1 << 18))
except BlockingIOError:
    pass
print(json.dumps({"first": first, "clear": clear, "segments": segments}), flush=True)
"""


class Sniffer:
    """What crossed one bridge port, seen from the wire (an ``AF_PACKET`` socket in the
    bridge's namespace): proof that the mesh's bytes between hosts are TLS records."""

    def __init__(self, lab: NetnsLab, device: str, markers: list[str]) -> None:
        self.process = subprocess.Popen(
            [
                "ip", "netns", "exec", lab.bridge_namespace, sys.executable, "-I", "-S",
                "-c", SNIFFER_SCRIPT, device, str(PROXY_PORT), *markers,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        lab.processes.append(self.process)  # type: ignore[arg-type]
        assert self.process.stdout is not None and self.process.stdin is not None
        ready = self.process.stdout.readline().strip()
        assert ready == "ready", f"the sniffer did not start: {ready!r}"

    def report(self) -> dict[str, Any]:
        """Stop capturing; what was seen."""
        assert self.process.stdout is not None and self.process.stdin is not None
        self.process.stdin.write("stop\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        self.process.wait(timeout=10)
        report: dict[str, Any] = json.loads(line)
        return report


class DriverError(Exception):
    """A request the driver could not complete (no answer, refused, timed out)."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


class Driver:
    """The test's hands inside ``h1``: a long-lived process, so a request costs a pipe
    round trip instead of a Python start-up (~100 ms of CPU) on a busy machine."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self.stdin: IO[str] = process.stdin
        self.stdout: IO[str] = process.stdout

    def _ask(self, command: dict[str, Any]) -> dict[str, Any]:
        if self.process.poll() is not None:
            raise RuntimeError(f"the driver exited with {self.process.returncode}")
        self.stdin.write(json.dumps(command) + "\n")
        self.stdin.flush()
        line = self.stdout.readline()
        if not line:
            raise RuntimeError("the driver closed its output")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def http(self, method: str, url: str, body: object = None, timeout: float = 10) -> Answer:
        answer = self._ask(
            {
                "op": "http",
                "method": method,
                "url": url,
                "body": None if body is None else json.dumps(body),
                "timeout": timeout,
            }
        )
        if "error" in answer:
            raise DriverError(answer["error"])
        headers = {k.lower(): v for k, v in answer["headers"].items()}
        return Answer(answer["status"], headers, answer["body"])

    def raw(self, host: str, port: int, data: str) -> str:
        answer = self._ask({"op": "raw", "host": host, "port": port, "data": data})
        if "error" in answer:
            raise DriverError(answer["error"])
        return str(answer["received"])


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def api(self) -> str:
        return f"http://{self.address}:{HTTP_PORT}"


class Mesh:
    def __init__(self, lab: NetnsLab, workdir: Path, driver: Driver, hosts: dict[str, Host]):
        self.lab = lab
        self.workdir = workdir
        self.driver = driver
        self.hosts = hosts

    def call(self, host: str, method: str, path: str, body: object = None) -> Any:
        """An agent API call that must succeed (200); decoded JSON (or None)."""
        answer = self.driver.http(method, self.hosts[host].api + path, body)
        assert answer.status == 200, (host, method, path, answer.status, answer.body)
        return json.loads(answer.body) if answer.body.strip() else None

    def through(self, upstream_port: int, path: str = "/") -> Answer:
        """A request of the local app on h1 to its upstream port (the proxy's listener)."""
        return self.driver.http("GET", f"http://127.0.0.1:{upstream_port}{path}", timeout=15)

    def diagnostics(self) -> str:
        exited = {
            n: h.process.returncode for n, h in self.hosts.items() if h.process.poll() is not None
        }
        tails = "".join(
            f"\n--- {n}\n{h.log.read_text(errors='replace')[-2500:]}" for n, h in self.hosts.items()
        )
        return f"\nexited agents: {exited}{tails}"

    def until(self, check: Callable[[], bool], within: float, what: str) -> float:
        """Poll ``check`` until it holds; the seconds it took."""
        started = time.monotonic()
        last: Exception | None = None
        while time.monotonic() - started < within:
            assert all(h.process.poll() is None for h in self.hosts.values()), (
                "an agent died\n" + self.diagnostics()
            )
            try:
                if check():
                    return time.monotonic() - started
            except (DriverError, AssertionError, ValueError, KeyError) as exc:
                last = exc
            time.sleep(0.2)
        raise AssertionError(f"not within {within} s: {what} (last: {last!r}){self.diagnostics()}")


class PartitionWatcher:
    """Times, from its own driver in ``h1`` (the main one is busy with requests that
    may hang), when ``h1``'s agent marks ``h2`` failed and when ``h1``'s catalog stops
    offering ``h2``'s api instance; both in seconds after ``start``."""

    def __init__(self, mesh: Mesh, driver: Driver) -> None:
        self.mesh = mesh
        self.driver = driver
        self.failed_after: float | None = None
        self.left_catalog_after: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=20)

    def _get(self, path: str) -> Any:
        answer = self.driver.http("GET", self.mesh.hosts["h1"].api + path, timeout=5)
        return answer.json() if answer.status == 200 else None

    def _run(self) -> None:
        while not self._stop.is_set() and None in (self.failed_after, self.left_catalog_after):
            try:
                members = self._get("/v1/agent/members") or []
                passing = self._get("/v1/health/service/api?passing") or []
            except (DriverError, RuntimeError, ValueError):
                self._stop.wait(0.1)
                continue
            now = time.monotonic() - self.started
            if self.failed_after is None and any(
                m["Name"] == "h2" and m["Status"] == 4 for m in members
            ):
                self.failed_after = now
            nodes = {entry["Node"]["Node"] for entry in passing}
            if self.left_catalog_after is None and nodes == {"h3"}:
                self.left_catalog_after = now
            self._stop.wait(0.1)


def start_driver(lab: NetnsLab, namespace: str) -> Driver:
    process = subprocess.Popen(
        ["ip", "netns", "exec", namespace, sys.executable, "-I", "-S", "-c", DRIVER_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    # The lab kills what it lists; a text-mode Popen is still a Popen.
    lab.processes.append(process)  # type: ignore[arg-type]
    return Driver(process)


def start_agents(lab: NetnsLab, workdir: Path) -> dict[str, Host]:
    env = agent_environment()
    hosts: dict[str, Host] = {}
    for index, name in enumerate(HOSTS, start=1):
        namespace, address = lab.add_host(index)
        args = [
            "-m", "meshnode.cli", "agent",
            "--node", name,
            "--bind", address,
            "--gossip-port", str(GOSSIP_PORT),
            "--http-addr", f"{address}:{HTTP_PORT}",
            # Short: the worker's control socket lives here (sun_path ≤ 107 bytes).
            "--data-dir", str(workdir / name),
            "--log-format", "json",
        ]  # fmt: skip
        if index == 1:
            args += ["--server", "--bootstrap-expect", "1"]
        else:
            args += ["--join", f"{SUBNET}.1:{GOSSIP_PORT}"]
        log = workdir / f"{name}.log"
        hosts[name] = Host(name, namespace, address, log, lab.spawn(namespace, args, log, env=env))
    return hosts


def start_api(lab: NetnsLab, host: Host, workdir: Path) -> None:
    lab.spawn(
        host.namespace,
        ["-I", "-S", "-c", API_SCRIPT, str(API_PORT), f"api-{host.name}"],
        workdir / f"api-{host.name}.log",
    )


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    # Not pytest's tmp_path: the unix socket path under it can pass 107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="mnpx-"))
    try:
        with open_netns_lab() as lab:
            started = time.monotonic()
            hosts = start_agents(lab, workdir)
            driver = start_driver(lab, hosts["h1"].namespace)
            mesh = Mesh(lab, workdir, driver, hosts)
            for host in ("h2", "h3"):
                start_api(lab, hosts[host], workdir)

            def all_members_alive() -> bool:
                for name in HOSTS:
                    members = mesh.call(name, "GET", "/v1/agent/members")
                    alive = [m["Name"] for m in members if m["Status"] == 1 and "State" not in m]
                    if sorted(alive) != list(HOSTS):
                        return False
                return True

            mesh.until(all_members_alive, START_WITHIN, "three agents, one cluster")
            print(f"\nthree agents up and joined in {time.monotonic() - started:.1f} s")
            yield mesh
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def register(mesh: Mesh) -> None:
    for host in ("h2", "h3"):
        instance = {
            "ID": f"api-{host}",
            "Name": "api",
            "Port": API_PORT,
            "Address": "127.0.0.1",
        }
        mesh.call(host, "PUT", "/v1/agent/service/register", instance)
    for name, port, upstream in (("web", 8081, WEB_UPSTREAM), ("batch", 8082, BATCH_UPSTREAM)):
        service = {
            "ID": f"{name}-1",
            "Name": name,
            "Port": port,
            "Connect": {
                "SidecarService": {
                    "Proxy": {"Upstreams": [{"DestinationName": "api", "LocalBindPort": upstream}]}
                }
            },
        }
        mesh.call("h1", "PUT", "/v1/agent/service/register", service)
    config = [
        {"Kind": "service-defaults", "Name": "api", "Protocol": "http"},
        # A host that vanished does not answer SYNs: fail fast and try the other one.
        {
            "Kind": "service-defaults",
            "Name": "web",
            "UpstreamConfig": {"Defaults": {"ConnectTimeoutMs": 1000}},
        },
        {
            "Kind": "service-router",
            "Name": "api",
            "Routes": [
                {
                    "Match": {"HTTP": {"PathPrefix": "/"}},
                    # A request already written on a pooled connection to a host that
                    # vanished gets no answer and no reset: only a timeout ends it.
                    "Destination": {
                        "NumRetries": 2,
                        "RetryOnConnectFailure": True,
                        "RequestTimeout": "3s",
                    },
                }
            ],
        },
    ]
    for entry in config:
        mesh.call("h1", "PUT", "/v1/config", entry)
    mesh.call("h1", "PUT", INTENTIONS.format("web"), {"Action": "allow"})
    mesh.call("h1", "PUT", INTENTIONS.format("batch"), {"Action": "deny"})


def instance_of(answer: Answer) -> str:
    assert answer.status == 200, (answer.status, answer.headers.get("x-meshnode-error"))
    return str(answer.json()["instance"])


def set_link(mesh: Mesh, host: str, state: str) -> None:
    run_ip("ip", "-n", mesh.hosts[host].namespace, "link", "set", "eth0", state)


def test_web_reaches_api_across_hosts_over_mtls_and_fails_over_on_a_partition(
    mesh: Mesh,
) -> None:
    # Every byte to and from h1 from here on, seen on its bridge port: the mesh's
    # connections to h2 and h3 all start after this, with their handshakes.
    mesh_marker, probe_marker = f"mesh-{secrets.token_hex(6)}", f"probe-{secrets.token_hex(6)}"
    sniffer = Sniffer(mesh.lab, "port1", [mesh_marker, probe_marker])
    registered = time.monotonic()
    register(mesh)

    # (1) web → api through h1's worker, across the bridge, into h2's or h3's worker.
    seen: Counter[str] = Counter()

    def both_instances_serve() -> bool:
        answer = mesh.through(WEB_UPSTREAM, f"/{mesh_marker}")
        seen[instance_of(answer)] += 1
        assert answer.json()["source"] == "web", answer.body
        return {"api-h2", "api-h3"} <= set(seen)

    mesh.until(both_instances_serve, CONVERGE_WITHIN, "web → api reaches h2 and h3")
    print(f"web → api served by both hosts {time.monotonic() - registered:.1f} s after registering")

    denials = 0

    def batch_denied() -> bool:
        # Round robin alternates h2 and h3: six in a row means both hosts refuse.
        nonlocal denials
        denials = denials + 1 if mesh.through(BATCH_UPSTREAM).status == 403 else 0
        return denials >= 6

    mesh.until(batch_denied, CONVERGE_WITHIN, "batch → api is denied on both hosts")
    denied = mesh.through(BATCH_UPSTREAM)
    assert denied.headers["x-meshnode-error"].startswith("intention: denied by batch => api")

    # (2) Between hosts it is TLS: plaintext HTTP to h2's inbound port gets no HTTP back.
    for host in ("h2", "h3"):
        received = mesh.driver.raw(
            mesh.hosts[host].address,
            PROXY_PORT,
            f"GET /{probe_marker} HTTP/1.1\r\nHost: api\r\n\r\n",
        )
        assert "HTTP/1." not in received, (host, received[:200])
    # On the wire: the probe's path was seen in the clear (the capture works), the
    # mesh's path never was, and every mesh connection opened with a TLS handshake
    # record (0x16, version 0x03..).
    wire = sniffer.report()
    probes = {f for f, start in wire["first"].items() if start == b"GET".hex()}
    handshakes = {f for f, start in wire["first"].items() if start.startswith("1603")}
    print(f"on the wire: {wire['segments']} segments, flows {wire['first']}")
    assert wire["clear"][mesh_marker] == 0 and wire["clear"][probe_marker] >= 2, wire
    assert len(probes) == 2 and handshakes == set(wire["first"]) - probes, wire
    assert {f.rsplit("->", 1)[1] for f in handshakes} == {
        f"{mesh.hosts[h].address}:{PROXY_PORT}" for h in ("h2", "h3")
    }, wire

    # (3) + (4) h2 drops off the network.
    watcher = PartitionWatcher(mesh, start_driver(mesh.lab, mesh.hosts["h1"].namespace))
    set_link(mesh, "h2", "down")
    watcher.start()
    outcomes: Counter[str] = Counter()
    streak = 0
    last_failure = 0.0
    slowest = 0.0

    def only_h3_serves() -> bool:
        nonlocal streak, last_failure, slowest
        sent = time.monotonic()
        try:
            answer = mesh.through(WEB_UPSTREAM)
        except DriverError as exc:
            answer = Answer(0, {"x-meshnode-error": f"driver: {exc}"}, "")
        slowest = max(slowest, time.monotonic() - sent)
        if answer.status != 200:
            outcomes[f"{answer.status} {answer.headers.get('x-meshnode-error', '')[:40]}"] += 1
            last_failure = time.monotonic() - watcher.started
            streak = 0
            return False
        instance = instance_of(answer)
        outcomes[instance] += 1
        streak = streak + 1 if instance == "api-h3" else 0
        return streak >= STREAK

    failover = mesh.until(only_h3_serves, FAILOVER_WITHIN, "every request served by h3")
    print(
        f"h2 cut off: {STREAK} in a row from h3 after {failover:.1f} s; outcomes "
        f"{dict(outcomes)}; last failure at {last_failure:.1f} s; slowest {slowest:.2f} s"
    )
    assert "api-h2" not in outcomes, outcomes

    mesh.until(
        lambda: None not in (watcher.failed_after, watcher.left_catalog_after),
        FAILOVER_WITHIN,
        "h1 marks h2 failed and drops its instance",
    )
    watcher.stop()
    print(
        f"h1 marked h2 failed {watcher.failed_after:.1f} s after the cut; its instance left "
        f"h1's passing api instances after {watcher.left_catalog_after:.1f} s"
    )

    # Policy still holds with h2 gone: the deny is enforced by h3's inbound side.
    for _ in range(5):
        answer = mesh.through(BATCH_UPSTREAM)
        assert answer.status == 403, (answer.status, answer.body)
        assert answer.headers["x-meshnode-error"].startswith("intention: denied by batch => api")
    for _ in range(5):
        assert instance_of(mesh.through(WEB_UPSTREAM)) == "api-h3"
    # And it still changes: an allow written now reaches h3 (and not h2, cut off).
    mesh.call("h1", "PUT", INTENTIONS.format("batch"), {"Action": "allow"})
    allowed = mesh.until(
        lambda: mesh.through(BATCH_UPSTREAM).status == 200,
        CONVERGE_WITHIN,
        "batch → api allowed during the partition",
    )
    answer = mesh.through(BATCH_UPSTREAM)
    assert instance_of(answer) == "api-h3" and answer.json()["source"] == "batch"
    print(f"allow written during the partition enforced by h3 after {allowed:.1f} s")

    # The link comes back: h2 rejoins, serves again, and has caught up with the allow it
    # missed.
    set_link(mesh, "h2", "up")
    healed = time.monotonic()
    back: Counter[str] = Counter()

    def h2_serves_again() -> bool:
        answer = mesh.through(WEB_UPSTREAM)
        if answer.status == 200:
            back[instance_of(answer)] += 1
        else:
            back[str(answer.status)] += 1
        return back["api-h2"] >= 1

    mesh.until(h2_serves_again, REJOIN_WITHIN, "h2 serves again after the link is back")
    print(f"link up: h2 served again after {time.monotonic() - healed:.1f} s; {dict(back)}")
    batch: Counter[str] = Counter()

    def h2_serves_batch() -> bool:
        answer = mesh.through(BATCH_UPSTREAM)
        batch[instance_of(answer) if answer.status == 200 else str(answer.status)] += 1
        return batch["api-h2"] >= 1

    caught_up = mesh.until(h2_serves_batch, REJOIN_WITHIN, "h2 learns the allow it missed")
    print(f"h2 enforced the missed allow {caught_up:.1f} s later; batch answers {dict(batch)}")
    assert set(batch) <= {"api-h2", "api-h3"}, batch
