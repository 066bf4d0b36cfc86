"""The real py-consul client (sync) against a real ``meshnode agent --dev`` process.

Unlike ``tests/meshnode/test_api_consul_client.py`` (the API over a fake agent), nothing
is faked here: the agent is a subprocess on free loopback ports, its check runner
really polls an HTTP health endpoint this test serves on 127.0.0.1 (a
``ThreadingHTTPServer`` in a thread, whose answer the test flips 200 → 500 → 200), and
TTL checks are driven through the client. Every wait is bounded; a failure names what
was awaited and prints the agent's log.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest

from meshnode.procs import free_port

consul = pytest.importorskip("consul")

pytestmark = pytest.mark.slow

#: The HTTP check's interval; "seen within a few intervals" is this times
#: ``FLIP_INTERVALS`` (one interval to the next run, one of slack for a loaded machine).
CHECK_INTERVAL: Final = 1.0
FLIP_INTERVALS: Final = 3
#: An agent starts in about a second; several at once on a 2-core machine take longer.
START_WITHIN: Final = 20.0
#: A graceful stop (leave, close) takes well under a second; past this it is a bug.
STOP_WITHIN: Final = 10.0
HTTP_CHECK_ID: Final = "service:web-1:1"
TTL_CHECK_ID: Final = "web-ttl"


def wait_for(check: Callable[[], bool], within: float, what: str) -> float:
    """Poll ``check`` every 50 ms; seconds it took, or AssertionError after ``within``."""
    started = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - started < within:
        try:
            if check():
                return time.monotonic() - started
        except (OSError, ValueError, KeyError, consul.ConsulException) as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"not within {within} s: {what} (last error: {last!r})")


# ---------------------------------------------------------------------- health endpoint


class HealthEndpoint:
    """``GET /health`` on 127.0.0.1:<free port>, answering ``status``; counts hits."""

    def __init__(self) -> None:
        self.status = 200
        self.hits = 0
        self._lock = threading.Lock()
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with endpoint._lock:
                    endpoint.hits += 1
                    status = endpoint.status
                body = b"ok\n" if status == 200 else b"broken\n"
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep pytest's output for failures

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/health"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    def set_status(self, status: int) -> None:
        with self._lock:
            self.status = status

    def hit_count(self) -> int:
        with self._lock:
            return self.hits

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def health_endpoint() -> Iterator[HealthEndpoint]:
    endpoint = HealthEndpoint()
    endpoint.start()
    try:
        yield endpoint
    finally:
        endpoint.close()


# ---------------------------------------------------------------------- the agent


@dataclass
class DevAgent:
    process: subprocess.Popen[bytes]
    http_port: int
    gossip_port: int
    log: Path

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@pytest.fixture
def dev_agent(tmp_path: Path) -> Iterator[DevAgent]:
    """``meshnode agent --dev`` on free ports; its state in ``tmp_path`` (so nothing
    is left in /tmp even if it has to be killed); stopped with SIGTERM, which must work."""
    http_port, gossip_port = free_port(), free_port()
    while gossip_port == http_port:
        gossip_port = free_port()
    log = tmp_path / "agent.log"
    args = [
        sys.executable, "-m", "meshnode.cli", "agent", "--dev",
        "--node", "dev1",
        "--data-dir", str(tmp_path / "data"),
        "--http-addr", f"127.0.0.1:{http_port}",
        "--gossip-port", str(gossip_port),
        "--log-format", "json",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHNODE_")}
    env["MESHNODE_PROXY__ENABLED"] = "false"  # no proxy worker: not what this tests
    with log.open("wb") as log_file:
        process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    agent = DevAgent(process, http_port, gossip_port, log)
    stopped_cleanly = False
    try:

        def answers() -> bool:
            assert process.poll() is None, f"agent exited with {process.returncode}"
            url = f"http://127.0.0.1:{http_port}/v1/agent/self"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(json.load(response))

        wait_for(answers, START_WITHIN, f"agent API on port {http_port}\n{agent.logs()}")
        yield agent
        process.terminate()
        code = process.wait(timeout=STOP_WITHIN)
        assert code == 0, f"agent exited with {code} after SIGTERM\n{agent.logs()}"
        stopped_cleanly = True
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
        if not stopped_cleanly:
            print(agent.logs())


# ---------------------------------------------------------------------- helpers


def check_statuses(entries: list[dict[str, Any]]) -> dict[str, str]:
    """CheckID → Status over health entries."""
    return {check["CheckID"]: check["Status"] for entry in entries for check in entry["Checks"]}


def passing_ids(client: Any, service: str) -> list[str]:
    _, entries = client.health.service(service, passing=True)
    return [entry["Service"]["ID"] for entry in entries]


# ---------------------------------------------------------------------- the test


def test_py_consul_against_a_real_dev_agent(
    dev_agent: DevAgent, health_endpoint: HealthEndpoint
) -> None:
    client = consul.Consul(host="127.0.0.1", port=dev_agent.http_port)

    me = client.agent.self()
    assert me["Config"]["NodeName"] == "dev1", me["Config"]
    assert me["Config"]["Datacenter"] == "dc1", me["Config"]
    assert me["Member"]["Port"] == dev_agent.gossip_port, me["Member"]
    assert client.catalog.datacenters() == ["dc1"]

    # Register with an HTTP check (against our endpoint, answering 200) and a TTL check.
    assert client.agent.service.register(
        "web",
        service_id="web-1",
        port=8080,
        tags=["v1"],
        check=consul.Check.http(health_endpoint.url, f"{CHECK_INTERVAL:g}s", timeout="1s"),
        extra_checks=[{**consul.Check.ttl("30s"), "CheckID": TTL_CHECK_ID}],
    )
    assert sorted(client.agent.checks()) == [HTTP_CHECK_ID, TTL_CHECK_ID]

    index, nodes = client.catalog.service("web")
    assert int(index) >= 1
    assert [(n["Node"], n["ServiceID"], n["ServicePort"], n["ServiceTags"]) for n in nodes] == [
        ("dev1", "web-1", 8080, ["v1"])
    ], nodes
    _, services = client.catalog.services()
    assert services.get("web") == ["v1"], services

    # Passing only when both checks pass: the TTL check starts critical.
    flip_within = FLIP_INTERVALS * CHECK_INTERVAL
    wait_for(
        lambda: check_statuses(client.health.service("web")[1]).get(HTTP_CHECK_ID) == "passing",
        flip_within + 1.0,  # the first run may wait up to one interval
        "the HTTP check passing",
    )
    assert health_endpoint.hit_count() >= 1, "the agent never called the health endpoint"
    assert passing_ids(client, "web") == [], "TTL check not yet passed, yet web is passing"

    # TTL pass/fail flips health at once (the API writes the catalog itself).
    assert client.agent.check.ttl_pass(TTL_CHECK_ID, "fine")
    assert passing_ids(client, "web") == ["web-1"], client.health.service("web")[1]
    assert client.agent.check.ttl_fail(TTL_CHECK_ID, "broken")
    assert passing_ids(client, "web") == []
    _, checks = client.health.checks("web")
    ttl = next(c for c in checks if c["CheckID"] == TTL_CHECK_ID)
    assert (ttl["Status"], ttl["Output"]) == ("critical", "broken"), ttl
    assert client.agent.check.ttl_pass(TTL_CHECK_ID, "fine again")
    assert passing_ids(client, "web") == ["web-1"]

    # A blocking query holds while nothing changes (an HTTP check that keeps passing
    # with the same output must not move the index) ...
    index, _ = client.health.service("web")
    result: dict[str, Any] = {}

    def blocking() -> None:
        started = time.monotonic()
        result["index"], result["entries"] = client.health.service("web", index=index, wait="5s")
        result["elapsed"] = time.monotonic() - started

    waiter = threading.Thread(target=blocking, daemon=True)
    waiter.start()
    waiter.join(timeout=CHECK_INTERVAL * 1.5)
    assert waiter.is_alive(), (
        f"blocking query on index {index} returned after {result.get('elapsed')} s with no "
        f"change made: index {result.get('index')}, {result.get('entries')}"
    )
    # ... and returns when the HTTP endpoint starts failing and the check sees it.
    flipped = time.monotonic()
    health_endpoint.set_status(500)
    waiter.join(timeout=flip_within + 1.0)
    assert not waiter.is_alive(), f"blocking query still held {flip_within + 1.0} s after 500"
    seen_after = time.monotonic() - flipped
    assert int(result["index"]) > int(index), result
    statuses = check_statuses(result["entries"])
    assert statuses.get(HTTP_CHECK_ID) == "critical", (
        f"the blocking query woke on another change: {statuses}"
    )
    assert seen_after <= flip_within, f"HTTP 500 seen after {seen_after:.2f} s"
    assert passing_ids(client, "web") == []
    _, checks = client.health.checks("web")
    http_check = next(c for c in checks if c["CheckID"] == HTTP_CHECK_ID)
    assert "500" in http_check["Output"], http_check

    # Back to 200: passing again within a few intervals.
    health_endpoint.set_status(200)
    wait_for(
        lambda: passing_ids(client, "web") == ["web-1"], flip_within, "web passing again after 200"
    )

    # Deregister: gone from the agent, the catalog and health, and the check stops.
    assert client.agent.service.deregister("web-1")
    assert client.agent.services() == {}
    assert client.agent.checks() == {}
    _, nodes = client.catalog.service("web")
    assert nodes == []
    _, services = client.catalog.services()
    assert "web" not in services, services
    _, entries = client.health.service("web")
    assert entries == []
    hits = health_endpoint.hit_count()
    time.sleep(2.5 * CHECK_INTERVAL)
    assert health_endpoint.hit_count() <= hits + 1, "the HTTP check still runs after deregister"
