"""The default Tidal policy, decision by decision, on hand-built snapshots."""

from builders import gpus_by_type, make_job, make_node, make_nodes, make_service, make_snapshot, make_workload
from tidal.cluster.model import Allocation
from tidal.policies.base import PolicyState
from tidal.policies.priority import TidalPolicy, TidalPolicyConfig, service_want

SPEEDS = {"H100": 3.0, "A100": 2.0, "RTX4090": 1.0}


def decide(snapshot, headroom=0.0):
    decision, _ = TidalPolicy(TidalPolicyConfig(headroom_fraction=headroom, speeds=SPEEDS)).decide(
        snapshot, PolicyState()
    )
    return decision


def test_service_want_adds_headroom_rounded_down_within_bounds():
    svc = make_service(min_replicas=1, max_replicas=8)
    assert service_want(make_workload(svc, demand=10), 0.1) == 8
    assert service_want(make_workload(svc, demand=5), 0.2) == 6
    assert service_want(make_workload(svc, demand=1), 0.1) == 1
    assert service_want(make_workload(svc, demand=0), 0.1) == 1


def test_idle_cluster_gives_training_every_gpu_it_can_use():
    job = make_job(max_workers=16, gpu_types=("H100",))
    snap = make_snapshot(nodes=make_nodes(H100=2), workloads=[make_workload(job)])
    # A new job gets its minimum first, then grows into the free GPUs in the same decision.
    assert decide(snap).target_of("job") == Allocation.of(H100=16)


def test_spike_on_full_cluster_is_met_from_training():
    svc = make_service(max_replicas=8, gpu_types=("H100",))
    job = make_job(max_workers=8, gpu_types=("H100",))
    snap = make_snapshot(
        nodes=make_nodes(H100=1),
        workloads=[make_workload(svc, demand=5), make_workload(job)],
        grants={"svc": {"H100": 1}, "job": {"H100": 7}},
    )
    d = decide(snap)
    assert d.target_of("svc") == Allocation.of(H100=5)
    assert d.target_of("job") == Allocation.of(H100=3)
    assert [(r.donor, r.recipient) for r in d.reclaims] == [("job", "svc")]


def test_spike_takes_from_lowest_priority_job_first():
    svc = make_service(max_replicas=8, gpu_types=("A100",))
    high = make_job("high", priority=50, max_workers=4, gpu_types=("A100",))
    low = make_job("low", priority=5, max_workers=4, gpu_types=("A100",))
    snap = make_snapshot(
        nodes=make_nodes(A100=1),
        workloads=[make_workload(svc, demand=3), make_workload(high), make_workload(low)],
        grants={"svc": {"A100": 1}, "high": {"A100": 4}, "low": {"A100": 3}},
    )
    d = decide(snap)
    assert d.target_of("high") == Allocation.of(A100=4)
    assert d.target_of("low") == Allocation.of(A100=1)
    assert d.target_of("svc") == Allocation.of(A100=3)


def test_reclaim_prefers_the_job_with_least_work_since_its_checkpoint():
    svc = make_service(max_replicas=8, gpu_types=("A100",))
    fresh = make_job("fresh", max_workers=4, gpu_types=("A100",))
    stale = make_job("stale", max_workers=4, gpu_types=("A100",))
    snap = make_snapshot(
        nodes=make_nodes(A100=1),
        workloads=[
            make_workload(svc, demand=2),
            make_workload(fresh, seconds_since_checkpoint=5.0),
            make_workload(stale, seconds_since_checkpoint=500.0),
        ],
        grants={"svc": {"A100": 1}, "fresh": {"A100": 4}, "stale": {"A100": 3}},
    )
    d = decide(snap)
    assert d.target_of("fresh") == Allocation.of(A100=3)
    assert d.target_of("stale") == Allocation.of(A100=3)


def test_service_uses_idle_gpus_before_reclaiming_from_training():
    svc = make_service(max_replicas=8, gpu_types=("RTX4090", "H100"))
    job = make_job(max_workers=8, gpu_types=("RTX4090",))
    snap = make_snapshot(
        nodes=make_nodes(RTX4090=(1, 2), H100=(1, 4)),
        workloads=[make_workload(svc, demand=3), make_workload(job, demand=2)],
        grants={"svc": {"RTX4090": 0}, "job": {"RTX4090": 2}},
    )
    d = decide(snap)
    assert d.target_of("job") == Allocation.of(RTX4090=2)
    assert d.target_of("svc") == Allocation.of(H100=3)
    assert d.reclaims == ()


def test_service_stops_a_lower_priority_job_below_its_minimum_when_its_demand_needs_it():
    svc = make_service(max_replicas=8, gpu_types=("H100",))
    job = make_job(min_workers=3, max_workers=8, gpu_types=("H100",))
    snap = make_snapshot(
        nodes=make_nodes(H100=1),
        workloads=[make_workload(svc, demand=8), make_workload(job)],
        grants={"svc": {"H100": 1}, "job": {"H100": 7}},
    )
    d = decide(snap)
    # The job's minimum protects it only against workloads of its own priority or lower: it stops.
    assert d.target_of("job") == Allocation()
    assert d.target_of("svc") == Allocation.of(H100=8)
    assert [i.workload for i in d.infeasible] == ["job"]  # it waits, having checkpointed


def test_a_minimum_holds_against_a_service_of_the_same_priority():
    svc = make_service(max_replicas=8, gpu_types=("H100",), priority=100)
    job = make_job(min_workers=3, max_workers=8, gpu_types=("H100",), priority=100)
    snap = make_snapshot(
        nodes=make_nodes(H100=1),
        workloads=[make_workload(svc, demand=8), make_workload(job)],
        grants={"svc": {"H100": 1}, "job": {"H100": 7}},
    )
    d = decide(snap)
    assert d.target_of("job") == Allocation.of(H100=7)
    assert d.target_of("svc") == Allocation.of(H100=1)
    assert any(i.workload == "svc" for i in d.infeasible)


def test_service_takes_units_above_minimum_on_any_type_before_it_stops_a_job():
    svc = make_service(max_replicas=8, gpu_types=("H100", "A100"))
    at_min = make_job("at-min", min_workers=8, max_workers=8, gpu_types=("H100",))
    above = make_job("above", min_workers=4, max_workers=8, gpu_types=("A100",))
    snap = make_snapshot(
        nodes=make_nodes(H100=1, A100=1),
        workloads=[make_workload(svc, demand=4), make_workload(at_min), make_workload(above)],
        grants={"at-min": {"H100": 8}, "above": {"A100": 8}},
    )
    d = decide(snap)
    # H100 is the service's first choice, but taking it would stop a job; A100 has 4 spare units.
    assert d.target_of("svc") == Allocation.of(A100=4)
    assert d.target_of("at-min") == Allocation.of(H100=8)
    assert d.target_of("above") == Allocation.of(A100=4)


def test_a_waiting_lower_priority_job_never_starts_on_gpus_the_service_needs():
    svc = make_service(min_replicas=1, max_replicas=8, gpu_types=("H100",))
    job = make_job(min_workers=4, max_workers=8, gpu_types=("H100",))
    snap = make_snapshot(nodes=make_nodes(H100=1), workloads=[make_workload(svc, demand=6), make_workload(job)])
    d = decide(snap)
    assert d.target_of("svc") == Allocation.of(H100=6)
    assert d.target_of("job") == Allocation()
    assert [i.workload for i in d.infeasible] == ["job"]


def test_a_waiting_job_above_the_services_priority_starts_before_the_service_grows():
    svc = make_service(min_replicas=1, max_replicas=8, gpu_types=("H100",), priority=100)
    job = make_job(min_workers=4, max_workers=8, gpu_types=("H100",), priority=200)
    snap = make_snapshot(nodes=make_nodes(H100=1), workloads=[make_workload(svc, demand=6), make_workload(job)])
    d = decide(snap)
    assert d.target_of("job") == Allocation.of(H100=4)
    assert d.target_of("svc") == Allocation.of(H100=4)


def test_a_job_stopped_for_a_service_waits_out_the_restart_hold_then_starts():
    svc = make_service(max_replicas=8, gpu_types=("H100",))
    job = make_job(min_workers=3, max_workers=8, gpu_types=("H100",))
    policy = TidalPolicy(TidalPolicyConfig(headroom_fraction=0.0, speeds=SPEEDS, restart_hold_s=60.0))
    spike = make_snapshot(
        nodes=make_nodes(H100=1),
        workloads=[make_workload(svc, demand=8), make_workload(job)],
        grants={"svc": {"H100": 1}, "job": {"H100": 7}},
        now_s=100.0,
    )
    d, state = policy.decide(spike, PolicyState())
    assert d.target_of("job") == Allocation()
    calm = [make_workload(svc, demand=1), make_workload(job)]
    # 30 s later the service is back at 1 replica; the job was stopped 30 s ago: it waits.
    d, state = policy.decide(make_snapshot(make_nodes(H100=1), calm, dict(d.targets), now_s=130.0), state)
    assert d.target_of("svc") == Allocation.of(H100=1)
    assert d.target_of("job") == Allocation()
    assert "stopped for a higher-priority service on H100" in d.infeasible[0].reason
    # 60 s after the last pressure on H100 it starts again, and takes what the service left.
    d, state = policy.decide(make_snapshot(make_nodes(H100=1), calm, dict(d.targets), now_s=160.0), state)
    assert d.target_of("job") == Allocation.of(H100=7)
    assert "restart_hold" not in state.data or state.data["restart_hold"]["stopped"] == {}


def test_the_restart_hold_moves_on_while_the_service_is_short_on_that_type():
    svc = make_service(max_replicas=16, gpu_types=("H100",))
    job = make_job(min_workers=3, max_workers=8, gpu_types=("H100",))
    policy = TidalPolicy(TidalPolicyConfig(headroom_fraction=0.0, speeds=SPEEDS, restart_hold_s=60.0))
    nodes = make_nodes(H100=1)
    d, state = policy.decide(
        make_snapshot(nodes, [make_workload(svc, demand=8), make_workload(job)], {"svc": {"H100": 1}, "job": {"H100": 7}}),
        state=PolicyState(),
    )
    assert d.target_of("job") == Allocation()
    # At 50 s the service wants 12 and has 8: H100 is still under pressure.
    d, state = policy.decide(make_snapshot(nodes, [make_workload(svc, demand=12), make_workload(job)], dict(d.targets), now_s=50.0), state)
    calm = [make_workload(svc, demand=2), make_workload(job)]
    d, state = policy.decide(make_snapshot(nodes, calm, dict(d.targets), now_s=70.0), state)
    assert d.target_of("job") == Allocation()
    d, state = policy.decide(make_snapshot(nodes, calm, dict(d.targets), now_s=110.0), state)
    assert d.target_of("job") == Allocation.of(H100=6)


def test_non_preemptible_job_is_never_reclaimed():
    svc = make_service(max_replicas=8, gpu_types=("H100",))
    job = make_job(preemptible=False, max_workers=8, gpu_types=("H100",))
    snap = make_snapshot(
        nodes=make_nodes(H100=1),
        workloads=[make_workload(svc, demand=6), make_workload(job)],
        grants={"svc": {"H100": 1}, "job": {"H100": 7}},
    )
    d = decide(snap)
    assert d.target_of("job") == Allocation.of(H100=7)
    assert d.target_of("svc") == Allocation.of(H100=1)
    assert "no free or reclaimable" in d.infeasible[0].reason


def test_when_the_spike_ends_training_gets_the_gpus_back():
    svc = make_service(max_replicas=8, gpu_types=("H100",))
    job = make_job(max_workers=8, gpu_types=("H100",))
    snap = make_snapshot(
        nodes=make_nodes(H100=1),
        workloads=[make_workload(svc, demand=1), make_workload(job)],
        grants={"svc": {"H100": 6}, "job": {"H100": 2}},
    )
    d = decide(snap)
    assert d.target_of("svc") == Allocation.of(H100=1)
    assert d.target_of("job") == Allocation.of(H100=7)


def test_new_job_goes_to_the_fastest_accepted_type_that_fits():
    job = make_job(min_workers=2, max_workers=4, gpu_types=("A100", "H100", "RTX4090"))
    nodes = make_nodes(A100=(1, 4), H100=(1, 1), RTX4090=(1, 8))
    d = decide(make_snapshot(nodes=nodes, workloads=[make_workload(job)]))
    # H100 is fastest (3.0) but holds 1 worker, below the minimum of 2; A100 (2.0 x 4) beats
    # RTX4090 (1.0 x 4), although RTX4090 has the most room.
    assert d.target_of("job") == Allocation.of(A100=4)


def test_running_job_keeps_its_gpu_type():
    job = make_job(max_workers=8, gpu_types=("H100", "A100"))
    nodes = make_nodes(H100=(1, 8), A100=(1, 8))
    d = decide(make_snapshot(nodes=nodes, workloads=[make_workload(job)], grants={"job": {"A100": 2}}))
    assert d.target_of("job") == Allocation.of(A100=8)


def test_waiting_job_is_reported_infeasible_with_a_reason():
    job = make_job(min_workers=2, gpus_per_worker=4, gpu_types=("H100",))
    d = decide(make_snapshot(nodes=make_nodes(H100=(2, 4)), workloads=[make_workload(job)], grants={}))
    assert d.target_of("job") == Allocation.of(H100=2)
    big = make_job("big", min_workers=1, gpus_per_worker=8, gpu_types=("H100",))
    d = decide(make_snapshot(nodes=make_nodes(H100=(2, 4)), workloads=[make_workload(big)]))
    assert d.target_of("big") == Allocation()
    assert "needs 1 worker(s) of 8 GPU" in d.infeasible[0].reason


def test_multi_gpu_workers_respect_per_node_packing():
    # 6 GPUs are free in total, but on nodes of 3: no 4-GPU worker fits.
    nodes = (make_node("H100", 4), make_node("H100", 4))
    svc = make_service(gpus_per_replica=1, max_replicas=2, gpu_types=("H100",))
    job = make_job(gpus_per_worker=4, min_workers=1, max_workers=2, gpu_types=("H100",))
    snap = make_snapshot(nodes=nodes, workloads=[make_workload(svc, demand=2), make_workload(job)], grants={"svc": {"H100": 2}})
    d = decide(snap)
    svc_units = d.target_of("svc").get("H100")
    job_units = d.target_of("job").get("H100")
    assert svc_units == 2
    assert job_units <= 1


def test_fractional_replicas_share_a_gpu():
    svc = make_service(gpus_per_replica=0.25, max_replicas=16, gpu_types=("RTX4090",))
    d = decide(make_snapshot(nodes=make_nodes(RTX4090=(1, 2)), workloads=[make_workload(svc, demand=8)]))
    assert d.target_of("svc") == Allocation.of(RTX4090=8)
    assert gpus_by_type(make_snapshot(workloads=[make_workload(svc)]), d.targets) == {"RTX4090": 2.0}


def test_free_gpus_are_shared_by_weight_among_equal_priority_jobs():
    heavy = make_job("heavy", weight=2.0, max_workers=16, gpu_types=("H100",))
    light = make_job("light", weight=1.0, max_workers=16, gpu_types=("H100",))
    snap = make_snapshot(
        nodes=make_nodes(H100=(1, 8)),
        workloads=[make_workload(heavy), make_workload(light)],
        grants={"heavy": {"H100": 1}, "light": {"H100": 1}},
    )
    d = decide(snap)
    assert d.target_of("heavy").get("H100") > d.target_of("light").get("H100") >= 2
    assert d.target_of("heavy").get("H100") + d.target_of("light").get("H100") == 8


def test_higher_priority_waiting_job_stops_lower_priority_growth_first():
    low = make_job("low", priority=1, min_workers=2, max_workers=8, gpu_types=("H100",))
    high = make_job("high", priority=50, min_workers=4, max_workers=8, gpu_types=("H100",))
    snap = make_snapshot(
        nodes=make_nodes(H100=(1, 8)),
        workloads=[make_workload(low), make_workload(high, registered_s=5)],
        grants={"low": {"H100": 8}},
    )
    d = decide(snap)
    assert d.target_of("high").get("H100") >= 4
    assert d.target_of("low").get("H100") >= 2


def test_lost_node_trims_the_least_protected_units():
    svc = make_service(max_replicas=8, gpu_types=("H100",))
    job = make_job(max_workers=12, gpu_types=("H100",))
    nodes = (make_node("H100", 8, "a"), make_node("H100", 8, "b", healthy=False))
    snap = make_snapshot(
        nodes=nodes,
        workloads=[make_workload(svc, demand=4), make_workload(job)],
        grants={"svc": {"H100": 4}, "job": {"H100": 12}},
    )
    d = decide(snap)
    assert d.target_of("svc") == Allocation.of(H100=4)
    assert d.target_of("job") == Allocation.of(H100=4)


def test_decide_is_deterministic_and_leaves_its_input_unchanged():
    svc = make_service(max_replicas=8)
    jobs = [make_job(f"j{i}", max_workers=4, priority=i) for i in range(5)]
    snap = make_snapshot(
        nodes=make_nodes(H100=1, A100=1, RTX4090=1),
        workloads=[make_workload(svc, demand=6)] + [make_workload(j) for j in jobs],
        grants={"j0": {"H100": 4}, "j1": {"A100": 4}},
    )
    before = repr(snap)
    assert decide(snap) == decide(snap)
    assert repr(snap) == before


def test_the_queue_walk_keeps_one_kind_per_spec_object_and_reuses_an_unchanged_infeasible():
    from dataclasses import replace as dc_replace

    from tidal.policies.priority import _KINDS

    spec = make_job("q", min_workers=2, max_workers=4, gpu_types=("H100",))
    k = _KINDS.of(spec)
    assert k.need == 2 and _KINDS.of(spec) is k
    # Another spec object of the same name (a re-registration with new fields) gets its own entry.
    bigger = dc_replace(spec, min_workers=3)
    assert _KINDS.of(bigger).need == 3 and _KINDS.of(bigger) is not k
    first = k.infeasible("waiting: x")
    assert k.infeasible("waiting: " + "x") is first  # an equal reason: the same record
    other = k.infeasible("waiting: y")
    assert other is not first and other.workload == "q" and other.reason == "waiting: y"
