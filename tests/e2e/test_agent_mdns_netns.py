"""Real ``meshnode agent`` processes in network namespaces find each other by mDNS.

Four "hosts" on one bridge (``tests/netns.py``): ``n1``-``n3`` run cluster ``alpha``,
``n4`` runs ``beta``. No agent has a join address; mDNS is its only way in. Each agent
serves its HTTP API on 127.0.0.1:8500 *of its own namespace* (the default a real host
would use), so every query is made from inside that namespace, by a short Python
process under ``ip netns exec`` (the test's ``curl``).

Asserted: the alpha agents see exactly the three alpha members alive, beta sees only
itself although it heard alpha's announcements (its debug log names them as
``mdns_other_cluster``), a service registered at ``n1`` reaches ``n2``'s and ``n3``'s
catalogs and not beta's, and every agent leaves cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from tests.netns import NetnsLab, open_netns_lab

pytestmark = [pytest.mark.netns, pytest.mark.slow]

#: Each agent's API, on the loopback of its own namespace.
HTTP_PORT: Final = 8500
GOSSIP_PORT: Final = 7946
CLUSTERS: Final = {"n1": "alpha", "n2": "alpha", "n3": "alpha", "n4": "beta"}
ALPHA: Final = ["n1", "n2", "n3"]
#: Agents start in ~1-2 s each (4 at once on 2 cores), mDNS probing takes ~0.75 s
#: (RFC 6762 §8.1), then one resolve and a push-pull.
FORM_WITHIN: Final = 30.0
#: A registration rides on gossip (200 ms rounds) and push-pull (2 s); both are fast.
SPREAD_WITHIN: Final = 10.0
STOP_WITHIN: Final = 10.0

#: Run inside a namespace: ``METHOD URL BODY`` → the response body on stdout.
QUERY_SCRIPT: Final = """\
import sys, urllib.request
method, url, body = sys.argv[1:4]
request = urllib.request.Request(url, data=body.encode() or None, method=method)
with urllib.request.urlopen(request, timeout=3) as response:
    sys.stdout.write(response.read().decode() or "null")
"""


class QueryError(Exception):
    """The query process failed (agent not up yet, or refused the request)."""


def query(namespace: str, method: str, path: str, body: object = None) -> Any:
    """``METHOD http://127.0.0.1:8500<path>`` from inside ``namespace``; decoded JSON."""
    completed = subprocess.run(
        [
            "ip", "netns", "exec", namespace, sys.executable, "-I", "-S", "-c", QUERY_SCRIPT,
            method, f"http://127.0.0.1:{HTTP_PORT}{path}",
            "" if body is None else json.dumps(body),
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )  # fmt: skip
    if completed.returncode != 0:
        raise QueryError(completed.stderr.strip().splitlines()[-1:])
    return json.loads(completed.stdout)


def alive_members(namespace: str) -> list[str]:
    """Names an agent reports alive (serf status 1, not suspect), sorted."""
    entries = query(namespace, "GET", "/v1/agent/members")
    return sorted(e["Name"] for e in entries if e["Status"] == 1 and "State" not in e)


def other_clusters_heard(log: Path) -> set[str]:
    """mDNS instances of other clusters the agent resolved and turned down."""
    heard = set()
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("event") == "mdns_other_cluster":
            heard.add(str(event.get("instance", "")).split(".", 1)[0])
    return heard


def wait_until(check: Callable[[], bool], within: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + within
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (QueryError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
            last = exc
        time.sleep(0.25)
    raise AssertionError(f"not within {within} s: {what()} (last error: {last!r})")


@pytest.fixture
def netns_lab() -> Iterator[NetnsLab]:
    with open_netns_lab() as lab:
        yield lab


def test_agents_form_one_cluster_per_name_by_mdns_and_share_the_catalog(
    netns_lab: NetnsLab, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHNODE_")}
    env["MESHNODE_MDNS__ENABLED"] = "true"
    env["MESHNODE_PROXY__ENABLED"] = "false"
    namespaces: dict[str, str] = {}
    logs: dict[str, Path] = {}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    for index, (name, cluster) in enumerate(CLUSTERS.items(), start=1):
        namespace, address = netns_lab.add_host(index)
        namespaces[name] = namespace
        logs[name] = tmp_path / f"{name}.log"
        args = [
            "-m", "meshnode.cli", "agent",
            "--node", name,
            "--cluster", cluster,
            "--bind", address,
            "--gossip-port", str(GOSSIP_PORT),
            "--http-addr", f"127.0.0.1:{HTTP_PORT}",
            "--data-dir", str(tmp_path / name),
            "--log-format", "json",
            "--log-level", "debug",  # for mdns_other_cluster
        ]  # fmt: skip
        processes[name] = netns_lab.spawn(namespace, args, logs[name], env=env)

    views: dict[str, list[str]] = {}

    def diagnostics() -> str:
        exited = {n: p.returncode for n, p in processes.items() if p.poll() is not None}
        tails = {n: logs[n].read_text(errors="replace")[-1500:] for n in logs}
        return (
            f"views: {views}\nexited: {exited}\nlogs: {json.dumps(tails, indent=1)}"
            if exited or views
            else f"no agent answered\nlogs: {json.dumps(tails, indent=1)}"
        )

    def settled() -> bool:
        assert all(p.poll() is None for p in processes.values()), "an agent died\n" + diagnostics()
        for name in CLUSTERS:
            views[name] = alive_members(namespaces[name])
        heard_by_beta = other_clusters_heard(logs["n4"])
        return (
            all(views[n] == ALPHA for n in ALPHA)
            and views["n4"] == ["n4"]
            # Beta's isolation is a decision, not deafness: it resolved every alpha
            # announcement and turned it down, and alpha turned beta down.
            and set(ALPHA) <= heard_by_beta
            and all("n4" in other_clusters_heard(logs[n]) for n in ALPHA)
        )

    wait_until(settled, FORM_WITHIN, lambda: "one alpha cluster, beta alone\n" + diagnostics())
    # Beta stays alone for a while longer, with alpha's announcements in plain view.
    time.sleep(1.0)
    for name in CLUSTERS:
        views[name] = alive_members(namespaces[name])
    assert {n: views[n] for n in ALPHA} == dict.fromkeys(ALPHA, ALPHA), diagnostics()
    assert views["n4"] == ["n4"], diagnostics()

    # A registration at n1 reaches the other alpha catalogs, and not beta's.
    registration = {"Name": "web", "ID": "web-n1", "Port": 8080, "Tags": ["alpha"]}
    query(namespaces["n1"], "PUT", "/v1/agent/service/register", registration)
    assert "web-n1" in query(namespaces["n1"], "GET", "/v1/agent/services")

    def web_nodes(name: str) -> list[str]:
        instances = query(namespaces[name], "GET", "/v1/catalog/service/web")
        return sorted(f"{i['Node']}/{i['ServiceID']}" for i in instances)

    def reached(name: str) -> Callable[[], bool]:
        return lambda: web_nodes(name) == ["n1/web-n1"]

    for name in ("n2", "n3"):
        wait_until(
            reached(name), SPREAD_WITHIN, lambda: "web-n1 in every alpha catalog\n" + diagnostics()
        )
        services = query(namespaces[name], "GET", "/v1/catalog/services")
        assert services.get("web") == ["alpha"], services
    beta_services = query(namespaces["n4"], "GET", "/v1/catalog/services")
    assert "web" not in beta_services, f"alpha's service reached beta: {beta_services}"
    assert web_nodes("n4") == []

    # A clean stop: each agent leaves, closes mDNS (a goodbye) and exits 0.
    for process in processes.values():
        process.send_signal(signal.SIGTERM)
    codes = {name: process.wait(timeout=STOP_WITHIN) for name, process in processes.items()}
    assert codes == dict.fromkeys(CLUSTERS, 0), diagnostics()
