"""Health checks: the pure state machine with a hand-stepped clock, the output texts,
then real checks on loopback (aiohttp server, TCP ports, child processes)."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from meshnode.checks import (
    DEFAULT_SCRIPT_TIMEOUT,
    DEFAULT_TIMEOUT,
    OUTPUT_MAX_SIZE,
    CheckError,
    CheckKind,
    CheckResult,
    CheckRunner,
    CheckSpec,
    CheckState,
    CheckStateMachine,
    CheckUpdated,
    HealthStatus,
    NotATTLCheckError,
    ScriptChecksDisabledError,
    TailBuffer,
    UnknownCheckError,
    format_go_duration,
    interpret_http_response,
    script_result,
    script_timeout_result,
    split_host_port,
    tcp_result,
    truncate_ttl_output,
)
from meshnode.errors import MeshError

PASSING = HealthStatus.PASSING
WARNING = HealthStatus.WARNING
CRITICAL = HealthStatus.CRITICAL

#: Longest any I/O test waits for an expected update; they normally take < 0.3 s.
WAIT: float = 5.0


def http_spec(**changes: Any) -> CheckSpec:
    fields: dict[str, Any] = {
        "check_id": "web",
        "kind": CheckKind.HTTP,
        "url": "http://127.0.0.1:1/health",
        "interval": 10.0,
    }
    fields.update(changes)
    return CheckSpec(**fields)


def ttl_spec(**changes: Any) -> CheckSpec:
    fields: dict[str, Any] = {"check_id": "ttl", "kind": CheckKind.TTL, "ttl": 30.0}
    fields.update(changes)
    return CheckSpec(**fields)


def statuses(changes: list[CheckUpdated | None]) -> list[HealthStatus | None]:
    return [None if change is None else change.status for change in changes]


# ============================================================================ the core


class TestThresholds:
    """Consul's StatusHandler, step by step."""

    def test_first_result_applies_at_once_whatever_the_thresholds(self) -> None:
        # NewStatusHandler starts the counters at the thresholds.
        m = CheckStateMachine(http_spec(success_before_passing=3), now=0.0)
        change = m.record(PASSING, "ok", now=1.0)
        assert change == CheckUpdated("web", PASSING, "ok", previous_status=CRITICAL)
        m = CheckStateMachine(http_spec(status=PASSING, failures_before_critical=3), now=0.0)
        assert statuses([m.record(CRITICAL, "down", now=1.0)]) == [CRITICAL]

    def test_success_before_passing(self) -> None:
        m = CheckStateMachine(http_spec(success_before_passing=3), now=0.0)
        m.record(CRITICAL, "down", now=1.0)
        changes = [m.record(PASSING, "ok", now=t) for t in (2.0, 3.0, 4.0, 5.0)]
        assert statuses(changes) == [None, None, PASSING, None]
        assert m.state == CheckState(PASSING, "ok")

    def test_failures_before_critical(self) -> None:
        m = CheckStateMachine(http_spec(failures_before_critical=2), now=0.0)
        m.record(PASSING, "ok", now=1.0)
        changes = [m.record(CRITICAL, f"down {t}", now=t) for t in (2.0, 3.0, 4.0)]
        assert statuses(changes) == [None, CRITICAL, CRITICAL]  # output changed at 4.0
        assert m.output == "down 4.0"

    def test_below_the_threshold_not_even_the_output_changes(self) -> None:
        m = CheckStateMachine(http_spec(failures_before_critical=3), now=0.0)
        m.record(PASSING, "ok", now=1.0)
        assert m.record(CRITICAL, "down", now=2.0) is None
        assert m.state == CheckState(PASSING, "ok")
        assert m.consecutive_failures == 1

    def test_a_success_resets_the_failure_count_and_back(self) -> None:
        m = CheckStateMachine(
            http_spec(success_before_passing=2, failures_before_critical=2), now=0.0
        )
        m.record(PASSING, "ok", now=0.5)
        pattern = [CRITICAL, PASSING, CRITICAL, PASSING, CRITICAL]
        changes = [m.record(s, "x", now=1.0 + i) for i, s in enumerate(pattern)]
        assert statuses(changes) == [None] * 5  # never two in a row
        assert m.status is PASSING and m.output == "ok"

    def test_warning_counts_as_a_success(self) -> None:
        m = CheckStateMachine(
            http_spec(success_before_passing=2, failures_before_critical=2), now=0.0
        )
        m.record(CRITICAL, "down", now=1.0)
        changes = [m.record(WARNING, "busy", now=2.0), m.record(WARNING, "busy", now=3.0)]
        assert statuses(changes) == [None, WARNING]
        # ...and it resets the failure count: one critical is below the threshold.
        assert m.record(CRITICAL, "down", now=4.0) is None

    def test_failures_before_warning(self) -> None:
        m = CheckStateMachine(
            http_spec(failures_before_warning=1, failures_before_critical=3), now=0.0
        )
        m.record(PASSING, "ok", now=1.0)
        changes = [m.record(CRITICAL, "down", now=t) for t in (2.0, 3.0, 4.0)]
        assert statuses(changes) == [WARNING, None, CRITICAL]  # 3.0: same status and output
        assert m.output == "down"

    def test_failures_before_warning_defaults_to_failures_before_critical(self) -> None:
        assert http_spec(failures_before_critical=4).effective_failures_before_warning == 4

    def test_a_repeated_result_is_no_change_but_new_output_is(self) -> None:
        m = CheckStateMachine(http_spec(), now=0.0)
        assert m.record(PASSING, "ok", now=1.0) is not None
        assert m.record(PASSING, "ok", now=2.0) is None
        change = m.record(PASSING, "ok, 3 ms", now=3.0)
        assert change == CheckUpdated("web", PASSING, "ok, 3 ms", previous_status=PASSING)

    def test_bypassing_results_ignore_thresholds(self) -> None:
        m = CheckStateMachine(http_spec(status=PASSING, failures_before_critical=5), now=0.0)
        m.record(PASSING, "ok", now=1.0)
        timed_out = CheckResult(CRITICAL, "Timed out", bypass_thresholds=True)
        assert statuses([m.apply(timed_out, now=2.0)]) == [CRITICAL]
        assert m.apply(CheckResult(PASSING, "ok"), now=3.0) is not None  # counted as usual

    def test_initial_status_and_empty_output(self) -> None:
        assert CheckStateMachine(http_spec(), now=0.0).state == CheckState(CRITICAL, "")
        m = CheckStateMachine(http_spec(status="passing"), now=0.0)
        assert m.state == CheckState(PASSING, "")

    def test_restore_keeps_status_and_output(self) -> None:
        m = CheckStateMachine(http_spec(), now=5.0, restore=CheckState(WARNING, "busy"))
        assert m.state == CheckState(WARNING, "busy")
        assert m.critical_since is None

    def test_invalid_status_is_refused(self) -> None:
        m = CheckStateMachine(http_spec(), now=0.0)
        with pytest.raises(CheckError, match="invalid check status 'maintenance'"):
            m.record("maintenance", "", now=1.0)


class TestDeregisterCriticalServiceAfter:
    def test_clock_starts_at_the_first_critical_update(self) -> None:
        m = CheckStateMachine(http_spec(deregister_critical_service_after=10.0), now=0.0)
        # Registered critical, but Consul's critical time starts at an update.
        assert m.deregister_at() is None and not m.should_deregister(100.0)
        m.record(CRITICAL, "down", now=5.0)
        m.record(CRITICAL, "still down", now=12.0)  # does not move the start
        assert m.critical_since == 5.0
        assert m.deregister_at() == 15.0
        assert not m.should_deregister(15.0)  # CriticalFor() > timeout: strictly more
        assert m.should_deregister(15.001)

    def test_any_non_critical_update_stops_the_clock(self) -> None:
        m = CheckStateMachine(http_spec(deregister_critical_service_after=10.0), now=0.0)
        m.record(CRITICAL, "down", now=1.0)
        m.record(WARNING, "busy", now=2.0)
        assert m.critical_since is None and not m.should_deregister(100.0)
        m.record(CRITICAL, "down", now=50.0)
        assert m.deregister_at() == 60.0

    def test_failures_below_the_threshold_do_not_start_it(self) -> None:
        spec = http_spec(deregister_critical_service_after=10.0, failures_before_critical=3)
        m = CheckStateMachine(spec, now=0.0)
        m.record(PASSING, "ok", now=1.0)
        m.record(CRITICAL, "down", now=2.0)
        m.record(CRITICAL, "down", now=3.0)
        assert m.critical_since is None
        m.record(CRITICAL, "down", now=4.0)
        assert m.critical_since == 4.0

    def test_zero_means_never(self) -> None:
        m = CheckStateMachine(http_spec(), now=0.0)
        m.record(CRITICAL, "down", now=1.0)
        assert m.deregister_at() is None and not m.should_deregister(1e9)

    def test_restored_critical_restarts_the_clock(self) -> None:
        # Consul re-applies the old state with UpdateCheck on a fresh check state.
        spec = http_spec(deregister_critical_service_after=10.0)
        m = CheckStateMachine(spec, now=7.0, restore=CheckState(CRITICAL, "down"))
        assert m.critical_since == 7.0


class TestTTL:
    def test_expires_ttl_after_registration(self) -> None:
        m = CheckStateMachine(ttl_spec(ttl=30.0, status=PASSING), now=100.0)
        assert m.next_deadline() == 130.0
        assert m.handle_timer(129.9) is None
        change = m.handle_timer(130.0)
        assert change == CheckUpdated("ttl", CRITICAL, "TTL expired", previous_status=PASSING)
        assert m.next_deadline() is None  # not re-armed until the next update
        assert m.handle_timer(1000.0) is None

    def test_updates_restart_the_ttl_and_expiry_quotes_the_last_output(self) -> None:
        m = CheckStateMachine(ttl_spec(ttl=30.0), now=0.0)
        assert statuses([m.ttl_update(PASSING, "all good", now=10.0)]) == [PASSING]
        assert m.next_deadline() == 40.0
        assert statuses([m.ttl_update("warning", "slow", now=20.0)]) == [WARNING]
        assert m.handle_timer(40.0) is None  # the update at 20 moved it to 50
        change = m.handle_timer(50.0)
        assert change is not None
        assert change.output == "TTL expired (last output before timeout follows): slow"

    def test_thresholds_do_not_apply_to_ttl_updates(self) -> None:
        m = CheckStateMachine(
            ttl_spec(success_before_passing=5, failures_before_critical=5), now=0.0
        )
        m.ttl_update(PASSING, "", now=1.0)
        assert m.ttl_update(PASSING, "", now=2.0) is None  # no change, no threshold
        assert statuses([m.ttl_update(CRITICAL, "boom", now=3.0)]) == [CRITICAL]
        assert statuses([m.ttl_update(PASSING, "", now=4.0)]) == [PASSING]

    def test_ttl_expiry_starts_the_critical_clock(self) -> None:
        spec = ttl_spec(ttl=30.0, deregister_critical_service_after=60.0)
        m = CheckStateMachine(spec, now=0.0)
        m.handle_timer(30.0)
        assert m.deregister_at() == 90.0

    def test_long_output_is_cut_like_consul(self) -> None:
        m = CheckStateMachine(ttl_spec(), now=0.0)
        change = m.ttl_update(PASSING, "x" * 5000, now=1.0)
        assert change is not None
        assert change.output == "x" * 4096 + " ... (captured 4096 of 5000 bytes)"

    def test_only_ttl_checks_take_updates(self) -> None:
        m = CheckStateMachine(http_spec(), now=0.0)
        with pytest.raises(NotATTLCheckError, match="does not have associated TTL"):
            m.ttl_update(PASSING, "", now=1.0)
        assert CheckStateMachine(http_spec(), now=0.0).next_deadline() is None

    def test_invalid_status(self) -> None:
        m = CheckStateMachine(ttl_spec(), now=0.0)
        with pytest.raises(CheckError):
            m.ttl_update("ok", "", now=1.0)


# ---------------------------------------------------------------------------- outputs


@pytest.mark.parametrize(
    ("code", "status"),
    [(200, PASSING), (204, PASSING), (299, PASSING), (300, CRITICAL), (301, CRITICAL),
     (404, CRITICAL), (429, WARNING), (500, CRITICAL), (503, CRITICAL), (199, CRITICAL)],
)  # fmt: skip
def test_http_status_codes(code: int, status: HealthStatus) -> None:
    assert interpret_http_response("GET", "http://x/", code, "R", b"").status is status


def test_http_output_text() -> None:
    result = interpret_http_response("GET", "http://127.0.0.1:8080/h", 200, "OK", b"hello")
    assert result.output == "HTTP GET http://127.0.0.1:8080/h: 200 OK Output: hello"
    result = interpret_http_response("POST", "http://a/", 503, "", b"x" * 5000 + b"\xff")
    assert result.output == "HTTP POST http://a/: 503 Output: " + "x" * OUTPUT_MAX_SIZE


def test_tcp_outputs() -> None:
    assert tcp_result("db:5432", None) == CheckResult(PASSING, "TCP connect db:5432: Success")
    assert tcp_result("db:5432", "connection refused").output == (
        "dial tcp db:5432: connection refused"
    )


def test_script_outputs() -> None:
    buffer = TailBuffer()
    buffer.write(b"line one\n")
    assert script_result(0, buffer) == CheckResult(PASSING, "line one\n")
    assert script_result(1, buffer).status is WARNING
    assert script_result(2, buffer).status is CRITICAL
    assert script_result(-9, buffer).status is CRITICAL  # killed by a signal
    timed_out = script_timeout_result(30.0, buffer)
    assert timed_out == CheckResult(
        CRITICAL, "Timed out (30s) running check\n\nline one\n", bypass_thresholds=True
    )
    assert script_timeout_result(0.5, TailBuffer()).output == "Timed out (500ms) running check"


def test_tail_buffer_keeps_the_end_and_counts_everything() -> None:
    buffer = TailBuffer(limit=4)
    for chunk in (b"ab", b"cdef", b"", b"g"):
        buffer.write(chunk)
    assert buffer.data == b"defg" and buffer.total_written == 7
    big = TailBuffer()
    big.write(b"a" * 10_000)
    assert script_result(0, big).output == ("Captured 4096 of 10000 bytes\n...\n" + "a" * 4096)


def test_truncate_ttl_output_counts_bytes() -> None:
    assert truncate_ttl_output("short") == "short"
    text = "é" * 3000  # 6000 bytes; the cut must not split a character
    assert truncate_ttl_output(text) == "é" * 2048 + " ... (captured 4096 of 6000 bytes)"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (10, "10s"), (1.5, "1.5s"), (0.2, "200ms"), (0.0015, "1.5ms"),
     (90, "1m30s"), (3600, "1h0m0s"), (60, "1m0s"), (2e-6, "2µs"), (5e-9, "5ns")],
)  # fmt: skip
def test_format_go_duration(seconds: float, text: str) -> None:
    assert format_go_duration(seconds) == text


@pytest.mark.parametrize(
    ("target", "expected"),
    [("127.0.0.1:80", ("127.0.0.1", 80)), ("db.local:5432", ("db.local", 5432)),
     ("[::1]:8080", ("::1", 8080))],
)  # fmt: skip
def test_split_host_port(target: str, expected: tuple[str, int]) -> None:
    assert split_host_port(target) == expected


@pytest.mark.parametrize("target", ["", "host", "host:", ":80", "::1:80", "h:0", "h:70000"])
def test_split_host_port_refuses(target: str) -> None:
    with pytest.raises(CheckError, match="host:port"):
        split_host_port(target)


# ---------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "http", "url": "http://x/", "interval": 0}, "Interval must be > 0"),
        ({"kind": "http", "url": "ftp://x/", "interval": 1}, "http\\(s\\) URL"),
        ({"kind": "tcp", "tcp": "nope", "interval": 1}, "host:port"),
        ({"kind": "script", "interval": 1}, "Args must name a command"),
        ({"kind": "ttl"}, "TTL must be > 0"),
        ({"kind": "ttl", "ttl": 5, "interval": 1}, "cannot both be specified"),
        ({"kind": "tcp", "tcp": "h:1", "interval": 1, "ttl": 5}, "cannot both be specified"),
        ({"kind": "grpc", "interval": 1}, "unknown check kind"),
        ({"kind": "ttl", "ttl": 5, "timeout": 0}, "Timeout must be > 0"),
        ({"kind": "ttl", "ttl": 5, "failures_before_critical": -1}, "thresholds"),
        ({"kind": "ttl", "ttl": 5, "status": "maintenance"}, "invalid check status"),
        ({"kind": "ttl", "ttl": 5, "check_id": ""}, "check_id"),
        ({"kind": "ttl", "ttl": float("inf")}, "finite"),
    ],
)
def test_spec_validation(fields: dict[str, Any], message: str) -> None:
    fields = {"check_id": "c", **fields}
    with pytest.raises(CheckError, match=message):
        CheckSpec(**fields)


def test_spec_defaults() -> None:
    assert http_spec().effective_timeout == DEFAULT_TIMEOUT == 10.0
    script = CheckSpec("s", CheckKind.SCRIPT, interval=1.0, args=["true"])
    assert script.effective_timeout == DEFAULT_SCRIPT_TIMEOUT == 30.0
    assert http_spec(timeout=2.0).effective_timeout == 2.0
    assert http_spec(headers={"X": ["a", "b"]}).headers == {"X": ("a", "b")}
    assert http_spec().status is CRITICAL and http_spec().method == "GET"
    assert hash(http_spec(headers={"X": ["a"]})) == hash(http_spec())  # headers not hashed


@dataclass(frozen=True)
class _Definition:
    """Shaped like meshnode.model.CheckDefinition (durations in seconds)."""

    check_id: str = "api"
    kind: str = "http"
    status: str = "critical"
    interval: float | None = 0.1
    timeout: float | None = None
    http: str | None = "http://127.0.0.1/h"
    method: str = ""
    header: dict[str, tuple[str, ...]] = field(default_factory=dict)
    body: str = ""
    tcp: str | None = None
    ttl: float | None = None
    args: tuple[str, ...] = ()
    tls_skip_verify: bool = False
    tls_server_name: str = ""
    deregister_critical_service_after: float | None = None
    success_before_passing: int = 0
    failures_before_critical: int = 0


def test_from_fields_applies_consul_defaults_and_minimums() -> None:
    spec = CheckSpec.from_fields(_Definition(deregister_critical_service_after=5.0))
    assert spec.kind is CheckKind.HTTP and spec.url == "http://127.0.0.1/h"
    assert spec.interval == 1.0  # checks.MinInterval
    assert spec.deregister_critical_service_after == 60.0  # check_deregister_interval_min
    assert spec.method == "GET" and spec.timeout is None
    ttl = CheckSpec.from_fields(_Definition(kind="ttl", http=None, interval=None, ttl=15.0))
    assert (ttl.kind, ttl.ttl, ttl.interval) == (CheckKind.TTL, 15.0, 0.0)
    relaxed = CheckSpec.from_fields(_Definition(), min_interval=0.05)
    assert relaxed.interval == 0.1 and relaxed.deregister_critical_service_after == 0.0
    with pytest.raises(CheckError, match="Interval must be > 0"):
        CheckSpec.from_fields(_Definition(interval=None))
    with pytest.raises(CheckError, match="unknown check kind"):
        CheckSpec.from_fields(_Definition(kind="grpc"))


# ============================================================================ real I/O


class Recorder:
    """The ``on_update`` callback of a runner, with bounded waits."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, HealthStatus, str]] = []
        self._changed = asyncio.Event()
        self._cursor: dict[str, int] = {}

    def __call__(self, check_id: str, status: HealthStatus, output: str) -> None:
        self.updates.append((check_id, status, output))
        self._changed.set()

    def statuses(self, check_id: str) -> list[HealthStatus]:
        return [status for c, status, _ in self.updates if c == check_id]

    async def wait_for(
        self, predicate: Callable[[tuple[str, HealthStatus, str]], bool]
    ) -> tuple[str, HealthStatus, str]:
        """The first update (past or future) matching ``predicate``."""
        async with asyncio.timeout(WAIT):
            seen = 0
            while True:
                for update in self.updates[seen:]:
                    if predicate(update):
                        return update
                seen = len(self.updates)
                self._changed.clear()
                await self._changed.wait()

    async def wait_status(self, check_id: str, status: HealthStatus) -> str:
        """The output of the next update of ``check_id`` to ``status``, past or future,
        that no earlier ``wait_status`` call returned (a cursor per check)."""
        async with asyncio.timeout(WAIT):
            while True:
                start = self._cursor.get(check_id, 0)
                for index in range(start, len(self.updates)):
                    update = self.updates[index]
                    if update[0] == check_id and update[1] is status:
                        self._cursor[check_id] = index + 1
                        return update[2]
                self._changed.clear()
                await self._changed.wait()


class FixedStagger(random.Random):
    """Every first run at the same fraction of the interval (0: at once)."""

    def __init__(self, fraction: float = 0.0) -> None:
        super().__init__(0)
        self.fraction = fraction

    def random(self) -> float:
        return self.fraction


@pytest.fixture
async def runner() -> AsyncIterator[tuple[CheckRunner, Recorder]]:
    recorder = Recorder()
    async with CheckRunner(recorder, enable_script_checks=True, rng=FixedStagger()) as r:
        yield r, recorder


async def test_first_run_is_staggered_with_the_injected_rng() -> None:
    recorder = Recorder()
    async with CheckRunner(recorder, rng=FixedStagger(0.5)) as checks:
        started = asyncio.get_running_loop().time()
        checks.add(CheckSpec("t", CheckKind.TCP, interval=0.4, tcp=f"127.0.0.1:{closed_port()}"))
        await recorder.wait_status("t", CRITICAL)
        assert asyncio.get_running_loop().time() - started >= 0.19


async def test_an_error_in_the_body_propagates_unwrapped() -> None:
    with pytest.raises(LookupError):
        async with CheckRunner(Recorder()) as checks:
            checks.add(ttl_spec())
            raise LookupError("body")


@dataclass
class HealthServer:
    base: str
    code: int = 200
    requests: list[tuple[str, dict[str, list[str]], bytes]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    state = HealthServer(base="")

    async def health(request: web.Request) -> web.Response:
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            headers.setdefault(name, []).append(value)
        state.requests.append((request.method, headers, await request.read()))
        return web.Response(status=state.code, text=f"code {state.code}")

    async def slow(request: web.Request) -> web.Response:
        await state.release.wait()
        return web.Response(text="late")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"b" * 10_000)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/health")

    app = web.Application()
    app.router.add_route("*", "/health", health)
    app.router.add_get("/slow", slow)
    app.router.add_get("/big", big)
    app.router.add_get("/redirect", redirect)
    app_runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await app_runner.setup()
    site = web.TCPSite(app_runner, "127.0.0.1", 0)
    await site.start()
    host, port = app_runner.addresses[0][:2]
    state.base = f"http://{host}:{port}"
    try:
        yield state
    finally:
        state.release.set()
        await app_runner.cleanup()


FAST = 0.05  # interval of the I/O tests, seconds


async def test_http_check_follows_the_status_code(
    runner: tuple[CheckRunner, Recorder], server: HealthServer
) -> None:
    checks, seen = runner
    url = f"{server.base}/health"
    checks.add(http_spec(url=url, interval=FAST))
    output = await seen.wait_status("web", PASSING)
    assert output == f"HTTP GET {url}: 200 OK Output: code 200"
    for code, status, reason in [
        (500, CRITICAL, "Internal Server Error"),
        (429, WARNING, "Too Many Requests"),
        (200, PASSING, "OK"),
    ]:
        server.code = code
        output = await seen.wait_status("web", status)
        assert output == f"HTTP GET {url}: {code} {reason} Output: code {code}"
    # on_update fires on changes only: one update per flip, however many runs.
    assert seen.statuses("web") == [PASSING, CRITICAL, WARNING, PASSING]
    assert checks.statuses() == {"web": CheckState(PASSING, output)}


async def test_http_check_sends_consul_headers_method_and_body(
    runner: tuple[CheckRunner, Recorder], server: HealthServer
) -> None:
    checks, seen = runner
    spec = http_spec(
        url=f"{server.base}/health",
        interval=FAST,
        method="POST",
        body='{"deep": true}',
        headers={
            "X-Probe": ["one", "two"],
            "Accept": ["application/json"],
            "Host": ["svc.internal"],
        },
    )
    checks.add(spec)
    output = await seen.wait_status("web", PASSING)
    assert output.startswith(f"HTTP POST {server.base}/health: 200 OK")
    method, headers, body = server.requests[0]
    assert (method, body) == ("POST", b'{"deep": true}')
    assert headers["User-Agent"] == ["Consul Health Check"]
    assert headers["Accept"] == ["application/json"]  # the check's own wins
    assert headers["X-Probe"] == ["one", "two"]
    assert headers["Host"] == ["svc.internal"]  # Consul: a Host header sets req.Host


async def test_http_check_times_out(
    runner: tuple[CheckRunner, Recorder], server: HealthServer
) -> None:
    checks, seen = runner
    url = f"{server.base}/slow"
    checks.add(http_spec(url=url, interval=FAST, timeout=0.2, status=PASSING))
    started = asyncio.get_running_loop().time()
    output = await seen.wait_status("web", CRITICAL)
    assert output == f'Get "{url}": timed out after 200ms'
    assert asyncio.get_running_loop().time() - started < 0.2 + FAST + 1.0


async def test_http_redirects_are_followed_unless_disabled(
    runner: tuple[CheckRunner, Recorder], server: HealthServer
) -> None:
    checks, seen = runner
    url = f"{server.base}/redirect"
    checks.add(http_spec(check_id="follow", url=url, interval=FAST))
    checks.add(http_spec(check_id="stop", url=url, interval=FAST, disable_redirects=True))
    # Consul reports the URL it was given, with the final response.
    assert await seen.wait_status("follow", PASSING) == (f"HTTP GET {url}: 200 OK Output: code 200")
    _, status, output = await seen.wait_for(lambda u: u[0] == "stop")
    assert status is CRITICAL and output.startswith(f"HTTP GET {url}: 302 Found Output:")


async def test_http_output_keeps_at_most_4_kib_of_body(
    runner: tuple[CheckRunner, Recorder], server: HealthServer
) -> None:
    checks, seen = runner
    url = f"{server.base}/big"
    checks.add(http_spec(url=url, interval=FAST))
    output = await seen.wait_status("web", PASSING)
    assert output == f"HTTP GET {url}: 200 OK Output: " + "b" * OUTPUT_MAX_SIZE


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_http_connection_refused(runner: tuple[CheckRunner, Recorder]) -> None:
    checks, seen = runner
    url = f"http://127.0.0.1:{closed_port()}/health"
    checks.add(http_spec(url=url, interval=FAST, status=PASSING))
    output = await seen.wait_status("web", CRITICAL)
    assert output.startswith(f'Get "{url}": Cannot connect to host')


async def test_tcp_check_listening_and_closed_ports(runner: tuple[CheckRunner, Recorder]) -> None:
    checks, seen = runner
    accepted = 0

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    listener = await asyncio.start_server(accept, "127.0.0.1", 0)
    async with listener:
        open_target = f"127.0.0.1:{listener.sockets[0].getsockname()[1]}"
        closed_target = f"127.0.0.1:{closed_port()}"
        checks.add(CheckSpec("open", CheckKind.TCP, interval=FAST, tcp=open_target))
        checks.add(
            CheckSpec("closed", CheckKind.TCP, interval=FAST, tcp=closed_target, status=PASSING)
        )
        assert await seen.wait_status("open", PASSING) == f"TCP connect {open_target}: Success"
        assert await seen.wait_status("closed", CRITICAL) == (
            f"dial tcp {closed_target}: connection refused"
        )
        assert accepted >= 1


def script(check_id: str, shell: str, **changes: Any) -> CheckSpec:
    fields: dict[str, Any] = {"interval": FAST, "args": ["/bin/sh", "-c", shell]}
    fields.update(changes)
    return CheckSpec(check_id, CheckKind.SCRIPT, **fields)


async def test_script_exit_codes(runner: tuple[CheckRunner, Recorder]) -> None:
    checks, seen = runner
    checks.add(script("zero", "echo fine"))
    checks.add(script("one", "echo out; echo err >&2; exit 1"))
    checks.add(script("two", "echo broken; exit 2", status=PASSING))
    assert await seen.wait_status("zero", PASSING) == "fine\n"
    assert await seen.wait_status("one", WARNING) == "out\nerr\n"  # stdout and stderr
    assert await seen.wait_status("two", CRITICAL) == "broken\n"


async def test_script_output_keeps_the_last_4_kib(runner: tuple[CheckRunner, Recorder]) -> None:
    checks, seen = runner
    checks.add(script("big", "yes a | head -c 10000"))
    output = await seen.wait_status("big", PASSING)
    assert output == "Captured 4096 of 10000 bytes\n...\n" + "a\n" * 2048


def is_gone(pid: int) -> bool:
    """No such process, or a zombie its (new) parent has yet to reap."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (process state has no event to wait on), for at most WAIT."""
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def pids_in(path: Path) -> list[int]:
    """The two PIDs the test scripts write (atomically, with mv), or [] before that."""
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


async def read_pids(path: Path) -> list[int]:
    await wait_until(lambda: len(pids_in(path)) == 2)
    return pids_in(path)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
async def test_script_timeout_kills_the_script_and_what_it_started(
    runner: tuple[CheckRunner, Recorder], tmp_path: Path
) -> None:
    checks, seen = runner
    pids = tmp_path / "pids"
    # The shell starts a grandchild, records both PIDs, says something, then waits.
    shell = f"sleep 30 & echo $$ $! > {pids}.tmp; mv {pids}.tmp {pids}; echo started; wait"
    checks.add(script("hang", shell, timeout=0.3, interval=10.0, status=PASSING))
    output = await seen.wait_status("hang", CRITICAL)
    assert output == "Timed out (300ms) running check\n\nstarted\n"
    child, grandchild = await read_pids(pids)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # killed *and reaped* before the result was reported
    await wait_until(lambda: is_gone(grandchild))  # killed; init reaps it


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
async def test_closing_the_runner_kills_a_running_script(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    shell = f"sleep 30 & echo $$ $! > {pids}.tmp; mv {pids}.tmp {pids}; wait"
    recorder = Recorder()
    async with CheckRunner(recorder, enable_script_checks=True, rng=FixedStagger()) as checks:
        checks.add(script("hang", shell, interval=0.01))
        child, grandchild = await read_pids(pids)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    await wait_until(lambda: is_gone(grandchild))
    assert recorder.updates == []


async def test_script_that_cannot_start_is_critical(runner: tuple[CheckRunner, Recorder]) -> None:
    checks, seen = runner
    spec = CheckSpec(
        "missing",
        CheckKind.SCRIPT,
        interval=FAST,
        args=["/nonexistent/check"],
        status=PASSING,
        failures_before_critical=100,  # bypassed, as in Consul
    )
    checks.add(spec)
    assert "No such file or directory" in await seen.wait_status("missing", CRITICAL)


async def test_script_checks_are_refused_when_disabled() -> None:
    recorder = Recorder()
    async with CheckRunner(recorder) as checks:
        checks.add(ttl_spec())
        with pytest.raises(ScriptChecksDisabledError, match="enable_script_checks"):
            checks.add(script("s", "true"))
        with pytest.raises(ScriptChecksDisabledError):
            checks.replace_all([http_spec(), script("s", "true")])
        assert set(checks.statuses()) == {"ttl"}  # nothing changed


async def test_ttl_updates_and_expiry(runner: tuple[CheckRunner, Recorder]) -> None:
    checks, seen = runner
    checks.add(ttl_spec(ttl=0.2))
    checks.ttl_update("ttl", "passing", "up")
    checks.ttl_update("ttl", WARNING, "slow")
    checks.ttl_update("ttl", CRITICAL, "down")
    checks.ttl_update("ttl", PASSING, "up again")
    assert seen.updates == [
        ("ttl", PASSING, "up"),
        ("ttl", WARNING, "slow"),
        ("ttl", CRITICAL, "down"),
        ("ttl", PASSING, "up again"),
    ]
    started = asyncio.get_running_loop().time()
    _, status, output = await seen.wait_for(lambda u: u[2].startswith("TTL expired"))
    assert (status, output) == (
        CRITICAL,
        "TTL expired (last output before timeout follows): up again",
    )
    assert asyncio.get_running_loop().time() - started >= 0.15
    assert checks.statuses()["ttl"] == CheckState(CRITICAL, output)


async def test_ttl_update_errors(runner: tuple[CheckRunner, Recorder]) -> None:
    checks, _ = runner
    checks.add(http_spec())
    with pytest.raises(UnknownCheckError) as error:
        checks.ttl_update("nope", PASSING)
    assert isinstance(error.value, KeyError) and str(error.value) == "unknown check 'nope'"
    with pytest.raises(NotATTLCheckError):
        checks.ttl_update("web", PASSING)
    checks.add(ttl_spec())
    with pytest.raises(CheckError, match="invalid check status"):
        checks.ttl_update("ttl", "bogus")


async def test_remove_and_replace_all(runner: tuple[CheckRunner, Recorder]) -> None:
    checks, seen = runner
    checks.add(ttl_spec(check_id="keep"))
    checks.add(ttl_spec(check_id="change"))
    checks.add(ttl_spec(check_id="drop"))
    for check_id in ("keep", "change", "drop"):
        checks.ttl_update(check_id, PASSING, f"{check_id} ok")
    kept_spec = checks.spec("keep")

    checks.replace_all([ttl_spec(check_id="keep"), ttl_spec(check_id="change", ttl=60.0),
                        ttl_spec(check_id="new")])  # fmt: skip
    assert checks.statuses() == {
        "keep": CheckState(PASSING, "keep ok"),
        "change": CheckState(PASSING, "change ok"),  # restarted, state kept
        "new": CheckState(CRITICAL, ""),
    }
    assert checks.spec("keep") is kept_spec and checks.spec("change").ttl == 60.0
    with pytest.raises(CheckError, match="duplicate"):
        checks.replace_all([ttl_spec(), ttl_spec()])

    checks.remove("new")
    assert set(checks.statuses()) == {"keep", "change"}
    with pytest.raises(UnknownCheckError):
        checks.remove("new")
    assert len(seen.updates) == 3  # replace_all and remove report nothing


async def test_removed_check_stops_reporting(
    runner: tuple[CheckRunner, Recorder], server: HealthServer
) -> None:
    checks, seen = runner
    checks.add(http_spec(url=f"{server.base}/health", interval=FAST))
    await seen.wait_status("web", PASSING)
    checks.remove("web")
    server.code = 500
    count = len(server.requests)
    await asyncio.sleep(4 * FAST)
    assert seen.statuses("web") == [PASSING]
    assert len(server.requests) <= count + 1  # at most one request already in flight


async def test_deregister_due(runner: tuple[CheckRunner, Recorder]) -> None:
    checks, seen = runner
    checks.add(ttl_spec(ttl=0.05, deregister_critical_service_after=0.1))
    checks.add(ttl_spec(check_id="other", ttl=60.0, deregister_critical_service_after=0.1))
    await seen.wait_status("ttl", CRITICAL)
    assert checks.deregister_due() == []
    await wait_until(lambda: checks.deregister_due() == ["ttl"])


async def test_a_failing_callback_does_not_stop_checks() -> None:
    calls: list[str] = []

    def on_update(check_id: str, status: HealthStatus, output: str) -> None:
        calls.append(output)
        raise RuntimeError("agent bug")

    async with CheckRunner(on_update) as checks:
        checks.add(ttl_spec())
        checks.ttl_update("ttl", PASSING, "one")
        checks.ttl_update("ttl", PASSING, "two")
    assert calls == ["one", "two"]


async def test_runner_must_be_started() -> None:
    checks = CheckRunner(lambda *_: None)
    with pytest.raises(RuntimeError, match="not running"):
        checks.add(ttl_spec())
    await checks.aclose()


def test_errors_are_mesh_errors_and_value_errors() -> None:
    assert issubclass(CheckError, MeshError) and issubclass(CheckError, ValueError)
