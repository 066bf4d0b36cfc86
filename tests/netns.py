"""Network namespaces as test "hosts": a bridge and N namespaces, created and removed.

``open_netns_lab()`` builds hosts (namespaces ``mnt-<hex>-1..N``) on one bridge that
lives in its own namespace (``mnt-<hex>-br``), so nothing is added to the host's own
network: every link is created inside a namespace and vanishes with it. It skips the
test (with the reason) where that cannot work: not Linux, not root, no ``ip``.

Used by the mDNS tests of ``tests/meshnode/test_discovery.py`` (bare gossip members)
and ``tests/e2e/test_agent_mdns_netns.py`` (real agents).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parents[1]
#: Private addresses used only inside the test's namespaces (RFC 1918).
SUBNET: Final = "10.213.7"
#: Every ``ip`` command answers at once; this only stops a wedged one hanging a test.
IP_TIMEOUT: Final = 10.0


def run_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an ``ip`` (or any short) command; output captured as text."""
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=IP_TIMEOUT)


@dataclass
class NetnsLab:
    """Namespaces, on a bridge, created and removed by ``open_netns_lab``."""

    prefix: str
    bridge_namespace: str
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def add_host(self, index: int) -> tuple[str, str]:
        """Namespace ``<prefix>-<index>`` with ``eth0`` = ``SUBNET.<index>/24`` on the
        bridge; returns (namespace, address)."""
        namespace = f"{self.prefix}-{index}"
        address = f"{SUBNET}.{index}"
        run_ip("ip", "netns", "add", namespace)
        self.namespaces.append(namespace)
        # The veth pair is created inside the bridge namespace and its peer moved
        # straight into the host namespace: no link ever exists in the root namespace.
        run_ip(
            "ip", "-n", self.bridge_namespace, "link", "add", f"port{index}", "type", "veth",
            "peer", "name", "eth0", "netns", namespace,
        )  # fmt: skip
        run_ip("ip", "-n", self.bridge_namespace, "link", "set", f"port{index}", "master", "br0")
        run_ip("ip", "-n", self.bridge_namespace, "link", "set", f"port{index}", "up")
        run_ip("ip", "-n", namespace, "link", "set", "lo", "up")
        run_ip("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        run_ip("ip", "-n", namespace, "link", "set", "eth0", "multicast", "on", "up")
        # mDNS sends to 224.0.0.251; with no default route a fresh namespace has no route
        # for multicast at all, and sendto() fails with ENETUNREACH.
        run_ip("ip", "-n", namespace, "route", "add", "224.0.0.0/4", "dev", "eth0")
        return namespace, address

    def spawn(
        self,
        namespace: str,
        args: Sequence[str],
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Run ``python ARGS`` inside ``namespace`` (cwd: the repository), output to
        ``log``. ``ip netns exec`` execs the command, so the PID is Python's own."""
        with open(log, "wb") as log_file:
            process = subprocess.Popen(
                ["ip", "netns", "exec", namespace, sys.executable, *args],
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
            )
        self.processes.append(process)
        return process

    def cleanup(self) -> list[str]:
        """Kill what we started, then delete our namespaces; returns what went wrong."""
        problems: list[str] = []
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                problems.append(f"pid {process.pid} did not exit after SIGKILL")
        for namespace in [*self.namespaces, self.bridge_namespace]:
            # Anything still running in *our* namespaces is ours (e.g. a grandchild).
            listed = run_ip("ip", "netns", "pids", namespace, check=False)
            for pid in listed.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
                    problems.append(f"killed straggler pid {pid} in {namespace}")
            deleted = run_ip("ip", "netns", "del", namespace, check=False)
            if deleted.returncode != 0 and "No such file" not in deleted.stderr:
                problems.append(f"ip netns del {namespace}: {deleted.stderr.strip()}")
        leftover = [ns for ns in run_ip("ip", "netns", "list").stdout.split() if self.prefix in ns]
        if leftover:
            problems.append(f"namespaces left behind: {leftover}")
        return problems


@contextlib.contextmanager
def open_netns_lab() -> Iterator[NetnsLab]:
    """A bridge namespace to add hosts to; everything is removed on exit, and leftovers
    (other than stragglers it had to kill) fail the test."""
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are Linux-only")
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (`ip`) for network namespaces")
    prefix = f"mnt-{secrets.token_hex(3)}"
    lab = NetnsLab(prefix, f"{prefix}-br")
    created = run_ip("ip", "netns", "add", lab.bridge_namespace, check=False)
    if created.returncode != 0:
        pytest.skip(f"`ip netns add` does not work here: {created.stderr.strip()}")
    try:
        # No snooping: the bridge floods multicast like a plain switch (mDNS is
        # link-local and would be flooded anyway; this takes IGMP timing out of the test).
        run_ip(
            "ip", "-n", lab.bridge_namespace, "link", "add", "br0", "type", "bridge",
            "mcast_snooping", "0",
        )  # fmt: skip
        run_ip("ip", "-n", lab.bridge_namespace, "link", "set", "br0", "up")
        yield lab
    finally:
        problems = lab.cleanup()
        assert not [p for p in problems if not p.startswith("killed straggler")], problems
