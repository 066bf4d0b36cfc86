"""The merge rules (memberlist aliveNode/suspectNode/deadNode) under random message order.

At equal incarnation alive < suspect < dead/left; a higher incarnation wins; only the
member itself raises its incarnation (to refute). A state machine feeds Alive, Suspect
and Dead messages (and push-pull state) about a few members and about the core itself
into one ``Swim``, in any order, with the clock moving now and then, and checks the
invariants after every step.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from gossip import codec
from gossip.codec import Alive, Dead, MemberRecord, Message, PushPull, Suspect
from gossip.config import preset
from gossip.events import MemberState, SuspicionRefuted
from gossip.swim import Swim

from .helpers import address_of, drain_events, drop, packet_for, view

ME = "me"
OTHERS = ("p", "q", "r")
ADDRESSES = {name: address_of(i) for i, name in enumerate((ME, *OTHERS))}
ALIVE, SUSPECT, DEAD, LEFT = (
    MemberState.ALIVE,
    MemberState.SUSPECT,
    MemberState.DEAD,
    MemberState.LEFT,
)
CONFIG = preset("lan")

incarnations = st.integers(0, 6)
subjects = st.sampled_from((ME, *OTHERS))
accusers = st.sampled_from(("p", "q", "r", "x"))
metas = st.sampled_from((b"", b"v1", b"v2"))


def rank(state: MemberState) -> int:
    """Precedence at equal incarnation; dead and left are equally final."""
    return min(int(state), int(DEAD))


class MergeRules(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.core = Swim(ME, ADDRESSES[ME], CONFIG, rng=random.Random(0), now=0.0)
        self.previous: dict[str, tuple[int, MemberState]] = view(self.core)
        self.own_incarnation = 0
        self.refutations = 0
        self.highest_accusation = -1
        self.leaving = False

    @initialize(known=st.sets(st.sampled_from(OTHERS)))
    def learn_some(self, known: set[str]) -> None:
        for name in sorted(known):
            self.deliver(Alive(0, name, ADDRESSES[name], b""))

    # ------------------------------------------------------------ helpers

    def deliver(self, *messages: Message) -> None:
        self.now += 0.001
        self.core.receive_packet(packet_for(self.core, *messages), ADDRESSES["p"], self.now)
        self.after_step()

    def after_step(self) -> None:
        drop(self.core, self.now)
        for event in drain_events(self.core):
            if isinstance(event, SuspicionRefuted):
                self.refutations += 1

    def note_accusation(self, incarnation: int) -> None:
        if not self.leaving:
            self.highest_accusation = max(self.highest_accusation, incarnation)

    # ------------------------------------------------------------ rules

    @rule(node=subjects, incarnation=incarnations, meta=metas)
    def alive(self, node: str, incarnation: int, meta: bytes) -> None:
        self.deliver(Alive(incarnation, node, ADDRESSES[node], meta))
        if node == ME and not self.leaving:
            claimed = (incarnation, meta)
            if incarnation > self.own_incarnation or (
                incarnation == self.own_incarnation and claimed != (incarnation, b"")
            ):
                # Someone speaks for a newer (or conflicting) us: we must outbid it.
                self.note_accusation(incarnation)

    @rule(node=subjects, incarnation=incarnations, accuser=accusers)
    def suspect(self, node: str, incarnation: int, accuser: str) -> None:
        self.deliver(Suspect(incarnation, node, accuser))
        if node == ME and incarnation >= self.own_incarnation:
            self.note_accusation(incarnation)

    @rule(node=subjects, incarnation=incarnations, accuser=accusers, left=st.booleans())
    def dead(self, node: str, incarnation: int, accuser: str, left: bool) -> None:
        self.deliver(Dead(incarnation, node, node if left else accuser))
        if node == ME and incarnation >= self.own_incarnation:
            self.note_accusation(incarnation)

    @rule(
        records=st.lists(
            st.tuples(subjects, incarnations, st.sampled_from(list(MemberState))),
            min_size=1,
            max_size=4,
        )
    )
    def push_pull(self, records: list[tuple[str, int, MemberState]]) -> None:
        state = PushPull(
            False,
            tuple(MemberRecord(n, ADDRESSES[n], b"", i, s) for n, i, s in records),
            b"",
        )
        self.now += 0.001
        data = self.core.envelope.seal(codec.encode(state))
        reply = self.core.receive_stream(data, ADDRESSES["q"], self.now)
        assert reply is not None
        # The records apply in order, each against what the one before left.
        running = self.own_incarnation
        for name, incarnation, member_state in records:
            if name != ME or incarnation < running:
                continue
            if member_state != ALIVE or incarnation > running:
                self.note_accusation(incarnation)
                running = incarnation + 1
        self.after_step()

    @rule(seconds=st.sampled_from([0.3, 1.0, 5.0, 40.0]))
    def time_passes(self, seconds: float) -> None:
        """Timers fire; the network is down, so our probes fail and we accuse others."""
        end = self.now + seconds
        while (deadline := self.core.get_timer()) is not None and deadline <= end:
            self.now = max(self.now, deadline)
            self.core.handle_timer(self.now)
            self.after_step()
        self.now = end

    @precondition(lambda self: not self.leaving)
    @rule()
    def leave(self) -> None:
        self.leaving = True
        self.core.leave(self.now)
        self.after_step()

    # ------------------------------------------------------------ invariants

    @invariant()
    def incarnations_never_decrease_and_death_is_final(self) -> None:
        current = view(self.core)
        for name, (incarnation, state) in current.items():
            if name not in self.previous:
                continue  # new, or reaped and learned again
            old_incarnation, old_state = self.previous[name]
            assert incarnation >= old_incarnation, f"{name}: {old_incarnation} → {incarnation}"
            if incarnation == old_incarnation:
                assert rank(state) >= rank(old_state), (
                    f"{name} went {old_state.name} → {state.name} at incarnation {incarnation}"
                )
                if old_state in (DEAD, LEFT):
                    assert state == old_state, f"{name} came back at the same incarnation"
        self.previous = current

    @invariant()
    def only_we_raise_our_incarnation(self) -> None:
        incarnation = self.core.incarnation
        assert incarnation >= self.own_incarnation
        if incarnation > self.own_incarnation:
            assert self.refutations > 0 and not self.leaving
        self.own_incarnation = incarnation
        if not self.leaving:
            assert incarnation > self.highest_accusation, (
                f"we hold incarnation {incarnation} after an accusation at "
                f"{self.highest_accusation}"
            )

    @invariant()
    def we_are_alive_in_our_own_table(self) -> None:
        incarnation, state = view(self.core)[ME]
        assert incarnation == self.core.incarnation
        assert state == (LEFT if self.leaving else ALIVE)

    @invariant()
    def others_never_hold_a_higher_incarnation_than_they_were_told(self) -> None:
        # We never invent an incarnation for another member: at most the highest
        # one any message carried (6 here).
        for name, (incarnation, _) in view(self.core).items():
            if name != ME:
                assert incarnation <= 6


TestMergeRules = MergeRules.TestCase
TestMergeRules.settings = settings(
    max_examples=100, stateful_step_count=25, deadline=None, derandomize=True
)


# ---------------------------------------------------------------------------- convergence

Item = tuple[str, str, int, str]  # (kind, member, incarnation, accuser)


@st.composite
def convergent_batches(draw: st.DrawFn) -> list[Item]:
    """Messages about known members for which the rules promise one outcome whatever
    the order: for each member either

    * every message carries the same incarnation (precedence decides: dead > suspect >
      alive; one kind of death per member, since dead and left tie), or
    * anything at all below one Alive at a strictly higher incarnation (the
      refutation wins).
    """
    items: list[Item] = []
    for name in OTHERS:
        shape = draw(st.sampled_from(["same", "refuted", "none"]))
        if shape == "none":
            continue
        if shape == "same":
            incarnation = draw(st.integers(0, 4))
            death = draw(st.sampled_from(["dead", "left"]))
            kinds = draw(st.lists(st.sampled_from(["alive", "suspect", death]), max_size=5))
            items += [(k, name, incarnation, draw(accusers)) for k in kinds]
        else:
            top = draw(st.integers(1, 5))
            below = draw(
                st.lists(
                    st.tuples(
                        st.sampled_from(["alive", "suspect", "dead", "left"]),
                        st.integers(0, top - 1),
                        accusers,
                    ),
                    max_size=6,
                )
            )
            items += [(k, name, i, a) for k, i, a in below]
            items.append(("alive", name, top, "-"))
    return items


def message_of(item: Item) -> Message:
    kind, name, incarnation, accuser = item
    if kind == "alive":
        return Alive(incarnation, name, ADDRESSES[name], b"")
    if kind == "suspect":
        return Suspect(incarnation, name, accuser)
    if kind == "left":
        return Dead(incarnation, name, name)
    return Dead(incarnation, name, accuser if accuser != name else "x")


def apply_in_order(items: list[Item], observer: str) -> dict[str, tuple[int, MemberState]]:
    core = Swim(observer, address_of(9), CONFIG, rng=random.Random(1), now=0.0)
    for name in OTHERS:  # everyone is known first: news about strangers is ignored
        alive = Alive(0, name, ADDRESSES[name], b"")
        core.receive_packet(packet_for(core, alive), ADDRESSES[name], 0.0)
    for step, item in enumerate(items):
        core.receive_packet(packet_for(core, message_of(item)), ADDRESSES["p"], 0.001 * step)
    result = view(core)
    del result[observer]
    return result


def expected_view(items: list[Item]) -> dict[str, tuple[int, MemberState]]:
    expected = {name: (0, ALIVE) for name in OTHERS}
    states = {"alive": ALIVE, "suspect": SUSPECT, "dead": DEAD, "left": LEFT}
    for kind, name, incarnation, _ in items:
        candidate = (incarnation, states[kind])
        current = expected[name]
        if (candidate[0], rank(candidate[1])) > (current[0], rank(current[1])):
            expected[name] = candidate
    return expected


@settings(max_examples=200, deadline=None, derandomize=True)
@given(convergent_batches(), st.randoms(use_true_random=False))
def test_any_order_converges(items: list[Item], shuffler: random.Random) -> None:
    shuffled = list(items)
    shuffler.shuffle(shuffled)
    first = apply_in_order(items, "o1")
    second = apply_in_order(shuffled, "o2")
    assert first == second, f"order {items} gave {first}, order {shuffled} gave {second}"
    assert first == expected_view(items)
