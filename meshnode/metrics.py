"""Prometheus metrics of the gossip layer, the catalog and the leader election
(STYLE.md rule 10).

The gossip core already counts everything in ``Swim.stats``; copying those counters
into prometheus objects on every event would double the bookkeeping on the hot path.
Instead a custom collector reads the core at scrape time. It is registered on a
registry the caller injects (one per agent, one per test), never on the global one:
registering twice there raises ``Duplicated timeseries``.

Names are ``meshnode_gossip_<thing>_<unit>``; counters get ``_total`` from the client.
Every label takes values from a small fixed set (member states, transports, drop
reasons, which are constants in the gossip code).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ca.election import Election
from gossip.events import MemberState
from gossip.swim import RTT_BUCKETS, Swim
from meshnode.catalog import Catalog

#: A drop reason that does not look like one of ours becomes "other", so a label can
#: never take unbounded values, whatever the core one day puts there.
_REASON_PATTERN: Final = re.compile(r"[a-z_]{1,32}")

SwimSource = Callable[[], Swim | None]


def _reason_label(reason: str) -> str:
    return reason if _REASON_PATTERN.fullmatch(reason) else "other"


class GossipCollector(Collector):
    """Reads a ``Swim`` core at scrape time. ``source`` returns the core, or None
    while it does not exist yet (then nothing is reported)."""

    def __init__(self, source: SwimSource) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        # Without describe() the registry would call collect() at registration.
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        swim = self._source()
        if swim is None:
            return []
        return self._families(swim)

    def _families(self, swim: Swim | None) -> Iterator[Metric]:
        members = GaugeMetricFamily(
            "meshnode_gossip_members", "Members known, by state.", labels=["state"]
        )
        probes = CounterMetricFamily("meshnode_gossip_probes", "Failure-detection probes sent.")
        probes_failed = CounterMetricFamily(
            "meshnode_gossip_probes_failed", "Probes that got no ack, direct or indirect."
        )
        suspicions = CounterMetricFamily(
            "meshnode_gossip_suspicions",
            "Suspicions this member raised from its own failed probes.",
        )
        refutations = CounterMetricFamily(
            "meshnode_gossip_refutations", "Times this member refuted a suspicion about itself."
        )
        push_pulls = CounterMetricFamily(
            "meshnode_gossip_push_pulls", "Full state exchanges (anti-entropy and joins)."
        )
        dropped = CounterMetricFamily(
            "meshnode_gossip_dropped_packets",
            "Packets and stream messages dropped, by reason.",
            labels=["reason"],
        )
        sent = CounterMetricFamily(
            "meshnode_gossip_sent_bytes", "Bytes sent, by transport.", labels=["transport"]
        )
        received = CounterMetricFamily(
            "meshnode_gossip_received_bytes", "Bytes received, by transport.", labels=["transport"]
        )
        queue = GaugeMetricFamily(
            "meshnode_gossip_broadcast_queue_messages", "Broadcasts waiting to be piggybacked."
        )
        awareness = GaugeMetricFamily(
            "meshnode_gossip_awareness_score",
            "Lifeguard local health: 0 is healthy; probe interval × (score + 1).",
        )
        rtt = HistogramMetricFamily(
            "meshnode_gossip_probe_rtt_seconds", "Round-trip time of successful probes."
        )
        if swim is not None:
            stats = swim.stats
            for state in MemberState:
                members.add_metric([state.name.lower()], swim.count(state))
            probes.add_metric([], stats.probes)
            probes_failed.add_metric([], stats.probes_failed)
            suspicions.add_metric([], stats.suspicions_started)
            refutations.add_metric([], stats.refutations)
            push_pulls.add_metric([], stats.push_pulls)
            by_reason: dict[str, int] = {}
            for reason, count in stats.dropped.items():
                label = _reason_label(reason)
                by_reason[label] = by_reason.get(label, 0) + count
            for label, count in sorted(by_reason.items()):
                dropped.add_metric([label], count)
            sent.add_metric(["udp"], stats.bytes_sent)
            sent.add_metric(["tcp"], stats.stream_bytes_sent)
            received.add_metric(["udp"], stats.bytes_received)
            received.add_metric(["tcp"], stats.stream_bytes_received)
            queue.add_metric([], swim.broadcast_queue_depth)
            awareness.add_metric([], swim.awareness)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*RTT_BUCKETS, float("inf")), stats.rtt_buckets, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            rtt.add_metric([], buckets, stats.rtt_sum)
        yield from (members, probes, probes_failed, suspicions, refutations, push_pulls)
        yield from (dropped, sent, received, queue, awareness, rtt)


def register_gossip_metrics(registry: CollectorRegistry, source: SwimSource) -> GossipCollector:
    """Register the gossip collector on ``registry`` and return it."""
    collector = GossipCollector(source)
    registry.register(collector)
    return collector


class CatalogCollector(Collector):
    """Reads the catalog at scrape time: its size, index, and merge counters."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self._catalog)

    def _families(self, catalog: Catalog | None) -> Iterator[Metric]:
        nodes = GaugeMetricFamily("meshnode_catalog_nodes", "Nodes in the catalog.")
        services = GaugeMetricFamily("meshnode_catalog_services", "Distinct service names.")
        index = GaugeMetricFamily(
            "meshnode_catalog_index", "The blocking-query index (rises on every change)."
        )
        events = CounterMetricFamily(
            "meshnode_catalog_updates",
            "Catalog records received, by outcome (merged, stale, decode_errors...).",
            labels=["outcome"],
        )
        if catalog is not None:
            nodes.add_metric([], len(catalog.nodes()))
            services.add_metric([], len(catalog.services()))
            index.add_metric([], catalog.index)
            for outcome, count in sorted(catalog.stats.items()):
                events.add_metric([outcome], count)
        yield from (nodes, services, index, events)


def register_catalog_metrics(registry: CollectorRegistry, catalog: Catalog) -> CatalogCollector:
    """Register the catalog collector on ``registry`` and return it."""
    collector = CatalogCollector(catalog)
    registry.register(collector)
    return collector


ElectionSource = Callable[[], Election | None]


class ElectionCollector(Collector):
    """Reads a server's ``Election`` at scrape time (``Election.statistics()``).
    Clients run no election and register none. ``meshnode_ca_term`` lets an operator
    (and the end-to-end test) check that no two servers lead the same term."""

    def __init__(self, source: ElectionSource) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        election = self._source()
        if election is None:
            return []
        return self._families(election)

    def _families(self, election: Election | None) -> Iterator[Metric]:
        leader_changes = CounterMetricFamily(
            "meshnode_ca_leader_changes", "Times this server learned a new (term, leader)."
        )
        elections = CounterMetricFamily(
            "meshnode_ca_elections_started",
            "Elections this server started (its term went up after a successful pre-vote).",
        )
        term = GaugeMetricFamily("meshnode_ca_term", "This server's current election term.")
        is_leader = GaugeMetricFamily(
            "meshnode_ca_leader", "1 while this server is the leader of its term, else 0."
        )
        dropped = CounterMetricFamily(
            "meshnode_ca_dropped_messages",
            "Election messages received and dropped, by reason.",
            labels=["reason"],
        )
        if election is not None:
            stats = election.statistics()
            leader_changes.add_metric([], stats.leader_changes)
            elections.add_metric([], stats.elections_started)
            term.add_metric([], election.term)
            is_leader.add_metric([], 1 if election.is_leader else 0)
            by_reason: dict[str, int] = {}
            for reason, count in stats.dropped.items():
                label = _reason_label(reason)
                by_reason[label] = by_reason.get(label, 0) + count
            for label, count in sorted(by_reason.items()):
                dropped.add_metric([label], count)
        yield from (leader_changes, elections, term, is_leader, dropped)


def register_election_metrics(
    registry: CollectorRegistry, source: ElectionSource
) -> ElectionCollector:
    """Register the election collector on ``registry`` and return it."""
    collector = ElectionCollector(source)
    registry.register(collector)
    return collector


@dataclass(frozen=True, slots=True)
class ConnectStats:
    """What the Connect collector reports, read from the agent at scrape time."""

    policy_entries: int
    policy_outcomes: Mapping[str, int]
    """``PolicyStore.stats``: applied, duplicate, stale, bad_signature..."""
    policy_rejected: Mapping[str, int]
    """Undecodable policy messages by reason."""
    bundle_version: int
    bundle_outcomes: Mapping[str, int]
    leaves: int
    leaf_outcomes: Mapping[str, int]
    seconds_to_expiry: float | None
    agents_lagging: int
    agents_expiring_soon: int
    ca_operations: Mapping[str, int]
    """On servers: signed, refused, rotations, state_replicated..."""
    rpc_dropped: Mapping[str, int]


ConnectSource = Callable[[], ConnectStats]


class ConnectCollector(Collector):
    """Policy, trust bundle, leaf certificates, CA operations and agent RPC drops."""

    def __init__(self, source: ConnectSource) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        stats = self._source()

        def counter(name: str, doc: str, label: str, values: Mapping[str, int]) -> Metric:
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, value in sorted(values.items()):
                family.add_metric([_reason_label(key)], value)
            return family

        yield GaugeMetricFamily(
            "meshnode_policy_entries", "Live intentions and config entries.", stats.policy_entries
        )
        yield counter(
            "meshnode_policy_updates",
            "Policy entries received, by outcome (bad_signature: forged or foreign).",
            "outcome",
            stats.policy_outcomes,
        )
        yield counter(
            "meshnode_policy_rejected",
            "Policy messages dropped as undecodable, by reason.",
            "reason",
            stats.policy_rejected,
        )
        yield GaugeMetricFamily(
            "meshnode_ca_bundle_version",
            "Version of the trust bundle served.",
            stats.bundle_version,
        )
        yield counter(
            "meshnode_ca_bundle_updates",
            "Gossiped trust bundles, by outcome (discontinuous: refused).",
            "outcome",
            stats.bundle_outcomes,
        )
        yield GaugeMetricFamily("meshnode_ca_leaves", "Leaf certificates held.", stats.leaves)
        yield counter(
            "meshnode_ca_leaf_requests",
            "Leaf certificate requests of this agent, by outcome.",
            "outcome",
            stats.leaf_outcomes,
        )
        if stats.seconds_to_expiry is not None:
            yield GaugeMetricFamily(
                "meshnode_ca_leaf_expiry_seconds",
                "Seconds until this agent's soonest leaf certificate expires.",
                stats.seconds_to_expiry,
            )
        yield GaugeMetricFamily(
            "meshnode_ca_agents_lagging",
            "Live agents serving a different trust bundle than this one.",
            stats.agents_lagging,
        )
        yield GaugeMetricFamily(
            "meshnode_ca_agents_expiring_soon",
            "Live agents whose soonest leaf has less than 30 % of its TTL left.",
            stats.agents_expiring_soon,
        )
        yield counter(
            "meshnode_ca_operations",
            "CA operations on this server (signed, refused, rotations, replication).",
            "operation",
            stats.ca_operations,
        )
        yield counter(
            "meshnode_rpc_dropped",
            "Agent-to-agent requests or answers dropped, by reason.",
            "reason",
            stats.rpc_dropped,
        )

    def describe(self) -> Iterable[Metric]:
        return []


def register_connect_metrics(
    registry: CollectorRegistry, source: ConnectSource
) -> ConnectCollector:
    """Register the Connect collector on ``registry`` and return it."""
    collector = ConnectCollector(source)
    registry.register(collector)
    return collector


# --------------------------------------------------------------------------- proxy

#: Telemetry names a worker may send: ``meshnode_proxy_`` and a bounded identifier.
_PROXY_NAME: Final = re.compile(r"meshnode_proxy_[a-z0-9_]{1,64}")
_LABEL_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,31}")
#: The most series per dump the agent exports (a runaway worker cannot flood a scrape).
MAX_PROXY_SERIES: Final = 20_000
#: Help texts of the worker's families (``proxy/telemetry.py``); others get a generic one.
PROXY_HELP: Final[Mapping[str, str]] = {
    "meshnode_proxy_requests_total": "HTTP requests (code_class 2xx..5xx) or TCP connections "
    "(code_class tcp), by direction, source and destination service.",
    "meshnode_proxy_request_bytes_total": "Bytes received from the downstream caller.",
    "meshnode_proxy_response_bytes_total": "Bytes sent to the downstream caller.",
    "meshnode_proxy_request_duration_seconds": "Request (or TCP connection) duration.",
    "meshnode_proxy_tcp_connections_opened_total": "Connections accepted.",
    "meshnode_proxy_tcp_connections_closed_total": "Connections closed.",
    "meshnode_proxy_tcp_connections_active": "Connections open now.",
    "meshnode_proxy_tls_handshake_failures_total": "Failed TLS handshakes, by reason "
    "(plaintext, unknown CA, bad identity...).",
    "meshnode_proxy_intention_denials_total": "Connections (l4) or requests (l7) an intention "
    "refused.",
    "meshnode_proxy_rate_limited_total": "Requests refused with 429 by a local rate limit.",
    "meshnode_proxy_retries_total": "Retried upstream attempts.",
    "meshnode_proxy_circuit_breaker_trips_total": "Requests refused with 503 by a circuit "
    "breaker, by limit.",
    "meshnode_proxy_outlier_ejections_total": "Endpoints ejected by outlier detection.",
    "meshnode_proxy_no_healthy_endpoint_total": "Requests with no healthy endpoint (503).",
    "meshnode_proxy_upstream_timeouts_total": "Upstream requests that timed out (504).",
    "meshnode_proxy_open_connections": "Connections the worker holds open.",
}


@dataclass(frozen=True, slots=True)
class ProxyMetricsSource:
    """What the proxy collector reads at scrape time (``ProxyControl.stats()``)."""

    worker_restarts: int
    applied_version: int
    snapshots_rejected: int
    dump: Mapping[str, object] | None
    """The worker's latest ``proxy.telemetry.Telemetry.dump()``."""


ProxySource = Callable[[], ProxyMetricsSource]


def _series(raw: object) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """(name, labels) of one dumped series, or None if it is not well formed."""
    if not isinstance(raw, list | tuple) or len(raw) < 3:
        return None
    name, labels = raw[0], raw[1]
    if not isinstance(name, str) or not _PROXY_NAME.fullmatch(name):
        return None
    if not isinstance(labels, list | tuple):
        return None
    pairs: list[tuple[str, str]] = []
    for pair in labels:
        if (
            not isinstance(pair, list | tuple)
            or len(pair) != 2
            or not isinstance(pair[0], str)
            or not _LABEL_NAME.fullmatch(pair[0])
        ):
            return None
        pairs.append((pair[0], str(pair[1])))
    return name, tuple(pairs)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class ProxyCollector(Collector):
    """The proxy worker's telemetry (sent to the agent every second over the control
    socket, ``proxy/telemetry.py``) as Prometheus families, plus the agent's own view
    of the worker: restarts, the applied snapshot version, rejected snapshots.

    A dump comes from another process: series with a malformed name, labels or value
    are skipped, never raised, and a family's series must share one label set (the
    first seen wins) as Prometheus requires."""

    def __init__(self, source: ProxySource) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        stats = self._source()
        yield CounterMetricFamily(
            "meshnode_proxy_worker_restarts",
            "Times the agent restarted its proxy worker.",
            stats.worker_restarts,
        )
        yield GaugeMetricFamily(
            "meshnode_proxy_snapshot_version",
            "Version of the latest snapshot the proxy worker applied (0: none).",
            stats.applied_version,
        )
        yield CounterMetricFamily(
            "meshnode_proxy_snapshots_rejected",
            "Snapshots the proxy worker refused (it keeps the previous one).",
            stats.snapshots_rejected,
        )
        if stats.dump is not None:
            yield from _dump_families(stats.dump)


def _dump_families(dump: Mapping[str, object]) -> Iterator[Metric]:
    budget = MAX_PROXY_SERIES
    reserved = {
        "meshnode_proxy_worker_restarts_total",
        "meshnode_proxy_snapshot_version",
        "meshnode_proxy_snapshots_rejected_total",
    }
    Family = CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
    families: dict[str, tuple[Family, tuple[str, ...]]] = {}

    def family(kind: str, name: str, labels: tuple[str, ...]) -> Family | None:
        found = families.get(name)
        if found is None:
            metric: Family
            text = PROXY_HELP.get(name, f"Proxy worker {kind}.")
            if kind == "counter":
                metric = CounterMetricFamily(name.removesuffix("_total"), text, labels=list(labels))
            elif kind == "gauge":
                metric = GaugeMetricFamily(name, text, labels=list(labels))
            else:
                metric = HistogramMetricFamily(name, text, labels=list(labels))
            families[name] = found = (metric, labels)
        return found[0] if found[1] == labels else None

    for kind, key in (("counter", "counters"), ("gauge", "gauges")):
        items = dump.get(key)
        for raw in items if isinstance(items, list) else ():
            parsed = _series(raw)
            value = _number(raw[2]) if parsed is not None else None
            if parsed is None or value is None or parsed[0] in reserved or budget <= 0:
                continue
            name, pairs = parsed
            if kind == "counter" and not name.endswith("_total"):
                continue
            metric = family(kind, name, tuple(k for k, _ in pairs))
            if isinstance(metric, CounterMetricFamily | GaugeMetricFamily):
                metric.add_metric([v for _, v in pairs], value)
                budget -= 1
    items = dump.get("histograms")
    for raw in items if isinstance(items, list) else ():
        parsed = _series(raw)
        if parsed is None or budget <= 0 or len(raw) < 6:
            continue
        buckets = _histogram_buckets(raw[2], raw[3])
        total = _number(raw[4])
        if buckets is None or total is None:
            continue
        name, pairs = parsed
        metric = family("histogram", name, tuple(k for k, _ in pairs))
        if isinstance(metric, HistogramMetricFamily):
            metric.add_metric([v for _, v in pairs], buckets, total)
            budget -= 1
    for metric, _ in families.values():
        yield metric


def _histogram_buckets(bounds: object, counts: object) -> list[tuple[str, float]] | None:
    """Cumulative ``(le, count)`` pairs, ``+Inf`` last, from upper bounds and
    per-bucket (not cumulative) counts with one more entry for +Inf."""
    if not isinstance(bounds, list | tuple) or not isinstance(counts, list | tuple):
        return None
    if len(counts) != len(bounds) + 1:
        return None
    out: list[tuple[str, float]] = []
    running = 0.0
    for bound, count in zip([*bounds, float("inf")], counts, strict=True):
        number, size = _number(bound), _number(count)
        if number is None or size is None:
            return None
        running += size
        out.append(("+Inf" if number == float("inf") else repr(number), running))
    return out


def register_proxy_metrics(registry: CollectorRegistry, source: ProxySource) -> ProxyCollector:
    """Register the proxy collector on ``registry`` and return it."""
    collector = ProxyCollector(source)
    registry.register(collector)
    return collector
