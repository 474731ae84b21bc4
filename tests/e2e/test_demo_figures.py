"""Pure tests of the demo's and the spike benchmark's figures, scenario, display and plot (no Ray)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pytest
from tidal.demo.scenario import ScenarioError, load_scenario, parse_scenario
from tidal.demo.timeline import (
    JobStop,
    Sample,
    allocation_ratio,
    classify_actors,
    gpus_back_to_training_s,
    job_stops,
    reclaim_durations_s,
    reclaims_between,
    slo_attainment,
    spike_figures,
    steady_since,
    time_to_capacity_s,
    train_steps_between,
    trained_since,
    training_goodput,
    waits_ungranted,
)

CAP = {"H100": 4.0, "A100": 2.0, "RTX4090": 2.0}


@dataclass
class Rec:
    scheduled_s: float
    latency_ms: float
    status: int
    error: str | None = None


def sample(t: float, running: int = 1, training: float = 6.0, serving: float = 1.0, **kw) -> Sample:
    return Sample(
        t_s=t,
        phase=kw.pop("phase", "pre"),
        capacity=dict(CAP),
        serving_gpus={"RTX4090": serving} if serving else {},
        training_gpus={"H100": training} if training else {},
        replicas_running=running,
        **kw,
    )


def test_the_load_waits_for_a_stretch_of_steady_training_at_the_granted_sizes():
    def at(t, hi=(4, "H100", 10), lo=(2, "A100", 5), grants=None):
        return sample(
            t, phase="fill",
            job_workers={"hi": hi[0], "lo": lo[0]}, job_gpu_type={"hi": hi[1], "lo": lo[1]}, steps={"hi": hi[2], "lo": lo[2]},
            grants=grants if grants is not None else {"hi": {"H100": 4}, "lo": {"A100": 2}},
        )  # fmt: skip

    jobs = ["hi", "lo"]
    first = steady_since(None, at(0.0), jobs, granted=True)
    assert first is not None and first.t_s == 0.0
    later = at(12.0, hi=(4, "H100", 40), lo=(2, "A100", 30))
    assert steady_since(first, later, jobs, granted=True) is first and trained_since(first, later, jobs)
    # A job not yet at its grant (it will restart to grow), one not training yet, one resized: not steady.
    assert steady_since(first, at(1.0, grants={"hi": {"H100": 4}, "lo": {"A100": 2, "H100": 1}}), jobs, granted=True) is None
    assert steady_since(first, at(1.0, lo=(2, "A100", 0)), jobs, granted=True) is None
    assert steady_since(first, at(1.0, hi=(3, "H100", 11)), jobs, granted=False).t_s == 1.0
    # Without an arbiter there are no grants: training at any steady size will do.
    assert steady_since(None, at(0.0, grants={}), jobs, granted=False) is not None
    assert steady_since(None, at(0.0, grants={}), jobs, granted=True) is None
    assert not trained_since(first, at(12.0, lo=(2, "A100", 5)), jobs), "lo made no step"


def test_a_job_the_arbiter_keeps_waiting_in_the_queue_does_not_hold_the_load_back():
    def at(t, hi_step, queued_grant):
        return sample(
            t, phase="fill", job_workers={"hi": 4, "queued": 0}, job_gpu_type={"hi": "H100", "queued": None},
            steps={"hi": hi_step}, grants={"hi": {"H100": 4}, **queued_grant},
        )  # fmt: skip

    jobs = ["hi", "queued"]
    first = steady_since(None, at(0.0, 10, {"queued": {}}), jobs, granted=True)
    assert first is not None and waits_ungranted(first, "queued")
    later = at(12.0, 40, {"queued": {}})
    assert steady_since(first, later, jobs, granted=True) is first and trained_since(first, later, jobs)
    # Not registered yet (no grant known): not decided on, so not steady; granted but not running: not steady.
    assert steady_since(None, at(0.0, 10, {}), jobs, granted=True) is None
    assert steady_since(None, at(0.0, 10, {"queued": {"A100": 2}}), jobs, granted=True) is None


def test_job_stops_find_a_job_taken_to_no_gpu_and_the_step_it_resumed_from():
    def at(t, workers, grant, step, resumed_from=None):
        return sample(
            t, phase="spike", job_workers={"lo": workers}, grants={"lo": grant}, steps={"lo": step},
            resumed_from={} if resumed_from is None else {"lo": resumed_from},
        )  # fmt: skip

    samples = [
        at(19.5, 2, {"A100": 2}, 130, 0),
        at(20.0, 2, {}, 132, 0),  # the arbiter took the grant; the job yields at its next step
        at(21.0, 0, {}, 134),
        at(60.0, 0, {"A100": 2}, 134),  # granted again: restarting
        at(95.0, 2, {"A100": 2}, 140, 134),
    ]
    stops = job_stops(samples, ["lo"], 20, 80)
    assert stops == [JobStop("lo", 21.0, 134, 95.0, 134)]
    assert stops[0].steps_lost == 0
    # Outside the window: not this spike's stop. Never back: no return. Back from scratch: all lost.
    assert job_stops(samples, ["lo"], 30, 80) == []
    assert job_stops(samples[:4], ["lo"], 20, 80) == [JobStop("lo", 21.0, 134)]
    scratch = job_stops(samples[:4] + [at(95.0, 2, {"A100": 2}, 134, 0)], ["lo"], 20, 80)
    assert scratch[0].steps_lost == 134


def test_job_stops_leave_out_a_resize_restart_and_runs_without_an_arbiter():
    def at(t, workers, grants):
        return sample(t, job_workers={"hi": workers}, grants=grants, steps={"hi": int(t)})

    resize = [at(0, 4, {"hi": {"H100": 4}}), at(1, 0, {"hi": {"H100": 2}}), at(9, 2, {"hi": {"H100": 2}})]
    assert job_stops(resize, ["hi"], 0, 80) == []
    no_arbiter = [at(0, 4, {}), at(1, 0, {}), at(9, 2, {})]
    assert job_stops(no_arbiter, ["hi"], 0, 80) == []


def test_classify_actors_splits_gpus_by_type_and_workload_and_ignores_dead_and_cpu_actors():
    nodes = {"n-h100": "H100", "n-rtx": "RTX4090", "n-head": None}
    actors = [
        {"class_name": "RayTrainWorker", "state": "ALIVE", "node_id": "n-h100", "required_resources": {"GPU": 1, "CPU": 1}},
        {"class_name": "RayTrainWorker", "state": "ALIVE", "node_id": "n-h100", "required_resources": {"GPU_group_ab12": 1}},
        {"class_name": "ServeReplica:demo:TidalModel", "state": "ALIVE", "node_id": "n-rtx", "required_resources": {"GPU": 1}},
        {"class_name": "ServeReplica:other:X", "state": "ALIVE", "node_id": "n-rtx", "required_resources": {"GPU": 1}},
        {"class_name": "RayTrainWorker", "state": "DEAD", "node_id": "n-h100", "required_resources": {"GPU": 1}},
        {"class_name": "ServeReplica:demo:TidalModel", "state": "PENDING_CREATION", "node_id": None, "required_resources": {"GPU": 1}},
        {"class_name": "ProxyActor", "state": "ALIVE", "node_id": "n-head", "required_resources": {}},
        {"class_name": "TrainerSignal", "state": "ALIVE", "node_id": "n-h100", "required_resources": {"CPU": 0}},
    ]
    serving, training = classify_actors(actors, nodes, service_app="demo")
    assert serving == {"RTX4090": 1.0}
    assert training == {"H100": 2.0}


def test_time_to_capacity_is_the_first_sample_in_the_spike_with_the_needed_replicas():
    samples = [sample(10, running=4), sample(20, 1), sample(24, 3), sample(29, 4), sample(31, 4)]
    assert time_to_capacity_s(samples, 20, 80, 4) == pytest.approx(9.0)


def test_time_to_capacity_is_none_when_the_spike_never_gets_its_replicas():
    samples = [sample(t, running=2) for t in range(20, 81, 5)] + [sample(85, running=4)]
    assert time_to_capacity_s(samples, 20, 80, 4) is None


def test_gpus_back_to_training_waits_for_the_pre_spike_training_level():
    samples = [sample(19, training=6), sample(30, training=4), sample(82, training=4), sample(95, training=5), sample(101, training=6)]
    assert gpus_back_to_training_s(samples, 20, 80) == pytest.approx(21.0)
    assert gpus_back_to_training_s(samples[:-1], 20, 80) is None


def test_gpus_back_to_training_takes_the_most_training_held_before_the_spike_as_the_bar():
    samples = [sample(5, training=6), sample(15, training=3), sample(30, training=2), sample(90, training=5), sample(99, training=6)]
    assert gpus_back_to_training_s(samples, 20, 80) == pytest.approx(19.0)
    assert gpus_back_to_training_s([sample(5, training=0), sample(90, training=0)], 20, 80) is None


def test_allocation_ratio_weights_each_sample_by_the_time_until_the_next():
    samples = [sample(0, training=6, serving=1), sample(10, training=6, serving=2), sample(20, training=6, serving=2)]
    # 7 of 8 GPUs for 10 s, then 8 of 8 for 10 s.
    assert allocation_ratio(samples, 0, 20) == pytest.approx(150 / 160)


def test_slo_attainment_counts_failures_and_slow_successes_as_misses():
    recs = [Rec(0, 10, 200)] * 98 + [Rec(0, 1500, 200), Rec(0, 5, 503)]
    assert slo_attainment(recs, 1000) == pytest.approx(0.98)
    assert slo_attainment([], 1000) is None


def test_reclaim_durations_take_released_events_of_training_jobs_within_the_window():
    events = [
        {"t_s": 21.0, "kind": "shrink", "workload": "lo", "detail": {}},
        {"t_s": 23.5, "kind": "released", "workload": "lo", "detail": {"reclaim_s": 2.5}},
        {"t_s": 22.0, "kind": "shrink", "workload": "hi", "detail": {}},
        {"t_s": 42.0, "kind": "forced", "workload": "hi", "detail": {}},
        {"t_s": 25.0, "kind": "released", "workload": "svc", "detail": {"reclaim_s": 1.0}},
        {"t_s": 95.0, "kind": "released", "workload": "lo", "detail": {"reclaim_s": 4.0}},
    ]
    assert reclaim_durations_s(events, ["lo", "hi"], 20, 80) == [2.5, 20.0]


def test_train_steps_between_uses_the_highest_step_seen_by_each_time():
    samples = [sample(-5, steps={"a": 100}), sample(0, steps={"a": 120, "b": 5}), sample(50, steps={"a": 300, "b": 90})]
    assert train_steps_between(samples, 0, 50) == {"a": 180, "b": 85}


def test_spike_figures_combine_load_cluster_and_job_figures():
    samples = [
        sample(-1, training=6, steps={"hi": 10}),
        sample(20, running=1, training=6, steps={"hi": 50}, phase="spike"),
        sample(26, running=4, training=4, serving=4, steps={"hi": 60}, phase="spike", service_demand=4),
        sample(80, running=2, training=4, serving=2, steps={"hi": 90}, phase="post"),
        sample(100, running=1, training=6, serving=1, steps={"hi": 120}, steps_lost={"hi": 0}, phase="post"),
    ]
    recs = [Rec(1, 20, 200), Rec(30, 40, 200), Rec(40, 2000, 200), Rec(50, 30, 500)]
    f = spike_figures(
        samples, recs, [], spike_start_s=20, spike_end_s=80, end_s=100, replicas_needed=4, slo_ms=1000,
        job_names=["hi"], lost_steps_by_job={"hi": 3},
    )  # fmt: skip
    assert f["time_to_capacity_s"] == pytest.approx(6.0)
    assert f["requests"] == 4 and f["failed_requests"] == 1 and f["failed_by_kind"] == {"http_500": 1}
    assert f["slo_attainment"] == pytest.approx(0.5)
    assert f["train_steps"] == 110 and f["lost_steps"] == 3
    assert f["gpus_back_to_training_s"] == pytest.approx(20.0)
    assert f["peak_demand_replicas"] == 4 and f["reclaim_s"] is None


def test_default_scenario_spikes_eight_times_and_needs_the_services_max():
    sc = load_scenario()
    p = sc.phases()
    assert p.spike_rps == pytest.approx(8 * p.base_rps)
    assert p.rate_windows()[-1] == (p.end_s, 0.0)
    assert sc.load.replicas_needed == sc.service["service"]["max_replicas"]
    assert [p.phase_at(t) for t in (0, p.spike_start_s, p.spike_end_s, p.end_s)] == ["pre", "spike", "post", "done"]


def test_saturated_scenario_fills_what_the_service_accepts_with_job_minimums_and_queues_one_more():
    from tidal.cluster.cluster_spec import load_cluster_spec

    sc = load_scenario(Path(__file__).resolve().parents[2] / "demo" / "configs" / "saturated-scenario.yaml")
    capacity: dict[str, float] = {}
    for g in load_cluster_spec().node_groups:
        capacity[g.gpu_type] = capacity.get(g.gpu_type, 0.0) + g.count * g.num_gpus
    svc = sc.service["service"]
    # The service's minimum sits on its most preferred type; the running jobs' minimums take the rest.
    used = {svc["gpu_types"][0]: svc["min_replicas"] * svc["gpus_per_replica"]}
    running = [j for j in sc.jobs if j["name"] != "sat-queued"]
    for j in running:
        assert j["min_workers"] == j["max_workers"] and j["priority"] < svc["priority"], j["name"]
        (t,) = j["gpu_types"]
        used[t] = used.get(t, 0.0) + j["min_workers"] * j["gpus_per_worker"]
    assert {t: used.get(t, 0.0) for t in svc["gpu_types"]} == {t: capacity[t] for t in svc["gpu_types"]}
    # The queued job fits on no type it accepts, and outranks no running job (it cannot stop one).
    (queued,) = [j for j in sc.jobs if j["name"] == "sat-queued"]
    assert all(capacity[t] - used.get(t, 0.0) < queued["min_workers"] * queued["gpus_per_worker"] for t in queued["gpu_types"])
    assert all(queued["priority"] < j["priority"] for j in running)
    # Nothing is free and nothing is above a minimum: the spike's extra replicas must stop whole jobs.
    assert sc.load.replicas_needed > svc["min_replicas"]
    from tidal.training.spec import parse_spec

    for name in sc.job_names:
        assert parse_spec(sc.job_spec(name, "/tmp/tidal-e2e-x")).name == name


def test_scenario_refuses_a_spike_that_needs_more_replicas_than_the_service_may_run():
    data = load_scenario().model_dump()
    data["load"]["replicas_needed"] = 9
    with pytest.raises(ScenarioError, match=r"replicas_needed=9 is above service.service.max_replicas=4"):
        parse_scenario(data)


def test_scenario_refuses_an_unknown_load_field_naming_it():
    data = load_scenario().model_dump()
    data["load"]["spike_factr"] = 3
    with pytest.raises(ScenarioError, match="load.spike_factr"):
        parse_scenario(data)


def test_scenario_service_and_jobs_validate_with_their_own_packages():
    from tidal.serving.config import ServeAppArgs
    from tidal.training.spec import parse_spec

    sc = load_scenario()
    args = ServeAppArgs.model_validate(sc.service_args("/tmp/ckpt", "default"))
    assert args.autoscaling.policy == "default"
    assert list(args.service.gpu_types) == ["RTX4090", "A100", "H100"]
    for name in sc.job_names:
        assert parse_spec(sc.job_spec(name, "/tmp/tidal-e2e-x")).storage_path == "/tmp/tidal-e2e-x"


def test_demo_policy_file_is_valid_and_shortens_the_delays():
    from tidal.cluster.policy_file import load_policy_file
    from tidal.demo.scenario import DEFAULT_POLICY_PATH
    from tidal.policies.config import build_policy

    cfg = load_policy_file(DEFAULT_POLICY_PATH)
    build_policy(cfg)
    assert cfg.guards.service_downscale_delay_s < 30 and cfg.guards.job_resize_min_interval_s < 60


def test_plain_display_prints_phase_changes_and_status_lines_without_escape_codes():
    from tidal.demo.display import make_display

    out = io.StringIO()
    d = make_display("t", 1000, ["H100", "A100", "RTX4090"], stream=out)  # StringIO is not a TTY
    d.line("hello")
    d.update(sample(21, running=3, phase="spike", steps={"demo-hi": 7}, job_workers={"demo-hi": 4}, job_gpu_type={"demo-hi": "H100"}))
    d.close()
    text = out.getvalue()
    assert "hello" in text and "SPIKE" in text and "demo-hi 4xH100 step 7" in text
    assert "\x1b[" not in text


def test_timeline_plot_writes_a_png(tmp_path):
    from tidal.demo.plot import plot_timeline

    sc = load_scenario()
    samples = [sample(t, running=1 + (20 <= t < 80) * 3, steps={"demo-hi": t * 3}, p99_ms=50.0) for t in range(-10, 150, 5)]
    path = plot_timeline(samples, sc.phases(), tmp_path / "t.png", title="x", slo_ms=1000, gpu_types=["H100", "A100", "RTX4090"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_live_display_draws_the_gpu_split_service_and_jobs_on_a_terminal():
    from rich.console import Console
    from tidal.demo.display import LiveDisplay, render_text

    out = io.StringIO()
    d = LiveDisplay("Tidal demo", 1000, ["H100", "A100", "RTX4090"], Console(file=out, force_terminal=True, width=120))
    s = sample(30, running=3, serving=2, training=4, phase="spike", steps={"demo-hi": 1234}, job_workers={"demo-hi": 4},
               job_gpu_type={"demo-hi": "H100"}, p99_ms=1500.0, service_demand=4)  # fmt: skip
    d.line("arbiter: shrink demo-lo {A100 2} -> {A100 1}")
    d.update(s)
    text = render_text(d._render(), width=120)
    d.close()
    rows = {}
    for line in text.splitlines():
        cells = line.replace("│", " ").split()
        if cells and cells[0] in ("H100", "A100", "RTX4090"):
            rows[cells[0]] = cells
    # type, GPUs, serving, training, idle, split
    assert rows["H100"] == ["H100", "4", "0", "4", "0", "TTTT"]
    assert rows["RTX4090"] == ["RTX4090", "2", "2", "0", "0", "SS"]
    assert rows["A100"] == ["A100", "2", "0", "0", "2", ".."]
    assert "SPIKE" in text and "1,234" in text and "demand 4" in text and "shrink demo-lo" in text


def test_summary_table_names_the_window_a_missing_figure_was_looked_for_in():
    from tidal.demo.main import summary_rows

    samples = [sample(-1, training=6), sample(20, running=1, training=6, phase="spike"),
               sample(80, running=2, training=2, serving=2, phase="post")]  # fmt: skip
    f = spike_figures(
        samples, [], [], spike_start_s=20, spike_end_s=80, end_s=150, replicas_needed=4, slo_ms=1000,
        job_names=[], lost_steps_by_job={},
    )  # fmt: skip
    scenario = load_scenario(None)
    rows = dict(summary_rows(f, scenario))
    assert rows["time to capacity (spike start -> all needed replicas running)"] == "never (within the spike)"
    post = scenario.load.post_spike_s
    assert rows["GPUs back to training after the spike"] == f"not within the {post:g} s after it"


def test_training_goodput_is_the_gpu_seconds_trained_over_those_the_service_left_the_jobs():
    jobs = {"hi": (["H100"], 1.0, 4.0), "lo": (["A100"], 1.0, 2.0)}  # the RTX4090s are no job's
    cap = {"H100": 4.0, "A100": 2.0, "RTX4090": 2.0}

    def at(t: float, hi: int, lo: int, serving: dict[str, float]) -> Sample:
        return Sample(t_s=t, phase="spike", capacity=cap, serving_gpus=serving, job_workers={"hi": hi, "lo": lo})

    # The service on both RTX4090s and 2 of the jobs' GPUs: 4 left to the jobs; they train on 3 for 10 s (a
    # worker group starting again), then on all 4; the RTX4090s the service holds are never the jobs'.
    samples = [
        at(0.0, 2, 1, {"RTX4090": 2.0, "H100": 1.0, "A100": 1.0}),
        at(10.0, 3, 1, {"RTX4090": 2.0, "H100": 1.0, "A100": 1.0}),
        at(20.0, 3, 1, {"RTX4090": 2.0, "H100": 1.0, "A100": 1.0}),
    ]
    assert training_goodput(samples, jobs, 0.0, 20.0) == pytest.approx((30 + 40) / (40 + 40))
    # A job's maximum caps what it could have had: lo (max 2) on 2 free A100s, hi idle on 4 free H100s.
    idle = [at(0.0, 0, 2, {}), at(10.0, 0, 2, {})]
    assert training_goodput(idle, jobs, 0.0, 10.0) == pytest.approx(2 / 6)
    assert training_goodput(idle, {}, 0.0, 10.0) is None


def test_post_spike_reclaims_count_only_the_reclaims_after_the_spike():
    events = [
        {"kind": "reclaim", "t_s": 21.0, "workload": "demo"},
        {"kind": "shrink", "t_s": 21.0, "workload": "hi"},
        {"kind": "reclaim", "t_s": 80.0, "workload": "demo"},
        {"kind": "reclaim", "t_s": 95.0, "workload": "demo"},
    ]
    assert reclaims_between(events, 80.0, 150.0) == 1
    assert reclaims_between(events, 0.0, 150.0) == 3
