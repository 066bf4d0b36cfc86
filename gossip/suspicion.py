"""Lifeguard's dynamic suspicion timeout (Dadgar et al. 2018, §IV-B; memberlist suspicion.go).

A suspicion starts with the longest timeout, ``maximum``. Each *independent*
confirmation (a suspect message about the same member from an accuser we have not
heard from yet) shrinks it along a log curve, reaching ``minimum`` after ``k``
confirmations::

    timeout(n) = max(minimum, maximum - (maximum - minimum) · ln(n + 1) / ln(k + 1))

So a member that many peers cannot reach is declared dead quickly, while a lone
accuser that is itself slow (and so suspects healthy peers) gives its victim the
longest time to refute. With ``k == 0`` the timeout is ``minimum`` from the start
(plain SWIM).
"""

from __future__ import annotations

import math


class Suspicion:
    """The timer state of one suspected member."""

    __slots__ = ("_accusers", "_k", "_maximum", "_minimum", "confirmations", "started")

    def __init__(
        self, accuser: str, started: float, minimum: float, maximum: float, k: int
    ) -> None:
        self.started = started
        self._minimum = minimum
        self._maximum = maximum if k > 0 else minimum
        self._k = k
        self._accusers = {accuser}
        self.confirmations = 0

    @property
    def deadline(self) -> float:
        """When the member is to be declared dead, unless it refutes first."""
        return self.started + self.timeout

    @property
    def timeout(self) -> float:
        if self._k < 1:
            return self._minimum
        fraction = math.log(self.confirmations + 1) / math.log(self._k + 1)
        return max(self._minimum, self._maximum - (self._maximum - self._minimum) * fraction)

    def confirm(self, accuser: str) -> bool:
        """Count a confirmation; False if this accuser was already counted or enough
        confirmations are in (then there is no news worth re-broadcasting)."""
        if self.confirmations >= self._k or accuser in self._accusers:
            return False
        self._accusers.add(accuser)
        self.confirmations += 1
        return True
