"""A ``min_replicas: 0`` service under the default policy: at zero wanting zero it holds no GPU (training gets
it), and the first queued request's demand of one takes a GPU back from training."""

from builders import make_job, make_nodes, make_service, make_snapshot, make_workload
from tidal.cluster.model import Allocation
from tidal.policies.base import PolicyState
from tidal.policies.priority import TidalPolicy, TidalPolicyConfig


def decide(snapshot):
    decision, _ = TidalPolicy(TidalPolicyConfig(headroom_fraction=0.0)).decide(snapshot, PolicyState())
    return decision


def test_a_service_idle_at_zero_gives_its_gpu_back_and_training_gets_them_all():
    svc = make_service(min_replicas=0, max_replicas=3, gpu_types=("RTX4090",))
    job = make_job(min_workers=1, max_workers=2, gpu_types=("RTX4090",))
    snap = make_snapshot(
        nodes=make_nodes(RTX4090=(1, 2)),
        workloads=[make_workload(svc, demand=0), make_workload(job)],
        grants={"svc": {"RTX4090": 1}, "job": {"RTX4090": 1}},
    )
    d = decide(snap)
    assert d.target_of("svc").total() == 0
    assert d.target_of("job") == Allocation.of(RTX4090=2)


def test_the_first_queued_request_takes_a_gpu_from_training():
    svc = make_service(min_replicas=0, max_replicas=3, gpu_types=("RTX4090",))
    job = make_job(min_workers=1, max_workers=2, gpu_types=("RTX4090",))
    snap = make_snapshot(
        nodes=make_nodes(RTX4090=(1, 2)),
        workloads=[make_workload(svc, demand=1), make_workload(job)],
        grants={"job": {"RTX4090": 2}},
    )
    d = decide(snap)
    assert d.target_of("job") == Allocation.of(RTX4090=1)
    assert [(r.donor, r.recipient) for r in d.reclaims] == [("job", "svc")]
