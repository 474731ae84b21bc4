"""The trace-job spec rule, the simulator's config validation, and `tidal simulate` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tidal.cluster.sim.config import SimConfigError, TrainingModelConfig, load_sim_config
from tidal.cluster.sim.report import SUMMARY_KEYS
from tidal.cluster.sim.traces import TrainingJobRecord
from tidal.cluster.sim.workloads import training_spec

TYPES = ["H200", "H100", "A100", "RTX4090"]


def _record(index: int, num_gpus: int, gpu_type: str | None = None) -> TrainingJobRecord:
    return TrainingJobRecord(index, 0.0, 3600.0, num_gpus, gpu_type, None)


def test_job_spec_rule_sizes_workers_from_the_requested_gpus() -> None:
    spec = training_spec(_record(0, 8), TrainingModelConfig(min_fraction=0.5, max_scale=2.0), TYPES, seed=0)
    assert (spec.gpus_per_worker, spec.min_workers, spec.max_workers) == (1.0, 4, 16)
    one = training_spec(_record(1, 1), TrainingModelConfig(), TYPES, seed=0)
    assert (one.min_workers, one.max_workers) == (1, 2)


def test_multi_node_jobs_never_get_single_node_types_and_a_trace_type_is_kept() -> None:
    model = TrainingModelConfig()
    for i in range(300):
        assert "RTX4090" not in training_spec(_record(i, 16), model, TYPES, seed=0).gpu_types
    assert training_spec(_record(0, 4, "A100"), model, TYPES, seed=0).gpu_types == ("A100",)


def test_accepted_types_follow_the_class_shares_and_the_seed() -> None:
    model = TrainingModelConfig()
    draws = [training_spec(_record(i, 1), model, TYPES, seed=0).gpu_types for i in range(2000)]
    share_any = sum(1 for t in draws if "RTX4090" in t) / len(draws)
    assert 0.45 < share_any < 0.55  # the first class (share 0.5) is the only one with RTX4090
    assert draws == [training_spec(_record(i, 1), model, TYPES, seed=0).gpu_types for i in range(2000)]
    assert draws != [training_spec(_record(i, 1), model, TYPES, seed=1).gpu_types for i in range(2000)]


def test_bad_simulator_config_names_the_field_and_the_value(tmp_path: Path) -> None:
    with pytest.raises(SimConfigError, match=r"service.target_utilization: .*less than or equal to 1.*1.5"):
        load_sim_config(None, {"service": {"target_utilization": 1.5}})
    with pytest.raises(SimConfigError, match=r"training.step_time_s: .*low <= high"):
        load_sim_config(None, {"training": {"step_time_s": [5, 1]}})
    p = tmp_path / "sim.yaml"
    p.write_text("arbiter: {tick_s: 0}\n")
    with pytest.raises(SimConfigError, match=r"arbiter.tick_s: .*greater than 0"):
        load_sim_config(p)


def test_simulate_cli_writes_every_summary_metric_and_the_plots(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "node_groups:\n  - {gpu_type: H100, count: 2, num_gpus: 8}\n  - {gpu_type: A100, count: 2, num_gpus: 8}\n"
    )
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(
        "timestamp,duration,num_gpus\n"
        + "".join(f"{600 * i},{3600 + 600 * i},{1 + i % 4}\n" for i in range(12))
    )
    rates = tmp_path / "rates.csv"
    rates.write_text(
        "window_start_s,total_rate_rps\n" + "".join(f"{600 * i},{2 + i % 5}\n" for i in range(24))
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tidal.cluster.sim.cli",
            "--cluster",
            str(cluster),
            "--training-trace",
            str(jobs),
            "--inference-trace",
            str(rates),
            "--policy",
            "tidal,static,ray-alone",
            "--days",
            "0.25",
            "--tick-s",
            "60",
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    for policy in ("tidal", "static", "ray-alone"):
        missing = [k for k in SUMMARY_KEYS if k not in summary[policy]]
        assert missing == [], f"{policy} lacks {missing}"
        assert summary[policy]["jobs_finished"] > 0
    assert summary["oracle"]["gpu_allocation_ratio"] > 0
    for png in ("gpus_tidal.png", "gpus_static.png", "gpus_ray-alone.png", "jct_cdf.png", "latency.png"):
        assert (out / png).stat().st_size > 10_000
    assert "| tidal |" in proc.stdout


def test_simulate_cli_refuses_an_unknown_policy_naming_the_valid_ones(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tidal.cluster.sim.cli",
            "--policy",
            "tidal,fifo",
            "--out",
            str(tmp_path),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "'fifo' is not a known policy; valid:" in proc.stderr and "ray-alone" in proc.stderr
