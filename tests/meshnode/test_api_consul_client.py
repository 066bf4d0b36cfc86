"""The real py-consul client (sync, ``requests``-based) against a served API.

py-consul blocks, so the agent's API runs on its own event loop in a background
thread (dependencies.md: calling the sync client from the loop that hosts the server
would deadlock). Only the agent process is faked, as in ``test_api``.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry

from meshnode.api import build_app, serve
from meshnode.catalog import SERF_CHECK_ID, Catalog
from meshnode.config import AclConfig
from meshnode.model import HealthStatus, NodeInfo
from tests.meshnode.test_api import FakeAgent

consul = pytest.importorskip("consul")

T = TypeVar("T")


class ServedAgent:
    """The API served on 127.0.0.1:<free port> from a loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.catalog: Catalog | None = None
        self.agent: FakeAgent | None = None
        self.port = 0
        self._runner: Any = None

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def on_loop(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the server's loop (the catalog is single-threaded)."""

        async def call() -> T:
            return function()

        return self.run(call())

    async def _start(self) -> None:
        self.catalog = Catalog(NodeInfo("node1", "id-node1", "127.0.0.1", "dc1"))
        self.agent = FakeAgent(self.catalog)
        app = build_app(
            self.agent,
            self.catalog,
            acl=AclConfig(),
            registry=CollectorRegistry(),
            datacenter="dc1",
            node_name="node1",
            rng=random.Random(3),
        )
        self._runner, self.port = await serve(app, "127.0.0.1", 0)

    def start(self) -> None:
        self.thread.start()
        self.run(self._start())

    def stop(self) -> None:
        if self._runner is not None:
            self.run(self._runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def served() -> Iterator[ServedAgent]:
    agent = ServedAgent()
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


def test_py_consul_end_to_end(served: ServedAgent) -> None:
    client = consul.Consul(host="127.0.0.1", port=served.port)

    assert client.agent.self()["Config"]["Datacenter"] == "dc1"
    assert client.agent.service.register(
        "web",
        service_id="web-1",
        port=8080,
        tags=["v1"],
        check=consul.Check.http("http://127.0.0.1:1/health", "10s", timeout="1s"),
        extra_checks=[{**consul.Check.ttl("30s"), "CheckID": "web-ttl"}],
    )
    services = client.agent.services()
    assert services["web-1"]["Service"] == "web" and services["web-1"]["Port"] == 8080
    checks = client.agent.checks()
    assert sorted(checks) == ["service:web-1:1", "web-ttl"]

    index, nodes = client.catalog.service("web")
    assert int(index) >= 1
    assert [(n["Node"], n["ServiceID"], n["ServicePort"]) for n in nodes] == [
        ("node1", "web-1", 8080)
    ]
    index, services_by_name = client.catalog.services()
    assert services_by_name == {"web": ["v1"]}

    _, entries = client.health.service("web")
    assert len(entries) == 1
    assert entries[0]["Checks"][0]["CheckID"] == SERF_CHECK_ID
    _, passing = client.health.service("web", passing=True)
    assert passing == []  # both checks start critical

    # The HTTP check never runs here (the fake agent runs no checks): set it passing
    # as the check runner would, then drive the TTL check through the API.
    assert served.catalog is not None
    catalog = served.catalog
    served.on_loop(lambda: catalog.update_check("service:web-1:1", HealthStatus.PASSING))
    assert client.agent.check.ttl_pass("web-ttl", "fine")
    _, passing = client.health.service("web", passing=True)
    assert [e["Service"]["ID"] for e in passing] == ["web-1"]
    assert client.agent.check.ttl_fail("web-ttl", "broken")
    _, passing = client.health.service("web", passing=True)
    assert passing == []
    _, checks_list = client.health.checks("web")
    ttl = next(c for c in checks_list if c["CheckID"] == "web-ttl")
    assert ttl["Status"] == "critical" and ttl["Output"] == "broken"

    # A blocking query returns when the service changes.
    index, _ = client.health.service("web")
    result: dict[str, Any] = {}

    def blocking() -> None:
        started = time.monotonic()
        result["index"], result["entries"] = client.health.service(
            "web", index=index, wait="20s", passing=True
        )
        result["elapsed"] = time.monotonic() - started

    waiter = threading.Thread(target=blocking)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()
    assert consul.Consul(host="127.0.0.1", port=served.port).agent.check.ttl_pass("web-ttl")
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert int(result["index"]) > int(index)
    assert [e["Service"]["ID"] for e in result["entries"]] == ["web-1"]
    assert result["elapsed"] < 10

    # A blocking query with nothing changing times out with the same index.
    index, _ = client.catalog.services()
    started = time.monotonic()
    same, _ = client.catalog.services(index=index, wait="1s")
    assert same == index
    assert 0.9 <= time.monotonic() - started < 3

    assert client.agent.service.maintenance("web-1", True, "deploying")
    assert "_service_maintenance:web-1" in client.agent.checks()
    assert client.agent.service.maintenance("web-1", False)

    assert client.agent.service.deregister("web-1")
    assert client.agent.services() == {}
    _, nodes = client.catalog.service("web")
    assert nodes == []
    assert served.agent is not None and served.agent.changed >= 5
