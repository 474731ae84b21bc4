"""A short smoke test of the demo's path on the session's local cluster (real Serve, real HTTP, real Ray).

It runs the demo's scenario for the "serve on free GPUs" system (no training: the jobs take minutes to start
on this machine, which the suite cannot afford), with a few seconds of base load and spike, through the
same ``run_system`` the demo and the benchmark use, then writes the timeline PNG. The full scenario is
``make demo`` and ``bench/spike.py``.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_demo_path_serves_a_short_spike_and_stops_what_it_started(local_cluster, ray_driver, tmp_path):
    from tidal.demo.plot import plot_timeline
    from tidal.demo.run import run_system
    from tidal.demo.runtime import DemoRuntime, SystemConfig
    from tidal.demo.scenario import load_scenario

    scenario = load_scenario().with_overrides(pre_spike_s=2, spike_s=6, post_spike_s=2)
    lines: list[str] = []
    rt = DemoRuntime(
        scenario, work_dir=tmp_path / "run", cluster=local_cluster, route_prefix="/demo-e2e", progress=lines.append
    )
    try:
        rt.connect()
        result = run_system(rt, SystemConfig.named("serve-only"), on_event=lines.append, sample_interval_s=0.5)
    finally:
        rt.reset()
        rt.close()

    f = result.figures
    assert f["requests"] > 0
    assert f["failed_requests"] == 0, result.load_summary.get("errors_by_kind")
    assert {s.phase for s in result.samples} >= {"pre", "spike", "post"}
    # The service prefers RTX4090s, and there is nothing else on the cluster: its first replicas land there.
    assert any(s.serving_gpus.get("RTX4090") for s in result.samples)
    assert all(not s.training_gpus for s in result.samples)
    assert rt.wait_no_workloads(timeout_s=30), "the service's replicas still hold GPUs after the run"
    png = plot_timeline(
        result.samples, scenario.phases(), tmp_path / "timeline.png", title="smoke", slo_ms=scenario.load.slo_ms,
        gpu_types=["H100", "A100", "RTX4090"], events=result.events,
    )  # fmt: skip
    assert png.stat().st_size > 10_000
    assert any("deploying service" in line for line in lines)
