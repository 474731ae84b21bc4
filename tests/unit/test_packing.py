"""Per-node packing of units onto one GPU type's nodes."""

import random

from builders import make_job, make_nodes, make_workload

from cluster.model import Allocation, ClusterSnapshot
from policies.packing import TypePacker
from policies.workspace import Workspace, _PackMemo


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
