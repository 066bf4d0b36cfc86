"""``meshnode.catalog``: merge rules, codec, queries, serfHealth, blocking indexes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.events import (
    Member,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    MemberReaped,
    MemberRecovered,
    MemberState,
    MemberSuspected,
)
from meshnode.catalog import (
    BROADCAST_MAX_BYTES,
    SERF_CHECK_ID,
    SERF_DEAD_OUTPUT,
    Catalog,
    CatalogDecodeError,
    CatalogDelegate,
    CheckState,
    NodeRecord,
    NotFoundError,
    aggregate_status,
    decode_state,
    decode_update,
    encode_record,
    encode_state,
)
from meshnode.model import (
    HealthStatus,
    NodeInfo,
    ServiceDefinition,
    ValidationError,
    parse_registration,
)


def info(name: str, **meta: str) -> NodeInfo:
    return NodeInfo(name, f"id-{name}", f"10.0.0.{len(name)}", "dc1", meta)


def register(catalog: Catalog, body: dict[str, object]) -> None:
    service, checks = parse_registration(body)
    catalog.register_service(service, checks)


def member(name: str, state: MemberState = MemberState.ALIVE) -> Member:
    return Member(name, ("10.0.0.1", 7946), b"", 1, state, 0.0)


def gossip(source: Catalog, *targets: Catalog) -> None:
    """Hand everything ``source`` has queued to each target, as broadcasts."""
    messages = source.queue.get(2, 1 << 20)
    for target in targets:
        delegate = CatalogDelegate(target)
        for message in messages:
            delegate.notify_message(message)


# ----------------------------------------------------------------------------- records

names = st.text("abcdefgh-", min_size=1, max_size=12)
tags = st.lists(st.text("abcxyz", min_size=1, max_size=6), max_size=3)
services = st.builds(
    lambda sid, name, t, port: ServiceDefinition(id=sid, name=name, tags=tuple(t), port=port),
    names,
    st.sampled_from(["web", "db", "api"]),
    tags,
    st.integers(0, 65535),
)


@st.composite
def records(draw: st.DrawFn, node: str | None = None) -> NodeRecord:
    name = node or draw(st.sampled_from(["n1", "n2", "n3"]))
    version = draw(st.integers(1, 6))
    chosen = {s.id: s for s in draw(st.lists(services, max_size=3))}
    checks = {}
    for service_id in chosen:
        if draw(st.booleans()):
            _, (check,) = parse_registration(
                {"Name": chosen[service_id].name, "ID": service_id, "Check": {"TTL": "10s"}}
            )
            status = draw(st.sampled_from(["passing", "warning", "critical"]))
            checks[check.check_id] = CheckState(check, HealthStatus(status), "out", version)
    return NodeRecord(
        node=name,
        node_id=f"id-{name}",
        address=draw(st.sampled_from(["10.0.0.1", "10.0.0.2"])),
        datacenter="dc1",
        meta=draw(st.dictionaries(st.sampled_from(["rack", "zone"]), st.text("ab", max_size=3))),
        version=version,
        services=chosen,
        checks=checks,
        service_versions=dict.fromkeys(chosen, version),
        node_maintenance=draw(st.none() | st.just("reason")),
        service_maintenance={i: "r" for i in list(chosen)[:1] if draw(st.booleans())},
    )


def fresh() -> Catalog:
    return Catalog(info("local"))


def view(catalog: Catalog) -> list[NodeRecord]:
    return [r for r in catalog.records() if r.node != "local"]


@settings(max_examples=25, deadline=None)
@given(st.lists(records(), max_size=8), st.randoms(use_true_random=False))
def test_merge_is_order_independent_and_idempotent(batch: list[NodeRecord], rng: object) -> None:
    a, b = fresh(), fresh()
    for record in batch:
        a.merge(record)
    shuffled = list(batch)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    for record in shuffled + shuffled:  # twice: idempotent
        b.merge(record)
    assert view(a) == view(b)
    # The winner per node is the highest version (ties broken the same everywhere).
    for record in view(a):
        assert record.version == max(r.version for r in batch if r.node == record.node)


@settings(max_examples=20, deadline=None)
@given(st.lists(records(), max_size=6), st.lists(records(), max_size=6))
def test_push_pull_converges(left: list[NodeRecord], right: list[NodeRecord]) -> None:
    a, b = Catalog(info("a")), Catalog(info("b"))
    for record in left:
        a.merge(record)
    for record in right:
        b.merge(record)
    da, db = CatalogDelegate(a), CatalogDelegate(b)
    state_a = da.local_state(False)
    da.merge_remote_state(db.local_state(False), False)
    db.merge_remote_state(state_a, False)
    assert a.records() == b.records()
    assert a.state_digest() == b.state_digest()


@settings(max_examples=30, deadline=None)
@given(records())
def test_codec_round_trip(record: NodeRecord) -> None:
    update = decode_update(encode_record(record))
    assert update.base == 0 and update.record == record
    decoded, bad = decode_state(encode_state([record, record]))
    assert decoded == [record, record] and bad == 0
    assert NodeRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300) | st.builds(lambda b: b"C" + b, st.binary(max_size=300)))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    catalog = fresh()
    delegate = CatalogDelegate(catalog)
    with pytest.raises(CatalogDecodeError):
        decode_update(data)
    delegate.notify_message(data)
    delegate.merge_remote_state(data, False)
    assert catalog.stats["decode_errors"] == 2
    assert view(catalog) == []


def test_hostile_records_are_rejected() -> None:
    good = NodeRecord("n1", "id", "10.0.0.1", "dc1", version=2)
    message = bytearray(encode_record(good))
    assert decode_update(bytes(message)).record == good
    import msgpack

    for body in (
        [2, 0, ["n1", 2, "id", "a", "dc", {}, None, {}, [["x"] * 13], []], [], []],  # bad service
        [2, 0, ["n1", -1, "id", "a", "dc", {}, None, {}, [], []], [], []],  # negative version
        [2, 3, ["n1", 2, "id", "a", "dc", {}, None, {}, [], []], [], []],  # base >= version
        [2, 0, ["", 2, "id", "a", "dc", {}, None, {}, [], []], [], []],  # empty name
        [2, 0, ["n1", 2, "id", "a", "dc", {"consul-x": "1"}, None, {}, [], []], [], []],
    ):
        with pytest.raises(CatalogDecodeError):
            decode_update(b"C" + msgpack.packb(body))
    # One bad record in a push-pull state spoils only itself.
    state = b"C" + msgpack.packb([1, [["bad"], ["n1", 2, "id", "a", "dc", {}, None, {}, [], []]]])
    decoded, bad = decode_state(state)
    assert [r.node for r in decoded] == ["n1"] and bad == 1


# ----------------------------------------------------------------------------- local writes


def test_local_writes_bump_version_and_queue_one_broadcast() -> None:
    catalog = fresh()
    assert catalog.local.version == 1 and len(catalog.queue) == 1
    register(catalog, {"Name": "web", "Check": {"TTL": "10s"}})
    assert catalog.local.version == 2
    assert catalog.update_check("service:web", HealthStatus.PASSING, "ok")
    assert not catalog.update_check("service:web", HealthStatus.PASSING, "ok")  # no change
    assert catalog.local.version == 3
    assert len(catalog.queue) == 1  # newer versions replaced older queued ones
    (message,) = catalog.queue.get(2, 1 << 20)
    assert decode_update(message).record == catalog.local


def test_local_write_errors() -> None:
    catalog = fresh()
    with pytest.raises(NotFoundError):
        catalog.deregister_service("nope")
    with pytest.raises(NotFoundError):
        catalog.update_check("nope", HealthStatus.PASSING)
    with pytest.raises(NotFoundError):
        catalog.set_service_maintenance("nope", True)
    with pytest.raises(NotFoundError):
        catalog.deregister_check("nope")
    from meshnode.model import parse_check

    with pytest.raises(ValidationError, match="does not exist"):
        catalog.register_check(parse_check({"Name": "c", "TTL": "1s", "ServiceID": "ghost"}))
    assert catalog.local.version == 1  # nothing changed


def test_reregistration_keeps_check_status_and_replace_existing_checks() -> None:
    catalog = fresh()
    body = {"Name": "web", "Checks": [{"TTL": "10s"}, {"TTL": "20s"}]}
    register(catalog, body)
    catalog.update_check("service:web:1", HealthStatus.PASSING, "fine")
    register(catalog, body)
    assert catalog.local.checks["service:web:1"].status == HealthStatus.PASSING
    service, checks = parse_registration({"Name": "web", "Checks": [{"TTL": "10s"}]})
    catalog.register_service(service, checks, replace_existing_checks=True)
    assert set(catalog.local.checks) == {"service:web"}
    catalog.deregister_service("web")
    assert catalog.local.services == {} and catalog.local.checks == {}


def test_large_records_travel_as_deltas() -> None:
    owner, peer, late = Catalog(info("a")), Catalog(info("b")), Catalog(info("c"))
    for i in range(12):
        register(owner, {"Name": f"svc{i}", "Tags": ["t" * 40], "Meta": {"k": "v" * 60}})
        gossip(owner, peer)
    assert len(encode_record(owner.local)) > BROADCAST_MAX_BYTES
    assert peer.record("a") == owner.local
    assert peer.stats["deltas_applied"] > 0
    owner.deregister_service("svc3")
    gossip(owner, peer, late)
    assert peer.record("a") == owner.local  # removal carried by a tombstone
    assert late.record("a") is None  # cannot apply a delta without the base
    assert late.stats["deltas_skipped"] == 1
    CatalogDelegate(late).merge_remote_state(CatalogDelegate(peer).local_state(False), False)
    assert late.record("a") == owner.local  # push-pull repairs


def test_refutes_a_stale_record_of_itself() -> None:
    catalog = fresh()
    old_life = NodeRecord("local", "id", "10.9.9.9", "dc1", version=7)
    catalog.merge(old_life)
    assert catalog.local.version == 8 and catalog.local.address != "10.9.9.9"
    assert catalog.stats["refuted"] == 1


def test_restore_local() -> None:
    first = fresh()
    register(first, {"Name": "web", "Check": {"TTL": "10s"}})
    saved = json.loads(json.dumps(first.local.to_dict()))
    second = fresh()
    second.restore_local(NodeRecord.from_dict(saved))
    assert second.local.version > first.local.version
    assert second.local.services == first.local.services


# ----------------------------------------------------------------------------- queries


def populated() -> tuple[Catalog, Catalog, Catalog]:
    a, b, observer = Catalog(info("a", rack="r1")), Catalog(info("bb", rack="r2")), fresh()
    register(a, {"Name": "web", "ID": "web-a", "Tags": ["Primary", "v1"], "Check": {"TTL": "5s"}})
    register(b, {"Name": "web", "ID": "web-b", "Tags": ["v2"], "Port": 81})
    register(b, {"Name": "db", "Tags": ["v2"]})
    a.update_check("service:web-a", HealthStatus.WARNING, "slow")
    gossip(a, observer)
    gossip(b, observer)
    return a, b, observer


def test_catalog_queries() -> None:
    _, _, catalog = populated()
    assert catalog.services() == {"db": ["v2"], "web": ["Primary", "v1", "v2"]}
    assert [i.node.name for i in catalog.service_instances("web")] == ["a", "bb"]
    assert [i.service.id for i in catalog.service_instances("web", ["primary"])] == ["web-a"]
    assert [i.node.name for i in catalog.service_instances("web", node_meta={"rack": "r2"})] == [
        "bb"
    ]
    assert [n.name for n in catalog.nodes()] == ["a", "bb", "local"]
    found = catalog.node("bb")
    assert found is not None and [s.id for s in found[1]] == ["db", "web-b"]
    assert catalog.node("zz") is None


def test_health_queries_fold_in_node_checks() -> None:
    a, _, catalog = populated()
    web = {i.node.name: i for i in catalog.health_service("web")}
    assert web["a"].status == HealthStatus.WARNING
    assert web["a"].checks[0].check_id == SERF_CHECK_ID
    assert web["bb"].status == HealthStatus.PASSING
    assert [i.node.name for i in catalog.health_service("web", passing_only=True)] == ["bb"]
    assert [c.check_id for c in catalog.checks_for_service("web")] == ["service:web-a"]
    assert [c.check_id for c in catalog.node_checks("a")] == [SERF_CHECK_ID, "service:web-a"]
    assert {c.node for c in catalog.checks_in_state("warning")} == {"a"}
    assert len(catalog.checks_in_state("any")) == 4
    with pytest.raises(ValidationError):
        catalog.checks_in_state("bogus")
    # Maintenance is a critical check and the aggregate says "maintenance", as in Consul.
    a.set_service_maintenance("web-a", True, "deploying")
    gossip(a, catalog)
    (instance,) = catalog.health_service("web", tags=["v1"])
    assert instance.status == HealthStatus.MAINTENANCE
    a.set_node_maintenance(True)
    gossip(a, catalog)
    assert "_node_maintenance" in [c.check_id for c in catalog.node_checks("a")]
    assert aggregate_status([]) == HealthStatus.PASSING


def test_local_agent_views() -> None:
    catalog = fresh()
    register(catalog, {"Name": "web", "Check": {"TTL": "5s"}})
    catalog.set_service_maintenance("web", True)
    assert list(catalog.local_services()) == ["web"]
    assert set(catalog.local_checks()) == {"service:web", "_service_maintenance:web"}


# ----------------------------------------------------------------------------- serfHealth


def test_serf_health_follows_member_events() -> None:
    _, _, catalog = populated()

    def serf(node: str) -> tuple[HealthStatus, str]:
        check = catalog.node_checks(node)[0]
        return check.status, check.output

    assert serf("a")[0] == HealthStatus.PASSING
    for event, expected in (
        (MemberSuspected(member("a", MemberState.SUSPECT), "bb"), HealthStatus.CRITICAL),
        (MemberRecovered(member("a")), HealthStatus.PASSING),
        (MemberFailed(member("a", MemberState.DEAD)), HealthStatus.CRITICAL),
        (MemberJoined(member("a")), HealthStatus.PASSING),
        (MemberLeft(member("a", MemberState.LEFT)), HealthStatus.CRITICAL),
    ):
        catalog.on_member_event(event, 1.0)
        assert serf("a")[0] == expected
    assert serf("a")[1] == SERF_DEAD_OUTPUT
    assert catalog.health_service("web", passing_only=True) == catalog.health_service(
        "web", passing_only=True, tags=["v2"]
    )
    # Our own serfHealth is always passing.
    catalog.on_member_event(MemberFailed(member("local", MemberState.DEAD)), 1.0)
    assert catalog.node_checks("local")[0].status == HealthStatus.PASSING


def test_reaped_nodes_stay_gone_until_they_rejoin() -> None:
    a, _, catalog = populated()
    catalog.on_member_event(MemberFailed(member("a", MemberState.DEAD)), 1.0)
    catalog.on_member_event(MemberReaped(member("a", MemberState.DEAD)), 2.0)
    assert catalog.record("a") is None
    catalog.merge(a.local)  # a stale push-pull from someone who has not reaped yet
    assert catalog.record("a") is None
    catalog.on_member_event(MemberJoined(member("a")), 3.0)
    catalog.merge(a.local)
    assert catalog.record("a") == a.local


def test_sync_members_and_reap_after_timeout() -> None:
    _, _, catalog = populated()
    catalog.sync_members([member("local"), member("a")], now=10.0)
    assert catalog.node_checks("bb")[0].status == HealthStatus.CRITICAL  # unknown to gossip
    assert catalog.node_checks("a")[0].status == HealthStatus.PASSING
    assert catalog.reap(now=20.0, after=30.0) == []
    assert catalog.reap(now=40.0, after=30.0) == ["bb"]
    assert catalog.record("bb") is None


# ----------------------------------------------------------------------------- indexes


def test_index_is_monotonic_and_per_service() -> None:
    a, b, catalog = populated()
    seen: list[int] = []
    catalog.on_change(seen.append)
    web, db, services = (
        catalog.service_index("web"),
        catalog.service_index("db"),
        catalog.services_index(),
    )
    assert min(web, db, services, catalog.index) >= 1
    a.update_check("service:web-a", HealthStatus.PASSING, "ok")
    gossip(a, catalog)
    assert catalog.service_index("web") > web
    assert catalog.service_index("db") == db  # untouched service does not wake
    assert catalog.services_index() == services  # names and tags unchanged
    register(b, {"Name": "cache"})
    gossip(b, catalog)
    assert catalog.services_index() > services
    # A node going down changes every service on it.
    db_before = catalog.service_index("db")
    catalog.on_member_event(MemberFailed(member("bb", MemberState.DEAD)), 1.0)
    assert catalog.service_index("db") > db_before
    assert seen == sorted(seen) and len(set(seen)) == len(seen) and seen[-1] == catalog.index
    # A stale or repeated record changes nothing and does not bump the index.
    before = catalog.index
    gossip(a, catalog)
    catalog.merge(a.local)
    assert catalog.index == before
    assert catalog.service_index("never-registered") >= 1


def test_instance_indexes_for_output() -> None:
    a, _, catalog = populated()
    (instance,) = catalog.service_instances("web", ["v1"])
    created, modified = instance.service_index
    a.update_check("service:web-a", HealthStatus.CRITICAL, "down")
    gossip(a, catalog)
    (instance,) = catalog.service_instances("web", ["v1"])
    assert instance.service_index == (created, modified)  # the service itself is unchanged
    check = catalog.checks_for_service("web")[0]
    assert check.modify_index == catalog.index > check.create_index >= 1


@settings(max_examples=15, deadline=None)
@given(st.lists(records(), max_size=10))
def test_index_never_goes_backwards(batch: list[NodeRecord]) -> None:
    catalog = fresh()
    last = catalog.index
    for record in batch:
        catalog.merge(record)
        assert catalog.index >= last >= 1
        last = catalog.index


@settings(max_examples=60, deadline=None, derandomize=True)
@given(batches=st.lists(records(), max_size=12), reaped=st.lists(st.sampled_from(["n1", "n2"])))
def test_service_lookups_match_a_full_scan(batches: list[NodeRecord], reaped: list[str]) -> None:
    # The service-name index must agree with scanning every record, whatever order
    # records arrive in, replace each other or are reaped.
    catalog = fresh()
    for record in batches:
        catalog.merge(record)
    for node in reaped:
        catalog._reap(node, 1.0)
    names = {s.name for r in catalog.records() for s in r.services.values()} | {"absent"}
    for name in names:
        expected = [
            (r.node, sid)
            for r in catalog.records()
            for sid in sorted(r.services)
            if r.services[sid].name == name
        ]
        got = [(i.node.name, i.service.id) for i in catalog.service_instances(name)]
        assert got == expected, name
        assert catalog.checks_for_service(name) == [
            check
            for r in catalog.records()
            for sid in sorted(r.services)
            if r.services[sid].name == name
            for check in catalog._service_checks(r, sid)
        ]
