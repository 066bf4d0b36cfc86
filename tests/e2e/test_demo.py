"""``meshnode demo``, the README's main command, run as a user runs it.

The demo starts three real agents; these tests check its exit code, that each step of
the scenario is reported done, and that no agent process or temp dir outlives it, also
when it is stopped with SIGTERM halfway.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
#: The demo takes ~45 s; this leaves room for a slow CI machine.
DEMO_TIMEOUT = 100.0

KEY_LINES = [
    "✓ every agent sees all 3 alive",
    "✓ agent3's catalog lists web",
    "✓ agent3: /v1/health/service/web?passing returns it",
    "✓ agent3 sees web critical",
    "✓ agent3 sees web passing again",
    "✓ agent1 holds a certificate for web",
    "✓ agent3: web → db is allowed",
    "✓ GET http://127.0.0.1:",
    "200 hello from web",
    "✓ client → web is refused with 403",
    "x-meshnode-error: intention: denied by client => web",
    "✓ agent3 marks agent1 failed",
    "serfHealth=critical service:web-1=passing",
    "✓ agent1 is up, serving web-1 from disk",
    "✓ agent3 sees agent1 alive and web passing",
    "✓ agent3 sees agent2 left, not failed",
    "agent2 exited with code 0",
    "the whole demo",
    "done: every agent stopped",
]


class DemoRun:
    """``meshnode demo`` as a child process, its output collected line by line."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHNODE_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meshnode.cli", "demo", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, text: str, within: float) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return
        raise AssertionError(f"no line with {text!r}:\n{self.output}")

    def finish(self, within: float) -> int:
        """Wait for the exit (SIGTERM, then SIGKILL, if it takes too long)."""
        try:
            code = self.process.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
            raise AssertionError(f"demo still running after {within} s:\n{self.output}") from None
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def workdir(self) -> Path:
        match = re.search(r"data and logs: (\S+?)\)", self.output)
        assert match, self.output
        return Path(match.group(1))

    @property
    def agent_pids(self) -> set[int]:
        return {int(pid) for pid in re.findall(r"agent\d+\s+pid (\d+)", self.output)}


def agent_still_running(pid: int, workdir: Path) -> bool:
    """True if ``pid`` is still one of this demo's agents (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(workdir).encode() in cmdline


@pytest.fixture
def demo_runs() -> Iterator[list[DemoRun]]:
    runs: list[DemoRun] = []
    yield runs
    for run in runs:  # a failed test must not leave a demo or its agents behind
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()
        if "data and logs: " in run.output:
            for pid in run.agent_pids:
                if agent_still_running(pid, run.workdir):
                    os.kill(pid, signal.SIGKILL)


def assert_cleaned_up(run: DemoRun) -> None:
    workdir = run.workdir
    assert run.agent_pids, run.output
    deadline = time.monotonic() + 5
    while any(agent_still_running(p, workdir) for p in run.agent_pids):
        assert time.monotonic() < deadline, f"agents outlived the demo:\n{run.output}"
        time.sleep(0.1)
    assert not workdir.exists(), f"{workdir} left behind"


def test_demo_runs_every_step_and_exits_0(demo_runs: list[DemoRun]) -> None:
    started = time.monotonic()
    run = DemoRun()
    demo_runs.append(run)
    run.wait_for_line("done: every agent stopped", DEMO_TIMEOUT)
    code = run.finish(15)
    output = run.output
    assert code == 0, output
    assert "✗" not in output, output
    position = 0
    for line in KEY_LINES:  # in this order
        found = output.find(line, position)
        assert found >= 0, f"missing (or out of order): {line!r}\n{output}"
        position = found
    assert_cleaned_up(run)
    assert time.monotonic() - started < DEMO_TIMEOUT


def test_sigterm_stops_the_demo_and_every_agent(demo_runs: list[DemoRun]) -> None:
    run = DemoRun("--forever")
    demo_runs.append(run)
    run.wait_for_line("✓ every agent sees all 3 alive", 30)
    run.process.send_signal(signal.SIGTERM)
    code = run.finish(15)
    assert code == 143, run.output
    assert "terminated; every agent process was stopped" in run.output
    assert_cleaned_up(run)
