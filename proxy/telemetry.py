"""What the proxy counts and logs. Pure: counters in dictionaries, a histogram as a
list of bucket counts, and an access logger that formats JSON lines for a writer it
is given. The worker sends :meth:`Telemetry.dump` to its agent every second over the
control socket; the agent exports it at ``/v1/agent/metrics?format=prometheus``
(``meshnode/metrics.py``), so the proxy needs no HTTP server of its own.

Labels stay bounded: services come from the snapshot (not from requests), status
codes are folded into classes (``2xx``...), handshake failures into
``proxy.tls.FAILURE_LABELS``, limits into the breaker's limit names.

The dump is plain data (msgpack-able)::

    {"counters":   [[name, [[label, value], ...], number], ...],
     "gauges":     [[name, [[label, value], ...], number], ...],
     "histograms": [[name, [[label, value], ...], [upper bounds], [counts per bucket,
                     the last for +Inf, not cumulative], sum, count], ...]}
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

from proxy.snapshot import AccessLog

if TYPE_CHECKING:
    from random import Random

Direction: TypeAlias = Literal["inbound", "outbound"]
Labels: TypeAlias = tuple[tuple[str, str], ...]

#: Request latency buckets, seconds: from a loopback hop (~0.3 ms) to a timeout.
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

PREFIX: Final = "meshnode_proxy_"


_CLASSES: Final = ("tcp", "1xx", "2xx", "3xx", "4xx", "5xx")


def code_class(status: int) -> str:
    """``2xx``... for an HTTP status; ``tcp`` for 0 (an L4 connection)."""
    if 100 <= status < 600:
        return _CLASSES[status // 100]
    if status <= 0:
        return "tcp"
    return f"{status // 100}xx"


class _Histogram:
    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, value)] += 1
        self.sum += value
        self.count += 1


class _RequestStats:
    """Per (direction, source, destination, code class)."""

    __slots__ = ("bytes_in", "bytes_out", "latency", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.latency = _Histogram()


class Telemetry:
    """The proxy's counters. Every method is a few dictionary operations."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, str, str], _RequestStats] = {}
        self._counters: dict[tuple[str, Labels], float] = {}
        self._gauges: dict[tuple[str, Labels], float] = {}

    # ----------------------------------------------------------------- requests

    def request(
        self,
        direction: Direction,
        source: str,
        destination: str,
        status: int,
        seconds: float,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        """One HTTP request (``status``: the one sent downstream) or, with status 0,
        one TCP connection closed; ``bytes_in`` came from downstream, ``bytes_out``
        went to it."""
        key = (direction, source, destination, code_class(status))
        stats = self._requests.get(key)
        if stats is None:
            stats = self._requests[key] = _RequestStats()
        stats.requests += 1
        stats.bytes_in += bytes_in
        stats.bytes_out += bytes_out
        stats.latency.observe(seconds)

    # ---------------------------------------------------------------- counters

    def count(self, name: str, labels: Labels, amount: float = 1) -> None:
        """Add to counter ``meshnode_proxy_<name>_total`` with ``labels``."""
        key = (name, labels)
        self._counters[key] = self._counters.get(key, 0) + amount

    def connection_opened(self, direction: Direction, source: str, destination: str) -> None:
        labels = (("direction", direction), ("source", source), ("destination", destination))
        self.count("tcp_connections_opened", labels)
        self._add_gauge("tcp_connections_active", labels, 1)

    def connection_closed(self, direction: Direction, source: str, destination: str) -> None:
        labels = (("direction", direction), ("source", source), ("destination", destination))
        self.count("tcp_connections_closed", labels)
        self._add_gauge("tcp_connections_active", labels, -1)

    def handshake_failure(self, direction: Direction, reason: str) -> None:
        self.count("tls_handshake_failures", (("direction", direction), ("reason", reason)))

    def denied(self, source: str, destination: str, level: Literal["l4", "l7"]) -> None:
        """A connection (l4) or request (l7) an intention refused."""
        labels = (("source", source), ("destination", destination), ("level", level))
        self.count("intention_denials", labels)

    def rate_limited(self, source: str, destination: str) -> None:
        self.count("rate_limited", (("source", source), ("destination", destination)))

    def retry(self, source: str, destination: str) -> None:
        self.count("retries", (("source", source), ("destination", destination)))

    def breaker_trip(self, destination: str, cluster: str, limit: str) -> None:
        labels = (("destination", destination), ("cluster", cluster), ("limit", limit))
        self.count("circuit_breaker_trips", labels)

    def ejection(self, destination: str, cluster: str) -> None:
        self.count("outlier_ejections", (("destination", destination), ("cluster", cluster)))

    def no_endpoint(self, source: str, destination: str) -> None:
        self.count("no_healthy_endpoint", (("source", source), ("destination", destination)))

    def timeout(self, source: str, destination: str) -> None:
        self.count("upstream_timeouts", (("source", source), ("destination", destination)))

    # ------------------------------------------------------------------ gauges

    def _add_gauge(self, name: str, labels: Labels, amount: float) -> None:
        key = (name, labels)
        self._gauges[key] = self._gauges.get(key, 0) + amount

    def set_gauge(self, name: str, labels: Labels, value: float) -> None:
        """Gauge ``meshnode_proxy_<name>`` (e.g. ``snapshot_version``)."""
        self._gauges[(name, labels)] = value

    # -------------------------------------------------------------------- dump

    def dump(self) -> dict[str, list[Any]]:
        """Everything counted since start, in the module docstring's shape."""
        counters: list[Any] = []
        histograms: list[Any] = []
        for (direction, source, destination, klass), stats in self._requests.items():
            request_labels = [
                ["direction", direction],
                ["source", source],
                ["destination", destination],
                ["code_class", klass],
            ]
            counters.append([PREFIX + "requests_total", request_labels, stats.requests])
            counters.append([PREFIX + "request_bytes_total", request_labels, stats.bytes_in])
            counters.append([PREFIX + "response_bytes_total", request_labels, stats.bytes_out])
            latency = stats.latency
            histograms.append(
                [
                    PREFIX + "request_duration_seconds",
                    request_labels,
                    list(LATENCY_BUCKETS),
                    list(latency.counts),
                    latency.sum,
                    latency.count,
                ]
            )
        for (name, labels), value in self._counters.items():
            counters.append([f"{PREFIX}{name}_total", [list(pair) for pair in labels], value])
        gauges = [
            [PREFIX + name, [list(pair) for pair in labels], value]
            for (name, labels), value in self._gauges.items()
        ]
        return {"counters": counters, "gauges": gauges, "histograms": histograms}


class AccessLogger:
    """Structured access log lines (one JSON object per line) for a sampled share of
    requests/connections. ``write`` gets each line without its newline."""

    def __init__(self, spec: AccessLog, write: Callable[[str], None], rng: Random) -> None:
        self._sample = min(max(spec.sample, 0.0), 1.0) if spec.path != "off" else 0.0
        self._write = write
        self._rng = rng

    @property
    def enabled(self) -> bool:
        return self._sample > 0

    def sampled(self) -> bool:
        """Whether to log this one; ask before building the record."""
        sample = self._sample
        return sample >= 1.0 or (sample > 0 and self._rng.random() < sample)

    def log(self, record: Mapping[str, object]) -> None:
        self._write(json.dumps(record, separators=(",", ":"), default=_jsonable))


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
