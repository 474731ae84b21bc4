"""The static split: what a cluster admin does today without Tidal (the baseline).

Each GPU type's nodes are split once between serving and training by a fixed share; services grow
only inside the serving part, jobs only inside the training part, and nothing ever moves across the
line. The split is by whole nodes, as admins do it (a node belongs to one pool).

Example: 10 A100 nodes, serving share 0.3 -> 3 nodes serve, 7 train, whatever the load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from tidal.cluster.model import ClusterSnapshot, GpuType, NodeSnapshot, workload_index
from tidal.policies.base import PolicyDecision, PolicyState, register_policy
from tidal.policies.priority import fill_services, fill_training, service_want, shrink_to_want
from tidal.policies.workspace import Workspace


@dataclass(frozen=True)
class StaticSplitConfig:
    """``serving_share`` per GPU type (0..1 of its nodes); types not listed use ``default_serving_share``."""

    serving_share: Mapping[GpuType, float] = field(default_factory=dict)
    default_serving_share: float = 0.0
    headroom_fraction: float = 0.1
    speeds: Mapping[GpuType, float] = field(default_factory=dict)


def split_nodes(
    nodes: tuple[NodeSnapshot, ...], config: StaticSplitConfig
) -> tuple[tuple[NodeSnapshot, ...], tuple[NodeSnapshot, ...]]:
    """Serving nodes and training nodes. Node order is by id, so the split is stable across ticks."""
    by_type: dict[GpuType, list[NodeSnapshot]] = {}
    for n in sorted(nodes, key=lambda n: n.node_id):
        by_type.setdefault(n.gpu_type, []).append(n)
    serving: list[NodeSnapshot] = []
    training: list[NodeSnapshot] = []
    for t, ns in by_type.items():
        share = config.serving_share.get(t, config.default_serving_share)
        k = math.ceil(len(ns) * share - 1e-9)
        serving += ns[:k]
        training += ns[k:]
    return tuple(serving), tuple(training)


@register_policy("static")
class StaticSplitPolicy:
    name = "static"

    def __init__(self, config: StaticSplitConfig | None = None) -> None:
        self.config = config or StaticSplitConfig()
        # The last split and the nodes it was made of: the nodes rarely change between decisions, and
        # the same tuples of nodes let the workspaces reuse their per-node figures (``inventory``).
        self._split: tuple[object, tuple[tuple[NodeSnapshot, ...], tuple[NodeSnapshot, ...]]] | None = None

    def decide(self, snapshot: ClusterSnapshot, state: PolicyState) -> tuple[PolicyDecision, PolicyState]:
        last = self._split
        if last is None or last[0] is not snapshot.nodes:
            last = self._split = (snapshot.nodes, split_nodes(snapshot.nodes, self.config))
        serving_nodes, training_nodes = last[1]
        # (Split once per tick's workloads: the guards asked for the same split.)
        _, services, jobs = workload_index(snapshot.workloads).split()

        # Nothing is ever reclaimed across or within the split: no holder indexes.
        sv = Workspace(replace(snapshot, nodes=serving_nodes), known=services, reclaims=False)
        want = {w.name: service_want(w, self.config.headroom_fraction) for w in services}
        shrink_to_want(sv, want)
        fill_services(sv, want, reclaim=False)

        tr = Workspace(replace(snapshot, nodes=training_nodes), known=jobs, reclaims=False)
        shrink_to_want(tr, {})
        fill_training(tr, lambda t: self.config.speeds.get(t, 1.0), preempt=False)

        a, b = sv.decision(), tr.decision()
        return (
            PolicyDecision({**a.targets, **b.targets}, a.infeasible + b.infeasible, ()),
            state,
        )
