"""The transmit-limited broadcast queue (memberlist's TransmitLimitedQueue).

Theory of operation
-------------------
Every message we want the cluster to hear is queued here and piggybacked on the
packets we send anyway (pings, acks, gossip rounds) until it has been sent
``retransmit_mult × ceil(log10(N+1))`` times (SWIM §4.1: λ·log n suffices for an
epidemic to reach everyone with high probability). Messages sent fewest times go
first, so a fresh update spreads before old ones get their last copies out.

A message may name its *subject* (a member name, a catalog key): a newer message about
the same subject replaces the older one, so the queue never carries stale news and its
length is bounded by the number of subjects.

Items live in tiers by transmit count; taking an item moves it one tier up. Removal
is lazy (a flag), so every operation is O(items examined), not O(queue).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Final

#: Default bound on queued items; a flood of distinct subjects drops the oldest.
DEFAULT_MAX_ITEMS: Final = 65_536


class _Item:
    __slots__ = ("live", "message", "subject", "transmits")

    def __init__(self, subject: str | None, message: bytes) -> None:
        self.subject = subject
        self.message = message
        self.transmits = 0
        self.live = True


class BroadcastQueue:
    """Messages to piggyback, each sent a limited number of times."""

    def __init__(
        self,
        retransmit_mult: int,
        member_count: Callable[[], int],
        *,
        retransmit_min: int = 0,
        max_items: int = DEFAULT_MAX_ITEMS,
    ) -> None:
        self._mult = retransmit_mult
        self._min = retransmit_min
        self._member_count = member_count
        self._max_items = max_items
        self._tiers: dict[int, deque[_Item]] = {}
        self._by_subject: dict[str, _Item] = {}
        self._live = 0
        self.transmissions = 0
        """Messages handed out so far (each copy counts)."""
        self.dropped = 0
        """Messages dropped because the queue was full."""

    def __len__(self) -> int:
        return self._live

    def retransmit_limit(self) -> int:
        return max(self._min, self._mult * math.ceil(math.log10(self._member_count() + 1)))

    def queue(self, message: bytes, subject: str | None = None) -> None:
        """Queue ``message``; it replaces any queued message about ``subject``."""
        if subject is not None:
            old = self._by_subject.pop(subject, None)
            if old is not None and old.live:
                old.live = False
                self._live -= 1
        item = _Item(subject, message)
        if subject is not None:
            self._by_subject[subject] = item
        self._tiers.setdefault(0, deque()).append(item)
        self._live += 1
        if self._live > self._max_items:
            self._drop_one()

    def invalidate(self, subject: str) -> None:
        """Forget any queued message about ``subject``."""
        old = self._by_subject.pop(subject, None)
        if old is not None and old.live:
            old.live = False
            self._live -= 1

    def get(self, overhead: int, limit: int) -> list[bytes]:
        """Messages that fit in ``limit`` bytes, each costing ``overhead`` extra.

        Each returned message counts as one transmission; messages that reached the
        retransmit limit leave the queue.
        """
        if not self._live:
            return []
        transmit_limit = self.retransmit_limit()
        taken: list[_Item] = []
        out: list[bytes] = []
        remaining = limit
        for tier in sorted(self._tiers):
            items = self._tiers[tier]
            # Newest first within a tier: fresh news about a subject matters most.
            for item in reversed(items):
                if not item.live or item.transmits != tier:
                    continue
                cost = overhead + len(item.message)
                if cost > remaining:
                    continue
                remaining -= cost
                out.append(item.message)
                taken.append(item)
                if remaining <= overhead:
                    break
            if remaining <= overhead:
                break
        for item in taken:
            item.transmits += 1
            self.transmissions += 1
            if item.transmits >= transmit_limit:
                item.live = False
                self._live -= 1
                if item.subject is not None and self._by_subject.get(item.subject) is item:
                    del self._by_subject[item.subject]
            else:
                self._tiers.setdefault(item.transmits, deque()).append(item)
        self._compact()
        return out

    def _compact(self) -> None:
        # Lazily removed items are dropped from the front of each tier; a tier that
        # is all dead is removed. Items that moved up leave a dead copy behind only
        # as their old position, which we skip by checking membership below.
        for tier in list(self._tiers):
            items = self._tiers[tier]
            while items and (not items[0].live or items[0].transmits != tier):
                items.popleft()
            if not items:
                del self._tiers[tier]
            elif len(items) > 64 and len(items) > 2 * self._live:
                self._tiers[tier] = deque(i for i in items if i.live and i.transmits == tier)

    def _drop_one(self) -> None:
        # Drop the message that has been sent the most: it has spread furthest.
        for tier in sorted(self._tiers, reverse=True):
            for item in self._tiers[tier]:
                if item.live and item.transmits == tier:
                    item.live = False
                    self._live -= 1
                    self.dropped += 1
                    if item.subject is not None and self._by_subject.get(item.subject) is item:
                        del self._by_subject[item.subject]
                    return
