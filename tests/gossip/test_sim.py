"""The simulator, with fixed seeds: protocol properties asserted in virtual time."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gossip import sim
from gossip.config import preset
from gossip.events import MemberState


def options(**kw: Any) -> sim.Options:
    base: dict[str, Any] = dict(nodes=50, seed=7, duration=60.0, updates=10)
    base.update(kw)
    return sim.Options(**base)


def test_a_seed_reproduces_a_run_exactly() -> None:
    first = sim.run(options(nodes=30, loss=0.05, duration=40))
    second = sim.run(options(nodes=30, loss=0.05, duration=40))
    assert first == second
    third = sim.run(options(nodes=30, loss=0.05, duration=40, seed=8))
    assert third != first


def test_formed_cluster_stays_formed_without_failures() -> None:
    s = sim.Simulation(40, preset("default"), seed=3, loss=0.05)
    s.run_until(30.0)
    for node in s.members:
        assert node.core.count(MemberState.ALIVE) == 40, node.name


def test_crashes_are_detected_everywhere_fast_and_nobody_else_dies() -> None:
    result = sim.run(options(nodes=100, loss=0.05, duration=90))
    assert result["crashes"] >= 10
    assert result["detected"] == result["crashes"]
    assert result["detect_p99_s"] <= 10.0, result
    assert result["false_dead"] == 0


def test_default_detects_faster_than_memberlist_lan() -> None:
    ours = sim.run(options(nodes=60, loss=0.05, duration=80))
    lan = sim.run(options(nodes=60, loss=0.05, duration=80, preset="lan"))
    assert ours["detect_p50_s"] < lan["detect_p50_s"]


def test_broadcast_reaches_every_member_within_the_transmit_budget() -> None:
    result = sim.run(options(scenario="broadcast", nodes=120, loss=0.10, updates=15))
    limit = preset("default").retransmit_limit(120)
    assert result["unreached"] == 0
    assert result["transmissions_per_member"] <= limit
    assert result["rounds_p99"] <= 9, result


def test_partition_heals_without_rejoin_but_not_with_memberlist_rules() -> None:
    ours = sim.run(options(scenario="partition", nodes=40, partition_seconds=40, duration=60))
    assert ours["members_that_saw_split"] == 40
    assert ours["healed_members"] == 40
    assert ours["heal_p99_s"] <= 30.0
    # memberlist #222: after GossipToTheDeadTime the other half is forgotten for good.
    lan = sim.run(
        options(scenario="partition", nodes=40, partition_seconds=40, duration=60, preset="lan")
    )
    assert lan["healed_members"] == 0


def test_key_rotation_in_three_steps_drops_nothing() -> None:
    result = sim.run(options(scenario="rotation", nodes=30, duration=50))
    assert result["dropped_packets"] == 0
    assert result["members_on_new_key"] == 30
    assert result["false_dead"] == 0


def test_using_a_key_before_everyone_installed_it_drops_packets() -> None:
    # The counter the rotation scenario asserts on does see a botched rotation.
    old, new = bytes(range(32)), bytes(range(32, 64))
    s = sim.Simulation(20, preset("default"), seed=5, keys=[old])
    s.run_until(5.0)
    early = s.members[0].core.envelope.keyring
    assert early is not None
    early.install(new)
    early.use(new)
    s.run_until(15.0)
    dropped = sum(n.core.stats.dropped.get("decrypt_failed", 0) for n in s.members)
    assert dropped > 0


@pytest.mark.slow
def test_lifeguard_keeps_healthy_members_alive_next_to_slow_ones() -> None:
    kw = dict(scenario="false-positives", nodes=40, loss=0.10, slow=0.05, duration=600)
    ours = sim.run(options(**kw))
    swim_only = sim.run(options(preset="swim", **kw))
    assert ours["slow_members"] == 2
    assert ours["false_dead"] == 0
    assert swim_only["suspicions_healthy"] > 3 * max(1, ours["suspicions_healthy"])


def test_join_converges() -> None:
    result = sim.run(options(scenario="join", nodes=100, duration=20))
    assert result["converged_members"] == 100
    assert result["converge_p99_s"] <= 3.0, result


def test_cli_prints_a_table_and_a_final_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = sim.main(
        ["--scenario", "crash", "--nodes", "20", "--duration", "30", "--seed", "3", "--quiet"]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    final = json.loads(lines[-1])
    for key in ("scenario", "nodes", "loss", "preset", "seed", "bytes_per_member_s"):
        assert key in final
    for key in ("detect_p50_s", "detect_p99_s", "false_dead"):
        assert key in final
    assert any(line.startswith("detect_p99_s") for line in lines[:-1])


def test_cli_refuses_unknown_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim.main(["--preset", "nope", "--nodes", "5"]) == 2
    assert "unknown gossip preset" in capsys.readouterr().err
