"""Health checks run by the owning agent: HTTP, TCP, TTL and script checks.

Theory of operation
-------------------
The module has two halves, as the rest of the codebase (DESIGN.md principle 1):

* **The core** (everything above the "asyncio adapter" rule) decides. It never touches a
  socket, a clock or a random generator: every entry point takes ``now`` (monotonic
  seconds). ``CheckSpec`` is what to run; ``CheckStateMachine`` turns *raw* results
  into the check's *effective* status with Consul's threshold rules, keeps the TTL
  deadline (one timer: ``next_deadline()`` / ``handle_timer(now)``, as aioquic), and
  knows how long the check has been critical for ``DeregisterCriticalServiceAfter``.
  Pure helpers interpret what the I/O produced: ``interpret_http_response``,
  ``script_result``, ``TailBuffer`` and friends, so the exact output texts are tested
  without I/O.
* **The adapter** ``CheckRunner`` only does I/O: one task per interval check (HTTP via
  the agent's single aiohttp ``ClientSession``, TCP via ``asyncio.open_connection``,
  scripts via ``loop.subprocess_exec``), one ``loop.call_at`` handle per TTL check, and
  it calls ``on_update`` whenever a core reports a change.

Consul semantics, and where they come from
------------------------------------------
Docs: "Define health checks" and the check API (``agent/check.mdx``) on
developer.hashicorp.com; behaviour read from Consul's source, which the docs
summarise: ``agent/checks/check.go`` (``StatusHandler``, ``CheckHTTP``, ``CheckTCP``,
``CheckMonitor``, ``CheckTTL``), ``agent/local/state.go`` (``UpdateCheck``, critical
time) and ``agent/agent.go`` (``addCheckLocked``, ``reapServicesInternal``).

* A check starts with its registered ``Status`` (critical unless told otherwise) and
  an empty output.
* Thresholds (``StatusHandler``): passing *and warning* results count as successes,
  critical results as failures; each kind resets the other's counter. A success is
  applied once ``SuccessBeforePassing`` consecutive successes were seen; a failure
  becomes critical after ``FailuresBeforeCritical`` consecutive failures, or warning
  after ``FailuresBeforeWarning`` (defaults to ``FailuresBeforeCritical``). Below the
  threshold *nothing* changes, not even the output. Both counters start *at* their
  thresholds ("in order to immediately update status after first check"), so the first
  result of a fresh check always applies.
* Some results bypass the thresholds in Consul and here too: a script that times out
  or cannot be started, and every TTL update and TTL expiry.
* An update that repeats the current status and output changes nothing
  (``UpdateCheck``: "Do nothing if update is idempotent") and ``on_update`` is not
  called.
* The critical clock for ``DeregisterCriticalServiceAfter`` starts when a critical
  *update* is applied (not at registration with an initial critical status) and stops
  at any non-critical update; the service is due for deregistration once it has been
  critical for *more than* the timeout (``CriticalFor() > timeout``).
* TTL checks: the deadline is ``TTL`` after registration and after every update;
  expiry sets critical with ``TTL expired`` (plus the last output, if any) and is not
  re-armed until the next update.
* Re-adding a check with the same ID keeps its status and output (Consul's
  "snapshot the current state of the health check to avoid potential flapping"), with
  fresh counters and a fresh TTL deadline.

Deliberate differences from Consul are marked "meshnode:" where they occur.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import os
import random
import re
import signal
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import aiohttp
import structlog

from meshnode.errors import MeshError
from meshnode.model import format_duration

log = structlog.get_logger()

# ============================================================================ core

#: Consul's default timeout for HTTP and TCP checks (check.go: ``Timeout: 10 *
#: time.Second`` unless ``Timeout > 0``).
DEFAULT_TIMEOUT: Final = 10.0
#: Consul's default timeout for script checks (check.go ``CheckMonitor``: ``timeout :=
#: 30 * time.Second``), longer because scripts may fork and load a runtime.
DEFAULT_SCRIPT_TIMEOUT: Final = 30.0
#: Consul's smallest interval (``checks.MinInterval``: "Otherwise we risk fork bombing a
#: system"); ``CheckSpec.from_fields`` raises shorter intervals to it.
MIN_INTERVAL: Final = 1.0
#: Consul's smallest ``DeregisterCriticalServiceAfter`` (agent config
#: ``check_deregister_interval_min``, 1 minute); ``from_fields`` raises shorter ones to it.
MIN_DEREGISTER_CRITICAL_SERVICE_AFTER: Final = 60.0
#: Most bytes of output kept from one check run (``checks.DefaultBufSize``, 4 KiB). It
#: bounds memory per check and what every catalog broadcast carries.
OUTPUT_MAX_SIZE: Final = 4 * 1024
#: Sent unless the check sets its own (check.go ``UserAgent``); some services filter
#: their access logs on it, so we keep Consul's value.
HTTP_USER_AGENT: Final = "Consul Health Check"
#: Sent unless the check sets its own (check.go).
HTTP_ACCEPT: Final = "text/plain, text/*, */*"
#: Redirects followed by an HTTP check: Go's ``http.Client`` default, which Consul uses
#: unless ``DisableRedirects``.
HTTP_MAX_REDIRECTS: Final = 10
#: How long a killed script's process may take to be reaped before we stop waiting
#: (SIGKILL cannot be caught, so this only matters for a process stuck in the kernel).
KILL_GRACE: Final = 5.0
#: Bytes read from a script's pipe at once.
_READ_CHUNK: Final = 64 * 1024


class CheckError(MeshError, ValueError):
    """A check definition or request is wrong; nothing was changed.

    Also a ``ValueError`` so an API layer can answer 400 with ``str(error)``.
    """


class UnknownCheckError(CheckError, KeyError):
    """No check with this ID is registered with the runner (also a ``KeyError``)."""

    def __init__(self, check_id: str) -> None:
        super().__init__(f"unknown check {check_id!r}")
        self.check_id = check_id

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class NotATTLCheckError(CheckError):
    """A TTL update was sent to a check that is not a TTL check."""

    def __init__(self, check_id: str) -> None:
        # Consul's text (agent.updateTTLCheck): "CheckID %q does not have associated TTL".
        super().__init__(f"CheckID {check_id!r} does not have associated TTL")
        self.check_id = check_id


class ScriptChecksDisabledError(CheckError):
    """A script check was added while ``enable_script_checks`` is off."""

    def __init__(self, check_id: str) -> None:
        # Consul's text (agent.addCheck), with the check named.
        super().__init__(
            f"check {check_id!r}: Scripts are disabled on this agent; to enable, "
            "configure 'enable_script_checks' to true"
        )
        self.check_id = check_id


class HealthStatus(enum.StrEnum):
    """A check's status (Consul's ``api.HealthPassing``...); equal to the plain strings."""

    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"


class CheckKind(enum.StrEnum):
    """The check types the agent runs."""

    HTTP = "http"
    TCP = "tcp"
    TTL = "ttl"
    SCRIPT = "script"


def _status(value: object) -> HealthStatus:
    try:
        return HealthStatus(str(value))
    except ValueError:
        raise CheckError(f"invalid check status {value!r}; passing, warning or critical") from None


# ---------------------------------------------------------------------------- durations


# Go's time.Duration.String(), as Consul puts it in outputs ("Timed out (10s) running
# check"); one implementation, shared with the API's output shapes.
format_go_duration = format_duration


# ---------------------------------------------------------------------------- the spec


class CheckFields(Protocol):
    """What ``CheckSpec.from_fields`` reads: a Consul-shaped check definition with
    durations in seconds (``None``: not set), such as ``meshnode.model.CheckDefinition``.
    Read-only members, so frozen dataclasses match."""

    @property
    def check_id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def interval(self) -> float | None: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def http(self) -> str | None: ...
    @property
    def method(self) -> str: ...
    @property
    def header(self) -> Mapping[str, Sequence[str]]: ...
    @property
    def body(self) -> str: ...
    @property
    def tcp(self) -> str | None: ...
    @property
    def ttl(self) -> float | None: ...
    @property
    def args(self) -> Sequence[str]: ...
    @property
    def tls_skip_verify(self) -> bool: ...
    @property
    def tls_server_name(self) -> str: ...
    @property
    def deregister_critical_service_after(self) -> float | None: ...
    @property
    def success_before_passing(self) -> int: ...
    @property
    def failures_before_critical(self) -> int: ...


_TCP_TARGET = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})$")


def split_host_port(target: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` (Go's ``net.SplitHostPort``, numeric ports only).

    Raises:
        CheckError: not of that form, or the port is out of range.
    """
    match = _TCP_TARGET.match(target)
    if match is None or not 0 < int(match["port"]) <= 65535:
        raise CheckError(f"TCP target must be host:port or [ipv6]:port, got {target!r}")
    return match["v6"] or match["host"], int(match["port"])


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """What one check runs and how its results count. Times are seconds.

    Fields are Consul's check definition fields in snake case (``HTTP`` is ``url``,
    ``Header`` is ``headers``, ``Args`` is ``args``). The constructor validates but does
    not apply Consul's minimums (tests run 50 ms intervals); ``from_fields`` does.

    Raises:
        CheckError: a field is missing or out of range for this kind of check.
    """

    check_id: str
    kind: CheckKind
    interval: float = 0.0
    """Time between the end of one run and the start of the next (HTTP, TCP, script)."""
    timeout: float | None = None
    """Per run; ``None``: 10 s, or 30 s for scripts (``effective_timeout``)."""
    url: str = ""
    """HTTP: the URL requested (Consul ``HTTP``)."""
    method: str = "GET"
    headers: Mapping[str, Sequence[str]] = field(default_factory=dict, hash=False)
    """HTTP: request headers, several values each (Consul ``Header``). A ``Host`` header
    sets the request's host, as in Consul."""
    body: str = ""
    """HTTP: request body."""
    tls_skip_verify: bool = False
    tls_server_name: str = ""
    """HTTPS: the name to send as SNI and to verify the certificate against."""
    disable_redirects: bool = False
    """HTTP: report a redirect response itself instead of following it (Consul
    ``DisableRedirects``; by default up to ``HTTP_MAX_REDIRECTS`` are followed)."""
    tcp: str = ""
    """TCP: ``host:port`` to connect to."""
    args: Sequence[str] = ()
    """Script: the command and its arguments, run without a shell."""
    ttl: float = 0.0
    """TTL: how long an update stays valid."""
    success_before_passing: int = 0
    failures_before_warning: int | None = None
    """``None``: the same as ``failures_before_critical`` (Consul's default)."""
    failures_before_critical: int = 0
    deregister_critical_service_after: float = 0.0
    """Deregister the check's service after it has been critical this long; 0: never."""
    status: HealthStatus = HealthStatus.CRITICAL
    """The status before the first result (Consul ``Status``)."""

    def __post_init__(self) -> None:
        set_field = object.__setattr__
        try:
            set_field(self, "kind", CheckKind(self.kind))
        except ValueError:
            raise CheckError(f"unknown check kind {self.kind!r}") from None
        set_field(self, "status", _status(self.status))
        set_field(self, "headers", {str(k): tuple(v) for k, v in self.headers.items()})
        set_field(self, "args", tuple(self.args))
        where = f"check {self.check_id!r}"
        if not self.check_id:
            raise CheckError("check_id must not be empty")
        if self.kind is CheckKind.TTL:
            if not self.ttl > 0:
                raise CheckError(f"{where}: TTL must be > 0 for TTL checks")
            if self.interval:
                raise CheckError(f"{where}: Interval and TTL cannot both be specified")
        else:
            if not self.interval > 0:
                raise CheckError(f"{where}: Interval must be > 0 for {self.kind} checks")
            if self.ttl:
                raise CheckError(f"{where}: Interval and TTL cannot both be specified")
        if self.timeout is not None and not self.timeout > 0:
            raise CheckError(f"{where}: Timeout must be > 0")
        if self.kind is CheckKind.HTTP and not re.match(r"^https?://[^/\s]+", self.url):
            raise CheckError(f"{where}: HTTP must be an http(s) URL, got {self.url!r}")
        if self.kind is CheckKind.TCP:
            split_host_port(self.tcp)
        if self.kind is CheckKind.SCRIPT and not (self.args and self.args[0]):
            raise CheckError(f"{where}: Args must name a command")
        thresholds = (
            self.success_before_passing,
            self.failures_before_critical,
            self.effective_failures_before_warning,
        )
        if min(thresholds) < 0:
            raise CheckError(f"{where}: thresholds must be >= 0")
        if not self.deregister_critical_service_after >= 0:
            raise CheckError(f"{where}: DeregisterCriticalServiceAfter must be >= 0")
        for value in (self.interval, self.ttl, self.deregister_critical_service_after):
            if not math.isfinite(value):
                raise CheckError(f"{where}: durations must be finite")

    @property
    def effective_timeout(self) -> float:
        """``timeout``, or Consul's default for this kind of check."""
        if self.timeout is not None:
            return self.timeout
        return DEFAULT_SCRIPT_TIMEOUT if self.kind is CheckKind.SCRIPT else DEFAULT_TIMEOUT

    @property
    def effective_failures_before_warning(self) -> int:
        """``failures_before_warning``, defaulting to ``failures_before_critical``."""
        if self.failures_before_warning is None:
            return self.failures_before_critical
        return self.failures_before_warning

    @classmethod
    def from_fields(
        cls,
        definition: CheckFields,
        *,
        min_interval: float = MIN_INTERVAL,
        min_deregister_critical_service_after: float = MIN_DEREGISTER_CRITICAL_SERVICE_AFTER,
    ) -> CheckSpec:
        """The spec for a Consul-shaped check definition (``meshnode.model``'s
        ``CheckDefinition`` fits), with Consul's defaults and minimums applied:

        * an interval below ``min_interval`` is raised to it (agent.go: "check has
          interval below minimum");
        * a ``DeregisterCriticalServiceAfter`` below the minimum is raised to it;
        * an empty method is GET; an unset or non-positive timeout is the default.

        Raises:
            CheckError: the definition does not make a valid check.
        """
        try:
            kind = CheckKind(definition.kind)
        except ValueError:
            raise CheckError(f"unknown check kind {definition.kind!r}") from None
        interval = 0.0
        if kind is not CheckKind.TTL:
            interval = definition.interval or 0.0
            if interval > 0:  # a missing interval stays an error, not a 1 s default
                interval = max(interval, min_interval)
        deregister = definition.deregister_critical_service_after or 0.0
        if deregister > 0:
            deregister = max(deregister, min_deregister_critical_service_after)
        timeout = definition.timeout if definition.timeout and definition.timeout > 0 else None
        return cls(
            check_id=definition.check_id,
            kind=kind,
            interval=interval,
            timeout=timeout,
            url=definition.http or "",
            method=definition.method or "GET",
            headers=definition.header,
            body=definition.body,
            tls_skip_verify=definition.tls_skip_verify,
            tls_server_name=definition.tls_server_name,
            tcp=definition.tcp or "",
            args=definition.args,
            ttl=(definition.ttl or 0.0) if kind is CheckKind.TTL else 0.0,
            success_before_passing=definition.success_before_passing,
            failures_before_critical=definition.failures_before_critical,
            deregister_critical_service_after=deregister,
            status=_status(definition.status),
        )


# ---------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One raw result of running a check, before thresholds are applied."""

    status: HealthStatus
    output: str
    bypass_thresholds: bool = False
    """Applied as is, whatever the thresholds: Consul does so for a script that timed
    out or could not be started (check.go calls ``Notify.UpdateCheck`` directly)."""


@dataclass(frozen=True, slots=True)
class CheckState:
    """A check's effective status and output, as the catalog publishes them."""

    status: HealthStatus
    output: str


@dataclass(frozen=True, slots=True)
class CheckUpdated:
    """The effective status or output of a check changed."""

    check_id: str
    status: HealthStatus
    output: str
    previous_status: HealthStatus


# ---------------------------------------------------------------------------- outputs


class TailBuffer:
    """Keeps the last ``limit`` bytes written and counts all of them (Go's
    ``circbuf.Buffer``, which Consul captures script output with)."""

    def __init__(self, limit: int = OUTPUT_MAX_SIZE) -> None:
        self._limit = limit
        self._data = bytearray()
        self.total_written = 0
        """Every byte ever written, kept or not."""

    def write(self, data: bytes) -> None:
        """Append ``data``, dropping the oldest bytes beyond the limit."""
        self.total_written += len(data)
        self._data += data[-self._limit :] if self._limit else b""
        if len(self._data) > self._limit:
            del self._data[: len(self._data) - self._limit]

    @property
    def data(self) -> bytes:
        """The bytes kept (at most ``limit``)."""
        return bytes(self._data)


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def http_status_to_health(status_code: int) -> HealthStatus:
    """Consul's rule (check.mdx, check.go ``CheckHTTP``): 2xx is passing, 429 Too Many
    Requests is warning, anything else is critical."""
    if 200 <= status_code <= 299:
        return HealthStatus.PASSING
    if status_code == 429:
        return HealthStatus.WARNING
    return HealthStatus.CRITICAL


def interpret_http_response(
    method: str, url: str, status_code: int, reason: str, body: bytes
) -> CheckResult:
    """The result of an HTTP check that got a response, with Consul's output text:
    ``HTTP GET http://...: 200 OK Output: <body>``. ``url`` is the URL the check asked
    for, even after redirects, as in Consul.

    meshnode: ``body`` is the *first* ``OUTPUT_MAX_SIZE`` bytes; Consul reads the whole
    body and keeps its last 4 KiB. Reading less bounds the work a health endpoint can
    make us do.
    """
    status_text = f"{status_code} {reason}" if reason else str(status_code)
    text = _decode(body[:OUTPUT_MAX_SIZE])
    return CheckResult(
        http_status_to_health(status_code), f"HTTP {method} {url}: {status_text} Output: {text}"
    )


def http_error_result(method: str, url: str, reason: str) -> CheckResult:
    """An HTTP check that got no response (critical), phrased like Go's ``url.Error``:
    ``Get "http://...": <reason>``."""
    verb = method[:1].upper() + method[1:].lower()
    return CheckResult(HealthStatus.CRITICAL, f'{verb} "{url}": {reason}')


def tcp_result(target: str, error: str | None) -> CheckResult:
    """A TCP check: ``TCP connect host:port: Success`` when connected (check.go), else
    critical with a Go-like ``dial tcp host:port: <reason>``."""
    if error is None:
        return CheckResult(HealthStatus.PASSING, f"TCP connect {target}: Success")
    return CheckResult(HealthStatus.CRITICAL, f"dial tcp {target}: {error}")


def script_output(output: TailBuffer) -> str:
    """A script's captured output, with Consul's note when it was cut:
    ``Captured 4096 of 10000 bytes\\n...\\n<last 4096 bytes>``."""
    text = _decode(output.data)
    if output.total_written > len(output.data):
        text = f"Captured {len(output.data)} of {output.total_written} bytes\n...\n{text}"
    return text


def script_result(exit_code: int, output: TailBuffer) -> CheckResult:
    """Consul's (and Nagios') convention: exit 0 is passing, 1 is warning, anything
    else -- including death by a signal -- is critical."""
    if exit_code == 0:
        status = HealthStatus.PASSING
    elif exit_code == 1:
        status = HealthStatus.WARNING
    else:
        status = HealthStatus.CRITICAL
    return CheckResult(status, script_output(output))


def script_timeout_result(timeout: float, output: TailBuffer) -> CheckResult:
    """A script killed at its timeout: critical, bypassing thresholds (check.go:
    ``Timed out (30s) running check``, then a blank line and the output so far)."""
    message = f"Timed out ({format_go_duration(timeout)}) running check"
    captured = script_output(output)
    if captured:
        message += "\n\n" + captured
    return CheckResult(HealthStatus.CRITICAL, message, bypass_thresholds=True)


def truncate_ttl_output(output: str) -> str:
    """A TTL update's output cut to ``OUTPUT_MAX_SIZE`` bytes, with Consul's note
    (``CheckTTL.SetStatus``: ``<first bytes> ... (captured 4096 of 5000 bytes)``)."""
    raw = output.encode()
    if len(raw) <= OUTPUT_MAX_SIZE:
        return output
    kept = raw[:OUTPUT_MAX_SIZE].decode("utf-8", errors="ignore")
    return f"{kept} ... (captured {OUTPUT_MAX_SIZE} of {len(raw)} bytes)"


def ttl_expired_output(last_output: str) -> str:
    """The output of an expired TTL check (``CheckTTL.getExpiredOutput``)."""
    if not last_output:
        return "TTL expired"
    return f"TTL expired (last output before timeout follows): {last_output}"


# ---------------------------------------------------------------------------- machine


class CheckStateMachine:
    """One check's effective status: raw results in, changes out. Pure; ``now`` is
    monotonic seconds.

    Args:
        spec: the check.
        now: the time it is registered (starts a TTL check's deadline).
        restore: the state of a previous registration with the same ID, kept as
            Consul keeps it ("to avoid potential flapping"); counters start fresh.
    """

    def __init__(self, spec: CheckSpec, now: float, *, restore: CheckState | None = None) -> None:
        self._spec = spec
        self._status = spec.status
        self._output = ""
        # Consul's NewStatusHandler: counters start *at* the thresholds "in order to
        # immediately update status after first check".
        self._successes = spec.success_before_passing
        self._failures = spec.failures_before_critical
        self._critical_since: float | None = None
        self._ttl_deadline: float | None = now + spec.ttl if spec.kind is CheckKind.TTL else None
        self._ttl_last_output = ""
        if restore is not None:
            self._update(restore.status, restore.output, now)

    # ------------------------------------------------------------------ reading

    @property
    def spec(self) -> CheckSpec:
        """The check this machine tracks."""
        return self._spec

    @property
    def status(self) -> HealthStatus:
        """The effective status."""
        return self._status

    @property
    def output(self) -> str:
        """The effective output (the output of the last applied result)."""
        return self._output

    @property
    def state(self) -> CheckState:
        """Status and output together."""
        return CheckState(self._status, self._output)

    @property
    def consecutive_successes(self) -> int:
        """Passing or warning results in a row (starts at ``success_before_passing``)."""
        return self._successes

    @property
    def consecutive_failures(self) -> int:
        """Critical results in a row (starts at ``failures_before_critical``)."""
        return self._failures

    @property
    def critical_since(self) -> float | None:
        """When the current critical spell began, or None if not critical (or critical
        only by its initial status: Consul's critical clock starts at an update)."""
        return self._critical_since

    def deregister_at(self) -> float | None:
        """When the service becomes due for deregistration if nothing changes, or None
        (not critical, or no ``deregister_critical_service_after``)."""
        after = self._spec.deregister_critical_service_after
        if after <= 0 or self._critical_since is None:
            return None
        return self._critical_since + after

    def should_deregister(self, now: float) -> bool:
        """Whether the check's service should be deregistered at ``now``: it has been
        critical for *more than* ``deregister_critical_service_after`` (Consul's reaper:
        ``cs.CriticalFor() > timeout``)."""
        deadline = self.deregister_at()
        return deadline is not None and now > deadline

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` has work: the TTL expiry, or None."""
        return self._ttl_deadline

    # ------------------------------------------------------------------ inputs

    def record(self, status: HealthStatus | str, output: str, now: float) -> CheckUpdated | None:
        """Apply one raw result through Consul's thresholds (``StatusHandler.updateCheck``).

        Returns the change, or None if the effective status and output stay the same
        (a result below its threshold changes nothing at all, not even the output).
        """
        status = _status(status)
        spec = self._spec
        if status is not HealthStatus.CRITICAL:
            # Warning counts as a success here: it proves the service answers.
            self._successes += 1
            self._failures = 0
            if self._successes >= spec.success_before_passing:
                return self._update(status, output, now)
            return None
        self._failures += 1
        self._successes = 0
        if self._failures >= spec.failures_before_critical:
            return self._update(HealthStatus.CRITICAL, output, now)
        if self._failures >= spec.effective_failures_before_warning:
            return self._update(HealthStatus.WARNING, output, now)
        return None

    def apply(self, result: CheckResult, now: float) -> CheckUpdated | None:
        """``record`` the result, or ``set_status`` it if it bypasses thresholds."""
        if result.bypass_thresholds:
            return self.set_status(result.status, result.output, now)
        return self.record(result.status, result.output, now)

    def set_status(
        self, status: HealthStatus | str, output: str, now: float
    ) -> CheckUpdated | None:
        """Set the effective status directly, bypassing thresholds (Consul's
        ``Notify.UpdateCheck``). Returns the change, or None if there is none."""
        return self._update(_status(status), output, now)

    def ttl_update(
        self, status: HealthStatus | str, output: str, now: float
    ) -> CheckUpdated | None:
        """A TTL check's ``check/pass|warn|fail|update``: set the status directly, cut
        the output to 4 KiB, remember it for the expiry text, and restart the TTL.

        Raises:
            NotATTLCheckError: this is not a TTL check.
        """
        if self._spec.kind is not CheckKind.TTL:
            raise NotATTLCheckError(self._spec.check_id)
        status = _status(status)
        output = truncate_ttl_output(output)
        change = self._update(status, output, now)
        self._ttl_last_output = output
        self._ttl_deadline = now + self._spec.ttl
        return change

    def handle_timer(self, now: float) -> CheckUpdated | None:
        """Expire the TTL if its deadline has passed: critical, ``TTL expired``. The
        deadline is not re-armed until the next update (Consul's timer fires once)."""
        if self._ttl_deadline is None or now < self._ttl_deadline:
            return None
        self._ttl_deadline = None
        return self._update(HealthStatus.CRITICAL, ttl_expired_output(self._ttl_last_output), now)

    def _update(self, status: HealthStatus, output: str, now: float) -> CheckUpdated | None:
        # local/state.go UpdateCheck: track the critical time first ("this doesn't
        # cause a server update so we can always keep this up to date")...
        if status is HealthStatus.CRITICAL:
            if self._critical_since is None:
                self._critical_since = now
        else:
            self._critical_since = None
        # ...then "Do nothing if update is idempotent".
        if status is self._status and output == self._output:
            return None
        previous = self._status
        self._status = status
        self._output = output
        return CheckUpdated(self._spec.check_id, status, output, previous)


# ============================================================================ asyncio adapter

UpdateCallback = Callable[[str, HealthStatus, str], None]
"""``on_update(check_id, status, output)``, called on every effective change."""


@dataclass(eq=False, slots=True)
class _Entry:
    machine: CheckStateMachine
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None


class _ScriptProtocol(asyncio.SubprocessProtocol):
    """Collects a script's combined stdout and stderr into a bounded buffer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.output = TailBuffer()
        self.exited: asyncio.Future[None] = loop.create_future()
        """Resolved when the process has exited and been reaped."""
        self.finished: asyncio.Future[None] = loop.create_future()
        """Resolved when, in addition, every pipe is closed: all output is in."""

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        self.output.write(data.encode() if isinstance(data, str) else data)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self.finished.set_result(None)


def _describe_os_error(error: OSError) -> str:
    if isinstance(error, socket.gaierror):
        return f"lookup: {error.strerror}"
    if error.errno:
        return os.strerror(error.errno).lower()
    return str(error) or type(error).__name__


class CheckRunner:
    """Runs every check of one agent and reports changes to ``on_update``.

    Use ``async with CheckRunner(...) as runner`` (or ``start()`` / ``aclose()``, from
    the same task). Every check task belongs to the runner's ``asyncio.TaskGroup``.

    Args:
        on_update: ``on_update(check_id, status, output)``, called from the event loop
            whenever a check's effective status or output changes (never for a result
            that changes nothing). It must not block; exceptions are logged.
        enable_script_checks: allow script checks (Consul's ``enable_script_checks``;
            off by default because a script check runs any command the API is given).
        session: the agent's one aiohttp session for HTTP checks. ``None``: the runner
            makes its own (no connection limit, no keep-alive) and closes it. An
            injected session is not closed; its connector's ``limit`` (100 by default)
            caps how many HTTP checks run at once.
        rng: the stagger of first runs; ``random.Random()`` if None.
    """

    def __init__(
        self,
        on_update: UpdateCallback,
        *,
        enable_script_checks: bool = False,
        session: aiohttp.ClientSession | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._on_update = on_update
        self._enable_script_checks = enable_script_checks
        self._session = session
        self._owns_session = session is None
        self._rng = rng or random.Random()
        self._entries: dict[str, _Entry] = {}
        self._group: asyncio.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> CheckRunner:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if not self._closed:
            # Only a cancellation concerns the TaskGroup (it must tell its own from one
            # coming from outside); any other error of the body propagates unchanged
            # instead of coming back wrapped in an ExceptionGroup.
            await self._shutdown(exc if isinstance(exc, asyncio.CancelledError) else None)

    async def start(self) -> None:
        """Start the runner. Call ``aclose`` from the same task."""
        if self._loop is not None:
            raise RuntimeError("check runner already started")
        self._loop = asyncio.get_running_loop()
        if self._session is None:
            # Consul's HTTP checks disable keep-alives "to prevent failing checks due to
            # the keepalive interval" (force_close). No connection limit: at most one
            # request per check is in flight, so the number of checks bounds it.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True)
            )
        group = asyncio.TaskGroup()
        await group.__aenter__()
        self._group = group

    async def aclose(self) -> None:
        """Stop every check (killing running scripts) and close an owned session."""
        if self._closed or self._loop is None:
            self._closed = True
            return
        await self._shutdown(None)

    async def _shutdown(self, exc: BaseException | None) -> None:
        self._closed = True
        for entry in self._entries.values():
            self._stop(entry)
        self._entries.clear()
        group, self._group = self._group, None
        try:
            if group is not None:
                await group.__aexit__(type(exc) if exc else None, exc, None)
        finally:
            if self._owns_session and self._session is not None:
                await self._session.close()

    # ------------------------------------------------------------------ API

    def add(self, spec: CheckSpec) -> None:
        """Start running ``spec``. A check with the same ID is replaced, keeping its
        status and output (as Consul does on re-registration).

        Raises:
            ScriptChecksDisabledError: a script check while script checks are off.
            RuntimeError: the runner is not started, or closed.
        """
        self._refuse(spec)
        self._start_check(spec)

    def remove(self, check_id: str) -> None:
        """Stop running a check and forget it; a running script is killed.

        Raises:
            UnknownCheckError: no such check.
        """
        entry = self._entries.pop(check_id, None)
        if entry is None:
            raise UnknownCheckError(check_id)
        self._stop(entry)

    def replace_all(self, specs: Iterable[CheckSpec]) -> None:
        """Make the running checks exactly ``specs`` (configuration reload): remove the
        others, add new ones, restart changed ones keeping their status and output.

        meshnode: an *unchanged* check keeps running untouched (counters, TTL deadline,
        critical clock); Consul's reload restarts every check.

        Raises:
            CheckError: a duplicate ID or a refused script check; nothing was changed.
        """
        wanted: dict[str, CheckSpec] = {}
        for spec in specs:
            if spec.check_id in wanted:
                raise CheckError(f"duplicate check ID {spec.check_id!r}")
            self._refuse(spec)
            wanted[spec.check_id] = spec
        for check_id in [c for c in self._entries if c not in wanted]:
            self.remove(check_id)
        for check_id, spec in wanted.items():
            entry = self._entries.get(check_id)
            if entry is None or entry.machine.spec != spec:
                self._start_check(spec)

    def ttl_update(self, check_id: str, status: HealthStatus | str, output: str = "") -> None:
        """Set a TTL check's status (``check/pass|warn|fail|update``) and restart its TTL.

        Raises:
            UnknownCheckError: no such check.
            NotATTLCheckError: the check is not a TTL check.
            CheckError: ``status`` is not passing, warning or critical.
        """
        entry = self._entries.get(check_id)
        if entry is None:
            raise UnknownCheckError(check_id)
        loop = self._running_loop()
        change = entry.machine.ttl_update(status, output, loop.time())
        self._arm_ttl(entry)
        self._emit(change)

    def statuses(self) -> dict[str, CheckState]:
        """Every check's effective status and output, by check ID."""
        return {check_id: entry.machine.state for check_id, entry in self._entries.items()}

    def spec(self, check_id: str) -> CheckSpec:
        """The spec a check runs. Raises ``UnknownCheckError``."""
        entry = self._entries.get(check_id)
        if entry is None:
            raise UnknownCheckError(check_id)
        return entry.machine.spec

    def deregister_due(self) -> list[str]:
        """IDs of the checks whose ``deregister_critical_service_after`` has passed:
        the agent deregisters their services (Consul's reaper does this every 30 s)."""
        now = self._running_loop().time()
        return [c for c, e in self._entries.items() if e.machine.should_deregister(now)]

    # ------------------------------------------------------------------ internals

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._group is None or self._closed:
            raise RuntimeError("check runner is not running (use start() or async with)")
        return self._loop

    def _refuse(self, spec: CheckSpec) -> None:
        self._running_loop()
        if spec.kind is CheckKind.SCRIPT and not self._enable_script_checks:
            raise ScriptChecksDisabledError(spec.check_id)

    def _start_check(self, spec: CheckSpec) -> None:
        loop = self._running_loop()
        previous = self._entries.pop(spec.check_id, None)
        restore = None
        if previous is not None:
            self._stop(previous)
            restore = previous.machine.state
        entry = _Entry(CheckStateMachine(spec, loop.time(), restore=restore))
        self._entries[spec.check_id] = entry
        if spec.kind is CheckKind.TTL:
            self._arm_ttl(entry)
        else:
            assert self._group is not None
            entry.task = self._group.create_task(
                self._run_interval_check(entry), name=f"check {spec.check_id}"
            )

    def _stop(self, entry: _Entry) -> None:
        if entry.task is not None:
            entry.task.cancel()
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None

    def _emit(self, change: CheckUpdated | None) -> None:
        if change is None:
            return
        log.info(
            "check_updated",
            check_id=change.check_id,
            status=change.status.value,
            previous_status=change.previous_status.value,
        )
        try:
            self._on_update(change.check_id, change.status, change.output)
        except Exception:
            log.exception("check_update_callback_failed", check_id=change.check_id)

    # ------------------------------------------------------------------ TTL

    def _arm_ttl(self, entry: _Entry) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        deadline = entry.machine.next_deadline()
        if deadline is not None:
            loop = self._running_loop()
            entry.timer = loop.call_at(deadline, self._ttl_fired, entry, deadline)

    def _ttl_fired(self, entry: _Entry, deadline: float) -> None:
        entry.timer = None
        if self._closed or self._entries.get(entry.machine.spec.check_id) is not entry:
            return
        assert self._loop is not None
        # call_at may run a handle up to the clock resolution early; as aioquic does,
        # treat the timer as due at its deadline.
        change = entry.machine.handle_timer(max(self._loop.time(), deadline))
        self._arm_ttl(entry)
        self._emit(change)

    # ------------------------------------------------------------------ interval checks

    async def _run_interval_check(self, entry: _Entry) -> None:
        spec = entry.machine.spec
        assert self._loop is not None
        # lib.RandomStagger(interval): the first run at a random point of the first
        # interval, so checks registered together do not all run together.
        await asyncio.sleep(self._rng.random() * spec.interval)
        while True:
            try:
                result = await self._execute(spec)
            except Exception as error:  # a bug of ours must not stop the check
                log.exception("check_failed_internally", check_id=spec.check_id)
                result = CheckResult(HealthStatus.CRITICAL, f"internal error: {error!r}")
            if self._entries.get(spec.check_id) is entry:
                self._emit(entry.machine.apply(result, self._loop.time()))
            # Consul waits the interval after a run ends (time.After after check()).
            await asyncio.sleep(spec.interval)

    async def _execute(self, spec: CheckSpec) -> CheckResult:
        if spec.kind is CheckKind.HTTP:
            return await self._run_http(spec)
        if spec.kind is CheckKind.TCP:
            return await self._run_tcp(spec)
        return await self._run_script(spec)

    async def _run_http(self, spec: CheckSpec) -> CheckResult:
        session = self._session
        assert session is not None
        headers = [(name, value) for name, values in spec.headers.items() for value in values]
        names = {name.lower() for name, _ in headers}
        if "user-agent" not in names:
            headers.append(("User-Agent", HTTP_USER_AGENT))
        if "accept" not in names:
            headers.append(("Accept", HTTP_ACCEPT))
        ssl_option: bool | ssl.SSLContext = True
        if spec.tls_skip_verify:
            ssl_option = False
        timeout = spec.effective_timeout
        try:
            async with (
                asyncio.timeout(timeout),
                session.request(
                    spec.method,
                    spec.url,
                    headers=headers,
                    data=spec.body.encode() if spec.body else None,
                    allow_redirects=not spec.disable_redirects,
                    raise_for_status=False,  # whatever the session's default: we judge
                    max_redirects=HTTP_MAX_REDIRECTS,
                    ssl=ssl_option,
                    server_hostname=spec.tls_server_name or None,
                    # The asyncio.timeout above is the one limit; a session default
                    # (say total=5) must not cut a check with a longer timeout.
                    timeout=aiohttp.ClientTimeout(total=None),
                ) as response,
            ):
                body = await _read_at_most(response.content, OUTPUT_MAX_SIZE)
                return interpret_http_response(
                    spec.method, spec.url, response.status, response.reason or "", body
                )
        except TimeoutError:
            reason = f"timed out after {format_go_duration(timeout)}"
            return http_error_result(spec.method, spec.url, reason)
        except (aiohttp.ClientError, OSError, ValueError) as error:
            return http_error_result(spec.method, spec.url, str(error) or type(error).__name__)

    async def _run_tcp(self, spec: CheckSpec) -> CheckResult:
        host, port = split_host_port(spec.tcp)
        try:
            async with asyncio.timeout(spec.effective_timeout):
                # Go's Dial falls back between address families after 300 ms.
                _, writer = await asyncio.open_connection(host, port, happy_eyeballs_delay=0.3)
        except TimeoutError:
            return tcp_result(spec.tcp, "i/o timeout")
        except OSError as error:
            return tcp_result(spec.tcp, _describe_os_error(error))
        writer.close()  # connecting was the whole check
        return tcp_result(spec.tcp, None)

    async def _run_script(self, spec: CheckSpec) -> CheckResult:
        loop = self._running_loop()
        timeout = spec.effective_timeout
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _ScriptProtocol(loop),
                *spec.args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                # Its own process group, whose ID is the child's PID, so a timeout
                # kills what the script started too (Consul: KillCommandSubtree).
                start_new_session=True,
            )
        except OSError as error:
            # Consul: "Check failed to invoke" -> critical, bypassing thresholds.
            return CheckResult(HealthStatus.CRITICAL, str(error), bypass_thresholds=True)
        pid = transport.get_pid()
        try:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(protocol.finished)
            except TimeoutError:
                _kill_process_group(pid, transport, protocol)
                await _await_bounded(protocol.exited, KILL_GRACE)
                return script_timeout_result(timeout, protocol.output)
            returncode = transport.get_returncode()
            return script_result(-1 if returncode is None else returncode, protocol.output)
        finally:
            if not protocol.finished.done():  # cancelled, or timed out
                _kill_process_group(pid, transport, protocol)
            transport.close()
            if not protocol.exited.done():
                await _await_bounded(protocol.exited, KILL_GRACE)


def _kill_process_group(
    pid: int, transport: asyncio.SubprocessTransport, protocol: _ScriptProtocol
) -> None:
    """SIGKILL the process group our script leads (its ID is our child's PID).

    Done only while the child is unreaped (its PID cannot have been reused) or while
    our pipes are still open (someone in its group holds them, and Linux does not reuse
    an ID still in use as a process group ID).
    """
    if transport.get_returncode() is not None and protocol.finished.done():
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _await_bounded(future: asyncio.Future[None], seconds: float) -> None:
    """Wait for ``future`` at most ``seconds`` without cancelling it on timeout."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await asyncio.shield(future)


async def _read_at_most(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """Up to ``limit`` bytes of a response body; the rest is never read."""
    data = bytearray()
    while len(data) < limit:
        chunk = await stream.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


__all__ = [
    "DEFAULT_SCRIPT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "MIN_DEREGISTER_CRITICAL_SERVICE_AFTER",
    "MIN_INTERVAL",
    "OUTPUT_MAX_SIZE",
    "CheckError",
    "CheckFields",
    "CheckKind",
    "CheckResult",
    "CheckRunner",
    "CheckSpec",
    "CheckState",
    "CheckStateMachine",
    "CheckUpdated",
    "HealthStatus",
    "NotATTLCheckError",
    "ScriptChecksDisabledError",
    "TailBuffer",
    "UnknownCheckError",
    "UpdateCallback",
    "format_go_duration",
    "http_error_result",
    "http_status_to_health",
    "interpret_http_response",
    "script_output",
    "script_result",
    "script_timeout_result",
    "split_host_port",
    "tcp_result",
    "truncate_ttl_output",
    "ttl_expired_output",
]
