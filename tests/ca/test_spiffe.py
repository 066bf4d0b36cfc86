"""SPIFFE IDs: the SPIFFE-ID.md §2 rules and Consul's service/agent layouts."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ca.spiffe import (
    DEFAULT_NAMESPACE,
    IdentityKind,
    InvalidSpiffeId,
    SpiffeId,
    trust_domain_for,
    validate_trust_domain,
)

TD = "0e2b3c4d-1111-4222-8333-444455556666.meshnode"


def test_service_id_has_consuls_layout() -> None:
    sid = SpiffeId.service(TD, "dc1", "web")
    assert str(sid) == f"spiffe://{TD}/ns/default/dc/dc1/svc/web"
    assert sid.uri == str(sid)
    assert sid.kind is IdentityKind.SERVICE
    assert (sid.namespace, sid.datacenter, sid.service_name, sid.node) == (
        DEFAULT_NAMESPACE,
        "dc1",
        "web",
        None,
    )
    assert SpiffeId.parse(str(sid)) == sid


def test_agent_id_has_consuls_layout() -> None:
    aid = SpiffeId.agent(TD, "dc1", "node-1")
    assert str(aid) == f"spiffe://{TD}/agent/client/dc/dc1/id/node-1"
    assert aid.kind is IdentityKind.AGENT
    assert (aid.node, aid.datacenter, aid.service_name, aid.namespace) == (
        "node-1",
        "dc1",
        None,
        None,
    )
    assert SpiffeId.parse(str(aid)) == aid


def test_trust_domain_id_and_other_shapes() -> None:
    assert SpiffeId.parse(f"spiffe://{TD}").kind is IdentityKind.TRUST_DOMAIN
    assert str(SpiffeId.for_trust_domain(TD)) == f"spiffe://{TD}"
    other = SpiffeId.parse(f"spiffe://{TD}/ns/default/dc/dc1/svc/web/extra")
    assert other.kind is IdentityKind.OTHER
    assert other.service_name is None and other.datacenter is None


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("https://example.org/ns/a", "bad_scheme"),
        ("SPIFFE://example.org/ns/a", "bad_scheme"),
        ("spiffe:example.org/ns/a", "bad_scheme"),
        ("spiffe://", "empty_trust_domain"),
        ("spiffe:///ns/a", "empty_trust_domain"),
        ("spiffe://Example.org/ns/a", "bad_trust_domain"),
        ("spiffe://exa mple.org", "bad_trust_domain"),
        ("spiffe://example.org:8443/ns/a", "userinfo_or_port"),
        ("spiffe://user@example.org/ns/a", "userinfo_or_port"),
        ("spiffe://example.org/", "trailing_slash"),
        ("spiffe://example.org/ns/a/", "trailing_slash"),
        ("spiffe://example.org//a", "empty_segment"),
        ("spiffe://example.org/ns/./a", "dot_segment"),
        ("spiffe://example.org/ns/../a", "dot_segment"),
        ("spiffe://example.org/ns/a%20b", "bad_segment"),
        ("spiffe://example.org/ns/é", "bad_segment"),
        ("spiffe://example.org/ns/a?x=1", "query_or_fragment"),
        ("spiffe://example.org/ns/a#frag", "query_or_fragment"),
        ("spiffe://" + "a" * 256, "trust_domain_too_long"),
        ("spiffe://example.org/" + "/".join(["abcdefghij"] * 200), "too_long"),
    ],
)
def test_parse_refuses_what_the_spec_forbids(uri: str, reason: str) -> None:
    with pytest.raises(InvalidSpiffeId) as caught:
        SpiffeId.parse(uri)
    assert caught.value.reason == reason


def test_trust_domain_limits() -> None:
    longest = "a" * 255
    assert validate_trust_domain(longest) == longest
    assert SpiffeId.parse(f"spiffe://{longest}").trust_domain == longest
    for bad in ("", "a" * 256, "UPPER", "a/b", "a:1", "ü.example"):
        with pytest.raises(InvalidSpiffeId):
            validate_trust_domain(bad)


def test_constructors_validate_segments() -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.service(TD, "dc1", "web api")
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.agent(TD, "dc/1", "node")
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.service("Not.Lower", "dc1", "web")


def test_trust_domain_for_a_cluster() -> None:
    cluster = uuid.UUID("0E2B3C4D-1111-4222-8333-444455556666")
    assert trust_domain_for(cluster) == TD
    assert trust_domain_for(str(cluster).upper()) == TD  # one spelling, lowercase
    assert trust_domain_for(cluster, configured="prod.example") == "prod.example"
    with pytest.raises(InvalidSpiffeId) as caught:
        trust_domain_for("not-a-uuid")
    assert caught.value.reason == "bad_cluster_id"
    with pytest.raises(InvalidSpiffeId):
        trust_domain_for(cluster, configured="Prod.Example")


SEGMENT = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-",
    min_size=1,
    max_size=20,
).filter(lambda s: s not in (".", ".."))
TRUST_DOMAIN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1, max_size=40)


@given(trust_domain=TRUST_DOMAIN, path=st.lists(SEGMENT, max_size=8))
def test_format_then_parse_is_identity(trust_domain: str, path: list[str]) -> None:
    sid = SpiffeId(trust_domain, tuple(path))
    assert SpiffeId.parse(str(sid)) == sid


@given(st.text(max_size=300) | st.builds(lambda s: "spiffe://" + s, st.text(max_size=300)))
def test_parse_accepts_only_canonical_ids(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except InvalidSpiffeId:
        return
    assert str(sid) == text  # no normalisation: one ID, one spelling
