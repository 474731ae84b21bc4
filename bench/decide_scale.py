"""How long one arbiter decision takes as the cluster grows to 100,000 GPUs, and behind a long queue.

Clusters of four GPU types (H100, H200, A100, RTX4090) with 8 GPUs a node; 20 training jobs and 2
services per 100 GPUs; service demand and job demand change between ticks (a random walk, seeded).
Each timed tick is the whole of ``ResourceArbiter.tick()``: snapshot, guarded Tidal policy, planner.

The ``queue`` case is the simulator's hard moment (a burst of Philly jobs): 2,048 GPUs, 3,000 training
jobs that cannot all start (most wait, at several priorities, so a waiting job may preempt), jobs
finishing and new ones arriving between ticks so that the queue stays long.

Writes ``bench/results/decide_scale.json``: one row per case, ``{"case", "gpus", "jobs", "services",
"waiting", "median_ms", "p99_ms", "median_cpu_ms", "p99_cpu_ms", "ticks", "allocation_ratio"}``
(``waiting``: jobs with no grant after the last tick).

Run: ``python bench/decide_scale.py [--sizes 1000,10000,100000] [--queue-jobs 3000] [--ticks N]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from tidal.cluster.arbiter import ArbiterConfig, FakeBackend, ManualClock, ResourceArbiter
from tidal.cluster.model import NodeSnapshot, ServiceSpec, TrainingJobSpec
from tidal.policies.config import build_policy, parse_policy_config

TYPES = ("H100", "H200", "A100", "RTX4090")


def build(gpus: int, seed: int) -> tuple[ResourceArbiter, ManualClock, list, list]:
    rng = random.Random(seed)
    nodes = [NodeSnapshot(f"n{i}", TYPES[i % 4], 8) for i in range(gpus // 8)]
    clock = ManualClock()
    policy = build_policy(parse_policy_config({"guards": {"job_resize_min_interval_s": 30}}))
    arb = ResourceArbiter(policy, FakeBackend(nodes), clock)
    num_jobs, num_services = gpus * 20 // 100, gpus * 2 // 100
    services = []
    for i in range(num_services):
        prefs = tuple(rng.sample(TYPES, k=rng.randint(1, 4)))
        spec = ServiceSpec(f"svc-{i}", rng.choice([0.5, 1.0, 1.0, 2.0]), 1, 16, prefs, priority=100)
        arb.register(spec)
        services.append(spec)
    jobs = []
    for i in range(num_jobs):
        prefs = tuple(rng.sample(TYPES, k=rng.randint(1, 3)))
        g = rng.choice([1.0, 1.0, 2.0, 4.0, 8.0])
        lo = rng.randint(1, 2)
        spec = TrainingJobSpec(f"job-{i}", g, lo, lo + rng.randint(0, 6), prefs, priority=rng.randint(0, 20))
        arb.register(spec)
        jobs.append(spec)
    return arb, clock, services, jobs


def run(gpus: int, ticks: int, seed: int) -> dict:
    rng = random.Random(seed + 1)
    arb, clock, services, jobs = build(gpus, seed)
    demand = {s.name: rng.randint(0, 8) for s in services}

    def between_ticks(_: int) -> None:
        for s in services:
            demand[s.name] = max(0, min(s.max_replicas, demand[s.name] + rng.randint(-2, 3)))
            arb.heartbeat(s.name, demand_units=demand[s.name], held=arb.grant_of(s.name).grant)
        for j in jobs:
            arb.heartbeat(j.name, held=arb.grant_of(j.name).grant, seconds_since_checkpoint=rng.random() * 600)
        clock.advance(5.0)

    return {"case": "scale", **_timed(arb, between_ticks, ticks)}


def run_queue(gpus: int, num_jobs: int, ticks: int, seed: int) -> dict:
    """``num_jobs`` training jobs on ``gpus`` GPUs: most wait; some finish and new ones arrive each tick."""
    rng = random.Random(seed)
    nodes = [NodeSnapshot(f"n{i}", TYPES[i % 4], 8) for i in range(gpus // 8)]
    clock = ManualClock()
    policy = build_policy(parse_policy_config({}))
    # Ticks are a simulated minute apart; registrations must outlive that.
    arb = ResourceArbiter(policy, FakeBackend(nodes), clock, ArbiterConfig(registration_ttl_s=3600.0))
    services = []
    for i in range(max(1, gpus // 100)):
        prefs = tuple(rng.sample(TYPES, k=rng.randint(1, 3)))
        spec = ServiceSpec(f"svc-{i}", rng.choice([0.5, 1.0, 2.0]), 1, 32, prefs, priority=100)
        arb.register(spec, demand_units=2)
        services.append(spec)
    jobs: list[TrainingJobSpec] = []

    def arrive() -> None:
        prefs = tuple(rng.sample(TYPES, k=rng.randint(1, 4)))
        g = rng.choice([1.0, 1.0, 1.0, 2.0, 4.0, 8.0])
        lo = rng.choice([1, 1, 2, 4])
        spec = TrainingJobSpec(
            f"job-{len(jobs)}", g, lo, lo + rng.randint(0, 4), prefs, priority=rng.choice([0, 5, 10, 10, 20])
        )
        arb.register(spec, demand_units=spec.max_workers)
        jobs.append(spec)

    for _ in range(num_jobs):
        arrive()
    demand = {s.name: 2 for s in services}
    live = {j.name for j in jobs}

    def between_ticks(k: int) -> None:
        for s in services:
            demand[s.name] = max(0, min(s.max_replicas, demand[s.name] + rng.randint(-3, 4)))
            arb.heartbeat(s.name, demand_units=demand[s.name], held=arb.grant_of(s.name).grant)
        finished = 0
        for name in sorted(live):
            grant = arb.grant_of(name).grant
            if grant and rng.random() < 0.05:
                arb.unregister(name)
                live.discard(name)
                finished += 1
                continue
            arb.heartbeat(name, held=grant, seconds_since_checkpoint=rng.random() * 600)
        for _ in range(finished):
            arrive()
            live.add(jobs[-1].name)
        clock.advance(60.0)

    row = _timed(arb, between_ticks, ticks)
    row["waiting"] = sum(1 for name in live if not arb.grant_of(name).grant)
    return {"case": "queue", **row}


def _timed(arb: ResourceArbiter, between_ticks: Callable[[int], None], ticks: int) -> dict:
    # Three warm-up ticks: grants settle, workloads follow their grants.
    times, cpu_times = [], []
    for k in range(ticks + 3):
        between_ticks(k)
        t0, c0 = time.perf_counter(), time.process_time()
        arb.tick()
        dt, dc = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
        if k >= 3:
            times.append(dt)
            cpu_times.append(dc)
    status = arb.status()
    kinds = [w["kind"] for w in status["workloads"]]
    return {
        "gpus": int(sum(status["capacity"].values())),
        "jobs": kinds.count("training"),
        "services": kinds.count("service"),
        "median_ms": round(statistics.median(times), 2),
        "p99_ms": round(_p99(times), 2),
        # CPU time of the tick: on a shared, noisy machine it shows the cost without the waiting.
        "median_cpu_ms": round(statistics.median(cpu_times), 2),
        "p99_cpu_ms": round(_p99(cpu_times), 2),
        "ticks": len(times),
        "allocation_ratio": round(status["allocation_ratio"], 4),
    }


def _p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000", help="cluster sizes in GPUs, comma-separated")
    ap.add_argument("--queue-jobs", type=int, default=3000, help="jobs of the queue case (0: skip it)")
    ap.add_argument("--queue-gpus", type=int, default=2048)
    ap.add_argument("--ticks", type=int, default=0, help="timed ticks per case (default: 30, 15, 7 by size)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default="bench/results/decide_scale.json")
    args = ap.parse_args()
    rows = []
    for gpus in (int(s) for s in args.sizes.split(",") if s):
        ticks = args.ticks or (30 if gpus <= 1000 else 15 if gpus <= 10000 else 7)
        rows.append(run(gpus, ticks, args.seed))
        print(json.dumps(rows[-1]))
    if args.queue_jobs:
        rows.append(run_queue(args.queue_gpus, args.queue_jobs, args.ticks or 30, args.seed))
        print(json.dumps(rows[-1]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
