"""The forward proxy's choice of upstream (the listener itself runs in
tests/e2e/test_mesh_proxy.py, across two agents)."""

from __future__ import annotations

from random import Random

import pytest

from proxy.l7.forward import forward_target
from proxy.l7.http import RequestHead
from proxy.runtime import compile_snapshot
from proxy.snapshot import (
    Certificate,
    Cluster,
    ForwardProxy,
    Route,
    Snapshot,
    SnapshotError,
    SplitTarget,
    Upstream,
    check,
)


def head(target: bytes, host: str | None = None) -> RequestHead:
    request = RequestHead()
    request.target = target
    fields = [] if host is None else [b"host: " + host.encode() + b"\r\n"]
    request.fields = fields
    request.names = [b"host"] if host is not None else []
    request.values = [host.encode()] if host is not None else []
    return request


@pytest.mark.parametrize(
    ("target", "host", "expected"),
    [
        (b"http://api/users?x=1", None, ("api", b"/users?x=1")),
        (b"HTTP://api.service.consul:8080", None, ("api.service.consul:8080", b"/")),
        (b"http://api?x=1", None, ("api", b"/?x=1")),
        (b"/users", "api", ("api", b"/users")),
        (b"/users", None, ("", b"/users")),
    ],
)
def test_forward_target(target: bytes, host: str | None, expected: tuple[str, bytes]) -> None:
    assert forward_target(head(target, host)) == expected


def _snapshot(hosts: dict[str, str]) -> Snapshot:
    certificate = Certificate("chain", "key", "spiffe://td/ns/default/dc/dc1/svc/web")
    upstream = Upstream(
        "web",
        "api",
        "127.0.0.1",
        15001,
        certificate,
        (Route("api/default", (SplitTarget(10_000, "api"),)),),
        {"api": Cluster("api", "api", "spiffe://td/ns/default/dc/dc1/svc/api", ())},
        protocol="http",
    )
    forward = ForwardProxy("web", "127.0.0.1", 15000, hosts)
    return Snapshot(1, "td", ("root",), upstreams=(upstream,), forward_proxies=(forward,))


def test_runtime_for_ignores_case_and_port() -> None:
    compiled = compile_snapshot(_snapshot({"api": "api"}), None, Random(1))
    forward = compiled.forwards[("127.0.0.1", 15000)]
    api = compiled.upstreams[("127.0.0.1", 15001)]
    assert forward.runtime_for("API:80") is api
    assert forward.runtime_for("api") is api
    assert forward.runtime_for("billing") is None


def test_a_host_must_name_an_upstream_of_the_source() -> None:
    with pytest.raises(SnapshotError, match="has no upstream 'db'"):
        check(_snapshot({"db": "db"}))
