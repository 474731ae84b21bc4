"""Builders for pure tests: a snapshot with sensible defaults, overridden per test."""

from __future__ import annotations

from tidal.cluster.model import (
    Allocation,
    ClusterSnapshot,
    NodeSnapshot,
    ServiceSpec,
    TrainingJobSpec,
    WorkloadSnapshot,
)


def make_node(gpu_type: str = "H100", num_gpus: float = 8, node_id: str | None = None, healthy: bool = True):
    make_node.counter += 1
    return NodeSnapshot(node_id or f"{gpu_type.lower()}-{make_node.counter}", gpu_type, num_gpus, healthy)


make_node.counter = 0


def make_nodes(**counts_by_type: tuple[int, float] | int) -> tuple[NodeSnapshot, ...]:
    """``make_nodes(H100=2, A100=(1, 4))``: two 8-GPU H100 nodes and one 4-GPU A100 node."""
    out = []
    for t, spec in counts_by_type.items():
        n, g = (spec, 8) if isinstance(spec, int) else spec
        out += [NodeSnapshot(f"{t.lower()}-{i}", t, g) for i in range(n)]
    return tuple(out)


def make_service(name: str = "svc", **overrides) -> ServiceSpec:
    base = dict(
        name=name,
        gpus_per_replica=1.0,
        min_replicas=1,
        max_replicas=16,
        gpu_types=("RTX4090", "A100", "H100"),
        slo_p99_ms=200.0,
        priority=100,
    )
    base.update(overrides)
    return ServiceSpec(**base)


def make_job(name: str = "job", **overrides) -> TrainingJobSpec:
    base = dict(
        name=name,
        gpus_per_worker=1.0,
        min_workers=1,
        max_workers=8,
        gpu_types=("H100", "A100"),
        priority=10,
    )
    base.update(overrides)
    return TrainingJobSpec(**base)


def make_workload(spec, demand: int | None = None, held: dict | None = None, registered_s: float = 0.0, **kw):
    return WorkloadSnapshot(
        spec=spec,
        demand_units=spec.max_units if demand is None else demand,
        held=Allocation.of(held or {}),
        registered_s=registered_s,
        **kw,
    )


def make_snapshot(nodes=None, workloads=(), grants=None, now_s: float = 0.0) -> ClusterSnapshot:
    return ClusterSnapshot(
        now_s=now_s,
        nodes=tuple(nodes if nodes is not None else make_nodes(H100=1, A100=1, RTX4090=1)),
        workloads=tuple(workloads),
        grants={k: (v if isinstance(v, Allocation) else Allocation.of(v)) for k, v in (grants or {}).items()},
    )


def gpus_by_type(snapshot: ClusterSnapshot, targets) -> dict[str, float]:
    specs = {w.name: w.spec for w in snapshot.workloads}
    out: dict[str, float] = {}
    for name, a in targets.items():
        for t, n in a.items:
            out[t] = out.get(t, 0.0) + n * specs[name].gpus_per_unit
    return out
