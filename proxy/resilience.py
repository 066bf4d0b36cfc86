"""The proxy's resilience decisions: rate limits, circuit breakers, retry budgets and
back-off, outlier detection. Pure: the I/O layer reports what happened (with ``now``,
monotonic seconds) and asks what to do; nothing here reads a clock or makes a timer.

Theory of operation
-------------------
``TokenBucket`` — local rate limiting (Envoy ``local_ratelimit`` filter). A bucket holds
at most ``burst`` tokens and gains ``rate_per_s`` a second, continuously; a request
takes one or is refused. It starts full. A refusal says how long until a token will be
there, which the proxy sends as ``Retry-After`` with its 429. Over any window of ``t``
seconds at most ``burst + rate_per_s · t`` requests pass.

``CircuitBreaker`` — Envoy's cluster circuit breakers (arch overview "Circuit
breaking"; ``config.cluster.v3.CircuitBreakers.Thresholds``): limits on connections,
requests waiting for a connection (pending), requests in flight and retries in flight
to one upstream cluster. The I/O layer asks ``allow_*()`` before it opens, queues,
sends or retries, and reports each start and end; a refusal returns the limit's name
(``"max_connections"``...), which goes in the proxy's error header with a fast 503, and
is counted as a trip. Defaults are Envoy's: 1024, 1024, 1024 and 3.

``RetryBudget`` — Envoy's ``Thresholds.RetryBudget``: retries in flight may not exceed
``budget_percent`` of the requests in flight (Envoy counts active plus pending
requests; a retry attempt is itself a request), nor ever be held below
``min_retry_concurrency``. So a failing cluster sees at most ~20 % extra load from
retries, while a quiet one can still retry. In Envoy a budget replaces ``max_retries``;
here, give the breaker ``max_retries=None`` when a budget is used.

``backoff()`` — Envoy's retry back-off (router filter, ``x-envoy-max-retries``):
"fully jittered exponential": retry N waits a uniformly random time in
``[0, (2^N - 1) · base)``, the bound capped at ``max_interval`` (default 10 × base).

``OutlierDetector`` — Envoy's passive health checking (arch overview "Outlier
detection"; ``outlier_detection_impl.cc``), for the consecutive-error detectors:

* Each endpoint counts consecutive 5xx and consecutive gateway failures (502, 503,
  504). Locally originated failures count as the status the router would have sent
  instead (Envoy's non-split mode): a connect failure or a reset as 503, a timeout as
  504. Any other status resets both counts.
* When a count reaches its threshold (``==``, as Envoy), the endpoint is an outlier;
  that count is reset whether or not it is ejected, so a refused ejection is tried
  again after another full run of failures. Gateway failures are looked at first.
* It is ejected unless that would make the ejected share exceed the limit: eject iff
  ``100 · (ejected + 1) / endpoints ≤ max_ejection_percent``, or, when
  ``always_eject_one_host`` is set, nothing is ejected yet. That is Envoy's exact rule,
  including its consequence: with the default 10 % and fewer than 10 endpoints nothing
  is ever ejected unless ``always_eject_one_host`` is on (Envoy's docs say "will eject
  at least one host regardless of the value"; its code does so only with that flag).
  A refusal counts as an overflow.
* An ejection lasts ``min(base_ejection_time · multiplier, max_ejection_time)`` plus a
  random jitter in ``[0, max_ejection_time_jitter]``. The multiplier goes up by one at
  each ejection (while ``multiplier · base < max + base``) and down by one for each
  whole ``interval`` the endpoint has been back without being ejected again. Envoy
  applies the decrease at its interval sweeps; here it is computed at the next
  ejection from the time since the return (Envoy's sweeps give that count or one
  fewer, depending on their phase).
* Envoy returns ejected hosts at its next interval sweep after their time is up; this
  core returns them at the exact moment, through its one timer (``get_timer()`` /
  ``handle_timer(now)``; ``ejected(now)`` also runs any due return). The consecutive
  counts are reset on return.
* Endpoints removed from the cluster (``set_endpoints``) are forgotten, ejected or not;
  results for endpoints not in the cluster are ignored (a request can outlive its
  endpoint's removal).

Not implemented: Envoy's success-rate and failure-percentage detectors, enforcement
percentages (a detector is on when its threshold is > 0; Envoy's default enforcement
of gateway-failure ejection is 0 %, here it is on), and the split of local-origin
errors.
"""

from __future__ import annotations

import heapq
import math
import sys
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Generic, TypeVar

from proxy.errors import LocalProtocolError

if TYPE_CHECKING:
    from random import Random

K = TypeVar("K", bound=Hashable)

# ------------------------------------------------------------------------ token bucket

#: A take succeeds when the bucket holds at least 1 - this: the float sums of many
#: small refills may fall a hair short of a whole token that is really there.
_TOKEN_SLACK: Final = 1e-9


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` held; starts full."""

    __slots__ = ("_burst", "_rate", "_tokens", "_updated")

    def __init__(self, rate_per_s: float, burst: float) -> None:
        if not rate_per_s > 0 or not math.isfinite(rate_per_s):
            raise LocalProtocolError(f"rate_per_s must be a positive number, not {rate_per_s}")
        if not burst >= 1 or not math.isfinite(burst):
            raise LocalProtocolError(f"burst must be ≥ 1, not {burst}")
        self._rate = float(rate_per_s)
        self._burst = float(burst)
        self._tokens = float(burst)
        self._updated = -math.inf  # the first take refills to ``burst``: full

    @property
    def rate_per_s(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    def try_take(self, now: float) -> float:
        """Take a token: 0.0 if allowed, else the seconds until one will be there
        (for ``Retry-After``; round it up). A clock that steps back refills nothing."""
        tokens = self._tokens
        elapsed = now - self._updated
        if elapsed > 0.0:
            tokens += elapsed * self._rate
            if tokens > self._burst:
                tokens = self._burst
            self._updated = now
        if tokens >= 1.0 - _TOKEN_SLACK:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / self._rate

    def available(self, now: float) -> float:
        """Tokens in the bucket at ``now`` (without taking any)."""
        elapsed = now - self._updated
        if elapsed > 0.0:
            return min(self._burst, self._tokens + elapsed * self._rate)
        return self._tokens


# --------------------------------------------------------------------- circuit breaker

MAX_CONNECTIONS: Final = "max_connections"
MAX_PENDING_REQUESTS: Final = "max_pending_requests"
MAX_REQUESTS: Final = "max_requests"
MAX_RETRIES: Final = "max_retries"
BREAKER_REASONS: Final = (MAX_CONNECTIONS, MAX_PENDING_REQUESTS, MAX_REQUESTS, MAX_RETRIES)
"""The reasons ``CircuitBreaker.allow_*`` return: the name of the limit that was hit."""

#: Envoy's defaults (``Thresholds``): 1024 connections, pending and requests, 3 retries.
DEFAULT_MAX_CONNECTIONS: Final = 1024
DEFAULT_MAX_PENDING_REQUESTS: Final = 1024
DEFAULT_MAX_REQUESTS: Final = 1024
DEFAULT_MAX_RETRIES: Final = 3

_UNLIMITED: Final = sys.maxsize


@dataclass(frozen=True, slots=True)
class BreakerStatistics:
    connections: int
    pending_requests: int
    requests: int
    retries: int
    trips: dict[str, int]
    """Refusals by reason (each of ``BREAKER_REASONS``), since construction."""


class CircuitBreaker:
    """Envoy's circuit-breaker thresholds for one upstream cluster. ``None`` as a
    limit means none."""

    __slots__ = (
        "_connections",
        "_max_connections",
        "_max_pending",
        "_max_requests",
        "_max_retries",
        "_pending",
        "_requests",
        "_retries",
        "_trips",
    )

    def __init__(
        self,
        max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
        max_pending_requests: int | None = DEFAULT_MAX_PENDING_REQUESTS,
        max_requests: int | None = DEFAULT_MAX_REQUESTS,
        max_retries: int | None = DEFAULT_MAX_RETRIES,
    ) -> None:
        self._max_connections = _limit(MAX_CONNECTIONS, max_connections)
        self._max_pending = _limit(MAX_PENDING_REQUESTS, max_pending_requests)
        self._max_requests = _limit(MAX_REQUESTS, max_requests)
        self._max_retries = _limit(MAX_RETRIES, max_retries)
        self._connections = 0
        self._pending = 0
        self._requests = 0
        self._retries = 0
        self._trips = dict.fromkeys(BREAKER_REASONS, 0)

    # --------------------------------------------------------------------- questions

    def allow_connection(self) -> str | None:
        """None if a new upstream connection may be opened, else ``"max_connections"``."""
        if self._connections < self._max_connections:
            return None
        self._trips[MAX_CONNECTIONS] += 1
        return MAX_CONNECTIONS

    def allow_pending(self) -> str | None:
        """None if a request may wait for a connection, else ``"max_pending_requests"``."""
        if self._pending < self._max_pending:
            return None
        self._trips[MAX_PENDING_REQUESTS] += 1
        return MAX_PENDING_REQUESTS

    def allow_request(self) -> str | None:
        """None if a request may be sent upstream, else ``"max_requests"``."""
        if self._requests < self._max_requests:
            return None
        self._trips[MAX_REQUESTS] += 1
        return MAX_REQUESTS

    def allow_retry(self) -> str | None:
        """None if a retry may start, else ``"max_retries"``."""
        if self._retries < self._max_retries:
            return None
        self._trips[MAX_RETRIES] += 1
        return MAX_RETRIES

    # ----------------------------------------------------------------- bookkeeping

    def connection_opened(self) -> None:
        self._connections += 1

    def connection_closed(self) -> None:
        if self._connections <= 0:
            raise LocalProtocolError("connection_closed() without connection_opened()")
        self._connections -= 1

    def pending_added(self) -> None:
        self._pending += 1

    def pending_removed(self) -> None:
        if self._pending <= 0:
            raise LocalProtocolError("pending_removed() without pending_added()")
        self._pending -= 1

    def request_started(self) -> None:
        self._requests += 1

    def request_finished(self) -> None:
        if self._requests <= 0:
            raise LocalProtocolError("request_finished() without request_started()")
        self._requests -= 1

    def retry_started(self) -> None:
        self._retries += 1

    def retry_finished(self) -> None:
        if self._retries <= 0:
            raise LocalProtocolError("retry_finished() without retry_started()")
        self._retries -= 1

    # -------------------------------------------------------------------- reading

    @property
    def connections(self) -> int:
        return self._connections

    @property
    def pending_requests(self) -> int:
        return self._pending

    @property
    def requests(self) -> int:
        return self._requests

    @property
    def retries(self) -> int:
        return self._retries

    def statistics(self) -> BreakerStatistics:
        return BreakerStatistics(
            self._connections, self._pending, self._requests, self._retries, dict(self._trips)
        )


def _limit(name: str, value: int | None) -> int:
    if value is None:
        return _UNLIMITED
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LocalProtocolError(f"{name} must be an int ≥ 0 or None, not {value!r}")
    return value


# ------------------------------------------------------------------------ retry budget

#: Envoy's ``RetryBudget`` defaults.
DEFAULT_BUDGET_PERCENT: Final = 20.0
DEFAULT_MIN_RETRY_CONCURRENCY: Final = 3


class RetryBudget:
    """Retries in flight ≤ ``max(min_retry_concurrency, budget_percent % of requests in
    flight)`` (Envoy ``RetryBudget``; the percentage is truncated to a whole number).

    Call ``request_started``/``request_finished`` around every request in flight to the
    cluster — waiting for a connection or sent, first attempts and retries alike — and
    ``retry_started``/``retry_finished`` in addition around each retry attempt."""

    __slots__ = ("_denied", "_fraction", "_minimum", "_requests", "_retries")

    def __init__(
        self,
        budget_percent: float = DEFAULT_BUDGET_PERCENT,
        min_retry_concurrency: int = DEFAULT_MIN_RETRY_CONCURRENCY,
    ) -> None:
        if not 0.0 <= budget_percent <= 100.0:
            raise LocalProtocolError(f"budget_percent must be in [0, 100], not {budget_percent}")
        if min_retry_concurrency < 0:
            raise LocalProtocolError("min_retry_concurrency must be ≥ 0")
        self._fraction = budget_percent / 100.0
        self._minimum = min_retry_concurrency
        self._requests = 0
        self._retries = 0
        self._denied = 0

    @property
    def limit(self) -> int:
        """Retries that may be in flight now."""
        limit = int(self._fraction * self._requests)
        return limit if limit > self._minimum else self._minimum

    def can_retry(self) -> bool:
        """Whether one more retry fits in the budget now (a refusal is counted)."""
        limit = int(self._fraction * self._requests)
        if limit < self._minimum:
            limit = self._minimum
        if self._retries < limit:
            return True
        self._denied += 1
        return False

    def request_started(self) -> None:
        self._requests += 1

    def request_finished(self) -> None:
        if self._requests <= 0:
            raise LocalProtocolError("request_finished() without request_started()")
        self._requests -= 1

    def retry_started(self) -> None:
        self._retries += 1

    def retry_finished(self) -> None:
        if self._retries <= 0:
            raise LocalProtocolError("retry_finished() without retry_started()")
        self._retries -= 1

    @property
    def requests(self) -> int:
        return self._requests

    @property
    def retries(self) -> int:
        return self._retries

    @property
    def denied(self) -> int:
        """Retries refused by ``can_retry`` since construction."""
        return self._denied


#: Envoy's default retry back-off base interval (25 ms).
DEFAULT_BACKOFF_BASE: Final = 0.025
#: Beyond this attempt the bound is ``max_interval`` anyway (and 2**N stays a float).
_BACKOFF_EXPONENT_CAP: Final = 62


def backoff(
    attempt: int,
    *,
    base: float = DEFAULT_BACKOFF_BASE,
    max_interval: float | None = None,
    fraction: float,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry):
    ``fraction · min((2^attempt - 1) · base, max_interval)``, ``fraction`` uniform in
    [0, 1) from the caller's RNG. ``max_interval`` defaults to 10 × ``base`` (Envoy)."""
    if attempt < 1:
        raise LocalProtocolError(f"retry attempts count from 1, not {attempt}")
    if not 0.0 <= fraction < 1.0:
        raise LocalProtocolError(f"fraction must be in [0, 1), not {fraction}")
    if not base > 0:
        raise LocalProtocolError(f"base must be > 0, not {base}")
    cap = 10.0 * base if max_interval is None else max_interval
    if cap < base:
        raise LocalProtocolError("max_interval must be ≥ base")
    bound = cap if attempt > _BACKOFF_EXPONENT_CAP else min((2.0**attempt - 1.0) * base, cap)
    return fraction * bound


# ------------------------------------------------------------------- outlier detection

#: Outcomes the I/O layer reports for locally originated failures, instead of a status.
CONNECT_FAILED: Final = -1
"""The upstream connection could not be made (counts as 503)."""
TIMEOUT: Final = -2
"""The upstream did not answer in time (counts as 504)."""
RESET: Final = -3
"""The upstream connection broke before the response was complete (counts as 503)."""

#: Envoy ``resultToHttpCode`` in non-split mode; index by ``-outcome``.
_LOCAL_ORIGIN_STATUS: Final = (0, 503, 504, 503)

CONSECUTIVE_5XX: Final = "consecutive_5xx"
CONSECUTIVE_GATEWAY_FAILURE: Final = "consecutive_gateway_failure"
EJECTION_REASONS: Final = (CONSECUTIVE_5XX, CONSECUTIVE_GATEWAY_FAILURE)

#: Envoy's ``OutlierDetection`` defaults.
DEFAULT_CONSECUTIVE_5XX: Final = 5
DEFAULT_CONSECUTIVE_GATEWAY_FAILURE: Final = 5
DEFAULT_INTERVAL: Final = 10.0
DEFAULT_BASE_EJECTION_TIME: Final = 30.0
DEFAULT_MAX_EJECTION_TIME: Final = 300.0
DEFAULT_MAX_EJECTION_PERCENT: Final = 10

#: Events not pulled yet are dropped beyond this many (the counts in ``statistics()``
#: stay exact); an adapter that never pulls events must not grow memory.
MAX_PENDING_EVENTS: Final = 1024


@dataclass(frozen=True, slots=True)
class EndpointEjected(Generic[K]):
    endpoint: K
    reason: str
    """One of ``EJECTION_REASONS``."""
    until: float
    """When it will be returned to service (our clock)."""
    ejections: int
    """How many times this endpoint has been ejected, this one included."""


@dataclass(frozen=True, slots=True)
class EndpointReturned(Generic[K]):
    """An ejected endpoint's time is up: it takes traffic again."""

    endpoint: K


@dataclass(slots=True)
class OutlierStatistics:
    """Counters for metrics. Read them; do not change them."""

    ejections_active: int = 0
    ejections_enforced: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(EJECTION_REASONS, 0)
    )
    """Ejections that happened, by reason (Envoy ``ejections_enforced_*``)."""
    ejections_detected: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(EJECTION_REASONS, 0)
    )
    """Outliers found, ejected or not (Envoy ``ejections_detected_*``)."""
    ejections_overflow: int = 0
    """Ejections refused by ``max_ejection_percent`` (Envoy ``ejections_overflow``)."""


class _EndpointState:
    __slots__ = (
        "consecutive_5xx",
        "consecutive_gateway",
        "ejected_until",
        "ejections",
        "multiplier",
        "returned_at",
    )

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.ejections = 0
        self.multiplier = 0
        self.ejected_until: float | None = None
        self.returned_at: float | None = None


class OutlierDetector(Generic[K]):
    """Consecutive-failure outlier detection for one cluster (see the module docstring).

    ``record(endpoint, outcome, now)`` after every upstream exchange: ``outcome`` is the
    HTTP status received (or 200 for an L4 connection made), or ``CONNECT_FAILED``,
    ``TIMEOUT``, ``RESET``. Give the balancer ``ejected(now)`` as its exclude set; pull
    ``EndpointEjected``/``EndpointReturned`` with ``next_event()`` for logs."""

    __slots__ = (
        "_always_eject_one",
        "_base",
        "_ejected",
        "_events",
        "_interval",
        "_jitter",
        "_max_percent",
        "_max_time",
        "_rng",
        "_sequence",
        "_states",
        "_stats",
        "_threshold_5xx",
        "_threshold_gateway",
        "_timers",
    )

    def __init__(
        self,
        endpoints: Iterable[K] = (),
        *,
        consecutive_5xx: int = DEFAULT_CONSECUTIVE_5XX,
        consecutive_gateway_failure: int = DEFAULT_CONSECUTIVE_GATEWAY_FAILURE,
        interval: float = DEFAULT_INTERVAL,
        base_ejection_time: float = DEFAULT_BASE_EJECTION_TIME,
        max_ejection_time: float | None = None,
        max_ejection_percent: int = DEFAULT_MAX_EJECTION_PERCENT,
        always_eject_one_host: bool = False,
        max_ejection_time_jitter: float = 0.0,
        rng: Random | None = None,
    ) -> None:
        if consecutive_5xx < 0 or consecutive_gateway_failure < 0:
            raise LocalProtocolError("consecutive thresholds must be ≥ 0 (0 turns one off)")
        if not interval > 0 or not base_ejection_time > 0:
            raise LocalProtocolError("interval and base_ejection_time must be > 0")
        # Envoy: max_ejection_time defaults to 300 s or base_ejection_time, the larger.
        if max_ejection_time is None:
            max_ejection_time = max(DEFAULT_MAX_EJECTION_TIME, base_ejection_time)
        if max_ejection_time < base_ejection_time:
            raise LocalProtocolError("max_ejection_time cannot be smaller than base_ejection_time")
        if not 0 <= max_ejection_percent <= 100:
            raise LocalProtocolError("max_ejection_percent must be in [0, 100]")
        if max_ejection_time_jitter < 0:
            raise LocalProtocolError("max_ejection_time_jitter must be ≥ 0")
        if max_ejection_time_jitter > 0 and rng is None:
            raise LocalProtocolError("max_ejection_time_jitter needs an rng")
        # A threshold of 0 never matches ``==`` on a count that starts at 1.
        self._threshold_5xx = consecutive_5xx
        self._threshold_gateway = consecutive_gateway_failure
        self._interval = float(interval)
        self._base = float(base_ejection_time)
        self._max_time = float(max_ejection_time)
        self._max_percent = max_ejection_percent
        self._always_eject_one = always_eject_one_host
        self._jitter = float(max_ejection_time_jitter)
        self._rng = rng
        self._states: dict[K, _EndpointState] = {}
        self._ejected: frozenset[K] = frozenset()
        self._sequence = 0
        # (until, sequence, endpoint) — stale entries (endpoint returned or removed, or
        # ejected again) are skipped when they come up.
        self._timers: list[tuple[float, int, K]] = []
        self._events: deque[EndpointEjected[K] | EndpointReturned[K]] = deque(
            maxlen=MAX_PENDING_EVENTS
        )
        self._stats = OutlierStatistics()
        for endpoint in endpoints:
            self._states.setdefault(endpoint, _EndpointState())

    # ---------------------------------------------------------------------- inputs

    def set_endpoints(self, endpoints: Iterable[K]) -> None:
        """The cluster is now ``endpoints``: new ones start clean, the others' history
        is kept, removed ones are forgotten (and no longer count as ejected)."""
        wanted = set(endpoints)
        states = self._states
        removed = [endpoint for endpoint in states if endpoint not in wanted]
        for endpoint in removed:
            del states[endpoint]
        for endpoint in wanted:
            if endpoint not in states:
                states[endpoint] = _EndpointState()
        if removed and not self._ejected.isdisjoint(removed):
            self._ejected = self._ejected.difference(removed)
            self._stats.ejections_active = len(self._ejected)

    def record(self, endpoint: K, outcome: int, now: float) -> None:
        """Account one upstream result: an HTTP status (≥ 100) or one of
        ``CONNECT_FAILED``, ``TIMEOUT``, ``RESET``."""
        state = self._states.get(endpoint)
        if state is None:
            return
        if outcome < 0:
            outcome = _LOCAL_ORIGIN_STATUS[-outcome]
        if outcome < 500 or outcome > 599:
            if state.consecutive_5xx or state.consecutive_gateway:
                state.consecutive_5xx = 0
                state.consecutive_gateway = 0
            return
        # An endpoint already ejected is not looked at again, and its count is kept
        # (Envoy's onConsecutiveErrorWorker); the return resets it.
        if 502 <= outcome <= 504:
            state.consecutive_gateway += 1
            if state.consecutive_gateway == self._threshold_gateway and state.ejected_until is None:
                self._outlier(endpoint, state, CONSECUTIVE_GATEWAY_FAILURE, now)
                state.consecutive_gateway = 0
        else:
            state.consecutive_gateway = 0
        state.consecutive_5xx += 1
        if state.consecutive_5xx == self._threshold_5xx and state.ejected_until is None:
            self._outlier(endpoint, state, CONSECUTIVE_5XX, now)
            state.consecutive_5xx = 0

    def handle_timer(self, now: float) -> None:
        """Return to service every endpoint whose ejection is over at ``now``."""
        timers = self._timers
        returned: list[K] = []
        while timers and timers[0][0] <= now:
            until, _, endpoint = heapq.heappop(timers)
            state = self._states.get(endpoint)
            if state is None or state.ejected_until != until:
                continue  # removed, or ejected again since (another entry is live)
            state.ejected_until = None
            state.returned_at = now
            state.consecutive_5xx = 0
            state.consecutive_gateway = 0
            returned.append(endpoint)
            self._events.append(EndpointReturned(endpoint))
        if returned:
            self._ejected = self._ejected.difference(returned)
            self._stats.ejections_active = len(self._ejected)

    # --------------------------------------------------------------------- outputs

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next run, or None."""
        timers = self._timers
        states = self._states
        while timers:
            until, _, endpoint = timers[0]
            state = states.get(endpoint)
            if state is not None and state.ejected_until == until:
                return until
            heapq.heappop(timers)
        return None

    def ejected(self, now: float) -> frozenset[K]:
        """The endpoints out of service at ``now`` (runs any return that is due). The
        same object is returned until the set changes: pass it as ``exclude``."""
        timers = self._timers
        if timers and timers[0][0] <= now:
            self.handle_timer(now)
        return self._ejected

    def is_ejected(self, endpoint: K, now: float) -> bool:
        return endpoint in self.ejected(now)

    def next_event(self) -> EndpointEjected[K] | EndpointReturned[K] | None:
        return self._events.popleft() if self._events else None

    def statistics(self) -> OutlierStatistics:
        return self._stats

    @property
    def endpoints(self) -> frozenset[K]:
        return frozenset(self._states)

    # -------------------------------------------------------------------- internals

    def _outlier(self, endpoint: K, state: _EndpointState, reason: str, now: float) -> None:
        stats = self._stats
        stats.ejections_detected[reason] += 1
        active = len(self._ejected)
        allowed = 100.0 * (active + 1) / len(self._states) <= self._max_percent
        if not allowed and self._always_eject_one and active == 0:
            allowed = True
        if not allowed:
            stats.ejections_overflow += 1
            return
        # The multiplier decays by one per interval spent back in service since the
        # last return (Envoy decrements it at each interval sweep).
        if state.returned_at is not None and state.multiplier:
            decay = int((now - state.returned_at) // self._interval)
            state.multiplier = max(0, state.multiplier - decay)
        if state.multiplier * self._base < self._max_time + self._base:
            state.multiplier += 1
        duration = min(self._base * state.multiplier, self._max_time)
        if self._jitter and self._rng is not None:
            duration += self._rng.random() * self._jitter
        until = now + duration
        state.ejected_until = until
        state.ejections += 1
        self._ejected = self._ejected | {endpoint}
        stats.ejections_active = len(self._ejected)
        stats.ejections_enforced[reason] += 1
        self._sequence += 1
        heapq.heappush(self._timers, (until, self._sequence, endpoint))
        self._events.append(EndpointEjected(endpoint, reason, until, state.ejections))
