"""deploy/nomad/*.nomad.hcl parse as HCL2 and keep the structure the agent relies on.

No Nomad here: these tests parse the job files (python-hcl2) and check the settings
that matter to meshnode, and render the agent's configuration template with a join
list to load it with the agent's own configuration loader.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from meshnode.config import load_config

hcl2 = pytest.importorskip("hcl2")

NOMAD = Path(__file__).resolve().parents[2] / "deploy" / "nomad"


def _load(name: str) -> dict[str, Any]:
    options = hcl2.SerializationOptions(
        with_comments=False, explicit_blocks=False, strip_string_quotes=True
    )
    with (NOMAD / name).open() as file:
        parsed: dict[str, Any] = hcl2.load(file, serialization_options=options)
    return parsed


def _only(blocks: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """The body of the one labelled block (``job "x" {…}`` parses to [{"x": body}])."""
    assert len(blocks) == 1, blocks
    body: dict[str, Any] = blocks[0][label]
    return body


def _heredoc(value: str) -> str:
    """The text of a ``<<-EOT … EOT`` heredoc, indentation stripped as HCL does."""
    assert value.startswith("<<-EOT\n") and value.endswith("EOT"), value[:40]
    return textwrap.dedent(value.removeprefix("<<-EOT\n").removesuffix("EOT"))


@pytest.fixture
def agent_task() -> dict[str, Any]:
    job = _only(_load("meshnode.nomad.hcl")["job"], "meshnode")
    group = _only(job["group"], "agent")
    return _only(group["task"], "meshnode")


def test_agent_job_runs_on_every_client() -> None:
    job = _only(_load("meshnode.nomad.hcl")["job"], "meshnode")
    assert job["type"] == "system"
    assert job["update"][0]["max_parallel"] == 1
    group = _only(job["group"], "agent")
    # The agent is the registry: it registers nowhere.
    assert "service" not in group
    assert group["restart"][0]["mode"] == "delay"
    network = group["network"][0]
    assert network["mode"] == "host"
    ports = {name: body["static"] for port in network["port"] for name, body in port.items()}
    assert ports == {"gossip": 7946, "http": 8500, "proxy": 20000}


def test_agent_task_leaves_on_sigterm(agent_task: dict[str, Any]) -> None:
    assert agent_task["driver"] == "raw_exec"
    assert agent_task["kill_signal"] == "SIGTERM"
    assert agent_task["kill_timeout"] == "20s"
    config = agent_task["config"][0]
    assert config["command"] == "/usr/local/bin/meshnode"
    args = config["args"]
    assert args[0] == "agent"
    assert args[args.index("--config") + 1] == "${NOMAD_TASK_DIR}/agent.toml"
    assert args[args.index("--data-dir") + 1] == "/var/lib/meshnode"


def test_agent_templates(agent_task: dict[str, Any]) -> None:
    by_destination = {t["destination"]: t for t in agent_task["template"]}
    config = by_destination["local/agent.toml"]
    assert (config["change_mode"], config["change_signal"]) == ("signal", "SIGHUP")
    secrets = by_destination["secrets/meshnode.env"]
    assert secrets["env"] is True
    text = _heredoc(secrets["data"])
    assert "MESHNODE_ENCRYPT=" in text and "MESHNODE_ACL__TOKEN=" in text


def test_agent_config_template_is_a_valid_agent_config(
    agent_task: dict[str, Any], tmp_path: Path
) -> None:
    template = next(t for t in agent_task["template"] if t["destination"] == "local/agent.toml")
    join = ["10.0.0.1", "10.0.0.2:7946"]
    # What Nomad's HCL evaluation makes of the one interpolation in it.
    text = _heredoc(template["data"]).replace("${jsonencode(var.retry_join)}", json.dumps(join))
    assert "${" not in text and "{{" not in text
    path = tmp_path / "agent.toml"
    path.write_text(text)
    config = load_config(
        {"config": str(path), "data_dir": str(tmp_path / "data")},
        {"MESHNODE_ACL__TOKEN": "t" * 32},
        cwd=tmp_path,
        hostname="client-1",
    )
    assert [f"{hp.host}:{hp.port}" for hp in config.retry_join] == [
        "10.0.0.1:7946",
        "10.0.0.2:7946",
    ]
    assert config.http_addr.host == "127.0.0.1" and config.http_addr.port == 8500
    assert config.mdns.enabled is False
    assert config.acl.enabled is True


def test_web_job_registers_with_the_local_agent() -> None:
    job = _only(_load("web.nomad.hcl")["job"], "web")
    assert job["type"] == "service"
    group = _only(job["group"], "web")
    assert "http" in group["network"][0]["port"][0]
    service = group["service"][0]
    assert service["provider"] == "consul"
    assert service["name"] == "web"
    assert service["port"] == "http"
    check = service["check"][0]
    assert check["type"] == "http"
    assert check["path"] == "/health"
    assert check["interval"] == "10s"
    assert check["timeout"] == "2s"
