"""``proxy.resilience``: token bucket, circuit breaker, retry budget and back-off,
outlier detection — all on a fake clock (plain floats)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import LocalProtocolError
from proxy.resilience import (
    BREAKER_REASONS,
    CONNECT_FAILED,
    CONSECUTIVE_5XX,
    CONSECUTIVE_GATEWAY_FAILURE,
    MAX_CONNECTIONS,
    MAX_PENDING_EVENTS,
    MAX_PENDING_REQUESTS,
    MAX_REQUESTS,
    MAX_RETRIES,
    RESET,
    TIMEOUT,
    CircuitBreaker,
    EndpointEjected,
    EndpointReturned,
    OutlierDetector,
    RetryBudget,
    TokenBucket,
    backoff,
)

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True)

# ---------------------------------------------------------------------------- token bucket


def test_bucket_starts_full_then_paces_at_the_rate() -> None:
    bucket = TokenBucket(rate_per_s=10.0, burst=5)
    assert [bucket.try_take(100.0) for _ in range(5)] == [0.0] * 5
    wait = bucket.try_take(100.0)
    assert wait == pytest.approx(0.1)
    assert bucket.try_take(100.0 + wait / 2) == pytest.approx(wait / 2)
    assert bucket.try_take(100.0 + wait) == 0.0  # exactly when it said
    assert bucket.try_take(100.0 + wait) > 0.0


def test_bucket_refills_to_burst_and_no_further() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=3)
    for _ in range(3):
        bucket.try_take(0.0)
    assert bucket.available(0.0) == pytest.approx(0.0)
    assert bucket.available(1.0) == pytest.approx(2.0)
    assert bucket.available(1000.0) == 3.0
    assert [bucket.try_take(1000.0) for _ in range(4)][:3] == [0.0] * 3


def test_bucket_ignores_a_clock_that_steps_back() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=1)
    assert bucket.try_take(50.0) == 0.0
    assert bucket.try_take(10.0) == pytest.approx(1.0)
    assert bucket.try_take(50.5) == pytest.approx(0.5)
    assert bucket.try_take(51.0) == 0.0


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (float("inf"), 1), (1, 0.5)])
def test_bucket_refuses_bad_parameters(rate: float, burst: float) -> None:
    with pytest.raises(LocalProtocolError):
        TokenBucket(rate, burst)


@PROPERTY
@given(
    rate=st.floats(0.1, 1000.0),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=150),
)
def test_bucket_never_allows_more_than_burst_plus_rate_times_window(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst)
    times = list(itertools.accumulate(gaps, initial=1000.0))
    allowed = [now for now in times if bucket.try_take(now) == 0.0]
    for first, last in itertools.combinations(range(len(allowed)), 2):
        window = allowed[last] - allowed[first]
        assert last - first + 1 <= burst + rate * window + 1e-6


@PROPERTY
@given(rate=st.floats(0.1, 100.0), burst=st.integers(1, 10), seed=st.integers(0, 10_000))
def test_bucket_allows_whenever_a_token_has_accrued(rate: float, burst: int, seed: int) -> None:
    # Liveness: a request arriving at (or after) the announced wait is allowed.
    bucket = TokenBucket(rate, burst)
    rng = random.Random(seed)
    now = 0.0
    for _ in range(100):
        wait = bucket.try_take(now)
        if wait > 0:
            assert bucket.try_take(now + wait) == 0.0, seed
            now += wait
        now += rng.random() / rate


# ------------------------------------------------------------------------- circuit breaker


def test_breaker_refuses_at_each_limit_with_its_name_and_counts_trips() -> None:
    breaker = CircuitBreaker(
        max_connections=2, max_pending_requests=1, max_requests=3, max_retries=1
    )
    pairs = [
        (breaker.allow_connection, breaker.connection_opened, 2, MAX_CONNECTIONS),
        (breaker.allow_pending, breaker.pending_added, 1, MAX_PENDING_REQUESTS),
        (breaker.allow_request, breaker.request_started, 3, MAX_REQUESTS),
        (breaker.allow_retry, breaker.retry_started, 1, MAX_RETRIES),
    ]
    for allow, start, limit, reason in pairs:
        for _ in range(limit):
            assert allow() is None
            start()
        assert allow() == reason
        assert allow() == reason
    stats = breaker.statistics()
    assert stats.trips == dict.fromkeys(BREAKER_REASONS, 2)
    assert (stats.connections, stats.pending_requests, stats.requests, stats.retries) == (
        2,
        1,
        3,
        1,
    )
    breaker.request_finished()
    assert breaker.allow_request() is None
    stats.trips[MAX_REQUESTS] = 99  # a snapshot: changing it changes nothing
    assert breaker.statistics().trips[MAX_REQUESTS] == 2


def test_breaker_defaults_are_envoys_and_none_means_unlimited() -> None:
    breaker = CircuitBreaker()
    for _ in range(3):
        breaker.retry_started()
    assert breaker.allow_retry() == MAX_RETRIES
    for _ in range(1024):
        breaker.connection_opened()
    assert breaker.allow_connection() == MAX_CONNECTIONS
    unlimited = CircuitBreaker(None, None, None, None)
    for _ in range(10_000):
        unlimited.retry_started()
    assert unlimited.allow_retry() is None


def test_breaker_misuse_raises_and_counters_stay_at_zero() -> None:
    breaker = CircuitBreaker()
    for finish in (
        breaker.connection_closed,
        breaker.pending_removed,
        breaker.request_finished,
        breaker.retry_finished,
    ):
        with pytest.raises(LocalProtocolError):
            finish()
    stats = breaker.statistics()
    assert (stats.connections, stats.pending_requests, stats.requests, stats.retries) == (
        0,
        0,
        0,
        0,
    )
    with pytest.raises(LocalProtocolError):
        CircuitBreaker(max_connections=-1)


BREAKER_OPERATIONS = st.lists(
    st.tuples(st.sampled_from(["connection", "pending", "request", "retry"]), st.booleans()),
    max_size=200,
)


@PROPERTY
@given(operations=BREAKER_OPERATIONS, limit=st.integers(0, 5))
def test_breaker_counters_follow_a_model_and_never_go_negative(
    operations: list[tuple[str, bool]], limit: int
) -> None:
    breaker = CircuitBreaker(limit, limit, limit, limit)
    methods = {
        "connection": (
            breaker.allow_connection,
            breaker.connection_opened,
            breaker.connection_closed,
        ),
        "pending": (breaker.allow_pending, breaker.pending_added, breaker.pending_removed),
        "request": (breaker.allow_request, breaker.request_started, breaker.request_finished),
        "retry": (breaker.allow_retry, breaker.retry_started, breaker.retry_finished),
    }
    model = dict.fromkeys(methods, 0)
    for kind, start in operations:
        allow, begin, end = methods[kind]
        if start:
            if allow() is None:
                begin()
                model[kind] += 1
        elif model[kind]:
            end()
            model[kind] -= 1
        else:
            with pytest.raises(LocalProtocolError):
                end()
        stats = breaker.statistics()
        counts = {
            "connection": stats.connections,
            "pending": stats.pending_requests,
            "request": stats.requests,
            "retry": stats.retries,
        }
        assert counts == model
        assert all(0 <= count <= limit for count in counts.values())


# ------------------------------------------------------------------ retry budget, back-off


def test_budget_floor_and_percentage() -> None:
    budget = RetryBudget()  # Envoy: 20 %, at least 3
    assert budget.limit == 3
    for _ in range(3):
        assert budget.can_retry()
        budget.retry_started()
    assert not budget.can_retry()
    assert budget.denied == 1
    for _ in range(100):
        budget.request_started()
    assert budget.limit == 20
    for _ in range(17):
        assert budget.can_retry()
        budget.retry_started()
    assert not budget.can_retry()
    budget.retry_finished()
    assert budget.can_retry()


def test_budget_truncates_the_percentage_like_envoy() -> None:
    budget = RetryBudget(budget_percent=20.0, min_retry_concurrency=0)
    for _ in range(24):
        budget.request_started()
    assert budget.limit == 4  # int(4.8)
    zero = RetryBudget(budget_percent=0.0, min_retry_concurrency=0)
    assert not zero.can_retry()


def test_budget_misuse_raises() -> None:
    budget = RetryBudget()
    with pytest.raises(LocalProtocolError):
        budget.request_finished()
    with pytest.raises(LocalProtocolError):
        budget.retry_finished()
    assert (budget.requests, budget.retries) == (0, 0)
    with pytest.raises(LocalProtocolError):
        RetryBudget(budget_percent=120.0)
    with pytest.raises(LocalProtocolError):
        RetryBudget(min_retry_concurrency=-1)


@PROPERTY
@given(
    percent=st.floats(0.0, 100.0),
    minimum=st.integers(0, 5),
    operations=st.lists(st.sampled_from(["start", "finish", "retry", "retry_done"]), max_size=300),
)
def test_budget_never_admits_past_its_bound(
    percent: float, minimum: int, operations: list[str]
) -> None:
    budget = RetryBudget(percent, minimum)
    requests = retries = 0
    for operation in operations:
        if operation == "start":
            budget.request_started()
            requests += 1
        elif operation == "finish" and requests > retries:
            budget.request_finished()
            requests -= 1
        elif operation == "retry" and budget.can_retry():
            # A retry attempt is a request in flight too.
            budget.retry_started()
            budget.request_started()
            retries += 1
            requests += 1
            assert retries <= max(minimum, int(percent / 100 * (requests - 1)))
        elif operation == "retry_done" and retries:
            budget.retry_finished()
            budget.request_finished()
            retries -= 1
            requests -= 1
        assert budget.retries == retries and budget.requests == requests


def test_backoff_is_envoys_fully_jittered_exponential() -> None:
    # Base 25 ms: retry 1 in [0, 25), 2 in [0, 75), 3 in [0, 175), then capped at 250.
    almost_one = 1.0 - 1e-12
    bounds = [backoff(n, fraction=almost_one) for n in range(1, 7)]
    assert bounds == pytest.approx([0.025, 0.075, 0.175, 0.25, 0.25, 0.25])
    assert backoff(1, fraction=0.0) == 0.0
    assert backoff(3, fraction=0.5) == pytest.approx(0.0875)
    assert backoff(2, base=1.0, max_interval=2.0, fraction=0.5) == pytest.approx(1.0)
    assert backoff(10_000, fraction=0.5) == pytest.approx(0.125)  # no overflow


@pytest.mark.parametrize(
    "arguments",
    [
        {"attempt": 0, "fraction": 0.5},
        {"attempt": 1, "fraction": 1.0},
        {"attempt": 1, "fraction": -0.1},
        {"attempt": 1, "fraction": 0.5, "base": 0.0},
        {"attempt": 1, "fraction": 0.5, "base": 1.0, "max_interval": 0.5},
    ],
)
def test_backoff_refuses_bad_arguments(arguments: dict[str, float]) -> None:
    with pytest.raises(LocalProtocolError):
        backoff(**arguments)  # type: ignore[arg-type]


@PROPERTY
@given(
    fraction=st.floats(0.0, 1.0, exclude_max=True),
    base=st.floats(0.001, 1.0),
    factor=st.floats(1.0, 100.0),
)
def test_backoff_grows_with_attempts_and_stays_under_the_cap(
    fraction: float, base: float, factor: float
) -> None:
    cap = base * factor
    waits = [backoff(n, base=base, max_interval=cap, fraction=fraction) for n in range(1, 80)]
    assert all(0.0 <= wait <= cap for wait in waits)
    assert waits == sorted(waits)


# ----------------------------------------------------------------------- outlier detection

HOSTS = [f"10.0.1.{i}:8080" for i in range(1, 11)]


def drain(detector: OutlierDetector[str]) -> list[EndpointEjected[str] | EndpointReturned[str]]:
    events = []
    while (event := detector.next_event()) is not None:
        events.append(event)
    return events


def fail(
    detector: OutlierDetector[str], host: str, now: float, times: int = 5, status: int = 500
) -> None:
    for _ in range(times):
        detector.record(host, status, now)


def test_five_consecutive_5xx_eject_for_the_base_time() -> None:
    detector = OutlierDetector(HOSTS)
    fail(detector, HOSTS[0], 100.0, times=4)
    assert detector.ejected(100.0) == frozenset()
    detector.record(HOSTS[0], 500, 100.0)
    assert detector.ejected(100.0) == {HOSTS[0]}
    assert drain(detector) == [EndpointEjected(HOSTS[0], CONSECUTIVE_5XX, 130.0, 1)]
    assert detector.get_timer() == 130.0
    stats = detector.statistics()
    assert stats.ejections_enforced[CONSECUTIVE_5XX] == 1
    assert stats.ejections_active == 1


def test_a_success_resets_the_counts() -> None:
    detector = OutlierDetector(HOSTS)
    for _ in range(10):
        fail(detector, HOSTS[0], 1.0, times=4)
        detector.record(HOSTS[0], 200, 1.0)
    fail(detector, HOSTS[0], 1.0, times=4)
    detector.record(HOSTS[0], 404, 1.0)  # a 4xx is the upstream working
    fail(detector, HOSTS[0], 1.0, times=4)
    assert not detector.ejected(1.0)


def test_gateway_failures_and_local_origin_failures() -> None:
    detector = OutlierDetector(HOSTS, consecutive_5xx=100, max_ejection_percent=50)
    fail(detector, HOSTS[0], 1.0, times=4, status=503)
    detector.record(HOSTS[0], 500, 1.0)  # a non-gateway 5xx resets the gateway count
    fail(detector, HOSTS[0], 1.0, times=4, status=502)
    assert not detector.ejected(1.0)
    detector.record(HOSTS[0], 504, 1.0)
    assert detector.ejected(1.0) == {HOSTS[0]}
    # Connect failures (503), timeouts (504) and resets (503) are gateway failures.
    for outcome in (CONNECT_FAILED, TIMEOUT, RESET, CONNECT_FAILED, TIMEOUT):
        detector.record(HOSTS[1], outcome, 2.0)
    assert detector.ejected(2.0) == {HOSTS[0], HOSTS[1]}
    reasons = [e.reason for e in drain(detector) if isinstance(e, EndpointEjected)]
    assert reasons == [CONSECUTIVE_GATEWAY_FAILURE] * 2


def test_connect_failures_eject_through_the_5xx_count_too() -> None:
    detector = OutlierDetector(HOSTS, consecutive_gateway_failure=0)
    fail(detector, HOSTS[0], 1.0, status=CONNECT_FAILED)
    assert detector.ejected(1.0) == {HOSTS[0]}
    assert detector.statistics().ejections_enforced == {
        CONSECUTIVE_5XX: 1,
        CONSECUTIVE_GATEWAY_FAILURE: 0,
    }


def test_returns_at_exactly_the_right_time_with_counts_reset() -> None:
    detector = OutlierDetector(HOSTS)
    fail(detector, HOSTS[0], 0.0)
    drain(detector)
    detector.handle_timer(29.999)
    assert detector.ejected(29.999) == {HOSTS[0]}
    assert detector.get_timer() == 30.0
    detector.handle_timer(30.0)
    assert detector.ejected(30.0) == frozenset()
    assert drain(detector) == [EndpointReturned(HOSTS[0])]
    assert detector.get_timer() is None
    # The counts restart from zero: four more failures do not eject, the fifth does.
    fail(detector, HOSTS[0], 31.0, times=4)
    assert not detector.ejected(31.0)
    detector.record(HOSTS[0], 500, 31.0)
    assert detector.ejected(31.0) == {HOSTS[0]}


def test_ejected_runs_due_returns_and_keeps_its_identity_otherwise() -> None:
    detector = OutlierDetector(HOSTS)
    fail(detector, HOSTS[0], 0.0)
    first = detector.ejected(1.0)
    assert detector.ejected(2.0) is first  # unchanged: same object, cheap to pass on
    assert detector.is_ejected(HOSTS[0], 29.0)
    assert not detector.is_ejected(HOSTS[0], 30.0)  # no handle_timer needed


def test_ejection_time_grows_with_each_ejection_up_to_the_maximum() -> None:
    detector = OutlierDetector(HOSTS, base_ejection_time=30.0, max_ejection_time=100.0)
    now = 0.0
    durations = []
    for _ in range(6):
        fail(detector, HOSTS[0], now)
        (event,) = drain(detector)
        assert isinstance(event, EndpointEjected)
        durations.append(event.until - now)
        now = event.until
        detector.handle_timer(now)
        drain(detector)
    assert durations == [30.0, 60.0, 90.0, 100.0, 100.0, 100.0]


def test_the_multiplier_decays_while_the_endpoint_behaves() -> None:
    detector = OutlierDetector(HOSTS, interval=10.0, base_ejection_time=30.0)
    now = 0.0
    for _ in range(3):  # multiplier 3: the third ejection lasts 90 s
        fail(detector, HOSTS[0], now)
        now = detector.get_timer() or now
        detector.handle_timer(now)
    assert now == 30.0 + 60.0 + 90.0
    # Two whole intervals back in service take the multiplier from 3 to 1; the next
    # ejection brings it to 2.
    now += 25.0
    fail(detector, HOSTS[0], now)
    assert detector.get_timer() == now + 60.0


def test_max_ejection_percent_is_envoys_rule() -> None:
    # 10 endpoints, 10 %: one may be out; the second outlier overflows.
    detector = OutlierDetector(HOSTS)
    fail(detector, HOSTS[0], 0.0)
    fail(detector, HOSTS[1], 0.0)
    assert detector.ejected(0.0) == {HOSTS[0]}
    stats = detector.statistics()
    assert stats.ejections_overflow == 1
    assert stats.ejections_detected[CONSECUTIVE_5XX] == 2
    # Envoy resets the count after a refused ejection: the next full run tries again,
    # and succeeds once there is room.
    detector.handle_timer(30.0)
    fail(detector, HOSTS[1], 31.0, times=4)
    assert not detector.ejected(31.0)
    detector.record(HOSTS[1], 500, 31.0)
    assert detector.ejected(31.0) == {HOSTS[1]}


def test_small_clusters_eject_nothing_at_10_percent_unless_asked() -> None:
    three = HOSTS[:3]
    strict = OutlierDetector(three)
    fail(strict, three[0], 0.0)
    assert not strict.ejected(0.0)
    assert strict.statistics().ejections_overflow == 1
    lenient = OutlierDetector(three, always_eject_one_host=True)
    fail(lenient, three[0], 0.0)
    fail(lenient, three[1], 0.0)
    assert lenient.ejected(0.0) == {three[0]}  # one, not two
    half = OutlierDetector(HOSTS[:2], max_ejection_percent=50)
    fail(half, HOSTS[0], 0.0)
    assert half.ejected(0.0) == {HOSTS[0]}


@PROPERTY
@given(
    size=st.integers(1, 25),
    percent=st.integers(0, 100),
    always_one=st.booleans(),
    seed=st.integers(0, 100_000),
)
def test_never_ejects_more_than_allowed(
    size: int, percent: int, always_one: bool, seed: int
) -> None:
    hosts = [f"h{i}" for i in range(size)]
    detector = OutlierDetector(
        hosts,
        max_ejection_percent=percent,
        always_eject_one_host=always_one,
        consecutive_5xx=2,
        consecutive_gateway_failure=2,
        base_ejection_time=5.0,
    )
    allowed = int(percent * size / 100 + 1e-9)
    if always_one:
        allowed = max(allowed, 1)
    rng = random.Random(seed)
    now = 0.0
    for _ in range(400):
        now += rng.random()
        if rng.random() < 0.05 and (timer := detector.get_timer()) is not None:
            now = max(now, timer)
            detector.handle_timer(now)
        detector.record(rng.choice(hosts), rng.choice((200, 500, 503, CONNECT_FAILED)), now)
        assert len(detector.ejected(now)) <= allowed, seed
        assert detector.statistics().ejections_active == len(detector.ejected(now))


def test_removed_endpoints_are_forgotten() -> None:
    detector = OutlierDetector(HOSTS)
    fail(detector, HOSTS[0], 0.0)
    fail(detector, HOSTS[1], 0.0, times=4)
    detector.set_endpoints(HOSTS[1:])
    assert detector.ejected(0.0) == frozenset()
    assert detector.statistics().ejections_active == 0
    assert detector.get_timer() is None  # the stale timer is dropped
    detector.record(HOSTS[0], 500, 1.0)  # results for strangers are ignored
    detector.set_endpoints(HOSTS)  # back, with a clean slate
    fail(detector, HOSTS[0], 2.0, times=4)
    assert not detector.ejected(2.0)
    # The kept endpoint kept its count (4 failures): one more ejects it.
    detector.record(HOSTS[1], 500, 2.0)
    assert detector.ejected(2.0) == {HOSTS[1]}
    assert detector.endpoints == frozenset(HOSTS)


def test_a_zero_threshold_turns_a_detector_off() -> None:
    detector = OutlierDetector(HOSTS, consecutive_5xx=0, consecutive_gateway_failure=0)
    fail(detector, HOSTS[0], 0.0, times=50, status=503)
    assert not detector.ejected(0.0)


def test_jitter_lengthens_ejections_within_its_bound() -> None:
    detector = OutlierDetector(HOSTS, max_ejection_time_jitter=5.0, rng=random.Random(3))
    fail(detector, HOSTS[0], 0.0)
    timer = detector.get_timer()
    assert timer is not None and 30.0 <= timer <= 35.0
    with pytest.raises(LocalProtocolError):
        OutlierDetector(HOSTS, max_ejection_time_jitter=1.0)


@pytest.mark.parametrize(
    "options",
    [
        {"consecutive_5xx": -1},
        {"interval": 0.0},
        {"base_ejection_time": 0.0},
        {"base_ejection_time": 60.0, "max_ejection_time": 30.0},
        {"max_ejection_percent": 101},
        {"max_ejection_time_jitter": -1.0},
    ],
)
def test_outlier_detector_refuses_bad_options(options: dict[str, float]) -> None:
    with pytest.raises(LocalProtocolError):
        OutlierDetector(HOSTS, **options)  # type: ignore[arg-type]


def test_max_ejection_time_defaults_to_300_s_or_the_base() -> None:
    detector = OutlierDetector(HOSTS, base_ejection_time=400.0)
    fail(detector, HOSTS[0], 0.0)
    assert detector.get_timer() == 400.0


def test_unpulled_events_are_bounded() -> None:
    hosts = [f"h{i}" for i in range(10)]
    detector = OutlierDetector(hosts, max_ejection_percent=100, consecutive_5xx=1)
    now = 0.0
    for _ in range(MAX_PENDING_EVENTS):  # an ejection and a return each time
        detector.record("h0", 500, now)
        now = detector.get_timer() or now
        detector.handle_timer(now)
    assert len(drain(detector)) == MAX_PENDING_EVENTS
    assert detector.statistics().ejections_enforced[CONSECUTIVE_5XX] == MAX_PENDING_EVENTS
