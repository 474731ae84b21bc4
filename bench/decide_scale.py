"""How long one arbiter decision takes as the cluster grows to 100,000 GPUs.

Clusters of four GPU types (H100, H200, A100, RTX4090) with 8 GPUs a node; 20 training jobs and 2
services per 100 GPUs; service demand and job demand change between ticks (a random walk, seeded).
Each timed tick is the whole of ``ResourceArbiter.tick()``: snapshot, guarded Tidal policy, planner.

Writes ``bench/results/decide_scale.json``: one row per size,
``{"gpus", "jobs", "services", "median_ms", "p99_ms", "median_cpu_ms", "ticks", "allocation_ratio"}``.

Run: ``python bench/decide_scale.py [--sizes 1000,10000,100000] [--ticks N]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from cluster.arbiter import FakeBackend, ManualClock, ResourceArbiter
from cluster.model import NodeSnapshot, ServiceSpec, TrainingJobSpec
from policies.config import build_policy, parse_policy_config

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
    # Warm-up: let grants settle, workloads follow their grants.
    times, cpu_times = [], []
    for k in range(ticks + 3):
        for s in services:
            demand[s.name] = max(0, min(s.max_replicas, demand[s.name] + rng.randint(-2, 3)))
            arb.heartbeat(s.name, demand_units=demand[s.name], held=arb.grant_of(s.name).grant)
        for j in jobs:
            arb.heartbeat(j.name, held=arb.grant_of(j.name).grant, seconds_since_checkpoint=rng.random() * 600)
        clock.advance(5.0)
        t0, c0 = time.perf_counter(), time.process_time()
        arb.tick()
        dt, dc = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
        if k >= 3:
            times.append(dt)
            cpu_times.append(dc)
    times.sort()
    p99 = times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))]
    status = arb.status()
    return {
        "gpus": gpus,
        "jobs": len(jobs),
        "services": len(services),
        "median_ms": round(statistics.median(times), 2),
        "p99_ms": round(p99, 2),
        # CPU time of the tick: on a shared, noisy machine it shows the cost without the waiting.
        "median_cpu_ms": round(statistics.median(cpu_times), 2),
        "ticks": len(times),
        "allocation_ratio": round(status["allocation_ratio"], 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000", help="cluster sizes in GPUs, comma-separated")
    ap.add_argument("--ticks", type=int, default=0, help="timed ticks per size (default: 30, 15, 7 by size)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default="bench/results/decide_scale.json")
    args = ap.parse_args()
    rows = []
    for gpus in (int(s) for s in args.sizes.split(",")):
        ticks = args.ticks or (30 if gpus <= 1000 else 15 if gpus <= 10000 else 7)
        row = run(gpus, ticks, args.seed)
        print(json.dumps(row))
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
