"""sd_notify: real AF_UNIX datagram sockets stand in for systemd's notify socket.

The last tests run an agent (in-process, then as a real process with real signals)
with ``$NOTIFY_SOCKET`` pointing at such a socket and check the sequence systemd sees:
READY=1 once up, RELOADING=1 + READY=1 around a reload, STOPPING=1 on leave, and
WATCHDOG=1 pings when ``$WATCHDOG_USEC`` asks for them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshnode import systemd
from meshnode.agent import Agent
from meshnode.config import AgentConfig, load_config

RECEIVE_TIMEOUT = 10.0


class NotifySocket:
    """A bound datagram socket and the ``$NOTIFY_SOCKET`` value that names it."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.environ = {"NOTIFY_SOCKET": address}

    def receive(self) -> str:
        return self.sock.recv(8192).decode()

    def pending(self) -> list[str]:
        """Every message already queued, without waiting."""
        messages: list[str] = []
        self.sock.setblocking(False)
        try:
            while True:
                messages.append(self.sock.recv(8192).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(RECEIVE_TIMEOUT)
        return messages

    async def receive_async(self) -> str:
        return await asyncio.to_thread(self.receive)


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(RECEIVE_TIMEOUT)
        yield NotifySocket(sock, str(path))


@pytest.fixture
def abstract_socket() -> Iterator[NotifySocket]:
    name = f"meshnode-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(RECEIVE_TIMEOUT)
        yield NotifySocket(sock, "@" + name)


# ------------------------------------------------------------------ notify


def test_not_under_systemd_is_a_no_op() -> None:
    assert systemd.notify("READY=1", environ={}) is False
    assert systemd.ready(environ={"NOTIFY_SOCKET": ""}) is False
    assert systemd.watchdog(environ={}) is False


def test_ready_reaches_a_path_socket(path_socket: NotifySocket) -> None:
    assert systemd.ready(environ=path_socket.environ) is True
    assert path_socket.receive() == "READY=1"


def test_ready_reaches_an_abstract_socket(abstract_socket: NotifySocket) -> None:
    assert systemd.ready(environ=abstract_socket.environ) is True
    assert abstract_socket.receive() == "READY=1"


def test_process_environment_is_the_default(
    path_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket.address)
    assert systemd.stopping() is True
    assert path_socket.receive() == "STOPPING=1"


def test_reloading_carries_the_monotonic_time(abstract_socket: NotifySocket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading(environ=abstract_socket.environ) is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = abstract_socket.receive().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_stopping_status_and_watchdog(path_socket: NotifySocket) -> None:
    environ = path_socket.environ
    assert systemd.stopping(environ=environ)
    assert systemd.status("leaving\ncluster", environ=environ)
    assert systemd.watchdog(environ=environ)
    assert systemd.notify("STATUS=a\nERRNO=5", environ=environ)
    assert [path_socket.receive() for _ in range(4)] == [
        "STOPPING=1",
        "STATUS=leaving cluster",
        "WATCHDOG=1",
        "STATUS=a\nERRNO=5",
    ]


@pytest.mark.parametrize("address", ["relative/notify", "vsock:2:1234", "notify"])
def test_unsupported_addresses_are_refused(address: str) -> None:
    assert systemd.ready(environ={"NOTIFY_SOCKET": address}) is False


def test_a_missing_socket_returns_false(tmp_path: Path) -> None:
    environ = {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}
    assert systemd.ready(environ=environ) is False


def test_an_oversized_message_is_refused(path_socket: NotifySocket) -> None:
    assert systemd.status("x" * systemd.MAX_MESSAGE_BYTES, environ=path_socket.environ) is False
    assert path_socket.pending() == []


# ------------------------------------------------------------------ watchdog


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "parent"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert systemd.watchdog_interval(environ=environ) == expected


async def test_keep_watchdog_alive_pings_until_cancelled(path_socket: NotifySocket) -> None:
    task = asyncio.create_task(systemd.keep_watchdog_alive(0.02, environ=path_socket.environ))
    pings = [await path_socket.receive_async() for _ in range(3)]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pings == ["WATCHDOG=1"] * 3


# ------------------------------------------------------------------ the agent


def _dev_config(tmp_path: Path) -> AgentConfig:
    environ = {
        "MESHNODE_DEV": "true",
        "MESHNODE_DATA_DIR": str(tmp_path / "data"),
        "MESHNODE_GOSSIP_PORT": "0",
        "MESHNODE_HTTP_ADDR": "127.0.0.1:0",
        "MESHNODE_PROXY__ENABLED": "false",  # no proxy worker: not what this tests
    }
    return load_config({}, environ, cwd=tmp_path, hostname="notify-test")


async def test_agent_notifies_ready_reload_watchdog_and_stopping(
    tmp_path: Path, path_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket.address)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # 0.1 s: pings every 50 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    config = _dev_config(tmp_path)
    agent = Agent(config, reload=lambda: config)
    up = asyncio.Event()
    run = asyncio.create_task(agent.run(ready=lambda _: up.set()))
    async with asyncio.timeout(RECEIVE_TIMEOUT):
        await up.wait()
        assert await path_socket.receive_async() == "READY=1"
        assert await path_socket.receive_async() == "WATCHDOG=1"
        assert await path_socket.receive_async() == "WATCHDOG=1"

        agent.reload()
        messages = [m for m in path_socket.pending() if m != "WATCHDOG=1"]
        assert [m.split("\n")[0] for m in messages] == ["RELOADING=1", "READY=1"]

        await agent.leave()
        await run
    assert "STOPPING=1" in path_socket.pending()


async def test_agent_ends_a_failed_reload_with_ready(
    tmp_path: Path, path_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket.address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    config = _dev_config(tmp_path)

    def broken_reload() -> AgentConfig:
        raise OSError("the configuration file vanished")

    agent = Agent(config, reload=broken_reload)
    up = asyncio.Event()
    run = asyncio.create_task(agent.run(ready=lambda _: up.set()))
    async with asyncio.timeout(RECEIVE_TIMEOUT):
        await up.wait()
        assert await path_socket.receive_async() == "READY=1"
        with pytest.raises(OSError, match="vanished"):
            agent.reload()
        assert [m.split("\n")[0] for m in path_socket.pending()] == ["RELOADING=1", "READY=1"]
        agent.stop()
        await run
    assert path_socket.pending() == ["STOPPING=1"]


@pytest.mark.slow
def test_agent_process_follows_signals(tmp_path: Path, path_socket: NotifySocket) -> None:
    """SIGHUP and SIGTERM through the real signal handlers of ``meshnode agent``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHNODE_", "WATCHDOG_"))}
    env["NOTIFY_SOCKET"] = path_socket.address
    env["MESHNODE_PROXY__ENABLED"] = "false"
    args = [
        sys.executable,
        "-m",
        "meshnode.cli",
        "agent",
        "--dev",
        "--data-dir",
        str(tmp_path / "data"),
        "--gossip-port",
        "0",
        "--http-addr",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ]
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        try:
            assert path_socket.receive() == "READY=1"
            process.send_signal(signal.SIGHUP)
            assert path_socket.receive().startswith("RELOADING=1\nMONOTONIC_USEC=")
            assert path_socket.receive() == "READY=1"
            process.send_signal(signal.SIGTERM)
            assert path_socket.receive() == "STOPPING=1"
            assert process.wait(timeout=30) == 0
        except (TimeoutError, AssertionError, subprocess.TimeoutExpired):
            print(log.read_text(errors="replace")[-4000:])
            raise
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
