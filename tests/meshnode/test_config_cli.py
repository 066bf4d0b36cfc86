"""add_agent_arguments on a real argparse parser, feeding load_config."""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import pytest

from meshnode.config import HostPort, add_agent_arguments, load_config
from meshnode.errors import ConfigError

KEY = base64.b64encode(bytes(16)).decode()

#: The flags scripts rely on (the issue's list), each with whether it takes a value.
AGENT_FLAGS = {
    "--dev": False,
    "--config": True,
    "--config-dir": True,
    "--data-dir": True,
    "--node": True,
    "--cluster": True,
    "--bind": True,
    "--advertise": True,
    "--gossip-port": True,
    "--http-addr": True,
    "--join": True,
    "--encrypt": True,
    "--server": False,
    "--bootstrap-expect": True,
    "--log-level": True,
    "--log-format": True,
    "--proxy-port": True,
}


def agent_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshnode")
    commands = parser.add_subparsers(dest="command", required=True)
    add_agent_arguments(commands.add_parser("agent"))
    return parser


def parse(tmp_path: Path, *argv: str) -> argparse.Namespace:
    return agent_parser().parse_args(["agent", *argv])


def test_registers_exactly_the_agent_flags() -> None:
    parser = argparse.ArgumentParser()
    add_agent_arguments(parser)
    options = {
        option: action.nargs != 0
        for action in parser._actions
        for option in action.option_strings
        if option not in ("-h", "--help")
    }
    assert options == AGENT_FLAGS


def test_no_flag_means_none(tmp_path: Path) -> None:
    args = parse(tmp_path)
    assert {name: value for name, value in vars(args).items() if name != "command"} == {
        "config": None,
        "dev": None,
        "config_dir": None,
        "data_dir": None,
        "node": None,
        "cluster": None,
        "bind": None,
        "advertise": None,
        "gossip_port": None,
        "http_addr": None,
        "join": None,
        "encrypt": None,
        "server": None,
        "bootstrap_expect": None,
        "log_level": None,
        "log_format": None,
        "proxy__port": None,
    }
    # so the environment still wins over "no flag"
    config = load_config(vars(args), {"MESHNODE_DEV": "1"}, cwd=tmp_path, hostname="h")
    assert config.dev is True


def test_every_flag_reaches_the_config(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "agent.toml").write_text('datacenter = "dc7"\n')
    args = parse(
        tmp_path,
        "--config", "agent.toml",
        "--config-dir", "conf.d",
        "--data-dir", "state",
        "--node", "n1",
        "--cluster", "c1",
        "--bind", "127.0.0.2",
        "--advertise", "192.0.2.10",
        "--gossip-port", "17946",
        "--http-addr", "127.0.0.1:18500",
        "--join", "127.0.0.1:7946",
        "--join", "seed.example.com",
        "--encrypt", KEY,
        "--server",
        "--bootstrap-expect", "3",
        "--log-level", "debug",
        "--log-format", "json",
    )  # fmt: skip
    config = load_config(vars(args), {}, cwd=tmp_path, hostname="h")
    assert config.datacenter == "dc7"
    assert config.config_file == tmp_path / "agent.toml"
    assert config.config_dir == tmp_path / "conf.d"
    assert config.data_dir == tmp_path / "state"
    assert (config.node_name, config.cluster) == ("n1", "c1")
    assert (config.bind_addr, config.advertise_addr) == ("127.0.0.2", "192.0.2.10")
    assert (config.gossip_port, config.http_addr) == (17946, HostPort("127.0.0.1", 18500))
    assert config.retry_join == (HostPort("127.0.0.1", 7946), HostPort("seed.example.com", 7946))
    assert config.encrypt == bytes(16)
    assert config.server and config.bootstrap_expect == 3
    assert (config.log_level, config.log_format) == ("debug", "json")
    assert config.sources[-1] == (
        "flags: --config-dir, --data-dir, --node, --cluster, --bind, --advertise, "
        "--gossip-port, --http-addr, --join, --encrypt, --server, --bootstrap-expect, "
        "--log-level, --log-format"
    )


def test_dev_flag(tmp_path: Path) -> None:
    config = load_config(vars(parse(tmp_path, "--dev")), {}, cwd=tmp_path, hostname="h")
    assert config.dev and config.data_dir is None and config.server


def test_two_agents_side_by_side(tmp_path: Path) -> None:
    """Different ports and data dirs on one host, joined to each other."""
    first = parse(
        tmp_path, "--data-dir", "a", "--node", "a", "--bind", "127.0.0.1",
        "--gossip-port", "17001", "--http-addr", "127.0.0.1:18001",
    )  # fmt: skip
    second = parse(
        tmp_path, "--data-dir", "b", "--node", "b", "--bind", "127.0.0.1",
        "--gossip-port", "17002", "--http-addr", "127.0.0.1:18002", "--join", "127.0.0.1:17001",
    )  # fmt: skip
    a = load_config(vars(first), {}, cwd=tmp_path, hostname="h")
    b = load_config(vars(second), {}, cwd=tmp_path, hostname="h")
    assert a.data_dir != b.data_dir
    assert b.retry_join == (HostPort("127.0.0.1", a.gossip_port),)


def test_flag_values_are_checked_by_load_config(tmp_path: Path) -> None:
    args = parse(tmp_path, "--data-dir", "d", "--gossip-port", "many")
    with pytest.raises(ConfigError) as info:
        load_config(vars(args), {}, cwd=tmp_path, hostname="h")
    assert str(info.value) == (
        'config error: gossip_port in flag --gossip-port: expected a port number, got "many"'
    )


def test_flags_beat_the_environment(tmp_path: Path) -> None:
    args = parse(tmp_path, "--data-dir", "d", "--node", "from-flag")
    config = load_config(vars(args), {"MESHNODE_NODE": "from-env"}, cwd=tmp_path, hostname="h")
    assert config.node_name == "from-flag"


def test_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="meshnode agent")
    add_agent_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in AGENT_FLAGS:
        assert flag in text
