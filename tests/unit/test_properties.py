"""Invariants of every policy, over generated clusters and workloads (hypothesis)."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tidal.cluster.arbiter import FakeBackend, ManualClock, ResourceArbiter
from tidal.cluster.model import (
    Allocation,
    ClusterSnapshot,
    NodeSnapshot,
    ServiceSpec,
    TrainingJobSpec,
    WorkloadSnapshot,
)
from tidal.policies.base import PolicyState
from tidal.policies.fcfs import FcfsPolicy
from tidal.policies.guards import GuardConfig, GuardedPolicy
from tidal.policies.packing import TypePacker
from tidal.policies.priority import TidalPolicy, TidalPolicyConfig
from tidal.policies.static_split import StaticSplitConfig, StaticSplitPolicy

TYPES = ("H100", "A100", "RTX4090")
# Unit sizes divide node sizes, so first-fit decreasing packs optimally and can serve as the checker.
NODE_GPUS = st.sampled_from([2, 4, 8])
SERVICE_GPUS = st.sampled_from([0.25, 0.5, 1.0, 2.0])
JOB_GPUS = st.sampled_from([1.0, 2.0, 4.0])

POLICIES = {
    "tidal": lambda: TidalPolicy(TidalPolicyConfig(headroom_fraction=0.1, speeds={"H100": 3, "A100": 2})),
    "static": lambda: StaticSplitPolicy(StaticSplitConfig({"RTX4090": 1.0, "A100": 0.5})),
    "ray-alone": lambda: FcfsPolicy(),
}


@st.composite
def snapshots(draw):
    nodes = tuple(
        NodeSnapshot(f"n{i}", draw(st.sampled_from(TYPES)), draw(NODE_GPUS), draw(st.booleans() | st.just(True)))
        for i in range(draw(st.integers(1, 6)))
    )
    workloads, grants = [], {}
    for i in range(draw(st.integers(0, 3))):
        lo = draw(st.integers(0, 3))
        spec = ServiceSpec(
            f"s{i}", draw(SERVICE_GPUS), lo, lo + draw(st.integers(0, 8)),
            tuple(draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=3, unique=True))),
            priority=draw(st.integers(0, 200)),
        )
        workloads.append(WorkloadSnapshot(spec, draw(st.integers(0, 12)), registered_s=float(i)))
    for i in range(draw(st.integers(0, 5))):
        lo = draw(st.integers(1, 3))
        spec = TrainingJobSpec(
            f"j{i}", draw(JOB_GPUS), lo, lo + draw(st.integers(0, 6)),
            tuple(draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=3, unique=True))),
            priority=draw(st.integers(0, 200)), preemptible=draw(st.booleans()),
        )
        workloads.append(WorkloadSnapshot(spec, spec.max_workers, registered_s=10.0 + i))
    return ClusterSnapshot(0.0, nodes, tuple(workloads), grants)


def fits_on_nodes(snapshot: ClusterSnapshot, targets) -> bool:
    """First-fit decreasing of every granted unit onto the healthy nodes of its type."""
    specs = {w.name: w.spec for w in snapshot.workloads}
    for t in TYPES:
        packer = TypePacker(n.num_gpus for n in snapshot.nodes if n.healthy and n.gpu_type == t)
        units = sorted(
            ((specs[name].gpus_per_unit, a.get(t)) for name, a in targets.items() if a.get(t)), reverse=True
        )
        for g, n in units:
            if packer.place(g, n) < n:
                return False
    return True


def run_ticks(policy, snapshot, ticks=3):
    """A few decisions in a row, each snapshot holding the previous grants (sticky policies)."""
    state, grants, decision = PolicyState(), {}, None
    for k in range(ticks):
        snap = ClusterSnapshot(float(k), snapshot.nodes, snapshot.workloads, grants)
        decision, state = policy.decide(snap, state)
        grants = dict(decision.targets)
    return decision


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots(), st.sampled_from(sorted(POLICIES)))
def test_granted_gpus_never_exceed_what_exists_on_the_nodes(snapshot, policy_name):
    decision = run_ticks(POLICIES[policy_name](), snapshot)
    assert fits_on_nodes(snapshot, decision.targets)
    specs = {w.name: w.spec for w in snapshot.workloads}
    for name, a in decision.targets.items():
        assert a.total() <= specs[name].max_units
        assert set(a.types()) <= set(specs[name].gpu_types)
        if isinstance(specs[name], TrainingJobSpec):
            assert len(a.types()) <= 1  # one GPU type at a time


@settings(max_examples=150, deadline=None)
@given(snapshots())
def test_decide_is_deterministic_and_leaves_its_input_unchanged(snapshot):
    before = repr(snapshot)
    a = TidalPolicy().decide(snapshot, PolicyState())
    b = TidalPolicy().decide(snapshot, PolicyState())
    assert a == b
    assert repr(snapshot) == before


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 4),
    st.lists(st.tuples(st.integers(1, 3), st.integers(0, 4), st.integers(0, 100)), min_size=1, max_size=6),
    st.integers(0, 4),
)
def test_minimums_hold_when_they_all_fit(num_nodes, jobs, svc_min):
    """One GPU type, 1-GPU units: the minimums and the (priority 100) service's want fit iff their sum
    fits; then each minimum holds."""
    nodes = tuple(NodeSnapshot(f"n{i}", "H100", 8) for i in range(num_nodes))
    capacity = 8 * num_nodes
    svc = ServiceSpec("svc", 1.0, svc_min, svc_min + 8, ("H100",))
    workloads = [WorkloadSnapshot(svc, 50)]
    for i, (lo, extra, prio) in enumerate(jobs):
        spec = TrainingJobSpec(f"j{i}", 1.0, lo, lo + extra, ("H100",), priority=prio)
        workloads.append(WorkloadSnapshot(spec, spec.max_workers, registered_s=float(i)))
    # The service's want (demand 50 is above its max) outranks the minimums of lower-priority jobs.
    if sum(w.spec.min_units for w in workloads[1:]) + svc.max_units > capacity:
        return
    decision = run_ticks(TidalPolicy(), ClusterSnapshot(0.0, nodes, tuple(workloads)), ticks=4)
    for w in workloads:
        assert decision.target_of(w.name).total() >= w.spec.min_units, w.name


@settings(max_examples=100, deadline=None)
@given(snapshots(), st.integers(0, 20))
def test_non_preemptible_jobs_are_never_reclaimed(snapshot, spike):
    """After a first decision, a service spike never shrinks a non-preemptible job's grant."""
    policy = TidalPolicy()
    first, state = policy.decide(snapshot, PolicyState())
    spiked = tuple(
        WorkloadSnapshot(w.spec, w.demand_units + spike, registered_s=w.registered_s)
        if isinstance(w.spec, ServiceSpec) else w
        for w in snapshot.workloads
    )
    second, _ = policy.decide(ClusterSnapshot(1.0, snapshot.nodes, spiked, dict(first.targets)), state)
    for w in snapshot.workloads:
        if isinstance(w.spec, TrainingJobSpec) and not w.spec.preemptible:
            assert second.target_of(w.name).total() >= first.target_of(w.name).total()


@settings(max_examples=60, deadline=None)
@given(snapshots(), st.lists(st.integers(0, 16), min_size=3, max_size=8))
def test_no_gpu_is_granted_while_its_old_holder_still_holds_it(snapshot, demands):
    """Through the arbiter: workloads release lazily; at every tick, per type, what is granted or
    still held never exceeds the GPUs that exist."""
    clock = ManualClock()
    backend = FakeBackend(snapshot.nodes)
    policy = GuardedPolicy(TidalPolicy(), GuardConfig(service_downscale_delay_s=0, job_resize_min_interval_s=0))
    arb = ResourceArbiter(policy, backend, clock)
    specs = {w.name: w.spec for w in snapshot.workloads}
    held = {name: Allocation() for name in specs}
    for w in snapshot.workloads:
        arb.register(w.spec)
    cap = snapshot.capacity_by_type()
    for k, demand in enumerate(demands):
        for name, spec in specs.items():
            if isinstance(spec, ServiceSpec):
                arb.heartbeat(name, demand_units=demand, held=held[name])
            else:
                arb.heartbeat(name, held=held[name])
        report = arb.tick()
        used: dict[str, float] = {}
        for name, spec in specs.items():
            g = report.grants.get(name, Allocation())
            for t in set(g.types()) | set(held[name].types()):
                used[t] = used.get(t, 0.0) + max(g.get(t), held[name].get(t)) * spec.gpus_per_unit
            # Workloads follow their grants one tick late: shrinks every other tick, growth at once.
            if k % 2 == 0 or g.total() >= held[name].total():
                held[name] = g
        for t, u in used.items():
            assert u <= cap.get(t, 0.0) + 1e-6, (t, u, cap)
        clock.advance(1.0)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 30))
def test_a_spike_on_a_full_cluster_is_met_from_training_and_returned_after(num_nodes, spike):
    nodes = tuple(NodeSnapshot(f"n{i}", "A100", 8) for i in range(num_nodes))
    svc = ServiceSpec("svc", 1.0, 1, 8 * num_nodes, ("A100",))
    job = TrainingJobSpec("job", 1.0, 1, 8 * num_nodes, ("A100",))
    policy = TidalPolicy(TidalPolicyConfig(headroom_fraction=0.0))
    grants = {"svc": Allocation.of(A100=1), "job": Allocation.of(A100=8 * num_nodes - 1)}
    spiked = (WorkloadSnapshot(svc, spike), WorkloadSnapshot(job, job.max_workers))
    d, state = policy.decide(ClusterSnapshot(0, nodes, spiked, grants), PolicyState())
    # The job (priority 10) protects its minimum of 1 only against its own priority or lower: a
    # spike of the whole cluster stops it.
    assert d.target_of("svc").total() == max(1, min(spike, 8 * num_nodes))
    assert d.target_of("job").total() == 8 * num_nodes - d.target_of("svc").total()
    calm = (WorkloadSnapshot(svc, 1), WorkloadSnapshot(job, job.max_workers))
    # Once the restart hold has passed (a stopped job waits it out), training gets it all back.
    later = policy.config.restart_hold_s
    d2, _ = policy.decide(ClusterSnapshot(later, nodes, calm, dict(d.targets)), state)
    assert d2.target_of("job").total() == 8 * num_nodes - 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots())
def test_a_service_is_short_only_while_no_lower_priority_preemptible_job_holds_its_types(snapshot):
    """A service's SLO outranks every lower-priority job, waiting or running: after a few decisions, a
    service below its want leaves no GPU of a type it accepts to a preemptible job of lower priority
    (whole GPUs per unit, so that any job's GPUs could hold a replica: packing aside)."""
    cfg = TidalPolicyConfig(headroom_fraction=0.0)
    decision = run_ticks(TidalPolicy(cfg), snapshot, ticks=3)
    for s in snapshot.workloads:
        if not isinstance(s.spec, ServiceSpec) or s.spec.gpus_per_unit != 1.0:
            continue
        want = min(max(s.demand_units, s.spec.min_units), s.spec.max_units)
        if decision.target_of(s.name).total() >= want:
            continue
        for w in snapshot.workloads:
            spec = w.spec
            if isinstance(spec, TrainingJobSpec) and spec.preemptible and spec.priority < s.spec.priority:
                held = decision.target_of(w.name)
                on_types = [t for t in held.types() if t in s.spec.gpu_types]
                assert not on_types, (s.name, w.name, held, decision.target_of(s.name), want)
