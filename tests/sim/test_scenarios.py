"""Simulator scenarios with bounds (tests/sim/scenarios/*.yaml), determinism, and the production classes.

Each scenario runs the production arbiter and policies on a small seeded cluster and checks the bounds
written (and explained) in its YAML.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tidal.cluster.arbiter
import tidal.policies.guards
import tidal.policies.priority
import tidal.policies.static_split
from tidal.cluster.sim.scenario import check_bounds, load_scenario, run_scenario, scenario_inputs
from tidal.cluster.sim.simulator import Simulator

SCENARIOS = Path(__file__).parent / "scenarios"
SIM_DIR = Path(tidal.cluster.arbiter.__file__).parent / "sim"
TIMING_KEYS = {
    "wall_s", "cpu_s", "tick_cpu_s", "decide_cpu_s", "sim_cpu_s", "decide_ms_mean", "decide_ms_p99", "decide_ms_max"
}


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.stem)
def test_scenario_stays_within_its_bounds(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.bounds, f"{path.name} has no bounds: a scenario without bounds cannot fail"
    _, results = run_scenario(scenario)
    assert check_bounds(scenario, results) == []


def _without_timing(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in TIMING_KEYS}


def test_same_seed_gives_the_same_results() -> None:
    scenario = load_scenario(SCENARIOS / "burst.yaml")
    _, first = run_scenario(scenario)
    _, second = run_scenario(scenario)
    for policy in scenario.policies:
        assert _without_timing(first[policy]) == _without_timing(second[policy])


def test_another_seed_changes_what_is_seeded() -> None:
    scenario = load_scenario(SCENARIOS / "diurnal_day.yaml")
    inputs = scenario_inputs(scenario)
    other = scenario.model_copy(update={"sim": {**scenario.sim, "seed": 7}})
    a = Simulator(inputs, "tidal")
    b = Simulator(scenario_inputs(other), "tidal")
    from tidal.cluster.sim.workloads import training_spec

    types_a = [training_spec(j, a.cfg.training, a.cluster_types, a.cfg.seed).gpu_types for j in inputs.jobs]
    types_b = [training_spec(j, b.cfg.training, b.cluster_types, b.cfg.seed).gpu_types for j in inputs.jobs]
    assert types_a != types_b


def test_simulator_runs_the_production_arbiter_and_policies() -> None:
    inputs = scenario_inputs(load_scenario(SCENARIOS / "burst.yaml"))
    for name, inner in (
        ("tidal", tidal.policies.priority.TidalPolicy),
        ("static", tidal.policies.static_split.StaticSplitPolicy),
    ):
        sim = Simulator(inputs, name)
        assert type(sim.arbiter) is tidal.cluster.arbiter.ResourceArbiter
        assert type(sim.policy) is tidal.policies.guards.GuardedPolicy
        assert type(sim.policy.inner) is inner
    result = Simulator(inputs, "tidal").run()
    assert result["ticks"] > 0 and result["preemptions"] > 0


def test_simulator_package_defines_no_policy_and_no_simulate_switch() -> None:
    offending = []
    for path in sorted(SIM_DIR.glob("*.py")):
        text = path.read_text()
        for needle in ("def decide(", "class Tidal", "if simulate", "SIMULATE"):
            if needle in text:
                offending.append(f"{path.name}: {needle}")
    # Production code never branches on being simulated.
    switch = re.compile(r"^\s*(if|elif)\b.*simulat|simulat\w*\s*[:=]", re.IGNORECASE | re.MULTILINE)
    for path in [Path(tidal.cluster.arbiter.__file__), *Path(tidal.policies.priority.__file__).parent.glob("*.py")]:
        if switch.search(path.read_text()):
            offending.append(f"{path.name}: branches on simulation")
    assert offending == []


def test_arbiter_ticks_are_never_closer_than_the_min_gap_nor_further_than_the_period() -> None:
    # As in the actor's loop, an early (event-driven) tick restarts the timer: the periodic tick does not
    # follow it within tick_s (before, a periodic tick on a fixed grid could land right behind it).
    scenario = load_scenario(SCENARIOS / "burst.yaml")
    sim = Simulator(scenario_inputs(scenario), "tidal")
    times: list[float] = []
    sim.arbiter.listeners.append(lambda report: times.append(report.now_s))
    sim.run()
    loop = sim.cfg.arbiter
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) > 10
    assert min(gaps) >= loop.event_tick_min_gap_s - 1e-9
    assert max(gaps) <= loop.tick_s + 1e-9
    # Early ticks happened (registrations, releases), so the check above covered them.
    assert any(g < loop.tick_s - 1e-9 for g in gaps)


def test_a_comparison_outside_its_ratio_is_reported_and_one_inside_is_not() -> None:
    from tidal.cluster.sim.scenario import Comparison, ScenarioModel, check_bounds, comparisons

    scenario = ScenarioModel(
        name="cmp",
        cluster={"node_groups": [{"gpu_type": "H100", "count": 1, "num_gpus": 8}]},
        compare=[
            Comparison(policy="tidal", metric="avg_jct_s", of_policy="static", max_ratio=0.6667),
            Comparison(policy="tidal", metric="gpu_allocation_ratio", of_metric="oracle_allocation_ratio", min_ratio=0.95),
        ],
    )
    results = {
        "tidal": {"avg_jct_s": 100.0, "gpu_allocation_ratio": 0.90, "oracle_allocation_ratio": 1.0},
        "static": {"avg_jct_s": 120.0},
    }
    problems = check_bounds(scenario, results)
    assert len(problems) == 2
    assert "tidal.avg_jct_s / static.avg_jct_s = 100 / 120 = 0.8333" in problems[0]
    assert "outside [0.95, None]" in problems[1]
    results["tidal"].update(avg_jct_s=60.0, gpu_allocation_ratio=0.99)
    assert check_bounds(scenario, results) == []
    assert comparisons(scenario, results)["tidal.avg_jct_s / static.avg_jct_s"] == 0.5


def test_a_comparison_without_a_ratio_or_a_reference_is_refused() -> None:
    from pydantic import ValidationError
    from tidal.cluster.sim.scenario import Comparison

    with pytest.raises(ValidationError, match="min_ratio, max_ratio"):
        Comparison(policy="tidal", metric="avg_jct_s", of_policy="static")
    with pytest.raises(ValidationError, match="of_policy, of_metric"):
        Comparison(policy="tidal", metric="avg_jct_s", max_ratio=1.0)
