"""``bench/proxy_cores.py`` runs and reports every case; no timing is asserted here."""

from __future__ import annotations

import json

import pytest

from bench.proxy_cores import main


def test_quick_run_reports_every_case_against_the_baseline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--quick", "--endpoints", "4"]) == 0
    output = capsys.readouterr().out
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["bench"] == "proxy_cores"
    assert summary["endpoints"] == 4
    assert summary["baseline_us"] > 0
    assert summary["us"].keys() == summary["vs_baseline"].keys()
    assert len(summary["us"]) >= 20
    for name, cost in summary["us"].items():
        assert cost > 0, name
        assert name in output  # and in the table
    assert summary["vs_baseline"]["baseline: dict lookup + random()"] == 1.0
