"""meshnode.config: layers and precedence, dev defaults, service files, gossip overrides,
and every error naming its key and its source."""

from __future__ import annotations

import base64
import dataclasses
import json
import pickle
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ca.issuer import CertificateAuthority
from gossip.config import DEFAULT, PRESETS, WAN, GossipConfig
from meshnode.config import (
    DEFAULTS,
    DEV_DEFAULTS,
    KEYS,
    MAX_CONFIG_FILE_BYTES,
    AgentConfig,
    HostPort,
    environment_variables,
    load_config,
    parse_duration,
)
from meshnode.errors import ConfigError, MeshError

KEY = base64.b64encode(bytes(range(32))).decode()
TOKEN = "0123456789abcdef-token"
ROOT = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(
    cwd: Path,
    flags: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
) -> AgentConfig:
    options: dict[str, object] = {"data_dir": "data"}
    options.update(flags or {})
    return load_config(options, env or {}, cwd=cwd, hostname="testhost")


def config_error(
    cwd: Path, flags: Mapping[str, object] | None = None, env: Mapping[str, str] | None = None
) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(cwd, flags, env)
    return info.value


def file_error(tmp_path: Path, toml: str) -> ConfigError:
    path = write(tmp_path / "agent.toml", toml)
    error = config_error(tmp_path, {"config": str(path)})
    assert error.source == str(path)
    return error


# ------------------------------------------------------------------ defaults and dev


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert config.node_name == "testhost"
    assert config.data_dir == tmp_path / "data"
    assert (config.datacenter, config.cluster) == ("dc1", "meshnode")
    assert (config.bind_addr, config.advertise_addr, config.gossip_port) == ("0.0.0.0", None, 7946)
    assert config.http_addr == HostPort("127.0.0.1", 8500)
    assert str(config.http_addr) == "127.0.0.1:8500"
    assert config.server is False and config.bootstrap_expect == 0 and config.encrypt is None
    assert (config.log_level, config.log_format) == ("info", "auto")
    assert config.default_intention_policy == "deny"
    assert config.mdns.enabled and config.mdns.interface is None
    assert not config.acl.enabled and config.acl.token is None
    assert config.ca.leaf_ttl == 72 * 3600 and config.ca.cert_file is None
    assert (config.proxy.enabled, config.proxy.port) == (True, 20000)
    assert config.gossip == DEFAULT and config.gossip_preset == "default"
    assert config.services == () and config.config_file is None and config.config_dir is None
    assert config.sources == ("defaults", "flags: --data-dir")


def test_defaults_table_matches_the_dataclass_defaults(tmp_path: Path) -> None:
    """DEFAULTS (what load uses) and the field defaults (what the docs show) agree."""
    by_path = {field.name: field for field in dataclasses.fields(AgentConfig)}
    config = load(tmp_path)
    for path, value in DEFAULTS.items():
        if path == "gossip.preset":
            assert config.gossip_preset == value
            continue
        table, _, name = path.rpartition(".")
        if table:
            section = next(f for f in dataclasses.fields(AgentConfig) if f.name == table)
            assert callable(section.default_factory)
            default = getattr(section.default_factory(), name)
        else:
            default = by_path[path].default
        assert default == value, path


def test_dev_defaults(tmp_path: Path) -> None:
    config = load_config({"dev": True}, {}, cwd=tmp_path, hostname="laptop")
    assert config.dev is True
    assert config.data_dir is None  # the agent makes a temporary directory
    assert config.node_name == "laptop"
    assert (config.bind_addr, config.advertise_addr) == ("127.0.0.1", "127.0.0.1")
    assert config.server is True and config.bootstrap_expect == 1
    assert config.default_intention_policy == "allow"
    assert config.mdns.enabled is False
    assert config.log_format == "console"
    assert config.sources == ("defaults", "--dev defaults", "flags: --dev")
    assert set(DEV_DEFAULTS) <= set(KEYS)


@pytest.mark.parametrize(
    ("flags", "env", "toml"),
    [
        ({"dev": True}, {}, ""),
        ({}, {"MESHNODE_DEV": "true"}, ""),
        ({}, {"MESHNODE_DEV": "1"}, ""),
        ({}, {}, "dev = true\n"),
    ],
)
def test_dev_from_any_layer(
    tmp_path: Path, flags: dict[str, object], env: dict[str, str], toml: str
) -> None:
    path = write(tmp_path / "agent.toml", toml)
    config = load_config({"config": str(path), **flags}, env, cwd=tmp_path, hostname="h")
    assert config.dev and config.server and config.data_dir is None


def test_explicit_settings_beat_dev_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path / "agent.toml",
        'bind_addr = "0.0.0.0"\ndefault_intention_policy = "deny"\n[mdns]\nenabled = true\n',
    )
    config = load(
        tmp_path,
        {"dev": True, "config": str(path), "log_format": "json", "data_dir": "keep"},
    )
    assert config.bind_addr == "0.0.0.0"
    assert config.default_intention_policy == "deny"
    assert config.mdns.enabled is True
    assert config.log_format == "json"
    assert config.data_dir == tmp_path / "keep"  # an explicit data dir persists dev state
    assert config.advertise_addr == "127.0.0.1" and config.server is True


def test_data_dir_is_required_without_dev(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({}, {}, cwd=tmp_path, hostname="h")
    assert info.value.key == "data_dir"
    path = write(tmp_path / "agent.toml", 'node_name = "a"\n')
    with pytest.raises(ConfigError) as info:
        load_config({"config": str(path)}, {}, cwd=tmp_path, hostname="h")
    assert str(info.value).startswith(f"config error: data_dir in {path}: required unless --dev")


# ------------------------------------------------------------------ precedence


def _layers(tmp_path: Path, levels: set[str]) -> tuple[dict[str, object], dict[str, str]]:
    """node_name set in the given layers (file, dir, env, flag), named after the layer."""
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    toml = 'data_dir = "data"\n' + ('node_name = "file"\n' if "file" in levels else "")
    config_file = write(tmp_path / "agent.toml", toml)
    if "dir" in levels:
        write(conf_d / "node.json", json.dumps({"node_name": "dir"}))
    flags: dict[str, object] = {"config": str(config_file), "config_dir": str(conf_d)}
    env = {"MESHNODE_NODE": "env"} if "env" in levels else {}
    if "flag" in levels:
        flags["node"] = "flag"
    return flags, env


@pytest.mark.parametrize(
    ("levels", "winner"),
    [
        (set(), "testhost"),
        ({"file"}, "file"),
        ({"file", "dir"}, "dir"),
        ({"file", "dir", "env"}, "env"),
        ({"file", "dir", "env", "flag"}, "flag"),
        ({"file", "flag"}, "flag"),
        ({"dir", "env"}, "env"),
        ({"file", "env"}, "env"),
    ],
)
def test_later_layers_win(tmp_path: Path, levels: set[str], winner: str) -> None:
    flags, env = _layers(tmp_path, levels)
    assert load_config(flags, env, cwd=tmp_path, hostname="testhost").node_name == winner


def test_config_dir_files_apply_in_name_order_and_tables_merge(tmp_path: Path) -> None:
    conf_d = tmp_path / "conf.d"
    write(
        tmp_path / "agent.toml",
        'data_dir = "d"\nconfig_dir = "conf.d"\nretry_join = ["10.0.0.1"]\n'
        '[gossip]\npreset = "lan"\nprobe_interval = "2s"\n',
    )
    write(conf_d / "20-last.toml", 'cluster = "second"\nretry_join = ["10.0.0.3"]\n')
    write(conf_d / "10-first.json", json.dumps({"cluster": "first", "gossip": {"gossip_nodes": 5}}))
    write(conf_d / "README.md", "not config")
    write(conf_d / ".hidden.toml", "this is = not toml")
    (conf_d / "sub.toml").mkdir()
    config = load_config({"config": "agent.toml"}, {}, cwd=tmp_path, hostname="h")
    assert config.cluster == "second"
    assert config.retry_join == (HostPort("10.0.0.3", 7946),)  # lists replace
    assert config.gossip_preset == "lan"
    assert (config.gossip.probe_interval, config.gossip.gossip_nodes) == (2.0, 5)
    assert config.config_dir == conf_d
    assert config.sources == (
        "defaults",
        str(tmp_path / "agent.toml"),
        str(conf_d / "10-first.json"),
        str(conf_d / "20-last.toml"),
    )


@pytest.mark.parametrize(
    ("in_file", "env", "flag", "chosen"),
    [
        (True, False, False, "file-dir"),
        (True, True, False, "env-dir"),
        (True, True, True, "flag-dir"),
    ],
)
def test_config_dir_location_follows_precedence(
    tmp_path: Path, in_file: bool, env: bool, flag: bool, chosen: str
) -> None:
    for name in ("file-dir", "env-dir", "flag-dir"):
        write(tmp_path / name / "name.toml", f'node_name = "{name}"\n')
    toml = 'data_dir = "d"\n' + ('config_dir = "file-dir"\n' if in_file else "")
    flags: dict[str, object] = {"config": str(write(tmp_path / "agent.toml", toml))}
    if flag:
        flags["config_dir"] = "flag-dir"
    environ = {"MESHNODE_CONFIG_DIR": str(tmp_path / "env-dir")} if env else {}
    config = load_config(flags, environ, cwd=tmp_path, hostname="h")
    assert config.node_name == chosen
    assert config.config_dir == tmp_path / chosen


def test_relative_paths(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    write(etc / "agent.toml", 'data_dir = "state"\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    config = load_config({"config": "../etc/agent.toml"}, {}, cwd=elsewhere, hostname="h")
    assert config.data_dir == etc / "state"  # relative to the file that says it
    config = load_config(
        {"config": str(etc / "agent.toml")}, {"MESHNODE_DATA_DIR": "x"}, cwd=elsewhere, hostname="h"
    )
    assert config.data_dir == elsewhere / "x"  # relative to the working directory
    config = load_config({"data_dir": "/abs/dir"}, {}, cwd=elsewhere, hostname="h")
    assert config.data_dir == Path("/abs/dir")


def test_environment_values(tmp_path: Path) -> None:
    env = {
        "MESHNODE_NODE": "n1",
        "MESHNODE_HTTP_ADDR": "[::1]:8600",
        "MESHNODE_JOIN": "10.0.0.1, seed.example.com:7000,,[fd00::1]:8301",
        "MESHNODE_ENCRYPT": KEY,
        "MESHNODE_SERVER": "true",
        "MESHNODE_BOOTSTRAP_EXPECT": "3",
        "MESHNODE_ENABLE_SCRIPT_CHECKS": "0",
        "MESHNODE_RECONNECT_TIMEOUT": "8h",
        "MESHNODE_GOSSIP__PROBE_INTERVAL": "1.5",
        "MESHNODE_GOSSIP__LIFEGUARD": "false",
        "MESHNODE_ACL__ENABLED": "true",
        "MESHNODE_ACL__TOKEN": TOKEN,
        "MESHNODE_PROXY__PORT": "21000",
        "MESHNODE_LOG_LEVEL": "DEBUG",
        "MESHNODE_ADVERTISE": "",  # empty: unset
        "MESHNODE_LOG_FORMAT": "",
        "PATH": "/usr/bin",  # not ours
        "MESHNODEX": "ignored",
    }
    config = load(tmp_path, env=env)
    assert config.node_name == "n1"
    assert config.http_addr == HostPort("::1", 8600) and str(config.http_addr) == "[::1]:8600"
    assert config.retry_join == (
        HostPort("10.0.0.1", 7946),
        HostPort("seed.example.com", 7000),
        HostPort("fd00::1", 8301),
    )
    assert config.encrypt == bytes(range(32))
    assert config.server and config.bootstrap_expect == 3 and not config.enable_script_checks
    assert config.reconnect_timeout == 8 * 3600 == config.gossip.reconnect_timeout
    assert config.gossip.probe_interval == 1.5 and config.gossip.lifeguard is False
    assert config.acl.enabled and config.acl.token == TOKEN
    assert config.proxy.port == 21000
    assert config.log_level == "debug"
    assert config.advertise_addr is None and config.log_format == "auto"
    assert config.sources[-2].startswith("environment: MESHNODE_ACL__ENABLED, ")


def test_flags_values(tmp_path: Path) -> None:
    flags: dict[str, object] = {
        "node": "n2",
        "cluster": "blue",
        "bind": "10.1.2.3",
        "advertise": "203.0.113.7",
        "gossip_port": "8301",
        "http_addr": "127.0.0.1:0",
        "join": ["10.0.0.1", "10.0.0.2:8301"],
        "encrypt": KEY,
        "server": True,
        "bootstrap_expect": "1",
        "log_level": "warning",
        "log_format": "json",
        "command": "agent",  # other argparse entries are ignored
    }
    config = load(tmp_path, flags)
    assert (config.node_name, config.cluster) == ("n2", "blue")
    assert (config.bind_addr, config.advertise_addr) == ("10.1.2.3", "203.0.113.7")
    assert config.gossip_port == 8301 and config.http_addr == HostPort("127.0.0.1", 0)
    assert config.retry_join == (HostPort("10.0.0.1", 7946), HostPort("10.0.0.2", 8301))
    assert config.server and config.bootstrap_expect == 1
    assert (config.log_level, config.log_format) == ("warning", "json")


def write_operator_ca(directory: Path) -> None:
    """A real CA certificate and key as an operator would supply them."""
    root = CertificateAuthority.create_root("operator.example", datetime.now(UTC)).active_root
    (directory / "ca.pem").write_text(root.cert_pem)
    (directory / "ca.key").write_text(root.signing_key_pem)


def test_operator_ca_that_cannot_sign_is_refused_at_start(tmp_path: Path) -> None:
    write_operator_ca(tmp_path)
    other = CertificateAuthority.create_root("other.example", datetime.now(UTC)).active_root
    (tmp_path / "ca.key").write_text(other.signing_key_pem)
    error = file_error(tmp_path, '[ca]\ncert_file = "ca.pem"\nkey_file = "ca.key"\n')
    assert error.key == "ca.cert_file"
    assert "does not match" in error.message
    (tmp_path / "ca.pem").write_text("not a certificate")
    error = file_error(tmp_path, '[ca]\ncert_file = "ca.pem"\nkey_file = "ca.key"\n')
    assert (error.key, error.message) == ("ca.cert_file", "ca.cert_file holds no PEM certificate")


def test_file_values(tmp_path: Path) -> None:
    write_operator_ca(tmp_path)
    path = write(
        tmp_path / "agent.toml",
        f"""
        node_name = "web-1.example"
        datacenter = "eu_west-1"
        data_dir = "/var/lib/meshnode"
        retry_interval = "2s"
        retry_max_interval = "1m"
        retry_max = 5
        enable_script_checks = true
        reconnect_timeout = 3600
        default_intention_policy = "allow"
        encrypt = "{KEY}"
        [mdns]
        interface = "eth0"
        [acl]
        enabled = true
        token = "{TOKEN}"
        [ca]
        cert_file = "ca.pem"
        key_file = "ca.key"
        leaf_ttl = "24h"
        trust_domain = "11111111-2222.meshnode"
        [proxy]
        enabled = false
        port = 8500
        """,
    )
    config = load_config({"config": str(path)}, {}, cwd=Path("/"), hostname="h")
    assert (config.node_name, config.datacenter) == ("web-1.example", "eu_west-1")
    assert config.data_dir == Path("/var/lib/meshnode")
    assert (config.retry_interval, config.retry_max_interval, config.retry_max) == (2, 60, 5)
    assert config.enable_script_checks and config.reconnect_timeout == 3600
    assert config.default_intention_policy == "allow"
    assert config.mdns.interface == "eth0"
    assert config.ca.cert_file == tmp_path / "ca.pem" and config.ca.key_file == tmp_path / "ca.key"
    assert config.ca.leaf_ttl == 86400 and config.ca.trust_domain == "11111111-2222.meshnode"
    assert config.proxy == dataclasses.replace(config.proxy, enabled=False, port=8500)


def test_secrets_stay_out_of_repr(tmp_path: Path) -> None:
    config = load(
        tmp_path, {"encrypt": KEY}, {"MESHNODE_ACL__ENABLED": "1", "MESHNODE_ACL__TOKEN": TOKEN}
    )
    text = repr(config)
    assert KEY not in text and TOKEN not in text and repr(bytes(range(32))) not in text


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.node_name = "other"  # type: ignore[misc]


# ------------------------------------------------------------------ services


def test_service_files(tmp_path: Path) -> None:
    conf_d = tmp_path / "conf.d"
    main = write(
        tmp_path / "agent.toml",
        'data_dir = "d"\n[[service]]\nname = "web"\nport = 80\n[[service]]\nname = "db"\n',
    )
    write(conf_d / "a.json", json.dumps({"service": {"name": "api", "tags": ["v1"]}}))
    write(conf_d / "b.json", json.dumps({"services": [{"name": "x"}, {"name": "y"}]}))
    write(conf_d / "c.toml", '[service]\nname = "cache"\n[service.check]\nttl = "10s"\n')
    write(conf_d / "d.toml", '[[services]]\nname = "z"\n')
    config = load_config(
        {"config": str(main), "config_dir": str(conf_d)}, {}, cwd=tmp_path, hostname="h"
    )
    found = [(s.source.name, s.key, s.definition["name"]) for s in config.services]
    assert found == [
        ("agent.toml", "service[0]", "web"),
        ("agent.toml", "service[1]", "db"),
        ("a.json", "service", "api"),
        ("b.json", "services[0]", "x"),
        ("b.json", "services[1]", "y"),
        ("c.toml", "service", "cache"),
        ("d.toml", "services[0]", "z"),
    ]
    assert dict(config.services[0].definition) == {"name": "web", "port": 80}
    assert config.services[2].definition["tags"] == ["v1"]
    assert config.services[5].definition["check"] == {"ttl": "10s"}
    with pytest.raises(TypeError):
        config.services[0].definition["name"] = "changed"  # type: ignore[index]


@pytest.mark.parametrize(
    ("document", "key", "message"),
    [
        ({"service": "web"}, "service", 'expected a table or an array of tables, got "web"'),
        ({"services": [{"name": "a"}, 5]}, "services[1]", "expected a table (a service"),
        ({"services": None}, "services", "got null"),
    ],
)
def test_bad_service_entries(tmp_path: Path, document: object, key: str, message: str) -> None:
    path = write(tmp_path / "conf.d" / "svc.json", json.dumps(document))
    error = config_error(tmp_path, {"config_dir": "conf.d"})
    assert (error.key, error.source) == (key, str(path))
    assert message in error.message


# ------------------------------------------------------------------ gossip


def _changed_value(name: str, base: GossipConfig) -> object:
    current = getattr(base, name)
    if isinstance(current, bool):
        return not current
    if isinstance(current, int):
        return current + 1
    if name == "relay_nack_fraction":
        return 0.5
    if name == "probe_timeout":
        return current / 2
    return current * 2 if current else 1.0


GOSSIP_FIELDS = [f.name for f in dataclasses.fields(GossipConfig) if f.name != "reconnect_timeout"]


@pytest.mark.parametrize("name", GOSSIP_FIELDS)
@pytest.mark.parametrize("layer", ["toml", "env"])
def test_every_gossip_field_is_overridable(tmp_path: Path, name: str, layer: str) -> None:
    value = _changed_value(name, DEFAULT)
    flags: dict[str, object] = {}
    env: dict[str, str] = {}
    if layer == "toml":
        text = json.dumps(value)  # TOML and JSON agree on these scalars
        flags["config"] = str(write(tmp_path / "agent.toml", f"[gossip]\n{name} = {text}\n"))
    else:
        env[f"MESHNODE_GOSSIP__{name.upper()}"] = str(value).lower()
    config = load(tmp_path, flags, env)
    assert getattr(config.gossip, name) == value
    expected = DEFAULT.replace(**{name: value}, reconnect_timeout=72 * 3600.0)
    assert config.gossip == expected


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_gossip_presets(tmp_path: Path, name: str) -> None:
    config = load(tmp_path, env={"MESHNODE_GOSSIP__PRESET": name})
    assert config.gossip_preset == name
    assert config.gossip == PRESETS[name].replace(reconnect_timeout=72 * 3600.0)


def test_gossip_durations_and_reconnect_timeout(tmp_path: Path) -> None:
    path = write(
        tmp_path / "agent.toml",
        'reconnect_timeout = "1h30m"\n[gossip]\npreset = "wan"\n'
        'probe_interval = "1m"\nprobe_timeout = "500ms"\ntcp_timeout = 12\n',
    )
    config = load(tmp_path, {"config": str(path)})
    assert config.gossip == WAN.replace(
        probe_interval=60.0, probe_timeout=0.5, tcp_timeout=12.0, reconnect_timeout=5400.0
    )


@pytest.mark.parametrize(
    ("toml", "key", "message"),
    [
        ('probe_interval = "fast"', "gossip.probe_interval", 'expected a duration like "1s"'),
        ('probe_timeout = "2s"', "gossip.probe_timeout", "must not exceed probe_interval"),
        ("probe_interval = 0", "gossip.probe_interval", "probe_interval must be > 0"),
        ("udp_buffer_size = 100", "gossip.udp_buffer_size", "between 512 and 65000"),
        ("suspicion_mult = 0", "gossip.suspicion_mult", "suspicion multipliers must be >= 1"),
        ("indirect_checks = -1", "gossip.indirect_checks", "between 0 and"),
        ("indirect_checks = 1.5", "gossip.indirect_checks", "expected an integer, got 1.5"),
        ('lifeguard = "yes"', "gossip.lifeguard", 'expected true or false, got "yes"'),
        ("relay_nack_fraction = 1.5", "gossip.relay_nack_fraction", "must be > 0 and <= 1"),
        ('preset = "fast"', "gossip.preset", "expected one of default, lan, wan, local, swim"),
        ("reconnect_timeout = 5", "gossip.reconnect_timeout", "did you mean reconnect_timeout"),
        ("probe_intervall = 1", "gossip.probe_intervall", "did you mean gossip.probe_interval?"),
        ("[gossip.sub]", "gossip.sub", "unknown key"),
    ],
)
def test_bad_gossip_settings_name_the_key(
    tmp_path: Path, toml: str, key: str, message: str
) -> None:
    error = file_error(tmp_path, f"[gossip]\n{toml}\n")
    assert error.key == key
    assert message in error.message


def test_gossip_cross_field_error_blames_the_layer_that_set_it(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.toml", '[gossip]\nprobe_interval = "300ms"\n')
    error = config_error(
        tmp_path, {"config": str(path)}, {"MESHNODE_GOSSIP__PROBE_TIMEOUT": "400ms"}
    )
    assert error.key == "gossip.probe_timeout"
    assert error.source == "environment variable MESHNODE_GOSSIP__PROBE_TIMEOUT"


# ------------------------------------------------------------------ errors


def test_error_text_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    error = file_error(tmp_path, '[gossip]\nprobe_interval = "fast"\n')
    assert str(error) == (
        f"config error: gossip.probe_interval in {path}: "
        'expected a duration like "1s" or "500ms", got "fast"'
    )
    assert isinstance(error, MeshError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.key, copy.source, copy.message, str(copy)) == (
        error.key,
        error.source,
        error.message,
        str(error),
    )


@pytest.mark.parametrize(
    ("toml", "key", "message"),
    [
        ('node_nme = "a"', "node_nme", "unknown key; did you mean node_name?"),
        ('node = "a"', "node", "did you mean node_name?"),
        ('bind = "1.2.3.4"', "bind", "did you mean bind_addr?"),
        ('join = ["a"]', "join", "did you mean retry_join?"),
        ('start_join = ["a"]', "start_join", "did you mean retry_join?"),
        ("ports = 1", "ports", "did you mean gossip_port, http_addr and proxy.port?"),
        ("zzz = 1", "zzz", "unknown key"),
        ("[gosip]\nprobe_interval = 1", "gosip", "did you mean gossip?"),
        ("gossip = 5", "gossip", "expected a table, got 5"),
        ("[mdns]\nenable = false", "mdns.enable", "did you mean mdns.enabled?"),
        ('node_name = "bad name"', "node_name", "expected a name of letters"),
        (f'node_name = "{"n" * 129}"', "node_name", "expected a name"),
        ("node_name = 5", "node_name", "expected a string, got 5"),
        ('cluster = ""', "cluster", "expected letters"),
        ('datacenter = "dc.1"', "datacenter", "expected letters"),
        ('gossip_port = "7946"', "gossip_port", 'expected a port number, got "7946"'),
        ("gossip_port = true", "gossip_port", "expected a port number, got true"),
        ("gossip_port = 70000", "gossip_port", "must be between 0 and 65535, got 70000"),
        ('bind_addr = "1.2.3"', "bind_addr", 'expected an IP address, got "1.2.3"'),
        ('bind_addr = "localhost"', "bind_addr", "expected an IP address"),
        ('advertise_addr = "0.0.0.0"', "advertise_addr", "is a wildcard"),
        ('advertise_addr = "::"', "advertise_addr", "is a wildcard"),
        ('http_addr = "127.0.0.1"', "http_addr", 'expected "IP:port" or "[IPv6]:port"'),
        ('http_addr = "localhost:8500"', "http_addr", "expected an IP address before the port"),
        ('http_addr = "127.0.0.1:99999"', "http_addr", "bad port"),
        ('http_addr = "[::1:8500"', "http_addr", 'expected "[IPv6]:port"'),
        ('retry_join = "10.0.0.1"', "retry_join", "expected an array of addresses"),
        ('retry_join = ["10.0.0.1:x"]', "retry_join", "bad port"),
        ('retry_join = ["bad host!"]', "retry_join", "expected host, host:port or [IPv6]:port"),
        ("retry_join = [1]", "retry_join", "expected an address, got 1"),
        ('retry_interval = "-1s"', "retry_interval", "expected a duration"),
        ("retry_interval = 0", "retry_interval", "must be between 1ms and 3650d"),
        ("retry_interval = inf", "retry_interval", "must be between"),
        ('retry_interval = "1x"', "retry_interval", 'got "1x"'),
        ('retry_interval = "1s 2s"', "retry_interval", "expected a duration"),
        ('retry_interval = "5s"\nretry_max_interval = "1s"', "retry_max_interval", "must not"),
        ('encrypt = "not base64!"', "encrypt", "not valid base64"),
        ('encrypt = "AAAA"', "encrypt", "16, 24 or 32 bytes, not 3"),
        ('log_level = "verbose"', "log_level", "expected one of debug, info, warning, error"),
        ('log_format = "xml"', "log_format", "expected one of auto, json, console"),
        ('default_intention_policy = "maybe"', "default_intention_policy", "allow, deny"),
        ('reconnect_timeout = "0s"', "reconnect_timeout", "must be between 1s"),
        ("bootstrap_expect = 3", "bootstrap_expect", "only servers bootstrap"),
        ("[acl]\nenabled = true", "acl.enabled", "acl.token is not set"),
        ('[acl]\ntoken = "short"', "acl.token", "at least 16 characters"),
        ('[ca]\ncert_file = "missing.pem"', "ca.cert_file", "no such file"),
        ('[ca]\nleaf_ttl = "10s"', "ca.leaf_ttl", "must be between 1m and 365d"),
        ('[ca]\ntrust_domain = "Upper.Case"', "ca.trust_domain", "SPIFFE trust domain"),
        ('[mdns]\ninterface = "a very long interface name"', "mdns.interface", "interface"),
        ("[proxy]\nport = -1", "proxy.port", "must be between 0 and 65535"),
        ("gossip_port = 8500", "gossip_port", "port 8500 is also http_addr's port"),
        ("[proxy]\nport = 7946", "proxy.port", "port 7946 is also gossip_port's port"),
    ],
)
def test_file_errors_name_key_and_file(tmp_path: Path, toml: str, key: str, message: str) -> None:
    error = file_error(tmp_path, 'data_dir = "d"\n' + toml + "\n")
    assert error.key == key
    assert message in error.message, error.message


def test_ca_cert_and_key_go_together(tmp_path: Path) -> None:
    (tmp_path / "ca.key").write_text("key")
    error = file_error(tmp_path, '[ca]\nkey_file = "ca.key"\n')
    assert (error.key, error.message) == ("ca.key_file", "set ca.cert_file too (or neither)")


def test_port_zero_never_collides(tmp_path: Path) -> None:
    config = load(tmp_path, {"gossip_port": "0", "http_addr": "127.0.0.1:0"})
    assert config.gossip_port == 0 and config.http_addr.port == 0
    config = load(tmp_path, {"http_addr": "127.0.0.1:20000"}, {"MESHNODE_PROXY__ENABLED": "false"})
    assert config.http_addr.port == 20000


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("")
    error = config_error(tmp_path)
    assert (error.key, error.source) == ("data_dir", "flag --data-dir")
    assert "is not a directory" in error.message


def test_bad_default_host_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"dev": True}, {}, cwd=tmp_path, hostname="my host")
    assert info.value.key == "node_name"
    assert "host name 'my host'" in info.value.source


@pytest.mark.parametrize(
    ("env", "key", "source", "message"),
    [
        (
            {"MESHNODE_GOSSIP_PORT": "x"},
            "gossip_port",
            "environment variable MESHNODE_GOSSIP_PORT",
            'expected a port number, got "x"',
        ),
        (
            {"MESHNODE_SERVER": "yes"},
            "server",
            "environment variable MESHNODE_SERVER",
            'expected true or false, got "yes"',
        ),
        (
            {"MESHNODE_GOSSIP__PROBE_INTERVAL": "fast"},
            "gossip.probe_interval",
            "environment variable MESHNODE_GOSSIP__PROBE_INTERVAL",
            'expected a duration like "1s" or "500ms", got "fast"',
        ),
        (
            {"MESHNODE_NODE_NAME": "x"},
            "MESHNODE_NODE_NAME",
            "the environment",
            "unknown variable; did you mean MESHNODE_NODE?",
        ),
        (
            {"MESHNODE_RETRY_JOIN": "x"},
            "MESHNODE_RETRY_JOIN",
            "the environment",
            "did you mean MESHNODE_JOIN?",
        ),
        (
            {"MESHNODE_GOSSIP__PROBE_INTERVL": "1"},
            "MESHNODE_GOSSIP__PROBE_INTERVL",
            "the environment",
            "did you mean MESHNODE_GOSSIP__PROBE_INTERVAL?",
        ),
        (
            {"MESHNODE_BOOTSTRAP_EXPECT": "2"},
            "bootstrap_expect",
            "environment variable MESHNODE_BOOTSTRAP_EXPECT",
            "only servers bootstrap",
        ),
    ],
)
def test_environment_errors(
    tmp_path: Path, env: dict[str, str], key: str, source: str, message: str
) -> None:
    error = config_error(tmp_path, env=env)
    assert (error.key, error.source) == (key, source)
    assert message in error.message


@pytest.mark.parametrize(
    ("flags", "key", "source"),
    [
        ({"gossip_port": "abc"}, "gossip_port", "flag --gossip-port"),
        ({"http_addr": "nope"}, "http_addr", "flag --http-addr"),
        ({"join": ["ok", "bad:port"]}, "retry_join", "flag --join"),
        ({"encrypt": "short"}, "encrypt", "flag --encrypt"),
        ({"node": ""}, "node_name", "flag --node"),
        ({"log_format": "xml"}, "log_format", "flag --log-format"),
        ({"data_dir": ""}, "data_dir", "flag --data-dir"),
    ],
)
def test_flag_errors(tmp_path: Path, flags: dict[str, object], key: str, source: str) -> None:
    error = config_error(tmp_path, flags)
    assert (error.key, error.source) == (key, source)


def test_collision_blames_the_explicit_setting(tmp_path: Path) -> None:
    error = config_error(tmp_path, {"http_addr": "127.0.0.1:7946"})
    assert (error.key, error.source) == ("http_addr", "flag --http-addr")
    assert error.message == "port 7946 is also gossip_port's port"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("agent.toml", "a = \n", "invalid TOML: Invalid value (at line 1, column 5)"),
        ("agent.toml", 'x = "1"\nx = "2"\n', "invalid TOML: Cannot overwrite a value (at line 2"),
        ("agent.json", '{"a": 1,\n  "b" 2}', "invalid JSON: Expecting ':' delimiter (at line 2"),
        ("agent.json", '{"a": 1, "a": 2}', 'invalid JSON: key "a" appears twice'),
        ("agent.json", "[1, 2]", "expected a JSON object, got an array"),
    ],
)
def test_unparsable_files(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = write(tmp_path / name, content)
    error = config_error(tmp_path, {"config": name})
    assert (error.key, error.source) == (None, str(path))
    assert error.message.startswith(message), error.message
    assert str(error).startswith(f"config error: {path}: ")


def test_unreadable_files(tmp_path: Path) -> None:
    error = config_error(tmp_path, {"config": "missing.toml"})
    assert error.source == str(tmp_path / "missing.toml")
    assert error.message == "cannot read: No such file or directory"

    (tmp_path / "bin.toml").write_bytes(b"a = '\xff'\n")
    error = config_error(tmp_path, {"config": "bin.toml"})
    assert error.message == "not UTF-8 text (byte 5)"

    (tmp_path / "big.toml").write_bytes(b"#" * (MAX_CONFIG_FILE_BYTES + 1))
    error = config_error(tmp_path, {"config": "big.toml"})
    assert error.message == f"larger than {MAX_CONFIG_FILE_BYTES} bytes"

    error = config_error(tmp_path, {"config": ""})
    assert error.source == "flag --config"


def test_config_dir_errors(tmp_path: Path) -> None:
    error = config_error(tmp_path, env={"MESHNODE_CONFIG_DIR": "nowhere"})
    assert (error.key, error.source) == ("config_dir", "environment variable MESHNODE_CONFIG_DIR")
    assert error.message.startswith(f"cannot read directory {tmp_path / 'nowhere'}")

    nested = write(tmp_path / "conf.d" / "x.toml", 'config_dir = "other"\n')
    error = config_error(tmp_path, {"config_dir": "conf.d"})
    assert (error.key, error.source) == ("config_dir", str(nested))

    bad = write(tmp_path / "conf2" / "y.json", '{"gossip": {"probe_interval": "fast"}}')
    error = config_error(tmp_path, {"config_dir": "conf2"})
    assert (error.key, error.source) == ("gossip.probe_interval", str(bad))


# ------------------------------------------------------------------ pieces


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("500ms", 0.5),
        ("1.5", 1.5),
        ("2", 2.0),
        ("1h30m", 5400.0),
        ("72h", 259200.0),
        ("2d", 172800.0),
        (".5s", 0.5),
        (" 3m ", 180.0),
        ("1m0.5s", 60.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "fast", "s", "10 s", "-1s", "1s2", "1y", "1e3s", "nan"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


def test_docs_cover_every_key_and_variable() -> None:
    """docs/configuration.md is the reference: it must name every key and variable."""
    docs = (ROOT / "docs" / "configuration.md").read_text()
    for path in KEYS:
        name = path.rpartition(".")[2] if path.startswith("gossip.") else path
        assert re.search(rf"`{re.escape(name)}`", docs), path
    for variable in environment_variables():
        if variable.startswith("MESHNODE_GOSSIP__") and variable != "MESHNODE_GOSSIP__PRESET":
            continue  # documented by the rule, with one example
        assert variable in docs, variable


def test_docs_example_loads(tmp_path: Path) -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text()
    toml = re.search(r"```toml\n(.*?)```", docs, re.S)
    service = re.search(r"```json\n(.*?)```", docs, re.S)
    assert toml and service
    agent = write(tmp_path / "agent.toml", toml.group(1))
    write(tmp_path / "conf.d" / "api.json", service.group(1))
    config = load_config(
        {"config": str(agent), "config_dir": str(tmp_path / "conf.d")},
        {"MESHNODE_ACL__TOKEN": TOKEN, "MESHNODE_ENCRYPT": KEY},
        cwd=tmp_path,
        hostname="h",
    )
    assert config.node_name == "web-1" and config.bootstrap_expect == 3
    assert config.gossip.probe_interval == 0.5 and config.acl.token == TOKEN
    assert [s.definition["name"] for s in config.services] == ["web", "api"]


def test_dev_agent_that_is_not_a_server(tmp_path: Path) -> None:
    config = load_config({"dev": True}, {"MESHNODE_SERVER": "false"}, cwd=tmp_path, hostname="h")
    assert (config.server, config.bootstrap_expect) == (False, 0)
