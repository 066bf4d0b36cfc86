"""The snapshot builder (meshnode/sidecar.py): pure, from a catalog and policy built here."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshnode.catalog import Catalog
from meshnode.connect import LocalLeaf
from meshnode.leadership import encode_node_meta
from meshnode.model import HealthStatus, NodeInfo, ValidationError, parse_registration
from meshnode.policy import (
    KIND_INTENTION,
    PolicyValue,
    parse_config_entry,
    parse_intention,
)
from meshnode.sidecar import (
    SnapshotInputs,
    _normalized,
    _Target,
    build_snapshot,
    proxy_port_of,
    with_proxy_port,
)
from proxy.snapshot import (
    Cluster,
    HttpMatch,
    Snapshot,
    Upstream,
    check,
    decode,
    encode,
    instance_sni,
)

TRUST_DOMAIN = "11111111-2222-3333-4444-555555555555.consul"
ROOT = "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n"


def leaf(service: str) -> LocalLeaf:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return LocalLeaf(
        service=service,
        spiffe_id=f"spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/{service}",
        cert_pem=f"chain of {service}",
        leaf_pem=f"leaf of {service}",
        private_key_pem=f"key of {service}",
        serial_number=1,
        not_before=now,
        not_after=now + timedelta(days=3),
        root_id="root",
        index=1,
    )


def register(catalog: Catalog, body: dict[str, Any], status: HealthStatus | None = None) -> None:
    service, checks = parse_registration(body)
    catalog.register_service(service, checks)
    if status is not None:
        for check_id in catalog.local.checks:
            if catalog.local.checks[check_id].definition.service_id == service.id:
                catalog.update_check(check_id, status)


class World:
    """A local node ``local`` (10.0.0.1, proxy 20000) and remote nodes merged in."""

    def __init__(self) -> None:
        self.catalog = Catalog(NodeInfo("local", "id-local", "10.0.0.1", "dc1"))
        self.policy: dict[tuple[str, str], PolicyValue] = {}
        self.ports: dict[str, int] = {"local": 20000}
        self.leaves: dict[str, LocalLeaf] = {}
        self.default_allow = False

    def local(self, body: dict[str, Any], *, with_leaf: bool = True) -> None:
        register(self.catalog, body)
        if with_leaf:
            name = str(body["Name"])
            self.leaves[name] = leaf(name)

    def remote(
        self,
        node: str,
        address: str,
        services: list[dict[str, Any]],
        *,
        port: int = 20000,
        status: HealthStatus | None = None,
    ) -> None:
        other = Catalog(NodeInfo(node, f"id-{node}", address, "dc1"))
        for body in services:
            register(other, body, status)
        self.catalog.merge(other.local)
        if port:
            self.ports[node] = port

    def entry(self, kind: str, name: str, body: dict[str, Any]) -> None:
        self.policy[(kind, name)] = parse_config_entry(kind, name, body)

    def intention(self, body: dict[str, Any]) -> None:
        intention = parse_intention(body)
        self.policy[(KIND_INTENTION, intention.name)] = intention

    def inputs(self, **changes: Any) -> SnapshotInputs:
        values: dict[str, Any] = {
            "node": "local",
            "datacenter": "dc1",
            "host": "10.0.0.1",
            "port": 20000,
            "catalog": self.catalog,
            "policy": self.policy,
            "leaves": self.leaves,
            "trust_domain": TRUST_DOMAIN,
            "roots": (ROOT,),
            "proxy_ports": self.ports,
            "default_allow": self.default_allow,
        }
        values.update(changes)
        return SnapshotInputs(**values)

    def build(self, **changes: Any) -> Snapshot:
        snapshot = build_snapshot(self.inputs(**changes))
        check(snapshot)
        assert decode(encode(snapshot)) == snapshot
        return snapshot


def web_calling(destination: str, port: int = 15001) -> dict[str, Any]:
    return {
        "Name": "web",
        "Port": 8080,
        "Connect": {
            "SidecarService": {
                "Proxy": {"Upstreams": [{"DestinationName": destination, "LocalBindPort": port}]}
            }
        },
    }


def http(world: World, *services: str) -> None:
    for service in services:
        world.entry("service-defaults", service, {"Protocol": "http"})


def only_upstream(snapshot: Snapshot) -> Upstream:
    assert len(snapshot.upstreams) == 1
    return snapshot.upstreams[0]


def weights(upstream: Upstream, route: int = -1) -> Mapping[str, int]:
    return {s.cluster: s.weight for s in upstream.routes[route].splits}


def endpoints(cluster: Cluster) -> list[tuple[str, int, str]]:
    return [(e.host, e.port, e.instance) for e in cluster.endpoints]


# ------------------------------------------------------------------------------ basics


def test_without_trust_bundle_nothing_listens() -> None:
    world = World()
    world.local(web_calling("api"))
    snapshot = world.build(trust_domain="", roots=())
    assert snapshot.inbound is None and snapshot.upstreams == ()


def test_deterministic_and_stable_encoding() -> None:
    world = World()
    world.local(web_calling("api"))
    world.remote("n2", "10.0.0.2", [{"Name": "api", "ID": "api-b", "Port": 1}])
    world.remote("n3", "10.0.0.3", [{"Name": "api", "ID": "api-a", "Port": 1}])
    assert encode(world.build()) == encode(world.build())


def test_inbound_services_targets_and_intentions() -> None:
    world = World()
    world.local({"Name": "api", "ID": "api-1", "Port": 9001})
    world.local({"Name": "api", "ID": "api-2", "Port": 9002, "Address": "127.0.0.2"})
    world.local({"Name": "db", "Port": 5432}, with_leaf=False)  # no leaf yet: skipped
    world.local({"Name": "noport"})
    http(world, "api")
    world.intention({"SourceName": "*", "DestinationName": "api", "Action": "deny"})
    world.intention({"SourceName": "web", "DestinationName": "api", "Action": "allow"})
    world.intention({"SourceName": "web", "DestinationName": "*", "Action": "deny"})
    world.intention(
        {
            "SourceName": "admin",
            "DestinationName": "api",
            "Permissions": [
                {"Action": "allow", "HTTP": {"PathPrefix": "/admin", "Methods": ["GET"]}},
                {"Action": "deny", "HTTP": {"PathPrefix": "/"}},
            ],
        }
    )
    world.intention({"SourceName": "web", "DestinationName": "db", "Action": "allow"})
    inbound = world.build().inbound
    assert inbound is not None
    assert (inbound.host, inbound.port) == ("10.0.0.1", 20000)
    assert sorted(inbound.services) == ["api", "noport"]
    api = inbound.services["api"]
    assert api.protocol == "http" and not api.default_allow
    assert api.certificate.chain_pem == "chain of api"
    assert api.certificate.key_pem == "key of api"
    # Consul precedence: exact => exact (9) before * => exact (8) before exact => * (6).
    assert [(r.source, r.action, r.name) for r in api.intentions] == [
        ("admin", "", "admin => api"),
        ("web", "allow", "web => api"),
        ("*", "deny", "* => api"),
        ("web", "deny", "web => *"),
    ]
    admin = api.intentions[0]
    assert [p.action for p in admin.permissions] == ["allow", "deny"]
    assert admin.permissions[0].match == HttpMatch(path_prefix="/admin", methods=("GET",))
    assert inbound.targets["api"].addresses == (("127.0.0.1", 9001), ("127.0.0.2", 9002))
    assert inbound.targets[instance_sni("api", "api-2")].addresses == (("127.0.0.2", 9002),)
    assert inbound.targets["noport"].addresses == ()


def test_default_allow_and_local_limits() -> None:
    world = World()
    world.default_allow = True
    world.local({"Name": "api", "Port": 9001})
    world.entry(
        "service-defaults",
        "api",
        {
            "Protocol": "http",
            "MaxInboundConnections": 100,
            "LocalConnectTimeoutMs": 250,
            "LocalRequestTimeoutMs": 2000,
            "RateLimits": {
                "InstanceLevel": {"RequestsPerSecond": 50, "RequestsMaxBurst": 80},
                "PerSource": {"RequestsPerSecond": 5},
            },
        },
    )
    inbound = world.build().inbound
    assert inbound is not None
    api = inbound.services["api"]
    assert api.default_allow
    assert (api.max_connections, api.connect_timeout, api.request_timeout) == (100, 0.25, 2.0)
    assert api.rate_limit is not None and api.rate_limit_per_source is not None
    assert (api.rate_limit.requests_per_second, api.rate_limit.burst) == (50, 80)
    assert (api.rate_limit_per_source.requests_per_second, api.rate_limit_per_source.burst) == (
        5,
        5,
    )


# ---------------------------------------------------------------------------- outbound


def test_tcp_upstream_endpoints_skip_critical_and_proxyless_nodes() -> None:
    world = World()
    world.local(web_calling("api"))
    world.remote("n2", "10.0.0.2", [{"Name": "api", "Port": 1, "Weights": {"Passing": 3}}])
    world.remote(
        "n3",
        "10.0.0.3",
        [{"Name": "api", "Port": 1, "Check": {"TTL": "10s"}}],
        status=HealthStatus.CRITICAL,
    )
    world.remote("n4", "10.0.0.4", [{"Name": "api", "Port": 1}], port=0)  # no proxy
    world.remote(
        "n5",
        "10.0.0.5",
        [{"Name": "api", "Port": 1, "Check": {"TTL": "10s"}, "Weights": {"Warning": 2}}],
        port=21000,
        status=HealthStatus.WARNING,
    )
    upstream = only_upstream(world.build())
    assert (upstream.source, upstream.destination, upstream.protocol) == ("web", "api", "tcp")
    assert (upstream.host, upstream.port) == ("127.0.0.1", 15001)
    assert upstream.certificate.spiffe_id.endswith("/svc/web")
    assert [r.name for r in upstream.routes] == ["api/default"]
    assert weights(upstream) == {"api": 10_000}
    cluster = upstream.clusters["api"]
    assert cluster.identity == f"spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/api"
    assert endpoints(cluster) == [("10.0.0.2", 20000, "api"), ("10.0.0.5", 21000, "api")]
    assert [e.weight for e in cluster.endpoints] == [3, 2]
    assert cluster.endpoints[0].sni == instance_sni("api", "api")
    assert cluster.endpoints[0].node == "n2"


def test_no_upstream_without_source_leaf_and_connect_proxy_kind() -> None:
    world = World()
    world.local(web_calling("api"), with_leaf=False)
    assert world.build().upstreams == ()
    world.local(
        {
            "Name": "web-sidecar-proxy",
            "Kind": "connect-proxy",
            "Port": 21000,
            "Proxy": {
                "DestinationServiceName": "web",
                "Upstreams": [
                    {"DestinationName": "db", "LocalBindPort": 15002},
                    {"LocalBindPort": 15003},  # no DestinationName: the whole block is skipped
                ],
            },
        },
        with_leaf=False,
    )
    assert world.build().upstreams == ()
    world.local(
        {
            "Name": "cache-proxy",
            "Kind": "connect-proxy",
            "Proxy": {
                "DestinationServiceName": "web",
                "Upstreams": [{"DestinationName": "cache", "LocalBindPort": 15004}],
            },
        },
        with_leaf=False,
    )
    world.leaves["web"] = leaf("web")
    snapshot = world.build()
    assert [(u.source, u.destination, u.port) for u in snapshot.upstreams] == [
        ("web", "cache", 15004),
        ("web", "api", 15001),
    ]
    # a connect-proxy registration is not a destination of the inbound port
    assert snapshot.inbound is not None and "web-sidecar-proxy" not in snapshot.inbound.services


def test_router_splitter_resolver_chain() -> None:
    world = World()
    world.local(web_calling("api"))
    http(world, "api", "api-canary")
    world.remote(
        "n2",
        "10.0.0.2",
        [
            {"Name": "api", "ID": "api-v1", "Port": 1, "Meta": {"version": "1"}},
            {"Name": "api", "ID": "api-v2", "Port": 2, "Meta": {"version": "2"}},
            {"Name": "api-canary", "Port": 3},
        ],
    )
    world.entry(
        "service-resolver",
        "api",
        {
            "DefaultSubset": "v1",
            "Subsets": {
                "v1": {"Filter": 'Service.Meta.version == "1"'},
                "v2": {"Filter": 'Service.Meta.version == "2"'},
            },
            "ConnectTimeout": "2s",
            "LoadBalancer": {
                "Policy": "ring_hash",
                "RingHashConfig": {"MinimumRingSize": 64},
                "HashPolicies": [{"Field": "header", "FieldValue": "x-user"}, {"SourceIP": True}],
            },
        },
    )
    world.entry(
        "service-splitter",
        "api",
        {
            "Splits": [
                {"Weight": 80, "ServiceSubset": "v1"},
                {"Weight": 10, "ServiceSubset": "v2"},
                {"Weight": 10, "Service": "api-canary"},
            ]
        },
    )
    world.entry(
        "service-router",
        "api",
        {
            "Routes": [
                {
                    "Match": {"HTTP": {"PathPrefix": "/v2"}},
                    "Destination": {
                        "ServiceSubset": "v2",
                        "RequestTimeout": "3s",
                        "NumRetries": 2,
                        "RetryOn": ["reset", "gateway-error"],
                        "RetryOnStatusCodes": [429],
                    },
                },
                {
                    "Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}},
                    "Destination": {"Service": "api-canary"},
                },
            ]
        },
    )
    upstream = only_upstream(world.build())
    assert upstream.protocol == "http"
    assert [r.name for r in upstream.routes] == ["api/route0", "api/route1", "api/default"]
    first = upstream.routes[0]
    assert first.match == HttpMatch(path_prefix="/v2")
    assert weights(upstream, 0) == {"v2.api": 10_000}
    assert first.request_timeout == 3.0
    assert first.retry.num_retries == 2 and first.retry.on_reset
    assert first.retry.on_status_codes == (429, 502, 503, 504)
    assert weights(upstream, 1) == {"api-canary": 10_000}
    assert upstream.routes[1].request_timeout == 15.0
    assert weights(upstream, 2) == {"v1.api": 8000, "v2.api": 1000, "api-canary": 1000}
    assert sorted(upstream.clusters) == ["api-canary", "v1.api", "v2.api"]
    v1 = upstream.clusters["v1.api"]
    assert (v1.service, v1.subset, v1.connect_timeout) == ("api", "v1", 2.0)
    assert [e.instance for e in v1.endpoints] == ["api-v1"]
    assert [e.instance for e in upstream.clusters["v2.api"].endpoints] == ["api-v2"]
    assert v1.load_balancing.policy == "ring_hash"
    assert v1.load_balancing.minimum_ring_size == 64
    assert v1.load_balancing.hash_on == ("header:x-user", "source_ip")
    assert upstream.clusters["api-canary"].load_balancing.policy == "round_robin"


def test_nested_splitters_multiply_and_round_to_10000() -> None:
    world = World()
    world.local(web_calling("api"))
    http(world, "api", "a", "b", "c")
    world.entry(
        "service-splitter",
        "api",
        {"Splits": [{"Weight": 50, "Service": "a"}, {"Weight": 50, "Service": "b"}]},
    )
    world.entry(
        "service-splitter",
        "b",
        {
            "Splits": [
                {"Weight": 33.33, "Service": "c"},
                {"Weight": 33.33, "Service": "a"},
                {"Weight": 33.34},
            ]
        },
    )
    upstream = only_upstream(world.build())
    split = weights(upstream)
    # a: 50 % + 50 % of 33.33 %, b: 50 % of 33.34 %, c: 50 % of 33.33 %; the half unit
    # left by rounding goes to the first of the equal remainders (by cluster name).
    assert split == {"a": 6667, "b": 1667, "c": 1666}


def test_redirect_and_failover() -> None:
    world = World()
    world.local(web_calling("api"))
    world.remote("n2", "10.0.0.2", [{"Name": "api-next", "Port": 1, "Tags": ["blue"]}])
    world.remote(
        "n3",
        "10.0.0.3",
        [{"Name": "api-dr", "Port": 1, "Check": {"TTL": "10s"}}],
        status=HealthStatus.WARNING,
    )
    world.entry("service-resolver", "api", {"Redirect": {"Service": "api-next"}})
    world.entry(
        "service-resolver",
        "api-next",
        {
            "Subsets": {"blue": {"Filter": '"blue" in Service.Tags'}},
            "DefaultSubset": "blue",
            "Failover": {"*": {"Targets": [{"Service": "api-dr"}, {"ServiceSubset": "blue"}]}},
        },
    )
    world.entry(
        "service-resolver",
        "api-dr",
        {"Subsets": {"ok": {"OnlyPassing": True}}, "Failover": {"*": {"Service": "elsewhere"}}},
    )
    upstream = only_upstream(world.build())
    assert weights(upstream) == {"blue.api-next": 10_000}
    blue = upstream.clusters["blue.api-next"]
    assert blue.failover == ("api-dr",)  # the target equal to itself is dropped
    dr = upstream.clusters["api-dr"]
    assert dr.failover == ()  # one level, as Consul compiles it
    assert [e.host for e in dr.endpoints] == ["10.0.0.3"]  # warning counts as healthy


def test_only_passing_subset_excludes_warning() -> None:
    world = World()
    world.local(web_calling("api"))
    world.remote(
        "n2",
        "10.0.0.2",
        [{"Name": "api", "Port": 1, "Check": {"TTL": "10s"}}],
        status=HealthStatus.WARNING,
    )
    world.remote("n3", "10.0.0.3", [{"Name": "api", "Port": 1}])
    world.entry(
        "service-resolver", "api", {"Subsets": {"ok": {"OnlyPassing": True}}, "DefaultSubset": "ok"}
    )
    upstream = only_upstream(world.build())
    assert [e.node for e in upstream.clusters["ok.api"].endpoints] == ["n3"]


def test_upstream_config_of_the_source_service() -> None:
    world = World()
    world.local(web_calling("api"))
    world.entry(
        "service-defaults",
        "web",
        {
            "UpstreamConfig": {
                "Defaults": {"ConnectTimeoutMs": 900, "Limits": {"MaxConnections": 7}},
                "Overrides": [
                    {
                        "Name": "api",
                        "Limits": {
                            "MaxConnections": 10,
                            "MaxPendingRequests": 11,
                            "MaxConcurrentRequests": 12,
                        },
                        "PassiveHealthCheck": {
                            "MaxFailures": 3,
                            "Interval": "5s",
                            "BaseEjectionTime": "7s",
                            "MaxEjectionPercent": 50,
                        },
                    }
                ],
            }
        },
    )
    cluster = only_upstream(world.build()).clusters["api"]
    assert cluster.connect_timeout == 0.9
    limits = cluster.limits
    assert (limits.max_connections, limits.max_pending_requests, limits.max_requests) == (
        10,
        11,
        12,
    )
    assert cluster.outlier is not None
    outlier = cluster.outlier
    assert (outlier.consecutive_5xx, outlier.interval, outlier.base_ejection_time) == (3, 5, 7)
    assert outlier.max_ejection_percent == 50


def test_upstream_bind_address_clash_with_inbound_is_skipped() -> None:
    world = World()
    world.local(
        {
            "Name": "web",
            "Connect": {
                "SidecarService": {
                    "Proxy": {
                        "Upstreams": [
                            {
                                "DestinationName": "api",
                                "LocalBindPort": 20000,
                                "LocalBindAddress": "10.0.0.1",
                            },
                            {"DestinationName": "db", "LocalBindPort": 15001},
                        ]
                    }
                }
            },
        }
    )
    assert [u.destination for u in world.build().upstreams] == ["db"]


# ---------------------------------------------------------------------- registration


@pytest.mark.parametrize(
    ("upstream", "path", "message"),
    [
        ({"LocalBindPort": 1}, "Upstreams[0].DestinationName", "missing DestinationName"),
        ({"DestinationName": "api"}, "Upstreams[0].LocalBindPort", "missing LocalBindPort"),
        ({"DestinationName": "api", "LocalBindPort": 0}, "Upstreams[0].LocalBindPort", "range"),
        ({"DestinationName": "api", "LocalBindPort": 70000}, "LocalBindPort", "out of range"),
        ({"DestinationName": "api", "LocalBindPort": "x"}, "LocalBindPort", "integer"),
        (
            {"DestinationName": "api", "LocalBindPort": 1, "LocalBindAddress": "nope"},
            "LocalBindAddress",
            "IP address",
        ),
    ],
)
def test_registration_refuses_bad_upstreams(
    upstream: dict[str, Any], path: str, message: str
) -> None:
    body = {"Name": "web", "Connect": {"SidecarService": {"Proxy": {"Upstreams": [upstream]}}}}
    with pytest.raises(ValidationError) as caught:
        parse_registration(body)
    assert path in caught.value.path and message in caught.value.message


def test_registration_refuses_a_bind_port_used_twice() -> None:
    twice = {
        "Name": "web",
        "Connect": {
            "SidecarService": {
                "Proxy": {
                    "Upstreams": [
                        {"DestinationName": "a", "LocalBindPort": 1},
                        {"DestinationName": "b", "LocalBindPort": 1},
                    ]
                }
            }
        },
    }
    with pytest.raises(ValidationError, match=r"Upstreams\[1\].LocalBindPort"):
        parse_registration(twice)
    catalog = Catalog(NodeInfo("local", "id", "10.0.0.1", "dc1"))
    register(catalog, web_calling("api", 15001))
    register(catalog, web_calling("api", 15001))  # the same service again: fine
    clash = web_calling("db", 15001) | {"Name": "billing"}
    with pytest.raises(ValidationError, match="already an upstream of service 'web'"):
        register(catalog, clash)


# ---------------------------------------------------------------------- node metadata


def test_proxy_port_in_node_metadata() -> None:
    base = encode_node_meta([b"abcd"], server=True, leader=(3, "s1"))
    meta = with_proxy_port(base, 21000)
    assert proxy_port_of(meta) == 21000
    assert proxy_port_of(base) == 0
    assert with_proxy_port(base, 0) == base
    assert proxy_port_of(with_proxy_port(b"", 20000)) == 20000
    assert proxy_port_of(b"garbage") == 0


def test_wildcard_inbound_takes_its_port_everywhere() -> None:
    world = World()
    world.local(web_calling("api", 20000))
    assert world.build(host="0.0.0.0").upstreams == ()
    assert [u.port for u in world.build(host="10.0.0.1").upstreams] == [20000]


@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=12))
def test_normalized_weights_always_add_up(raw: list[int]) -> None:
    shares = {_Target(f"s{i}", ""): float(w) for i, w in enumerate(raw)}
    out = _normalized(shares)
    assert sum(w for _, w in out) == 10_000
    total = sum(raw)
    for target, weight in out:
        assert abs(weight - shares[target] * 10_000 / total) < 1


_SERVICES = ("a", "b", "c")


@st.composite
def _chains(draw: st.DrawFn) -> dict[tuple[str, str], dict[str, Any]]:
    """Random splitters and resolvers over three http services, loops included
    (policy validation does not follow chains across services)."""
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    for service in _SERVICES:
        if draw(st.booleans()):
            resolver: dict[str, Any] = {"Subsets": {"v1": {}, "v2": {"OnlyPassing": True}}}
            if draw(st.booleans()):
                resolver["DefaultSubset"] = draw(st.sampled_from(["v1", "v2"]))
            if draw(st.booleans()):
                resolver["Redirect"] = {
                    "Service": draw(st.sampled_from([s for s in _SERVICES if s != service]))
                }
            elif draw(st.booleans()):
                resolver["Failover"] = {
                    "*": {"Targets": [{"Service": draw(st.sampled_from(_SERVICES))}]}
                }
            entries[("service-resolver", service)] = resolver
        if draw(st.booleans()):
            targets = draw(
                st.lists(st.sampled_from(_SERVICES), min_size=1, max_size=3, unique=True)
            )
            cuts = sorted(
                draw(
                    st.lists(
                        st.integers(0, 10_000), min_size=len(targets) - 1, max_size=len(targets) - 1
                    )
                )
            )
            bounds = [0, *cuts, 10_000]
            entries[("service-splitter", service)] = {
                "Splits": [
                    {"Weight": (bounds[i + 1] - bounds[i]) / 100, "Service": target}
                    for i, target in enumerate(targets)
                ]
            }
    return entries


@given(_chains())
def test_any_chain_compiles_to_a_valid_snapshot(
    entries: dict[tuple[str, str], dict[str, Any]],
) -> None:
    world = World()
    world.local(web_calling("a"))
    http(world, *_SERVICES)
    for service in _SERVICES:
        world.remote(f"n-{service}", f"10.0.1.{len(service)}", [{"Name": service, "Port": 1}])
    for (kind, name), body in entries.items():
        world.entry(kind, name, body)
    upstream = only_upstream(world.build())  # check() passed: splits add up, names resolve
    assert upstream.routes[-1].name == "a/default"
    for cluster in upstream.clusters.values():
        assert cluster.service in _SERVICES


# ------------------------------------------------------------------- HTTP forward proxy


def web_with_forward_proxy(port: int = 15000, **config: Any) -> dict[str, Any]:
    body = web_calling("api", 15001)
    proxy = body["Connect"]["SidecarService"]["Proxy"]
    proxy["Upstreams"].append({"DestinationName": "db", "LocalBindPort": 15002})
    proxy["Config"] = {"http_proxy_port": port, **config}
    return body


def test_forward_proxy_serves_every_declared_upstream_by_host_name() -> None:
    world = World()
    world.remote("n2", "10.0.0.2", [{"Name": "api", "Port": 80}, {"Name": "db", "Port": 5432}])
    world.local(web_with_forward_proxy())
    snapshot = world.build()
    (forward,) = snapshot.forward_proxies
    assert (forward.source, forward.host, forward.port) == ("web", "127.0.0.1", 15000)
    assert forward.hosts == {
        "api": "api",
        "api.service.consul": "api",
        "api.service.dc1.consul": "api",
        "db": "db",
        "db.service.consul": "db",
        "db.service.dc1.consul": "db",
    }
    # Without web's leaf there are no upstreams, and no forward proxy to them.
    world.leaves.pop("web")
    assert world.build().forward_proxies == ()


def test_forward_proxy_port_is_validated_at_registration() -> None:
    with pytest.raises(ValidationError, match="http_proxy_port"):
        parse_registration(web_with_forward_proxy(port=0))
    with pytest.raises(ValidationError, match="http_proxy_address"):
        parse_registration(web_with_forward_proxy(http_proxy_address="localhost"))
    # The forward proxy's port is one of the registration's listeners.
    with pytest.raises(ValidationError, match=r"http_proxy_port.*15001"):
        parse_registration(web_with_forward_proxy(port=15001))
    catalog = Catalog(NodeInfo("local", "id", "10.0.0.1", "dc1"))
    register(catalog, web_with_forward_proxy())
    clash = web_calling("db", 15000) | {"Name": "billing"}
    with pytest.raises(ValidationError, match="already an upstream of service 'web'"):
        register(catalog, clash)
