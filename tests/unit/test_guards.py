"""Guards around every policy: hysteresis, batched growth, the move cap and hard bounds."""

import pytest
from builders import make_job, make_nodes, make_service, make_snapshot, make_workload
from tidal.cluster.model import Allocation
from tidal.policies.base import PolicyDecision, PolicyState
from tidal.policies.guards import GuardConfig, GuardedPolicy, GuardViolation
from tidal.policies.priority import TidalPolicy, TidalPolicyConfig


def guarded(**cfg):
    return GuardedPolicy(TidalPolicy(TidalPolicyConfig(headroom_fraction=0.0)), GuardConfig(**cfg))


def test_a_demand_dip_does_not_shrink_a_service_before_the_downscale_delay():
    policy = guarded(service_downscale_delay_s=30)
    svc = make_service(max_replicas=8, gpu_types=("H100",))
    nodes = make_nodes(H100=1)
    state = PolicyState()
    d, state = policy.decide(make_snapshot(nodes, [make_workload(svc, demand=6)], now_s=0), state)
    assert d.target_of("svc").total() == 6
    d, state = policy.decide(make_snapshot(nodes, [make_workload(svc, demand=2)], {"svc": {"H100": 6}}, now_s=20), state)
    assert d.target_of("svc").total() == 6
    d, state = policy.decide(make_snapshot(nodes, [make_workload(svc, demand=2)], {"svc": {"H100": 6}}, now_s=31), state)
    assert d.target_of("svc").total() == 2


def test_a_job_grows_no_more_often_than_its_resize_interval():
    policy = guarded(job_resize_min_interval_s=60)
    job = make_job(max_workers=8, gpu_types=("H100",))
    nodes = make_nodes(H100=1)
    state = PolicyState()
    svc = make_service(max_replicas=8, gpu_types=("H100",))
    # t=0: a spike shrinks the job to 2 (shrinks are never delayed).
    d, state = policy.decide(
        make_snapshot(nodes, [make_workload(svc, demand=6), make_workload(job)], {"job": {"H100": 8}}, now_s=0), state
    )
    assert d.target_of("job") == Allocation.of(H100=2)
    # t=10: the spike is over but the job resized 10 s ago: it waits.
    d, state = policy.decide(
        make_snapshot(nodes, [make_workload(svc, demand=0, ), make_workload(job)], {"job": {"H100": 2}, "svc": {"H100": 1}}, now_s=10),
        state,
    )
    assert d.target_of("job") == Allocation.of(H100=2)
    d, state = policy.decide(
        make_snapshot(nodes, [make_workload(svc, demand=0), make_workload(job)], {"job": {"H100": 2}, "svc": {"H100": 1}}, now_s=61),
        state,
    )
    assert d.target_of("job") == Allocation.of(H100=7)


def test_growth_smaller_than_the_batch_waits_unless_it_reaches_the_want():
    policy = guarded(job_resize_min_interval_s=0, job_growth_min_workers=4)
    job = make_job(max_workers=8, gpu_types=("H100",))
    other = make_job("other", max_workers=5, gpu_types=("H100",), priority=50)
    nodes = make_nodes(H100=1)
    d, _ = policy.decide(
        make_snapshot(nodes, [make_workload(job), make_workload(other, demand=4)], {"job": {"H100": 3}, "other": {"H100": 5}}),
        PolicyState(),
    )
    # 1 GPU came free: growing 3 -> 4 is below the batch of 4 and below the want of 8.
    assert d.target_of("job") == Allocation.of(H100=3)
    d, _ = policy.decide(
        make_snapshot(nodes, [make_workload(job, demand=4), make_workload(other, demand=4)], {"job": {"H100": 3}, "other": {"H100": 5}}),
        PolicyState(),
    )
    assert d.target_of("job") == Allocation.of(H100=4)  # reaches its want: allowed


def test_the_move_cap_defers_growth_but_never_a_shrink():
    policy = guarded(job_resize_min_interval_s=0, max_moves_per_window=1, moves_window_s=60)
    jobs = [make_job(f"j{i}", max_workers=4, gpu_types=("H100",)) for i in range(2)]
    nodes = make_nodes(H100=1)
    d, state = policy.decide(
        make_snapshot(nodes, [make_workload(j) for j in jobs], {"j0": {"H100": 1}, "j1": {"H100": 1}}), PolicyState()
    )
    grown = [j.name for j in jobs if d.target_of(j.name).total() > 1]
    assert len(grown) == 1


def test_a_policy_that_overcommits_a_gpu_type_is_caught():
    class Greedy:
        name = "greedy"

        def decide(self, snapshot, state):
            return PolicyDecision({"job": Allocation.of(H100=8), "svc": Allocation.of(H100=8)}), state

    policy = GuardedPolicy(Greedy())
    snap = make_snapshot(
        make_nodes(H100=1), [make_workload(make_job(max_workers=8)), make_workload(make_service(max_replicas=8))]
    )
    with pytest.raises(GuardViolation, match="16 GPUs targeted, 8 exist"):
        policy.decide(snap, PolicyState())


def test_a_target_above_max_is_caught():
    class TooMuch:
        name = "too-much"

        def decide(self, snapshot, state):
            return PolicyDecision({"job": Allocation.of(H100=9)}), state

    with pytest.raises(GuardViolation, match="above max_units"):
        GuardedPolicy(TooMuch()).decide(
            make_snapshot(make_nodes(H100=2), [make_workload(make_job(max_workers=8))]), PolicyState()
        )


def test_a_job_moved_to_another_type_too_soon_keeps_nothing_rather_than_its_old_gpus():
    # The policy stopped "low" on H200 (a higher-priority job took the node) and restarted it on A100 with
    # more workers. The growth is too soon, but its old H200 workers are gone to "big": reverting to them
    # would target 12 H200 GPUs on a node of 8.
    class Moved:
        name = "moved"

        def decide(self, snapshot, state):
            return PolicyDecision({"big": Allocation.of(H200=1), "low": Allocation.of(A100=3)}), state

    low = make_job("low", gpus_per_worker=2.0, max_workers=4, gpu_types=("H200", "A100"))
    big = make_job("big", gpus_per_worker=8.0, max_workers=1, gpu_types=("H200",), priority=50)
    snap = make_snapshot(
        make_nodes(H200=1, A100=1), [make_workload(low), make_workload(big)], {"low": {"H200": 2}}, now_s=100
    )
    state = PolicyState({"guards": {"last_resize": {"low": 90.0}}})
    d, _ = GuardedPolicy(Moved(), GuardConfig(job_resize_min_interval_s=60)).decide(snap, state)
    assert d.target_of("big") == Allocation.of(H200=1)
    assert d.target_of("low") == Allocation()
