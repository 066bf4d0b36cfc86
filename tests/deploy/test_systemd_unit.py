"""deploy/systemd/meshnode.service says what the agent's systemd support relies on.

The agent's side (READY/RELOADING/STOPPING/WATCHDOG) is tested in
tests/meshnode/test_systemd.py; these tests pin the unit settings that must match it,
and run ``systemd-analyze verify`` where systemd is installed.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "meshnode.service"


def _unit() -> configparser.ConfigParser:
    # strict=False: systemd allows a key more than once (the later wins, or, for
    # lists, adds); interpolation off: "$MAINPID" and "%" are systemd's, not ours.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(UNIT)
    return parser


def test_the_agent_notifies_and_is_reloaded_by_signal() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert service["TimeoutStopSec"]


def test_exec_start_matches_the_documented_layout() -> None:
    command = _unit()["Service"]["ExecStart"].split()
    assert command[:2] == ["/usr/local/bin/meshnode", "agent"]
    options = dict(zip(command[2::2], command[3::2], strict=True))
    assert options == {
        "--config": "/etc/meshnode/agent.toml",
        "--config-dir": "/etc/meshnode/meshnode.d",
        "--data-dir": "/var/lib/meshnode",
    }


def test_state_user_and_limits() -> None:
    service = _unit()["Service"]
    assert service["StateDirectory"] == "meshnode"
    assert service["StateDirectoryMode"] == "0700"
    assert service["User"] == "meshnode"
    assert service["LimitNOFILE"] == "65536"
    assert service["SyslogIdentifier"] == "meshnode"
    # Every port the agent binds is unprivileged: no capability at all.
    assert service["CapabilityBoundingSet"] == ""


def test_hardening() -> None:
    service = _unit()["Service"]
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "SystemCallFilter": "@system-service",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
    }
    assert {key: service.get(key) for key in expected} == expected
    families = set(service["RestrictAddressFamilies"].split())
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart exists; point it at the interpreter instead of a
    # /usr/local/bin/meshnode this machine does not have.
    text = UNIT.read_text().replace("/usr/local/bin/meshnode", shutil.which("python3") or "/bin/sh")
    copy = tmp_path / "meshnode.service"
    copy.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "meshnode.service" not in result.stderr, result.stderr
