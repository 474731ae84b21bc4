"""Loading the inputs of a simulation and running several policies on them (in parallel processes).

``prepare_inputs`` reads the cluster spec, the traces, the policy file and the simulator config, and
scales the inference load; ``run_policies`` runs one ``Simulator`` per policy, each in its own process
when there is more than one core, and reports progress through a callback.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import queue
import random
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tidal.cluster.cluster_spec import load_cluster_spec
from tidal.cluster.model import NodeSnapshot
from tidal.cluster.policy_file import PolicyFileModel
from tidal.cluster.sim.config import SimConfig
from tidal.cluster.sim.simulator import PolicyResult, SimInputs, Simulator, peak_multiplier
from tidal.cluster.sim.traces import (
    DAY_S,
    RateSeries,
    TraceError,
    TrainingJobRecord,
    load_inference_trace,
    load_training_trace,
)

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, float], None]


def cluster_nodes(path: str | Path) -> tuple[NodeSnapshot, ...]:
    """The nodes of a cluster spec YAML (the ``tidal up`` format), as the arbiter observes them."""
    spec = load_cluster_spec(path)
    nodes = tuple(NodeSnapshot(p.name, p.gpu_type, float(p.num_gpus)) for p in spec.nodes() if p.num_gpus > 0)
    if not nodes:
        raise ValueError(
            f"cluster spec {path}: node_groups has no GPU node; the simulator needs at least one"
        )
    return nodes


def prepare_inputs(
    *,
    nodes: Sequence[NodeSnapshot],
    training_trace: str | Path | None,
    inference_traces: Sequence[str | Path],
    policy_config: PolicyFileModel,
    sim_config: SimConfig,
    max_jobs: int | None = None,
) -> SimInputs:
    """Loads and scales the traces. See ``docs/simulator.md`` for the formats and the scaling rules.

    Horizon: ``sim_config.days`` if set, else whole days up to the last job submit (at least one day).
    Inference scaling: the rate is multiplied by the factor that makes the summed peak need
    ``inference_peak_share`` of the cluster (if set), and then by ``rate_multiplier`` (if set).
    """
    jobs: list = []
    if training_trace is not None:
        jobs = load_training_trace(
            training_trace, start_day=sim_config.start_day, days=sim_config.days, max_jobs=max_jobs
        )
    if sim_config.training_load != 1.0:
        jobs = replicate_jobs(jobs, sim_config.training_load, sim_config.training_jitter_s, sim_config.seed)
    if sim_config.days is not None:
        horizon = sim_config.days * DAY_S
    else:
        last = max((j.submit_s for j in jobs), default=0.0)
        horizon = max(1.0, math.ceil((last + 1.0) / DAY_S)) * DAY_S
    series: list[RateSeries] = []
    names: set[str] = set()
    for path in inference_traces:
        s = load_inference_trace(
            path, window_s=sim_config.request_window_s, repeat=sim_config.repeat_inference
        )
        name, k = s.name, 2
        while name in names:
            name, k = f"{s.name}-{k}", k + 1
        names.add(name)
        series.append(RateSeries(name, s.starts_s, s.rates_rps, s.period_s, s.repeat, s.cv))
    capacity: dict[str, float] = {}
    for n in nodes:
        capacity[n.gpu_type] = capacity.get(n.gpu_type, 0.0) + n.num_gpus
    factor = 1.0
    if series and sim_config.inference_peak_share is not None:
        factor = peak_multiplier(series, sim_config.service, capacity, sim_config.inference_peak_share)
    if sim_config.rate_multiplier is not None:
        factor *= sim_config.rate_multiplier
    if factor != 1.0:
        series = [s.scaled(factor) for s in series]
    for j in jobs:
        if j.gpu_type is not None and j.gpu_type not in capacity:
            raise TraceError(
                f"training trace {training_trace}: job {j.index} needs GPU type {j.gpu_type!r}, which the cluster "
                f"does not have; valid: {', '.join(sorted(capacity))}"
            )
    logger.info(
        "inputs: %d jobs over %.1f days, %d services (rate x%.3f, peak %.1f rps), %d nodes / %g GPUs",
        len(jobs),
        horizon / DAY_S,
        len(series),
        factor,
        sum(s.peak_rps() for s in series),
        len(nodes),
        sum(capacity.values()),
    )
    return SimInputs(tuple(nodes), tuple(jobs), tuple(series), policy_config, sim_config, horizon)


def replicate_jobs(
    jobs: Sequence[TrainingJobRecord], load: float, jitter_s: float, seed: int
) -> list[TrainingJobRecord]:
    """Scales the training load by replicating jobs: ``load`` 2.5 = every job twice, half of them a
    third time (seeded per job). A replica keeps the job's size, duration and type, and submits at a
    seeded offset in ``[-jitter_s, +jitter_s]`` (not before 0), so the time of day is kept. Jobs are
    then re-indexed in submit order.

    Example: 1,000 jobs at load 1.5 -> about 1,500 jobs, the same mix of sizes and durations.
    """
    out: list[tuple[float, int, int, TrainingJobRecord]] = []
    whole = math.floor(load)
    frac = load - whole
    for j in jobs:
        rng = random.Random(f"{seed}:replicate:{j.index}")
        copies = whole + (1 if rng.random() < frac else 0)
        for r in range(copies):
            t = j.submit_s if r == 0 else max(0.0, j.submit_s + rng.uniform(-jitter_s, jitter_s))
            out.append((t, j.index, r, j))
    out.sort(key=lambda x: (x[0], x[1], x[2]))
    return [
        TrainingJobRecord(i, t, j.duration_s, j.num_gpus, j.gpu_type, j.priority)
        for i, (t, _, _, j) in enumerate(out)
    ]


# ------------------------------------------------------------------------------------------- running

_PROGRESS_QUEUE: Any = None


def _init_worker(q: Any) -> None:
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = q


def _run_one(inputs: SimInputs, policy: str) -> PolicyResult:
    q = _PROGRESS_QUEUE

    def progress(fraction: float) -> None:
        if q is not None:
            q.put((policy, fraction))

    return Simulator(inputs, policy, progress).run()


def run_policies(
    inputs: SimInputs,
    policies: Sequence[str],
    *,
    processes: int | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, PolicyResult]:
    """Runs every policy on the same inputs; results by policy name, in the order given.

    With ``processes`` > 1 (default: the number of cores, at most one per policy) each policy runs in
    its own forked process; the simulation is deterministic either way.
    """
    n = processes if processes is not None else min(len(policies), os.cpu_count() or 1)
    if n <= 1 or len(policies) <= 1:
        results = {}
        for p in policies:
            results[p] = Simulator(inputs, p, (lambda f, p=p: progress(p, f)) if progress else None).run()
        return results
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    futures: dict[str, Future] = {}
    with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker, initargs=(q,)) as pool:
        for p in policies:
            futures[p] = pool.submit(_run_one, inputs, p)
        while not all(f.done() for f in futures.values()):
            try:
                name, fraction = q.get(timeout=0.2)
            except queue.Empty:
                continue
            if progress is not None:
                progress(name, fraction)
        results = {p: futures[p].result() for p in policies}
    while True:
        try:
            name, fraction = q.get_nowait()
        except (queue.Empty, OSError, ValueError):
            break
        if progress is not None:
            progress(name, fraction)
    if progress is not None:
        for p in policies:
            progress(p, 1.0)
    return results
