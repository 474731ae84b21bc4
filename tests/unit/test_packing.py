"""Per-node packing of units onto one GPU type's nodes."""

import random

import pytest
import tidal.policies.workspace as workspace_module
from builders import make_job, make_nodes, make_workload
from tidal.cluster.arbiter import ArbiterConfig, FakeBackend, ManualClock, ResourceArbiter
from tidal.cluster.model import Allocation, ClusterSnapshot, NodeSnapshot, ServiceSpec, TrainingJobSpec
from tidal.policies.config import build_policy, parse_policy_config
from tidal.policies.packing import TypePacker, uniform_packer
from tidal.policies.workspace import Workspace, _PackMemo


def test_best_fit_follows_the_worked_example():
    p = TypePacker([8, 8, 4])
    assert p.place(3, 3) == 3
    assert p.hist == {100: 1, 200: 1, 800: 1}


def test_free_gpus_on_separate_nodes_do_not_make_a_big_worker():
    p = TypePacker([4, 4])
    assert p.place(1, 2) == 2
    assert p.max_units(4) == 1
    assert p.place(4, 2) == 1
    assert p.free_gpus == 2


def test_fractional_units_share_gpus_without_overcommitting():
    p = TypePacker([1, 1])
    assert p.place(0.3, 10) == 6  # three 0.3-GPU replicas per 1-GPU node
    assert abs(p.free_gpus - 0.2) < 1e-9


def _packing_state(ws, gpu_type):
    p = ws.packers[gpu_type]
    buckets = [(f, list(nodes)) for f, nodes in p.buckets.items()]  # dict order decides which node goes next
    where = {n: dict(by_t.get(gpu_type, {})) for n, by_t in ws.where.items() if by_t.get(gpu_type)}
    return p.free, buckets, p.keys, p.total, where, {n: dict(a) for n, a in ws.alloc.items()}


def test_a_workspace_resuming_the_last_packing_packs_exactly_as_from_scratch():
    rng = random.Random(7)
    nodes = make_nodes(H100=(6, 8), A100=(5, 4))
    specs = {
        f"j{i:02d}": make_job(
            f"j{i:02d}",
            gpus_per_worker=rng.choice([0.5, 1.0, 1.0, 2.0, 4.0]),
            min_workers=rng.randint(1, 2),
            max_workers=6,
            gpu_types=("H100", "A100"),
            priority=rng.choice([1, 2]),
            preemptible=rng.random() > 0.2,
        )
        for i in range(24)
    }
    grants = {n: Allocation.of({rng.choice(("H100", "A100")): rng.randint(1, 3)}) for n in specs}
    loss = {n: rng.uniform(0, 60) for n in specs}
    resumed = 0
    for step in range(120):
        # One change per step, as between two ticks: a resize (sometimes beyond what fits: trimmed),
        # a reordering (a checkpoint), a job leaving or coming back.
        name = rng.choice(sorted(specs))
        r = rng.random()
        if r < 0.4:
            grants[name] = Allocation.of({rng.choice(("H100", "A100")): rng.randint(1, 6)})
        elif r < 0.7:
            loss[name] = rng.uniform(0, 60)
        elif r < 0.85:
            grants.pop(name, None)
        snapshot = ClusterSnapshot(
            now_s=float(step),
            nodes=nodes,
            workloads=tuple(
                make_workload(s, demand=s.max_workers, registered_s=float(i), seconds_since_checkpoint=loss[n])
                for i, (n, s) in enumerate(sorted(specs.items()))
            ),
            grants=dict(grants),
        )
        saved = dict(_PackMemo._LAST)
        _PackMemo._LAST.clear()
        fresh = Workspace(snapshot)
        _PackMemo._LAST.clear()
        _PackMemo._LAST.update(saved)
        resumed += bool(saved)
        ws = Workspace(snapshot)
        for t in ("H100", "A100"):
            assert _packing_state(ws, t) == _packing_state(fresh, t), f"step {step}, {t}"
    assert resumed > 100  # the memo was warm for almost every step (else this test proves nothing)


def test_a_uniform_packer_counts_what_the_per_node_packer_places():
    # 1-GPU units on 8- and 4-GPU nodes: every free GPU takes a unit, wherever it sits.
    rng = random.Random(3)
    nodes = tuple([8.0] * 5 + [4.0] * 3)
    per_node, total = TypePacker(nodes), uniform_packer(nodes, 100)
    assert total is not None and total.free_gpus == per_node.free_gpus == 52
    held: list[int] = []  # nodes of the units the per-node packer placed
    for _ in range(300):
        if held and rng.random() < 0.45:
            for _ in range(rng.randint(1, len(held))):
                node = held.pop(rng.randrange(len(held)))
                per_node.release(node, 100)
                total.release(node, 100)
        else:
            n = rng.randint(1, 20)
            assert per_node.max_units(1.0) == total.max_units(1.0)
            where: dict[int, int] = {}
            placed = per_node.place_into(1.0, n, where)
            assert total.place(1.0, n) == placed
            held += [node for node, k in where.items() for _ in range(k)]
        assert total.total == per_node.total


def test_a_uniform_packer_is_refused_when_a_node_is_not_a_multiple_of_the_unit():
    assert uniform_packer((8.0, 4.0), 200) is not None
    assert uniform_packer((8.0, 3.0), 200) is None  # a 3-GPU node leaves one GPU no 2-GPU unit can use
    assert uniform_packer((8.0,), 0) is None
    with pytest.raises(ValueError, match="200"):
        uniform_packer((8.0,), 100).place(2.0, 1)  # type: ignore[union-attr]


def _uniform_run(policy_name: str, seed: int) -> list:
    """Decisions of a seeded run where every unit is one GPU: services spiking, jobs coming and going,
    releases a tick late, a node dying (its holders trimmed) and coming back."""
    rng = random.Random(seed)
    types = ("H100", "A100", "RTX4090")
    nodes = [NodeSnapshot(f"n{i:02d}", types[i % 3], 4.0 if i % 3 == 2 else 8.0) for i in range(18)]
    clock = ManualClock()
    inner = build_policy(parse_policy_config({"policy": policy_name, "static": {"default_serving_share": 0.3}}))
    log: list = []

    class Recording:
        name = inner.name

        def decide(self, snapshot, state):
            d, s = inner.decide(snapshot, state)
            log.append((sorted((n, a.items) for n, a in d.targets.items()), d.infeasible, d.reclaims))
            return d, s

    backend = FakeBackend(nodes)
    arb = ResourceArbiter(Recording(), backend, clock, ArbiterConfig(registration_ttl_s=1e9))
    arb.register(ServiceSpec("svc", 1.0, 1, 40, ("H100", "A100")), demand_units=4)
    jobs: list[str] = []
    for k in range(80):
        clock.advance(30)
        if rng.random() < 0.5:
            name = f"job-{k:03d}"
            lo = rng.randint(1, 4)
            spec = TrainingJobSpec(
                name, 1.0, lo, lo + rng.randint(0, 12), tuple(rng.sample(types, k=rng.randint(1, 3))),
                priority=rng.choice([0, 1, 2]), preemptible=rng.random() > 0.2,
            )
            arb.register(spec, demand_units=spec.max_workers)
            jobs.append(name)
        if jobs and rng.random() < 0.2:
            arb.unregister(jobs.pop(rng.randrange(len(jobs))))
        arb.heartbeat("svc", demand_units=rng.choice([2, 4, 10, 25, 35]))
        if k == 30:
            backend.set_healthy("n00", False)
        if k == 50:
            backend.set_healthy("n00", True)
        for name in jobs:
            # Jobs report they hold their grant, and a checkpoint age that reorders them.
            arb.heartbeat(name, held=arb.grant_of(name).grant, seconds_since_checkpoint=rng.uniform(0, 600))
        arb.tick()
    return log


@pytest.mark.parametrize("policy_name", ["tidal", "static", "ray-alone"])
def test_packing_one_gpu_units_as_totals_decides_exactly_as_packing_them_per_node(policy_name, monkeypatch):
    fast = _uniform_run(policy_name, 11)
    monkeypatch.setattr(workspace_module, "uniform_packer", lambda sizes, need: None)
    assert _uniform_run(policy_name, 11) == fast
    # Not vacuous: the grants kept changing (and tidal reclaimed from jobs for the service).
    assert len({repr(d[0]) for d in fast}) > 20
    assert policy_name != "tidal" or any(d[2] for d in fast)


def test_a_workspace_without_reclaims_keeps_the_same_allocation_and_refuses_to_reclaim():
    nodes = make_nodes(H100=(2, 8))
    jobs = [make_job(f"j{i}", min_workers=1, max_workers=6, gpu_types=("H100",)) for i in range(3)]
    snapshot = ClusterSnapshot(
        now_s=0.0,
        nodes=nodes,
        workloads=tuple(make_workload(s, demand=s.max_workers, registered_s=float(i)) for i, s in enumerate(jobs)),
        grants={"j0": Allocation.of(H100=5), "j1": Allocation.of(H100=4)},
    )
    full, lean = Workspace(snapshot), Workspace(snapshot, reclaims=False)
    for ws in (full, lean):
        assert ws.place("j2", "H100", 9) == 7 and ws.shrink("j0", "H100", 2) == 2 and ws.place("j1", "H100", 9) == 2
    assert lean.alloc == full.alloc and lean.free_gpus("H100") == full.free_gpus("H100") == 0
    assert full.reclaimable_gpus("H100", below_priority=100, include_min=False) > 0
    with pytest.raises(RuntimeError, match="reclaims=False"):
        lean.reclaimable_gpus("H100", below_priority=100, include_min=False)


def test_unit_counts_stay_the_live_counts_across_a_rollback():
    """``start_jobs`` holds ``unit_counts`` over a walk in which a reclaim may be rolled back: the dict it
    holds must keep telling the truth (a rebound dict once let a started job be started again)."""
    job = make_job("a", max_workers=4, gpu_types=("H100",))
    other = make_job("b", max_workers=4, gpu_types=("H100",))
    snap = ClusterSnapshot(
        0.0,
        make_nodes(H100=1),
        (make_workload(job, held={"H100": 2}), make_workload(other)),
        {"a": Allocation.of(H100=2)},
    )
    ws = Workspace(snap)
    counts = ws.unit_counts
    cp = ws.checkpoint()
    assert ws.place("b", "H100", 3) == 3
    assert counts["b"] == 3
    ws.rollback(cp)
    assert ws.unit_counts is counts
    assert counts.get("b", 0) == 0 and counts["a"] == 2
    assert ws.place("b", "H100", 1) == 1
    assert counts["b"] == 1


def test_waiting_jobs_have_no_alloc_entry_and_count_zero_units():
    job = make_job("run", max_workers=2, gpu_types=("H100",))
    queue = [make_job(f"wait-{i}", max_workers=2, gpu_types=("H100",)) for i in range(3)]
    snap = ClusterSnapshot(
        0.0,
        make_nodes(H100=1),
        tuple(make_workload(s) for s in [job, *queue]),
        {"run": Allocation.of(H100=2)},
    )
    ws = Workspace(snap)
    assert list(ws.alloc) == ["run"]
    assert ws.units("wait-0") == 0 and ws.units_on("wait-0", "H100") == 0 and ws.job_type("wait-0") is None
    assert [w.name for w in ws.jobs()] == ["run", "wait-0", "wait-1", "wait-2"]
    # The holder indexes are built on first use, from what is allocated then.
    assert ws.reclaimable_gpus("H100", below_priority=100, include_min=True) == 2.0
    ws.place("wait-1", "H100", 2)
    assert ws.reclaimable_gpus("H100", below_priority=100, include_min=True) == 4.0
    assert set(ws.preemptible_holders["H100"][10]) == {"run", "wait-1"}


def test_a_tuple_of_workloads_is_indexed_once_and_its_parts_are_indexed_too():
    from builders import make_service
    from tidal.cluster.model import workload_index

    svc = make_workload(make_service("svc"))
    jobs = [make_workload(make_job(f"j{i}")) for i in range(4)]
    workloads = (jobs[0], svc, *jobs[1:])
    index = workload_index(workloads)
    assert workload_index(workloads) is index  # the same tuple: the same index
    assert workload_index(tuple(workloads)) is index  # (tuple() of a tuple is that tuple)
    at, services, only_jobs = index.split()
    assert at == (1,) and services == (svc,) and only_jobs == tuple(jobs)
    assert index.by_name()["svc"] is svc and list(index.by_name()) == ["j0", "svc", "j1", "j2", "j3"]
    # A workspace over the jobs part finds it indexed already: no services in it.
    assert workload_index(only_jobs).split() == ((), (), only_jobs)
    # An equal but different tuple is indexed anew; a list gets a fresh, uncached index.
    other = workload_index(tuple(list(workloads)))
    assert other.split()[1] == (svc,)
    assert workload_index(list(workloads)) is not workload_index(list(workloads))
