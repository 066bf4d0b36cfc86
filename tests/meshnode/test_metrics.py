"""The catalog collector reports what the catalog holds, at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from meshnode.catalog import Catalog
from meshnode.metrics import register_catalog_metrics
from meshnode.model import NodeInfo, parse_registration


def test_catalog_metrics_follow_the_catalog() -> None:
    catalog = Catalog(NodeInfo("n1", "id-1", "127.0.0.1", "dc1"))
    registry = CollectorRegistry()
    register_catalog_metrics(registry, catalog)
    before = generate_latest(registry).decode()
    assert "meshnode_catalog_nodes 1.0" in before
    assert "meshnode_catalog_services 0.0" in before

    service, checks = parse_registration({"Name": "web", "Port": 80})
    catalog.register_service(service, checks)
    after = generate_latest(registry).decode()
    assert "meshnode_catalog_services 1.0" in after
    index = next(line for line in after.splitlines() if line.startswith("meshnode_catalog_index"))
    assert float(index.split()[1]) > 1
