"""The catalog over real ``Swim`` cores on ``gossip.sim``'s simulated network.

``Simulation`` builds its members with its own ``SimDelegate``; we swap in a
``CatalogDelegate`` per core (``core.delegate`` is the hook the core calls) and feed
member events to each catalog through ``sim.event_hooks``. Virtual time, seeded:
every run is the same.
"""

from __future__ import annotations

from collections.abc import Callable

from gossip.broadcast import BroadcastQueue
from gossip.config import preset
from gossip.events import (
    Event,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    MemberReaped,
    MemberRecovered,
    MemberSuspected,
    MemberUpdated,
)
from gossip.sim import Simulation
from meshnode.catalog import Catalog, CatalogDelegate
from meshnode.model import HealthStatus, NodeInfo, parse_registration

MEMBER_EVENTS = (
    MemberJoined,
    MemberUpdated,
    MemberSuspected,
    MemberRecovered,
    MemberFailed,
    MemberLeft,
    MemberReaped,
)


class LossyDelegate(CatalogDelegate):
    """Loses every catalog broadcast it sends while ``lose`` is set (they are taken
    from the queue, and so count as sent, but never arrive)."""

    lose = False

    def broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        messages = super().broadcasts(overhead, limit)
        return [] if self.lose else messages


class Cluster:
    def __init__(self, size: int, *, seed: int, loss: float = 0.0) -> None:
        config = preset("default")
        self.sim = Simulation(size, config, seed=seed, loss=loss)
        self.catalogs: list[Catalog] = []
        self.delegates: list[LossyDelegate] = []
        for node in self.sim.members:
            queue = BroadcastQueue(
                config.retransmit_mult,
                lambda: len(self.sim.members),
                retransmit_min=config.retransmit_min,
            )
            catalog = Catalog(
                NodeInfo(node.name, f"id-{node.index}", node.address[0], "dc1"), queue=queue
            )
            delegate = LossyDelegate(catalog)
            node.core.delegate = delegate
            self.catalogs.append(catalog)
            self.delegates.append(delegate)
        self.sim.event_hooks.append(self._on_event)

    def _on_event(self, index: int, event: Event, now: float) -> None:
        if isinstance(event, MEMBER_EVENTS):
            self.catalogs[index].on_member_event(event, now)

    def run_until(self, predicate: Callable[[], bool], limit: float, step: float = 0.1) -> float:
        """Advance virtual time until ``predicate()`` holds; returns the time taken."""
        start = self.sim.now
        while not predicate():
            assert self.sim.now - start < limit, f"not within {limit}s (seed {self.sim.seed})"
            self.sim.run_until(self.sim.now + step)
        return self.sim.now - start

    def converged(self) -> bool:
        live = [self.catalogs[n.index] for n in self.sim.live()]
        return len({c.state_digest() for c in live}) == 1 and all(
            len(c.records()) == len(live) for c in live
        )


def register(catalog: Catalog, body: dict[str, object]) -> None:
    service, checks = parse_registration(body)
    catalog.register_service(service, checks)


def test_registration_spreads_and_deregistration_too() -> None:
    cluster = Cluster(5, seed=1)
    a, c = cluster.catalogs[0], cluster.catalogs[2]
    cluster.run_until(cluster.converged, limit=10)
    register(a, {"Name": "web", "Port": 80, "Check": {"TTL": "10s"}})
    a.update_check("service:web", HealthStatus.PASSING, "ok")
    cluster.run_until(lambda: bool(c.health_service("web", passing_only=True)), limit=3)
    (instance,) = c.health_service("web")
    assert instance.node.name == "m00000" and instance.service.port == 80
    a.deregister_service("web")
    cluster.run_until(lambda: "web" not in c.services(), limit=3)
    cluster.run_until(cluster.converged, limit=10)


def test_lost_broadcasts_are_repaired_by_push_pull() -> None:
    cluster = Cluster(5, seed=2)
    cluster.run_until(cluster.converged, limit=10)
    origin = cluster.delegates[0]
    origin.lose = True
    register(cluster.catalogs[0], {"Name": "api", "Port": 9000})
    cluster.sim.run_until(cluster.sim.now + 2.0)
    assert len(origin.catalog.queue) == 0  # every copy was "sent" and lost
    assert not any("api" in c.services() for c in cluster.catalogs[1:])
    origin.lose = False
    before = [d.repaired_by_push_pull for d in cluster.delegates]
    cluster.run_until(lambda: all("api" in c.services() for c in cluster.catalogs), limit=20)
    after = [d.repaired_by_push_pull for d in cluster.delegates]
    # Nobody heard the broadcast: everyone learned the record by anti-entropy.
    assert all(after[i] > before[i] for i in range(1, 5))
    for catalog in cluster.catalogs[1:]:
        assert catalog.stats["deltas_applied"] == 0


def test_crash_makes_instances_critical_through_serf_health() -> None:
    cluster = Cluster(5, seed=3)
    a, c = cluster.catalogs[0], cluster.catalogs[2]
    register(a, {"Name": "web", "Port": 80})
    cluster.run_until(lambda: bool(c.health_service("web", passing_only=True)), limit=10)
    index = c.service_index("web")
    cluster.sim.crash(0)
    took = cluster.run_until(lambda: not c.health_service("web", passing_only=True), limit=15)
    (instance,) = c.health_service("web")
    assert instance.status == HealthStatus.CRITICAL
    assert instance.checks[0].check_id == "serfHealth"
    assert c.service_index("web") > index  # blocking queries on "web" wake
    assert took < 10


def test_catalogs_converge_under_packet_loss() -> None:
    cluster = Cluster(8, seed=4, loss=0.2)
    for i, catalog in enumerate(cluster.catalogs):
        register(catalog, {"Name": f"svc{i % 3}", "ID": f"svc-{i}", "Tags": [f"t{i}"]})
    cluster.run_until(cluster.converged, limit=30)
    expected = cluster.catalogs[0].services()
    assert all(c.services() == expected for c in cluster.catalogs)
    assert len(cluster.catalogs[5].service_instances("svc1")) == 3
