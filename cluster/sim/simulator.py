"""The simulator: the production ``ResourceArbiter`` and policies, a simulated backend and clock, traces.

One ``Simulator`` runs one policy over the inputs (``SimInputs``) and returns its metrics and time
series (``PolicyResult``). Nothing here decides a grant: the policy built by
``tidal.policies.config.build_policy`` does, inside ``tidal.cluster.arbiter.ResourceArbiter.tick``; the simulated
workloads only register, heartbeat and follow their grants.

The loop (``tidal.cluster.sim.engine``) handles, in time order: trace job arrivals, workload state changes
(started, yielded, finished, replicas ready or drained), rate windows, heartbeats, node failures,
the periodic arbiter tick (``arbiter.tick_s``), an event-driven tick ``event_tick_delay_s`` after the
arbiter saw a registration or a release (``ResourceArbiter.needs_tick``), and metric samples.
"""

from __future__ import annotations

import logging
import math
import random
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tidal.cluster.arbiter import ArbiterConfig, ResourceArbiter
from tidal.cluster.model import NodeSnapshot, ServiceSpec
from tidal.cluster.policy_file import PolicyFileModel
from tidal.cluster.sim.backend import SimBackend
from tidal.cluster.sim.config import ServiceModelConfig, SimConfig
from tidal.cluster.sim.engine import Event, EventLoop, SimClock
from tidal.cluster.sim.traces import RateSeries, TrainingJobRecord
from tidal.cluster.sim.workloads import ORDER_STATE, JobArrival, SimService, SimTrainingJob, training_spec
from tidal.policies.config import StaticModel, build_policy

logger = logging.getLogger(__name__)

ORDER_TICK = 90
ORDER_SAMPLE = 99


@dataclass(frozen=True)
class SimInputs:
    """Everything one run needs, already loaded, scaled and validated (see ``tidal.cluster.sim.run``)."""

    nodes: tuple[NodeSnapshot, ...]
    jobs: tuple[TrainingJobRecord, ...]
    series: tuple[RateSeries, ...]
    policy_config: PolicyFileModel
    sim_config: SimConfig
    horizon_s: float

    @property
    def end_s(self) -> float:
        return self.horizon_s + self.sim_config.drain_s

    def capacity_by_type(self) -> dict[str, float]:
        cap: dict[str, float] = {}
        for n in self.nodes:
            cap[n.gpu_type] = cap.get(n.gpu_type, 0.0) + n.num_gpus
        return cap


PolicyResult = dict[str, Any]


# ------------------------------------------------------------------------------------ sizing helpers


def service_types(model: ServiceModelConfig, cluster_types: Sequence[str]) -> tuple[str, ...]:
    types = tuple(t for t in model.accepted_types if t in cluster_types)
    if not types:
        raise ValueError(
            f"service gpu_types {model.accepted_types} match no GPU type of the cluster ({', '.join(cluster_types)})"
        )
    return types


def replica_capacity_rps(model: ServiceModelConfig, capacity: dict[str, float]) -> float:
    """Requests per second the whole cluster would serve with every accepted GPU running replicas."""
    types = service_types(model, list(capacity))
    return sum(capacity[t] / model.gpus_per_replica * model.replica_rps[t] for t in types)


def peak_multiplier(
    series: Sequence[RateSeries], model: ServiceModelConfig, capacity: dict[str, float], share: float
) -> float:
    """The rate multiplier that makes the services' summed peak need ``share`` of all the cluster's GPUs.

    "Need" is at the target utilisation, on a uniform slice of every accepted type (the mix a static
    split would give). Example: 2,048 GPUs, share 1/3, accepted types serving 0.74 rps per GPU on
    average, target 0.7: the peak must be 683 * 0.74 * 0.7 = 354 rps.
    """
    types = service_types(model, list(capacity))
    gpus = sum(capacity[t] for t in types)
    rps_per_gpu = replica_capacity_rps(model, capacity) / gpus
    total_gpus = sum(capacity.values())
    peak = sum(s.peak_rps() for s in series)
    if peak <= 0:
        return 1.0
    return share * total_gpus * rps_per_gpu * model.target_utilization / peak


def static_serving_share(
    series: Sequence[RateSeries], model: ServiceModelConfig, capacity: dict[str, float], headroom: float
) -> dict[str, float]:
    """The static split's serving share per accepted type: serving sized for its peak.

    The same share ``s`` of every accepted type, so that at the summed peak rate the replicas the
    policy wants (demand at the target utilisation, plus its headroom) fit:
    ``s = (1 + headroom) * peak / (target * sum_t(gpus_t / gpus_per_replica * rps_t))``, rounded up to
    whole nodes by the policy.
    """
    types = service_types(model, list(capacity))
    peak = sum(s.peak_rps() for s in series)
    full = replica_capacity_rps(model, capacity)
    s = min(1.0, (1.0 + headroom) * peak / (model.target_utilization * full)) if full > 0 else 0.0
    return dict.fromkeys(types, s)


# ------------------------------------------------------------------------------------------ the events


class PeriodicTick(Event):
    """The arbiter's timer: it ticks ``tick_s`` after its last tick, early or not.

    As in the actor's loop (``tidal.cluster.actor``: ``next_due = now + tick_interval_s`` after every tick),
    an event-driven tick restarts the timer, so two ticks are never closer than the event tick's
    minimum gap, and no periodic tick follows an early one within the same ``tick_s``.
    """

    __slots__ = ()
    order = ORDER_TICK

    def handle(self, sim: Simulator) -> None:
        due = sim.last_tick_s + sim.cfg.arbiter.tick_s
        if due > self.time_s + 1e-9:
            sim.loop.schedule(PeriodicTick(due))
            return
        sim.tick()
        sim.loop.schedule(PeriodicTick(self.time_s + sim.cfg.arbiter.tick_s))


class EventTick(Event):
    __slots__ = ()
    order = ORDER_TICK

    def handle(self, sim: Simulator) -> None:
        # A tick may have run since this one was scheduled: keep the minimum gap after it.
        earliest = sim.last_tick_s + sim.cfg.arbiter.event_tick_min_gap_s
        if earliest > self.time_s + 1e-9:
            sim.loop.schedule(EventTick(earliest))
            return
        sim.event_tick_pending = False
        if sim.arbiter.needs_tick():
            sim.tick()


class KeepAlive(Event):
    """Every workload heartbeats at least every ``keepalive_s`` (else its registration would expire)."""

    __slots__ = ()
    order = ORDER_STATE

    def handle(self, sim: Simulator) -> None:
        period = sim.cfg.arbiter.keepalive_s
        for w in list(sim.workloads.values()):
            if self.time_s - w.last_heartbeat_s >= period * 0.5:
                w.heartbeat()
        sim.loop.schedule(KeepAlive(self.time_s + period))


class Sample(Event):
    __slots__ = ()
    order = ORDER_SAMPLE

    def handle(self, sim: Simulator) -> None:
        sim.sample()
        nxt = self.time_s + sim.cfg.sample_s
        if nxt <= sim.inputs.end_s:
            sim.loop.schedule(Sample(nxt))


class NodeFail(Event):
    __slots__ = ("node", "repair_s")
    order = ORDER_STATE

    def __init__(self, time_s: float, node: str, repair_s: float | None) -> None:
        super().__init__(time_s)
        self.node = node
        self.repair_s = repair_s

    def handle(self, sim: Simulator) -> None:
        sim.fail_node(self.node, self.repair_s)


class NodeRepair(Event):
    __slots__ = ("node_id",)
    order = ORDER_STATE

    def __init__(self, time_s: float, node_id: str) -> None:
        super().__init__(time_s)
        self.node_id = node_id

    def handle(self, sim: Simulator) -> None:
        sim.repair_node(self.node_id)


# ---------------------------------------------------------------------------------------- the simulator


class Simulator:
    """One policy over the inputs. ``run()`` returns a ``PolicyResult``. See the module docstring."""

    def __init__(
        self,
        inputs: SimInputs,
        policy: str,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        self.inputs = inputs
        self.cfg = inputs.sim_config
        self.policy_name = policy
        self.progress = progress
        self.clock = SimClock(0.0)
        self.loop = EventLoop(self.clock)
        self.backend = SimBackend(self, list(inputs.nodes), self.cfg.arbiter.heartbeat_delay_s)
        capacity = inputs.capacity_by_type()
        self.cluster_types = sorted(capacity, key=lambda t: -inputs.policy_config.speeds.get(t, 1.0))
        pcfg = inputs.policy_config
        update: dict[str, Any] = {"policy": policy}
        # An operator sizes a static split's serving share for the services' peak; where the policy file
        # leaves it unset, the simulator sizes it from the traces, the same for every policy (only the
        # static split reads it).
        if not pcfg.static.serving_share and inputs.series:
            share = static_serving_share(inputs.series, self.cfg.service, capacity, pcfg.headroom_fraction)
            update["static"] = StaticModel(
                serving_share=share, default_serving_share=pcfg.static.default_serving_share
            )
        self.policy_config = pcfg.model_copy(update=update)
        self.policy = build_policy(self.policy_config)
        self.arbiter = ResourceArbiter(
            self.policy,
            self.backend,
            self.clock,
            ArbiterConfig(
                registration_ttl_s=3 * self.cfg.arbiter.keepalive_s,
                default_yield_grace_s=self.policy_config.arbiter.default_yield_grace_s,
            ),
            self.policy_config.prices_per_gpu_hour,
        )
        self.speeds = dict(self.policy_config.speeds)
        self.workloads: dict[str, SimTrainingJob | SimService] = {}
        self.services: list[SimService] = []
        self.event_tick_pending = False
        self.last_tick_s = -math.inf
        # job metrics
        self.jct_s = array("d")
        self.queue_s = array("d")
        self.jobs_started = 0
        self.jobs_finished = 0
        self.preemptions = 0
        self.forced_stops = 0
        self.job_stops = 0
        self.job_restarts = 0
        self.job_quick_restops = 0
        self.lost_gpu_s = 0.0
        self.overhead_gpu_s = 0.0
        # oracle: min(demand, capacity), integrated
        self.demand_gpus = 0.0
        self._oracle_area = 0.0
        self._oracle_t = 0.0
        # time series
        self.decide_ms = array("d")
        self.idle_wanted_gpus = array("d")  # per sample, see sample()
        self.tick_wall_s = 0.0  # time inside ResourceArbiter.tick (decide included), wall and CPU
        self.tick_cpu_s = 0.0
        self.training_demand_gpus = 0.0
        self.samples: list[dict[str, Any]] = []
        self.node_failures = 0

    # ----------------------------------------------------------------------------------- running

    def run(self) -> PolicyResult:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        end = self.inputs.end_s
        for series in self.inputs.series:
            spec = ServiceSpec(
                name=series.name,
                gpus_per_replica=self.cfg.service.gpus_per_replica,
                min_replicas=self.cfg.service.min_replicas,
                max_replicas=self.cfg.service.max_replicas,
                gpu_types=service_types(self.cfg.service, self.cluster_types),
                slo_p99_ms=self.cfg.service.slo_p99_s * 1000.0,
                priority=self.cfg.service.priority,
            )
            svc = SimService(self, spec, series, self.cfg.service, end)
            self.workloads[spec.name] = svc
            self.services.append(svc)
            svc.start()
        if self.inputs.jobs:
            self.loop.schedule(JobArrival(self.inputs.jobs[0].submit_s, 0))
        self.loop.schedule(PeriodicTick(0.0))
        self.loop.schedule(KeepAlive(self.cfg.arbiter.keepalive_s))
        self.loop.schedule(Sample(0.0))
        self._schedule_failures()
        self.loop.run(end, self, self._after_event)
        for svc in self.services:
            svc.advance(end)
        self.backend.integrate(end)
        self._oracle_integrate(end)
        return self._result(time.perf_counter() - wall0, time.process_time() - cpu0)

    def _after_event(self) -> None:
        if not self.event_tick_pending and self.arbiter.needs_tick():
            self.event_tick_pending = True
            a = self.cfg.arbiter
            at = max(self.clock.now() + a.event_tick_delay_s, self.last_tick_s + a.event_tick_min_gap_s)
            self.loop.schedule(EventTick(at))

    def tick(self) -> None:
        self.last_tick_s = self.clock.now()
        t0, c0 = time.perf_counter(), time.process_time()
        self.arbiter.tick()
        self.tick_wall_s += time.perf_counter() - t0
        self.tick_cpu_s += time.process_time() - c0
        self.decide_ms.append(self.arbiter.last_decide_ms)

    def arrive_job(self, index: int) -> None:
        jobs = self.inputs.jobs
        record = jobs[index]
        if record.submit_s < self.inputs.horizon_s:
            spec = training_spec(record, self.cfg.training, self.cluster_types, self.cfg.seed)
            job = SimTrainingJob(self, record, spec, self.cfg.training, self.speeds, self.cfg.seed)
            self.workloads[spec.name] = job
            job.arrive()
        if index + 1 < len(jobs) and jobs[index + 1].submit_s < self.inputs.horizon_s:
            self.loop.schedule(JobArrival(jobs[index + 1].submit_s, index + 1))

    # ------------------------------------------------------------------------------- callbacks

    def on_job_started(self, job: SimTrainingJob) -> None:
        self.jobs_started += 1
        self.queue_s.append(job.first_start_s - job.record.submit_s)  # type: ignore[operator]

    def on_job_finished(self, job: SimTrainingJob) -> None:
        self.jobs_finished += 1
        self.jct_s.append(job.finish_s - job.record.submit_s)  # type: ignore[operator]
        self._absorb(job)
        del self.workloads[job.name]

    def _absorb(self, job: SimTrainingJob) -> None:
        self.preemptions += job.preemptions
        self.forced_stops += job.forced_stops
        self.job_stops += job.stops
        self.job_restarts += job.restarts
        self.job_quick_restops += job.quick_restops
        self.lost_gpu_s += job.lost_gpu_s
        self.overhead_gpu_s += job.overhead_gpu_s

    def on_demand(self, delta_gpus: float, *, training: bool = False) -> None:
        self._oracle_integrate(self.clock.now())
        self.demand_gpus += delta_gpus
        if training:
            self.training_demand_gpus += delta_gpus

    def _oracle_integrate(self, now: float) -> None:
        dt = now - self._oracle_t
        if dt > 0:
            self._oracle_area += min(self.demand_gpus, sum(self.backend.capacity.values())) * dt
            self._oracle_t = now

    # ---------------------------------------------------------------------------------- failures

    def _schedule_failures(self) -> None:
        for f in self.cfg.node_failures:
            if f.at_s < self.inputs.end_s:
                self.loop.schedule(NodeFail(f.at_s, f.node, f.repair_s))
        rate = self.cfg.node_failure_rate_per_day
        if rate > 0:
            rng = random.Random(f"{self.cfg.seed}:failures")
            nodes = sorted(n.node_id for n in self.inputs.nodes)
            per_s = rate * len(nodes) / 86_400.0
            t = rng.expovariate(per_s)
            while t < self.inputs.end_s:
                self.loop.schedule(NodeFail(t, rng.choice(nodes), self.cfg.node_repair_s))
                t += rng.expovariate(per_s)

    def fail_node(self, node: str, repair_s: float | None) -> None:
        target = self.backend.pick_node(node)
        if target is None or not target.healthy:
            return
        now = self.clock.now()
        self._oracle_integrate(now)
        victims = self.backend.fail_node(target.node_id)
        self.node_failures += 1
        logger.info(
            "t=%.0f node %s (%s) failed; units lost: %s", now, target.node_id, target.gpu_type, victims
        )
        for name, units in sorted(victims.items()):
            w = self.workloads[name]
            if isinstance(w, SimTrainingJob):
                w.stopped(now, reason="node")
            else:
                w.replicas_lost(now, target.gpu_type, units)
        if repair_s is not None:
            self.loop.schedule(NodeRepair(now + repair_s, target.node_id))

    def repair_node(self, node_id: str) -> None:
        self._oracle_integrate(self.clock.now())
        self.backend.repair_node(node_id)

    # ----------------------------------------------------------------------------------- metrics

    def sample(self) -> None:
        now = self.clock.now()
        granted_by_type: dict[str, float] = {}
        for (_, t), v in self.backend.granted.items():
            granted_by_type[t] = granted_by_type.get(t, 0.0) + v
        free = {t: max(0.0, c - granted_by_type.get(t, 0.0)) for t, c in self.backend.capacity.items()}
        # Idle while wanted: free GPUs of a type that a running job on it could grow into, or that a
        # waiting job could start on (its first accepted type where its minimum fits) and grow into.
        # The guards (batched growth, resize interval, move cap), release before grant and the tick
        # period keep some idle for a minute or two; a large figure means GPUs idle that training
        # could use.
        wanted: dict[str, float] = {}
        waiting = running = 0
        for w in self.workloads.values():
            if not isinstance(w, SimTrainingJob):
                continue
            g = w.spec.gpus_per_worker
            if w.state == "waiting":
                waiting += 1
                for t in w.spec.gpu_types:
                    if free.get(t, 0.0) + 1e-9 >= w.spec.min_workers * g:
                        wanted[t] = wanted.get(t, 0.0) + w.spec.max_workers * g
                        break
            else:
                running += 1
                if w.gpu_type is not None:
                    more = max(0, w.spec.max_workers - w.grant.get(w.gpu_type)) * g
                    wanted[w.gpu_type] = wanted.get(w.gpu_type, 0.0) + more
        idle_wanted = sum(min(f, wanted.get(t, 0.0)) for t, f in free.items())
        self.idle_wanted_gpus.append(idle_wanted)
        self.samples.append(
            {
                "t_s": now,
                "granted": {f"{k}/{t}": v for (k, t), v in sorted(self.backend.granted.items())},
                "capacity": dict(self.backend.capacity),
                "demand_gpus": self.demand_gpus,
                "training_demand_gpus": self.training_demand_gpus,
                "idle_wanted_gpus": idle_wanted,
                "jobs_waiting": waiting,
                "jobs_running": running,
                "rate_rps": sum(s.lam for s in self.services),
            }
        )
        if self.progress is not None:
            self.progress(now / self.inputs.end_s)

    def _result(self, wall_s: float, cpu_s: float) -> PolicyResult:
        end = self.inputs.end_s
        n_min = int(math.ceil(end / 60.0))
        arrivals = within = 0.0
        good_minutes = total_minutes = 0
        latency_series: dict[str, list[float]] = {}
        first = int(self.cfg.warmup_s // 60.0)
        for svc in self.services:
            a_arr, w_arr = svc.arrivals, svc.within
            for i in range(first, n_min):
                a = a_arr[i]
                total_minutes += 1
                if a <= 0 or w_arr[i] >= 0.99 * a - 1e-9:
                    good_minutes += 1
                arrivals += a
                within += w_arr[i]
            latency_series[svc.name] = list(svc.p99_s[:n_min])
        # jobs still in the system at the end
        unfinished = never_started = 0
        censored_queue = array("d")
        for w in self.workloads.values():
            if isinstance(w, SimTrainingJob):
                unfinished += 1
                self._absorb(w)
                if w.first_start_s is None:
                    never_started += 1
                    censored_queue.append(end - w.record.submit_s)
        all_queue = list(self.queue_s) + list(censored_queue)
        jct = sorted(self.jct_s)
        cap_area = self.backend.capacity_area
        granted_area = sum(self.backend.granted_area.values())
        by_kind: dict[str, float] = {}
        by_type: dict[str, float] = {}
        cost = 0.0
        prices = self.policy_config.prices_per_gpu_hour
        for (kind, t), area in self.backend.granted_area.items():
            by_kind[kind] = by_kind.get(kind, 0.0) + area
            by_type[t] = by_type.get(t, 0.0) + area
            cost += area / 3600.0 * prices.get(t, 0.0)
        cap_by_type = self.backend.capacity_area_by_type
        decide = sorted(self.decide_ms)
        return {
            "policy": self.policy_name,
            "slo_attainment": within / arrivals if arrivals else 1.0,
            "slo_minutes": good_minutes / total_minutes if total_minutes else 1.0,
            "gpu_allocation_ratio": granted_area / cap_area if cap_area else 0.0,
            "avg_jct_s": sum(jct) / len(jct) if jct else None,
            "p99_jct_s": _quantile(jct, 0.99),
            "avg_queue_s": sum(all_queue) / len(all_queue) if all_queue else None,
            "preemptions": self.preemptions,
            "lost_gpu_hours": self.lost_gpu_s / 3600.0,
            "cost_usd": cost,
            "jobs_finished": self.jobs_finished,
            # more detail
            "jobs_submitted": self.jobs_finished + unfinished,
            "jobs_unfinished": unfinished,
            "jobs_never_started": never_started,
            "median_jct_s": _quantile(jct, 0.5),
            "forced_stops": self.forced_stops,
            "job_stops": self.job_stops,
            "job_restarts": self.job_restarts,
            "job_quick_restops": self.job_quick_restops,
            "service_forced_stops": self.backend.forced_services,
            "restart_overhead_gpu_hours": self.overhead_gpu_s / 3600.0,
            "allocation_by_kind": {k: v / cap_area for k, v in sorted(by_kind.items())} if cap_area else {},
            # Each GPU type's own allocation ratio (granted / that type's capacity).
            "allocation_by_type": {t: by_type.get(t, 0.0) / c for t, c in sorted(cap_by_type.items()) if c},
            "oracle_allocation_ratio": self._oracle_area / cap_area if cap_area else 0.0,
            "idle_wanted_ratio": _idle_wanted_ratio(self.idle_wanted_gpus, self.samples),
            "requests": arrivals,
            "requests_within_slo": within,
            "node_failures": self.node_failures,
            "ticks": len(decide),
            "decide_ms_mean": sum(decide) / len(decide) if decide else 0.0,
            "decide_ms_p99": _quantile(decide, 0.99),
            "decide_ms_max": decide[-1] if decide else 0.0,
            "events": self.loop.handled,
            "wall_s": wall_s,
            "cpu_s": cpu_s,
            # Where the CPU time went: the arbiter's whole tick (the guarded policy's decide, plus
            # snapshot, plan, commit, apply) and the simulator itself (events, queues, workloads'
            # heartbeats, metrics). The arbiter times decide() in wall time only, so its CPU share is
            # estimated as the tick's CPU times decide's share of the tick's wall time.
            "tick_cpu_s": self.tick_cpu_s,
            "decide_cpu_s": self.tick_cpu_s * (sum(decide) / 1e3 / self.tick_wall_s) if self.tick_wall_s else 0.0,
            "sim_cpu_s": cpu_s - self.tick_cpu_s,
            "simulated_s": end,
            "_series": {
                "samples": self.samples,
                "latency_p99_s": latency_series,
                "slo_s": {s.name: s.slo_s for s in self.services},
                "jct_s": jct,
            },
        }


def _idle_wanted_ratio(idle: Sequence[float], samples: Sequence[dict[str, Any]]) -> float:
    """Mean over samples of GPUs idle while a job could use them, over the capacity then."""
    caps = [sum(s["capacity"].values()) for s in samples]
    total = sum(caps)
    return sum(idle) / total if total else 0.0


def _quantile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]
