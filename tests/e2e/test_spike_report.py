"""How bench/spike.py combines runs into the figures of bench/results/spike.json (pure, no Ray)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def spike():
    spec = importlib.util.spec_from_file_location("spike_bench", ROOT / "bench" / "spike.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(ttc, *, failed=0, lost=0, slo=1.0, back=20.0, requests=100, goodput=0.9, reclaims_after=0):
    return {
        "time_to_capacity_s": ttc, "reclaim_s": 1.5, "p50_ms": 90.0, "p99_ms": 300.0, "spike_p99_ms": 400.0,
        "requests": requests, "failed_requests": failed, "slo_attainment": slo, "train_steps": 1000,
        "lost_steps": lost, "gpu_allocation_ratio": 0.9, "gpus_back_to_training_s": back,
        "training_goodput": goodput, "post_spike_reclaims": reclaims_after,
    }  # fmt: skip


def test_time_to_capacity_is_the_median_of_the_runs(spike):
    agg = spike.aggregate([run(9.0), run(7.0), run(12.0)])
    assert agg["time_to_capacity_s"] == 9.0 == agg["time_to_capacity_s_median"]
    assert agg["time_to_capacity_s_runs"] == [9.0, 7.0, 12.0]


def test_time_to_capacity_is_null_when_most_runs_never_reach_capacity(spike):
    assert spike.aggregate([run(None), run(None), run(8.0)])["time_to_capacity_s"] is None
    assert spike.aggregate([run(None), run(8.0), run(9.0)])["time_to_capacity_s"] == 8.5


def test_counts_add_up_and_slo_attainment_is_pooled_over_requests(spike):
    agg = spike.aggregate([run(5.0, failed=1, lost=2, slo=0.9, requests=100), run(5.0, slo=1.0, requests=300)])
    assert agg["failed_requests"] == 1 and agg["lost_steps"] == 2 and agg["requests"] == 400
    assert agg["slo_attainment"] == pytest.approx((90 + 300) / 400)


def test_training_goodput_and_post_spike_reclaims_are_the_worst_run(spike):
    agg = spike.aggregate([run(5.0, goodput=0.92), run(5.0, goodput=0.78, reclaims_after=1), run(5.0)])
    assert agg["training_goodput"] == 0.78 and agg["training_goodput_runs"] == [0.92, 0.78, 0.9]
    assert agg["post_spike_reclaims"] == 1


def test_gpus_back_to_training_is_the_worst_run_and_null_if_any_run_never_got_them_back(spike):
    assert spike.aggregate([run(5.0, back=20.0), run(5.0, back=41.0)])["gpus_back_to_training_s"] == 41.0
    assert spike.aggregate([run(5.0, back=20.0), run(5.0, back=None)])["gpus_back_to_training_s"] is None


def test_report_checks_the_targets_against_serve_on_free_gpus(spike):
    from tidal.demo.scenario import DEFAULT_POLICY_PATH, load_scenario

    class R:
        def __init__(self, figures):
            self.figures, self.timings = figures, {}

    results = {"tidal": [R(run(8.0)), R(run(9.0)), R(run(10.0))], "serve-only": [R(run(7.0))], "ray-alone": [R(run(None))]}
    args = argparse.Namespace(policy=str(DEFAULT_POLICY_PATH), argv=["--runs", "3"])
    doc = spike.build_report(results, load_scenario(), args, "t", 1.0, [], set())
    assert doc["systems"]["tidal"]["time_to_capacity_s"] == 9.0
    assert doc["systems"]["ray-alone"]["time_to_capacity_s"] is None
    assert doc["tidal_time_to_capacity_vs_free_gpus"] == pytest.approx(9.0 / 7.0)
    assert all(doc["targets_met"].values())
    assert doc["slo"]["latency_ms"] == 1000
    assert doc["command"].endswith("bench/spike.py --runs 3")
