"""Ray alone, as a policy: first come, first served, nothing is ever taken back.

This is what a cluster running Ray Serve and Ray Train side by side does without an arbiter: a job
takes the free GPUs it can use when it starts (an elastic ``num_workers=(min, max)`` job grows into
whatever is free), a service scales only into GPUs nobody holds, and no one is ever preempted. It is the
baseline for the simulator and for ``bench/spike.py``.
"""

from __future__ import annotations

from tidal.cluster.model import ClusterSnapshot
from tidal.policies.base import PolicyDecision, PolicyState, register_policy
from tidal.policies.priority import arrival_order, fill_services, fill_training, service_want, shrink_to_want
from tidal.policies.workspace import Workspace


@register_policy("ray-alone")
class FcfsPolicy:
    name = "ray-alone"

    def __init__(self, headroom_fraction: float = 0.0) -> None:
        self.headroom_fraction = headroom_fraction

    def decide(self, snapshot: ClusterSnapshot, state: PolicyState) -> tuple[PolicyDecision, PolicyState]:
        ws = Workspace(snapshot, reclaims=False)  # nothing is ever taken back
        want = {w.name: service_want(w, self.headroom_fraction) for w in ws.services()}
        shrink_to_want(ws, want)
        # One queue for everyone, in arrival order: a service's new replicas wait behind earlier jobs.
        fill_services(ws, want, reclaim=False)
        fill_training(ws, lambda t: 1.0, preempt=False, greedy=True, order=arrival_order)
        return ws.decision(), state
