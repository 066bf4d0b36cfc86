"""Consul-compatible parsing and output shapes of ``meshnode.model``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshnode.model import (
    DEFAULT_CHECK_TIMEOUT,
    CheckKind,
    CheckView,
    HealthStatus,
    NodeInfo,
    TaggedAddress,
    ValidationError,
    Weights,
    agent_service_json,
    catalog_service_json,
    check_json,
    check_to_body,
    format_duration,
    health_service_json,
    parse_check,
    parse_check_update,
    parse_duration,
    parse_registration,
    parse_service,
    service_to_body,
)

# ----------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("2h45m", 9900.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("300us", 0.0003),
        ("300µs", 0.0003),
        ("100ns", 1e-7),
        (".5s", 0.5),
        (10_000_000_000, 10.0),  # a JSON number is nanoseconds, as in Go
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "bad", ["10x", "", "s", "10", "1m-30s", "-5s", ".s", True, [], "1" * 80, 1e30]
)
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValidationError, match="invalid duration"):
        parse_duration(bad, "Interval")


@given(st.integers(min_value=0, max_value=10**15))
def test_format_duration_round_trips(nanoseconds: int) -> None:
    seconds = nanoseconds / 1e9
    assert parse_duration(format_duration(seconds)) == seconds


def test_format_duration_is_go_style() -> None:
    assert format_duration(90) == "1m30s"
    assert format_duration(0.5) == "500ms"
    assert format_duration(3600) == "1h0m0s"
    assert format_duration(0) == "0s"


# ----------------------------------------------------------------------------- services

PY_CONSUL_BODY: dict[str, Any] = {
    # What py-consul's agent.service.register sends: lowercase keys, snake_case
    # tagged_addresses, check keys mixed with Consul's CamelCase.
    "name": "web",
    "id": "web-1",
    "tags": ["v1", "primary"],
    "port": 8080,
    "address": "10.0.0.5",
    "meta": {"version": "1.2"},
    "enabletagoverride": True,
    "tagged_addresses": {"lan": {"address": "10.0.0.5", "port": 8080}},
    "check": {
        "http": "http://10.0.0.5:8080/health",
        "interval": "10s",
        "tls_skip_verify": True,
        "DeregisterCriticalServiceAfter": "1m",
    },
}


def test_py_consul_lowercase_body() -> None:
    service, checks = parse_registration(PY_CONSUL_BODY)
    assert service.id == "web-1"
    assert service.name == "web"
    assert service.tags == ("v1", "primary")
    assert service.port == 8080
    assert service.enable_tag_override is True
    assert service.tagged_addresses == {"lan": TaggedAddress("10.0.0.5", 8080)}
    assert service.meta == {"version": "1.2"}
    (check,) = checks
    assert check.kind == CheckKind.HTTP
    assert check.check_id == "service:web-1"
    assert check.name == "Service 'web' check"
    assert check.interval == 10.0
    assert check.tls_skip_verify is True
    assert check.deregister_critical_service_after == 60.0
    assert check.status == HealthStatus.CRITICAL
    assert check.service_id == "web-1"


def test_camel_case_body_and_defaults() -> None:
    service, checks = parse_registration(
        {
            "Name": "api",
            "Weights": {"Passing": 10, "Warning": 0},
            "Kind": "connect-proxy",
            "Proxy": {"DestinationServiceName": "api", "Upstreams": [{"LocalBindPort": 9191}]},
            "Checks": [
                {"TTL": "30s", "Status": "passing"},
                {"TCP": "localhost:80", "Interval": "5s"},
            ],
            "SomethingNew": {"ignored": True},  # unknown keys are ignored, like Go's json
            "Address": None,  # null is "not set"
        }
    )
    assert service.id == "api"
    assert service.weights == Weights(10, 0)
    assert service.kind == "connect-proxy"
    assert service.proxy is not None
    assert [c.check_id for c in checks] == ["service:api:1", "service:api:2"]
    assert checks[0].kind == CheckKind.TTL and checks[0].status == HealthStatus.PASSING
    assert checks[1].kind == CheckKind.TCP
    assert checks[1].timeout is None  # the checker applies DEFAULT_CHECK_TIMEOUT
    assert DEFAULT_CHECK_TIMEOUT == 10.0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "expected a JSON object"),
        ({}, "Name: missing service name"),
        ({"Name": ""}, "missing service name"),
        ({"Name": 5}, "Name: expected a string"),
        ({"Name": "a" * 300}, "longer than 256"),
        ({"Name": "web", "ID": "a/b"}, "must not contain '/'"),
        ({"Name": "web", "Port": 70000}, "Port: 70000 is out of range 0..65535"),
        ({"Name": "web", "Port": "80"}, "Port: expected an integer"),
        ({"Name": "web", "Port": True}, "Port: expected an integer"),
        ({"Name": "web", "Tags": "a,b"}, "Tags: expected a list of strings"),
        ({"Name": "web", "Tags": ["a", 1]}, "Tags[1]: expected a string"),
        ({"Name": "web", "Meta": {"k": 1}}, "Meta.k: expected a string"),
        ({"Name": "web", "Meta": {f"k{i}": "v" for i in range(65)}}, "more than 64 keys"),
        ({"Name": "web", "Meta": {"k" * 129: "v"}}, "key longer than 128"),
        ({"Name": "web", "Meta": {"k": "v" * 513}}, "value longer than 512"),
        ({"Name": "web", "Meta": {"bad key": "v"}}, "letters, digits"),
        ({"Name": "web", "Meta": {"consul-x": "v"}}, "reserved"),
        ({"Name": "web", "Weights": {"Passing": 0}}, "Weights.Passing: 0 is out of range"),
        ({"Name": "web", "Kind": "gateway"}, "Kind: unknown kind"),
        ({"Name": "web", "EnableTagOverride": "yes"}, "expected true or false"),
        ({"Name": "web", "TaggedAddresses": {"lan": {"Port": -1}}}, "TaggedAddresses.lan.Port"),
        ({"Name": "web", "Proxy": [1]}, "Proxy: expected an object"),
        ({"Name": "web", "name": "web"}, "duplicate key"),
    ],
)
def test_service_validation(body: object, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_service(body)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("checks", "message"),
    [
        ([{"HTTP": "http://x/", "Interval": "10x"}], 'Checks[0].Interval: invalid duration "10x"'),
        ([{"TTL": "1s"}, {"HTTP": "http://x/"}], "Checks[1].Interval: Interval must be > 0"),
        ([{"Name": "nothing"}], "Checks[0]: unknown check type"),
        ([{"GRPC": "localhost:9090", "Interval": "5s"}], "Checks[0].GRPC: gRPC checks are not"),
        ([{"H2PING": "localhost:9090"}], "H2PING checks are not supported"),
        ([{"DockerContainerID": "abc", "Args": ["true"]}], "Docker checks are not supported"),
        ([{"AliasService": "db"}], "alias checks are not supported"),
        ([{"HTTP": "http://x/", "TCP": "x:1", "Interval": "1s"}], "only one check type"),
        ([{"HTTP": "ftp://x/", "Interval": "1s"}], "not an http(s) URL"),
        ([{"TCP": "nohost", "Interval": "1s"}], "expected host:port"),
        ([{"Args": [], "Interval": "1s"}], "must name a command"),
        ([{"TTL": "0s"}], "TTL must be > 0"),
        ([{"TTL": "1s", "Status": "ok"}], "Checks[0].Status: invalid status"),
        ([{"TTL": "1s", "ID": "a"}, {"TTL": "1s", "ID": "a"}], "duplicate check ID"),
        ([{"HTTP": "http://x/", "Interval": "1s", "Header": {"X": "v"}}], "Header.X: expected"),
        ([{"TTL": "1s", "FailuresBeforeCritical": -1}], "FailuresBeforeCritical: -1"),
        ("nope", "Checks: expected a list"),
    ],
)
def test_check_validation_paths(checks: object, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_registration({"Name": "web", "Checks": checks})
    assert message in str(caught.value)


def test_single_check_path_and_empty_check() -> None:
    with pytest.raises(ValidationError, match=r"^Check\.Interval"):
        parse_registration({"Name": "web", "Check": {"HTTP": "http://x/"}})
    _, checks = parse_registration({"Name": "web", "Check": {}})
    assert checks == ()


def test_parse_check_register() -> None:
    check = parse_check(
        {
            "name": "mem",
            "args": ["/bin/check_mem", "-w", "80"],
            "interval": "30s",
            "timeout": "5s",
            "serviceid": "web",
            "notes": "memory",
            "SuccessBeforePassing": 2,
        }
    )
    assert check.check_id == "mem"
    assert check.kind == CheckKind.SCRIPT
    assert check.service_id == "web"
    assert check.timeout == 5.0
    assert check.success_before_passing == 2
    with pytest.raises(ValidationError, match="Name: missing check name"):
        parse_check({"TTL": "10s"})
    with pytest.raises(ValidationError, match="CheckID and ID disagree"):
        parse_check({"Name": "x", "CheckID": "a", "ID": "b", "TTL": "1s"})
    http = parse_check(
        {
            "Name": "h",
            "HTTP": "https://x/",
            "Method": "post",
            "Header": {"A": ["1"]},
            "Interval": 1e9,
        }
    )
    assert http.method == "POST" and http.header == {"A": ("1",)} and http.interval == 1.0


def test_check_update_body() -> None:
    assert parse_check_update({"Status": "warning", "Output": "x" * 10_000}) == (
        HealthStatus.WARNING,
        "x" * 4096,
    )
    with pytest.raises(ValidationError, match="Status: invalid status"):
        parse_check_update({"Status": "maintenance"})


def test_bodies_round_trip() -> None:
    service, checks = parse_registration(PY_CONSUL_BODY)
    assert parse_service(json.loads(json.dumps(service_to_body(service)))) == service
    for check in checks:
        assert parse_check(json.loads(json.dumps(check_to_body(check)))) == check


# ----------------------------------------------------------------------------- outputs


def test_output_shapes() -> None:
    service, checks = parse_registration(PY_CONSUL_BODY)
    node = NodeInfo("n1", "id-1", "10.0.0.5", "dc1", {"rack": "r1"})
    agent = agent_service_json(service, datacenter="dc1")
    assert set(agent) >= {
        "ID", "Service", "Tags", "Meta", "Port", "Address", "TaggedAddresses",
        "Weights", "EnableTagOverride", "Datacenter",
    }  # fmt: skip
    assert agent["TaggedAddresses"] == {"lan": {"Address": "10.0.0.5", "Port": 8080}}
    catalog = catalog_service_json(node, service, create_index=3, modify_index=4)
    assert catalog["ServiceName"] == "web" and catalog["NodeMeta"] == {"rack": "r1"}
    assert catalog["TaggedAddresses"]["lan"] == "10.0.0.5"  # node tagged addresses: strings
    view = CheckView("n1", checks[0].check_id, checks[0].name, HealthStatus.PASSING,
                     service_id="web-1", service_name="web", definition=checks[0])  # fmt: skip
    shown = check_json(view)
    assert shown["Type"] == "http" and shown["Definition"]["Interval"] == "10s"
    health = health_service_json(node, service, [view], node_index=(1, 2), service_index=(3, 4))
    assert set(health) == {"Node", "Service", "Checks"}
    assert health["Service"]["ModifyIndex"] == 4 and health["Node"]["Node"] == "n1"
    json.dumps(health)  # serializable as is
