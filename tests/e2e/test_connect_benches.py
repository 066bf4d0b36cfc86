"""The Connect benchmarks run end to end on real agents (``--quick``) and report their
figures: the keys of each final JSON line are checked, never a timing."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from bench import ca_failover, ca_issue, policy_propagation

pytestmark = pytest.mark.slow

SUMMARY_KEYS = {"p50_s", "p99_s", "max_s"}


def run_quick(main: Callable[[list[str]], int], capsys: pytest.CaptureFixture[str]) -> Any:
    code = main(["--quick"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_policy_propagation_quick(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_quick(policy_propagation.main, capsys)
    assert result["bench"] == "policy_propagation"
    assert (result["agents"], result["servers"], result["writes"]) == (5, 3, 5)
    for kind in ("policy_in_force", "policy_present", "catalog"):
        assert result[kind]["all_agents"].keys() >= SUMMARY_KEYS, kind
        assert result[kind]["all_agents"]["samples"] == 5, kind
        assert result[kind]["per_agent"]["samples"] == 25, kind
        assert "write_p50_s" in result[kind], kind
    assert {"p50_s", "p99_s", "per_agent_p50_s"} <= result["ratio_policy_to_catalog"].keys()
    assert isinstance(result["target_met"], bool)


def test_ca_failover_quick(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_quick(ca_failover.main, capsys)
    assert result["bench"] == "ca_failover"
    assert (result["servers"], result["kills"]) == (5, 3)
    for key in ("leader", "leaf", "policy", "ca_usable", "restart_caught_up"):
        assert result[key].keys() >= SUMMARY_KEYS, key
    assert result["simulated"].keys() >= SUMMARY_KEYS
    for key in (
        "ratio_leader_p99_to_target",
        "ratio_ca_usable_p99_to_target",
        "ratio_leader_p99_to_simulated_p99",
        "ratio_leader_p99_to_election_timeout",
        "target_met",
    ):
        assert key in result, key
    # Correctness, not timing: failover keeps the one CA and one leader per term.
    assert result["root_changed_rounds"] == 0
    assert result["leaf_not_signed_by_root_rounds"] == 0
    assert result["terms_with_two_leaders"] == 0


def test_ca_issue_quick(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_quick(ca_issue.main, capsys)
    assert result["bench"] == "ca_issue"
    assert (result["services"], result["clients"]) == (20, 2)
    for phase in ("proactive", "on_demand"):
        assert {"all_issued_s", "certs_per_s", "signed", "refused"} <= result[phase].keys()
        assert result[phase]["certs_per_s"] > 0
    assert result["proactive"]["read_back_not_ok"] == 0
    assert result["in_process"]["certs_per_s"] > 0
    assert "ratio_proactive_to_in_process" in result
    assert "ratio_on_demand_to_in_process" in result
