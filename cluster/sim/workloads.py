"""Simulated workloads: training jobs and inference services that talk to the arbiter like real ones.

A workload only ever calls ``register``, ``heartbeat`` and ``unregister`` on the production
``ResourceArbiter`` and reacts to the ``GrantView`` it gets back, as ``TidalTrainer``'s scaling policy and the
Serve autoscaling hook do on Ray:

- **Training job** (``SimTrainingJob``): waits for a grant of at least its minimum, starts (restart
  cost), runs at a per-GPU-type speed, checkpoints every ``checkpoint_period_s`` of running time. When
  its grant shrinks it yields at its next step boundary: finishes the step, saves a checkpoint, lets
  the GPUs go and restarts at the new size (no work lost). If that takes longer than its yield grace,
  the arbiter stops it by force through the backend, and the work since its last checkpoint is lost.
  When its grant grows it resizes at a step boundary (checkpoint, restart with more workers).
- **Service** (``SimService``): its request rate follows a trace; it reports as demand the replicas
  that serve that rate at a target utilisation, starts replicas on granted GPU types (ready after a
  start-up delay) and drains removed ones (GPUs free after the drain). Its queue is integrated per
  segment by ``tidal.cluster.sim.queueing``, so SLO attainment is a result of capacity, not an input.

State changes that the arbiter must hear about are sent by a heartbeat *event* scheduled at the same
instant (never by calling the arbiter from inside another arbiter call).
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tidal.cluster.model import EMPTY, Allocation, GrantView, ServiceSpec, TrainingJobSpec
from tidal.cluster.sim.config import ServiceModelConfig, TrainingModelConfig
from tidal.cluster.sim.engine import Event
from tidal.cluster.sim.queueing import StableTail, integrate_segment
from tidal.cluster.sim.traces import RateSeries, TrainingJobRecord

if TYPE_CHECKING:
    from tidal.cluster.sim.simulator import Simulator

MINUTE_S = 60.0

# Event orders at one instant: rate changes, then workload state, then heartbeats, then ticks (90).
ORDER_RATE = 5
ORDER_STATE = 10
ORDER_HEARTBEAT = 20


# ----------------------------------------------------------------------------------- the job spec rule


def training_spec(
    record: TrainingJobRecord, model: TrainingModelConfig, cluster_types: Sequence[str], seed: int
) -> TrainingJobSpec:
    """The ``TrainingJobSpec`` of a trace job (the documented rule of ``TrainingModelConfig``).

    Accepted types: the job's own ``gpu_type``, else a seeded draw over ``model.type_classes`` (by
    share), keeping the types the cluster has, fastest first as listed. The draw for job ``i`` depends
    only on ``(seed, i)``, so it is the same for every policy and every run.

    Example: a 1-GPU job with ``min_fraction=0.5``, ``max_scale=2`` gets ``min_workers=1``,
    ``max_workers=2``; a 16-GPU job gets 8 and 32, never on RTX4090 (a multi-node job).
    """
    n = record.num_gpus
    rng = random.Random(f"{seed}:types:{record.index}")
    if record.gpu_type is not None:
        types: tuple[str, ...] = (record.gpu_type,)
    else:
        total = sum(c.share for c in model.type_classes)
        u = rng.random() * total
        chosen = model.type_classes[-1]
        for c in model.type_classes:
            if u < c.share:
                chosen = c
                break
            u -= c.share
        have = set(cluster_types)
        types = tuple(t for t in chosen.gpu_types if t in have)
        if n >= model.multi_node_gpus:
            types = tuple(t for t in types if t not in model.single_node_only_types) or types
        if not types:
            types = tuple(t for t in cluster_types if t not in model.single_node_only_types) or tuple(
                cluster_types
            )
    preemptible = rng.random() >= model.non_preemptible_fraction
    return TrainingJobSpec(
        name=f"job-{record.index:05d}",
        gpus_per_worker=1.0,
        min_workers=max(1, math.ceil(n * model.min_fraction - 1e-9)),
        max_workers=max(n, math.ceil(n * model.max_scale - 1e-9)),
        gpu_types=types,
        priority=record.priority if record.priority is not None else model.default_priority,
        preemptible=preemptible,
        checkpoint_period_s=model.checkpoint_period_s,
        yield_grace_s=model.yield_grace_s,
    )


# ------------------------------------------------------------------------------------- training jobs

WAITING, STARTING, RUNNING, YIELDING, DONE = "waiting", "starting", "running", "yielding", "done"
# A stop this soon after a restart counts as churn (``quick_restops``): the restart's cost, a worker
# group's start and a checkpoint load, bought less than ten minutes of training.
CHURN_WINDOW_S = 600.0


class SimTrainingJob:
    """A training job of the trace, driven by its grant. See the module docstring.

    Work is counted in *reference-seconds*: seconds of running at the requested size on the reference
    GPU type, so a job's work is its trace ``duration``.
    """

    kind = "training"

    def __init__(
        self,
        sim: Simulator,
        record: TrainingJobRecord,
        spec: TrainingJobSpec,
        model: TrainingModelConfig,
        speeds: dict[str, float],
        seed: int,
    ) -> None:
        self.sim = sim
        self.record = record
        self.spec = spec
        self.name = spec.name
        self.model = model
        self.speeds = speeds
        self.ref_speed = speeds.get(model.reference_gpu_type, 1.0)
        self.rng = random.Random(f"{seed}:job:{record.index}")
        self.step_s = self.rng.uniform(*model.step_time_s)
        self.save_s = model.checkpoint_save_base_s + model.checkpoint_save_per_gpu_s * record.num_gpus
        self.remaining = record.duration_s
        self.state = WAITING
        self.gpu_type: str | None = None
        self.workers = 0
        self.rate = 0.0
        self.settled_s = 0.0
        self.run_start_s = 0.0
        self.yield_start_s = 0.0
        self.version = 0
        self.grant: Allocation = EMPTY
        self.first_start_s: float | None = None
        self.finish_s: float | None = None
        self.last_heartbeat_s = -math.inf
        self.heartbeat_pending = False
        self.preemptions = 0
        self.forced_stops = 0
        # Churn: stops by a shrink below the minimum (the job waits), restarts after any stop, and
        # stops that came within CHURN_WINDOW_S of the job's last restart.
        self.stops = 0
        self.restarts = 0
        self.quick_restops = 0
        self.last_restart_s: float | None = None
        self.lost_gpu_s = 0.0
        self.overhead_gpu_s = 0.0  # GPU-seconds held while starting or yielding (no progress)
        self._overhead_since: float | None = None

    # ------------------------------------------------------------------------------- arbiter calls

    def arrive(self) -> None:
        view = self.sim.arbiter.register(self.spec, {"submit_s": self.record.submit_s}, self.spec.max_workers)
        self.last_heartbeat_s = self.sim.clock.now()
        self.sim.on_demand(self.spec.max_workers * self.spec.gpus_per_worker, training=True)
        self.react(view)

    def heartbeat(self) -> None:
        self.heartbeat_pending = False
        if self.state == DONE:
            return
        now = self.sim.clock.now()
        view = self.sim.arbiter.heartbeat(
            self.name,
            demand_units=self.spec.max_workers,
            held=self.held(),
            seconds_since_checkpoint=self.since_checkpoint_s(now),
        )
        self.last_heartbeat_s = now
        if not view.registered:
            # Expired (a long silence): register again, as a trainer does.
            view = self.sim.arbiter.register(
                self.spec, {"submit_s": self.record.submit_s}, self.spec.max_workers
            )
        self.react(view)

    def request_heartbeat(self) -> None:
        if not self.heartbeat_pending and self.state != DONE:
            self.heartbeat_pending = True
            self.sim.loop.schedule(Heartbeat(self.sim.clock.now(), self))

    # ---------------------------------------------------------------------------------- the model

    def held(self) -> dict[str, int]:
        if self.state in (STARTING, RUNNING, YIELDING) and self.gpu_type is not None:
            return {self.gpu_type: self.workers}
        return {}

    def since_checkpoint_s(self, now: float) -> float:
        """Running time since the last checkpoint (what a forced stop would lose)."""
        if self.state == RUNNING:
            return (now - self.run_start_s) % self.model.checkpoint_period_s
        if self.state == YIELDING:
            return (self.yield_start_s - self.run_start_s) % self.model.checkpoint_period_s
        return 0.0

    def progress_rate(self, gpu_type: str, workers: int) -> float:
        """Reference-seconds per second on ``workers`` workers of ``gpu_type`` (see TrainingModelConfig).

        Example: requested 4, running 8 on H100 (speed 3.0, reference A100 at 2.0), exponent 0.8:
        1.5 * 2 ** 0.8 = 2.61.
        """
        x = workers / self.record.num_gpus
        scaling = x if x <= 1.0 else x**self.model.scaling_exponent
        return self.speeds.get(gpu_type, 1.0) / self.ref_speed * scaling

    def react(self, view: GrantView) -> None:
        """Acts on a grant: start, shrink (yield) or grow (resize), as ``TidalTrainer``'s scaling policy does."""
        self.grant = view.grant
        now = self.sim.clock.now()
        if self.state == WAITING:
            self._maybe_start(now)
        elif self.state == STARTING:
            u = self.grant.get(self.gpu_type)  # type: ignore[arg-type]
            if u < self.workers:
                self.preemptions += 1
                self._stop_overhead(now)
                if u >= self.spec.min_workers:
                    self.workers = u  # the start is in progress: it simply uses fewer workers
                    self._start_overhead(now)
                else:
                    self._count_stop(now)
                    self._to_waiting()
                    self._maybe_start(now)
                self.request_heartbeat()
            elif u > self.workers:
                self._stop_overhead(now)
                self.workers = min(u, self.spec.max_workers)
                self._start_overhead(now)
                self.request_heartbeat()
        elif self.state == RUNNING:
            u = self.grant.get(self.gpu_type)  # type: ignore[arg-type]
            if u != self.workers:
                self._begin_yield(now, shrink=u < self.workers)

    def _maybe_start(self, now: float) -> None:
        best = None
        for i, t in enumerate(self.spec.gpu_types):
            u = self.grant.get(t)
            if u >= self.spec.min_workers and (best is None or (u, -i) > best[0]):
                best = ((u, -i), t)
        if best is None:
            return
        t = best[1]
        if self.first_start_s is not None:
            self.restarts += 1
            self.last_restart_s = now
        self._start(now, t, min(self.grant.get(t), self.spec.max_workers))

    def _count_stop(self, now: float) -> None:
        self.stops += 1
        if self.last_restart_s is not None and now - self.last_restart_s < CHURN_WINDOW_S:
            self.quick_restops += 1

    def _start(self, now: float, gpu_type: str, workers: int) -> None:
        self.state = STARTING
        self.gpu_type = gpu_type
        self.workers = workers
        self.version += 1
        if self.first_start_s is None:
            self.first_start_s = now
            self.sim.on_job_started(self)
        self._start_overhead(now)
        self.sim.loop.schedule(JobReady(now + self.model.restart_s, self, self.version))
        self.request_heartbeat()

    def ready(self, now: float) -> None:
        self._stop_overhead(now)
        self.state = RUNNING
        self.run_start_s = now
        self.settled_s = now
        self.rate = self.progress_rate(self.gpu_type, self.workers)  # type: ignore[arg-type]
        self.version += 1
        self.sim.loop.schedule(JobFinish(now + self.remaining / self.rate, self, self.version))
        # The grant may have moved while the workers started.
        u = self.grant.get(self.gpu_type)  # type: ignore[arg-type]
        if u != self.workers:
            self._begin_yield(now, shrink=u < self.workers)

    def _settle(self, now: float) -> None:
        if self.state == RUNNING:
            self.remaining = max(0.0, self.remaining - self.rate * (now - self.settled_s))
            self.settled_s = now

    def _begin_yield(self, now: float, *, shrink: bool) -> None:
        """Finish the current step, save a checkpoint, let go (shrink) or resize (grow)."""
        self._settle(now)
        self.state = YIELDING
        self.yield_start_s = now
        self.version += 1
        if shrink:
            self.preemptions += 1
        self._start_overhead(now)
        latency = self.rng.uniform(0.0, self.step_s) + self.save_s
        self.sim.loop.schedule(JobYieldDone(now + latency, self, self.version))

    def yield_done(self, now: float) -> None:
        """The checkpoint is saved: nothing is lost. Restart at the grant's size, or wait."""
        self._stop_overhead(now)
        u = self.grant.get(self.gpu_type)  # type: ignore[arg-type]
        if u >= self.spec.min_workers:
            self._start(now, self.gpu_type, min(u, self.spec.max_workers))  # type: ignore[arg-type]
        else:
            self._count_stop(now)
            self._to_waiting()
            self._maybe_start(now)
            self.request_heartbeat()

    def _to_waiting(self) -> None:
        self.state = WAITING
        self.gpu_type = None
        self.workers = 0
        self.version += 1

    def stopped(self, now: float, *, reason: str) -> None:
        """Stopped by force (past its yield grace) or by a lost node: the work since the last checkpoint
        is lost; it restarts from that checkpoint with whatever its grant allows."""
        if self.state == DONE:
            return
        lost_s = self.since_checkpoint_s(now)
        self._settle(now)
        if self.state in (RUNNING, YIELDING):
            self.remaining += lost_s * self.rate
            self.lost_gpu_s += lost_s * self.workers * self.spec.gpus_per_worker
        self._stop_overhead(now)
        if reason == "forced":
            self.forced_stops += 1
        self._to_waiting()
        self._maybe_start(now)
        self.request_heartbeat()

    def finish(self, now: float) -> None:
        self._settle(now)
        self.state = DONE
        self.finish_s = now
        self.version += 1
        self.sim.arbiter.unregister(self.name)
        self.sim.on_demand(-self.spec.max_workers * self.spec.gpus_per_worker, training=True)
        self.sim.on_job_finished(self)

    def _start_overhead(self, now: float) -> None:
        self._overhead_since = now

    def _stop_overhead(self, now: float) -> None:
        if self._overhead_since is not None:
            self.overhead_gpu_s += (now - self._overhead_since) * self.workers * self.spec.gpus_per_worker
            self._overhead_since = None


class JobArrival(Event):
    """The next trace job arrives; it schedules the one after it (the trace is read lazily)."""

    __slots__ = ("index",)
    order = ORDER_STATE

    def __init__(self, time_s: float, index: int) -> None:
        super().__init__(time_s)
        self.index = index

    def handle(self, sim: Simulator) -> None:
        sim.arrive_job(self.index)


class _JobEvent(Event):
    __slots__ = ("job", "version")
    order = ORDER_STATE

    def __init__(self, time_s: float, job: SimTrainingJob, version: int) -> None:
        super().__init__(time_s)
        self.job = job
        self.version = version


class JobReady(_JobEvent):
    __slots__ = ()

    def handle(self, sim: Simulator) -> None:
        if self.job.version == self.version and self.job.state == STARTING:
            self.job.ready(self.time_s)


class JobYieldDone(_JobEvent):
    __slots__ = ()

    def handle(self, sim: Simulator) -> None:
        if self.job.version == self.version and self.job.state == YIELDING:
            self.job.yield_done(self.time_s)


class JobFinish(_JobEvent):
    __slots__ = ()

    def handle(self, sim: Simulator) -> None:
        if self.job.version == self.version and self.job.state == RUNNING:
            self.job.finish(self.time_s)


class Heartbeat(Event):
    """A workload heartbeats now: it reports what changed and reads its grant."""

    __slots__ = ("workload",)
    order = ORDER_HEARTBEAT

    def __init__(self, time_s: float, workload: SimTrainingJob | SimService) -> None:
        super().__init__(time_s)
        self.workload = workload

    def handle(self, sim: Simulator) -> None:
        self.workload.heartbeat()


# ------------------------------------------------------------------------------------------ services


class SimService:
    """An inference service with a traced request rate. See the module docstring."""

    kind = "service"

    def __init__(
        self,
        sim: Simulator,
        spec: ServiceSpec,
        series: RateSeries,
        model: ServiceModelConfig,
        horizon_s: float,
    ) -> None:
        self.sim = sim
        self.spec = spec
        self.name = spec.name
        self.series = series
        self.model = model
        self.slo_s = spec.slo_p99_ms / 1000.0
        self.rps = {t: model.replica_rps[t] for t in spec.gpu_types}
        self.slots = {t: model.replica_rps[t] * model.service_time_s[t] for t in spec.gpu_types}
        self.running = dict.fromkeys(spec.gpu_types, 0)
        self.starting: dict[str, dict[int, int]] = {t: {} for t in spec.gpu_types}  # batch id -> replicas
        self.draining = dict.fromkeys(spec.gpu_types, 0)
        self._batch = 0
        self.grant: Allocation = EMPTY
        self.lam = 0.0
        self.burstiness = 1.0
        self.backlog = 0.0
        self.cap_rps = 0.0
        self.m = 0
        self.t_last = 0.0
        self._tail: StableTail | None = None
        self.demand = spec.min_replicas
        self.last_heartbeat_s = -math.inf
        self.heartbeat_pending = False
        n_min = int(math.ceil(horizon_s / MINUTE_S)) + 1
        self.arrivals = array("d", bytes(8 * n_min))
        self.within = array("d", bytes(8 * n_min))
        self.p99_s = array("d", bytes(8 * n_min))

    # ------------------------------------------------------------------------------- arbiter calls

    def start(self) -> None:
        """Registers at time 0 and starts following the rate trace."""
        now = self.sim.clock.now()
        self.t_last = now
        self._set_rate(now)
        self.demand = self.compute_demand()
        view = self.sim.arbiter.register(self.spec, {"trace": self.series.name}, self.demand)
        self.sim.on_demand(self.demand * self.spec.gpus_per_replica)
        self.last_heartbeat_s = now
        self.react(view)

    def heartbeat(self) -> None:
        self.heartbeat_pending = False
        now = self.sim.clock.now()
        view = self.sim.arbiter.heartbeat(self.name, demand_units=self.demand, held=self.held())
        self.last_heartbeat_s = now
        if not view.registered:
            view = self.sim.arbiter.register(self.spec, {"trace": self.series.name}, self.demand)
        self.react(view)

    def request_heartbeat(self) -> None:
        if not self.heartbeat_pending:
            self.heartbeat_pending = True
            self.sim.loop.schedule(Heartbeat(self.sim.clock.now(), self))

    # ---------------------------------------------------------------------------------- the model

    def held(self) -> dict[str, int]:
        out = {}
        for t in self.spec.gpu_types:
            n = self.running[t] + sum(self.starting[t].values()) + self.draining[t]
            if n:
                out[t] = n
        return out

    def compute_demand(self) -> int:
        """Replicas that serve the current rate (plus what clears a backlog) at the target utilisation.

        The per-replica rate is that of the replicas running now (as Serve's autoscaler sees requests
        per replica), or of the preferred type when none runs.

        Example: 210 rps, target 0.7, H100 replicas at 1 rps: ceil(210 / 0.7) = 300 replicas.
        """
        n_run = sum(self.running.values())
        per_replica = self.cap_rps / n_run if n_run else self.rps[self.spec.gpu_types[0]]
        load = self.lam + self.backlog / self.model.backlog_drain_s
        need = math.ceil(load / (self.model.target_utilization * per_replica) - 1e-9)
        return min(max(need, self.spec.min_replicas), self.spec.max_replicas)

    def update_demand(self) -> None:
        d = self.compute_demand()
        if d != self.demand:
            self.sim.on_demand((d - self.demand) * self.spec.gpus_per_replica)
            self.demand = d
            self.request_heartbeat()

    def _set_rate(self, now: float) -> None:
        resolution = None if self.model.rate_interpolation == "step" else self.model.rate_resolution_s
        self.lam, cv, end = self.series.segment_at(now, resolution)
        self.burstiness = (cv * cv + 1.0) / 2.0 if self.model.burstiness_from_trace else 1.0
        if math.isfinite(end):
            self.sim.loop.schedule(RateWindow(max(end, now), self))

    def rate_window(self, now: float) -> None:
        self.advance(now)
        self._set_rate(now)
        self.sim.loop.schedule(Autoscale(now + self.model.autoscale_delay_s, self))

    def react(self, view: GrantView) -> None:
        """Runs as many replicas per type as granted: starts the missing, drains the extra."""
        self.grant = view.grant
        now = self.sim.clock.now()
        changed = False
        for t in self.spec.gpu_types:
            want = self.grant.get(t)
            starting = self.starting[t]
            have = self.running[t] + sum(starting.values())
            if want > have:
                self._batch += 1
                starting[self._batch] = want - have
                self.sim.loop.schedule(ReplicasReady(now + self.model.startup_of(t), self, t, self._batch))
                changed = True
            elif want < have:
                excess = have - want
                for b in sorted(starting, reverse=True):  # newest starts are cancelled first
                    k = min(excess, starting[b])
                    starting[b] -= k
                    excess -= k
                    if starting[b] == 0:
                        del starting[b]
                    if excess == 0:
                        break
                if excess:
                    self.advance(now)
                    self.running[t] -= excess
                    self.draining[t] += excess
                    self._recompute_capacity()
                    self.sim.loop.schedule(Drained(now + self.model.drain_s, self, t, excess))
                changed = True
        if changed:
            self.request_heartbeat()

    def replicas_ready(self, now: float, gpu_type: str, batch: int) -> None:
        k = self.starting[gpu_type].pop(batch, 0)
        if not k:
            return
        self.advance(now)
        self.running[gpu_type] += k
        self._recompute_capacity()
        self.update_demand()

    def drained(self, now: float, gpu_type: str, k: int) -> None:
        self.draining[gpu_type] -= k
        self.request_heartbeat()

    def replicas_lost(self, now: float, gpu_type: str, k: int) -> None:
        """A node died under ``k`` replicas: starting ones are lost first, then running ones (no drain)."""
        starting = self.starting[gpu_type]
        for b in sorted(starting, reverse=True):
            if k == 0:
                break
            j = min(k, starting[b])
            starting[b] -= j
            k -= j
            if starting[b] == 0:
                del starting[b]
        # Draining replicas are left alone: their GPUs are freed at the end of the drain either way.
        if k:
            self.advance(now)
            self.running[gpu_type] = max(0, self.running[gpu_type] - k)
            self._recompute_capacity()
            self.update_demand()
        self.request_heartbeat()

    def _recompute_capacity(self) -> None:
        self.cap_rps = sum(n * self.rps[t] for t, n in self.running.items())
        self.m = int(sum(n * self.slots[t] for t, n in self.running.items()))

    def advance(self, now: float) -> None:
        """Integrates the queue from the last call to ``now``, minute by minute."""
        t = self.t_last
        if now <= t:
            return
        arrivals, within, p99 = self.arrivals, self.within, self.p99_s
        n = len(arrivals)
        while t < now:
            minute = int(t // MINUTE_S)
            end = min(now, (minute + 1) * MINUTE_S)
            res, self._tail = integrate_segment(
                duration_s=end - t,
                lam=self.lam,
                cap_rps=self.cap_rps,
                m=self.m,
                backlog=self.backlog,
                slo_s=self.slo_s,
                timeout_s=self.model.timeout_s,
                burstiness=self.burstiness,
                cache=self._tail,
            )
            self.backlog = res.backlog_end
            if minute < n:
                arrivals[minute] += res.arrivals
                within[minute] += res.within_slo
                if res.p99_latency_s > p99[minute] and res.arrivals > 0:
                    p99[minute] = res.p99_latency_s
            t = end
        self.t_last = now


class RateWindow(Event):
    __slots__ = ("service",)
    order = ORDER_RATE

    def __init__(self, time_s: float, service: SimService) -> None:
        super().__init__(time_s)
        self.service = service

    def handle(self, sim: Simulator) -> None:
        self.service.rate_window(self.time_s)


class Autoscale(Event):
    """The service's autoscaler has seen the new rate (after its look-back delay): new demand."""

    __slots__ = ("service",)
    order = ORDER_STATE

    def __init__(self, time_s: float, service: SimService) -> None:
        super().__init__(time_s)
        self.service = service

    def handle(self, sim: Simulator) -> None:
        self.service.advance(self.time_s)
        self.service.update_demand()


class ReplicasReady(Event):
    __slots__ = ("service", "gpu_type", "batch")
    order = ORDER_STATE

    def __init__(self, time_s: float, service: SimService, gpu_type: str, batch: int) -> None:
        super().__init__(time_s)
        self.service = service
        self.gpu_type = gpu_type
        self.batch = batch

    def handle(self, sim: Simulator) -> None:
        self.service.replicas_ready(self.time_s, self.gpu_type, self.batch)


class Drained(Event):
    __slots__ = ("service", "gpu_type", "k")
    order = ORDER_STATE

    def __init__(self, time_s: float, service: SimService, gpu_type: str, k: int) -> None:
        super().__init__(time_s)
        self.service = service
        self.gpu_type = gpu_type
        self.k = k

    def handle(self, sim: Simulator) -> None:
        self.service.drained(self.time_s, self.gpu_type, self.k)
