"""The replicated policy store: LWW merge, HLC, signatures, codec, tombstone GC, gossip.

Signatures are real ECDSA P-256 (``cryptography``): a test leader key signs, and the
verifier trusts only the keys in its bundle, as an agent trusts the trust bundle.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.policy import (
    BROADCAST_MAX_BYTES,
    DEFAULT_TOMBSTONE_TTL,
    KIND_INTENTION,
    HlcTimestamp,
    HybridClock,
    PolicyDecodeError,
    PolicyDelegate,
    PolicyEntry,
    PolicyStore,
    PolicyValue,
    ServiceDefaults,
    StaleTermError,
    Version,
    decode_entry,
    decode_state,
    encode_entry,
    encode_state,
    intention_key,
    parse_config_entry,
    parse_intention,
    sign_entry,
    signing_payload,
)

# ------------------------------------------------------------------------- test keys


class SigningKeys:
    """A signer/verifier pair over ECDSA P-256 with SHA-256, plus an attacker key."""

    def __init__(self) -> None:
        self.leader = ec.generate_private_key(ec.SECP256R1())
        self.attacker = ec.generate_private_key(ec.SECP256R1())
        self.trusted = {"leader-1": self.leader.public_key()}

    def signer(self, payload: bytes) -> tuple[bytes, str]:
        return self.leader.sign(payload, ec.ECDSA(hashes.SHA256())), "leader-1"

    def forger(self, payload: bytes) -> tuple[bytes, str]:
        # Claims the leader's key ID, signs with its own key.
        return self.attacker.sign(payload, ec.ECDSA(hashes.SHA256())), "leader-1"

    def verify(self, payload: bytes, signature: bytes, key_id: str) -> bool:
        key = self.trusted.get(key_id)
        if key is None:
            return False
        try:
            key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


KEYS = SigningKeys()


def store(**options: Any) -> PolicyStore:
    return PolicyStore(KEYS.verify, **options)


def version(term: int, wall: int, logical: int = 0) -> Version:
    return Version(term, HlcTimestamp(wall, logical))


def allow(source: str = "web", destination: str = "db", action: str = "allow") -> PolicyValue:
    return parse_intention({"SourceName": source, "DestinationName": destination, "Action": action})


def signed(value: PolicyValue, term: int = 1, wall: int = 1, logical: int = 0) -> PolicyEntry:
    return sign_entry(PolicyEntry.for_value(value, version(term, wall, logical)), KEYS.signer)


def tombstone(kind: str, name: str, term: int = 1, wall: int = 1, logical: int = 0) -> PolicyEntry:
    entry = PolicyEntry.tombstone(kind, name, version(term, wall, logical))
    return sign_entry(entry, KEYS.signer)


# ------------------------------------------------------------------------- apply basics


def test_newer_signed_entry_replaces_older() -> None:
    policy = store()
    assert policy.apply(signed(allow(), wall=1), now=0.0)
    assert policy.apply(signed(allow(action="deny"), wall=2), now=0.0)
    intention = policy.intention("web", "db")
    assert intention is not None and intention.action == "deny"
    assert policy.stats["applied"] == 2


def test_stale_entry_is_rejected_and_counted() -> None:
    policy = store()
    policy.apply(signed(allow(action="deny"), term=2, wall=1), now=0.0)
    # Older term loses even with a later wall clock: the term orders leaders.
    assert not policy.apply(signed(allow(), term=1, wall=999), now=0.0)
    assert not policy.apply(signed(allow(), term=2, wall=0, logical=5), now=0.0)
    assert policy.stats["stale"] == 2
    intention = policy.intention("web", "db")
    assert intention is not None and intention.action == "deny"


def test_redelivered_entry_is_a_duplicate_not_an_error() -> None:
    policy = store()
    entry = signed(allow())
    assert policy.apply(entry, now=0.0)
    assert not policy.apply(entry, now=1.0)
    # Re-signed copy of the same payload (ECDSA signatures differ each time) too.
    assert not policy.apply(sign_entry(entry, KEYS.signer), now=1.0)
    assert policy.stats["duplicate"] == 2 and policy.stats["bad_signature"] == 0


def test_forged_entry_is_rejected_and_counted() -> None:
    policy = store()
    forged = sign_entry(PolicyEntry.for_value(allow(), version(1, 1)), KEYS.forger)
    assert not policy.apply(forged, now=0.0)
    unknown_key = replace(signed(allow()), key_id="someone-else")
    assert not policy.apply(unknown_key, now=0.0)
    unsigned = PolicyEntry.for_value(allow(), version(1, 1))
    assert not policy.apply(unsigned, now=0.0)
    garbage = replace(signed(allow()), signature=b"\x30\x00not der")
    assert not policy.apply(garbage, now=0.0)
    assert policy.stats["bad_signature"] == 4
    assert policy.entries() == [] and policy.stats["applied"] == 0


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(
            lambda e: replace(e, value=allow(action="deny"), body={**e.body, "Action": "deny"}),
            id="value",
        ),
        pytest.param(lambda e: replace(e, version=version(9, 1)), id="version-term"),
        pytest.param(lambda e: replace(e, version=version(1, 1, 1)), id="version-logical"),
        pytest.param(lambda e: replace(e, value=None, body=None, deleted=True), id="deleted"),
        pytest.param(lambda e: replace(e, name="web=>cache"), id="key"),
    ],
)
def test_tampered_entry_is_rejected_and_counted(tamper: Any) -> None:
    policy = store()
    assert not policy.apply(tamper(signed(allow())), now=0.0)
    assert policy.stats["bad_signature"] == 1
    assert policy.entries() == []


def test_forged_entry_over_gossip_is_rejected_and_counted() -> None:
    genuine = signed(allow(action="deny"))
    policy = store()
    delegate = PolicyDelegate(policy)
    # An attacker edits the broadcast: deny → allow, keeping the leader's signature.
    message = encode_entry(genuine)
    wire = msgpack.unpackb(message[1:], raw=False)
    wire[1][2]["Action"] = "allow"
    tampered = b"P" + msgpack.packb(wire, use_bin_type=True)
    assert not delegate.notify_message(tampered, now=0.0)
    assert policy.stats["bad_signature"] == 1
    assert delegate.notify_message(message, now=0.0)
    # Garbage is a decode error, also counted.
    assert not delegate.notify_message(b"P\xc1", now=0.0)
    assert not delegate.notify_message(b"", now=0.0)
    assert delegate.decode_errors == {"malformed": 1, "wrong_type": 1}


def test_stale_replay_is_refused_before_verifying() -> None:
    calls: list[bytes] = []

    def counting_verify(payload: bytes, signature: bytes, key_id: str) -> bool:
        calls.append(payload)
        return KEYS.verify(payload, signature, key_id)

    policy = PolicyStore(counting_verify)
    policy.apply(signed(allow(), wall=5), now=0.0)
    policy.apply(signed(allow(), wall=4), now=0.0)
    assert len(calls) == 1 and policy.stats["stale"] == 1


def test_equal_versions_with_different_content_converge() -> None:
    # Only a buggy leader signs two values with one version; every replica must still
    # pick the same one (the larger signed payload).
    first, second = signed(allow(), wall=1), signed(allow(action="deny"), wall=1)
    a, b = store(), store()
    a.apply(first, now=0.0)
    a.apply(second, now=0.0)
    b.apply(second, now=0.0)
    b.apply(first, now=0.0)
    assert a.digest() == b.digest() and a.entries() == b.entries()
    assert a.stats["conflicts"] == b.stats["conflicts"] == 1


# ------------------------------------------------------------------------- tombstones and gc


def test_delete_is_a_tombstone_that_blocks_older_writes() -> None:
    policy = store()
    key = intention_key("web", "db")
    policy.apply(signed(allow(), wall=1), now=0.0)
    assert policy.apply(tombstone(KIND_INTENTION, key, wall=2), now=10.0)
    assert policy.intention("web", "db") is None
    entry = policy.entry(KIND_INTENTION, key)
    assert entry is not None and entry.deleted
    assert not policy.apply(signed(allow(), wall=1), now=11.0)
    assert policy.stats["stale"] == 1


def test_gc_drops_tombstones_only_after_the_ttl() -> None:
    policy = store(tombstone_ttl=100.0)
    key = intention_key("web", "db")
    policy.apply(signed(allow("a", "b"), wall=1), now=0.0)
    policy.apply(signed(allow(), wall=1), now=0.0)
    policy.apply(tombstone(KIND_INTENTION, key, wall=2), now=10.0)
    assert policy.get_timer() == 110.0
    assert policy.gc(now=109.9) == 0
    assert policy.entry(KIND_INTENTION, key) is not None
    digest_before = policy.digest()
    assert policy.gc(now=110.0) == 1
    assert policy.entry(KIND_INTENTION, key) is None
    assert policy.digest() != digest_before
    assert policy.stats["collected"] == 1
    # Live entries are never collected.
    policy.handle_timer(10**9)
    assert policy.intention("a", "b") is not None
    assert policy.get_timer() is None


def test_default_tombstone_ttl_outlives_reconnect_timeout() -> None:
    from meshnode.config import DEFAULT_RECONNECT_TIMEOUT

    assert DEFAULT_TOMBSTONE_TTL > DEFAULT_RECONNECT_TIMEOUT


def test_rewrite_after_delete_revives_the_key() -> None:
    policy = store()
    key = intention_key("web", "db")
    policy.apply(signed(allow(), wall=1), now=0.0)
    policy.apply(tombstone(KIND_INTENTION, key, wall=2), now=0.0)
    policy.apply(signed(allow(action="deny"), wall=3), now=0.0)
    assert policy.get_timer() is None
    intention = policy.intention("web", "db")
    assert intention is not None and intention.action == "deny"


# ------------------------------------------------------------------------- LWW properties

VALUES: list[PolicyValue] = [
    allow(),
    allow(action="deny"),
    allow("*", "db", "deny"),
    parse_config_entry("service-defaults", "web", {"Protocol": "http"}),
    parse_config_entry("service-defaults", "web", {"Protocol": "tcp"}),
    parse_config_entry("service-resolver", "web", {"Subsets": {"v1": {}}, "DefaultSubset": "v1"}),
]
KEYS_IN_USE = sorted({(v.kind, v.name) for v in VALUES})


@st.composite
def entries(draw: st.DrawFn) -> PolicyEntry:
    term = draw(st.integers(1, 3))
    wall = draw(st.integers(0, 4))
    logical = draw(st.integers(0, 2))
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter are tombstones
        kind, name = draw(st.sampled_from(KEYS_IN_USE))
        return tombstone(kind, name, term, wall, logical)
    return signed(draw(st.sampled_from(VALUES)), term, wall, logical)


def state_of(policy: PolicyStore) -> tuple[bytes, list[PolicyEntry]]:
    return policy.digest(), [replace(e, signature=b"") for e in policy.entries()]


def apply_all(items: list[PolicyEntry], now: float = 0.0) -> PolicyStore:
    policy = store()
    for item in items:
        policy.apply(item, now)
    return policy


@settings(max_examples=60, deadline=None)
@given(st.lists(entries(), min_size=1, max_size=10), st.randoms(use_true_random=False))
def test_merge_converges_in_any_delivery_order(items: list[PolicyEntry], rng: Any) -> None:
    reference = state_of(apply_all(items))
    shuffled = list(items)
    rng.shuffle(shuffled)
    assert state_of(apply_all(shuffled)) == reference
    # Idempotent: delivering everything again (in yet another order) changes nothing.
    again = apply_all(shuffled)
    rng.shuffle(shuffled)
    for item in shuffled:
        assert not again.apply(item, now=1.0)
    assert state_of(again) == reference


@settings(max_examples=40, deadline=None)
@given(st.lists(entries(), max_size=8), st.lists(entries(), max_size=8))
def test_merge_is_commutative_between_two_replicas(
    left: list[PolicyEntry], right: list[PolicyEntry]
) -> None:
    a, b = apply_all(left), apply_all(right)
    ab = apply_all(left)
    for item in b.entries():
        ab.apply(item, now=0.0)
    ba = apply_all(right)
    for item in a.entries():
        ba.apply(item, now=0.0)
    assert state_of(ab) == state_of(ba) == state_of(apply_all(left + right))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(entries(), max_size=5), min_size=2, max_size=4))
def test_push_pull_makes_every_replica_equal(per_replica: list[list[PolicyEntry]]) -> None:
    replicas = [apply_all(items) for items in per_replica]
    delegates = [PolicyDelegate(r) for r in replicas]
    # One round of push-pull along a chain and back spreads everything.
    for a, b in itertools.chain(
        itertools.pairwise(delegates), itertools.pairwise(reversed(delegates))
    ):
        if a.state_digest() != b.state_digest():
            b.merge_remote_state(a.local_state(join=False), join=False, now=0.0)
            a.merge_remote_state(b.local_state(join=False), join=False, now=0.0)
    states = {state_of(r)[0] for r in replicas}
    assert len(states) == 1
    everything = [e for items in per_replica for e in items]
    assert state_of(replicas[0]) == state_of(apply_all(everything))
    assert sum(r.stats["bad_signature"] for r in replicas) == 0


# ------------------------------------------------------------------------- hybrid logical clock


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("now"), st.integers(0, 10_000)),
            st.tuples(st.just("update"), st.tuples(st.integers(0, 10_000), st.integers(0, 50))),
        ),
        max_size=60,
    )
)
def test_hlc_is_monotonic_and_dominates_what_it_saw(operations: list[tuple[str, Any]]) -> None:
    clock = HybridClock()
    previous = HlcTimestamp(-1, 0)
    seen = HlcTimestamp(0, 0)
    for operation, argument in operations:
        if operation == "now":
            stamp = clock.now(argument)
            assert stamp > previous and stamp > seen
            assert stamp.wall_ms >= argument
            previous = stamp
        else:
            received = HlcTimestamp(*argument)
            clock.update(received)
            seen = max(seen, received)


def test_hlc_follows_the_wall_clock_when_it_moves_ahead() -> None:
    clock = HybridClock()
    assert clock.now(100) == HlcTimestamp(100, 0)
    assert clock.now(100) == HlcTimestamp(100, 1)
    assert clock.now(90) == HlcTimestamp(100, 2)  # wall clock stepped back
    clock.update(HlcTimestamp(500, 7))
    assert clock.now(200) == HlcTimestamp(500, 8)
    assert clock.now(600) == HlcTimestamp(600, 0)


def test_new_leader_versions_beat_everything_it_has_seen() -> None:
    policy = store()
    policy.apply(signed(allow(), term=4, wall=10_000, logical=3), now=0.0)
    write = policy.prepare_write(allow(action="deny"), term=4, physical_ms=5)
    assert write.version > version(4, 10_000, 3)
    assert policy.apply(sign_entry(write, KEYS.signer), now=0.0)
    with pytest.raises(StaleTermError, match="not the leader"):
        policy.prepare_delete(KIND_INTENTION, intention_key("web", "db"), term=3, physical_ms=1)
    delete = policy.prepare_delete(KIND_INTENTION, intention_key("web", "db"), 5, 1)
    assert policy.apply(sign_entry(delete, KEYS.signer), now=0.0)
    assert policy.intention("web", "db") is None


# ------------------------------------------------------------------------- codec


@settings(max_examples=60, deadline=None)
@given(entries())
def test_entry_codec_round_trips(entry: PolicyEntry) -> None:
    decoded = decode_entry(encode_entry(entry))
    assert decoded == entry
    assert signing_payload(decoded) == signing_payload(entry)
    assert KEYS.verify(signing_payload(decoded), decoded.signature, decoded.key_id)


@settings(max_examples=30, deadline=None)
@given(st.lists(entries(), max_size=8))
def test_state_codec_round_trips(items: list[PolicyEntry]) -> None:
    assert decode_state(encode_state(items)) == (items, 0)


@given(st.binary(max_size=512))
def test_arbitrary_bytes_only_raise_policy_decode_error(data: bytes) -> None:
    for candidate in (data, b"P" + data):
        for decode in (decode_entry, decode_state):
            with contextlib.suppress(PolicyDecodeError):
                decode(candidate)


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@given(JSONISH, st.sampled_from([1, 2]))
def test_arbitrary_structures_only_raise_policy_decode_error(value: Any, message_type: int) -> None:
    for message in ([message_type, value], [message_type, [value]], value):
        data = b"P" + msgpack.packb(message, use_bin_type=True)
        for decode in (decode_entry, decode_state):
            with contextlib.suppress(PolicyDecodeError):
                decode(data)


@given(entries(), st.integers(0, 8), JSONISH)
def test_entries_with_a_field_replaced_only_raise_policy_decode_error(
    entry: PolicyEntry, position: int, value: Any
) -> None:
    wire = msgpack.unpackb(encode_entry(entry)[1:], raw=False)
    wire[1][position] = value
    with contextlib.suppress(PolicyDecodeError):
        decode_entry(b"P" + msgpack.packb(wire, use_bin_type=True))


@pytest.mark.parametrize(
    ("wire_change", "reason"),
    [
        (lambda w: w.__setitem__(0, "acl-policy"), "malformed"),
        (lambda w: w.__setitem__(2, {"SourceName": "web"}), "invalid"),
        (lambda w: w.__setitem__(3, -1), "malformed"),
        (lambda w: w.__setitem__(6, True), "malformed"),
        (lambda w: w.__setitem__(7, "text"), "malformed"),
        (lambda w: w.__setitem__(1, "api=>db"), "invalid"),
    ],
)
def test_decode_errors_have_bounded_reasons(wire_change: Any, reason: str) -> None:
    wire = msgpack.unpackb(encode_entry(signed(allow()))[1:], raw=False)
    wire_change(wire[1])
    with pytest.raises(PolicyDecodeError) as caught:
        decode_entry(b"P" + msgpack.packb(wire, use_bin_type=True))
    assert caught.value.reason == reason


def test_oversized_input_is_refused_before_parsing() -> None:
    with pytest.raises(PolicyDecodeError) as caught:
        decode_entry(b"P" + b"\x00" * (300 * 1024))
    assert caught.value.reason == "too_large"


def test_one_bad_entry_does_not_spoil_a_state() -> None:
    good = signed(allow())
    state = msgpack.unpackb(encode_state([good])[1:], raw=False)
    state[1].append(["intention", "x", None, 1, 1, 1, False, b"", ""])
    entries_, bad = decode_state(b"P" + msgpack.packb(state, use_bin_type=True))
    assert entries_ == [good] and bad == 1


# ------------------------------------------------------------------------- gossip and disk


def test_leader_write_spreads_by_broadcast_and_is_enforced() -> None:
    leader, follower = store(), store()
    entry = sign_entry(leader.prepare_write(allow(), term=1, physical_ms=1000), KEYS.signer)
    assert leader.apply(entry, now=0.0)
    messages = PolicyDelegate(leader).broadcasts(overhead=2, limit=1400)
    assert len(messages) == 1 and messages[0][:1] == b"P"
    delegate = PolicyDelegate(follower)
    assert delegate.notify_message(messages[0], now=0.0)
    assert follower.intention_index("deny").decide("web", "db").allowed
    assert not follower.intention_index("deny").decide("api", "db").allowed
    # The follower re-gossips what was news to it (the queue keeps one per key).
    assert delegate.broadcasts(overhead=2, limit=1400) == messages


def test_oversized_entries_are_left_to_push_pull() -> None:
    routes = [
        {"Match": {"HTTP": {"PathPrefix": f"/route-number-{n}"}}, "Destination": {"NumRetries": 1}}
        for n in range(40)
    ]
    router = parse_config_entry("service-router", "web", {"Routes": routes})
    leader = store()
    leader.apply(signed(router), now=0.0)
    assert len(encode_entry(signed(router))) > BROADCAST_MAX_BYTES
    assert leader.stats["oversized_broadcasts"] == 1
    assert PolicyDelegate(leader).broadcasts(overhead=2, limit=1400) == []
    follower = PolicyDelegate(store())
    assert follower.merge_remote_state(PolicyDelegate(leader).local_state(False), False, 0.0) == 1
    assert follower.repaired_by_push_pull == 1
    assert follower.state_digest() == leader.digest()


def test_persisted_state_is_enforced_after_restart() -> None:
    before = store()
    before.apply(signed(allow(), wall=1), now=0.0)
    before.apply(signed(allow("*", "*", "deny"), wall=2), now=0.0)
    before.apply(tombstone(KIND_INTENTION, intention_key("a", "b"), wall=3), now=0.0)
    saved = encode_state(before.entries())

    after = store()
    loaded, bad = decode_state(saved)
    assert bad == 0
    for entry in loaded:
        assert after.apply(entry, now=0.0, broadcast=False)
    assert after.digest() == before.digest()
    assert len(after.queue) == 0
    index = after.intention_index("allow")
    assert index.decide("web", "db").allowed
    assert not index.decide("api", "db").allowed


def test_blocking_indexes_move_with_visible_changes() -> None:
    policy = store()
    changes: list[int] = []
    unsubscribe = policy.on_change(changes.append)
    assert policy.index == 1
    defaults = parse_config_entry("service-defaults", "web", {"Protocol": "http"})
    assert isinstance(defaults, ServiceDefaults)
    policy.apply(signed(defaults, wall=1), now=0.0)
    assert policy.indexes("service-defaults", "web") == (2, 2)
    policy.apply(signed(replace(defaults, max_inbound_connections=5), wall=2), now=0.0)
    assert policy.indexes("service-defaults", "web") == (2, 3)
    assert policy.kind_index("service-defaults") == 3
    assert policy.kind_index(KIND_INTENTION) == 1
    # A tombstone for something never seen changes nothing visible.
    policy.apply(tombstone(KIND_INTENTION, "x=>y", wall=1), now=0.0)
    assert policy.index == 3
    policy.apply(tombstone("service-defaults", "web", wall=3), now=0.0)
    assert policy.index == 4 and policy.get("service-defaults", "web") is None
    assert changes == [2, 3, 4]
    unsubscribe()
    policy.apply(signed(defaults, wall=4), now=0.0)
    assert changes == [2, 3, 4]
    assert policy.indexes("service-defaults", "web") == (5, 5)


def test_reads_by_kind_and_intention_id() -> None:
    policy = store()
    policy.apply(signed(allow()), now=0.0)
    policy.apply(signed(VALUES[3]), now=0.0)
    assert [v.name for v in policy.config_entries("service-defaults")] == ["web"]
    assert set(policy.values()) == {(KIND_INTENTION, "web=>db"), ("service-defaults", "web")}
    intention = policy.intention("web", "db")
    assert intention is not None
    assert policy.intention_by_id(intention.id) == intention
    assert policy.intention_by_id("nope") is None
    index = policy.intention_index("deny")
    assert policy.intention_index("deny") is index  # cached until policy changes
