"""The simulated backend: the arbiter's ``Backend`` protocol over simulated nodes and workloads.

- ``observe()`` returns the simulated nodes (a failed node is unhealthy until repaired).
- ``apply(grants)`` is where a real backend would push limits to Serve and notify job controllers; here it
  tells each workload whose grant changed to heartbeat ``heartbeat_delay_s`` later (the heartbeat
  period of a real client), and keeps the running totals of granted GPUs that the metrics integrate.
- ``force_release(name, ...)`` stops a workload that kept GPUs past its yield grace: a simulated job
  loses the work since its last checkpoint.

Node failures: the backend does not place units on nodes (the arbiter counts GPUs per type), so when a
node dies it decides whose units were on it by a deterministic first-fit of the current holders, in
name order, onto that type's healthy nodes in node-id order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tidal.cluster.arbiter import ForceResult
from tidal.cluster.model import Allocation, NodeSnapshot, WorkloadName, WorkloadSpec
from tidal.cluster.sim.engine import Event
from tidal.cluster.sim.workloads import ORDER_HEARTBEAT

if TYPE_CHECKING:
    from tidal.cluster.sim.simulator import Simulator


class SimBackend:
    """Implements ``tidal.cluster.arbiter.Backend`` for the simulator. See the module docstring."""

    def __init__(self, sim: Simulator, nodes: list[NodeSnapshot], heartbeat_delay_s: float) -> None:
        self.sim = sim
        self._nodes: tuple[NodeSnapshot, ...] = tuple(nodes)
        self.heartbeat_delay_s = heartbeat_delay_s
        self._last: dict[WorkloadName, Allocation] = {}
        self._kinds: dict[WorkloadName, str] = {}
        self._gpu_per_unit: dict[WorkloadName, float] = {}
        # Granted GPUs per (workload kind, GPU type), and their integral over time.
        self.granted: dict[tuple[str, str], float] = {}
        self.granted_area: dict[tuple[str, str], float] = {}
        self._t_area = 0.0
        self.capacity: dict[str, float] = {}
        self.capacity_area = 0.0
        self.capacity_area_by_type: dict[str, float] = {}
        self._recount_capacity()
        self.applies = 0
        self.forced_services = 0

    # ------------------------------------------------------------------------------- the protocol

    def ended(self, registrations: Mapping[WorkloadName, Any]) -> set[WorkloadName]:
        return set()  # simulated workloads end by unregistering

    def observe(self) -> tuple[NodeSnapshot, ...]:
        return self._nodes

    def apply(self, grants: Mapping[WorkloadName, Allocation]) -> None:
        self.applies += 1
        now = self.sim.clock.now()
        self.integrate(now)
        last = self._last
        workloads = self.sim.workloads
        changed: list[WorkloadName] = []
        for name, g in grants.items():
            old = last.get(name)
            if old is not g and old != g:
                changed.append(name)
        if len(last) + len(changed) != len(grants):
            changed += [n for n in last if n not in grants]
        kinds, gpus = self._kinds, self._gpu_per_unit
        for name in changed:
            old = last.get(name)
            new = grants.get(name)
            w = workloads.get(name)
            if w is not None:
                kinds[name] = w.kind
                gpus[name] = w.spec.gpus_per_unit
            kind, gpu = kinds.get(name, "training"), gpus.get(name, 1.0)
            if old is not None:
                for t, n in old.items:
                    self.granted[(kind, t)] -= n * gpu
            if new is not None:
                for t, n in new.items:
                    self.granted[(kind, t)] = self.granted.get((kind, t), 0.0) + n * gpu
                last[name] = new
            else:
                last.pop(name, None)
                kinds.pop(name, None)
                gpus.pop(name, None)
            if w is not None:
                self.sim.loop.schedule(GrantNotice(now + self.heartbeat_delay_s, w))

    def force_release(
        self,
        name: WorkloadName,
        spec: WorkloadSpec,
        meta: Mapping[str, Any],
        *,
        held: Allocation,
        grant: Allocation,
        attempt: int,
    ) -> ForceResult:
        """Stops a workload that kept GPUs past its yield grace. A job loses its work since the last
        checkpoint. A service is only counted: its draining replicas end on their own a few seconds later.
        The stop takes effect at once (``confirmed``): the arbiter frees what was held beyond the grant
        without waiting for the workload's next heartbeat."""
        w = self.sim.workloads.get(name)
        if w is None:
            return ForceResult(issued=True, confirmed=True, how="gone")
        if w.kind == "training":
            w.stopped(self.sim.clock.now(), reason="forced")
        else:
            self.forced_services += 1
        return ForceResult(issued=True, confirmed=True, how="simulated stop")

    # ----------------------------------------------------------------------------------- metrics

    def integrate(self, now: float) -> None:
        """Adds granted GPU-seconds and capacity GPU-seconds up to ``now``."""
        dt = now - self._t_area
        if dt <= 0:
            return
        for k, v in self.granted.items():
            self.granted_area[k] = self.granted_area.get(k, 0.0) + v * dt
        self.capacity_area += sum(self.capacity.values()) * dt
        for t, c in self.capacity.items():
            self.capacity_area_by_type[t] = self.capacity_area_by_type.get(t, 0.0) + c * dt
        self._t_area = now

    def _recount_capacity(self) -> None:
        cap: dict[str, float] = {}
        for n in self._nodes:
            if n.healthy:
                cap[n.gpu_type] = cap.get(n.gpu_type, 0.0) + n.num_gpus
        self.capacity = cap

    # ------------------------------------------------------------------------------ node failures

    def pick_node(self, node: str) -> NodeSnapshot | None:
        """A node by id, or the first healthy node (by id) of a GPU type."""
        for n in self._nodes:
            if n.node_id == node:
                return n
        for n in sorted(self._nodes, key=lambda n: n.node_id):
            if n.gpu_type == node and n.healthy:
                return n
        return None

    def fail_node(self, node_id: str) -> dict[WorkloadName, int]:
        """Marks a node unhealthy and returns the units (per workload) that were on it."""
        target = next((n for n in self._nodes if n.node_id == node_id), None)
        if target is None or not target.healthy:
            return {}
        victims = self._units_on(target)
        self.integrate(self.sim.clock.now())
        self._nodes = tuple(
            NodeSnapshot(n.node_id, n.gpu_type, n.num_gpus, False) if n.node_id == node_id else n
            for n in self._nodes
        )
        self._recount_capacity()
        return victims

    def repair_node(self, node_id: str) -> None:
        self.integrate(self.sim.clock.now())
        self._nodes = tuple(
            NodeSnapshot(n.node_id, n.gpu_type, n.num_gpus, True) if n.node_id == node_id else n
            for n in self._nodes
        )
        self._recount_capacity()

    def _units_on(self, node: NodeSnapshot) -> dict[WorkloadName, int]:
        """First fit of every holder's units (name order) onto the type's healthy nodes (id order)."""
        t = node.gpu_type
        nodes = sorted((n for n in self._nodes if n.gpu_type == t and n.healthy), key=lambda n: n.node_id)
        free = [n.num_gpus for n in nodes]
        idx = {n.node_id: i for i, n in enumerate(nodes)}[node.node_id]
        victims: dict[WorkloadName, int] = {}
        for name in sorted(self.sim.workloads):
            w = self.sim.workloads[name]
            units = w.held().get(t, 0)
            g = w.spec.gpus_per_unit
            i = 0
            for _ in range(units):
                while i < len(free) and free[i] + 1e-9 < g:
                    i += 1
                if i == len(free):
                    break
                free[i] -= g
                if i == idx:
                    victims[name] = victims.get(name, 0) + 1
        return victims


class GrantNotice(Event):
    """A workload's grant changed at the last tick: it heartbeats (and reads it) now."""

    __slots__ = ("workload",)
    order = ORDER_HEARTBEAT

    def __init__(self, time_s: float, workload: Any) -> None:
        super().__init__(time_s)
        self.workload = workload

    def handle(self, sim: Simulator) -> None:
        if sim.workloads.get(self.workload.name) is self.workload:
            self.workload.heartbeat()
