"""``meshnode demo``: a local cluster of member processes, failing and healing on cue.

It starts five ``meshnode member`` processes on 127.0.0.1 (random free ports), then
prints the membership matrix (row: the member, column: who reports it) whenever it
changes, while it

1. waits for every member to see every other alive,
2. kills one with SIGKILL and shows it go suspect, then failed, everywhere,
3. stops another with SIGTERM and shows it *left* (a graceful leave),
4. restarts the killed one under the same name and shows it rejoin.

Then it stops the rest and exits 0 (or keeps watching with ``--forever``). Every child
process it started is stopped and reaped on any exit, Ctrl-C included.

The process helpers (``MemberProcess``, ``spawn_member``...) are shared with the
end-to-end tests and ``bench/gossip_live.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
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


def render_matrix(names: Sequence[str], views: dict[str, dict[str, str]]) -> str:
    width = max(8, *(len(n) + 1 for n in names))
    header = "member".ljust(width) + " │ " + "".join(n.ljust(width) for n in names)
    lines = [header, "─" * width + "─┼─" + "─" * (width * len(names))]
    for subject in names:
        cells = []
        for observer in names:
            view = views.get(observer)
            cells.append(("(down)" if view is None else view.get(subject, "·")).ljust(width))
        lines.append(subject.ljust(width) + " │ " + "".join(cells))
    return "\n".join(lines)


class Demo:
    """The scripted scenario; ``run`` returns the exit code."""

    def __init__(self, workdir: Path, size: int, forever: bool) -> None:
        self.workdir = workdir
        self.size = size
        self.forever = forever
        self.names = [f"node{i + 1}" for i in range(size)]
        self.members: dict[str, MemberProcess] = {}
        self.all_processes: list[MemberProcess] = []
        self.started = time.monotonic()
        self.last_matrix = ""

    def say(self, text: str) -> None:
        print(f"\n[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    async def start(self, name: str, join: Sequence[str]) -> MemberProcess:
        member = await spawn_member(name, self.workdir, join=join)
        self.members[name] = member
        self.all_processes.append(member)
        return member

    async def watch_until(
        self,
        session: aiohttp.ClientSession,
        done: Callable[[dict[str, dict[str, str]]], bool],
        within: float,
        what: str,
    ) -> bool:
        """Poll every member, print the matrix when it changes, until ``done``."""
        deadline = time.monotonic() + within
        started = time.monotonic()
        while True:
            views = await membership_views(session, list(self.members.values()))
            matrix = render_matrix(self.names, views)
            if matrix != self.last_matrix:
                print(f"\n[{time.monotonic() - self.started:6.1f}s]\n{matrix}", flush=True)
                self.last_matrix = matrix
            if views and done(views):
                self.say(f"✓ {what} ({time.monotonic() - started:.1f} s)")
                return True
            if time.monotonic() > deadline:
                self.say(f"✗ {what}: not reached within {within:.0f} s")
                return False
            await asyncio.sleep(0.2)

    async def hold(self, session: aiohttp.ClientSession, seconds: float) -> None:
        """Keep printing changes for ``seconds`` (a pause the viewer can read)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            views = await membership_views(session, list(self.members.values()))
            matrix = render_matrix(self.names, views)
            if matrix != self.last_matrix:
                print(f"\n[{time.monotonic() - self.started:6.1f}s]\n{matrix}", flush=True)
                self.last_matrix = matrix
            await asyncio.sleep(0.2)

    def everyone_sees(
        self, subject: str, status: str, observers: Iterable[str] | None = None
    ) -> Callable[[dict[str, dict[str, str]]], bool]:
        chosen = list(observers) if observers is not None else None

        def check(views: dict[str, dict[str, str]]) -> bool:
            names = chosen if chosen is not None else list(views)
            return all(views.get(o, {}).get(subject) == status for o in names)

        return check

    def alive_names(self) -> list[str]:
        return [n for n, m in self.members.items() if m.running]

    async def run(self) -> int:
        seed_name = self.names[0]
        self.say(f"starting {self.size} members on 127.0.0.1 (logs in {self.workdir})")
        seed = await self.start(seed_name, ())
        await wait_ready(seed)
        seed_address = f"127.0.0.1:{seed.gossip_port}"
        others = [await self.start(n, (seed_address,)) for n in self.names[1:]]
        await asyncio.gather(*(wait_ready(m) for m in others))
        timeout = aiohttp.ClientTimeout(total=2, sock_connect=1)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            def converged(views: dict[str, dict[str, str]]) -> bool:
                return len(views) == len(self.alive_names()) and all(
                    all(view.get(n) == "alive" for n in self.alive_names())
                    for view in views.values()
                )

            if not await self.watch_until(session, converged, 20, "every member sees all alive"):
                return 1
            await self.hold(session, 4)

            victim = self.names[2]
            self.say(f"kill -9 {victim} (pid {self.members[victim].process.pid})")
            self.members[victim].kill()
            await self.members[victim].process.wait()
            if not await self.watch_until(
                session, self.everyone_sees(victim, "failed"), 30, f"everyone sees {victim} failed"
            ):
                return 1
            await self.hold(session, 3)

            leaver = self.names[3]
            self.say(f"SIGTERM {leaver}: graceful leave")
            self.members[leaver].terminate()
            if not await self.watch_until(
                session, self.everyone_sees(leaver, "left"), 15, f"everyone sees {leaver} left"
            ):
                return 1
            await stop_process(self.members[leaver])
            await self.hold(session, 3)

            self.say(f"restarting {victim} with the same name; it joins {seed_address}")
            restarted = await self.start(victim, (seed_address,))
            await wait_ready(restarted)
            if not await self.watch_until(
                session, self.everyone_sees(victim, "alive"), 20, f"everyone sees {victim} alive"
            ):
                return 1

            if self.forever:
                self.say("watching until Ctrl-C (try kill -9 on a member pid)")
                await self.hold(session, float("inf"))
            else:
                self.say("steady state for a few seconds")
                await self.hold(session, 8)
        self.say("stopping the demo cluster (graceful leave)")
        await asyncio.gather(*(stop_process(m) for m in self.members.values()))
        self.say("done")
        return 0


async def run_demo(size: int = 5, forever: bool = False, workdir: Path | None = None) -> int:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    # SIGTERM to the demo cancels it like Ctrl-C does, so the cleanup below runs.
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="meshnode-demo-"))
            )
        demo = Demo(workdir, size, forever)
        try:
            return await demo.run()
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
            # Whatever happened, no child outlives the demo.
            await kill_all(demo.all_processes)


def main(size: int = 5, forever: bool = False) -> int:
    try:
        return asyncio.run(run_demo(size, forever))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted; every member process was stopped", flush=True)
        return 130
