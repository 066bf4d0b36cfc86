"""The client commands of the CLI against a real development agent."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshnode.procs import agent_environment, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def dev_agent(tmp_path: Path) -> Iterator[str]:
    http = f"127.0.0.1:{free_port()}"
    log = (tmp_path / "agent.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshnode.cli",
            "agent",
            "--dev",
            "--http-addr",
            http,
            "--gossip-port",
            str(free_port()),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=agent_environment() | {"MESHNODE_PROXY__ENABLED": "false"},
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://{http}/v1/agent/self", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise AssertionError((tmp_path / "agent.log").read_text()) from None
                time.sleep(0.1)
        yield http
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        log.close()


def meshnode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshnode.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_client_commands(dev_agent: str, tmp_path: Path) -> None:
    definition = tmp_path / "api.json"
    definition.write_text(
        json.dumps(
            {"service": {"name": "api", "port": 9000, "tags": ["v2"], "check": {"ttl": "30s"}}}
        )
    )
    registered = meshnode("services", "register", str(definition), "-http-addr", dev_agent)
    assert registered.returncode == 0, registered.stderr
    assert "Registered service: api" in registered.stdout

    listing = meshnode("services", "-http-addr", dev_agent)
    assert listing.returncode == 0 and "api" in listing.stdout and "9000" in listing.stdout
    as_json = meshnode("services", "list", "-http-addr", dev_agent, "-format", "json")
    assert json.loads(as_json.stdout)["api"]["Tags"] == ["v2"]
    catalog = meshnode("catalog", "services", "-http-addr", dev_agent)
    assert "api" in catalog.stdout and "v2" in catalog.stdout
    members = meshnode("members", "-http-addr", dev_agent, "-format", "json")
    assert len(json.loads(members.stdout)) == 1
    info = meshnode("info", "-http-addr", dev_agent)
    assert "Datacenter = dc1" in info.stdout

    failed = meshnode("join", "127.0.0.1:1", "-http-addr", dev_agent)
    assert failed.returncode == 1 and "could not contact" in failed.stderr
    no_keys = meshnode("keyring", "list", "-http-addr", dev_agent)
    assert no_keys.returncode == 1 and "encryption is not enabled" in no_keys.stderr

    removed = meshnode("services", "deregister", "api", "-http-addr", dev_agent)
    assert removed.returncode == 0
    assert "api" not in meshnode("catalog", "services", "-http-addr", dev_agent).stdout
    assert meshnode("reload", "-http-addr", dev_agent).returncode == 0
    left = meshnode("leave", "-http-addr", dev_agent)
    assert left.returncode == 0 and "Graceful leave complete" in left.stdout


def test_unreachable_agent_is_a_clear_error() -> None:
    result = meshnode("members", "-http-addr", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "meshnode members: error:" in result.stderr
