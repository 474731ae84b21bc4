"""The resource arbiter: the outer loop that moves GPUs between serving and training.

A plain class. It takes a policy (pure), a backend (observe the inventory, apply grants, stop a
workload by force) and a clock; it becomes a Ray actor in one place only (``tidal.cluster.actor``). The same
class runs in unit tests (``FakeBackend`` + ``ManualClock``), in the simulator and on Ray.

Workloads talk to it through five calls: ``register``, ``heartbeat`` (report demand and what they
hold; read the grant), ``unregister``, and the read-only ``status`` and ``grant_of``.

Release before grant: a shrink takes effect in the grant at once, but GPUs go to a new holder only
when the donor's report shows it let them go (``held`` drops). A donor that keeps them past its yield grace
is stopped by force through the backend, and its GPUs stay its own in the books until its next report
confirms the stop; without that report by ``forced_release_confirm_s``, a harder stop follows (and again,
each time that deadline passes). Registrations expire when heartbeats stop, so a crashed workload gives its
GPUs back; a holder that registers again reports what it still holds, and the books take it.
"""

from __future__ import annotations

import itertools
import logging
import math
import numbers
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from tidal.cluster.arbiter_state import STATE_VERSION, parse_arbiter_state
from tidal.cluster.model import (
    EMPTY,
    Allocation,
    ClusterSnapshot,
    GpuType,
    GrantView,
    NodeSnapshot,
    ServiceSpec,
    WorkloadKind,
    WorkloadName,
    WorkloadSnapshot,
    WorkloadSpec,
    index_from_parts,
    spec_to_dict,
)
from tidal.cluster.specs import SpecError, check_spec
from tidal.policies.base import Infeasible, Policy, PolicyDecision, PolicyState

logger = logging.getLogger(__name__)

EPS = 1e-9


# --------------------------------------------------------------------------------------------- clocks


class Clock(Protocol):
    def now(self) -> float: ...


class SystemClock:
    """Wall-clock seconds (not monotonic: persisted timestamps must survive an actor restart)."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to: ``clock.advance(5)``."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now = start_s

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back: advance({seconds})")
        self._now += seconds
        return self._now

    def set(self, now_s: float) -> None:
        if now_s < self._now:
            raise ValueError(f"a clock cannot go back: {now_s} < {self._now}")
        self._now = now_s


# ------------------------------------------------------------------------------------------- backends


@dataclass(frozen=True, slots=True)
class ForceResult:
    """What a backend's forced stop did.

    Attributes:
        issued: the stop was sent. False: the backend had no handle for it, or the call failed (``reason``).
        confirmed: the stop has taken effect already, as a backend that runs the workloads itself knows (the
            simulator's): the books free what was held beyond the grant at once. Otherwise only the holder's
            next report confirms it.
        how: what was done ("actor tidal-train-signal-j.force_stop()"), for the log and the event.
        reason: why nothing was issued.
    """

    issued: bool = True
    confirmed: bool = False
    how: str = ""
    reason: str = ""


class Backend(Protocol):
    """Observes the inventory and acts on grants. The Ray backend lives in ``tidal.cluster.ray_backend``."""

    def observe(self) -> tuple[NodeSnapshot, ...]: ...

    def apply(self, grants: Mapping[WorkloadName, Allocation]) -> None: ...

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
        """Stops what ``name`` holds beyond ``grant`` (``held`` is what the books say it holds). Attempt 1 is
        the stop its registration names; a later attempt (the first one was not confirmed in time) is harder.
        Never raises: a stop that cannot be sent comes back with ``issued=False`` and the reason."""
        ...

    def ended(self, registrations: Mapping[WorkloadName, Any]) -> set[WorkloadName]:
        """The registered workloads whose process is known to be gone (a Ray job that ended), read from
        ``registrations`` (name -> registration, with its ``meta``) when the backend chooses to look; the
        arbiter expires them without waiting out their TTL. Never raises; an empty set when it cannot tell."""
        ...


@dataclass(frozen=True, slots=True)
class ForceCall:
    """One ``force_release`` call a ``FakeBackend`` received."""

    name: WorkloadName
    attempt: int
    held: Allocation
    grant: Allocation


class FakeBackend:
    """An in-memory backend: nodes are set by the test, applied grants and forced stops are recorded.

    ``force_result`` is what every forced stop returns: by default a stop that has taken effect, as in memory
    (and in the simulator) it has; ``ForceResult()`` for one that only the holder's next report confirms, as
    on Ray.
    """

    def __init__(self, nodes: tuple[NodeSnapshot, ...] | list[NodeSnapshot] = ()) -> None:
        self.nodes: tuple[NodeSnapshot, ...] = tuple(nodes)
        self.applied: list[dict[WorkloadName, Allocation]] = []
        self.forced: list[WorkloadName] = []
        self.force_calls: list[ForceCall] = []
        self.force_result = ForceResult(issued=True, confirmed=True, how="fake stop")
        self.gone: set[WorkloadName] = set()  # what ``ended`` reports, set by the test

    def observe(self) -> tuple[NodeSnapshot, ...]:
        return self.nodes

    def ended(self, registrations: Mapping[WorkloadName, Any]) -> set[WorkloadName]:
        return self.gone & registrations.keys()

    def apply(self, grants: Mapping[WorkloadName, Allocation]) -> None:
        self.applied.append(dict(grants))

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
        self.forced.append(name)
        self.force_calls.append(ForceCall(name, attempt, held, grant))
        return self.force_result

    def set_healthy(self, node_id: str, healthy: bool) -> None:
        self.nodes = tuple(
            NodeSnapshot(n.node_id, n.gpu_type, n.num_gpus, healthy) if n.node_id == node_id else n
            for n in self.nodes
        )


# ------------------------------------------------------------------------------------------ the views


@dataclass(frozen=True, slots=True)
class ArbiterEvent:
    """Something the arbiter did, for the timeline, the metrics and the tests."""

    t_s: float
    # registered | unregistered | expired | shrink | grow | released | forced | force_escalated |
    # force_failed | force_confirmed | reclaim | infeasible | error
    kind: str
    workload: WorkloadName
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TickReport:
    now_s: float
    decide_ms: float
    grants: Mapping[WorkloadName, Allocation]
    infeasible: tuple[Infeasible, ...]
    events: tuple[ArbiterEvent, ...]


@dataclass(slots=True)
class _Registration:
    spec: WorkloadSpec
    registered_s: float
    last_heartbeat_s: float
    demand_units: int
    held: Allocation = EMPTY
    progress: dict[str, Any] = field(default_factory=dict)
    seconds_since_checkpoint: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # When the grant first fell below what the workload holds; None while it holds no excess.
    shrink_issued_s: float | None = None
    # One (deadline, grant it set) per shrink still unreleased: a workload is late only if it still
    # holds more than *that* shrink's grant at *that* shrink's deadline (a second shrink issued while
    # the first is being released gets its own full grace).
    release_deadlines: list[tuple[float, Allocation]] = field(default_factory=list)
    # The last snapshot of this registration, reused while its fields are the same (see ``snapshot``).
    last_snapshot: WorkloadSnapshot | None = None
    # Registration order (``_regs`` is kept in it): events of one tick are recorded in this order.
    seq: int = 0
    # The last ``GrantView`` handed out, handed out again while it is the same (see ``_view``).
    last_view: GrantView | None = None
    # False from a restore until the workload reports what it holds: its saved ``held`` may be stale.
    heard: bool = True
    # Forced stops sent and not yet confirmed by a report, and when the next, harder one is due.
    force_attempts: int = 0
    confirm_by_s: float | None = None


@dataclass(frozen=True, slots=True)
class ArbiterConfig:
    """Knobs of the arbiter itself (the policy has its own).

    Attributes:
        registration_ttl_s: a workload silent for this long loses its registration and its grant.
        default_yield_grace_s: grace for services (jobs carry their own ``yield_grace_s``).
        forced_release_confirm_s: after a forced stop, how long the holder has to report that it let go
            (``held`` no more than its grant); until then its GPUs stay its own in the books, and then a
            harder stop follows.
        max_events: events kept in memory for ``events()``.
        restore_grace_s: after a restore, a workload not yet heard from is stopped by force only this
            long after the restore (None: ``registration_ttl_s``), whatever its saved deadlines say: what
            it held when the state was saved may be gone by now.
        contain_errors: a policy (or a workload's data) that raises during a tick is logged and recorded
            (an ``error`` event), and the last good grants stay, instead of the tick raising. The actor
            contains them, since one bad workload must not freeze every grant; tests and the simulator
            let them propagate.
    """

    registration_ttl_s: float = 15.0
    default_yield_grace_s: float = 30.0
    forced_release_confirm_s: float = 10.0
    max_events: int = 10_000
    restore_grace_s: float | None = None
    contain_errors: bool = False


# ------------------------------------------------------------------------------------------ the arbiter


class ResourceArbiter:
    """Decides and enforces GPU grants per workload and GPU type. See the module docstring."""

    def __init__(
        self,
        policy: Policy,
        backend: Backend,
        clock: Clock | None = None,
        config: ArbiterConfig | None = None,
        prices_per_gpu_hour: Mapping[GpuType, float] | None = None,
    ) -> None:
        self.policy = policy
        self.backend = backend
        self.clock = clock or SystemClock()
        self.config = config or ArbiterConfig()
        self.prices = dict(prices_per_gpu_hour or {})
        self._regs: dict[WorkloadName, _Registration] = {}
        self._table = _SnapshotTable()
        self._seq = itertools.count()
        self._grants: dict[WorkloadName, Allocation] = {}
        self._policy_state = PolicyState()
        self._nodes: tuple[NodeSnapshot, ...] = ()
        self._infeasible: tuple[Infeasible, ...] = ()
        self._infeasible_by_name: dict[WorkloadName, str] = {}
        # A lower bound on every registration's last heartbeat (exact after each expiry scan): no
        # registration can have expired while ``now - _oldest_heartbeat_s <= ttl``, so most ticks skip
        # the scan of every registration.
        self._oldest_heartbeat_s = math.inf
        # Names whose shrink is being released (a superset: pruned in ``_enforce_grace``).
        self._shrinking: set[WorkloadName] = set()
        self._events: deque[ArbiterEvent] = deque(maxlen=self.config.max_events)
        self._pending_events: list[ArbiterEvent] = []
        self._generation = 0
        self._dirty = False
        self._demand_rose = False
        self.reclaim_durations_s: deque[float] = deque(maxlen=1000)
        self.last_decide_ms = 0.0
        self._restored_s = -math.inf
        self.tick_errors = 0
        self.last_tick_error: str | None = None
        self.listeners: list[Callable[[TickReport], None]] = []

    # ---------------------------------------------------------------- the client API (cheap, no I/O)

    def register(
        self,
        spec: WorkloadSpec,
        meta: Mapping[str, Any] | None = None,
        demand_units: int | None = None,
        held: Mapping[GpuType, int] | Allocation | None = None,
    ) -> GrantView:
        """Registers (or re-registers, keeping the grant) a workload. Idempotent.

        ``held`` is what the workload holds as it registers: a holder that registers again after its
        registration expired, or after the arbiter lost it, still holds GPUs, and the books take them as
        its own (nothing else is granted into them). What it holds beyond its grant is due back within its
        yield grace, as after a shrink.

        Raises:
            SpecError: a field of ``spec``, ``demand_units`` or ``meta`` is invalid (the message names it,
                its value and what is valid); nothing is registered.
        """
        name = getattr(spec, "name", None)
        reg = self._regs.get(name) if isinstance(name, str) else None
        if reg is None or reg.spec != spec:  # (a spec already checked is not checked again)
            check_spec(spec)
        if demand_units is not None:
            demand_units = _whole(spec.name, "demand_units", demand_units)
        if meta is not None and not isinstance(meta, Mapping):
            raise SpecError(f"registration of {spec.name!r}: meta must be a mapping, got {meta!r}")
        if held is not None and not isinstance(held, Allocation):
            held = _held(spec.name, held)
        now = self.clock.now()
        if reg is not None and reg.spec.kind is not spec.kind:
            return GrantView(
                spec.name,
                EMPTY,
                registered=False,
                reason=f"name {spec.name!r} is already registered as a {reg.spec.kind}",
            )
        demand = spec.max_units if demand_units is None else demand_units
        if now < self._oldest_heartbeat_s:
            self._oldest_heartbeat_s = now
        if reg is None:
            self._regs[spec.name] = _Registration(
                spec=spec,
                registered_s=now,
                last_heartbeat_s=now,
                demand_units=demand,
                meta=dict(meta or {}),
                seq=next(self._seq),
            )
            self._table.add(spec.name, spec.kind)
            self._record(ArbiterEvent(now, "registered", spec.name, {"kind": str(spec.kind)}))
        else:
            reg.spec = spec
            reg.last_heartbeat_s = now
            reg.demand_units = demand
            self._table.changed(reg)
            reg.meta.update(meta or {})
        if held is not None:
            self._take_held(spec.name, self._regs[spec.name], held, now)
        self._dirty = True
        return self._view(spec.name)

    def heartbeat(
        self,
        name: WorkloadName,
        *,
        demand_units: int | None = None,
        held: Mapping[GpuType, int] | Allocation | None = None,
        progress: Mapping[str, Any] | None = None,
        seconds_since_checkpoint: float | None = None,
    ) -> GrantView:
        """Reports liveness, demand and what the workload uses now; returns its grant.

        Raises:
            SpecError: a value is invalid (the message names the field, the value and what is valid);
                nothing of the heartbeat is recorded.
        """
        if type(name) is not str:
            raise SpecError(f"heartbeat: the workload's name must be a string, got {name!r}")
        if demand_units is not None:
            demand_units = _whole(name, "demand_units", demand_units)
        if held is not None and not isinstance(held, Allocation):
            held = _held(name, held)
        if progress is not None and not isinstance(progress, Mapping):
            raise SpecError(f"heartbeat of {name!r}: progress must be a mapping, got {progress!r}")
        if seconds_since_checkpoint is not None:
            seconds_since_checkpoint = _seconds(name, "seconds_since_checkpoint", seconds_since_checkpoint)
        reg = self._regs.get(name)
        if reg is None:
            return GrantView(name, EMPTY, registered=False, reason="not registered (expired or unknown)")
        now = self.clock.now()
        reg.last_heartbeat_s = now
        if now < self._oldest_heartbeat_s:
            self._oldest_heartbeat_s = now  # (a clock that went back)
        # (A field that changes drops the registration's cached snapshot: see ``snapshot``.)
        if demand_units is not None:
            demand = demand_units
            if demand != reg.demand_units:
                if (
                    demand > reg.demand_units
                    and reg.spec.kind is WorkloadKind.SERVICE
                    and demand > self._grants.get(name, EMPTY).total()
                ):
                    self._demand_rose = True
                reg.demand_units = demand
                self._table.changed(reg)
        if held is not None:
            new_held = held
            reg.heard = True
            if new_held != reg.held:
                self._dirty = True
                reg.held = new_held
                self._table.changed(reg)
                self._follow_replicas(name, reg, now)
            self._note_release(name, reg, now)
        if progress is not None:
            reg.progress.update(progress)
        if seconds_since_checkpoint is not None and seconds_since_checkpoint != reg.seconds_since_checkpoint:
            reg.seconds_since_checkpoint = seconds_since_checkpoint
            self._table.changed(reg)
        return self._view(name)

    def unregister(self, name: WorkloadName) -> bool:
        reg = self._regs.pop(name, None)
        self._grants.pop(name, None)
        if reg is None:
            return False
        self._table.remove(name)
        self._record(ArbiterEvent(self.clock.now(), "unregistered", name))
        self._dirty = True
        return True

    def grant_of(self, name: WorkloadName) -> GrantView:
        return self._view(name)

    def reconfigure(
        self,
        policy: Policy,
        config: ArbiterConfig | None = None,
        prices_per_gpu_hour: Mapping[GpuType, float] | None = None,
        *,
        reset_policy_state: bool = False,
    ) -> None:
        """Swaps the policy and knobs in place, keeping registrations and grants.

        Reset the policy state when the policy changes: a state means something only to its author.
        """
        self.policy = policy
        if config is not None:
            self.config = config
        if prices_per_gpu_hour is not None:
            self.prices = dict(prices_per_gpu_hour)
        if reset_policy_state:
            self._policy_state = PolicyState()
        self._dirty = True

    @property
    def generation(self) -> int:
        """Bumped whenever a grant changes (what ``GrantView.generation`` carries)."""
        return self._generation

    def needs_tick(self) -> bool:
        """True when a registration or a release arrived since the last tick (tick early)."""
        return self._dirty

    def needs_early_tick(self) -> bool:
        """``needs_tick``, or a service's demand rose above its grant since the last tick.

        What the arbiter actor ticks early on: otherwise a service that needs more replicas waits up to a
        tick interval (0.5 s in the demo) for its decision, part of every time to capacity. The simulator ticks
        early on ``needs_tick`` only (a tick per demand rise would slow its 8-week runs), so it models
        that wait.
        """
        return self._dirty or self._demand_rose

    # ------------------------------------------------------------------------------------- the loop

    def tick(self) -> TickReport:
        """One round of the outer loop.

        1. Observe the inventory.
        2. Expire workloads whose heartbeats stopped; stop by force a workload that kept GPUs past
           its yield grace, harder if the last forced stop was not confirmed in time (what it held
           beyond its grant stays its own until its report confirms the stop).
        3. Decide: the policy's target grants from a snapshot.
        4. Plan: shrink at once, grow only into GPUs that no holder still uses (release before grant).
        5. Apply the grants, and record what happened.
        """
        self._dirty = self._demand_rose = False
        now = self.clock.now()
        # 1. observe
        self._nodes = tuple(self.backend.observe())
        # 2. expire
        ttl = self.config.registration_ttl_s
        if now - self._oldest_heartbeat_s > ttl:
            for name in [n for n, r in self._regs.items() if now - r.last_heartbeat_s > ttl]:
                reg = self._regs.pop(name)
                self._grants.pop(name, None)
                self._table.remove(name)
                self._record(ArbiterEvent(now, "expired", name, {"silent_s": now - reg.last_heartbeat_s}))
            self._oldest_heartbeat_s = min([r.last_heartbeat_s for r in self._regs.values()], default=math.inf)
        # A holder whose process the backend knows is gone (its Ray job ended: a driver killed) expires now,
        # not a TTL later: its GPUs are free in Ray already.
        for name in self.backend.ended(self._regs) if self._regs else ():
            if name in self._regs:
                reg = self._regs.pop(name)
                self._grants.pop(name, None)
                self._table.remove(name)
                self._dirty = True
                detail = {"silent_s": now - reg.last_heartbeat_s, "reason": "its Ray job ended"}
                self._record(ArbiterEvent(now, "expired", name, detail))
        # A service's replicas may run on GPUs freed since its report (an expiry just now): the grant follows.
        for name in self._table.services:
            self._follow_replicas(name, self._regs[name], now)
        self._enforce_grace(now)
        # 3. decide and 4. plan (what a policy or a workload's data raises here keeps the last good grants)
        try:
            snapshot = self.snapshot()
            t0 = time.perf_counter()
            decision, policy_state = self.policy.decide(snapshot, self._policy_state)
            self.last_decide_ms = (time.perf_counter() - t0) * 1e3
            new_grants = plan_grants(snapshot, decision)
        except Exception as e:
            if not self.config.contain_errors:
                raise
            self.tick_errors += 1
            self.last_tick_error = f"{type(e).__name__}: {e}"
            logger.exception("the tick's decision failed; the last good grants stay in force")
            self._record(ArbiterEvent(now, "error", "", {"error": self.last_tick_error}))
        else:
            self._policy_state = policy_state
            self._infeasible = decision.infeasible
            previous_infeasible = self._infeasible_by_name
            self._infeasible_by_name = {i.workload: i.reason for i in decision.infeasible}
            self._commit(new_grants, decision, now, previous_infeasible)
        # 5. apply and record
        self.backend.apply(dict(self._grants))
        events = tuple(self._pending_events)
        self._pending_events.clear()
        report = TickReport(now, self.last_decide_ms, dict(self._grants), self._infeasible, events)
        for listener in self.listeners:
            listener(report)
        return report

    def snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot(
            now_s=self.clock.now(),
            nodes=self._nodes,
            workloads=self._table.workloads(self._regs),
            grants=dict(self._grants),
        )

    # ------------------------------------------------------------------------------- status, state

    def events(self, since_s: float = float("-inf")) -> list[ArbiterEvent]:
        return [e for e in self._events if e.t_s >= since_s]

    def status(self) -> dict[str, Any]:
        """A JSON-able view for ``tidal status``, the metrics and the demo."""
        cap: dict[str, float] = {}
        nodes_by_type: dict[str, int] = {}
        for n in self._nodes:
            if n.healthy:
                cap[n.gpu_type] = cap.get(n.gpu_type, 0.0) + n.num_gpus
                nodes_by_type[n.gpu_type] = nodes_by_type.get(n.gpu_type, 0) + 1
        granted: dict[str, float] = {}
        workloads = []
        for name, reg in sorted(self._regs.items()):
            g = self._grants.get(name, EMPTY)
            gpu = reg.spec.gpus_per_unit
            for t, n in g.items:
                granted[t] = granted.get(t, 0.0) + n * gpu
            cost = sum(n * gpu * self.prices.get(t, 0.0) for t, n in g.items)
            workloads.append(
                {
                    "name": name,
                    "kind": str(reg.spec.kind),
                    "priority": reg.spec.priority,
                    "gpus_per_unit": gpu,
                    "min_units": reg.spec.min_units,
                    "max_units": reg.spec.max_units,
                    "demand_units": reg.demand_units,
                    "grant": g.as_dict(),
                    "held": reg.held.as_dict(),
                    "grant_gpus": {t: n * gpu for t, n in g.items},
                    "cost_per_hour": cost,
                    "progress": dict(reg.progress),
                    "last_heartbeat_age_s": self.clock.now() - reg.last_heartbeat_s,
                }
            )
        total_cap = sum(cap.values())
        return {
            "now_s": self.clock.now(),
            "capacity": cap,
            "nodes": nodes_by_type,
            "granted": granted,
            "free": {t: max(0.0, c - granted.get(t, 0.0)) for t, c in cap.items()},
            "allocation_ratio": (sum(granted.values()) / total_cap) if total_cap else 0.0,
            "cost_per_hour": sum(w["cost_per_hour"] for w in workloads),
            "workloads": workloads,
            "infeasible": [{"workload": i.workload, "reason": i.reason} for i in self._infeasible],
            "decide_ms": self.last_decide_ms,
            "policy": getattr(self.policy, "name", type(self.policy).__name__),
        }

    def dump_state(self) -> dict[str, Any]:
        """Registrations, grants, pending releases and policy state, JSON-able, for a restart of the actor.

        A pending release is saved with the seconds left of its grace (``remaining_s``), not its deadline:
        the time the actor is down does not count against the holder.
        """
        now = self.clock.now()
        return {
            "version": STATE_VERSION,
            "registrations": [
                {
                    "spec": spec_to_dict(r.spec),
                    "registered_s": r.registered_s,
                    "demand_units": r.demand_units,
                    "held": r.held.as_dict(),
                    "progress": r.progress,
                    "meta": r.meta,
                    "shrink_issued_s": r.shrink_issued_s,
                    "release_deadlines": [
                        {"remaining_s": max(0.0, d - now), "grant": g.as_dict()}
                        for d, g in r.release_deadlines
                    ],
                    "force_attempts": r.force_attempts,
                    "confirm_remaining_s": None if r.confirm_by_s is None else max(0.0, r.confirm_by_s - now),
                }
                for r in self._regs.values()
            ],
            "grants": {n: g.as_dict() for n, g in self._grants.items()},
            "policy_state": dict(self._policy_state.data),
            "generation": self._generation,
        }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Loads a ``dump_state()``, validated first (``tidal.cluster.arbiter_state``).

        Heartbeat ages restart from now: downtime is not silence. Each pending release keeps the grace it
        had left. Until a workload reports what it holds, it is not stopped by force before
        ``restore_grace_s`` has passed (its saved ``held`` may be stale: it may have let go meanwhile).

        Raises:
            StateError: the state does not parse (a ``ValueError`` naming the field, the value and what
                is valid); the arbiter is left as it was.
        """
        parsed = parse_arbiter_state(state)
        now = self.clock.now()
        regs: dict[WorkloadName, _Registration] = {}
        for r in parsed.registrations:
            spec = r.spec
            regs[spec.name] = _Registration(
                spec=spec,
                registered_s=r.registered_s,
                last_heartbeat_s=now,
                demand_units=r.demand_units,
                held=Allocation.of(r.held),
                progress=dict(r.progress),
                meta=dict(r.meta),
                shrink_issued_s=r.shrink_issued_s,
                release_deadlines=[
                    (now + max(0.0, d.remaining_s), Allocation.of(d.grant)) for d in r.release_deadlines
                ],
                seq=next(self._seq),
                heard=False,
                force_attempts=r.force_attempts,
                confirm_by_s=None if r.confirm_remaining_s is None else now + r.confirm_remaining_s,
            )
        grants = {n: Allocation.of(g) for n, g in parsed.grants.items() if n in regs}
        for name, reg in regs.items():
            if reg.shrink_issued_s is not None and not reg.release_deadlines:
                # (Version 1 kept no deadlines: a full grace from now, down to the grant in force.)
                reg.release_deadlines = [(now + self._grace_s(reg.spec), grants.get(name, EMPTY))]
        self._regs = regs
        self._table = _SnapshotTable()
        for name, reg in regs.items():
            self._table.add(name, reg.spec.kind)
        self._grants = grants
        self._oldest_heartbeat_s = now
        self._restored_s = now
        self._shrinking = {n for n, r in regs.items() if r.shrink_issued_s is not None}
        self._policy_state = PolicyState(dict(parsed.policy_state))
        self._generation = parsed.generation
        self._dirty = True

    # -------------------------------------------------------------------------------------- private

    def _view(self, name: WorkloadName) -> GrantView:
        reg = self._regs.get(name)
        if reg is None:
            return GrantView(name, EMPTY, registered=False, reason="not registered (expired or unknown)")
        reason = self._infeasible_by_name.get(name)
        release_by = min([d for d, _ in reg.release_deadlines]) if reg.release_deadlines else None
        grant = self._grants.get(name, EMPTY)
        # The last view while it would be the same (a long queue heartbeats, tick after tick).
        v = reg.last_view
        if (
            v is not None
            and v.grant is grant
            and v.reason is reason
            and v.release_by_s == release_by
            and v.generation == self._generation
        ):
            return v
        v = reg.last_view = GrantView(name, grant, True, reason, release_by, self._generation)
        return v

    def _grace_s(self, spec: WorkloadSpec) -> float:
        if isinstance(spec, ServiceSpec):
            return self.config.default_yield_grace_s
        return spec.yield_grace_s

    def _commit(
        self,
        new_grants: Mapping[WorkloadName, Allocation],
        decision: PolicyDecision,
        now: float,
        previous_infeasible: Mapping[WorkloadName, str],
    ) -> None:
        # Only a workload with a grant now or before can see it change (a long queue of waiting jobs
        # has neither): those, in registration order.
        regs, grants = self._regs, self._grants
        moved = [n for n, new in new_grants.items() if not (new is grants.get(n) or new == grants.get(n, EMPTY))]
        moved += [n for n in grants if n not in new_grants]
        if len(moved) > 1:
            moved.sort(key=lambda n: regs[n].seq)
        for name in moved:
            reg = regs[name]
            old = grants.get(name, EMPTY)
            new = new_grants.get(name, EMPTY)
            kind = "shrink" if new.total() < old.total() else "grow"
            self._record(ArbiterEvent(now, kind, name, {"from": old.as_dict(), "to": new.as_dict()}))
            if new:
                self._grants[name] = new
            else:
                self._grants.pop(name, None)
            if _exceeds(reg.held, new):
                if reg.shrink_issued_s is None:
                    reg.shrink_issued_s = now
                    self._shrinking.add(name)
                if new.total() < old.total() or _exceeds(old, new):
                    reg.release_deadlines.append((now + self._grace_s(reg.spec), new))
            else:
                reg.shrink_issued_s = None
                reg.release_deadlines.clear()
                reg.force_attempts, reg.confirm_by_s = 0, None
        for r in decision.reclaims:
            self._record(
                ArbiterEvent(
                    now,
                    "reclaim",
                    r.donor,
                    {"recipient": r.recipient, "gpu_type": r.gpu_type, "units": r.units},
                )
            )
        # A request that stays infeasible is recorded once, not every tick (a long queue would fill the
        # event log with repeats); again when its reason changes, or after it was feasible in between.
        last = previous_infeasible.get
        for inf in [i for i in decision.infeasible if last(i.workload) != i.reason and i.workload in regs]:
            self._record(ArbiterEvent(now, "infeasible", inf.workload, {"reason": inf.reason}))
        if moved:
            self._generation += 1

    def _take_held(self, name: WorkloadName, reg: _Registration, held: Allocation, now: float) -> None:
        """A registration's ``held``: the books take it; beyond the grant, it is due back within the grace."""
        reg.heard = True
        if held != reg.held:
            reg.held = held
            self._table.changed(reg)
            self._follow_replicas(name, reg, now)
        grant = self._grants.get(name, EMPTY)
        if reg.shrink_issued_s is None and _exceeds(held, grant):
            reg.shrink_issued_s = now
            reg.release_deadlines.append((now + self._grace_s(reg.spec), grant))
            self._shrinking.add(name)
        self._note_release(name, reg, now)

    def _follow_replicas(self, name: WorkloadName, reg: _Registration, now: float) -> None:
        """A service's grant follows its replicas to a type it accepts, when they run on free GPUs.

        Serve places a replica on any type its ``fallback_strategy`` accepts that has a free GPU, which can be
        one the books have not granted to anyone yet (a GPU just freed by a job whose registration has not
        expired). The service then holds beyond its grant on that type while a unit granted on another type
        sits unused. The grant moves there, unit for unit, as long as no other workload is granted or holds
        those GPUs: the service keeps its size, nothing is stopped, and the unit it no longer needs elsewhere
        is free for the next decision. Otherwise the books keep the grant, and what is held beyond it is
        due back as usual.
        """
        if reg.spec.kind is not WorkloadKind.SERVICE:
            return
        grant = self._grants.get(name)
        held = reg.held
        if grant is None or not _exceeds(held, grant):
            return
        accepted = reg.spec.gpu_types
        spare = [t for t in accepted if grant.get(t) > held.get(t)]  # granted units it does not use
        if not spare:
            return
        per_unit = reg.spec.gpus_per_unit
        new = grant
        for t in [t for t in accepted if held.get(t) > grant.get(t)]:
            units = min(held.get(t) - grant.get(t), int(self._free_gpus(t, name) / per_unit + 1e-9))
            while units > 0 and spare:
                u = spare[0]
                move = min(units, new.get(u) - held.get(u))
                new = new.with_units(u, new.get(u) - move).with_units(t, new.get(t) + move)
                units -= move
                if new.get(u) <= held.get(u):
                    spare.pop(0)
        if new == grant:
            return
        self._grants[name] = new
        self._generation += 1
        self._dirty = True
        self._record(ArbiterEvent(now, "follow", name, {"from": grant.as_dict(), "to": new.as_dict()}))

    def _free_gpus(self, gpu_type: GpuType, excluding: WorkloadName) -> float:
        """GPUs of ``gpu_type`` alive that no other workload is granted or holds."""
        alive = sum(n.num_gpus for n in self._nodes if n.healthy and n.gpu_type == gpu_type)
        used = 0.0
        for other, reg in self._regs.items():
            if other != excluding:
                units = max(self._grants.get(other, EMPTY).get(gpu_type), reg.held.get(gpu_type))
                used += units * reg.spec.gpus_per_unit
        return alive - used

    def _note_release(self, name: WorkloadName, reg: _Registration, now: float) -> None:
        if reg.shrink_issued_s is None and not reg.release_deadlines:
            return  # no shrink pending (most heartbeats)
        reg.release_deadlines = [(d, g) for d, g in reg.release_deadlines if _exceeds(reg.held, g)]
        if reg.shrink_issued_s is not None and not _exceeds(reg.held, self._grants.get(name, EMPTY)):
            reg.release_deadlines.clear()
            duration = now - reg.shrink_issued_s
            self.reclaim_durations_s.append(duration)
            if reg.force_attempts:
                # The report that confirms a forced stop: what the holder kept beyond its grant is free now.
                detail = {"reclaim_s": duration, "attempts": reg.force_attempts}
                self._record(ArbiterEvent(now, "force_confirmed", name, detail))
                reg.force_attempts, reg.confirm_by_s = 0, None
            else:
                self._record(ArbiterEvent(now, "released", name, {"reclaim_s": duration}))
            reg.shrink_issued_s = None

    def _enforce_grace(self, now: float) -> None:
        if not self._shrinking:
            return
        regs = self._regs
        shrinking = [n for n in self._shrinking if n in regs and regs[n].shrink_issued_s is not None]
        self._shrinking = set(shrinking)
        shrinking.sort(key=lambda n: regs[n].seq)  # registration order, as a walk of every one would be
        restore_grace_s = self.config.restore_grace_s
        patient_until = self._restored_s + (
            self.config.registration_ttl_s if restore_grace_s is None else restore_grace_s
        )
        for name in shrinking:
            reg = regs[name]
            if reg.confirm_by_s is not None:
                due = now >= reg.confirm_by_s  # (stopped by force: waiting for the report that confirms it)
            else:
                due = any(d <= now and _exceeds(reg.held, g) for d, g in reg.release_deadlines)
            if not due:
                continue
            if not reg.heard and now < patient_until:
                continue  # restored, and not heard from since: its saved `held` may be stale
            self._force(name, reg, now)

    def _force(self, name: WorkloadName, reg: _Registration, now: float) -> None:
        """Stops ``name`` by force: the stop its registration names first, a harder one after each
        ``forced_release_confirm_s`` without a report that confirms it. What it holds stays its own in the
        books until then (release before grant), unless the backend says the stop has taken effect."""
        grant = self._grants.get(name, EMPTY)
        attempt = reg.force_attempts + 1
        held = reg.held
        if attempt == 1:
            logger.warning(
                "workload %s kept %s past its yield grace (grant %s): stopping it by force", name, held, grant
            )
        else:
            logger.warning(
                "workload %s still reports %s %.1f s after forced stop %d (grant %s): stopping it harder",
                name, held, self.config.forced_release_confirm_s, attempt - 1, grant,
            )
        result = self.backend.force_release(name, reg.spec, dict(reg.meta), held=held, grant=grant, attempt=attempt)
        detail = {"held": held.as_dict(), "grant": grant.as_dict(), "attempt": attempt, "how": result.how}
        if not result.issued:
            logger.error("forced stop %d of %s could not be sent: %s", attempt, name, result.reason)
            self._record(ArbiterEvent(now, "force_failed", name, {**detail, "reason": result.reason}))
        else:
            self._record(ArbiterEvent(now, "forced" if attempt == 1 else "force_escalated", name, detail))
        if result.issued and result.confirmed:
            # The backend knows the stop took effect: what it held beyond the grant is free from now on.
            self.reclaim_durations_s.append(now - reg.shrink_issued_s)  # type: ignore[operator]
            reg.held = Allocation.of({t: min(n, grant.get(t)) for t, n in held.items})
            self._table.changed(reg)
            reg.shrink_issued_s = None
            reg.release_deadlines.clear()
            reg.force_attempts, reg.confirm_by_s = 0, None
            self._dirty = True
        else:
            reg.force_attempts = attempt
            reg.confirm_by_s = now + self.config.forced_release_confirm_s

    def _record(self, event: ArbiterEvent) -> None:
        self._events.append(event)
        self._pending_events.append(event)
        if event.kind in _LOGGED_EVENTS and logger.isEnabledFor(logging.INFO):
            logger.info("%s %s %s", event.kind, event.workload, dict(event.detail))


_LOGGED_EVENTS = frozenset(
    ("shrink", "forced", "force_escalated", "force_failed", "force_confirmed", "expired", "infeasible", "follow")
)


class _SnapshotTable:
    """The registrations' snapshots, kept between ticks: by name in registration order, and by kind.

    A tick's snapshot needs every workload as a frozen ``WorkloadSnapshot``, and its readers need them
    by name and split into services and jobs (``tidal.cluster.model.workload_index``). Behind a long queue of
    waiting jobs, whose snapshots stay the same tick after tick, deriving those afresh is a pass over every
    workload per reader per tick. Here a registration's snapshot is rebuilt only after one of its fields
    changed (``changed``), and the tuples and name maps are C-level copies of dicts kept in registration
    order (a new registration is added at the end of each, as ``_regs`` adds it).
    """

    __slots__ = ("all", "services", "jobs", "stale")

    def __init__(self) -> None:
        self.all: dict[WorkloadName, WorkloadSnapshot | None] = {}
        self.services: dict[WorkloadName, WorkloadSnapshot | None] = {}
        self.jobs: dict[WorkloadName, WorkloadSnapshot | None] = {}
        # The names whose snapshot is to be rebuilt before the next tick.
        self.stale: set[WorkloadName] = set()

    def add(self, name: WorkloadName, kind: WorkloadKind) -> None:
        # (A place in registration order now; the snapshot itself at the next tick.)
        self.all[name] = None
        (self.services if kind is WorkloadKind.SERVICE else self.jobs)[name] = None
        self.stale.add(name)

    def changed(self, reg: _Registration) -> None:
        reg.last_snapshot = None
        self.stale.add(reg.spec.name)

    def remove(self, name: WorkloadName) -> None:
        self.all.pop(name, None)
        self.services.pop(name, None)
        self.jobs.pop(name, None)
        self.stale.discard(name)

    def workloads(self, regs: Mapping[WorkloadName, _Registration]) -> tuple[WorkloadSnapshot, ...]:
        """Every registration's snapshot, in registration order, with its ``WorkloadIndex`` remembered."""
        if self.stale:
            service = WorkloadKind.SERVICE
            for name in self.stale:
                w = _workload_snapshot(regs[name])
                self.all[name] = w
                (self.services if w.spec.kind is service else self.jobs)[name] = w
            self.stale.clear()
        workloads = tuple(self.all.values())
        index_from_parts(
            workloads,  # type: ignore[arg-type]
            dict(self.all),  # type: ignore[arg-type]
            tuple(self.services.values()),  # type: ignore[arg-type]
            tuple(self.jobs.values()),  # type: ignore[arg-type]
            dict(self.jobs),  # type: ignore[arg-type]
        )
        return workloads  # type: ignore[return-value]


def _workload_snapshot(r: _Registration) -> WorkloadSnapshot:
    """The registration as a snapshot, kept as ``r.last_snapshot`` until one of its fields changes
    (then set to None), so that a tick does not build a frozen object per workload."""
    w = r.last_snapshot = WorkloadSnapshot(
        spec=r.spec,
        demand_units=r.demand_units,
        held=r.held,
        registered_s=r.registered_s,
        seconds_since_checkpoint=r.seconds_since_checkpoint,
    )
    return w


def _exceeds(held: Allocation, grant: Allocation) -> bool:
    return any(n > grant.get(t) for t, n in held.items)


# ------------------------------------------------------------------------------ checks of the client calls
# Plain checks, not pydantic: a heartbeat is the arbiter's hottest call (the simulator makes millions).


def _whole(name: Any, field_name: str, v: Any) -> int:
    """``v`` as an int when it is a whole number >= 0 (3 or 3.0), else ``SpecError``."""
    if type(v) is int and v >= 0:
        return v
    if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 and v == int(v):
        return int(v)
    raise SpecError(f"call for {name!r}: {field_name} must be a whole number >= 0, got {v!r}")


def _seconds(name: Any, field_name: str, v: Any) -> float:
    if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
        return v  # type: ignore[return-value]
    raise SpecError(f"call for {name!r}: {field_name} must be a finite number of seconds >= 0, got {v!r}")


def _held(name: Any, held: Any) -> Allocation:
    """What a heartbeat reports it holds, as an ``Allocation``: units (whole, >= 0) per GPU type."""
    if not isinstance(held, Mapping):
        raise SpecError(f"call for {name!r}: held must be a mapping of GPU type to units, got {held!r}")
    for t, n in held.items():
        if not isinstance(t, str) or not t:
            raise SpecError(f"call for {name!r}: held has GPU type {t!r}; a GPU type is a non-empty string")
        _whole(name, f"held[{t!r}]", n)
    return Allocation.of({t: int(n) for t, n in held.items()}) if held else EMPTY


# ----------------------------------------------------------------------------------------- the planner


def plan_grants(snapshot: ClusterSnapshot, decision: PolicyDecision) -> dict[WorkloadName, Allocation]:
    """Turns the policy's targets into grants that never hand out a GPU someone still holds.

    Per GPU type: every shrink takes effect at once; then growth is granted, in the order of the
    decision (services first, then by priority), only into GPUs that are free counting what each
    workload *holds or is granted*, whichever is more.

    Example: 8 H100s; job J holds 8 and its target drops to 4; service S targets 4. After this tick J's
    grant is 4 but J still holds 8, so S gets 0. When J's heartbeat reports held 4, the next tick
    grants S its 4.
    """
    cap = snapshot.capacity_by_type()
    current_of = snapshot.grants.get
    target_of = decision.targets.get
    out: dict[WorkloadName, Allocation] = {}
    partial: dict[WorkloadName, dict[GpuType, int]] = {}
    used: dict[GpuType, float] = {}
    growers: list[tuple[WorkloadSnapshot, GpuType, int]] = []
    # A workload with no grant, no target and nothing held has nothing to plan (a long queue).
    active = snapshot.grants.keys() | decision.targets.keys()
    for w in [w for w in snapshot.workloads if w.held.items or w.spec.name in active]:
        spec = w.spec
        name = spec.name
        current = current_of(name, EMPTY)
        target = target_of(name, EMPTY)
        held = w.held
        if (target is current or target == current) and (held is current or not held.items or held == current):
            # The common case: nothing moves (and, for a waiting job, nothing is held).
            if current.items:
                g = spec.gpus_per_unit
                for t, n in current.items:
                    used[t] = used.get(t, 0.0) + n * g
                out[name] = current
            continue
        g = spec.gpus_per_unit
        new: dict[GpuType, int] = {}
        for t in {*current.types(), *target.types(), *held.types()}:
            cur_n, tgt_n, held_n = current.get(t), target.get(t), held.get(t)
            if tgt_n > cur_n:
                growers.append((w, t, tgt_n - cur_n))
            kept = min(cur_n, tgt_n)
            if kept:
                new[t] = kept
            used[t] = used.get(t, 0.0) + max(kept, held_n) * g
        partial[name] = new
    growers.sort(key=lambda x: _grow_order(x[0]))
    for w, t, want in growers:
        g = w.spec.gpus_per_unit
        have = partial[w.name].get(t, 0)
        held_n = w.held.get(t)
        free = cap.get(t, 0.0) - used.get(t, 0.0)
        # Units already counted through `held` cost nothing extra.
        covered = max(0, held_n - have)
        k = min(want, covered + max(0, math.floor((free + EPS) / g)) if g > 0 else want)
        if k <= 0:
            continue
        extra = max(0, have + k - max(have, held_n))
        used[t] = used.get(t, 0.0) + extra * g
        partial[w.name][t] = have + k
    for name, d in partial.items():
        if any(d.values()):
            out[name] = Allocation.of(d)
    return out


def _grow_order(w: WorkloadSnapshot) -> tuple:
    return (0 if w.kind is WorkloadKind.SERVICE else 1, -w.spec.priority, w.registered_s, w.name)
