"""The two baselines: the static split and Ray alone (first come, first served)."""

from builders import make_job, make_nodes, make_service, make_snapshot, make_workload
from tidal.cluster.model import Allocation
from tidal.policies.base import PolicyState
from tidal.policies.fcfs import FcfsPolicy
from tidal.policies.static_split import StaticSplitConfig, StaticSplitPolicy, split_nodes


def test_static_split_divides_each_type_by_whole_nodes():
    nodes = make_nodes(A100=10, H100=3)
    serving, training = split_nodes(nodes, StaticSplitConfig({"A100": 0.3}))
    assert [n.gpu_type for n in serving] == ["A100"] * 3
    assert len(training) == 10


def test_static_split_never_lends_idle_serving_gpus_to_training():
    policy = StaticSplitPolicy(StaticSplitConfig({"A100": 0.5}, headroom_fraction=0.0))
    svc = make_service(max_replicas=16, gpu_types=("A100",))
    job = make_job(max_workers=16, gpu_types=("A100",))
    snap = make_snapshot(make_nodes(A100=2), [make_workload(svc, demand=1), make_workload(job)])
    d, _ = policy.decide(snap, PolicyState())
    assert d.target_of("svc") == Allocation.of(A100=1)
    assert d.target_of("job") == Allocation.of(A100=8)  # 7 serving GPUs stay idle
    spike = make_snapshot(make_nodes(A100=2), [make_workload(svc, demand=16), make_workload(job)], dict(d.targets))
    d2, _ = policy.decide(spike, PolicyState())
    assert d2.target_of("svc") == Allocation.of(A100=8)  # capped by its part, never from training
    assert d2.target_of("job") == Allocation.of(A100=8)


def test_ray_alone_never_takes_gpus_back_from_a_running_job():
    policy = FcfsPolicy()
    job = make_job(max_workers=8, gpu_types=("H100",))
    svc = make_service(max_replicas=8, gpu_types=("H100",))
    snap = make_snapshot(
        make_nodes(H100=1), [make_workload(svc, demand=6), make_workload(job)], {"svc": {"H100": 1}, "job": {"H100": 7}}
    )
    d, _ = policy.decide(snap, PolicyState())
    assert d.target_of("job") == Allocation.of(H100=7)
    assert d.target_of("svc") == Allocation.of(H100=1)
    assert d.reclaims == ()


def test_ray_alone_starts_jobs_in_arrival_order_whatever_their_priority():
    policy = FcfsPolicy()
    first = make_job("first", priority=1, max_workers=8, gpu_types=("H100",))
    later = make_job("later", priority=99, max_workers=8, gpu_types=("H100",))
    snap = make_snapshot(
        make_nodes(H100=1), [make_workload(later, registered_s=5), make_workload(first, registered_s=1)]
    )
    d, _ = policy.decide(snap, PolicyState())
    assert d.target_of("first") == Allocation.of(H100=8)
    assert d.target_of("later") == Allocation()
