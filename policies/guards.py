"""Guards wrapped around every policy: bounds, hysteresis, batched growth and a cap on moves.

Like Serve's ``_apply_autoscaling_config``, the guard is one wrapper that every policy gets, so that no
policy has to remember the rules that keep a cluster calm:

- **Hysteresis for services** (before the policy): a service's demand is the highest it reported over
  the last ``service_downscale_delay_s``, so a dip does not give replicas away just before they are
  needed again; a rise takes effect at once.
- **Batched growth for jobs** (after the policy): a job grows only if ``job_resize_min_interval_s`` has
  passed since its last resize and the growth is at least ``job_growth_min_workers`` (or reaches its
  want). Every resize restarts workers from a checkpoint, so resizes must stay rare. Shrinks are never
  delayed: a service waiting for GPUs is the expensive case.
- **A cap on moves** (after the policy): at most ``max_moves_per_window`` job grants grow per
  ``moves_window_s``; shrinks count toward the window but are never blocked.
- **Bounds** (after the policy): no target above a workload's max, none for an unknown workload, and
  no GPU type granted beyond what exists (raises: that is a policy bug, not a state to act on).

Every guard only ever removes growth, which keeps a feasible decision feasible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from tidal.cluster.model import (
    EMPTY,
    Allocation,
    ClusterSnapshot,
    WorkloadKind,
    WorkloadName,
    WorkloadSnapshot,
    index_from_parts,
    inventory,
    workload_index,
)
from tidal.policies.base import Policy, PolicyDecision, PolicyState


@dataclass(frozen=True)
class GuardConfig:
    service_downscale_delay_s: float = 30.0
    job_resize_min_interval_s: float = 60.0
    job_growth_min_workers: int = 1
    max_moves_per_window: int = 50
    moves_window_s: float = 60.0


class GuardViolation(RuntimeError):
    """A policy returned a decision that breaks a hard bound."""


class GuardedPolicy:
    """Wraps a policy with the guards above. State is kept under ``state.data['guards']``."""

    def __init__(self, inner: Policy, config: GuardConfig | None = None) -> None:
        self.inner = inner
        self.config = config or GuardConfig()
        self.name = inner.name

    def decide(self, snapshot: ClusterSnapshot, state: PolicyState) -> tuple[PolicyDecision, PolicyState]:
        cfg = self.config
        now = snapshot.now_s
        g: dict[str, Any] = dict(state.data.get("guards") or {})
        peaks: dict[str, list[list[float]]] = {k: [list(p) for p in v] for k, v in (g.get("peaks") or {}).items()}
        last_resize: dict[str, float] = dict(g.get("last_resize") or {})
        moves: list[float] = [t for t in (g.get("moves") or []) if now - t < cfg.moves_window_s]
        workloads = snapshot.workloads
        index = workload_index(workloads)  # (shared with the policy's workspaces: read only)
        by_name = index.by_name()  # a copy with the smoothed services, once one is smoothed

        # 1. Hysteresis: services see the peak of their demand over the downscale delay.
        smoothed: list[WorkloadSnapshot] | None = None  # a copy of the workloads, once a demand changes
        for i in index.split()[0]:
            w = workloads[i]
            hist = [p for p in peaks.get(w.name, []) if now - p[0] < cfg.service_downscale_delay_s]
            hist.append([now, float(w.demand_units)])
            # Keep only a decreasing staircase: a sample below a later one can never be the peak.
            stair: list[list[float]] = []
            for p in hist:
                while stair and stair[-1][1] <= p[1]:
                    stair.pop()
                stair.append(p)
            peaks[w.name] = stair
            if int(stair[0][1]) != w.demand_units:
                if smoothed is None:
                    smoothed = list(workloads)
                    by_name = dict(by_name)
                w = smoothed[i] = by_name[w.name] = replace(w, demand_units=int(stair[0][1]))  # type: ignore[index]
        if smoothed is None:
            inner_snapshot = snapshot
        else:
            # The smoothed tuple's index from the parts at hand (the jobs are the same tuple), so that
            # no reader of it walks the queue again to derive them.
            at, _, jobs = index.split()
            inner = tuple(smoothed)
            index_from_parts(inner, by_name, tuple([inner[i] for i in at]), jobs, workload_index(jobs).by_name())
            inner_snapshot = replace(snapshot, workloads=inner)

        # 2. The policy itself.
        inner_state = PolicyState({k: v for k, v in state.data.items() if k != "guards"})
        decision, new_inner = self.inner.decide(inner_snapshot, inner_state)

        # 3. Bounds, batched growth and the move cap.
        targets: dict[WorkloadName, Allocation] = {}
        grants = snapshot.grants
        decided = decision.targets
        training = WorkloadKind.TRAINING
        for name in sorted(decided):
            w = by_name.get(name)
            if w is None:
                continue
            target = decided[name]
            spec = w.spec
            current = grants.get(name, EMPTY)
            if target is current:
                # An unchanged grant (most of them, tick after tick): the bound only, ``total()`` inlined.
                items = target.items
                if items:
                    if (items[0][1] if len(items) == 1 else target.total()) > spec.max_units:
                        raise GuardViolation(f"{name}: target {target} above max_units {spec.max_units}")
                    targets[name] = target
                continue
            if target.total() > spec.max_units:
                raise GuardViolation(f"{name}: target {target} above max_units {spec.max_units}")
            if target is not current and spec.kind is training and target != current:
                grows = target.total() > current.total()
                if grows and current:
                    step = target.total() - current.total()
                    want = min(w.demand_units, spec.max_units)
                    too_soon = now - last_resize.get(name, float("-inf")) < cfg.job_resize_min_interval_s
                    too_small = step < cfg.job_growth_min_workers and target.total() < want
                    if too_soon or too_small or len(moves) >= cfg.max_moves_per_window:
                        # Only the growth goes, per type: a job the policy moved to another type (it was
                        # stopped on its old one, whose GPUs went to others) keeps nothing, not its old grant.
                        target = Allocation(tuple((t, min(n, current.get(t))) for t, n in target.items if current.get(t)))
                if target != current:
                    last_resize[name] = now
                    moves.append(now)
            if target:
                targets[name] = target
        for name, current in grants.items():
            # A job whose target vanished was shrunk to nothing: that is a resize too.
            if name not in targets and current:
                w = by_name.get(name)
                if w is not None and w.kind is training:
                    last_resize[name] = now
        _check_capacity(snapshot, targets, by_name)

        data = dict(new_inner.data)
        # (Copied without the workloads that left; as it is when none left, the usual case, which a
        # C-level subset test tells without a pass in Python.)
        if not last_resize.keys() <= by_name.keys():
            last_resize = {k: v for k, v in last_resize.items() if k in by_name}
        data["guards"] = {
            "peaks": {k: v for k, v in peaks.items() if k in by_name},
            "last_resize": last_resize,
            "moves": moves,
        }
        return replace(decision, targets=targets), PolicyState(data)


def _check_capacity(
    snapshot: ClusterSnapshot, targets: Mapping[WorkloadName, Allocation], by_name: Mapping[str, Any]
) -> None:
    cap = inventory(snapshot.nodes).capacity
    used: dict[str, float] = {}
    get = used.get
    for name, a in targets.items():
        g = by_name[name].spec.gpus_per_unit
        for t, n in a.items:
            used[t] = get(t, 0.0) + n * g
    for t, u in used.items():
        if u > cap.get(t, 0.0) + 1e-6:
            raise GuardViolation(f"GPU type {t}: {u:g} GPUs targeted, {cap.get(t, 0.0):g} exist")
