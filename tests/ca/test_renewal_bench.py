"""``bench/ca_renewal.py`` runs end to end and its simulation shows what ``ca.renewal``'s
jitter is for: virtual-time properties only, never a timing assertion."""

from __future__ import annotations

import json

import pytest

from bench.ca_renewal import main

SEED = 1
KEYS = {
    "bench",
    "services",
    "seed",
    "csr_samples",
    "sign_per_s",
    "steady_mean_per_s",
    "steady_peak_1s",
    "steady_peak_60s_per_s",
    "steady_cpu_share_mean",
    "steady_cpu_share_peak",
    "synchronized_peak_1s",
    "naive_peak_1s",
    "peak_ratio_vs_naive",
    "rotation_spread_s",
    "rotation_peak_1s",
    "rotation_cpu_share",
    "rotation_complete_s",
    "naive_rotation_peak_1s",
    "naive_rotation_complete_s",
    "startup_peak_1s",
    "startup_cpu_share",
    "startup_complete_s",
    "startup_echo_peak_1s",
    "naive_startup_echo_peak_1s",
}


def test_quick_run_reports_its_keys_and_jitter_flattens_every_peak(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--quick", "--seed", str(SEED)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    seed = f"seed {SEED}"
    missing = KEYS - summary.keys()
    assert not missing, sorted(missing)
    assert summary["bench"] == "ca_renewal"
    assert (summary["services"], summary["csr_samples"]) == (500, 10)
    assert summary["sign_per_s"] > 0
    # Without jitter, leaves issued in the same second are renewed in the same second.
    assert summary["naive_peak_1s"] == 500, seed
    assert summary["naive_rotation_peak_1s"] == 500, seed
    # With it, the same population spreads over 20 % of the TTL (14.4 h).
    assert summary["synchronized_peak_1s"] <= 0.05 * summary["naive_peak_1s"], seed
    assert summary["peak_ratio_vs_naive"] <= 0.05, seed
    assert summary["steady_peak_1s"] <= 0.05 * summary["naive_peak_1s"], seed
    assert summary["startup_echo_peak_1s"] < summary["naive_startup_echo_peak_1s"], seed
    # The re-issue wave is spread over rotation_spread, and every leaf gets replaced.
    assert summary["rotation_peak_1s"] * 4 <= summary["naive_rotation_peak_1s"], seed
    assert summary["rotation_complete_s"] <= summary["rotation_spread_s"] + 5, seed
    assert summary["startup_peak_1s"] < 500, seed
