"""A scratch allocation that policies build their decision in.

It starts from the grants in force (policies are sticky: a job keeps its GPU type and its workers
unless something with a better claim needs them), trims what no longer fits the healthy nodes, and
offers the moves every policy is made of: place units into free GPUs, and shrink a donor so that a
recipient fits. Packing is per node (``TypePacker``), so a grant is always placeable.

Protection order (what survives a shortage, first to last):
  0. non-preemptible jobs, 1. service minimums, 2. job minimums, 3. services above their minimum,
  4. jobs above their minimum (higher priority first; within a priority, more work at stake first).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from operator import attrgetter
from typing import Any

from tidal.cluster.model import (
    Allocation,
    ClusterSnapshot,
    GpuType,
    TrainingJobSpec,
    WorkloadKind,
    WorkloadName,
    WorkloadSnapshot,
    inventory,
    workload_index,
)
from tidal.policies.base import Infeasible, PolicyDecision, Reclaim
from tidal.policies.packing import TypePacker, UniformPacker, to_centi, uniform_packer

_PRIORITY = attrgetter("spec.priority")
_GPUS_PER_WORKER = attrgetter("spec.gpus_per_worker")


def protection_keys(w: WorkloadSnapshot) -> tuple[tuple, tuple]:
    """The protection keys of a workload's units up to its minimum and above it (see the module doc)."""
    spec = w.spec
    name = spec.name
    if spec.kind is WorkloadKind.TRAINING:
        if not spec.preemptible:  # type: ignore[union-attr]
            key = (0, -spec.priority, w.registered_s, name)
            return key, key
        loss = w.seconds_since_checkpoint or 0.0
        return (2, -spec.priority, w.registered_s, name), (4, -spec.priority, -loss, w.registered_s, name)
    return (1, -spec.priority, w.registered_s, name), (3, -spec.priority, w.registered_s, name)


class Workspace:
    """Working allocation: units per workload and GPU type, with per-type packers of what is free."""

    def __init__(
        self,
        snapshot: ClusterSnapshot,
        known: Iterable[WorkloadSnapshot] | None = None,
        *,
        reclaims: bool = True,
    ) -> None:
        """``reclaims=False``: a policy that never takes GPUs from a holder (no ``reclaim_for``,
        ``reclaimable_gpus``, holder indexes) skips keeping the indexes those need."""
        self.snapshot = snapshot
        self._indexed = reclaims
        # By name, and split into services and jobs: derived once per tuple of workloads and shared
        # with the guards and any other workspace over the same tuple (``workload_index``): read only.
        index = workload_index(snapshot.workloads if known is None else known)
        self.workloads: Mapping[WorkloadName, WorkloadSnapshot] = index.by_name()
        _, self._services, self._jobs = index.split()
        # The GPUs of each healthy node, per type (computed once per tuple of nodes: see ``inventory``).
        self.node_gpus: Mapping[GpuType, tuple[float, ...]] = inventory(snapshot.nodes).node_gpus
        node_gpus = self.node_gpus
        workloads = self.workloads
        training_kind = WorkloadKind.TRAINING
        # The one unit size of every workload, in centi-GPUs (0: sizes differ; -1: no workloads). With
        # nodes that are whole multiples of it, each type is packed as a total (``UniformPacker``): the
        # same counts.
        # (``gpus_per_unit`` by its fields, not the property: this runs over every workload, every tick.)
        gpus = set(map(_GPUS_PER_WORKER, self._jobs))  # (C-level: this pass covers a long queue)
        gpus.update([w.spec.gpus_per_replica for w in self._services])  # type: ignore[union-attr]
        unit_sizes = {to_centi(g) for g in gpus}
        unit = (unit_sizes.pop() if len(unit_sizes) == 1 else 0) if unit_sizes else -1
        # Units per workload and type. Only workloads with units have an entry (one may be left
        # empty after a shrink): a long queue of waiting jobs costs nothing in the passes over it.
        # In the order of the grants (the order of the entries decides nothing: see ``decision``).
        self.alloc: dict[WorkloadName, dict[GpuType, int]] = {}
        alloc = self.alloc
        for name, current in snapshot.grants.items():
            w = workloads.get(name)
            if w is None:
                continue
            items = current.items
            spec = w.spec
            types = spec.gpu_types
            if len(items) == 1:
                # The common case, one type: what the general path below makes of it.
                t, n = items[0]
                m = spec.max_units
                if t in node_gpus and t in types and m > 0:
                    alloc[name] = {t: n if n <= m else m}
                continue
            if not items:
                continue
            training = spec.kind is training_kind
            cur = {t: n for t, n in items if t in node_gpus and t in types}
            # Never above the workload's max; a job holds one type only.
            _clip_total(cur, spec.max_units, types)
            if training and len(cur) > 1:
                keep = max(cur, key=lambda t: (cur[t], -types.index(t)))
                cur = {keep: cur[keep]}
            if cur:
                alloc[name] = cur
        # Every workload's unit in centi-GPUs when they are all the same size, else 0 (-1: none).
        self.uniform_unit = unit
        self.packers: dict[GpuType, TypePacker | UniformPacker] = {}
        # Per type: an empty ``UniformPacker`` when every unit here packs as a total, else absent.
        self._uniform: dict[GpuType, UniformPacker] = {}
        if unit > 0:
            for t, sizes in node_gpus.items():
                u = uniform_packer(sizes, unit)
                if u is not None:
                    self._uniform[t] = u
        # Where each workload's units sit: name -> type -> node index -> units. A virtual placement,
        # re-derived each decision, so that a shrink frees capacity on the nodes it really frees.
        # (Filled as units are placed: a workload without units may have no entry.)
        self.where: dict[WorkloadName, dict[GpuType, dict[int, int]]] = {}
        self.reclaims: list[Reclaim] = []
        self.infeasible: list[Infeasible] = []
        # A version per GPU type, fresh (never reused) after every change to that type's packer or
        # holdings, restored by ``rollback``: what depends only on one type's state can be memoised
        # under its version (``fits``, ``memo``).
        self._clock = 0
        self.version: dict[GpuType, int] = {}
        self._memo: dict[tuple, tuple[int, object]] = {}
        self._units: dict[WorkloadName, int] = {}
        self._built = False  # the holder indexes (``_build_index``)
        self._lowest_priority: float | None = None  # (``_lowest_job_priority``)
        self._reindex()
        on_type: dict[GpuType, list[WorkloadName]] = {t: [] for t in node_gpus}
        for name, a in self.alloc.items():
            for t in a:
                on_type[t].append(name)
        for t in node_gpus:
            self._pack(t, on_type[t])

    def _reindex(self) -> None:
        """Indexes of who holds what, kept up to date by every move (see ``_adjust``).

        ``preemptible_holders[t][p]``: the preemptible jobs with units on type t, by priority (an
        ordered set; ``spare_holders``: those above their minimum); ``_total[t][p]`` and
        ``_spare[t][p]``: GPUs that preemptible jobs of priority p hold on t, in all and above their
        minimum. They make "is anything reclaimable here?" cost O(priorities), not O(jobs).
        """
        # (Updated in place: ``unit_counts`` hands out this dict, and a rollback must not leave a
        # caller holding a stale one.)
        self._units.clear()
        self._units.update({n: sum(a.values()) for n, a in self.alloc.items()})
        if self._built:
            self._build_index()

    def _build_index(self) -> None:
        """The holder indexes (see ``_reindex``), built on first use: most decisions reclaim nothing
        and never need them. From then on every move keeps them up to date."""
        if not self._indexed:
            raise RuntimeError("this workspace was built with reclaims=False: it keeps no holder indexes")
        self._built = True
        self._preemptible_holders: dict[GpuType, dict[int, dict[WorkloadName, None]]] = {}
        self._spare_holders: dict[GpuType, dict[int, dict[WorkloadName, None]]] = {}
        self._total: dict[GpuType, dict[int, float]] = {}
        self._spare: dict[GpuType, dict[int, float]] = {}
        pre, spare_h, total, spare = self._preemptible_holders, self._spare_holders, self._total, self._spare
        workloads = self.workloads
        training_kind = WorkloadKind.TRAINING
        # (type, priority) -> its level, spare level and per-priority sums (found once, not per job).
        by_level: dict[tuple, tuple] = {}
        for name, a in self.alloc.items():
            if not a:
                continue
            spec = workloads[name].spec
            if spec.kind is not training_kind:
                continue
            for t, n in a.items():
                # What ``_index(w, t, 0, n)`` does, inlined (this runs for every running job).
                if spec.preemptible:  # type: ignore[union-attr]
                    g, m, p = spec.gpus_per_unit, spec.min_units, spec.priority
                    found = by_level.get((t, p))
                    if found is None:
                        found = by_level[(t, p)] = (
                            pre.setdefault(t, {}).setdefault(p, {}),
                            spare_h.setdefault(t, {}).setdefault(p, {}),
                            total.setdefault(t, {}),
                            spare.setdefault(t, {}),
                        )
                    level, spare_level, tot, sp = found
                    level[name] = None
                    if n > m:
                        spare_level[name] = None
                    tot[p] = tot.get(p, 0.0) + n * g
                    sp[p] = sp.get(p, 0.0) + max(0, n - m) * g

    @property
    def preemptible_holders(self) -> dict[GpuType, dict[int, dict[WorkloadName, None]]]:
        if not self._built:
            self._build_index()
        return self._preemptible_holders

    @property
    def spare_holders(self) -> dict[GpuType, dict[int, dict[WorkloadName, None]]]:
        if not self._built:
            self._build_index()
        return self._spare_holders

    def _index(self, w: WorkloadSnapshot, t: GpuType, old: int, new: int) -> None:
        spec = w.spec
        if isinstance(spec, TrainingJobSpec) and spec.preemptible:
            g, m, p = spec.gpus_per_unit, spec.min_units, spec.priority
            level = self._preemptible_holders.setdefault(t, {}).setdefault(p, {})
            spare_level = self._spare_holders.setdefault(t, {}).setdefault(p, {})
            if new:
                level[w.spec.name] = None
            else:
                level.pop(w.spec.name, None)
            if new > m:
                spare_level[w.spec.name] = None
            else:
                spare_level.pop(w.spec.name, None)
            tot = self._total.setdefault(t, {})
            tot[p] = tot.get(p, 0.0) + (new - old) * g
            spare = self._spare.setdefault(t, {})
            spare[p] = spare.get(p, 0.0) + (max(0, new - m) - max(0, old - m)) * g

    def _adjust(self, name: WorkloadName, t: GpuType, delta: int) -> None:
        self._clock += 1
        self.version[t] = self._clock
        a = self.alloc.get(name)
        if a is None:
            a = self.alloc[name] = {}
        old = a.get(t, 0)
        new = old + delta
        if new:
            a[t] = new
        else:
            a.pop(t, None)
        self._units[name] = self._units.get(name, 0) + delta
        w = self.workloads[name]
        if self._built and w.kind is WorkloadKind.TRAINING:
            self._index(w, t, old, new)

    def reclaimable_gpus(self, gpu_type: GpuType, below_priority: int, include_min: bool) -> float:
        """GPUs on ``gpu_type`` held by preemptible jobs of lower priority (above their minimum only,
        unless ``include_min``)."""
        if not self._built:
            if self._lowest_job_priority() >= below_priority:
                # No job of lower priority holds anything (the usual case: one training priority): the
                # sum below is empty, and the holder indexes are not built for it.
                return 0
            self._build_index()
        by_prio = (self._total if include_min else self._spare).get(gpu_type, {})
        return sum(v for p, v in by_prio.items() if p < below_priority)

    def _lowest_job_priority(self) -> float:
        """The lowest priority of any job in the workspace (every holder among them), found once: a
        C-level pass over the jobs, far cheaper than the holder indexes."""
        p = self._lowest_priority
        if p is None:
            p = self._lowest_priority = min(map(_PRIORITY, self._jobs), default=math.inf)
        return p

    # -------------------------------------------------------------------------------- inspection

    def units(self, name: WorkloadName) -> int:
        return self._units.get(name, 0)

    @property
    def unit_counts(self) -> Mapping[WorkloadName, int]:
        """Units per workload (read only; a workload without units may be absent): ``units`` for a
        loop over many workloads, without a call per workload."""
        return self._units

    def units_on(self, name: WorkloadName, gpu_type: GpuType) -> int:
        a = self.alloc.get(name)
        return a.get(gpu_type, 0) if a else 0

    def job_type(self, name: WorkloadName) -> GpuType | None:
        a = self.alloc.get(name)
        return next(iter(a)) if a else None

    @property
    def changes(self) -> int:
        """A counter that moves on every change to any type's packer or holdings (never goes back,
        not even on ``rollback``): equal values mean nothing changed in between."""
        return self._clock

    def free_gpus(self, gpu_type: GpuType) -> float:
        p = self.packers.get(gpu_type)
        return p.free_gpus if p else 0.0

    def fits(self, gpu_type: GpuType, unit_gpus: float) -> int:
        p = self.packers.get(gpu_type)
        if p is None:
            return 0
        key = (gpu_type, unit_gpus)
        version = self.version.get(gpu_type, 0)
        hit = self._memo.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]  # type: ignore[return-value]
        n = p.max_units(unit_gpus)
        self._memo[key] = (version, n)
        return n

    def memo(self, gpu_type: GpuType, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, memoised under ``key`` while nothing on ``gpu_type`` changes.

        Only for what depends on nothing but ``gpu_type``'s packer and holdings (and constants of the
        snapshot): a long queue of waiting jobs then costs a lookup per job, not a search.
        """
        version = self.version.get(gpu_type, 0)
        full = ("memo", gpu_type, *key)
        hit = self._memo.get(full)
        if hit is not None and hit[0] == version:
            return hit[1]
        value = compute()
        # The version of the state ``compute`` saw: it may have moved and rolled back meanwhile.
        if self.version.get(gpu_type, 0) == version:
            self._memo[full] = (version, value)
        return value

    # ------------------------------------------------------------------------------------- moves

    def place(self, name: WorkloadName, gpu_type: GpuType, n: int) -> int:
        """Adds up to ``n`` units of ``name`` on ``gpu_type`` into free GPUs; returns how many."""
        p = self.packers.get(gpu_type)
        if p is None or n <= 0:
            return 0
        g = self.workloads[name].spec.gpus_per_unit
        if to_centi(g) > p.total:
            return 0  # nothing fits: the common case of a full type, without a search
        if gpu_type in self._uniform:
            placed = p.place_into(g, n)
            if placed:
                self._adjust(name, gpu_type, placed)
            return placed
        by_type = self.where.get(name)
        if by_type is None:
            by_type = self.where[name] = {}
        where = by_type.get(gpu_type)
        if where is None:
            where = by_type[gpu_type] = {}
        placed = p.place_into(g, n, where)
        if placed:
            self._adjust(name, gpu_type, placed)
        return placed

    def shrink(self, name: WorkloadName, gpu_type: GpuType, n: int) -> int:
        """Takes up to ``n`` units of ``name`` off ``gpu_type``, freeing them on their nodes."""
        k = min(n, self.units_on(name, gpu_type))
        if k <= 0:
            return 0
        need = to_centi(self.workloads[name].spec.gpus_per_unit)
        packer = self.packers[gpu_type]
        if gpu_type in self._uniform:
            packer.release(-1, k * need)
            self._adjust(name, gpu_type, -k)
            return k
        where = self.where[name][gpu_type]
        left = k
        # Free the nodes where it holds least first: whole nodes come free sooner, for big units.
        for node in sorted(where, key=lambda i: (where[i], i)):
            take = min(left, where[node])
            packer.release(node, take * need)
            where[node] -= take
            if not where[node]:
                del where[node]
            left -= take
            if left == 0:
                break
        self._adjust(name, gpu_type, -k)
        return k

    def repack(self, gpu_type: GpuType) -> None:
        """Packs everything allocated on ``gpu_type`` from scratch in protection order; trims misfits.

        Trimming only happens when capacity shrank (a node died): the least protected units go first.
        """
        self._pack(gpu_type, [name for name, a in self.alloc.items() if a.get(gpu_type)])

    def _pack(self, gpu_type: GpuType, names: list[WorkloadName]) -> None:
        """``repack`` of the workloads ``names`` (those holding units on ``gpu_type``, in ``alloc`` order)."""
        uniform = self._uniform.get(gpu_type)
        if uniform is not None:
            if self._pack_uniform(gpu_type, names, uniform):
                return
            del self._uniform[gpu_type]  # this type is packed per node from now on
        # (protection key, 0 for the minimum's units / 1 for the rest, name, units): the flag keeps a
        # non-preemptible job's minimum first (both its parts share one key).
        groups = []
        alloc, workloads = self.alloc, self.workloads
        for name in names:
            a = alloc[name]
            n = a.get(gpu_type, 0)
            if not n:
                continue
            w = workloads[name]
            spec = w.spec
            if len(a) == 1:
                min_here = min(n, spec.min_units)  # the alloc's types are among the spec's
            else:
                min_here = self._min_part_on(w, gpu_type, n)
            low, high = protection_keys(w)
            if min_here:
                groups.append((low, 0, name, min_here))
            if n - min_here:
                groups.append((high, 1, name, n - min_here))
        groups.sort()
        where_of = self.where
        if where_of:
            for _, _, name, _ in groups:
                by_type = where_of.get(name)
                if by_type is not None:
                    by_type.pop(gpu_type, None)
        node_gpus = self.node_gpus.get(gpu_type, ())
        seq = [(name, workloads[name].spec.gpus_per_unit, n) for _, _, name, n in groups]
        packer, wheres, start, memo = _PackMemo.resume(gpu_type, node_gpus, seq)
        self.packers[gpu_type] = packer
        for name, where in wheres.items():
            by_type = where_of.get(name)
            if by_type is None:
                by_type = where_of[name] = {}
            by_type[gpu_type] = where
        place_into = packer.place_into
        trimmed = False
        for i in range(start, len(seq)):
            if memo is not None and i % _PackMemo.EVERY == 0:
                memo.checkpoints.append(packer.copy())
            name, g, n = seq[i]
            by_type = where_of.get(name)
            if by_type is None:
                by_type = where_of[name] = {}
            where = by_type.get(gpu_type)
            if where is None:
                where = by_type[gpu_type] = {}
            placed = place_into(g, n, where)
            if memo is not None:
                memo.where_after.append(dict(where))
            if placed < n:
                # The nodes no longer hold it all (a node died): the least protected units go.
                self._adjust(name, gpu_type, placed - n)
                trimmed = True
        if memo is not None and not trimmed:
            memo.final = packer.copy()
            memo.store()
        self._clock += 1
        self.version[gpu_type] = self._clock

    def _pack_uniform(self, gpu_type: GpuType, names: list[WorkloadName], empty: UniformPacker) -> bool:
        """``_pack`` as a total, when everything held fits (no order to keep); False when it does not
        (a node died: the full packing trims the least protected units, in protection order)."""
        alloc = self.alloc
        units = 0
        for name in names:
            units += alloc[name].get(gpu_type, 0)
        free = empty.total - units * empty.need
        if free < 0:
            return False
        self.packers[gpu_type] = UniformPacker(free, empty.need)
        self._clock += 1
        self.version[gpu_type] = self._clock
        return True

    def _min_part_on(self, w: WorkloadSnapshot, gpu_type: GpuType, n: int) -> int:
        """How many of the ``n`` units on ``gpu_type`` count as the workload's minimum.

        A service's minimum is counted on its preferred types first.
        """
        need = w.spec.min_units
        for t in w.spec.gpu_types:
            here = self.units_on(w.name, t)
            if t == gpu_type:
                return min(n, need)
            need = max(0, need - here)
        return 0

    def reclaim_for(
        self,
        recipient: WorkloadName,
        gpu_type: GpuType,
        units: int,
        donors: list[WorkloadName],
        allow_below_min: list[WorkloadName],
    ) -> int:
        """Shrinks donors on ``gpu_type`` until ``units`` of ``recipient`` fit; places them.

        Donors are taken in the order given (the policy orders them cheapest loss first): first their
        units above minimum, then, for those in ``allow_below_min``, their whole minimum (the job stops
        and waits). Returns the units placed for the recipient.
        """
        unit_gpus = self.workloads[recipient].spec.gpus_per_unit
        placed = self.place(recipient, gpu_type, units)
        passes = [(d, False) for d in donors] + [(d, True) for d in allow_below_min]
        for donor, below_min in passes:
            if placed >= units:
                break
            have = self.units_on(donor, gpu_type)
            spec = self.workloads[donor].spec
            floor = 0 if below_min else min(have, spec.min_units)
            spare = have - floor
            if spare <= 0:
                continue
            missing_gpus = (units - placed) * unit_gpus - 0.0
            take = min(spare, max(1, math.ceil(missing_gpus / spec.gpus_per_unit - 1e-9)))
            if below_min:
                take = spare  # below its minimum a job cannot run: it gives all back
            self.shrink(donor, gpu_type, take)
            got = self.place(recipient, gpu_type, units - placed)
            if got == 0 and not below_min and spare > take:
                # Fragmentation: the freed GPUs sit on nodes where the unit does not fit; free more.
                more = spare - take
                self.shrink(donor, gpu_type, more)
                take += more
                got = self.place(recipient, gpu_type, units - placed)
            placed += got
            self.reclaims.append(Reclaim(donor, recipient, gpu_type, take))
        return placed

    def checkpoint(self) -> tuple:
        """A copy of the mutable state, for a move that must be all or nothing."""
        return (
            {n: dict(a) for n, a in self.alloc.items()},
            {t: p.copy() for t, p in self.packers.items()},
            {n: {t: dict(w) for t, w in by_t.items()} for n, by_t in self.where.items()},
            len(self.reclaims),
            dict(self.version),
        )

    def rollback(self, cp: tuple) -> None:
        alloc, packers, where, num_reclaims, version = cp
        # The state is the checkpoint's again, and so are the versions (memoised values stay valid).
        self.version = dict(version)
        self.alloc = {n: dict(a) for n, a in alloc.items()}
        self.packers = {t: p.copy() for t, p in packers.items()}
        self.where = {n: {t: dict(w) for t, w in by_t.items()} for n, by_t in where.items()}
        del self.reclaims[num_reclaims:]
        self._reindex()

    # ------------------------------------------------------------------------------------ result

    def decision(self) -> PolicyDecision:
        # An unchanged grant is handed back as the same object: no churn, and the guards and the
        # planner see "unchanged" at the cost of an identity check.
        grants = self.snapshot.grants
        targets: dict[WorkloadName, Allocation] = {}
        for n, a in self.alloc.items():
            if not a:
                continue
            items = tuple(a.items()) if len(a) == 1 else tuple(sorted(a.items()))
            current = grants.get(n)
            targets[n] = current if current is not None and current.items == items else Allocation(items)
        return PolicyDecision(targets, tuple(self.infeasible), tuple(self.reclaims))

    def services(self) -> list[WorkloadSnapshot]:
        return list(self._services)

    def jobs(self) -> list[WorkloadSnapshot]:
        return list(self._jobs)


class _PackMemo:
    """The last packing of each GPU type's nodes, so that the next decision redoes only what changed.

    A workspace packs every type's holders from scratch, in protection order (``Workspace._pack``):
    the result depends on nothing but the type's node sizes and the sequence ``(name, unit GPUs,
    units)`` placed, and between two decisions that sequence mostly keeps a long common prefix (often
    all of it). The memo keeps, for the last sequence of each (type, tuple of node sizes): the packer
    every ``EVERY`` groups, each group's placement right after it, and the final packer; a new sequence
    resumes from the last checkpoint inside the common prefix and places only the rest. The state it
    resumes from is a copy of what placing the prefix produced, so the packing, and every decision built
    on it, is exactly the same as from scratch. A packing that trimmed units (a node died) is not kept.
    """

    EVERY = 8
    _LAST: dict[tuple[GpuType, int], _PackMemo] = {}
    _MAX = 64

    __slots__ = ("key", "node_gpus", "seq", "checkpoints", "where_after", "final")

    def __init__(self, key: tuple[GpuType, int], node_gpus: tuple[float, ...], seq: list) -> None:
        self.key = key
        self.node_gpus = node_gpus  # kept alive, so that its id in the key is not reused
        self.seq = seq
        self.checkpoints: list[TypePacker] = []  # the packer before group 0, EVERY, 2 * EVERY, ...
        self.where_after: list[dict[int, int]] = []  # group i's node -> units right after placing it
        self.final: TypePacker | None = None

    @classmethod
    def resume(
        cls, gpu_type: GpuType, node_gpus: tuple[float, ...], seq: list
    ) -> tuple[TypePacker, dict[WorkloadName, dict[int, int]], int, _PackMemo | None]:
        """(packer, placements of the groups before ``start``, ``start``, the memo to fill or None).

        The packer is the state after placing ``seq[:start]``; placements are fresh dicts, per name.
        """
        key = (gpu_type, id(node_gpus))
        last = cls._LAST.get(key)
        if last is None or last.node_gpus is not node_gpus or last.final is None:
            memo = cls(key, node_gpus, seq)
            return TypePacker.of_nodes(node_gpus), {}, 0, memo
        old = last.seq
        if old == seq:
            wheres: dict[WorkloadName, dict[int, int]] = {}
            for i, (name, _, _) in enumerate(seq):
                wheres[name] = last.where_after[i]  # a name's later group overwrites its earlier one
            return last.final.copy(), {n: dict(w) for n, w in wheres.items()}, len(seq), None
        k, m = 0, min(len(old), len(seq))
        while k < m and old[k] == seq[k]:
            k += 1
        # The last checkpoint inside the common prefix (none past the old sequence's last group).
        c = min(k // cls.EVERY, len(last.checkpoints) - 1)
        memo = cls(key, node_gpus, seq)
        if c < 0:
            return TypePacker.of_nodes(node_gpus), {}, 0, memo
        start = c * cls.EVERY
        memo.checkpoints = last.checkpoints[:c]
        memo.where_after = last.where_after[:start]
        wheres = {}
        for i in range(start):
            wheres[seq[i][0]] = memo.where_after[i]
        return last.checkpoints[c].copy(), {n: dict(w) for n, w in wheres.items()}, start, memo

    def store(self) -> None:
        last = _PackMemo._LAST
        if len(last) >= _PackMemo._MAX and self.key not in last:
            last.clear()
        last[self.key] = self


def _clip_total(a: dict[GpuType, int], max_units: int, order: tuple[GpuType, ...]) -> None:
    """Trims ``a`` to ``max_units`` in total, dropping units on the least preferred types first."""
    excess = sum(a.values()) - max_units
    for t in reversed(order):
        if excess <= 0:
            break
        k = min(excess, a.get(t, 0))
        if k:
            a[t] -= k
            excess -= k
            if a[t] == 0:
                del a[t]
