"""The cluster model: what the arbiter observes, what workloads ask for, what it grants.

Pure data: no Ray, no torch, no wall clock. Every quantity is keyed by GPU type, the value of the node
label ``ray.io/accelerator-type`` (a plain string, so new hardware needs no code change).

Grants and holdings are counted in *units*: replicas for a service, workers for a training job. A unit
needs ``gpus_per_unit`` GPUs of one type (fractional for services, e.g. 0.5). GPUs are derived, never
stored, so the two can never disagree.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

GPU_TYPE_LABEL = "ray.io/accelerator-type"

GpuType = str
WorkloadName = str


class WorkloadKind(enum.StrEnum):
    SERVICE = "service"
    TRAINING = "training"


@dataclass(frozen=True, slots=True)
class Allocation:
    """Units per GPU type, e.g. ``Allocation.of(H100=2, A100=1)``: two units on H100s, one on A100s.

    Stored as a sorted tuple of ``(gpu_type, units)`` with no zero entries, so that equal allocations
    compare and hash equal.
    """

    items: tuple[tuple[GpuType, int], ...] = ()

    @staticmethod
    def of(mapping: Mapping[GpuType, int] | None = None, **units: int) -> Allocation:
        merged: dict[GpuType, int] = dict(mapping or {})
        merged.update(units)
        for gpu_type, n in merged.items():
            if n < 0:
                raise ValueError(f"units for {gpu_type!r} must be >= 0, got {n}")
        return Allocation(tuple(sorted((t, int(n)) for t, n in merged.items() if n)))

    def get(self, gpu_type: GpuType) -> int:
        for t, n in self.items:
            if t == gpu_type:
                return n
        return 0

    def total(self) -> int:
        items = self.items
        if len(items) == 1:
            return items[0][1]
        return sum(n for _, n in items)

    def types(self) -> tuple[GpuType, ...]:
        return tuple(t for t, _ in self.items)

    def as_dict(self) -> dict[GpuType, int]:
        return dict(self.items)

    def with_units(self, gpu_type: GpuType, units: int) -> Allocation:
        d = self.as_dict()
        d[gpu_type] = units
        return Allocation.of(d)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __str__(self) -> str:
        return "{" + ", ".join(f"{t}: {n}" for t, n in self.items) + "}"


EMPTY = Allocation()


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """One node: its GPU type, how many GPUs it has, and whether it is alive."""

    node_id: str
    gpu_type: GpuType
    num_gpus: float
    healthy: bool = True


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """An inference service (a Serve deployment) under Tidal.

    ``gpu_types`` lists the acceptable types, most preferred first. ``priority``: higher wins.
    """

    name: WorkloadName
    gpus_per_replica: float
    min_replicas: int
    max_replicas: int
    gpu_types: tuple[GpuType, ...]
    slo_p99_ms: float = 500.0
    priority: int = 100

    kind = WorkloadKind.SERVICE

    @property
    def gpus_per_unit(self) -> float:
        return self.gpus_per_replica

    @property
    def min_units(self) -> int:
        return self.min_replicas

    @property
    def max_units(self) -> int:
        return self.max_replicas


@dataclass(frozen=True, slots=True)
class TrainingJobSpec:
    """A Ray Train job under Tidal. It runs on one GPU type at a time, preferring ``gpu_types[0]``.

    ``weight`` shares free GPUs among jobs of equal priority. ``yield_grace_s`` is how long the job may
    take to checkpoint and let GPUs go after a shrink before it is stopped by force.
    """

    name: WorkloadName
    gpus_per_worker: float
    min_workers: int
    max_workers: int
    gpu_types: tuple[GpuType, ...]
    priority: int = 10
    preemptible: bool = True
    weight: float = 1.0
    checkpoint_period_s: float = 60.0
    yield_grace_s: float = 30.0

    kind = WorkloadKind.TRAINING

    @property
    def gpus_per_unit(self) -> float:
        return self.gpus_per_worker

    @property
    def min_units(self) -> int:
        return self.min_workers

    @property
    def max_units(self) -> int:
        return self.max_workers


WorkloadSpec = ServiceSpec | TrainingJobSpec


@dataclass(frozen=True, slots=True)
class WorkloadSnapshot:
    """A registered workload as the arbiter sees it at one instant.

    Attributes:
        spec: what the workload asked for.
        demand_units: replicas its load needs now (service) or the workers it can use (job).
        held: units it reports to be using now, per GPU type. Above the grant while it releases.
        registered_s: when it registered (first come, first served among equals).
        seconds_since_checkpoint: work a forced stop would lose, when the job reports it.
        running: a job that is running (holding GPUs) rather than waiting for its minimum.
    """

    spec: WorkloadSpec
    demand_units: int
    held: Allocation = EMPTY
    registered_s: float = 0.0
    seconds_since_checkpoint: float | None = None

    @property
    def name(self) -> WorkloadName:
        return self.spec.name

    @property
    def kind(self) -> WorkloadKind:
        return self.spec.kind


@dataclass(frozen=True, slots=True)
class GrantView:
    """What a workload reads back from a heartbeat.

    ``registered`` False means the arbiter does not know the workload (it expired, or was never
    registered): the client registers again. ``release_by_s`` is set while the workload holds more than
    its grant: it must let the excess go by then or be stopped by force.
    """

    name: WorkloadName
    grant: Allocation
    registered: bool = True
    reason: str | None = None
    release_by_s: float | None = None
    generation: int = 0


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """Everything a policy sees: inventory, workloads with demand, and the grants in force."""

    now_s: float
    nodes: tuple[NodeSnapshot, ...]
    workloads: tuple[WorkloadSnapshot, ...]
    grants: Mapping[WorkloadName, Allocation] = field(default_factory=dict)

    def capacity_by_type(self) -> dict[GpuType, float]:
        return dict(inventory(self.nodes).capacity)

    def grant_of(self, name: WorkloadName) -> Allocation:
        return self.grants.get(name, EMPTY)

    def workload(self, name: WorkloadName) -> WorkloadSnapshot | None:
        for w in self.workloads:
            if w.name == name:
                return w
        return None


@dataclass(frozen=True, slots=True)
class Inventory:
    """What a tuple of nodes adds up to, per GPU type (see ``inventory``).

    Attributes:
        capacity: GPUs of the healthy nodes, per type (in the order the types first appear).
        node_gpus: the GPUs of each healthy node that has any, per type, in node order.
    """

    capacity: Mapping[GpuType, float]
    node_gpus: Mapping[GpuType, tuple[float, ...]]


_INVENTORIES: dict[int, tuple[tuple[NodeSnapshot, ...], Inventory]] = {}
_MAX_INVENTORIES = 16


def inventory(nodes: Iterable[NodeSnapshot]) -> Inventory:
    """The ``Inventory`` of ``nodes``, computed once per tuple of nodes.

    A backend observes the same tuple tick after tick until a node changes, and every decision asks
    for it several times (the planner, the guards, each workspace): on 320 nodes that walk cost more than
    the rest of a quiet tick. Tuples of frozen ``NodeSnapshot`` never change, so the result is memoised by
    the tuple's identity (the cache keeps the tuple alive, so its id is not reused while cached).
    """
    memo = type(nodes) is tuple
    if memo:
        hit = _INVENTORIES.get(id(nodes))
        if hit is not None and hit[0] is nodes:
            return hit[1]
    cap: dict[GpuType, float] = {}
    per_type: dict[GpuType, list[float]] = {}
    for n in nodes:
        if n.healthy:
            cap[n.gpu_type] = cap.get(n.gpu_type, 0.0) + n.num_gpus
            if n.num_gpus > 0:
                per_type.setdefault(n.gpu_type, []).append(n.num_gpus)
    inv = Inventory(cap, {t: tuple(g) for t, g in per_type.items()})
    if memo:
        if len(_INVENTORIES) >= _MAX_INVENTORIES:
            _INVENTORIES.clear()
        _INVENTORIES[id(nodes)] = (nodes, inv)  # type: ignore[assignment]
    return inv


class WorkloadIndex:
    """What the readers of one tick's workloads derive from them, derived once (see ``workload_index``).

    The guards, the policy and its workspaces each need the workloads by name and split into services
    and jobs; derived by each of them, behind a long queue, each is a pass over thousands of waiting jobs,
    every tick.
    Everything it hands out is shared: read only.
    """

    __slots__ = ("workloads", "_by_name", "_split")

    def __init__(self, workloads: tuple[WorkloadSnapshot, ...]) -> None:
        self.workloads = workloads
        self._by_name: dict[WorkloadName, WorkloadSnapshot] | None = None
        self._split: tuple[tuple[int, ...], tuple[WorkloadSnapshot, ...], tuple[WorkloadSnapshot, ...]] | None = None

    def by_name(self) -> Mapping[WorkloadName, WorkloadSnapshot]:
        if self._by_name is None:
            self._by_name = {w.spec.name: w for w in self.workloads}
        return self._by_name

    def split(self) -> tuple[tuple[int, ...], tuple[WorkloadSnapshot, ...], tuple[WorkloadSnapshot, ...]]:
        """(the services' positions, the services, the jobs), each in the workloads' order."""
        if self._split is None:
            workloads = self.workloads
            service = WorkloadKind.SERVICE
            at = tuple([i for i, w in enumerate(workloads) if w.spec.kind is service])
            services = tuple([workloads[i] for i in at])
            if at:
                rest = list(workloads)
                for i in reversed(at):  # the few services out of a copy, not a second pass
                    del rest[i]
                jobs = tuple(rest)
            else:
                jobs = workloads
            self._split = (at, services, jobs)
            # The parts are tuples a workspace may be built over next: index them too.
            for part, split in ((services, (tuple(range(len(services))), services, ())), (jobs, ((), (), jobs))):
                if part is not workloads and part:
                    _remember(part)._split = split
        return self._split


_INDEXES: dict[int, WorkloadIndex] = {}
_MAX_INDEXES = 16


def workload_index(workloads: Iterable[WorkloadSnapshot]) -> WorkloadIndex:
    """The ``WorkloadIndex`` of ``workloads``, once per tuple (memoised by identity, as ``inventory``:
    the cache keeps the tuple alive, so its id is not reused while cached). Any other iterable gets a
    fresh index."""
    if type(workloads) is not tuple:
        return WorkloadIndex(tuple(workloads))
    hit = _INDEXES.get(id(workloads))
    if hit is not None and hit.workloads is workloads:
        return hit
    return _remember(workloads)


def index_from_parts(
    workloads: tuple[WorkloadSnapshot, ...],
    by_name: dict[WorkloadName, WorkloadSnapshot],
    services: tuple[WorkloadSnapshot, ...],
    jobs: tuple[WorkloadSnapshot, ...],
    jobs_by_name: dict[WorkloadName, WorkloadSnapshot],
) -> WorkloadIndex:
    """Remembers the index of ``workloads`` from parts its producer keeps between ticks (the arbiter
    keeps its workloads by name and by kind), so that no reader walks a long queue to derive them.

    ``services`` and ``jobs`` are the two kinds in the workloads' order; ``by_name`` and
    ``jobs_by_name`` are handed over (the caller keeps no reference that it mutates later).
    """
    if len(_INDEXES) > _MAX_INDEXES - 3:
        _INDEXES.clear()  # (room for the three tuples at once: none of them evicts another)
    index = _remember(workloads)
    index._by_name = by_name
    # The services' positions, by identity: a walk up to the last service only (services register
    # first in practice, so it stops within the first few workloads).
    found: list[int] = []
    i = 0
    for s in services:
        while workloads[i] is not s:
            i += 1
        found.append(i)
        i += 1
    if not services:
        jobs = workloads  # (as ``split`` hands them out: the same tuple)
    index._split = (tuple(found), services, jobs)
    for part, split, names in (
        (services, (tuple(range(len(services))), services, ()), None),
        (jobs, ((), (), jobs), jobs_by_name),
    ):
        if part is not workloads and part:
            sub = _remember(part)
            sub._split = split
            if names is not None:
                sub._by_name = names
    return index


def _remember(workloads: tuple[WorkloadSnapshot, ...]) -> WorkloadIndex:
    hit = _INDEXES.get(id(workloads))
    if hit is not None and hit.workloads is workloads:
        return hit
    if len(_INDEXES) >= _MAX_INDEXES:
        _INDEXES.clear()
    index = _INDEXES[id(workloads)] = WorkloadIndex(workloads)
    return index


def gpus_of(alloc: Allocation, gpus_per_unit: float) -> dict[GpuType, float]:
    """GPUs per type that ``alloc`` occupies: 3 replicas at 0.5 GPU -> 1.5 GPUs."""
    return {t: n * gpus_per_unit for t, n in alloc.items}


def sum_gpus(pairs: Iterable[tuple[Allocation, float]]) -> dict[GpuType, float]:
    """Total GPUs per type over ``(allocation, gpus_per_unit)`` pairs."""
    out: dict[GpuType, float] = {}
    for alloc, g in pairs:
        for t, n in alloc.items:
            out[t] = out.get(t, 0.0) + n * g
    return out


def spec_to_dict(spec: WorkloadSpec) -> dict:
    """A JSON-able dict of a spec, tagged with its kind (for persistence and HTTP)."""
    d = {f: getattr(spec, f) for f in spec.__dataclass_fields__}
    d["gpu_types"] = list(spec.gpu_types)
    d["kind"] = str(spec.kind)
    return d


def spec_from_dict(d: Mapping) -> WorkloadSpec:
    d = dict(d)
    kind = WorkloadKind(d.pop("kind"))
    d["gpu_types"] = tuple(d["gpu_types"])
    return ServiceSpec(**d) if kind is WorkloadKind.SERVICE else TrainingJobSpec(**d)
