"""Three real agents on loopback: the catalog spreads, crashes show, restarts recover."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshnode.procs import free_port

pytestmark = pytest.mark.slow


class AgentProcess:
    def __init__(
        self, name: str, data_dir: Path, join: list[int], extra: list[str] | None = None
    ) -> None:
        self.extra = extra or []
        self.name = name
        self.data_dir = data_dir
        self.gossip_port = free_port()
        self.http_port = free_port()
        self.join = join
        self.process: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"{name}.log"

    def start(self, *, join: bool = True) -> None:
        args = [
            sys.executable,
            "-m",
            "meshnode.cli",
            "agent",
            "--node",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--bind",
            "127.0.0.1",
            "--gossip-port",
            str(self.gossip_port),
            "--http-addr",
            f"127.0.0.1:{self.http_port}",
            "--log-format",
            "json",
            *self.extra,
        ]
        if join:
            for port in self.join:
                args += ["--join", f"127.0.0.1:{port}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHNODE_")}
        env["MESHNODE_MDNS__ENABLED"] = "false"
        env["MESHNODE_PROXY__ENABLED"] = "false"  # agents side by side: no proxy ports
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=5) as response:
            return json.load(response)

    def put(self, path: str, body: object = None) -> int:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url(path), data=data, method="PUT")
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=15)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


def wait_for(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"not within {within} s: {what} (last error: {last!r})")


def start_cluster(tmp_path: Path, extra: list[str] | None = None) -> list[AgentProcess]:
    first = AgentProcess("a1", tmp_path / "a1", [], extra)
    agents = [first]
    agents += [
        AgentProcess(f"a{i}", tmp_path / f"a{i}", [first.gossip_port], extra) for i in (2, 3)
    ]
    return agents


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    yield from run_cluster(start_cluster(tmp_path))


@pytest.fixture
def encrypted_cluster(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    yield from run_cluster(start_cluster(tmp_path, ["--encrypt", OLD_KEY]))


OLD_KEY = base64.b64encode(bytes(range(32))).decode()
NEW_KEY = base64.b64encode(bytes(range(32, 64))).decode()


def run_cluster(agents: list[AgentProcess]) -> Iterator[list[AgentProcess]]:
    try:
        for agent in agents:
            agent.start()
        for agent in agents:
            wait_for(lambda a=agent: a.get("/v1/agent/self") is not None, 20, f"{agent.name} up")
        yield agents
    finally:
        for agent in agents:
            agent.kill()
        if any(a.process and a.process.returncode not in (0, -9, 130) for a in agents):
            for agent in agents:
                print(agent.name, agent.logs())


def health_states(agent: AgentProcess, service: str) -> dict[str, str]:
    """Node -> aggregated status of ``service`` as ``agent`` reports it."""
    entries = agent.get(f"/v1/health/service/{service}")
    result = {}
    for entry in entries:
        statuses = {check["Status"] for check in entry["Checks"]}
        for worst in ("critical", "warning", "passing"):
            if worst in statuses or worst == "passing":
                result[entry["Node"]["Node"]] = worst
                break
    return result


def test_catalog_spreads_crashes_show_and_restarts_recover(cluster: list[AgentProcess]) -> None:
    a1, a2, a3 = cluster
    wait_for(lambda: len(a3.get("/v1/agent/members")) == 3, 20, "three members")

    status = a1.put(
        "/v1/agent/service/register",
        {"Name": "web", "ID": "web-1", "Port": 8080, "Tags": ["v1"], "Check": {"TTL": "30s"}},
    )
    assert status == 200
    a1.put("/v1/agent/check/pass/service:web-1")
    wait_for(lambda: "web" in a3.get("/v1/catalog/services"), 10, "web in a3's catalog")
    wait_for(lambda: health_states(a3, "web") == {"a1": "passing"}, 10, "web passing on a3")

    # kill -9: a1's instance turns critical on a3 through serfHealth.
    a1.kill()
    started = time.monotonic()
    wait_for(lambda: health_states(a3, "web") == {"a1": "critical"}, 15, "web critical on a3")
    assert time.monotonic() - started < 15

    # Restart with no join address: it rejoins from its saved members and serves its
    # registrations again.
    a1.start(join=False)
    wait_for(lambda: "web-1" in a1.get("/v1/agent/services"), 20, "a1 serves web-1 again")
    wait_for(
        lambda: any(m["Name"] == "a1" and m["Status"] == 1 for m in a3.get("/v1/agent/members")),
        20,
        "a3 sees a1 alive again",
    )
    a1.put("/v1/agent/check/pass/service:web-1")
    wait_for(lambda: health_states(a3, "web") == {"a1": "passing"}, 15, "web passing again")

    # A graceful leave is seen as left, not failed.
    a2.kill(signal.SIGTERM)
    assert a2.process is not None and a2.process.returncode == 0, a2.logs()
    wait_for(
        lambda: any(m["Name"] == "a2" and m["Status"] == 3 for m in a3.get("/v1/agent/members")),
        10,
        "a3 sees a2 left",
    )


def test_bad_input_is_refused_and_changes_nothing(cluster: list[AgentProcess]) -> None:
    a1 = cluster[0]
    before = a1.get("/v1/agent/services")
    for body in (b"{not json", b'{"Name": 5}', b'{"Name": "x", "Check": {"Foo": 1}}'):
        request = urllib.request.Request(
            a1.url("/v1/agent/service/register"), data=body, method="PUT"
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=5)
        assert info.value.code == 400
        assert info.value.read()  # says what is wrong
    assert a1.get("/v1/agent/services") == before


def test_keyring_rotates_across_the_cluster_without_failures(
    encrypted_cluster: list[AgentProcess],
) -> None:
    a1, _, a3 = encrypted_cluster
    wait_for(lambda: len(a3.get("/v1/agent/members")) == 3, 20, "three members")
    seen_states: set[int] = set()

    def keyring() -> dict[str, Any]:
        for agent in encrypted_cluster:
            seen_states.update(m["Status"] for m in agent.get("/v1/agent/members"))
        entries: list[dict[str, Any]] = a1.get("/v1/operator/keyring")
        return entries[0]

    def step(method: str, key: str) -> None:
        body = json.dumps({"Key": key}).encode()
        request = urllib.request.Request(a1.url("/v1/operator/keyring"), data=body, method=method)
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200

    step("POST", NEW_KEY)
    wait_for(lambda: keyring()["Keys"].get(NEW_KEY) == 3, 15, "new key installed everywhere")
    step("PUT", NEW_KEY)
    wait_for(lambda: keyring()["PrimaryKeys"].get(NEW_KEY) == 3, 15, "new key primary everywhere")
    step("DELETE", OLD_KEY)
    wait_for(lambda: OLD_KEY not in keyring()["Keys"], 15, "old key removed at a1")
    for agent in encrypted_cluster:
        gossip = agent.get("/v1/mesh/gossip")
        wait_for(
            lambda a=agent: len(a.get("/v1/mesh/gossip")["KeyFingerprints"]) == 1,
            15,
            f"old key removed at {agent.name}",
        )
        assert gossip["Stats"]["dropped"].get("decrypt_failed", 0) == 0, gossip
    # Nobody was ever seen as failed, and the cluster still talks (on the new key only).
    assert seen_states == {1}, seen_states
    a1.put("/v1/agent/service/register", {"Name": "after-rotation", "Port": 1})
    wait_for(lambda: "after-rotation" in a3.get("/v1/catalog/services"), 10, "still gossiping")
