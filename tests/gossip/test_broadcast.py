"""The transmit-limited broadcast queue (memberlist's TransmitLimitedQueue)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.broadcast import BroadcastQueue

OVERHEAD = 2
ROOMY = 1 << 20


def fixed(count: int) -> BroadcastQueue:
    return BroadcastQueue(3, lambda: count)


def drain_all(queue: BroadcastQueue, rounds: int = 1000) -> dict[bytes, int]:
    """Call get() until the queue is empty; how often each message came out."""
    sent: dict[bytes, int] = {}
    for _ in range(rounds):
        if not len(queue):
            break
        for message in queue.get(OVERHEAD, ROOMY):
            sent[message] = sent.get(message, 0) + 1
    assert len(queue) == 0
    return sent


@pytest.mark.parametrize(
    ("members", "mult", "limit"),
    [(1, 3, 3), (9, 3, 3), (10, 3, 6), (99, 4, 8), (100, 4, 12), (1000, 2, 8), (5000, 4, 16)],
)
def test_retransmit_limit_formula(members: int, mult: int, limit: int) -> None:
    queue = BroadcastQueue(mult, lambda: members)
    assert queue.retransmit_limit() == limit == mult * math.ceil(math.log10(members + 1))
    queue.queue(b"news")
    assert drain_all(queue) == {b"news": limit}
    assert queue.transmissions == limit


def test_limit_follows_the_member_count() -> None:
    members = [5]
    queue = BroadcastQueue(2, lambda: members[0])
    assert queue.retransmit_limit() == 2
    members[0] = 50
    assert queue.retransmit_limit() == 4
    queue.queue(b"x")
    assert drain_all(queue) == {b"x": 4}


def test_newer_message_for_the_same_subject_replaces_the_older() -> None:
    queue = fixed(10)
    queue.queue(b"alive-1", subject="m1")
    queue.queue(b"other", subject="m2")
    assert sorted(queue.get(OVERHEAD, ROOMY)) == [b"alive-1", b"other"]
    queue.queue(b"suspect-1", subject="m1")
    assert len(queue) == 2
    sent = drain_all(queue)
    assert b"alive-1" not in sent or sent[b"alive-1"] == 1  # never again once replaced
    assert sent[b"suspect-1"] == queue.retransmit_limit()


def test_messages_without_a_subject_never_replace_each_other() -> None:
    queue = fixed(10)
    queue.queue(b"a")
    queue.queue(b"a")
    assert len(queue) == 2


def test_invalidate_forgets_the_subject() -> None:
    queue = fixed(10)
    queue.queue(b"x", subject="m1")
    queue.queue(b"y", subject="m2")
    queue.invalidate("m1")
    queue.invalidate("nobody")
    assert len(queue) == 1
    assert drain_all(queue) == {b"y": queue.retransmit_limit()}


def test_least_sent_first() -> None:
    queue = fixed(10)  # limit 6
    queue.queue(b"old-1")
    queue.queue(b"old-2")
    room_for_one = OVERHEAD + 5
    first = queue.get(OVERHEAD, room_for_one)
    second = queue.get(OVERHEAD, room_for_one)
    assert sorted(first + second) == [b"old-1", b"old-2"]  # both sent once before repeats
    queue.queue(b"fresh")
    assert queue.get(OVERHEAD, room_for_one) == [b"fresh"]
    # Everyone has one transmit now: the next three packets carry each once more.
    taken = [m for _ in range(3) for m in queue.get(OVERHEAD, room_for_one)]
    assert sorted(taken) == [b"fresh", b"old-1", b"old-2"]


def test_size_limit_is_respected_and_big_messages_wait() -> None:
    queue = fixed(10)
    queue.queue(b"x" * 100)
    queue.queue(b"y" * 10)
    assert queue.get(OVERHEAD, 50) == [b"y" * 10]
    assert queue.get(OVERHEAD, 50) == [b"y" * 10]
    assert queue.get(OVERHEAD, OVERHEAD + 99) == [b"y" * 10]
    assert queue.get(OVERHEAD, OVERHEAD + 100) == [b"x" * 100]
    assert queue.get(OVERHEAD, 0) == []
    assert len(queue) == 2


def test_fills_the_budget_with_several_messages() -> None:
    queue = fixed(10)
    for i in range(10):
        queue.queue(bytes([i]) * 8)
    out = queue.get(OVERHEAD, 3 * (OVERHEAD + 8))
    assert len(out) == 3
    assert sum(len(m) + OVERHEAD for m in out) <= 3 * (OVERHEAD + 8)


def test_queue_is_bounded_and_drops_the_most_sent() -> None:
    queue = BroadcastQueue(3, lambda: 10, max_items=3)
    for message in (b"a", b"b", b"c"):
        queue.queue(message)
    (sent_once,) = queue.get(OVERHEAD, OVERHEAD + 1)  # it has spread furthest
    queue.queue(b"d")
    assert len(queue) == 3
    assert queue.dropped == 1
    assert set(drain_all(queue)) == {b"a", b"b", b"c", b"d"} - {sent_once}


def test_flood_of_distinct_subjects_stays_bounded() -> None:
    queue = BroadcastQueue(3, lambda: 10, max_items=50)
    for i in range(1000):
        queue.queue(b"m%d" % i, subject=f"s{i}")
        assert len(queue) <= 50
    assert queue.dropped == 950
    sent = drain_all(queue)
    assert len(sent) == 50


# ---------------------------------------------------------------------------- invariants

operations = st.lists(
    st.one_of(
        st.tuples(st.just("queue"), st.sampled_from([None, "s0", "s1", "s2", "s3"])),
        st.tuples(st.just("invalidate"), st.sampled_from(["s0", "s1", "s2", "s3"])),
        st.tuples(st.just("get"), st.integers(0, 6)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(operations, st.integers(1, 200), st.integers(1, 4))
def test_queue_invariants(ops: list[tuple[str, object]], members: int, mult: int) -> None:
    """A reference model: every live message, its subject and its transmit count."""
    queue = BroadcastQueue(mult, lambda: members)
    limit = mult * math.ceil(math.log10(members + 1))
    live: dict[bytes, int] = {}  # message -> transmits so far
    subject_of: dict[bytes, str | None] = {}
    counter = 0
    size = 6  # every message is the same size, so "fits" is a count
    for op, argument in ops:
        if op == "queue":
            assert argument is None or isinstance(argument, str)
            counter += 1
            message = b"m%05d" % counter
            assert len(message) == size
            if argument is not None:
                for old, subject in list(subject_of.items()):
                    if subject == argument and old in live:
                        del live[old]
            queue.queue(message, subject=argument)
            live[message] = 0
            subject_of[message] = argument
        elif op == "invalidate":
            for old, subject in list(subject_of.items()):
                if subject == argument and old in live:
                    del live[old]
            assert isinstance(argument, str)
            queue.invalidate(argument)
        else:
            assert isinstance(argument, int)
            budget = argument * (size + OVERHEAD)
            out = queue.get(OVERHEAD, budget)
            assert sum(len(m) + OVERHEAD for m in out) <= budget
            assert len(out) == len(set(out)), "a message twice in one packet"
            assert len(out) == min(argument, len(live)), "room left unused"
            for message in out:
                assert message in live, "stale, replaced or exhausted message sent"
            if out:
                # Least-sent first: nothing left behind was sent fewer times.
                most_sent_taken = max(live[m] for m in out)
                left = [live[m] for m in live if m not in out]
                assert all(most_sent_taken <= n for n in left)
            for message in out:
                live[message] += 1
                assert live[message] <= limit
                if live[message] == limit:
                    del live[message]
        assert len(queue) == len(live)
