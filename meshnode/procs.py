"""Child processes of the demo, the end-to-end tests and the live benchmark.

Two kinds, both started as ``python -m meshnode.cli ...`` on 127.0.0.1:

* ``meshnode member``: a bare gossip member (``MemberProcess``, ``spawn_member``,
  ``wait_ready``, ``stop_process``, ``kill_all``, ``membership_views``); used by
  ``bench/gossip_live.py`` and ``tests/e2e/test_gossip_processes.py``;
* ``meshnode agent``: a full agent with its data directory and fixed ports
  (``AgentProcess``, ``start_agent``, ``wait_agent_ready``, ``stop_agent``); used by
  ``meshnode demo``.

Every child runs in its own session, so a Ctrl-C in the terminal reaches only the
parent, which stops the children in order. Callers own cleanup: whatever happens, they
call ``kill_all`` / ``kill_agents`` before they exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

#: How long a member process may take to start (imports take ~1 s of CPU; several
#: start at once on a small machine).
START_TIMEOUT: Final = 30.0
#: Grace period between SIGTERM (graceful leave) and SIGKILL when cleaning up.
STOP_GRACE: Final = 5.0
STATUS_NAMES: Final = {1: "alive", 2: "leaving", 3: "left", 4: "failed"}


@dataclass(slots=True)
class MemberProcess:
    """One ``meshnode member`` child process and the ports it reported."""

    name: str
    process: asyncio.subprocess.Process
    ready_file: Path
    log_path: Path
    http_port: int = 0
    gossip_port: int = 0
    args: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def kill(self) -> None:
        """SIGKILL: the member gets no chance to say goodbye."""
        if self.running:
            self.process.kill()

    def terminate(self) -> None:
        """SIGTERM: the member leaves gracefully."""
        if self.running:
            self.process.terminate()

    def signal(self, number: int) -> None:
        if self.running:
            self.process.send_signal(number)


def member_command(
    name: str,
    ready_file: Path,
    *,
    join: Sequence[str] = (),
    preset: str = "default",
    extra_args: Sequence[str] = (),
) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "meshnode.cli",
        "member",
        "--name",
        name,
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        "--http-addr",
        "127.0.0.1:0",
        "--preset",
        preset,
        "--log-format",
        "json",
        "--ready-file",
        str(ready_file),
    ]
    for seed in join:
        args += ["--join", seed]
    return args + list(extra_args)


async def spawn_member(
    name: str,
    workdir: Path,
    *,
    join: Sequence[str] = (),
    preset: str = "default",
    extra_args: Sequence[str] = (),
) -> MemberProcess:
    """Start a member process (its output goes to ``workdir/<name>.log``)."""
    ready_file = workdir / f"{name}.ready.json"
    ready_file.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    args = member_command(name, ready_file, join=join, preset=preset, extra_args=extra_args)
    with log_path.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            # Its own session: a Ctrl-C in the terminal reaches only us, and we stop
            # the children in order (they must not all leave at once on their own).
            start_new_session=True,
        )
    return MemberProcess(name, process, ready_file, log_path, args=args)


async def wait_ready(member: MemberProcess, within: float = START_TIMEOUT) -> None:
    """Wait for the ready file; raises RuntimeError if the process dies or is slow."""
    deadline = time.monotonic() + within
    while True:
        if member.ready_file.exists():
            data = json.loads(member.ready_file.read_text())
            member.http_port = int(data["http_port"])
            member.gossip_port = int(data["gossip_port"])
            return
        if not member.running:
            tail = member.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"member {member.name} exited with {member.process.returncode}: {tail}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"member {member.name} not ready after {within} s")
        await asyncio.sleep(0.05)


async def stop_process(member: MemberProcess, grace: float = STOP_GRACE) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps. Returns the code."""
    process = member.process
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            async with asyncio.timeout(grace):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    return await process.wait()


async def kill_all(members: Iterable[MemberProcess]) -> None:
    """SIGKILL and reap every process still running (cleanup on any exit)."""
    chosen = list(members)
    for member in chosen:
        with contextlib.suppress(ProcessLookupError):
            member.kill()
    for member in chosen:
        await member.process.wait()


async def fetch_json(session: aiohttp.ClientSession, url: str) -> Any:
    """GET ``url`` as JSON, or None if the member does not answer."""
    try:
        async with session.get(url) as response:
            if response.status != 200:
                return None
            return await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


def status_of(entry: dict[str, Any]) -> str:
    """A member entry of /v1/agent/members as one word."""
    if entry.get("State") == "suspect":
        return "suspect"
    return STATUS_NAMES.get(int(entry.get("Status", 0)), "?")


async def membership_views(
    session: aiohttp.ClientSession, members: Sequence[MemberProcess]
) -> dict[str, dict[str, str]]:
    """observer name → {member name → status word}, for every running member."""
    running = [m for m in members if m.running and m.http_port]
    replies = await asyncio.gather(
        *(fetch_json(session, m.http_url + "/v1/agent/members") for m in running)
    )
    views: dict[str, dict[str, str]] = {}
    for member, reply in zip(running, replies, strict=True):
        if isinstance(reply, list):
            views[member.name] = {str(e["Name"]): status_of(e) for e in reply}
    return views


# --------------------------------------------------------------------------- agents


def free_port() -> int:
    """A port free for both TCP and UDP right now (a gossip port needs both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


@dataclass(slots=True)
class AgentProcess:
    """One ``meshnode agent`` on 127.0.0.1: its fixed ports and data directory survive
    restarts; ``process`` is the current incarnation (None before the first start)."""

    name: str
    data_dir: Path
    log_path: Path
    gossip_port: int
    http_port: int
    proxy_port: int = 0
    """Its proxy's inbound port (``--proxy-port``): agents side by side on one host
    cannot all have the default 20000. 0: the agent's default."""
    process: asyncio.subprocess.Process | None = None
    args: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, name: str, workdir: Path) -> AgentProcess:
        """An agent named ``name`` with fresh free ports (gossip, HTTP, proxy) and
        ``workdir/<name>/`` as its data directory (logs in ``workdir/<name>.log``); not
        started."""
        return cls(
            name, workdir / name, workdir / f"{name}.log", free_port(), free_port(), free_port()
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    @property
    def http_addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_addr}"

    @property
    def gossip_addr(self) -> str:
        return f"127.0.0.1:{self.gossip_port}"

    def kill(self) -> None:
        """SIGKILL: the agent gets no chance to leave."""
        if self.process is not None and self.running:
            self.process.kill()

    def terminate(self) -> None:
        """SIGTERM: the agent leaves the cluster gracefully, then exits 0."""
        if self.process is not None and self.running:
            self.process.terminate()

    def log_tail(self, chars: int = 2000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]


def agent_command(
    agent: AgentProcess, join: Sequence[str] = (), extra_args: Sequence[str] = ()
) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "meshnode.cli",
        "agent",
        "--node",
        agent.name,
        "--data-dir",
        str(agent.data_dir),
        "--bind",
        "127.0.0.1",
        "--gossip-port",
        str(agent.gossip_port),
        "--http-addr",
        agent.http_addr,
        "--log-format",
        "json",
    ]
    if agent.proxy_port:
        args += ["--proxy-port", str(agent.proxy_port)]
    for seed in join:
        args += ["--join", seed]
    return args + list(extra_args)


def agent_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without its ``MESHNODE_*`` settings (a local cluster
    must not pick up the user's ACLs or keys) and with mDNS off (loopback only)."""
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if not k.startswith("MESHNODE_")}
    env["MESHNODE_MDNS__ENABLED"] = "false"
    return env


async def start_agent(
    agent: AgentProcess, join: Sequence[str] = (), extra_args: Sequence[str] = ()
) -> None:
    """Start (or restart) the agent process; its output is appended to its log.
    With no ``join`` a restarted agent rejoins the members saved in its data dir.
    ``extra_args`` go after the standard flags (e.g. ``--server``)."""
    if agent.running:
        raise RuntimeError(f"agent {agent.name} is already running")
    agent.args = agent_command(agent, join, extra_args)
    with agent.log_path.open("ab") as log_file:
        agent.process = await asyncio.create_subprocess_exec(
            *agent.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            env=agent_environment(),
            start_new_session=True,
        )


async def wait_agent_ready(
    agent: AgentProcess, session: aiohttp.ClientSession, within: float = START_TIMEOUT
) -> None:
    """Wait until the agent's HTTP API answers; raises RuntimeError if the process
    exits first (with the tail of its log) or is not up in time."""
    deadline = time.monotonic() + within
    while True:
        if await fetch_json(session, agent.http_url + "/v1/agent/self") is not None:
            return
        if agent.process is None or not agent.running:
            code = agent.process.returncode if agent.process is not None else None
            raise RuntimeError(f"agent {agent.name} exited with {code}:\n{agent.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"agent {agent.name} not ready after {within} s")
        await asyncio.sleep(0.1)


async def stop_agent(agent: AgentProcess, grace: float = STOP_GRACE) -> int | None:
    """SIGTERM (graceful leave), then SIGKILL after ``grace`` seconds; always reaps.
    The exit code, or None if it was never started."""
    process = agent.process
    if process is None:
        return None
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    return await process.wait()


async def kill_agents(processes: Iterable[asyncio.subprocess.Process]) -> None:
    """SIGKILL and reap every process still running (cleanup on any exit). The kills
    are all sent before the first await, so an interruption cannot skip any."""
    chosen = list(processes)
    for process in chosen:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    for process in chosen:
        await process.wait()
