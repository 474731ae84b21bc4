"""A spike on a saturated cluster, on the session's local Ray cluster: real Serve over real HTTP, real Ray Train
jobs submitted with ``ray job submit``, the arbiter actor with the demo's policy file.

The scenario (``demo/configs/saturated-scenario.yaml``): low-priority jobs whose minimums fill every GPU the
service's one replica leaves, one more job waiting in the queue, and the demo's spike to 16 req/s. The service
(priority 100) must stop whole jobs to reach the replicas the spike needs, and the jobs it stops must come
back from their checkpoints. It runs through the same ``run_system`` as ``make demo`` and ``bench/spike.py``
(``bench/spike.py --scenario demo/configs/saturated-scenario.yaml`` measures the same case), about five
minutes on a 2-core machine.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
SCENARIO_PATH = ROOT / "demo" / "configs" / "saturated-scenario.yaml"
QUEUED_JOB = "sat-queued"


def spike_targets() -> dict[str, float]:
    """The spike benchmark's targets (``bench/spike.py``: ``TARGETS``, checked in its ``targets_met``)."""
    spec = importlib.util.spec_from_file_location("spike_bench", ROOT / "bench" / "spike.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.TARGETS)


def test_spike_on_a_saturated_cluster_stops_low_priority_jobs_and_they_resume_from_their_checkpoints(
    local_cluster, ray_driver, tmp_path
):
    from tidal.demo.run import run_system
    from tidal.demo.runtime import DemoRuntime, SystemConfig
    from tidal.demo.scenario import load_scenario
    from tidal.demo.timeline import Sample, job_stops, waits_ungranted

    targets = spike_targets()
    scenario = load_scenario(SCENARIO_PATH)
    phases = scenario.phases()
    lines: list[str] = []
    rt = DemoRuntime(
        scenario, work_dir=tmp_path / "run", cluster=local_cluster, route_prefix="/saturated-e2e",
        progress=lines.append,
    )  # fmt: skip

    def every_stopped_job_trains_again(samples: list[Sample]) -> bool:
        stops = job_stops(samples, scenario.job_names, 0.0, phases.spike_end_s)
        return bool(stops) and all(st.resumed_s is not None for st in stops)

    try:
        rt.connect()
        # A job not training again by the load's end is waited for with no load: on this 2-core machine a
        # restart's CPU can make the service take its GPUs back at the base load (saturated-scenario.yaml).
        result = run_system(
            rt, SystemConfig.named("tidal"), on_event=lines.append, sample_interval_s=0.5,
            until=every_stopped_job_trains_again, until_timeout_s=120.0,
        )  # fmt: skip
    finally:
        rt.reset()
        rt.close()
    assert rt.wait_no_workloads(timeout_s=30), "replicas or training workers still hold GPUs after the run"

    f = result.figures
    samples = result.samples
    post_mortem = {**result.to_dict(), "job_summaries": result.job_summaries}
    (tmp_path / "result.json").write_text(json.dumps(post_mortem, default=str))
    # Stops from the load's start: the base load on this 2-core machine may already ask for a second replica.
    stops = job_stops(samples, scenario.job_names, 0.0, phases.spike_end_s)
    in_spike = [st for st in stops if st.stopped_s >= phases.spike_start_s]
    logger.info(
        "saturated spike: time to capacity %s s, failed %s of %s, lost %s, GPUs back to training %s s, "
        "load ended at %s s, stops %s, timings %s",
        f["time_to_capacity_s"], f["failed_requests"], f["requests"], f["lost_steps"],
        f["gpus_back_to_training_s"], phases.end_s, stops, result.timings,
    )  # fmt: skip
    log = "\n".join(f"{e.t_s:+7.1f} s  {e.detail}" for e in result.events)

    # Saturated when the load came: every GPU held, and the queued job waiting with nothing granted.
    first = next(s for s in samples if s.t_s >= 0.0)
    assert first.serving_total + first.training_total == first.capacity_total, first
    assert waits_ungranted(first, QUEUED_JOB), first

    # The service took whole jobs, in its order of preference: the RTX4090 job, then the A100 job (the
    # spike's three extra replicas need no H100), at least one of them for the spike itself. Each gave its
    # GPUs back by a yield below its minimum (a checkpoint at a step boundary), not by force.
    assert in_spike, f"no job stopped for the spike\n{log}"
    assert {st.job for st in stops} == {"sat-rtx", "sat-a100"}, f"{stops}\n{log}"
    for job in ("sat-rtx", "sat-a100"):
        resizes = result.job_summaries[job]["resizes"]
        # Released (no group resumed on anything: it waited with nothing), at a step boundary, not by force.
        assert any(
            r["reason"] == "below_min" and r.get("resumed_on") is None and r.get("forced") is False for r in resizes
        ), resizes

    # The spike benchmark's bounds (bench/spike.py TARGETS): capacity within 10 s, no failed request,
    # no step lost.
    needed = scenario.load.replicas_needed
    assert f["time_to_capacity_s"] is not None, f"the service never ran {needed} replicas in the spike\n{log}"
    assert f["time_to_capacity_s"] <= targets["time_to_capacity_s_median_max"], log
    assert f["failed_requests"] <= targets["failed_requests_max"], f["failed_by_kind"]
    assert f["lost_steps"] <= targets["lost_steps_max"], f["lost_steps_by_job"]

    # The queued job never started on the GPUs the service reclaimed: the service's want comes first.
    spike = [s for s in samples if phases.spike_start_s <= s.t_s <= phases.spike_end_s]
    assert all(s.job_workers.get(QUEUED_JOB, 0) == 0 for s in spike)

    # Every stopped job trained again, from the checkpoint of the step it stopped at.
    for st in stops:
        assert st.resumed_s is not None, f"{st.job} never trained again after t={st.stopped_s:.1f} s\n{log}"
        assert st.step_at_stop > 0 and st.resumed_from == st.step_at_stop, st
