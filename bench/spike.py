"""The spike benchmark: Tidal against Ray alone, on the same local cluster, in one run.

The scenario is the demo's (``demo/configs/demo-scenario.yaml``): one inference service (1 GPU per
replica, min 1, max 4, prefers RTX4090 > A100 > H100) and two elastic training jobs (priority 50 on H100s,
priority 5 on A100s) on 4 H100 + 2 A100 + 2 RTX4090 (logical GPUs), a base load that jumps 8x for a minute,
and the base load again. Measured, for each system:

1. **tidal**: the arbiter (``demo/configs/demo-policy.yaml``), Tidal's Serve autoscaling hook and Tidal's
   training jobs (``python -m tidal.training.run``: one ``TidalTrainer`` each), ``--runs`` times (time to capacity: median of the runs);
2. **ray-alone**: the same Serve deployment with Serve's default autoscaler (same min/max and targets) and
   the same training as plain Ray Train elastic jobs, ``ScalingConfig(num_workers=(min, max))``
   (``bench/spike_ray_alone_job.py``), no arbiter;
3. **serve on free GPUs** (reference): the same service and load with no training at all, Serve's default
   autoscaler: how long Serve itself takes to reach capacity when no reclaim is needed.

Every request is real HTTP to Serve; every job is submitted with ``ray job submit``. Results go to
``bench/results/spike.json`` (figures per system, per run, the SLO, the targets and whether they were met)
and a timeline PNG per system (``bench/results/spike-<system>.png``).

Usage::

    .venv/bin/python bench/spike.py                      # 3 Tidal runs, 1 Ray-alone, 3 free-GPU runs
    .venv/bin/python bench/spike.py --runs 1 --free-gpu-runs 1 --spike-s 40   # quicker
    # the spike on a cluster saturated by low-priority jobs' minimums (tests/e2e/test_saturated_spike.py)
    .venv/bin/python bench/spike.py --scenario demo/configs/saturated-scenario.yaml --ray-alone-runs 0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tidal.demo.scenario import DEFAULT_POLICY_PATH, load_scenario

ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("bench.spike")

RESULTS_DIR = Path(__file__).parent / "results"
GPU_TYPES = ["H100", "A100", "RTX4090"]
TARGETS = {
    "time_to_capacity_s_median_max": 10.0,
    "failed_requests_max": 0,
    "lost_steps_max": 0,
    "slo_attainment_min": 0.99,
    "gpus_back_to_training_s_max": 60.0,
    "training_goodput_min": 0.8,
    "post_spike_reclaims_max": 0,
    "time_to_capacity_vs_free_gpus_max_ratio": 1.5,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="Tidal runs (time to capacity: their median)")
    p.add_argument("--ray-alone-runs", type=int, default=1)
    p.add_argument("--free-gpu-runs", type=int, default=3, help="runs of Serve alone on free GPUs (reference)")
    p.add_argument("--scenario", default=None, help="scenario YAML (default: the demo's)")
    p.add_argument("--policy", default=str(DEFAULT_POLICY_PATH))
    p.add_argument("--pre-spike-s", type=float, default=None)
    p.add_argument("--spike-s", type=float, default=None)
    p.add_argument("--post-spike-s", type=float, default=None)
    p.add_argument("--out", default=str(RESULTS_DIR / "spike.json"))
    p.add_argument("--keep-work-dir", action="store_true")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for name in ("runs", "ray_alone_runs", "free_gpu_runs"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    scenario = load_scenario(args.scenario).with_overrides(
        pre_spike_s=args.pre_spike_s, spike_s=args.spike_s, post_spike_s=args.post_spike_s
    )
    # Serve on free GPUs only needs the spike's first part: how long until its replicas run.
    free_scenario = scenario.with_overrides(spike_s=min(scenario.load.spike_s, 30.0), post_spike_s=0.0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    from tidal.demo.run import run_system
    from tidal.demo.runtime import DemoRuntime, SystemConfig

    plan: list[tuple[str, int]] = (
        [("serve-only", i) for i in range(args.free_gpu_runs)]
        + [("tidal", i) for i in range(args.runs)]
        + [("ray-alone", i) for i in range(args.ray_alone_runs)]
    )
    results: dict[str, list[Any]] = {}
    stop = threading.Event()

    def on_sigterm(signum: int, frame: Any) -> None:
        # Like Ctrl-C: stop, write what was measured, and stop every process that was started.
        stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    t_start = time.monotonic()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    rt = DemoRuntime(scenario, policy_path=args.policy, keep_work_dir=args.keep_work_dir)
    failures: list[str] = []
    interrupted = False
    try:
        rt.start_cluster()
        rt.connect()
        for system_name, i in plan:
            system = SystemConfig.named(system_name)
            rt.scenario = free_scenario if system_name == "serve-only" else scenario
            rt.run_tag = f"{system_name}-{i}"
            logger.info("=== %s, run %d", system_name, i + 1)
            try:
                r = run_system(rt, system, stop=stop)
                results.setdefault(system_name, []).append(r)
                logger.info("=== %s run %d: %s", system_name, i + 1, _brief(r.figures))
                if i == 0:
                    _plot(r, rt.scenario, out.parent / f"spike-{system_name}.png")
            except KeyboardInterrupt:
                raise
            except Exception as e:
                logger.exception("%s run %d failed", system_name, i + 1)
                failures.append(f"{system_name} run {i + 1}: {e!r}")
            finally:
                rt.reset()
    except KeyboardInterrupt:
        logger.warning("interrupted: writing what was measured so far")
        interrupted = True
    finally:
        rt.close()
    leftovers = rt.leftover_processes()
    doc = build_report(results, scenario, args, started, time.monotonic() - t_start, failures, leftovers)
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(json.dumps({"out": str(out), **{k: _brief(v) for k, v in doc["systems"].items()}, "targets_met": doc["targets_met"]}, indent=1))
    if interrupted:
        return 130
    return 0 if not failures and not leftovers else 1


# ----------------------------------------------------------------------------------------- report


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One system's figures over its runs (see ``aggregation`` in the JSON for how each is combined)."""
    if not runs:
        return {}

    def med(key: str) -> float | None:
        vals = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    ttc = [r["time_to_capacity_s"] for r in runs]
    reached = [v for v in ttc if v is not None]
    requests = sum(r["requests"] for r in runs)
    good = sum((r["slo_attainment"] or 0.0) * r["requests"] for r in runs)
    back = [r["gpus_back_to_training_s"] for r in runs]
    return {
        # null unless at least half of the runs reached capacity: the median of "never" is never.
        "time_to_capacity_s": statistics.median(reached) if len(reached) * 2 > len(runs) else None,
        "time_to_capacity_s_median": statistics.median(reached) if len(reached) * 2 > len(runs) else None,
        "time_to_capacity_s_runs": ttc,
        "reclaim_s": med("reclaim_s"),
        "p50_ms": med("p50_ms"),
        "p99_ms": med("p99_ms"),
        "spike_p99_ms": med("spike_p99_ms"),
        "requests": requests,
        "failed_requests": sum(r["failed_requests"] for r in runs),
        "slo_attainment": good / requests if requests else None,
        "train_steps": med("train_steps"),
        "lost_steps": sum(r["lost_steps"] for r in runs),
        "gpu_allocation_ratio": med("gpu_allocation_ratio"),
        # Per run: the target holds in every run, so the worst one is the figure.
        "training_goodput": min((r["training_goodput"] for r in runs if r.get("training_goodput") is not None), default=None),
        "training_goodput_runs": [r.get("training_goodput") for r in runs],
        "post_spike_reclaims": max((r.get("post_spike_reclaims") or 0 for r in runs), default=0),
        "gpus_back_to_training_s": None if any(v is None for v in back) else max(back),
        "gpus_back_to_training_s_runs": back,
        "runs": len(runs),
    }


def build_report(
    results: dict[str, list[Any]],
    scenario: Any,
    args: argparse.Namespace,
    started: str,
    duration_s: float,
    failures: list[str],
    leftovers: set[int],
) -> dict[str, Any]:
    from tidal.cluster.policy_file import load_policy_file

    phases = scenario.phases()
    systems = {}
    for name in ("tidal", "ray-alone"):
        runs = [r.figures for r in results.get(name, [])]
        if runs:
            systems[name] = {**aggregate(runs), "per_run": runs, "timings_s": [r.timings for r in results[name]]}
    free_runs = [r.figures for r in results.get("serve-only", [])]
    free = {**aggregate(free_runs), "per_run": free_runs} if free_runs else {}
    tidal = systems.get("tidal", {})
    ratio = None
    if tidal.get("time_to_capacity_s") is not None and free.get("time_to_capacity_s"):
        ratio = tidal["time_to_capacity_s"] / free["time_to_capacity_s"]
    met = {}
    if tidal:
        met = {
            "time_to_capacity_s_median <= 10": tidal["time_to_capacity_s"] is not None
            and tidal["time_to_capacity_s"] <= TARGETS["time_to_capacity_s_median_max"],
            "failed_requests == 0": tidal["failed_requests"] == 0,
            "lost_steps == 0": tidal["lost_steps"] == 0,
            "slo_attainment >= 0.99": (tidal["slo_attainment"] or 0) >= TARGETS["slo_attainment_min"],
            "gpus_back_to_training_s <= 60": tidal["gpus_back_to_training_s"] is not None
            and tidal["gpus_back_to_training_s"] <= TARGETS["gpus_back_to_training_s_max"],
            "training_goodput >= 0.8 in every run": tidal["training_goodput"] is not None
            and tidal["training_goodput"] >= TARGETS["training_goodput_min"],
            "post_spike_reclaims == 0": tidal["post_spike_reclaims"] <= TARGETS["post_spike_reclaims_max"],
            "time_to_capacity within 1.5x of Serve on free GPUs": ratio is not None
            and ratio <= TARGETS["time_to_capacity_vs_free_gpus_max_ratio"],
        }
    return {
        "benchmark": "spike",
        "command": " ".join([".venv/bin/python bench/spike.py", *args.argv]),
        "started": started,
        "duration_s": duration_s,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "gpus": "none: logical GPUs (ray start --num-gpus) labelled ray.io/accelerator-type",
            "load_average_1m_at_end": os.getloadavg()[0],
        },
        "cluster": {"H100": 4, "A100": 2, "RTX4090": 2},
        "scenario": scenario.model_dump(),
        "policy": load_policy_file(args.policy).model_dump(),
        "phases_s": {"spike_start": phases.spike_start_s, "spike_end": phases.spike_end_s, "end": phases.end_s},
        "slo": {
            "latency_ms": scenario.load.slo_ms,
            "definition": "a request meets the SLO if it returns 2xx within slo latency_ms, measured from its "
            "scheduled send time (open loop); slo_attainment = such requests / all requests sent",
        },
        "definitions": {
            "time_to_capacity_s": "spike start -> first sample with replicas_needed replicas RUNNING (Serve's "
            "replica states), null if never within the spike; median over runs (null if fewer than half reached it)",
            "reclaim_s": "arbiter shrink decision -> the job's heartbeat shows the GPUs free (arbiter 'released' "
            "event), median over the reclaims from training jobs during the load",
            "gpu_allocation_ratio": "GPU-seconds held by Serve replicas and Ray Train workers (Ray's actor table) "
            "over GPU-seconds that exist, during the load",
            "gpus_back_to_training_s": "spike end -> first sample where training holds as many GPUs as just "
            "before the spike (max over runs)",
            "lost_steps": "steps computed and thrown away by restarts from a checkpoint (the trainers' ledgers, and "
            "steps seen to go backwards), summed over runs",
            "train_steps": "steps made by both jobs during the load (median over runs)",
        },
        "targets": TARGETS,
        "systems": systems,
        "serve_on_free_gpus": free,
        "tidal_time_to_capacity_vs_free_gpus": ratio,
        "targets_met": met,
        "failures": failures,
        "leftover_processes": sorted(leftovers),
    }


def _brief(f: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "time_to_capacity_s", "reclaim_s", "p50_ms", "p99_ms", "requests", "failed_requests", "slo_attainment",
        "train_steps", "lost_steps", "gpu_allocation_ratio", "gpus_back_to_training_s",
    )  # fmt: skip
    return {k: (round(f[k], 3) if isinstance(f.get(k), float) else f.get(k)) for k in keys if k in f}


def _plot(result: Any, scenario: Any, path: Path) -> None:
    from tidal.demo.plot import plot_timeline

    try:
        phases = scenario.phases()
        plot_timeline(
            result.samples, phases, path,
            title=f"{result.system}: {phases.spike_rps / phases.base_rps:g}x spike (bench/spike.py)",
            slo_ms=scenario.load.slo_ms, gpu_types=GPU_TYPES, events=result.events,
        )  # fmt: skip
    except Exception:
        logger.exception("could not plot %s", path)


if __name__ == "__main__":
    sys.exit(main())
