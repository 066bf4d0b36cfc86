"""bench/proxy.py runs end to end (``--quick``): real HAProxy pairs over mutual TLS, wrk,
the paced client and the idle-connection memory probe. Its final JSON line's keys are
checked, never a timing: on a shared 2-core machine figures say nothing in a test."""

from __future__ import annotations

import json

import pytest

from bench import proxy

pytestmark = pytest.mark.slow

#: What issue 5 asks for per configuration, plus the figures behind its other targets.
KEYS = {
    "rps",
    "p50_us",
    "p99_us",
    "cpu_us_per_req",
    "vs_haproxy",
    "vs_direct",
    "close_rps",
    "close_vs_haproxy",
    "paced_p50_us",
    "paced_p99_us",
    "added_p50_us",
    "added_p99_us",
    "rss_mb",
    "backend_cpu_us_per_req",
}


def test_proxy_bench_quick(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        proxy.ensure_tools()  # installs haproxy and wrk from Debian's packages if missing
    except proxy.ToolsUnavailable as exc:
        pytest.skip(f"haproxy/wrk not installed and cannot be installed here: {exc}")
    capsys.readouterr()

    code = proxy.main(["--quick"])

    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["bench"] == "proxy"
    configurations = result["configurations"]
    assert list(configurations) == list(proxy.CONFIGURATIONS)
    assert {"direct", "haproxy-l7", "haproxy-l4"} <= configurations.keys()
    for name, figures in configurations.items():
        assert figures.keys() >= KEYS, name
        assert figures["rps"] > 0, name
        assert figures["close_rps"] > 0, name
    for name in ("haproxy-l7", "haproxy-l4"):
        figures = configurations[name]
        assert figures["vs_haproxy"] == 1.0, name  # each pair is its mode's reference
        assert figures["cpu_us_per_req"] > 0, name
        assert len(figures["rss_mb_per_process"]) == 2, name
    assert configurations["direct"]["vs_direct"] == 1.0
    assert configurations["direct"]["cpu_us_per_req"] is None  # no proxy process
    # The meshnode pair is not faked: until it is registered it is reported as missing,
    # and once it is, issue 5's targets are checked for it.
    candidates = {n for n, c in proxy.CONFIGURATIONS.items() if c.role == "candidate"}
    assert result["targets"].keys() == candidates
    assert set(result["not_built"]) == set(proxy.NOT_BUILT) - configurations.keys()
    if result["not_built"]:
        assert "meshnode pair: not built yet (issue 5)" in out
