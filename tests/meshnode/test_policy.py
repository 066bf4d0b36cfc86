"""Intentions and config entries: parsing, validation, precedence, L7 matching, filters.

Pure tests of ``meshnode.policy`` (no store, no gossip: see test_policy_store.py).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshnode.model import NodeInfo, ServiceDefinition, ValidationError
from meshnode.policy import (
    HttpRequest,
    Intention,
    IntentionAction,
    IntentionIndex,
    PolicyValue,
    ServiceDefaults,
    ServiceResolver,
    ServiceRouter,
    ServiceSplitter,
    authorize,
    config_entry_json,
    intention_check_json,
    intention_id,
    intention_json,
    match_intentions,
    parse_config_entry,
    parse_filter,
    parse_intention,
    parse_value,
    precedence,
    sort_intentions,
    validate_against,
    validate_delete,
    value_to_body,
)


def ixn(source: str, destination: str, action: str = "allow", **extra: Any) -> Intention:
    return parse_intention(
        {"SourceName": source, "DestinationName": destination, "Action": action, **extra}
    )


def l7(source: str, destination: str, *permissions: dict[str, Any]) -> Intention:
    return parse_intention(
        {"SourceName": source, "DestinationName": destination, "Permissions": list(permissions)}
    )


def refused(parse: Any, *args: Any, path: str | None = None, says: str = "") -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        parse(*args)
    if path is not None:
        assert caught.value.path == path, str(caught.value)
    assert says in caught.value.message, str(caught.value)
    return caught.value


# ------------------------------------------------------------------------- intentions


def test_intention_parses_consul_shape_with_defaults() -> None:
    intention = parse_intention(
        {
            "SourceName": "web",
            "DestinationName": "db",
            "Action": "allow",
            "Description": "web reads db",
            "Meta": {"team": "a"},
        }
    )
    assert intention == Intention(
        "web", "db", IntentionAction.ALLOW, description="web reads db", meta={"team": "a"}
    )
    assert intention.name == "web=>db"
    assert str(intention) == "web => db (allow)"


def test_intention_keys_are_case_insensitive_and_unknown_keys_ignored() -> None:
    intention = parse_intention(
        {
            "sourcename": "web",
            "destination_name": "db",
            "action": "DENY",
            "SourceNS": "default",
            "ID": "ignored",
            "Precedence": 3,
        }
    )
    assert (intention.source, intention.destination, intention.action) == (
        "web",
        "db",
        IntentionAction.DENY,
    )


def test_exact_endpoint_takes_names_from_the_query() -> None:
    intention = parse_intention({"Action": "allow"}, source="web", destination="db")
    assert intention.name == "web=>db"
    with pytest.raises(ValidationError, match=r"SourceName: 'api' disagrees with \?source=web"):
        parse_intention({"SourceName": "api", "Action": "allow"}, source="web", destination="db")


def test_intention_ids_are_deterministic_uuids() -> None:
    assert ixn("web", "db").id == intention_id("web", "db") == ixn("web", "db", "deny").id
    assert ixn("web", "db").id != ixn("db", "web").id
    assert len(ixn("web", "db").id) == 36


def test_wildcards_are_accepted() -> None:
    assert ixn("*", "*").precedence == 5
    assert ixn("*", "db").source == "*"


@pytest.mark.parametrize(
    ("body", "path", "says"),
    [
        ({"DestinationName": "db", "Action": "allow"}, "SourceName", "missing SourceName"),
        ({"SourceName": "web", "Action": "allow"}, "DestinationName", "missing"),
        (
            {"SourceName": "web*", "DestinationName": "db", "Action": "allow"},
            "SourceName",
            "partial values",
        ),
        (
            {"SourceName": "a/b", "DestinationName": "db", "Action": "allow"},
            "SourceName",
            "must not contain",
        ),
        (
            {"SourceName": "a=>b", "DestinationName": "db", "Action": "allow"},
            "SourceName",
            "must not contain",
        ),
        ({"SourceName": "web", "DestinationName": "db"}, "Action", "missing Action"),
        ({"SourceName": "web", "DestinationName": "db", "Action": "maybe"}, "Action", "'allow'"),
        (
            {"SourceName": "web", "DestinationName": "db", "Action": 1},
            "Action",
            "expected a string",
        ),
        (
            {
                "SourceName": "web",
                "DestinationName": "db",
                "Action": "allow",
                "SourceNS": "team-a",
            },
            "SourceNS",
            '"default" namespace',
        ),
        (
            {"SourceName": "web", "DestinationName": "db", "Action": "allow", "SourceType": "x"},
            "SourceType",
            "only 'consul'",
        ),
        (
            {
                "SourceName": "web",
                "DestinationName": "db",
                "Action": "allow",
                "Description": "x" * 513,
            },
            "Description",
            "longer than 512",
        ),
        (
            {"SourceName": "web", "DestinationName": "db", "Action": "allow", "Meta": {"a b": "1"}},
            "Meta.a b",
            "letters, digits",
        ),
        (
            {
                "SourceName": "web",
                "DestinationName": "db",
                "Action": "allow",
                "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}],
            },
            "Action",
            "must be omitted",
        ),
        (
            {
                "SourceName": "web",
                "DestinationName": "*",
                "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}],
            },
            "Permissions",
            "named destination",
        ),
        (
            {"SourceName": "web", "DestinationName": "db", "Permissions": [{"Action": "allow"}]},
            "Permissions[0].HTTP",
            "missing HTTP",
        ),
        (
            {
                "SourceName": "web",
                "DestinationName": "db",
                "Permissions": [{"Action": "allow", "HTTP": {}}],
            },
            "Permissions[0].HTTP",
            "at least one",
        ),
        (
            {
                "SourceName": "web",
                "DestinationName": "db",
                "Permissions": [{"HTTP": {"PathPrefix": "/"}}],
            },
            "Permissions[0].Action",
            "missing Action",
        ),
        (
            {
                "SourceName": "web",
                "DestinationName": "db",
                "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "x"}}],
            },
            "Permissions[0].HTTP.PathExact",
            "doesn't start with '/'",
        ),
        (
            {
                "SourceName": "web",
                "DestinationName": "db",
                "Permissions": [
                    {"Action": "allow", "HTTP": {"PathExact": "/a", "PathPrefix": "/"}}
                ],
            },
            "Permissions[0].HTTP",
            "at most one of PathExact",
        ),
        (
            {
                "SourceName": "web",
                "DestinationName": "db",
                "Permissions": [{"Action": "allow", "HTTP": {"PathRegex": "(["}}],
            },
            "Permissions[0].HTTP.PathRegex",
            "invalid regex",
        ),
        (
            {
                "SourceName": "web",
                "DestinationName": "db",
                "Permissions": [{"Action": "allow", "HTTP": {"PathRegex": "/(?=a)"}}],
            },
            "Permissions[0].HTTP.PathRegex",
            "not RE2",
        ),
        (
            {
                "SourceName": "web",
                "DestinationName": "db",
                "Permissions": [{"Action": "allow", "HTTP": {"Methods": ["GET", "FETCH"]}}],
            },
            "Permissions[0].HTTP.Methods",
            "invalid HTTP method 'FETCH'",
        ),
        (
            {
                "SourceName": "web",
                "DestinationName": "db",
                "Permissions": [{"Action": "allow", "HTTP": {"Methods": ["GET", "get"]}}],
            },
            "Permissions[0].HTTP.Methods",
            "more than once",
        ),
        (
            {
                "SourceName": "web",
                "DestinationName": "db",
                "Permissions": [{"Action": "allow", "HTTP": {"Header": [{"Exact": "1"}]}}],
            },
            "Permissions[0].HTTP.Header[0].Name",
            "missing required Name",
        ),
        (
            {
                "SourceName": "web",
                "DestinationName": "db",
                "Permissions": [
                    {
                        "Action": "allow",
                        "HTTP": {"Header": [{"Name": "x", "Exact": "1", "Prefix": "2"}]},
                    }
                ],
            },
            "Permissions[0].HTTP.Header[0]",
            "exactly one of Present",
        ),
        (
            {"SourceName": "web", "DestinationName": "db", "Permissions": {"Action": "allow"}},
            "Permissions",
            "expected a list",
        ),
        ([], "", "expected a JSON object"),
    ],
)
def test_intention_errors_name_the_field(body: Any, path: str, says: str) -> None:
    refused(parse_intention, body, path=path, says=says)


# ------------------------------------------------------------------------- precedence


@pytest.mark.parametrize(
    ("source", "destination", "expected"),
    [("web", "db", 9), ("*", "db", 8), ("web", "*", 6), ("*", "*", 5)],
)
def test_precedence_follows_consuls_table(source: str, destination: str, expected: int) -> None:
    assert precedence(source, destination) == expected
    assert (
        intention_json(ixn(source, destination), create_index=1, modify_index=1)["Precedence"]
        == expected
    )


ALL_FOUR = [ixn("web", "db", "allow"), ixn("*", "db", "deny"), ixn("web", "*", "deny")]
ALL_FOUR.append(ixn("*", "*", "allow"))


@pytest.mark.parametrize(
    ("present", "source", "destination", "allowed", "decided_by"),
    [
        # Exact pair beats every wildcard.
        (ALL_FOUR, "web", "db", True, ("web", "db")),
        # * → db (8) beats web → * (6) and * → * (5).
        (ALL_FOUR[1:], "web", "db", False, ("*", "db")),
        (ALL_FOUR[2:], "web", "db", False, ("web", "*")),
        (ALL_FOUR[3:], "web", "db", True, ("*", "*")),
        (ALL_FOUR, "api", "db", False, ("*", "db")),
        (ALL_FOUR, "web", "cache", False, ("web", "*")),
        (ALL_FOUR, "api", "cache", True, ("*", "*")),
    ],
)
def test_the_most_precise_intention_decides(
    present: list[Intention],
    source: str,
    destination: str,
    allowed: bool,
    decided_by: tuple[str, str],
) -> None:
    decision = authorize(present, source, destination, "deny")
    assert decision.allowed is allowed
    assert decision.intention_id == intention_id(*decided_by)
    assert decision.precedence == precedence(*decided_by)


@pytest.mark.parametrize("default", ["allow", "deny"])
def test_default_policy_applies_when_nothing_matches(default: str) -> None:
    decision = authorize([ixn("web", "db")], "api", "cache", default)
    assert decision.allowed is (default == "allow")
    assert decision.intention_id is None
    assert f"default policy is {default}" in decision.reason
    assert authorize([], "a", "b", default).allowed is (default == "allow")


def test_unknown_default_policy_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="default policy"):
        IntentionIndex.build([], "maybe")


NAMES = st.sampled_from(["web", "db", "api", "*"])


@given(
    st.lists(st.tuples(NAMES, NAMES, st.booleans()), max_size=12),
    st.sampled_from(["web", "db", "api", "other"]),
    st.sampled_from(["web", "db", "api", "other"]),
    st.sampled_from(["allow", "deny"]),
)
def test_index_agrees_with_a_linear_scan_in_precedence_order(
    pairs: list[tuple[str, str, bool]], source: str, destination: str, default: str
) -> None:
    latest = {(s, d): ixn(s, d, "allow" if a else "deny") for s, d, a in pairs}
    intentions = list(latest.values())
    expected = default == "allow"
    for candidate in sort_intentions(intentions):
        if candidate.source in (source, "*") and candidate.destination in (destination, "*"):
            expected = candidate.action == IntentionAction.ALLOW
            break
    assert IntentionIndex.build(intentions, default).decide(source, destination).allowed is expected


def test_list_and_match_are_in_evaluation_order() -> None:
    ordered = sort_intentions(reversed(ALL_FOUR))
    assert [i.precedence for i in ordered] == [9, 8, 6, 5]
    by_destination = match_intentions(ALL_FOUR, "destination", "db")
    assert [(i.source, i.destination) for i in by_destination] == [
        ("web", "db"),
        ("*", "db"),
        ("web", "*"),
        ("*", "*"),
    ]
    by_source = match_intentions(ALL_FOUR, "source", "api")
    assert [(i.source, i.destination) for i in by_source] == [("*", "db"), ("*", "*")]


def test_intention_json_has_consuls_fields() -> None:
    out = intention_json(ixn("web", "db", Description="d"), create_index=3, modify_index=7)
    assert out["ID"] == intention_id("web", "db")
    assert (out["SourceName"], out["DestinationName"], out["Action"]) == ("web", "db", "allow")
    assert (out["SourceNS"], out["DestinationNS"], out["SourceType"]) == (
        "default",
        "default",
        "consul",
    )
    assert (out["CreateIndex"], out["ModifyIndex"], out["Description"]) == (3, 7, "d")
    assert "Permissions" not in out


# ------------------------------------------------------------------------- L7 permissions

API_L7 = l7(
    "web",
    "api",
    {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
    {"Action": "allow", "HTTP": {"PathPrefix": "/v1/", "Methods": ["get", "HEAD"]}},
    {
        "Action": "allow",
        "HTTP": {
            "PathExact": "/upload",
            "Methods": ["POST"],
            "Header": [{"Name": "X-Tenant", "Regex": "[a-z]+"}],
        },
    },
)


@pytest.mark.parametrize(
    ("method", "target", "headers", "allowed", "why"),
    [
        ("GET", "/v1/users?page=2", [], True, "permission 1"),
        ("HEAD", "/v1/users", [], True, "permission 1"),
        ("DELETE", "/v1/users", [], False, "no permission"),
        ("GET", "/admin/v1/", [], False, "permission 0"),
        ("POST", "/upload", [("x-tenant", "acme")], True, "permission 2"),
        ("POST", "/upload", [("X-Tenant", "ACME")], False, "no permission"),
        ("POST", "/upload", [], False, "no permission"),
        ("POST", "/upload/more", [("x-tenant", "acme")], False, "no permission"),
    ],
)
def test_l7_permissions_first_match_decides_then_default(
    method: str, target: str, headers: list[tuple[str, str]], allowed: bool, why: str
) -> None:
    request = HttpRequest.from_target(method, target, headers)
    decision = authorize([API_L7], "web", "api", "deny", request=request)
    assert decision.allowed is allowed
    assert why in decision.reason
    assert decision.has_permissions and decision.intention_id == API_L7.id


def test_l7_unmatched_request_follows_default_allow() -> None:
    request = HttpRequest.from_target("DELETE", "/v1/x")
    assert authorize([API_L7], "web", "api", "allow", request=request).allowed


def test_l7_without_request_is_provisional() -> None:
    index = IntentionIndex.build([API_L7], "deny")
    assert index.decide("web", "api", allow_permissions=True).allowed
    decision = index.decide("web", "api")
    assert not decision.allowed and decision.has_permissions
    # The check endpoint is L4-only: L7 intentions count as deny (Consul docs).
    assert intention_check_json(index, "web", "api") == {"Allowed": False}


def test_l4_intention_ignores_the_request() -> None:
    request = HttpRequest.from_target("DELETE", "/anything")
    assert authorize([ixn("web", "api")], "web", "api", "deny", request=request).allowed


@pytest.mark.parametrize(
    ("header", "value", "matches"),
    [
        ({"Present": True}, "x", True),
        ({"Present": True}, None, False),
        ({"Present": True, "Invert": True}, None, True),
        ({"Present": True, "Invert": True}, "x", False),
        ({"Exact": "a"}, "a", True),
        ({"Exact": "a"}, "ab", False),
        ({"Exact": "a", "Invert": True}, "ab", True),
        ({"Exact": "a", "Invert": True}, None, False),  # Envoy: missing never matches
        ({"Prefix": "Bearer "}, "Bearer t", True),
        ({"Suffix": ".json"}, "a.json", True),
        ({"Suffix": ".json"}, "a.xml", False),
        ({"Regex": "v[0-9]"}, "v1", True),
        ({"Regex": "v[0-9]"}, "v10", False),  # full match, as Envoy's safe_regex
    ],
)
def test_header_conditions(header: dict[str, Any], value: str | None, matches: bool) -> None:
    intention = l7("web", "api", {"Action": "allow", "HTTP": {"Header": [{"Name": "h", **header}]}})
    headers = [] if value is None else [("H", value)]
    request = HttpRequest.from_target("GET", "/", headers)
    assert authorize([intention], "web", "api", "deny", request=request).allowed is matches


def test_path_regex_matches_the_whole_path_without_query() -> None:
    intention = l7("web", "api", {"Action": "allow", "HTTP": {"PathRegex": "/items/[0-9]+"}})
    for target, expected in (
        ("/items/12?x=1", True),
        ("/items/12/x", False),
        ("/x/items/1", False),
    ):
        request = HttpRequest.from_target("GET", target)
        assert authorize([intention], "web", "api", "deny", request=request).allowed is expected


# ------------------------------------------------------------------------- filters

WEB_V1 = ServiceDefinition(
    "web-1", "web", tags=("canary", "eu"), port=8080, meta={"version": "v1", "tier": "gold"}
)
NODE = NodeInfo("node-a", "id", "10.0.0.1", "dc1", meta={"rack": "r1"})


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("Service.Meta.version == v1", True),
        ('Service.Meta.version == "v2"', False),
        ("Service.Meta.version != v2", True),
        ("Service.Meta.missing == ''", False),
        ('Service.Meta.missing == ""', True),
        ('"canary" in Service.Tags', True),
        ('"prod" in Service.Tags', False),
        ('"prod" not in Service.Tags', True),
        ("Service.Tags contains eu", True),
        ("Service.Tags not contains eu", False),
        ('"version" in Service.Meta', True),
        ("Service.Meta is not empty", True),
        ("Service.Tags is empty", False),
        ("Service.Meta.version == v1 and canary in Service.Tags", True),
        ("Service.Meta.version == v2 or canary in Service.Tags", True),
        ("not Service.Meta.version == v1", False),
        ("not (Service.Meta.version == v2 or Service.Meta.tier == silver)", True),
        ("Service.ID == web-1 and Service.Service == web and Service.Port == 8080", True),
        ('Service.ID matches "^web-[0-9]+$"', True),
        ("Service.ID not matches `^api`", True),
        ("Node.Node == node-a and Node.Meta.rack == r1 and Node.Datacenter == dc1", True),
        ("service.meta.version == v1", True),  # selector heads are case-insensitive
    ],
)
def test_filter_expressions(expression: str, expected: bool) -> None:
    assert parse_filter(expression).matches(WEB_V1, NODE) is expected


@pytest.mark.parametrize(
    ("expression", "says"),
    [
        ("", "empty expression"),
        ("Service.Foo == 1", "unknown selector 'Service.Foo'"),
        ("Service.Meta.version ==", "unexpected end"),
        ("Service.Meta.version = v1", "unexpected character"),
        ("Service.Tags == x", "is a list"),
        ("Service.Meta.version v1", "expected ==, !=, in"),
        ("(Service.ID == a", "unexpected end"),
        ("Service.ID == a)", "unexpected ')'"),
        ("Service.ID is full", "expected 'empty'"),
        ("Service.ID == and", "expected a value"),
        ("Service.ID matches '('", "unexpected '('"),
        ('Service.ID matches "("', "invalid regex"),
        ("Service.Meta.a.b == c", "unknown selector"),
    ],
)
def test_filter_errors(expression: str, says: str) -> None:
    refused(parse_filter, expression, path="Filter", says=says)


# ------------------------------------------------------------------------- service-defaults


def test_service_defaults_with_every_field() -> None:
    entry = parse_config_entry(
        "service-defaults",
        "web",
        {
            "Protocol": "HTTP",
            "MaxInboundConnections": 100,
            "LocalConnectTimeoutMs": 1000,
            "LocalRequestTimeoutMs": 2000,
            "UpstreamConfig": {
                "Defaults": {
                    "ConnectTimeoutMs": 500,
                    "Limits": {
                        "MaxConnections": 10,
                        "MaxPendingRequests": 20,
                        "MaxConcurrentRequests": 30,
                    },
                    "PassiveHealthCheck": {
                        "Interval": "10s",
                        "MaxFailures": 5,
                        "EnforcingConsecutive5xx": 100,
                        "MaxEjectionPercent": 50,
                        "BaseEjectionTime": "30s",
                    },
                },
                "Overrides": [{"Name": "db", "Limits": {"MaxConnections": 1}}],
            },
            "RateLimits": {"InstanceLevel": {"RequestsPerSecond": 50, "RequestsMaxBurst": 80}},
            "Meta": {"owner": "team-a"},
        },
    )
    assert isinstance(entry, ServiceDefaults)
    assert entry.protocol == "http"
    assert entry.rate_limit is not None and entry.rate_limit.burst == 80
    config = entry.upstream_config
    assert config is not None
    db = config.for_upstream("db")
    assert db.limits is not None and db.limits.max_connections == 1
    assert db.connect_timeout_ms == 500  # inherited from Defaults
    assert db.passive_health_check is not None
    assert db.passive_health_check.base_ejection_time == 30.0
    other = config.for_upstream("cache")
    assert other.limits is not None and other.limits.max_connections == 10
    assert parse_value(entry.kind, entry.name, value_to_body(entry)) == entry


def test_service_defaults_protocol_defaults_to_tcp() -> None:
    entry = parse_config_entry("service-defaults", "web", {})
    assert isinstance(entry, ServiceDefaults) and entry.protocol == "tcp"


@pytest.mark.parametrize(
    ("body", "path", "says"),
    [
        ({"Protocol": "grpc"}, "Protocol", "not supported: meshnode's proxy speaks HTTP/1.1"),
        ({"Protocol": "http2"}, "Protocol", "use 'http' or 'tcp'"),
        ({"Protocol": "udp"}, "Protocol", "unknown protocol 'udp'"),
        ({"Mode": "transparent"}, "Mode", "not supported by meshnode"),
        ({"Protcol": "http"}, "Protcol", "unknown field 'Protcol' in service-defaults"),
        ({"LocalRequestTimeoutMs": 5}, "LocalRequestTimeoutMs", "only applies to Protocol 'http'"),
        ({"MaxInboundConnections": -1}, "MaxInboundConnections", "out of range"),
        (
            {"UpstreamConfig": {"Defaults": {"Limits": {"MaxConnections": "10"}}}},
            "UpstreamConfig.Defaults.Limits.MaxConnections",
            "expected an integer",
        ),
        (
            {"UpstreamConfig": {"Defaults": {"PassiveHealthCheck": {"MaxEjectionPercent": 101}}}},
            "UpstreamConfig.Defaults.PassiveHealthCheck.MaxEjectionPercent",
            "out of range",
        ),
        (
            {"UpstreamConfig": {"Defaults": {"PassiveHealthCheck": {"Interval": "10x"}}}},
            "UpstreamConfig.Defaults.PassiveHealthCheck.Interval",
            "invalid duration",
        ),
        (
            {"UpstreamConfig": {"Overrides": [{"Limits": {}}]}},
            "UpstreamConfig.Overrides[0].Name",
            "missing upstream Name",
        ),
        (
            {"UpstreamConfig": {"Overrides": [{"Name": "db"}, {"Name": "db"}]}},
            "UpstreamConfig.Overrides[1]",
            "more than once",
        ),
        (
            {"UpstreamConfig": {"Defaults": {"Name": "db"}}},
            "UpstreamConfig.Defaults.Name",
            "unknown field",
        ),
        (
            {"RateLimits": {"InstanceLevel": {"RequestsMaxBurst": 5}}},
            "RateLimits.InstanceLevel.RequestsMaxBurst",
            "needs RequestsPerSecond",
        ),
        (
            {"RateLimits": {"InstanceLevel": {"RequestsPerSecond": 5, "Routes": []}}},
            "RateLimits.InstanceLevel.Routes",
            "not supported",
        ),
    ],
)
def test_service_defaults_errors(body: dict[str, Any], path: str, says: str) -> None:
    refused(parse_config_entry, "service-defaults", "web", body, path=path, says=says)


# ------------------------------------------------------------------------- service-resolver

RESOLVER_BODY: dict[str, Any] = {
    "DefaultSubset": "v1",
    "Subsets": {
        "v1": {"Filter": "Service.Meta.version == v1"},
        "v2": {"Filter": "Service.Meta.version == v2", "OnlyPassing": True},
    },
    "ConnectTimeout": "5s",
    "RequestTimeout": "15s",
    "Failover": {
        "v2": {"ServiceSubset": "v1"},
        "*": {"Targets": [{"Service": "web-backup"}, {"Service": "web", "ServiceSubset": "v2"}]},
    },
    "LoadBalancer": {
        "Policy": "ring_hash",
        "RingHashConfig": {"MinimumRingSize": 1024, "MaximumRingSize": 8192},
        "HashPolicies": [
            {"Field": "cookie", "FieldValue": "session", "CookieConfig": {"TTL": "1h"}},
            {"SourceIP": True, "Terminal": True},
        ],
    },
}


def test_service_resolver_with_every_field() -> None:
    entry = parse_config_entry("service-resolver", "web", RESOLVER_BODY)
    assert isinstance(entry, ServiceResolver)
    assert entry.default_subset == "v1" and entry.subset_exists("v2") and entry.subset_exists("")
    assert entry.subsets["v1"].matches(WEB_V1)
    assert not entry.subsets["v2"].matches(WEB_V1)
    assert entry.subsets["v2"].only_passing
    assert (entry.connect_timeout, entry.request_timeout) == (5.0, 15.0)
    failover = entry.failover_for("v1")
    assert failover is not None and [t.service for t in failover.resolved_targets()] == [
        "web-backup",
        "web",
    ]
    assert entry.load_balancer is not None and entry.load_balancer.effective_policy == "ring_hash"
    assert parse_value(entry.kind, entry.name, value_to_body(entry)) == entry


def test_resolver_redirect_and_least_request() -> None:
    entry = parse_config_entry(
        "service-resolver",
        "old",
        {
            "Redirect": {"Service": "new", "ServiceSubset": "v2"},
            "LoadBalancer": {"Policy": "least_request", "LeastRequestConfig": {"ChoiceCount": 3}},
        },
    )
    assert isinstance(entry, ServiceResolver) and entry.redirect is not None
    assert parse_value(entry.kind, entry.name, value_to_body(entry)) == entry


def _resolver(**changes: Any) -> dict[str, Any]:
    body = {"Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}}}
    body.update(changes)
    return body


@pytest.mark.parametrize(
    ("body", "path", "says"),
    [
        (_resolver(DefaultSubset="v9"), "DefaultSubset", "'v9' is not a subset"),
        (_resolver(Subsets={"V1": {}}), "Subsets.V1", "must be a DNS label"),
        (_resolver(Subsets={"v1": {"Filter": "Service.X == 1"}}), "Subsets.v1.Filter", "unknown"),
        (_resolver(Subsets={"v1": {"Filtr": "x"}}), "Subsets.v1.Filtr", "unknown field"),
        (_resolver(Subsets=[]), "Subsets", "expected an object"),
        (_resolver(Failover={"v9": {"Service": "b"}}), 'Failover["v9"]', "not a subset"),
        (_resolver(Failover={"*": {}}), 'Failover["*"]', "one of Service, ServiceSubset"),
        (
            _resolver(Failover={"*": {"Service": "b", "Targets": [{"Service": "c"}]}}),
            'Failover["*"]',
            "Targets cannot be set with Service",
        ),
        (
            _resolver(Failover={"*": {"ServiceSubset": "v9"}}),
            'Failover["*"]',
            "'v9' is not a subset of 'web'",
        ),
        (
            _resolver(Failover={"*": {"Targets": [{"ServiceSubset": "v9"}]}}),
            'Failover["*"].Targets[0]',
            "not a subset",
        ),
        (
            _resolver(Failover={"*": {"Datacenters": ["dc2"]}}),
            'Failover["*"].Datacenters',
            "not supported by meshnode",
        ),
        (
            _resolver(Redirect={"Service": "b"}, Failover={"*": {"Service": "c"}}),
            "Failover",
            "cannot both be set",
        ),
        (_resolver(Redirect={}), "Redirect", "Redirect is empty"),
        (_resolver(Redirect={"ServiceSubset": "v1"}), "Redirect", "without Redirect.Service"),
        (_resolver(Redirect={"Service": "web"}), "Redirect", "at itself"),
        (_resolver(Redirect={"Service": "b", "Datacenter": "dc2"}), "Redirect.Datacenter", ""),
        (_resolver(ConnectTimeout="-1s"), "ConnectTimeout", "must not be negative"),
        (_resolver(LoadBalancer={"Policy": "maglev"}), "LoadBalancer.Policy", "use 'ring_hash'"),
        (_resolver(LoadBalancer={"Policy": "fastest"}), "LoadBalancer.Policy", "not supported"),
        (
            _resolver(LoadBalancer={"Policy": "random", "RingHashConfig": {}}),
            "LoadBalancer.RingHashConfig",
            "only valid with Policy 'ring_hash'",
        ),
        (
            _resolver(LoadBalancer={"Policy": "random", "LeastRequestConfig": {}}),
            "LoadBalancer.LeastRequestConfig",
            "only valid with Policy 'least_request'",
        ),
        (
            _resolver(
                LoadBalancer={"Policy": "least_request", "LeastRequestConfig": {"ChoiceCount": 1}}
            ),
            "LoadBalancer.LeastRequestConfig.ChoiceCount",
            "at least 2",
        ),
        (
            _resolver(
                LoadBalancer={
                    "Policy": "ring_hash",
                    "RingHashConfig": {"MinimumRingSize": 10, "MaximumRingSize": 5},
                }
            ),
            "LoadBalancer.RingHashConfig",
            "larger than",
        ),
        (
            _resolver(LoadBalancer={"Policy": "round_robin", "HashPolicies": [{"SourceIP": True}]}),
            "LoadBalancer.HashPolicies[0]",
            "need Policy 'ring_hash'",
        ),
        (
            _resolver(LoadBalancer={"Policy": "ring_hash", "HashPolicies": [{"Field": "header"}]}),
            "LoadBalancer.HashPolicies[0].FieldValue",
            "needs a FieldValue",
        ),
        (
            _resolver(
                LoadBalancer={
                    "Policy": "ring_hash",
                    "HashPolicies": [{"Field": "body", "FieldValue": "x"}],
                }
            ),
            "LoadBalancer.HashPolicies[0].Field",
            "is not one of",
        ),
        (
            _resolver(
                LoadBalancer={
                    "Policy": "ring_hash",
                    "HashPolicies": [{"SourceIP": True, "Field": "header", "FieldValue": "x"}],
                }
            ),
            "LoadBalancer.HashPolicies[0]",
            "SourceIP cannot be combined",
        ),
        (
            _resolver(
                LoadBalancer={
                    "Policy": "ring_hash",
                    "HashPolicies": [
                        {
                            "Field": "cookie",
                            "FieldValue": "s",
                            "CookieConfig": {"Session": True, "TTL": "1m"},
                        }
                    ],
                }
            ),
            "LoadBalancer.HashPolicies[0].CookieConfig",
            "session cookie cannot have a TTL",
        ),
        (
            _resolver(
                LoadBalancer={
                    "Policy": "ring_hash",
                    "HashPolicies": [{"Field": "header", "FieldValue": "x", "CookieConfig": {}}],
                }
            ),
            "LoadBalancer.HashPolicies[0].CookieConfig",
            "only valid with Field 'cookie'",
        ),
    ],
)
def test_service_resolver_errors(body: dict[str, Any], path: str, says: str) -> None:
    refused(parse_config_entry, "service-resolver", "web", body, path=path, says=says)


# ------------------------------------------------------------------------- service-splitter


def test_splitter_80_20_is_accepted() -> None:
    entry = parse_config_entry(
        "service-splitter",
        "web",
        {"Splits": [{"Weight": 80, "ServiceSubset": "v1"}, {"Weight": 20, "ServiceSubset": "v2"}]},
    )
    assert isinstance(entry, ServiceSplitter)
    assert [s.weight_units for s in entry.splits] == [8000, 2000]
    assert parse_value(entry.kind, entry.name, value_to_body(entry)) == entry


def test_splitter_weights_with_two_decimals_add_up_exactly() -> None:
    entry = parse_config_entry(
        "service-splitter",
        "web",
        {
            "Splits": [
                {"Weight": 33.33, "ServiceSubset": "a"},
                {"Weight": 33.33, "ServiceSubset": "b"},
                {"Weight": 33.34, "Service": "other"},
                {"Weight": 0, "Service": "dark"},
            ]
        },
    )
    assert isinstance(entry, ServiceSplitter)
    assert sum(s.weight_units for s in entry.splits) == 10000


@pytest.mark.parametrize(
    ("splits", "path", "says"),
    [
        (
            [{"Weight": 80, "ServiceSubset": "v1"}, {"Weight": 21, "ServiceSubset": "v2"}],
            "Splits",
            "must be 100, not 101",
        ),
        ([{"Weight": 99.99}], "Splits", "must be 100, not 99.99"),
        (
            [{"Weight": 50.005, "ServiceSubset": "a"}, {"Weight": 49.995}],
            "Splits[0].Weight",
            "more than 2 decimal",
        ),
        ([{"Weight": 101}], "Splits[0].Weight", "between 0 and 100"),
        ([{"Weight": -1}, {"Weight": 101}], "Splits[0].Weight", "between 0 and 100"),
        ([{"Weight": "80"}], "Splits[0].Weight", "expected a number"),
        ([{"Weight": True}], "Splits[0].Weight", "expected a number"),
        ([], "Splits", "no splits configured"),
        ([{"Weight": 50}, {"Weight": 50, "Service": "web"}], "Splits[1]", "occurs more than once"),
        ([{"Weight": 100, "ServiceSubset": "V1"}], "Splits[0].ServiceSubset", "DNS label"),
        ([{"Weight": 100, "RequestHeaders": {}}], "Splits[0].RequestHeaders", "not supported"),
        ([{"Weight": 100, "Namespace": "x"}], "Splits[0].Namespace", '"default" namespace'),
    ],
)
def test_splitter_errors(splits: list[dict[str, Any]], path: str, says: str) -> None:
    refused(parse_config_entry, "service-splitter", "web", {"Splits": splits}, path=path, says=says)


# ------------------------------------------------------------------------- service-router

ROUTER_BODY: dict[str, Any] = {
    "Routes": [
        {
            "Match": {
                "HTTP": {
                    "PathPrefix": "/admin",
                    "Header": [{"Name": "x-debug", "Exact": "1"}],
                    "QueryParam": [{"Name": "beta", "Present": True}],
                    "Methods": ["GET", "post"],
                }
            },
            "Destination": {
                "Service": "admin",
                "ServiceSubset": "v2",
                "PrefixRewrite": "/",
                "RequestTimeout": "2s",
                "IdleTimeout": "30s",
                "NumRetries": 3,
                "RetryOnConnectFailure": True,
                "RetryOnStatusCodes": [503, 504],
                "RetryOn": ["5xx", "reset"],
            },
        },
        {"Match": {"HTTP": {"PathRegex": "/v[0-9]+/.*"}}, "Destination": {"ServiceSubset": "v1"}},
    ]
}


def test_service_router_with_every_field() -> None:
    entry = parse_config_entry("service-router", "web", ROUTER_BODY)
    assert isinstance(entry, ServiceRouter)
    admin = HttpRequest.from_target("POST", "/admin/x?beta", [("X-Debug", "1")])
    destination = entry.route(admin)
    assert (destination.service, destination.service_subset, destination.num_retries) == (
        "admin",
        "v2",
        3,
    )
    assert destination.retry_on_status_codes == (503, 504)
    assert entry.route(HttpRequest.from_target("GET", "/v2/items")).service_subset == "v1"
    # Nothing matches: Consul's implicit catch-all to the router's own service.
    fallback = entry.route(HttpRequest.from_target("GET", "/admin/x"))
    assert (fallback.service, fallback.service_subset) == ("", "")
    assert parse_value(entry.kind, entry.name, value_to_body(entry)) == entry


def _route(match: dict[str, Any] | None = None, **destination: Any) -> dict[str, Any]:
    route: dict[str, Any] = {}
    if match is not None:
        route["Match"] = {"HTTP": match}
    if destination:
        route["Destination"] = destination
    return {"Routes": [route]}


@pytest.mark.parametrize(
    ("body", "path", "says"),
    [
        (_route({"PathExact": "/a", "PathRegex": "/b"}), "Routes[0].Match.HTTP", "at most one"),
        (_route({"PathPrefix": "a"}), "Routes[0].Match.HTTP.PathPrefix", "doesn't start"),
        (_route({"Header": [{"Name": "x"}]}), "Routes[0].Match.HTTP.Header[0]", "exactly one"),
        (
            _route({"Header": [{"Name": "x", "Exact": "1", "Colour": 1}]}),
            "Routes[0].Match.HTTP.Header[0].Colour",
            "unknown field",
        ),
        (
            _route({"QueryParam": [{"Name": "q"}]}),
            "Routes[0].Match.HTTP.QueryParam[0]",
            "exactly one",
        ),
        (
            _route({"QueryParam": [{"Present": True}]}),
            "Routes[0].Match.HTTP.QueryParam[0].Name",
            "missing",
        ),
        (_route({"Methods": ["BREW"]}), "Routes[0].Match.HTTP.Methods", "invalid HTTP method"),
        (
            _route({"PathRegex": "/a"}, PrefixRewrite="/b"),
            "Routes[0].Destination.PrefixRewrite",
            "PathExact or PathPrefix",
        ),
        (
            _route(None, PrefixRewrite="/b"),
            "Routes[0].Destination.PrefixRewrite",
            "PathExact or PathPrefix",
        ),
        (
            _route(None, RetryOn=["cancelled"]),
            "Routes[0].Destination.RetryOn",
            "not supported by meshnode's HTTP/1.1",
        ),
        (
            _route(None, RetryOn=["sometimes"]),
            "Routes[0].Destination.RetryOn",
            "invalid retry condition",
        ),
        (
            _route(None, RetryOnStatusCodes=[700]),
            "Routes[0].Destination.RetryOnStatusCodes[0]",
            "not an HTTP status",
        ),
        (_route(None, NumRetries=1000), "Routes[0].Destination.NumRetries", "out of range"),
        (
            _route(None, RequestTimeout="soon"),
            "Routes[0].Destination.RequestTimeout",
            "invalid duration",
        ),
        (
            _route(None, ResponseHeaders={}),
            "Routes[0].Destination.ResponseHeaders",
            "not supported",
        ),
        (_route(None, Service="a*"), "Routes[0].Destination.Service", "partial values"),
        ({"Routes": [{"Match": {"GRPC": {}}}]}, "Routes[0].Match.GRPC", "unknown field"),
    ],
)
def test_service_router_errors(body: dict[str, Any], path: str, says: str) -> None:
    refused(parse_config_entry, "service-router", "web", body, path=path, says=says)


# ------------------------------------------------------------------------- config entry envelope


@pytest.mark.parametrize(
    ("kind", "name", "body", "path", "says"),
    [
        (None, None, {"Name": "web"}, "Kind", "missing Kind"),
        ("proxy-defaults", "global", {}, "Kind", "unsupported config entry kind 'proxy-defaults'"),
        ("service-defaults", "web", {"Kind": "service-router"}, "Kind", "disagrees"),
        ("service-defaults", "web", {"Name": "api"}, "Name", "disagrees"),
        ("service-defaults", None, {}, "Name", "missing Name"),
        ("service-defaults", "*", {}, "Name", "only valid in intentions"),
        ("service-defaults", "web", {"Namespace": "other"}, "Namespace", '"default" namespace'),
        ("service-defaults", "web", {"Meta": {"consul-x": "1"}}, "Meta.consul-x", "reserved"),
        ("service-defaults", "web", "text", "", "expected a JSON object"),
    ],
)
def test_config_entry_envelope_errors(
    kind: str | None, name: str | None, body: Any, path: str, says: str
) -> None:
    refused(parse_config_entry, kind, name, body, path=path, says=says)


def test_config_entry_kind_and_name_may_come_from_the_body() -> None:
    entry = parse_config_entry(
        None,
        None,
        {"Kind": "service-defaults", "Name": "web", "Protocol": "http", "CreateIndex": 4},
    )
    assert isinstance(entry, ServiceDefaults) and entry.name == "web"


def test_config_entry_json_has_kind_name_and_indexes() -> None:
    entry = parse_config_entry("service-defaults", "web", {"Protocol": "http", "Meta": {"a": "b"}})
    assert config_entry_json(entry, create_index=2, modify_index=5) == {
        "Kind": "service-defaults",
        "Name": "web",
        "Protocol": "http",
        "Meta": {"a": "b"},
        "CreateIndex": 2,
        "ModifyIndex": 5,
    }


# ------------------------------------------------------------------------- cross-entry checks


def graph(*values: PolicyValue) -> dict[tuple[str, str], PolicyValue]:
    return {(v.kind, v.name): v for v in values}


HTTP_WEB = parse_config_entry("service-defaults", "web", {"Protocol": "http"})
TCP_WEB = parse_config_entry("service-defaults", "web", {"Protocol": "tcp"})
RESOLVER_WEB = parse_config_entry(
    "service-resolver",
    "web",
    {"Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {}}},
)
SPLIT_WEB = parse_config_entry(
    "service-splitter",
    "web",
    {"Splits": [{"Weight": 80, "ServiceSubset": "v1"}, {"Weight": 20, "ServiceSubset": "v2"}]},
)


def test_splitter_with_defined_subsets_on_http_service_is_accepted() -> None:
    validate_against(SPLIT_WEB, graph(HTTP_WEB, RESOLVER_WEB))


def test_splitter_naming_a_missing_subset_is_refused() -> None:
    resolver_v1_only = parse_config_entry("service-resolver", "web", {"Subsets": {"v1": {}}})
    refused(
        validate_against,
        SPLIT_WEB,
        graph(HTTP_WEB, resolver_v1_only),
        path="Splits[1].ServiceSubset",
        says="subset 'v2' is not defined by the service-resolver of 'web'",
    )
    refused(
        validate_against,
        SPLIT_WEB,
        graph(HTTP_WEB),
        path="Splits[0].ServiceSubset",
        says="'web' has no service-resolver",
    )


def test_splitter_on_a_tcp_service_is_refused() -> None:
    for current in (graph(TCP_WEB, RESOLVER_WEB), graph(RESOLVER_WEB)):
        refused(
            validate_against, SPLIT_WEB, current, says="to use protocol 'http', but it uses 'tcp'"
        )


def test_split_to_a_service_with_another_protocol_is_refused() -> None:
    splitter = parse_config_entry(
        "service-splitter", "web", {"Splits": [{"Weight": 50}, {"Weight": 50, "Service": "api"}]}
    )
    refused(validate_against, splitter, graph(HTTP_WEB), path="Splits[1].Service", says="'api'")
    api_http = parse_config_entry("service-defaults", "api", {"Protocol": "http"})
    validate_against(splitter, graph(HTTP_WEB, api_http))


def test_router_checks_protocol_and_subsets() -> None:
    router = parse_config_entry(
        "service-router",
        "web",
        {
            "Routes": [
                {"Match": {"HTTP": {"PathPrefix": "/b"}}, "Destination": {"ServiceSubset": "v3"}}
            ]
        },
    )
    refused(validate_against, router, graph(RESOLVER_WEB), says="protocol 'http'")
    refused(
        validate_against,
        router,
        graph(HTTP_WEB, RESOLVER_WEB),
        path="Routes[0].Destination.ServiceSubset",
        says="'v3' is not defined",
    )


def test_resolver_failover_to_another_services_subset_must_exist() -> None:
    resolver = parse_config_entry(
        "service-resolver", "web", {"Failover": {"*": {"Service": "api", "ServiceSubset": "blue"}}}
    )
    refused(validate_against, resolver, {}, says="'api' has no service-resolver")
    api = parse_config_entry("service-resolver", "api", {"Subsets": {"blue": {}}})
    validate_against(resolver, graph(api))


def test_l7_intention_needs_an_http_destination() -> None:
    intention = l7("web", "api", {"Action": "allow", "HTTP": {"PathPrefix": "/"}})
    refused(validate_against, intention, {}, path="Permissions", says="protocol 'http'")
    api_http = parse_config_entry("service-defaults", "api", {"Protocol": "http"})
    validate_against(intention, graph(api_http))
    validate_against(ixn("web", "api"), {})  # L4 intentions work with any protocol


def test_changes_that_break_dependents_are_refused() -> None:
    current = graph(HTTP_WEB, RESOLVER_WEB, SPLIT_WEB)
    refused(
        validate_delete,
        "service-resolver",
        "web",
        current,
        says="cannot delete service-resolver 'web': service-splitter 'web' depends on it",
    )
    refused(validate_against, TCP_WEB, current, says="cannot write service-defaults 'web'")
    refused(validate_delete, "service-defaults", "web", current, says="depends on it")
    narrower = parse_config_entry("service-resolver", "web", {"Subsets": {"v1": {}}})
    refused(validate_against, narrower, current, says="subset 'v2'")
    # Deleting the dependent itself, or an unrelated entry, is fine.
    validate_delete("service-splitter", "web", current)
    validate_delete("intention", "a=>b", current)


# ------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "value",
    [
        ixn("web", "db"),
        ixn("*", "*", "deny", Description="deny all", Meta={"k": "v"}),
        API_L7,
        HTTP_WEB,
        RESOLVER_WEB,
        SPLIT_WEB,
        parse_config_entry("service-resolver", "web", RESOLVER_BODY),
        parse_config_entry("service-router", "web", ROUTER_BODY),
    ],
)
def test_stored_body_parses_back_to_the_same_value(value: PolicyValue) -> None:
    body = value_to_body(value)
    assert parse_value(value.kind, value.name, body) == value
    # And the body is stable: what a relay re-derives equals what was signed.
    assert value_to_body(parse_value(value.kind, value.name, body)) == body


def test_intention_stored_under_another_key_is_refused() -> None:
    with pytest.raises(ValidationError, match="stored under"):
        parse_value("intention", "api=>db", value_to_body(ixn("web", "db")))
