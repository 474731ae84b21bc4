"""The default Tidal policy: serving gets what its load needs, training gets the rest.

Priorities decide (as in Kueue and KAI): a workload's claim outranks every preemptible job of lower
priority, waiting or running, and a job's minimum protects it only against workloads of its own
priority or lower.

1. Services get their minimum, then, level by level from the highest priority down, the waiting jobs
   of that priority or higher start and the services of that priority grow to their want (demand plus
   headroom). A waiting job never starts on GPUs that a higher-priority service's demand needs.
2. A service takes free GPUs first, on its preferred types first. When they run out it reclaims from
   preemptible jobs of lower priority on the types it accepts (most preferred first): first the units
   above those jobs' minimums, then whole jobs (the job yields at a step boundary, checkpoints and
   waits, losing nothing), lowest priority first, cheapest loss first (the job whose shrink alone
   covers the need, then the least work since its last checkpoint).
3. Training gets the rest, by priority; within a priority, waiting jobs get their minimum first, then
   free GPUs are shared by weight. A job runs on one GPU type at a time and keeps it; a new job goes to
   the accepted type where it runs fastest (a per-type speed table, Gavel's idea) among those that fit.
   A higher-priority waiting job may stop lower-priority preemptible jobs to get its minimum.
4. No churn: a job stopped for a service waits until the GPU type it was stopped on has seen no
   service reclaim and no unmet service demand for ``restart_hold_s``; meanwhile its GPUs serve the
   service or other jobs, never idle. (The service's side of the hysteresis is the guards' hold of
   its demand over the downscale window, ``tidal.policies.guards``.)

Non-preemptible jobs are never reclaimed. Growth is batched by the guards (``tidal.policies.guards``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter

from tidal.cluster.model import (
    ClusterSnapshot,
    GpuType,
    WorkloadKind,
    WorkloadSnapshot,
    WorkloadSpec,
    workload_index,
)
from tidal.policies.base import Infeasible, PolicyDecision, PolicyState, register_policy
from tidal.policies.packing import to_centi
from tidal.policies.workspace import Workspace


@dataclass(frozen=True)
class TidalPolicyConfig:
    """Knobs of the default policy.

    Attributes:
        headroom_fraction: extra replicas above demand, rounded down: 0.1 turns 10 into 11, 1 into 1.
        speeds: relative training throughput per GPU type (H100 3.0 means 3x an RTX4090 at 1.0).
        default_speed: speed of a type missing from ``speeds``.
        restart_hold_s: how long a job stopped for a service waits, after the last service reclaim or
            unmet service demand on the GPU type it was stopped on, before it may start again.
    """

    headroom_fraction: float = 0.1
    speeds: Mapping[GpuType, float] = field(default_factory=dict)
    default_speed: float = 1.0
    restart_hold_s: float = 60.0


def service_want(w: WorkloadSnapshot, headroom_fraction: float) -> int:
    """Replicas a service should have: demand plus headroom, within its min and max.

    Example: demand 10, headroom 0.1, min 1, max 8 -> min(max(10 + 1, 1), 8) = 8.
    """
    d = w.demand_units
    return min(max(d + int(d * headroom_fraction), w.spec.min_units), w.spec.max_units)


def job_want(w: WorkloadSnapshot) -> int:
    return min(max(w.demand_units, 0), w.spec.max_units)


@register_policy("tidal")
class TidalPolicy:
    name = "tidal"

    def __init__(self, config: TidalPolicyConfig | None = None) -> None:
        self.config = config or TidalPolicyConfig()

    def speed(self, gpu_type: GpuType) -> float:
        return self.config.speeds.get(gpu_type, self.config.default_speed)

    def decide(self, snapshot: ClusterSnapshot, state: PolicyState) -> tuple[PolicyDecision, PolicyState]:
        ws = Workspace(snapshot)
        now = snapshot.now_s
        services = ws.services()
        want = {w.name: service_want(w, self.config.headroom_fraction) for w in services}
        held = RestartHold.from_state(state, ws.workloads)
        # 1. What nobody wants any more goes back.
        shrink_to_want(ws, want)
        # 2. Service minimums first.
        fill_services(ws, {w.name: min(want[w.name], w.spec.min_units) for w in services}, reclaim=True)
        # 3. Level by level, highest priority first: the waiting jobs of this priority or higher start
        #    (a job's minimum is protected against workloads of its own priority or lower), then the
        #    services of this priority grow to their want, reclaiming from lower-priority jobs down to
        #    zero if their demand needs it.
        levels = sorted({w.spec.priority for w in services}, reverse=True)
        bands = _priority_bands(ws, levels, held.holding(now, self.config.restart_hold_s))
        for i, (jobs, waiting) in enumerate(bands):
            ws.infeasible.extend(waiting)
            if jobs:
                start_jobs(ws, self.speed, preempt=True, jobs=jobs)
            if i < len(levels):
                fill_services(ws, want, reclaim=True, priority=levels[i])
        # 4. Training grows into the rest.
        grow_jobs(ws)
        decision = ws.decision()
        return decision, held.after(decision, snapshot, want).to_state(state)


class RestartHold:
    """The job's side of the no-churn rule: jobs stopped for a service, and when each GPU type last
    saw service pressure (a reclaim for a service on it, or a service short of its want that accepts
    it). Kept in the policy state under ``restart_hold`` (JSON-able) and carried between decisions.

    Example: a job stopped on H100 at t=100 s, ``restart_hold_s`` 60, the service reclaims on H100
    again at t=130 s: the job may start again from t=190 s, if no later pressure on H100 moves it on.
    """

    KEY = "restart_hold"

    def __init__(self, stopped: dict[str, tuple[GpuType, float]], pressure: dict[GpuType, float]) -> None:
        self.stopped = stopped
        self.pressure = pressure

    @classmethod
    def from_state(cls, state: PolicyState, workloads: Mapping[str, WorkloadSnapshot]) -> RestartHold:
        data = state.data.get(cls.KEY) or {}
        stopped = {n: (t, float(at)) for n, (t, at) in (data.get("stopped") or {}).items() if n in workloads}
        pressure = {t: float(at) for t, at in (data.get("pressure") or {}).items()}
        return cls(stopped, pressure)

    def holding(self, now_s: float, hold_s: float) -> dict[str, str]:
        """The stopped jobs that may not start yet, each with the reason it waits."""
        out: dict[str, str] = {}
        for name, (t, _) in self.stopped.items():
            last = self.pressure.get(t, -math.inf)
            if now_s - last < hold_s:
                out[name] = (
                    f"waiting: stopped for a higher-priority service on {t}; starts again once {t} has "
                    f"had no service reclaim or unmet service demand for {hold_s:g} s "
                    f"(last {now_s - last:.0f} s ago)"
                )
        return out

    def after(self, decision: PolicyDecision, snapshot: ClusterSnapshot, want: Mapping[str, int]) -> RestartHold:
        """The hold after ``decision``: new stops and pressure recorded, restarted jobs let go."""
        now = snapshot.now_s
        stopped, pressure = dict(self.stopped), dict(self.pressure)
        targets, grants = decision.targets, snapshot.grants
        for r in decision.reclaims:
            if r.recipient in want:
                pressure[r.gpu_type] = now
                before = grants.get(r.donor)
                if before is not None and before.total() > 0 and r.donor not in targets:
                    stopped[r.donor] = (r.gpu_type, now)
        if want:
            # (``want`` names services only: their part of the snapshot, not a walk of the queue.)
            for w in workload_index(snapshot.workloads).split()[1]:
                name = w.spec.name
                if name in want:
                    target = targets.get(name)
                    if (target.total() if target is not None else 0) < want[name]:
                        for t in w.spec.gpu_types:
                            pressure[t] = now
        for name in [n for n in stopped if n in targets]:
            del stopped[name]  # it started again
        return RestartHold(stopped, pressure)

    def to_state(self, state: PolicyState) -> PolicyState:
        if not self.stopped and not self.pressure and self.KEY not in state.data:
            return state
        data = dict(state.data)
        data[self.KEY] = {
            "stopped": {n: [t, at] for n, (t, at) in sorted(self.stopped.items())},
            "pressure": dict(sorted(self.pressure.items())),
        }
        return PolicyState(data)


def _band(priority: int, levels: list[int]) -> int:
    i = 0
    while i < len(levels) and priority < levels[i]:
        i += 1
    return i


def _priority_bands(
    ws: Workspace, levels: list[int], hold: Mapping[str, str]
) -> list[tuple[list[WorkloadSnapshot], list[Infeasible]]]:
    """The jobs that may start, split by the services' priority levels (highest first): band ``i`` holds
    the jobs with ``levels[i] <= priority < levels[i - 1]``, the last band those below every level.
    Each band comes with the ``Infeasible`` records of its held jobs (``hold``: name -> reason), which
    wait instead of starting.

    With no held job, one level and no job at or above it (the usual case: services outrank
    training), the jobs are not copied: one pass finds their highest priority.
    """
    jobs = ws.jobs()
    bands: list[tuple[list[WorkloadSnapshot], list[Infeasible]]] = [([], []) for _ in range(len(levels) + 1)]
    if not hold and (not jobs or not levels or max(map(_PRIORITY, jobs)) < levels[-1]):
        bands[-1] = (jobs, [])
        return bands
    units_of = ws.unit_counts.get
    for w in jobs:
        band = bands[_band(w.spec.priority, levels)]
        reason = hold.get(w.spec.name)
        if reason is None:
            band[0].append(w)
        elif not units_of(w.spec.name):
            band[1].append(Infeasible(w.spec.name, reason))
    return bands


# ------------------------------------------------------------------------------ shared building blocks


def _by_priority(ws_list: list[WorkloadSnapshot]) -> list[WorkloadSnapshot]:
    return sorted(ws_list, key=lambda w: (-w.spec.priority, w.registered_s, w.name))


def shrink_to_want(ws: Workspace, service_wants: Mapping[str, int]) -> None:
    """Gives back what services and jobs no longer want, least preferred types first."""
    units, workloads = ws.unit_counts.get, ws.workloads
    # (Only workloads with units have an ``alloc`` entry; the list: shrinking changes it.)
    for name in list(ws.alloc):
        have = units(name, 0)
        if not have:
            continue  # nothing to give back (wants are never negative)
        w = workloads[name]
        if name in service_wants:
            excess = have - service_wants[name]
        else:
            excess = have - min(max(w.demand_units, 0), w.spec.max_units)  # job_want(w), inlined
        if excess <= 0:
            continue
        for t in reversed(w.spec.gpu_types):
            if excess <= 0:
                break
            excess -= ws.shrink(name, t, excess)


def fill_services(
    ws: Workspace, want: Mapping[str, int], *, reclaim: bool, priority: int | None = None
) -> None:
    """Grows services (those of ``priority``, or all) to ``want``: free GPUs first (preferred types
    first); then, if ``reclaim``, GPUs of lower-priority preemptible training jobs: their units above
    minimum on every accepted type first, then whole jobs (stopped: they wait, having checkpointed)."""
    for s in _by_priority(ws.services()):
        spec = s.spec
        if priority is not None and spec.priority != priority:
            continue
        need = want[s.name] - ws.units(s.name)
        if need <= 0:
            continue
        for t in spec.gpu_types:
            need -= ws.place(s.name, t, need)
            if need <= 0:
                break
        if need > 0 and reclaim:
            for include_min in (False, True):
                for t in spec.gpu_types:
                    if ws.reclaimable_gpus(t, spec.priority, include_min) < spec.gpus_per_unit - 1e-9:
                        continue
                    donors = _donors(ws, t, spec.priority, need * spec.gpus_per_unit, include_min)
                    if donors:
                        need -= ws.reclaim_for(s.name, t, need, donors, donors if include_min else [])
                    if need <= 0:
                        break
                if need <= 0:
                    break
        if need > 0:
            ws.infeasible.append(
                Infeasible(
                    s.name,
                    f"wants {want[s.name]} replicas of {s.spec.gpus_per_unit:g} GPU on "
                    f"{'/'.join(s.spec.gpu_types)}, has {ws.units(s.name)}: no free or reclaimable GPUs",
                )
            )


def _donors(
    ws: Workspace, gpu_type: GpuType, below_priority: int, needed_gpus: float, include_min: bool = False
) -> list[str]:
    """Preemptible jobs on ``gpu_type`` with lower priority, cheapest loss first.

    Order: lowest priority; then a job that covers the whole need by itself (fewest jobs disturbed);
    then the least work since its last checkpoint; then the newest job. Only the lowest priority
    levels that together cover the need are looked at, so a reclaim costs what it touches.
    """
    out: list[str] = []
    covered = 0.0
    levels = (ws.preemptible_holders if include_min else ws.spare_holders).get(gpu_type, {})
    for prio in sorted(p for p in levels if p < below_priority):
        cands = []
        for name in levels[prio]:
            w = ws.workloads[name]
            spec = w.spec
            have = ws.units_on(name, gpu_type)
            spare_gpus = (have - min(have, spec.min_units)) * spec.gpus_per_unit
            covered += have * spec.gpus_per_unit if include_min else spare_gpus
            covers = spare_gpus + 1e-9 >= needed_gpus
            cands.append((0 if covers else 1, w.seconds_since_checkpoint or 0.0, -w.registered_s, name))
        cands.sort()
        out += [c[-1] for c in cands]
        if covered + 1e-9 >= needed_gpus:
            break
    return out


def _queue_order(
    order: Callable[[WorkloadSnapshot], tuple] | None, jobs: list[WorkloadSnapshot]
) -> list[WorkloadSnapshot]:
    """``jobs`` in the order ``start_jobs`` walks them: by priority (highest first), then arrival,
    then name; or in ``order``."""
    if order is arrival_order:
        # (registered_s, name) as two stable sorts on C-level keys, last key first: the same order as
        # ``sort(key=arrival_order)``, without a Python call per waiting job.
        jobs.sort(key=_NAME)
        jobs.sort(key=_REGISTERED)
    elif order is not None:
        jobs.sort(key=order)
    else:
        # The key (-priority, registered_s, name) as three stable sorts on C-level keys, last key
        # first (``reverse`` keeps equal elements in order): the same order, at a third of the cost of
        # a Python key function on a long queue.
        jobs.sort(key=_NAME)
        jobs.sort(key=_REGISTERED)
        jobs.sort(key=_PRIORITY, reverse=True)
    return jobs


_NAME = attrgetter("spec.name")
_REGISTERED = attrgetter("registered_s")
_PRIORITY = attrgetter("spec.priority")


def arrival_order(w: WorkloadSnapshot) -> tuple:
    """First come, first served (then by name): an ``order`` for ``start_jobs`` and ``fill_training``,
    which sort by it without calling it (``_queue_order``)."""
    return (w.registered_s, w.spec.name)


def start_jobs(
    ws: Workspace,
    speed: Callable[[GpuType], float],
    *,
    preempt: bool,
    greedy: bool = False,
    order: Callable[[WorkloadSnapshot], tuple] | None = None,
    jobs: list[WorkloadSnapshot] | None = None,
) -> None:
    """Starts waiting jobs, priority level by priority level (or in ``order``, e.g. arrival).

    A job gets its minimum on the fastest accepted type that fits (``greedy``: everything it wants
    there, as a plain elastic Ray Train job would); with ``preempt``, a job that fits nowhere may stop
    lower-priority preemptible jobs, taking their units above minimum first.

    ``jobs``: the jobs to walk (a list this call may reorder), or every job of the workspace.

    A long queue stays cheap: a waiting job of a kind (types, unit, minimum, priority) already found
    unable to start, with nothing changed in the workspace since, costs a lookup and reuses its
    ``Infeasible`` record from the last decision (``_QueueKinds``).
    """
    queue = _Queue()
    units_of = ws.unit_counts.get
    stuck = queue.stuck
    append = ws.infeasible.append
    kinds, known = _KINDS, _KINDS.by_id.get
    changes = ws.changes  # moves only inside _start_job
    if jobs is None:
        jobs = ws.jobs()
    if not preempt:
        # Without preemption no job loses units during the walk, so the running ones (and those that
        # want nothing) can be left out before the sort.
        jobs = [
            w
            for w in jobs
            if not units_of(w.spec.name) and w.demand_units > 0 and w.spec.max_workers > 0  # type: ignore[union-attr]
        ]
    for w in _queue_order(order, jobs):
        spec = w.spec
        # job_want(w) > 0 and nothing yet: a waiting job
        if units_of(spec.name) or w.demand_units <= 0 or spec.max_workers <= 0:  # type: ignore[union-attr]
            continue
        k = known(id(spec))
        if k is None or k.spec is not spec:
            k = kinds.of(spec)
        found = stuck.get(k.preempt if preempt else k.plain)
        if found is not None and found[0] == changes:
            # (``k.infeasible(reason)``, inlined: this is the line a long queue runs)
            append(k.last_infeasible if k.last_reason is found[1] else k.infeasible(found[1]))
            continue
        _start_job(ws, w, speed, preempt, greedy, queue, k, k.preempt if preempt else k.plain)
        changes = ws.changes


class _QueueKind:
    """What the queue walk needs of one job spec, worked out once (``_QueueKinds``)."""

    __slots__ = ("spec", "need", "preempt", "plain", "last_reason", "last_infeasible")

    def __init__(self, spec: WorkloadSpec, ids: dict[tuple, int]) -> None:
        self.spec = spec
        self.need = need = max(1, spec.min_units)
        g = spec.gpus_per_unit
        # Small ints for (types, unit GPUs, minimum, priority or None): cheap keys for ``_Queue.stuck``.
        self.preempt = ids.setdefault((spec.gpu_types, g, need, spec.priority), len(ids))
        self.plain = ids.setdefault((spec.gpu_types, g, need, None), len(ids))
        self.last_reason: str | None = None
        self.last_infeasible: Infeasible | None = None

    def infeasible(self, reason: str) -> Infeasible:
        """The job's ``Infeasible`` for ``reason``: the last one while the reason is the same."""
        if reason is not self.last_reason and reason != self.last_reason:
            self.last_reason = reason
            self.last_infeasible = Infeasible(self.spec.name, reason)
        return self.last_infeasible  # type: ignore[return-value]


class _QueueKinds:
    """``_QueueKind`` per job spec, by identity, kept across decisions (a job's spec is the same object
    for as long as it is registered). Bounded: cleared when it grows past ``MAX`` specs."""

    MAX = 200_000

    def __init__(self) -> None:
        self.by_id: dict[int, _QueueKind] = {}
        self._ids: dict[tuple, int] = {}

    def of(self, spec: WorkloadSpec) -> _QueueKind:
        k = self.by_id.get(id(spec))
        if k is None or k.spec is not spec:
            if len(self.by_id) >= self.MAX:
                self.by_id.clear()
            k = self.by_id[id(spec)] = _QueueKind(spec, self._ids)  # (it keeps ``spec`` alive: no id reuse)
        return k


_KINDS = _QueueKinds()
_REASONS: dict[tuple, str] = {}


class _Queue:
    """What ``start_jobs`` learns while it walks the queue, so that a long queue stays cheap.

    ``hopeless[(type, unit GPUs, need, priority or None)]``: the version of the type (``ws.version``)
    at which a job of that unit, need and priority (to preempt) could not start there. Whether a job
    can start on a type depends on nothing else, so the jobs behind it cost a lookup per type until
    that type changes.
    """

    __slots__ = ("by_speed", "hopeless", "stuck")

    def __init__(self) -> None:
        self.by_speed: dict[tuple[GpuType, ...], list[GpuType]] = {}
        self.hopeless: dict[tuple, int] = {}
        # ``stuck[kind]`` (``_QueueKind.preempt``/``plain``): (``ws.changes`` when a job of that kind
        # was found hopeless on all its types, the reason). While nothing in the workspace has changed
        # since, every type is still hopeless for the next job of that kind: one lookup per job of a
        # long queue instead of one per type.
        self.stuck: dict[int, tuple[int, str]] = {}

    @staticmethod
    def reason(spec: WorkloadSpec, need: int) -> str:
        """The waiting reason, the same string object for every job of a kind (and every decision)."""
        key = (need, spec.gpus_per_unit, spec.gpu_types)
        r = _REASONS.get(key)
        if r is None:
            if len(_REASONS) >= 10_000:
                _REASONS.clear()
            r = _REASONS[key] = (
                f"waiting: needs {need} worker(s) of {spec.gpus_per_unit:g} GPU on one node type of "
                f"{'/'.join(spec.gpu_types)}; not enough free GPUs"
            )
        return r


def grow_jobs(ws: Workspace, order: Callable[[WorkloadSnapshot], tuple] | None = None) -> None:
    """Grows running jobs into the free GPUs of their type, level by level, shared by weight.

    Only running jobs can grow, so only they are looked at (``alloc`` holds just the workloads with
    units): a long queue costs nothing here. Within a level the order does not matter (each type's
    growers are sorted by ``_grow_weighted``, and types are independent), so ``order`` (one level for
    everyone) only decides that there is one level.
    """
    unit = ws.uniform_unit
    if unit > 0 and all(p.total < unit for p in ws.packers.values()):
        return  # no type has room for one more unit (the common case under load): nothing can grow
    workloads = ws.workloads
    training = WorkloadKind.TRAINING
    by_priority: dict[int, list[WorkloadSnapshot]] = {}
    for name, a in ws.alloc.items():
        if a:
            w = workloads[name]
            spec = w.spec
            if spec.kind is training:
                level = 0 if order is not None else spec.priority
                found = by_priority.get(level)
                if found is None:
                    by_priority[level] = [w]
                else:
                    found.append(w)
    for level in sorted(by_priority, reverse=True):
        _grow_weighted(ws, by_priority[level])


def fill_training(
    ws: Workspace,
    speed: Callable[[GpuType], float],
    *,
    preempt: bool,
    greedy: bool = False,
    order: Callable[[WorkloadSnapshot], tuple] | None = None,
) -> None:
    """Starts waiting jobs, then grows running ones (see ``start_jobs`` and ``grow_jobs``)."""
    start_jobs(ws, speed, preempt=preempt, greedy=greedy, order=order)
    grow_jobs(ws, order)


def _start_job(
    ws: Workspace,
    w: WorkloadSnapshot,
    speed: Callable[[GpuType], float],
    preempt: bool,
    greedy: bool,
    queue: _Queue,
    k: _QueueKind,
    kind: int,
) -> None:
    """Starts one waiting job if it can (``start_jobs`` has checked ``queue.stuck`` for its ``kind``)."""
    spec = w.spec
    need = k.need
    g = spec.gpus_per_unit
    prio = spec.priority if preempt else None
    hopeless, version = queue.hopeless, ws.version
    for t in spec.gpu_types:
        if hopeless.get((t, g, need, prio)) != version.get(t, 0):
            break
    else:
        reason = queue.reason(spec, need)
        queue.stuck[kind] = (ws.changes, reason)
        ws.infeasible.append(k.infeasible(reason))
        return
    want = job_want(w)
    best = None
    for i, t in enumerate(spec.gpu_types):
        fit = ws.fits(t, g)
        if fit >= need:
            score = (speed(t) * min(want, fit), -i)
            if best is None or score > best[0]:
                best = (score, t)
    if best is not None:
        ws.place(spec.name, best[1], want if greedy else need)
        return
    if preempt:
        types = queue.by_speed.get(spec.gpu_types)
        if types is None:
            types = queue.by_speed[spec.gpu_types] = sorted(spec.gpu_types, key=lambda t: -speed(t))
        for t in types:
            reclaimable = ws.reclaimable_gpus(t, spec.priority, include_min=True)
            if ws.free_gpus(t) + reclaimable + 1e-9 < need * g:
                continue
            # Whether the reclaim works depends on the unit, the need, the priority and type t's state
            # only: a failure is memoised, so a queue of like jobs tries once while t stays as it is.
            if ws.memo(t, ("start", g, need, spec.priority), lambda t=t: _try_start(ws, w, t, need)):
                return
    version = ws.version  # (a rollback restored the versions: each type's state is as it was)
    for t in spec.gpu_types:
        hopeless[(t, g, need, prio)] = version.get(t, 0)
    reason = queue.reason(spec, need)
    queue.stuck[kind] = (ws.changes, reason)
    ws.infeasible.append(k.infeasible(reason))


def _try_start(ws: Workspace, w: WorkloadSnapshot, t: GpuType, need: int) -> bool:
    """Starts ``w`` with ``need`` workers on ``t`` by stopping lower-priority jobs, all or nothing."""
    spec = w.spec
    donors = _donors(ws, t, spec.priority, need * spec.gpus_per_unit, include_min=True)
    cp = ws.checkpoint()
    if ws.reclaim_for(spec.name, t, need, donors, donors) >= need:
        return True
    ws.rollback(cp)
    return False


def _grow_weighted(ws: Workspace, level: list[WorkloadSnapshot]) -> None:
    """Shares each type's free GPUs among the growing jobs of one level, in proportion to weight.

    Example: 6 free H100s, jobs A (weight 2) and B (weight 1), 1 GPU per worker, both wanting 10 more:
    A gets 4, B gets 2 in the first pass; a second pass hands out what rounding left.
    """
    by_type: dict[GpuType, list[WorkloadSnapshot]] = {}
    wants: dict[str, int] = {}
    alloc, units = ws.alloc, ws.units
    for w in level:
        spec = w.spec
        name = spec.name
        a = alloc.get(name)
        if a:  # a running job, on its one type
            want = min(max(w.demand_units, 0), spec.max_units)  # job_want(w), inlined
            if units(name) < want:
                by_type.setdefault(next(iter(a)), []).append(w)
                wants[name] = want
    place = ws.place
    for t, growers in by_type.items():
        packer = ws.packers.get(t)
        # (to_centi rounds up, so the smallest unit is that of the smallest GPUs per unit.)
        smallest = to_centi(min(w.spec.gpus_per_unit for w in growers))
        if packer is None or 0 < smallest > packer.total:
            continue  # a full type (the common case under load): no grower's unit fits, as place() would find
        free = ws.free_gpus(t)
        total_w = sum(max(w.spec.weight, 1e-9) for w in growers)  # type: ignore[union-attr]
        growers.sort(key=lambda w: (units(w.spec.name) / max(w.spec.weight, 1e-9), w.registered_s, w.spec.name))
        for w in growers:
            name = w.spec.name
            share = int(free * max(w.spec.weight, 1e-9) / total_w / w.spec.gpus_per_unit)
            if share > 0:
                place(name, t, min(share, wants[name] - units(name)))
                if 0 < smallest > packer.total:
                    break  # the type is full: every later place() would place nothing (and change nothing)
        if 0 < smallest > packer.total:
            continue
        for w in growers:
            name = w.spec.name
            place(name, t, wants[name] - units(name))
            if 0 < smallest > packer.total:
                break
