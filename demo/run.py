"""One spike run of one system on a running ``DemoRuntime``: set up, fill, load, observe, figures.

``run_system`` is what both ``make demo`` (one Tidal run, shown live) and ``bench/spike.py`` (several
systems and repetitions, measured) call:

1. set up the system: the arbiter (Tidal only), the service, the training jobs (``ray job submit``);
2. *fill*: wait until every job has trained steadily at its granted size for ``settle_s`` (see
   ``tidal.demo.timeline.steady_since``), sampling meanwhile;
3. play the load (base, spike, base) with ``LiveLoad`` and sample the cluster every ``sample_interval_s``;
   then, if the caller asks, go on sampling with no load until a condition on the samples holds (``until``,
   e.g. every job stopped for the spike trains again), at most ``until_timeout_s``;
4. stop the jobs (their controllers write their ledgers: steps lost), and compute the figures
   (``tidal.demo.timeline.spike_figures``).

The caller owns the runtime and stops it (``reset`` between systems, ``close`` at the end) in a
``finally``, so that Ctrl-C or an error anywhere leaves nothing running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tidal.demo.live_load import LiveLoad
from tidal.demo.runtime import DemoRuntime, SystemConfig
from tidal.demo.timeline import Sample, TimelineEvent, spike_figures, steady_since, trained_since

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What one run of one system produced."""

    system: str
    figures: dict[str, Any]
    samples: list[Sample]
    events: list[TimelineEvent]
    load_summary: dict[str, Any]
    job_summaries: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    records: list[Any] = field(default_factory=list)  # the load's requests (loadgen.RequestRecord)

    def to_dict(self, with_samples: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "system": self.system,
            "figures": self.figures,
            "timings_s": self.timings,
            "load_summary": {k: v for k, v in self.load_summary.items() if k != "requests"},
            "job_summaries": {
                k: {kk: v.get(kk) for kk in ("finished", "final_step", "steps_lost", "forced_stops", "releases", "groups", "resizes")}
                for k, v in self.job_summaries.items()
            },
            "events": [e.__dict__ for e in self.events],
        }
        if with_samples:
            d["samples"] = [s.to_dict() for s in self.samples]
        return d


def run_system(
    rt: DemoRuntime,
    system: SystemConfig,
    *,
    on_sample: Callable[[Sample], None] | None = None,
    on_event: Callable[[str], None] | None = None,
    sample_interval_s: float = 0.5,
    fill_timeout_s: float = 240.0,
    stop: threading.Event | None = None,
    until: Callable[[list[Sample]], bool] | None = None,
    until_timeout_s: float = 60.0,
) -> RunResult:
    """Runs the scenario once for ``system`` on ``rt`` (a started, connected runtime). See the module docstring.

    ``until``: after the load, the cluster is sampled (phase ``done``) until ``until(samples)`` is true or
    ``until_timeout_s`` has passed; the jobs are stopped only then. None: they are stopped at the load's end.
    """
    sc = rt.scenario
    phases = sc.phases()
    stop = stop or threading.Event()
    emit = on_event or (lambda line: logger.info("%s", line))
    show = on_sample or (lambda s: None)
    samples: list[Sample] = []
    events: list[TimelineEvent] = []
    timings: dict[str, float] = {}
    t_ref = time.monotonic()  # shifted to the load's start once it is known
    t_wall_ref = time.time()

    # 1. set up
    t0 = time.monotonic()
    if system.arbiter:
        rt.start_arbiter()
    rt.start_service(system.autoscaling_policy)
    if system.job_runner is not None:
        if system.arbiter:
            # A service registers asking for its max replicas until its first report of the load: let that
            # settle before the jobs register, or they start small and restart to grow.
            rt.wait_service_settled()
        rt.submit_jobs(system.job_runner)
    rt.wait_service_ready()
    timings["setup_s"] = time.monotonic() - t0

    # 2. fill: every job trains
    t0 = time.monotonic()
    prev: Sample | None = None
    if rt.jobs:
        emit("waiting for training to fill the idle GPUs")
        deadline = time.monotonic() + fill_timeout_s
        checked = time.monotonic()
        steady: Sample | None = None  # the first sample of the current steady stretch
        while not stop.is_set():
            if time.monotonic() - checked > 5.0:
                rt.check_jobs_alive()
                checked = time.monotonic()
            s = rt.observe(time.monotonic() - t_ref, "fill")
            _diff(prev, s, emit, events)
            prev = s
            samples.append(s)
            show(s)
            steady = steady_since(steady, s, rt.jobs, system.arbiter)
            if steady is not None and s.t_s - steady.t_s >= sc.load.settle_s and trained_since(steady, s, rt.jobs):
                break
            if time.monotonic() > deadline:
                emit(f"training did not fill the GPUs within {fill_timeout_s:.0f} s; starting the load anyway")
                break
            stop.wait(sample_interval_s)
    if system.arbiter and not stop.is_set():
        rt.wait_warm_pool()
        rt.wait_spare_workers()
    if not stop.is_set():
        rt.wait_workers_started()
    timings["fill_s"] = time.monotonic() - t0
    if stop.is_set():
        raise KeyboardInterrupt

    # 3. load
    load = LiveLoad(
        rt.predict_url,
        phases.rate_windows(),
        phases.end_s,
        seed=sc.load.seed,
        instances=sc.load.instances_per_request,
        timeout_s=sc.load.request_timeout_s,
    )
    emit(
        f"load: {phases.base_rps:g} req/s, spike to {phases.spike_rps:g} req/s at t={phases.spike_start_s:g} s for "
        f"{phases.spike_end_s - phases.spike_start_s:g} s, {len(load.arrivals_s)} requests"
    )
    start_mono = load.start()
    load_wall = t_wall_ref + (start_mono - t_ref)
    shift = start_mono - t_ref
    for s in samples:
        s.t_s -= shift
    for i, e in enumerate(events):
        events[i] = TimelineEvent(e.t_s - shift, e.kind, e.workload, e.detail)
    seen_events = 0
    last_phase = None

    def record(sample: Sample) -> None:
        """Keeps a sample of the load or after it: its changes as events, the arbiter's new events."""
        nonlocal prev, seen_events
        _diff(prev, sample, emit, events)
        prev = sample
        samples.append(sample)
        show(sample)
        if system.arbiter:
            seen_events = _arbiter_events(rt, t_wall_ref - 1.0, load_wall, seen_events, emit, events)

    # The schedule ends at end_s; requests still in flight get their timeout, and no more.
    give_up_s = phases.end_s + sc.load.request_timeout_s + 5.0
    try:
        while not load.done and not stop.is_set():
            tick = time.monotonic()
            t = tick - start_mono
            if t > give_up_s:
                emit(f"requests still unanswered {sc.load.request_timeout_s:g} s after the schedule's end: giving up on them")
                break
            phase = phases.phase_at(t)
            if phase != last_phase:
                emit(f"phase: {phase} (t={t:+.0f} s)")
                events.append(TimelineEvent(t, "phase", "", phase))
                last_phase = phase
            s = rt.observe(t, phase)
            w = load.window(5.0)
            recs = load.records()
            s.offered_rps = phases.rate_at(t)
            s.ok_rps, s.p50_ms, s.p99_ms = w.ok_rps, w.p50_ms, w.p99_ms
            s.failed = w.failed
            s.requests_sent = len(recs)
            s.requests_failed = sum(1 for r in recs if not 200 <= r.status < 300)
            record(s)
            stop.wait(max(0.0, sample_interval_s - (time.monotonic() - tick)))
    finally:
        if not load.done:
            load.stop()
    if stop.is_set():
        raise KeyboardInterrupt
    load.wait(sc.load.request_timeout_s + 5)
    records = load.records()
    if until is not None:
        t0 = time.monotonic()
        deadline = t0 + until_timeout_s
        while not until(samples) and time.monotonic() < deadline and not stop.is_set():
            tick = time.monotonic()
            record(rt.observe(tick - start_mono, "done"))
            stop.wait(max(0.0, sample_interval_s - (time.monotonic() - tick)))
        timings["after_load_s"] = time.monotonic() - t0
        if stop.is_set():
            raise KeyboardInterrupt

    # 4. stop the jobs (their controllers write their ledgers), then the figures
    arbiter_events = []
    if system.arbiter:
        arbiter_events = [dict(e, t_s=e["t_s"] - load_wall) for e in rt.arbiter_events()]
    t0 = time.monotonic()
    rt.stop_jobs()
    timings["stop_jobs_s"] = time.monotonic() - t0
    summaries = rt.job_summaries()
    lost = {n: int(v.get("steps_lost") or 0) for n, v in summaries.items()}
    figures = spike_figures(
        samples,
        records,
        arbiter_events,
        spike_start_s=phases.spike_start_s,
        spike_end_s=phases.spike_end_s,
        end_s=phases.end_s,
        replicas_needed=sc.load.replicas_needed,
        slo_ms=sc.load.slo_ms,
        job_names=list(rt.jobs),
        job_gpus={
            n: (spec["gpu_types"], float(spec.get("gpus_per_worker", 1.0)), float(spec.get("max_workers", 1)))
            for n in rt.jobs
            for spec in [sc.job_spec(n, "")]
        },
        lost_steps_by_job=lost,
    )
    return RunResult(system.name, figures, samples, events, load.summary(), summaries, timings, records)


def _diff(prev: Sample | None, s: Sample, emit: Callable[[str], None], events: list[TimelineEvent]) -> None:
    """Turns what changed between two samples into event lines (the same for every system)."""
    if prev is None:
        return
    if s.replicas_running != prev.replicas_running:
        where = ", ".join(f"{t} {n:g}" for t, n in sorted(s.serving_gpus.items()))
        line = f"service: {prev.replicas_running} -> {s.replicas_running} replicas running ({where})"
        emit(line)
        events.append(TimelineEvent(s.t_s, "replicas", "service", line))
    for job in sorted(set(s.job_workers) | set(prev.job_workers)):
        a, b = prev.job_workers.get(job, 0), s.job_workers.get(job, 0)
        if a != b:
            where = s.job_gpu_type.get(job) or prev.job_gpu_type.get(job) or "-"
            granted = sum((s.grants.get(job) or {}).values())
            idle = " (restarting its worker group at its new size)" if granted else " (waiting for GPUs)"
            line = f"{job}: {a} -> {b} workers" + (f" on {where}" if b else idle)
            emit(line)
            events.append(TimelineEvent(s.t_s, "workers", job, line))


def _arbiter_events(
    rt: DemoRuntime,
    since_wall: float,
    load_wall: float,
    seen: int,
    emit: Callable[[str], None],
    events: list[TimelineEvent],
) -> int:
    """Emits the arbiter's events after the first ``seen`` ones since ``since_wall``; returns the new count."""
    try:
        evs = rt.arbiter_events(since_wall)
    except Exception as e:  # the arbiter is busy: next time
        logger.debug("arbiter events not read: %r", e)
        return seen
    for e in evs[seen:]:
        if e["kind"] not in ("shrink", "grow", "released", "forced", "reclaim"):
            continue
        d = e.get("detail") or {}
        if e["kind"] in ("shrink", "grow"):
            text = f"arbiter: {e['kind']} {e['workload']} {_alloc(d.get('from'))} -> {_alloc(d.get('to'))}"
        elif e["kind"] == "released":
            text = f"arbiter: {e['workload']} released its GPUs ({d.get('reclaim_s', 0):.1f} s after the decision)"
        elif e["kind"] == "reclaim":
            text = f"arbiter: reclaim {d.get('units')} {d.get('gpu_type')} from {e['workload']} for {d.get('recipient')}"
        else:
            text = f"arbiter: {e['workload']} stopped by force (held {d.get('held')})"
        emit(text)
        events.append(TimelineEvent(e["t_s"] - load_wall, e["kind"], e["workload"], text))
    return len(evs)


def _alloc(d: Any) -> str:
    if not d:
        return "{}"
    return "{" + ", ".join(f"{k} {v}" for k, v in sorted(d.items())) + "}"
