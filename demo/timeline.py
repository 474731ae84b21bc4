"""The timeline of a spike run and the figures computed from it (pure: no Ray, no torch).

The Ray glue (``tidal.demo.runtime``) samples the cluster about twice a second into ``Sample``s; the load
generator records every request. Everything the demo shows and the benchmark reports is computed here
from those records, the same way for every system (Tidal, Ray alone, Serve on free GPUs):

- **GPU split**: GPUs held per GPU type by Serve replicas and by Ray Train workers, *observed* from Ray's
  actor table (``classify_actors``), not from what the arbiter believes.
- **Time to capacity**: from the spike's start to the first sample with ``replicas_needed`` replicas
  RUNNING (None if never during the spike).
- **GPUs back to training**: from the spike's end to the first sample where training holds as many GPUs
  as just before the spike (None if never).
- **Allocation ratio**: GPU-seconds held by serving and training over GPU-seconds that exist, over the
  load's duration (time-weighted between samples).
- **Training goodput**: GPU-seconds the jobs spent training over the GPU-seconds the policy could have given
  them (the jobs' GPU types not held by the service, up to the jobs' maxima), from the spike's start to 70 s
  after its end; **post-spike reclaims**: reclaims for the service once the load is back at its base rate.
- **SLO attainment**: share of requests that succeeded within the SLO (a failed request misses it).
- **Job stops**: each time the arbiter took a job down to no GPU at all (``job_stops``), the step it
  stopped at, and when and from which checkpointed step it trained again.

Times are seconds from the start of the load (``t_s``); set-up happens at negative times.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

SERVE_REPLICA_PREFIX = "ServeReplica:"
TRAIN_WORKER_CLASS = "RayTrainWorker"
# Actors that hold their resources: created (ALIVE) or being created on a node (PENDING_CREATION with a node).
_HOLDING_STATES = {"ALIVE", "PENDING_CREATION", "RESTARTING"}


@dataclass
class Sample:
    """One observation of the cluster and the load.

    Attributes:
        t_s: seconds since the load started (negative during set-up).
        phase: ``setup``, ``fill`` (training takes the idle GPUs), ``pre``, ``spike``, ``post``, ``done``.
        capacity: GPUs per type on the alive nodes.
        serving_gpus / training_gpus: GPUs per type held by Serve replicas / Ray Train workers.
        replicas_running: RUNNING replicas of the service; ``replicas_starting`` those being started;
            ``replicas_target``: Serve's target number.
        service_demand: the demand the Tidal hook reported to the arbiter (None without an arbiter).
        grants: the arbiter's grants, units per GPU type per workload (empty without an arbiter).
        offered_rps, ok_rps, p50_ms, p99_ms, failed: the load over the last few seconds.
        requests_sent, requests_failed: totals so far.
        steps: training steps per job so far (the highest seen); ``steps_lost``: steps thrown away.
        job_workers / job_gpu_type: each job's current size and GPU type.
        resumed_from: for each job training now, the step its current attempt loaded from its checkpoint
            (0: it started from scratch).
    """

    t_s: float
    phase: str
    capacity: dict[str, float] = field(default_factory=dict)
    serving_gpus: dict[str, float] = field(default_factory=dict)
    training_gpus: dict[str, float] = field(default_factory=dict)
    replicas_running: int = 0
    replicas_starting: int = 0
    replicas_target: int | None = None
    service_demand: int | None = None
    grants: dict[str, dict[str, int]] = field(default_factory=dict)
    offered_rps: float = 0.0
    ok_rps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    failed: int = 0
    requests_sent: int = 0
    requests_failed: int = 0
    steps: dict[str, int] = field(default_factory=dict)
    steps_lost: dict[str, int] = field(default_factory=dict)
    job_workers: dict[str, int] = field(default_factory=dict)
    job_gpu_type: dict[str, str | None] = field(default_factory=dict)
    resumed_from: dict[str, int] = field(default_factory=dict)

    @property
    def serving_total(self) -> float:
        return sum(self.serving_gpus.values())

    @property
    def training_total(self) -> float:
        return sum(self.training_gpus.values())

    @property
    def capacity_total(self) -> float:
        return sum(self.capacity.values())

    def idle_gpus(self, gpu_type: str) -> float:
        return max(
            0.0,
            self.capacity.get(gpu_type, 0.0)
            - self.serving_gpus.get(gpu_type, 0.0)
            - self.training_gpus.get(gpu_type, 0.0),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Sample:
        return Sample(**dict(d))


@dataclass(frozen=True)
class TimelineEvent:
    """Something worth a line in the log and a mark on the plot (an arbiter decision, a phase change)."""

    t_s: float
    kind: str
    workload: str
    detail: str = ""


# ------------------------------------------------------------------------------------- observing


def classify_actors(
    actors: Iterable[Mapping[str, Any]],
    node_gpu_types: Mapping[str, str | None],
    service_app: str | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """GPUs per type held by Serve replicas and by Ray Train workers, from Ray's actor table.

    Args:
        actors: rows of ``ray.util.state.list_actors(detail=True)`` as dicts (``class_name``, ``state``,
            ``node_id``, ``required_resources``).
        node_gpu_types: node id -> its ``ray.io/accelerator-type`` label.
        service_app: count only this Serve application's replicas (``ServeReplica:<app>:...``).

    Example: two ALIVE ``RayTrainWorker`` actors with ``{"GPU": 1}`` on an H100 node and one
    ``ServeReplica:demo:TidalModel`` on an RTX4090 node -> ``({"RTX4090": 1.0}, {"H100": 2.0})``.
    """
    serving: dict[str, float] = {}
    training: dict[str, float] = {}
    for a in actors:
        if a.get("state") not in _HOLDING_STATES or not a.get("node_id"):
            continue
        gpu_type = node_gpu_types.get(a["node_id"])
        if gpu_type is None:
            continue
        gpus = _gpus_of(a.get("required_resources") or {})
        if gpus <= 0:
            continue
        name = str(a.get("class_name") or "")
        if name.startswith(SERVE_REPLICA_PREFIX):
            if service_app is None or name.split(":")[1:2] == [service_app]:
                serving[gpu_type] = serving.get(gpu_type, 0.0) + gpus
        elif name == TRAIN_WORKER_CLASS or name.endswith("." + TRAIN_WORKER_CLASS):
            training[gpu_type] = training.get(gpu_type, 0.0) + gpus
    return serving, training


def _gpus_of(resources: Mapping[str, Any]) -> float:
    """GPUs in an actor's required resources: ``GPU``, or ``GPU_group_<pg>`` inside a placement group."""
    if "GPU" in resources:
        return float(resources["GPU"])
    return sum(float(v) for k, v in resources.items() if k.startswith("GPU_group_") and k.count("_") == 2)


# ------------------------------------------------------------------------------------- figures


def time_to_capacity_s(
    samples: Sequence[Sample], spike_start_s: float, spike_end_s: float, replicas_needed: int
) -> float | None:
    """Seconds from the spike's start until ``replicas_needed`` replicas run; None if not within the spike.

    Example: samples at t=20 (1 running), 27.5 (3), 29 (4), spike from 20 -> 9.0 for 4 needed.
    """
    for s in samples:
        if spike_start_s <= s.t_s <= spike_end_s and s.replicas_running >= replicas_needed:
            return s.t_s - spike_start_s
    return None


def training_gpus_before(samples: Sequence[Sample], t_s: float) -> float:
    """The most GPUs training held between the load's start and ``t_s`` (the spike's start).

    The most, not the last: a job that happened to be between two sizes just before the spike would
    otherwise set the bar at nothing. Without samples in that window, the last sample before it counts.
    """
    pre = [s.training_total for s in samples if 0.0 <= s.t_s < t_s]
    if pre:
        return max(pre)
    before = [s for s in samples if s.t_s < t_s]
    return before[-1].training_total if before else 0.0


def gpus_back_to_training_s(samples: Sequence[Sample], spike_start_s: float, spike_end_s: float) -> float | None:
    """Seconds from the spike's end until training holds as many GPUs as before the spike.

    None if it never does, or if training held no GPU before the spike (nothing to give back; the
    figures report ``training_gpus_before_spike`` next to it).
    """
    baseline = training_gpus_before(samples, spike_start_s)
    if baseline <= 0:
        return None
    for s in samples:
        if s.t_s >= spike_end_s and s.training_total >= baseline - 1e-9:
            return s.t_s - spike_end_s
    return None


def allocation_ratio(samples: Sequence[Sample], start_s: float, end_s: float) -> float | None:
    """GPU-seconds held (serving + training) over GPU-seconds that exist, in ``[start_s, end_s]``.

    Each sample's value holds until the next sample (a step function).

    Example: 8 GPUs, 7 held for 10 s then 8 held for 10 s -> (70 + 80) / 160 = 0.9375.
    """
    held = exist = 0.0
    window = [s for s in samples if start_s <= s.t_s <= end_s]
    for a, b in zip(window, window[1:], strict=False):
        dt = b.t_s - a.t_s
        held += dt * min(a.capacity_total, a.serving_total + a.training_total)
        exist += dt * a.capacity_total
    return held / exist if exist > 0 else None


GOODPUT_AFTER_SPIKE_S = 70.0


def training_goodput(
    samples: Sequence[Sample], jobs: Mapping[str, tuple[Sequence[str], float, float]], start_s: float, end_s: float
) -> float | None:
    """GPU-seconds the jobs spent training over the GPU-seconds the policy could have given them, in
    ``[start_s, end_s]``.

    ``jobs``: per job, its accepted GPU types, its GPUs per worker and its most workers. Training: a job's
    workers seen stepping (``job_workers``) times its GPUs per worker. Could have: on each type some job
    accepts, the GPUs the service does not hold, at most what the jobs accepting it can take, and in all at
    most the jobs' maxima together. Each sample's value holds until the next.

    Example: 6 GPUs of the jobs' types, the service on 2 of them for 10 s, the jobs training on 3 for those
    10 s (a worker group starting again) and on 4 for the next 10 -> (30 + 40) / (40 + 40) = 0.875.
    """
    cap_all = sum(max_workers * gpus for _, gpus, max_workers in jobs.values())
    cap_by_type: dict[str, float] = {}
    for types, gpus, max_workers in jobs.values():
        for t in types:
            cap_by_type[t] = cap_by_type.get(t, 0.0) + gpus * max_workers
    trained = could = 0.0
    window = [s for s in samples if start_s <= s.t_s <= end_s]
    for a, b in zip(window, window[1:], strict=False):
        dt = b.t_s - a.t_s
        free = sum(
            min(max(0.0, a.capacity.get(t, 0.0) - a.serving_gpus.get(t, 0.0)), cap) for t, cap in cap_by_type.items()
        )
        could += dt * min(free, cap_all)
        trained += dt * sum(a.job_workers.get(j, 0) * gpus for j, (_, gpus, _) in jobs.items())
    return min(1.0, trained / could) if could > 0 else None


def reclaims_between(events: Iterable[Mapping[str, Any]], start_s: float, end_s: float) -> int:
    """The arbiter's reclaims (GPUs taken from training for a service) in ``(start_s, end_s]``."""
    return sum(1 for e in events if e["kind"] == "reclaim" and start_s < e["t_s"] <= end_s)


def train_steps_between(samples: Sequence[Sample], start_s: float, end_s: float) -> dict[str, int]:
    """Steps each job made between two times (the highest step seen by each time)."""

    def at(t: float) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in samples:
            if s.t_s > t:
                break
            for job, step in s.steps.items():
                out[job] = max(out.get(job, 0), step)
        return out

    a, b = at(start_s), at(end_s)
    return {job: b.get(job, 0) - a.get(job, 0) for job in sorted(set(a) | set(b))}


def slo_attainment(records: Iterable[Any], slo_ms: float) -> float | None:
    """Share of requests that succeeded (2xx) within ``slo_ms`` (None for no requests).

    Example: 98 fast successes, one slow success and one failure, SLO 1000 ms -> 0.98.
    """
    total = good = 0
    for r in records:
        total += 1
        if 200 <= r.status < 300 and r.latency_ms <= slo_ms:
            good += 1
    return good / total if total else None


def latency_percentiles(records: Iterable[Any]) -> dict[str, float | None]:
    """p50/p99 of successful requests, in ms (linear interpolation, as the load generator)."""
    ok = sorted(r.latency_ms for r in records if 200 <= r.status < 300)
    return {"p50_ms": _percentile(ok, 50), "p99_ms": _percentile(ok, 99)}


def _percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    if lo == hi:
        return float(sorted_values[lo])
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def reclaim_durations_s(
    events: Iterable[Mapping[str, Any]], training_jobs: Iterable[str], start_s: float, end_s: float
) -> list[float]:
    """Decision-to-free durations of the training jobs' shrinks whose release fell in ``[start_s, end_s]``.

    ``events`` are the arbiter's (``kind``, ``workload``, ``t_s`` relative to the load, ``detail``): a
    ``released`` event carries ``reclaim_s`` (from the shrink decision to the job's heartbeat showing the
    GPUs free); a ``forced`` one means the grace ran out, and counts with the time since its shrink.
    """
    jobs = set(training_jobs)
    out: list[float] = []
    last_shrink: dict[str, float] = {}
    for e in sorted(events, key=lambda e: e["t_s"]):
        if e["workload"] not in jobs:
            continue
        if e["kind"] == "shrink":
            last_shrink.setdefault(e["workload"], e["t_s"])
        elif e["kind"] in ("released", "forced"):
            t0 = last_shrink.pop(e["workload"], None)
            if not start_s <= e["t_s"] <= end_s:
                continue
            if e["kind"] == "released" and "reclaim_s" in (e.get("detail") or {}):
                out.append(float(e["detail"]["reclaim_s"]))
            elif t0 is not None:
                out.append(e["t_s"] - t0)
    return out


@dataclass(frozen=True)
class JobStop:
    """A job the arbiter took down to no GPU at all, and its return.

    Attributes:
        job: the job's name.
        stopped_s: the first sample with none of its workers running and nothing granted to it.
        step_at_stop: the highest step it had made by then (a yield checkpoints at that step).
        resumed_s: the first later sample with its workers training again (None: not seen again).
        resumed_from: the step that attempt loaded from its checkpoint (None: not seen again). Equal to
            ``step_at_stop`` when the stop lost nothing; 0 if it started over.
    """

    job: str
    stopped_s: float
    step_at_stop: int
    resumed_s: float | None = None
    resumed_from: int | None = None

    @property
    def steps_lost(self) -> int | None:
        """Steps made before the stop and not in the checkpoint it resumed from (None: not resumed)."""
        return None if self.resumed_from is None else max(0, self.step_at_stop - self.resumed_from)


def job_stops(samples: Sequence[Sample], job_names: Iterable[str], start_s: float, end_s: float) -> list[JobStop]:
    """The stops of the jobs in ``[start_s, end_s]``, each with its return (after ``end_s`` too), if any.

    A stop: a sample where a job that has run workers since its last stop runs none, and the arbiter grants
    it nothing (a resize's restart keeps a grant: not a stop; without an arbiter there are no grants, and no
    stops are seen). Its return: the first later sample where it runs workers again.

    Example: ``lo`` trains with 2 workers at step 130 at t=20, runs none with no grant at t=21 (step 134),
    trains again at t=95 from step 134 -> ``[JobStop("lo", 21.0, 134, 95.0, 134)]``.
    """
    out: list[JobStop] = []
    for job in job_names:
        stop: JobStop | None = None
        ran = False  # workers seen since the last stop
        for s in samples:
            workers = s.job_workers.get(job, 0)
            if stop is not None:
                if workers > 0:
                    out.append(JobStop(job, stop.stopped_s, stop.step_at_stop, s.t_s, s.resumed_from.get(job)))
                    stop, ran = None, True
            elif workers > 0:
                ran = True
            elif ran and job in s.grants and not sum(s.grants[job].values()):
                stop, ran = JobStop(job, s.t_s, s.steps.get(job, 0)), False
        if stop is not None:
            out.append(stop)
    return sorted((st for st in out if start_s <= st.stopped_s <= end_s), key=lambda st: (st.stopped_s, st.job))


def median_or_none(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def spike_figures(
    samples: Sequence[Sample],
    records: Sequence[Any],
    events: Sequence[Mapping[str, Any]],
    *,
    spike_start_s: float,
    spike_end_s: float,
    end_s: float,
    replicas_needed: int,
    slo_ms: float,
    job_names: Sequence[str],
    lost_steps_by_job: Mapping[str, int] | None = None,
    job_gpus: Mapping[str, tuple[Sequence[str], float, float]] | None = None,
) -> dict[str, Any]:
    """Every figure of one run, as the benchmark's JSON holds them (see the module docstring).

    ``job_gpus``: per job, its accepted GPU types, GPUs per worker and most workers (for ``training_goodput``,
    from the spike's start to ``GOODPUT_AFTER_SPIKE_S`` after its end).

    ``records`` are the load generator's (``status``, ``latency_ms``, ``scheduled_s``); ``events`` the
    arbiter's with ``t_s`` relative to the load (empty without an arbiter).
    """
    lat = latency_percentiles(records)
    spike_recs = [r for r in records if spike_start_s <= r.scheduled_s < spike_end_s]
    spike_lat = latency_percentiles(spike_recs)
    steps = train_steps_between(samples, 0.0, end_s)
    lost = dict(lost_steps_by_job or {})
    for s in samples:
        for job, n in s.steps_lost.items():
            lost[job] = max(lost.get(job, 0), n)
    reclaims = reclaim_durations_s(events, job_names, 0.0, end_s)
    in_spike = [s for s in samples if spike_start_s <= s.t_s <= spike_end_s]
    demand = [s.service_demand if s.service_demand is not None else s.replicas_target for s in in_spike]
    demand = [d for d in demand if d is not None]
    return {
        "time_to_capacity_s": time_to_capacity_s(samples, spike_start_s, spike_end_s, replicas_needed),
        "reclaim_s": median_or_none(reclaims),
        "reclaims": len(reclaims),
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "spike_p99_ms": spike_lat["p99_ms"],
        "requests": len(records),
        "failed_requests": sum(1 for r in records if not 200 <= r.status < 300),
        "failed_by_kind": _failures_by_kind(records),
        "slo_ms": slo_ms,
        "slo_attainment": slo_attainment(records, slo_ms),
        "spike_slo_attainment": slo_attainment(spike_recs, slo_ms),
        "train_steps": sum(steps.values()),
        "train_steps_by_job": steps,
        "lost_steps": sum(lost.values()),
        "lost_steps_by_job": lost,
        "gpu_allocation_ratio": allocation_ratio(samples, 0.0, end_s),
        "training_goodput": training_goodput(
            samples, job_gpus or {}, spike_start_s, spike_end_s + GOODPUT_AFTER_SPIKE_S
        ) if job_gpus else None,
        # Reclaims once the load is back at its base rate: a job that grew back taken again.
        "post_spike_reclaims": reclaims_between(events, spike_end_s, end_s),
        "gpus_back_to_training_s": gpus_back_to_training_s(samples, spike_start_s, spike_end_s),
        "training_gpus_before_spike": training_gpus_before(samples, spike_start_s),
        "replicas_needed": replicas_needed,
        "peak_replicas_running": max((s.replicas_running for s in in_spike), default=0),
        "peak_demand_replicas": max(demand, default=None),
        "job_stops": [asdict(st) for st in job_stops(samples, job_names, 0.0, end_s)],
    }


def _failures_by_kind(records: Iterable[Any]) -> dict[str, int]:
    """Failed requests by kind: ``http_503``, ``timeout``, ``cancelled`` (given up at the end), ..."""
    out: dict[str, int] = {}
    for r in records:
        if not 200 <= r.status < 300:
            kind = r.error or f"http_{r.status}"
            out[kind] = out.get(kind, 0) + 1
    return out


def steady_since(first: Sample | None, s: Sample, jobs: Collection[str], granted: bool) -> Sample | None:
    """The first sample of the stretch of steady training that ``s`` continues, or None if ``s`` is not steady.

    Steady: every job trains (workers and steps), at the size the arbiter granted it (when there is an
    arbiter), and no job changed size or GPU type since ``first``. A job the arbiter registered and granted
    nothing, and that runs nothing, is steady too: it waits in the queue by the arbiter's decision (a full
    cluster). The load starts after a stretch of ``settle_s``: a cluster meets a spike in steady state, not
    while its trainers are still starting (on this machine their start-up takes the CPU the service needs,
    and the service scales up for it).
    """
    for j in jobs:
        if granted and waits_ungranted(s, j):
            continue
        workers = s.job_workers.get(j, 0)
        if workers <= 0 or s.steps.get(j, 0) <= 0:
            return None
        if granted and workers != sum((s.grants.get(j) or {}).values()):
            return None
    if first is None or any(
        (first.job_workers.get(j), first.job_gpu_type.get(j)) != (s.job_workers.get(j), s.job_gpu_type.get(j)) for j in jobs
    ):
        return s
    return first


def trained_since(first: Sample, s: Sample, jobs: Collection[str]) -> bool:
    """Every job made steps between ``first`` and ``s``, but those waiting ungranted (``waits_ungranted``)."""
    return all(s.steps.get(j, 0) > first.steps.get(j, 0) or waits_ungranted(s, j) for j in jobs)


def waits_ungranted(s: Sample, job: str) -> bool:
    """The arbiter knows ``job``, grants it nothing, and it runs no worker: it waits in the queue.

    A job not registered yet (absent from ``s.grants``) does not wait so: it has not been decided on.
    """
    return job in s.grants and not sum(s.grants[job].values()) and s.job_workers.get(job, 0) == 0
