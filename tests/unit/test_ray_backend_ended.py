"""A holder whose Ray job ended expires at once, not a registration TTL later: the backend reads Ray's job
table (injected here), the arbiter drops the registration and frees its grant."""

from __future__ import annotations

from types import SimpleNamespace

from builders import make_job, make_nodes, make_service
from tidal.cluster.arbiter import ArbiterConfig, FakeBackend, ManualClock, ResourceArbiter
from tidal.cluster.model import Allocation
from tidal.cluster.ray_backend import RayBackend
from tidal.policies.base import PolicyDecision


def _reg(**meta):
    return SimpleNamespace(meta=meta)


def test_the_backend_reports_the_workloads_whose_ray_job_is_dead_and_asks_nothing_for_the_others():
    reads = []

    def dead_jobs():
        reads.append(1)
        return {"02000000"}

    backend = RayBackend(read_nodes=lambda: [], dead_jobs=dead_jobs, job_check_interval_s=0.0)
    regs = {"gone": _reg(ray_job_id="02000000"), "alive": _reg(ray_job_id="03000000"), "svc": _reg()}
    assert backend.ended(regs) == {"gone"}
    assert backend.ended({"svc": _reg()}) == set() and len(reads) == 1  # no job to ask about: no read


def test_the_backend_reads_rays_job_table_at_most_every_interval_and_a_failed_read_is_no_answer():
    reads = []

    def dead_jobs():
        reads.append(1)
        if len(reads) > 1:
            raise ConnectionError("GCS unavailable")
        return {"02000000"}

    backend = RayBackend(read_nodes=lambda: [], dead_jobs=dead_jobs, job_check_interval_s=3600.0)
    regs = {"gone": _reg(ray_job_id="02000000")}
    assert backend.ended(regs) == {"gone"}
    assert backend.ended(regs) == set() and len(reads) == 1  # within the interval
    backend.job_check_interval_s, backend._next_job_check_s = 0.0, 0.0
    assert backend.ended(regs) == set() and len(reads) == 2  # the read failed: nothing is expired


class Keep:
    """Grants the job 2 H100 on the first tick, then keeps what the snapshot has."""

    name = "keep"

    def __init__(self):
        self.ticks = 0

    def decide(self, snapshot, state):
        self.ticks += 1
        if self.ticks == 1:
            return PolicyDecision({"job": Allocation.of({"H100": 2})}), state
        return PolicyDecision(dict(snapshot.grants)), state


def test_a_job_whose_ray_job_ended_expires_at_the_next_tick_and_frees_its_grant():
    backend = FakeBackend(make_nodes(H100=(1, 2)))
    arb = ResourceArbiter(Keep(), backend, ManualClock(1000.0), ArbiterConfig(registration_ttl_s=60.0))
    arb.register(make_job(max_workers=2, gpu_types=("H100",)), meta={"ray_job_id": "02000000"})
    arb.register(make_service(max_replicas=2, gpu_types=("H100",)))
    arb.tick()
    arb.heartbeat("job", held={"H100": 2})
    backend.gone = {"job"}
    report = arb.tick()
    assert "job" not in report.grants
    assert [(e.kind, e.detail["reason"]) for e in report.events if e.workload == "job"] == [
        ("expired", "its Ray job ended")
    ]
    assert not arb.heartbeat("job").registered  # a late heartbeat finds no registration
