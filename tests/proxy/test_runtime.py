"""``proxy.runtime``: a snapshot compiled into what the data path asks — intentions,
rate limits, routes, splits, failover, endpoint picks with outlier detection — and the
state carried over when the next snapshot is compiled. Pure: a fake clock (floats)
and seeded RNGs."""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.match import HeaderMatch, HttpMatch, HttpRequest
from proxy.resilience import CONNECT_FAILED, EndpointEjected, EndpointReturned
from proxy.runtime import (
    ClusterRuntime,
    Compiled,
    InboundRuntime,
    UpstreamRuntime,
    Verdict,
    compile_snapshot,
    source_service,
)
from proxy.snapshot import (
    Certificate,
    Cluster,
    Endpoint,
    Inbound,
    InboundTarget,
    IntentionRule,
    Limits,
    LoadBalancing,
    LocalService,
    Outlier,
    Permission,
    RateLimit,
    RetryPolicy,
    Route,
    Snapshot,
    SnapshotError,
    SplitTarget,
    Upstream,
)

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True)
TD = "11111111-2222-3333-4444-555555555555.consul"
CERT = Certificate("", "", f"spiffe://{TD}/ns/default/dc/dc1/svc/web")
LISTENER = ("127.0.0.1", 9191)


def spiffe(service: str, trust_domain: str = TD) -> str:
    return f"spiffe://{trust_domain}/ns/default/dc/dc1/svc/{service}"


def get(path: str = "/", **headers: str) -> HttpRequest:
    """A GET; keyword ``x_user`` is the header ``x-user``."""
    return HttpRequest.from_target(
        "GET", path, [(name.replace("_", "-"), value) for name, value in headers.items()]
    )


# ---------------------------------------------------------------------------- builders


def inbound_snapshot(*services: LocalService, version: int = 1) -> Snapshot:
    targets = {s.name: InboundTarget(s.name, (("127.0.0.1", 8080),)) for s in services}
    inbound = Inbound("0.0.0.0", 20000, {s.name: s for s in services}, targets)
    return Snapshot(version, TD, (), inbound=inbound)


def local(name: str = "api", **fields: object) -> LocalService:
    return LocalService(name, CERT, **fields)  # type: ignore[arg-type]


def inbound_runtime(*services: LocalService) -> InboundRuntime:
    compiled = compile_snapshot(inbound_snapshot(*services), None, random.Random(0))
    assert compiled.inbound is not None
    return compiled.inbound


def endpoints(count: int, sni: str = "api") -> tuple[Endpoint, ...]:
    return tuple(Endpoint(f"10.0.0.{i + 1}", 20000, sni) for i in range(count))


def cluster(name: str, endpoint_count: int = 3, **fields: object) -> Cluster:
    return Cluster(name, name, spiffe(name), endpoints(endpoint_count, name), **fields)  # type: ignore[arg-type]


def upstream_snapshot(
    clusters: Mapping[str, Cluster],
    routes: tuple[Route, ...] | None = None,
    *,
    version: int = 1,
) -> Snapshot:
    if routes is None:
        first = next(iter(clusters))
        routes = (Route("api/default", (SplitTarget(10_000, first),)),)
    upstream = Upstream("web", "api", *LISTENER, CERT, routes, dict(clusters), protocol="http")
    return Snapshot(version, TD, (), upstreams=(upstream,))


def upstream_of(compiled: Compiled) -> UpstreamRuntime:
    return compiled.upstreams[LISTENER]


def compile_upstream(
    clusters: Mapping[str, Cluster], routes: tuple[Route, ...] | None = None, seed: int = 0
) -> UpstreamRuntime:
    return upstream_of(
        compile_snapshot(upstream_snapshot(clusters, routes), None, random.Random(seed))
    )


def fail(runtime: ClusterRuntime, endpoint: Endpoint, times: int, now: float) -> None:
    for _ in range(times):
        runtime.record(endpoint, 503, now)


# ----------------------------------------------------------------------- SPIFFE names


@pytest.mark.parametrize(
    ("spiffe_id", "expected"),
    [
        (spiffe("web"), "web"),
        (spiffe("web", "other.consul"), ""),
        (f"spiffe://{TD}/agent/client/dc/dc1/id/node1", ""),
        (f"spiffe://{TD}/ns/default/dc/dc1/svc/", ""),
        (f"spiffe://{TD}/ns/default/dc/dc1/svc/web/extra", ""),
        (f"spiffe://{TD}.evil/ns/default/dc/dc1/svc/web", ""),
        (None, ""),
        ("", ""),
    ],
)
def test_source_service_reads_only_service_ids_of_our_trust_domain(
    spiffe_id: str | None, expected: str
) -> None:
    assert source_service(spiffe_id, TD) == expected


# ------------------------------------------------------------------------- intentions


def test_first_matching_intention_decides_in_snapshot_order() -> None:
    runtime = inbound_runtime(
        local(
            intentions=(
                IntentionRule("web", "allow", "web => api"),
                IntentionRule("db", "deny", "db => api"),
                IntentionRule("*", "deny", "* => api"),
                IntentionRule("late", "allow", "late => api"),
            )
        )
    )
    assert runtime.authorize_connection(spiffe("web"), "api") == Verdict(True, "web => api")
    assert runtime.authorize_connection(spiffe("db"), "api") == Verdict(False, "db => api")
    assert runtime.authorize_connection(spiffe("other"), "api") == Verdict(False, "* => api")
    # A ``*`` rule with higher precedence shadows a later exact rule.
    assert runtime.authorize_connection(spiffe("late"), "api") == Verdict(False, "* => api")


def test_no_matching_intention_gives_the_default() -> None:
    rules = (IntentionRule("web", "allow", "web => api"),)
    deny = inbound_runtime(local(intentions=rules))
    allow = inbound_runtime(local(intentions=rules, default_allow=True))
    assert deny.authorize_connection(spiffe("db"), "api") == Verdict(False, "default deny")
    assert allow.authorize_connection(spiffe("db"), "api") == Verdict(True, "default allow")
    assert deny.authorize_request(spiffe("db"), "api", get()) == Verdict(False, "default deny")
    assert allow.authorize_request(spiffe("db"), "api", get()) == Verdict(True, "default allow")
    assert deny.authorize_connection(spiffe("web"), "nope") == Verdict(False, "default deny")


def test_peers_without_a_service_id_of_our_domain_match_only_wildcards() -> None:
    named = inbound_runtime(local(intentions=(IntentionRule("web", "allow", "web => api"),)))
    foreign = spiffe("web", "other.consul")
    for peer in (foreign, None, f"spiffe://{TD}/agent/client/dc/dc1/id/n1"):
        assert named.authorize_connection(peer, "api") == Verdict(False, "default deny")
    wildcard = inbound_runtime(
        local(
            intentions=(
                IntentionRule("web", "deny", "web => api"),
                IntentionRule("*", "allow", "* => api"),
            )
        )
    )
    assert wildcard.authorize_connection(foreign, "api") == Verdict(True, "* => api")
    assert wildcard.authorize_connection(None, "api") == Verdict(True, "* => api")


def test_l7_intention_admits_the_connection_and_decides_each_request() -> None:
    permissions = (
        Permission("deny", HttpMatch(path_prefix="/admin")),
        Permission("allow", HttpMatch(path_prefix="/", methods=("GET",))),
    )
    runtime = inbound_runtime(
        local(
            protocol="http",
            default_allow=True,
            intentions=(IntentionRule("web", "", "web => api", permissions),),
        )
    )
    peer = spiffe("web")
    assert runtime.authorize_connection(peer, "api") == Verdict(True, "web => api")
    assert runtime.authorize_request(peer, "api", get("/items")) == Verdict(True, "web => api")
    assert runtime.authorize_request(peer, "api", get("/admin/x")) == Verdict(False, "web => api")
    post = HttpRequest.from_target("POST", "/items")
    # No permission matches: denied by the intention, even with a default allow.
    assert runtime.authorize_request(peer, "api", post) == Verdict(False, "web => api")
    # Other sources are not covered by it.
    assert runtime.authorize_request(spiffe("db"), "api", post) == Verdict(True, "default allow")


def test_l4_intention_decides_requests_too() -> None:
    runtime = inbound_runtime(
        local(protocol="http", intentions=(IntentionRule("web", "deny", "web => api"),))
    )
    assert runtime.authorize_request(spiffe("web"), "api", get()) == Verdict(False, "web => api")


def test_targets_and_local_round_robin() -> None:
    api = local()
    target = InboundTarget("api", (("127.0.0.1", 8080), ("127.0.0.1", 8081)))
    inbound = Inbound("0.0.0.0", 20000, {"api": api}, {"api": target})
    compiled = compile_snapshot(Snapshot(1, TD, (), inbound=inbound), None, random.Random(0))
    runtime = compiled.inbound
    assert runtime is not None
    assert runtime.target("api") is target
    assert runtime.target("nope") is None
    assert runtime.service("api") is api
    picks = [runtime.local_address(target) for _ in range(4)]
    assert picks == [("127.0.0.1", 8080), ("127.0.0.1", 8081)] * 2


# ------------------------------------------------------------------------ rate limits


def test_destination_rate_limit_says_when_a_token_will_be_there() -> None:
    runtime = inbound_runtime(local(rate_limit=RateLimit(2.0, 3)))
    assert [runtime.rate_limit("web", "api", 10.0) for _ in range(3)] == [0.0] * 3
    assert runtime.rate_limit("web", "api", 10.0) == pytest.approx(0.5)
    assert runtime.rate_limit("db", "api", 10.25) == pytest.approx(0.25)  # one bucket for all
    assert runtime.rate_limit("db", "api", 10.5) == 0.0
    assert runtime.rate_limit("web", "other", 10.5) == 0.0  # no limit, or unknown service


def test_per_source_buckets_are_independent() -> None:
    runtime = inbound_runtime(local(rate_limit_per_source=RateLimit(1.0, 2)))
    assert [runtime.rate_limit("web", "api", 0.0) for _ in range(2)] == [0.0, 0.0]
    assert runtime.rate_limit("web", "api", 0.0) == pytest.approx(1.0)
    assert [runtime.rate_limit("db", "api", 0.0) for _ in range(2)] == [0.0, 0.0]
    assert runtime.rate_limit("", "api", 0.0) == 0.0


def test_a_refusal_takes_from_neither_bucket() -> None:
    runtime = inbound_runtime(
        local(rate_limit=RateLimit(1.0, 3), rate_limit_per_source=RateLimit(1.0, 1))
    )
    assert runtime.rate_limit("web", "api", 0.0) == 0.0
    # web's own bucket is empty: refused, and the shared bucket keeps its tokens.
    for _ in range(5):
        assert runtime.rate_limit("web", "api", 0.0) == pytest.approx(1.0)
    assert runtime.rate_limit("db", "api", 0.0) == 0.0
    assert runtime.rate_limit("ops", "api", 0.0) == 0.0
    # Now the shared bucket is empty too: the longer wait is the answer.
    assert runtime.rate_limit("new", "api", 0.0) == pytest.approx(1.0)
    assert runtime.rate_limit("web", "api", 0.5) == pytest.approx(0.5)


def test_per_source_buckets_are_bounded_least_recently_used_first() -> None:
    api = local(rate_limit_per_source=RateLimit(1.0, 1))
    compiled = compile_snapshot(inbound_snapshot(api), None, random.Random(0))
    runtime = InboundRuntime(compiled.snapshot.inbound, TD, max_source_buckets=3)  # type: ignore[arg-type]
    for source in ("a", "b", "c"):
        assert runtime.rate_limit(source, "api", 0.0) == 0.0
    assert runtime.rate_limit("a", "api", 0.0) > 0  # a is now the most recently used
    assert runtime.rate_limit("d", "api", 0.0) == 0.0  # evicts b
    assert runtime.source_bucket_count == 3
    assert runtime.rate_limit("a", "api", 0.0) > 0  # kept: still limited
    assert runtime.rate_limit("b", "api", 0.0) == 0.0  # forgotten: a fresh bucket


def test_default_source_bucket_bound() -> None:
    runtime = inbound_runtime(local(rate_limit_per_source=RateLimit(1.0, 1)))
    for i in range(5000):
        runtime.rate_limit(f"s{i}", "api", 0.0)
    assert runtime.source_bucket_count == 4096


def test_rate_limits_survive_a_new_snapshot_unless_changed() -> None:
    api = local(rate_limit=RateLimit(1.0, 1), rate_limit_per_source=RateLimit(1.0, 1))
    first = compile_snapshot(inbound_snapshot(api), None, random.Random(0))
    assert first.inbound is not None
    assert first.inbound.rate_limit("web", "api", 0.0) == 0.0
    same = compile_snapshot(inbound_snapshot(api, version=2), first, random.Random(0))
    assert same.inbound is not None
    assert same.inbound.rate_limit("web", "api", 0.0) == pytest.approx(1.0)  # still hit
    # The per-source bucket is kept as well: lift only the destination limit.
    only_source = local(rate_limit_per_source=RateLimit(1.0, 1))
    lifted = compile_snapshot(inbound_snapshot(only_source, version=3), same, random.Random(0))
    assert lifted.inbound is not None
    assert lifted.inbound.rate_limit("web", "api", 0.0) == pytest.approx(1.0)
    assert lifted.inbound.rate_limit("db", "api", 0.0) == 0.0
    changed = local(rate_limit_per_source=RateLimit(2.0, 1))
    fresh = compile_snapshot(inbound_snapshot(changed, version=4), lifted, random.Random(0))
    assert fresh.inbound is not None
    assert fresh.inbound.rate_limit("web", "api", 0.0) == 0.0  # a new limit, a new bucket


# ----------------------------------------------------------------------------- routes


def test_routes_match_in_order_and_fall_back_to_the_last() -> None:
    clusters = {"api": cluster("api")}
    to_api = (SplitTarget(10_000, "api"),)
    routes = (
        Route("api/admin", to_api, HttpMatch(path_prefix="/admin")),
        Route("api/canary", to_api, HttpMatch(headers=(HeaderMatch("x-canary", "present"),))),
        Route("api/v1", to_api, HttpMatch(path_prefix="/v1")),
    )
    runtime = compile_upstream(clusters, routes)
    assert runtime.route(get("/admin/x", x_canary="1")).name == "api/admin"
    assert runtime.route(HttpRequest("GET", "/v1/x", {"x-canary": "1"})).name == "api/canary"
    assert runtime.route(get("/v1/x")).name == "api/v1"
    assert runtime.route(get("/other")).name == "api/v1"  # none matches: the last
    assert runtime.route(None).name == "api/admin"  # TCP: the first


def test_split_follows_weights_within_two_percent() -> None:
    clusters = {"v1": cluster("v1"), "v2": cluster("v2"), "v3": cluster("v3")}
    route = Route(
        "api/split",
        (SplitTarget(8000, "v1"), SplitTarget(0, "v3"), SplitTarget(2000, "v2")),
    )
    runtime = compile_upstream(clusters, (route,), seed=42)
    counts = Counter(runtime.split(runtime.route(None)).cluster.name for _ in range(10_000))
    assert counts["v3"] == 0
    assert abs(counts["v1"] / 10_000 - 0.8) <= 0.02
    assert abs(counts["v2"] / 10_000 - 0.2) <= 0.02


@PROPERTY
@given(
    weights=st.lists(st.integers(0, 10), min_size=1, max_size=6).filter(lambda w: sum(w) > 0),
    seed=st.integers(0, 2**32),
)
def test_split_never_picks_a_zero_weight_cluster(weights: list[int], seed: int) -> None:
    # Scale to 10,000 with the rounding error on the first nonzero weight.
    total = sum(weights)
    scaled = [w * 10_000 // total for w in weights]
    first = next(i for i, w in enumerate(weights) if w)
    scaled[first] += 10_000 - sum(scaled)
    clusters = {f"c{i}": cluster(f"c{i}") for i in range(len(weights))}
    splits = tuple(SplitTarget(w, f"c{i}") for i, w in enumerate(scaled))
    runtime = compile_upstream(clusters, (Route("r", splits),), seed=seed)
    route = runtime.route(None)
    zero = {f"c{i}" for i, w in enumerate(scaled) if w == 0}
    for _ in range(50):
        assert runtime.split(route).cluster.name not in zero


def test_resolve_follows_failover_to_the_first_cluster_with_endpoints() -> None:
    clusters = {
        "api": cluster("api", 0, failover=("dc2", "dc3")),
        "dc2": cluster("dc2", 0),
        "dc3": cluster("dc3", 2),
        "gone": cluster("gone", 0, failover=("dc2",)),
    }
    runtime = compile_upstream(clusters)
    api = runtime.clusters["api"]
    resolved = runtime.resolve(api, 0.0)
    assert resolved is runtime.clusters["dc3"]
    assert runtime.resolve(runtime.clusters["dc3"], 0.0) is runtime.clusters["dc3"]
    assert runtime.resolve(runtime.clusters["gone"], 0.0) is None
    assert not api.has_endpoints()
    assert api.pick(0.0) is None


def test_hash_key_is_stable_and_follows_hash_on_order() -> None:
    lb = LoadBalancing(
        "ring_hash", hash_on=("header:X-User", "cookie:session", "query:id", "source_ip")
    )
    clusters = {"api": cluster("api", 5, load_balancing=lb), "plain": cluster("plain")}
    runtime = compile_upstream(clusters)
    api = runtime.clusters["api"]
    key = runtime.hash_key(api, get(x_user="alice"), "10.1.1.1")
    assert key is not None
    assert key == runtime.hash_key(api, get("/other", x_user="alice"), "10.9.9.9")
    assert key != runtime.hash_key(api, get(x_user="bob"), "10.1.1.1")
    by_cookie = runtime.hash_key(api, get(cookie="a=1; session=s1"), "10.1.1.1")
    assert by_cookie == runtime.hash_key(api, get(cookie="session=s1"), "10.2.2.2")
    by_query = runtime.hash_key(api, get("/?id=7"), "10.1.1.1")
    assert by_query == runtime.hash_key(api, get("/x?id=7&y=1"), "10.2.2.2")
    by_ip = runtime.hash_key(api, get(), "10.1.1.1")
    assert by_ip == runtime.hash_key(api, None, "10.1.1.1") != runtime.hash_key(api, None, "::1")
    # The same key goes to the same endpoint.
    assert len({api.pick(0.0, hash_key=key) for _ in range(20)}) == 1
    assert runtime.hash_key(runtime.clusters["plain"], get(x_user="alice"), "10.1.1.1") is None


# ----------------------------------------------------------------- clusters and outliers


def test_balancing_policies_and_least_request_reads_active() -> None:
    for policy in ("round_robin", "least_request", "random", "ring_hash"):
        lb = LoadBalancing(policy)
        runtime = compile_upstream({"api": cluster("api", 3, load_balancing=lb)})
        assert runtime.clusters["api"].pick(0.0) in endpoints(3)
    runtime = compile_upstream(
        {"api": cluster("api", 2, load_balancing=LoadBalancing("least_request"))}
    )
    api = runtime.clusters["api"]
    busy, idle = endpoints(2, "api")
    for _ in range(5):
        api.request_started(busy)
    # Two choices with replacement: the busy one only when both draws are it (1/4).
    picks = Counter(api.pick(0.0) for _ in range(400))
    assert picks[idle] > 2 * picks[busy]
    for _ in range(5):
        api.request_finished(busy)
    assert api.active == {}


def test_outlier_ejects_then_returns_through_the_timer() -> None:
    outlier = Outlier(consecutive_5xx=3, base_ejection_time=30.0)
    runtime = compile_upstream({"api": cluster("api", 3, outlier=outlier)})
    api = runtime.clusters["api"]
    bad = endpoints(3, "api")[0]
    fail(api, bad, 3, now=100.0)
    assert api.timer() == 130.0
    assert bad not in {api.pick(101.0) for _ in range(30)}
    events = api.take_events()
    assert len(events) == 1
    assert isinstance(events[0], EndpointEjected)
    assert events[0].endpoint == bad
    assert api.take_events() == []
    api.handle_timer(130.0)
    assert api.timer() is None
    assert [type(e) for e in api.take_events()] == [EndpointReturned]
    assert bad in {api.pick(131.0) for _ in range(30)}


def test_connect_failures_count_for_outlier_detection() -> None:
    runtime = compile_upstream({"api": cluster("api", 2, outlier=Outlier(consecutive_5xx=2))})
    api = runtime.clusters["api"]
    bad = endpoints(2, "api")[1]
    api.record(bad, CONNECT_FAILED, 0.0)
    api.record(bad, CONNECT_FAILED, 0.0)
    assert {api.pick(1.0) for _ in range(10)} == {endpoints(2, "api")[0]}


def test_panic_when_every_endpoint_is_ejected() -> None:
    outlier = Outlier(consecutive_5xx=1, max_ejection_percent=100)
    runtime = compile_upstream({"api": cluster("api", 2, outlier=outlier)})
    api = runtime.clusters["api"]
    first, second = endpoints(2, "api")
    fail(api, first, 1, 0.0)
    assert {api.pick(1.0) for _ in range(10)} == {second}
    assert api.pick(1.0, exclude={second}) is None  # one still in service, but excluded
    fail(api, second, 1, 0.0)
    assert {api.pick(1.0) for _ in range(10)} == {first, second}  # panic: all ejected
    assert api.pick(1.0, exclude={first}) == second  # exclude still holds in panic


def test_a_cluster_whose_endpoints_are_all_ejected_fails_over() -> None:
    """Envoy (and so Consul) counts outlier-ejected hosts as unhealthy for failover:
    a subset whose every instance is ejected sends to the next one in service."""
    outlier = Outlier(consecutive_5xx=1, base_ejection_time=30.0, max_ejection_percent=100)
    runtime = compile_upstream(
        {
            "v1": cluster("v1", 2, outlier=outlier, failover=("v2", "v3")),
            "v2": cluster("v2", 1, outlier=outlier),
            "v3": cluster("v3", 1),
        }
    )
    v1, v2, v3 = (runtime.clusters[name] for name in ("v1", "v2", "v3"))
    assert [c.cluster.name for c in v1.failover_chain] == ["v1", "v2", "v3"]
    first, second = endpoints(2, "v1")
    fail(v1, first, 1, 0.0)
    assert runtime.resolve(v1, 1.0) is v1  # one instance still in service
    fail(v1, second, 1, 0.0)
    assert runtime.resolve(v1, 1.0) is v2
    fail(v2, endpoints(1, "v2")[0], 1, 0.0)
    assert runtime.resolve(v1, 1.0) is v3
    assert runtime.resolve(v1, 31.0) is v1  # the ejections ended: back to the primary
    # No failover configured: panic mode within the cluster, as before.
    assert runtime.resolve(v2, 1.0) is v2


def test_when_the_whole_chain_is_ejected_the_primary_is_used_in_panic() -> None:
    outlier = Outlier(consecutive_5xx=1, max_ejection_percent=100)
    runtime = compile_upstream(
        {
            "v1": cluster("v1", 1, outlier=outlier, failover=("v2",)),
            "v2": cluster("v2", 1, outlier=outlier),
        }
    )
    v1, v2 = runtime.clusters["v1"], runtime.clusters["v2"]
    fail(v1, endpoints(1, "v1")[0], 1, 0.0)
    fail(v2, endpoints(1, "v2")[0], 1, 0.0)
    assert runtime.resolve(v1, 1.0) is v1
    assert v1.pick(1.0) == endpoints(1, "v1")[0]


def test_compiled_drives_every_cluster_timer_and_collects_events() -> None:
    outlier = Outlier(consecutive_5xx=1, base_ejection_time=5.0)
    compiled = compile_snapshot(
        upstream_snapshot(
            {"a": cluster("a", 2, outlier=outlier), "b": cluster("b", 2, outlier=outlier)}
        ),
        None,
        random.Random(0),
    )
    upstream = upstream_of(compiled)
    fail(upstream.clusters["a"], endpoints(2, "a")[0], 1, 10.0)
    fail(upstream.clusters["b"], endpoints(2, "b")[0], 1, 12.0)
    assert compiled.timer() == 15.0
    assert [c.cluster.name for _, c, _ in compiled.take_events()] == ["a", "b"]
    compiled.handle_timer(15.0)
    assert compiled.timer() == 17.0
    assert [type(e) for _, _, e in compiled.take_events()] == [EndpointReturned]


# ---------------------------------------------------------------- carried over by name


def test_breaker_state_is_kept_across_snapshots_and_replaced_when_limits_change() -> None:
    limited = cluster("api", 2, limits=Limits(max_requests=1))
    first = compile_snapshot(upstream_snapshot({"api": limited}), None, random.Random(0))
    api = upstream_of(first).clusters["api"]
    assert api.breaker.allow_request() is None
    api.breaker.request_started()
    second = compile_snapshot(
        upstream_snapshot({"api": limited, "extra": cluster("extra")}, version=2),
        first,
        random.Random(0),
    )
    kept = upstream_of(second).clusters["api"]
    assert kept.breaker.allow_request() == "max_requests"  # still hit
    assert kept.budget is api.budget
    raised = cluster("api", 2, limits=Limits(max_requests=5))
    third = compile_snapshot(
        upstream_snapshot({"api": raised}, version=3), second, random.Random(0)
    )
    fresh = upstream_of(third).clusters["api"]
    assert fresh.breaker is not api.breaker
    assert fresh.breaker.allow_request() is None
    api.breaker.request_finished()  # the old request releases on the object it used


def test_ejections_survive_a_snapshot_and_removed_endpoints_are_forgotten() -> None:
    outlier = Outlier(consecutive_5xx=1, max_ejection_percent=100)
    three = endpoints(3, "api")
    first = compile_snapshot(
        upstream_snapshot({"api": cluster("api", 3, outlier=outlier)}), None, random.Random(0)
    )
    api = upstream_of(first).clusters["api"]
    fail(api, three[0], 1, 0.0)
    fail(api, three[1], 1, 0.0)
    # three[1] leaves, a new endpoint arrives; three[0] stays ejected.
    newcomer = Endpoint("10.0.0.9", 20000, "api")
    moved = Cluster("api", "api", spiffe("api"), (three[0], three[2], newcomer), outlier=outlier)
    second = compile_snapshot(upstream_snapshot({"api": moved}, version=2), first, random.Random(0))
    kept = upstream_of(second).clusters["api"]
    assert kept.outlier is api.outlier
    assert kept.outlier is not None
    assert kept.outlier.ejected(1.0) == {three[0]}
    assert three[1] not in kept.outlier.endpoints
    assert {kept.pick(1.0) for _ in range(40)} == {three[2], newcomer}
    # Back with the old endpoint: it starts clean.
    third = compile_snapshot(
        upstream_snapshot({"api": cluster("api", 3, outlier=outlier)}, version=3),
        second,
        random.Random(0),
    )
    again = upstream_of(third).clusters["api"]
    assert three[1] in {again.pick(1.0) for _ in range(40)}


def test_least_request_counts_are_shared_with_the_next_snapshot() -> None:
    lb = LoadBalancing("least_request")
    first = compile_snapshot(
        upstream_snapshot({"api": cluster("api", 2, load_balancing=lb)}), None, random.Random(0)
    )
    old = upstream_of(first).clusters["api"]
    busy, idle = endpoints(2, "api")
    old.request_started(busy)
    second = compile_snapshot(
        upstream_snapshot({"api": cluster("api", 2, load_balancing=lb)}, version=2),
        first,
        random.Random(0),
    )
    new = upstream_of(second).clusters["api"]
    assert new.active is old.active
    picks = Counter(new.pick(0.0) for _ in range(400))
    assert picks[idle] > 2 * picks[busy]
    old.request_finished(busy)
    assert new.active == {}


def test_retry_budget_comes_from_the_routes_retry_policy() -> None:
    clusters = {"api": cluster("api"), "other": cluster("other")}
    retrying = RetryPolicy(num_retries=2, budget_percent=50.0, min_retry_concurrency=1)
    routes = (
        Route("r0", (SplitTarget(10_000, "api"),), HttpMatch(path_prefix="/a"), retry=retrying),
        Route("r1", (SplitTarget(10_000, "other"),)),
    )
    runtime = compile_upstream(clusters, routes)
    assert runtime.clusters["api"].budget_settings == (50.0, 1)
    assert runtime.clusters["other"].budget_settings == (20.0, 3)


# -------------------------------------------------------------------------- properties


@PROPERTY
@given(
    count=st.integers(1, 8),
    failing=st.sets(st.integers(0, 7)),
    excluded=st.sets(st.integers(0, 7)),
    policy=st.sampled_from(["round_robin", "least_request", "random", "ring_hash"]),
    seed=st.integers(0, 2**32),
)
def test_pick_avoids_excluded_and_ejected_unless_all_are_ejected(
    count: int, failing: set[int], excluded: set[int], policy: str, seed: int
) -> None:
    outlier = Outlier(consecutive_5xx=1, max_ejection_percent=100)
    lb = LoadBalancing(policy)  # type: ignore[arg-type]
    runtime = compile_upstream(
        {"api": cluster("api", count, outlier=outlier, load_balancing=lb)}, seed=seed
    )
    api = runtime.clusters["api"]
    all_endpoints = endpoints(count, "api")
    ejected = {all_endpoints[i] for i in failing if i < count}
    exclude = {all_endpoints[i] for i in excluded if i < count}
    for endpoint in ejected:
        fail(api, endpoint, 1, 0.0)
    panic = len(ejected) == count
    avoid = exclude if panic else exclude | ejected
    for _ in range(10):
        picked = api.pick(1.0, exclude, hash_key=random.Random(seed).getrandbits(64))
        if set(all_endpoints) <= avoid:
            assert picked is None
        else:
            assert picked is not None
            assert picked not in avoid


# ------------------------------------------------------------------------ bad values


@pytest.mark.parametrize(
    ("snapshot", "path"),
    [
        (
            inbound_snapshot(local(rate_limit=RateLimit(0.0, 5))),
            "inbound.services.api.rate_limit.requests_per_second",
        ),
        (
            inbound_snapshot(local(rate_limit_per_source=RateLimit(1.0, 0.5))),
            "inbound.services.api.rate_limit_per_source.burst",
        ),
        (
            upstream_snapshot({"api": cluster("api", outlier=Outlier(max_ejection_percent=101))}),
            "upstreams[0].clusters.api.outlier.max_ejection_percent",
        ),
        (
            upstream_snapshot(
                {"api": cluster("api")},
                (Route("r", (SplitTarget(10_000, "api"),), retry=RetryPolicy(budget_percent=-1)),),
            ),
            "upstreams[0].routes[0].retry.budget_percent",
        ),
    ],
)
def test_values_the_cores_refuse_are_a_snapshot_error_naming_the_path(
    snapshot: Snapshot, path: str
) -> None:
    with pytest.raises(SnapshotError, match=re.escape(path)):
        compile_snapshot(snapshot, None, random.Random(0))


def test_a_refused_snapshot_leaves_the_previous_state_alone() -> None:
    outlier = Outlier(consecutive_5xx=1, max_ejection_percent=100)
    first = compile_snapshot(
        upstream_snapshot({"api": cluster("api", 3, outlier=outlier)}), None, random.Random(0)
    )
    api = upstream_of(first).clusters["api"]
    ejected = endpoints(3, "api")[0]
    fail(api, ejected, 1, 0.0)
    bad = upstream_snapshot(
        {"api": cluster("api", 1, outlier=outlier, limits=Limits(max_requests=-1))}, version=2
    )
    with pytest.raises(SnapshotError):
        compile_snapshot(bad, first, random.Random(0))
    assert api.outlier is not None
    assert api.outlier.endpoints == set(endpoints(3, "api"))
    assert api.outlier.ejected(1.0) == {ejected}


def test_compiling_changes_nothing_the_serving_snapshot_uses() -> None:
    """The worker compiles, then builds TLS contexts and binds ports; a failure there
    refuses the snapshot, and the previous one must serve on as it was."""
    outlier = Outlier(consecutive_5xx=1, max_ejection_percent=100)
    first = compile_snapshot(
        upstream_snapshot({"api": cluster("api", 3, outlier=outlier)}), None, random.Random(0)
    )
    api = upstream_of(first).clusters["api"]
    three = endpoints(3, "api")
    fail(api, three[2], 1, 0.0)
    smaller = upstream_snapshot({"api": cluster("api", 1, outlier=outlier)}, version=2)
    second = compile_snapshot(smaller, first, random.Random(0))  # then refused
    assert api.outlier is not None
    assert api.outlier.endpoints == set(three)
    assert api.outlier.ejected(1.0) == {three[2]}
    # Once the new runtime is used, the shared detector follows it.
    assert upstream_of(second).clusters["api"].pick(1.0) == three[0]
    assert api.outlier.endpoints == {three[0]}


def reference_verdict(service: LocalService, source: str) -> Verdict:
    """Consul's rule, written the slow way: the first rule naming the source or ``*``."""
    for rule in service.intentions:
        if rule.source == "*" or (source and rule.source == source):
            return Verdict(rule.action != "deny", rule.name)
    return Verdict(
        service.default_allow, "default allow" if service.default_allow else "default deny"
    )


SOURCES = ("web", "db", "ops", "*")


@PROPERTY
@given(
    rules=st.lists(
        st.tuples(st.sampled_from(SOURCES), st.sampled_from(["allow", "deny", ""])), max_size=6
    ),
    default_allow=st.booleans(),
    peer=st.sampled_from([*SOURCES[:3], "other", None]),
)
def test_precomputed_intentions_agree_with_a_linear_scan(
    rules: list[tuple[str, str]], default_allow: bool, peer: str | None
) -> None:
    intentions = tuple(
        IntentionRule(source, action, f"rule{i}")  # type: ignore[arg-type]
        for i, (source, action) in enumerate(rules)
    )
    service = local(intentions=intentions, default_allow=default_allow)
    runtime = inbound_runtime(service)
    peer_id = spiffe(peer) if peer is not None else None
    expected = reference_verdict(service, peer or "")
    assert runtime.authorize_connection(peer_id, "api") == expected
