"""Measures what a shrink costs an elastic training job, on a real local Ray cluster.

A digits job (``tidal.training.run``, submitted with ``ray job submit``) trains on 4 H100 workers under the real
arbiter. Each cycle, a high-priority competitor service asks for 2 H100s; the arbiter shrinks the job, the job
yields at a step boundary, checkpoints and restarts on 2; the competitor then *places* a placement group of
2 H100 GPUs (the proof that the GPUs are free). The competitor leaves and the job grows back to 4.

Per shrink it records:

- ``decision_to_release_s``: from the arbiter's shrink decision (its ``shrink`` event) to the job's
  heartbeat saying it let the GPUs go (the arbiter's ``released`` event, its reclaim time).
- ``decision_to_grant_s``: from the shrink decision to the competitor's grant (release before grant).
- ``decision_to_usable_s``: from the shrink decision to the competitor's placement group being ready on
  the freed GPUs (what a service waiting for them sees): "the GPUs are free".
- ``overhead_s``: seconds with no training: from the job's last step before the yield (its acknowledgement)
  to the first step of the restarted attempt; ``restart_s`` is the part spent starting the new attempt.
- ``steps_lost``: steps computed and thrown away (0 for a cooperative yield).

Usage::

    .venv/bin/python bench/resize.py                      # starts its own local cluster (about 30 s)
    .venv/bin/python bench/resize.py --cycles 5 --output bench/results/resize.json

Writes JSON; asserts nothing about time (numbers depend on the machine: see ``machine`` in the output).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("bench.resize")

JOB_NAME = "bench-resize"
COMPETITOR = "bench-resize-competitor"
POLICY = {"policy": "tidal", "guards": {"service_downscale_delay_s": 0, "job_resize_min_interval_s": 0}}


def job_yaml(storage: str, grace_s: float, spare_workers: int = 0, spare_control_workers: int = 0) -> str:
    return f"""
name: {JOB_NAME}
model: {{class: "tidal.training.models:DigitsMLP", kwargs: {{hidden: 64}}}}
data: {{factory: "tidal.training.data:digits"}}
gpu_types: [H100]
min_workers: 1
max_workers: 4
global_batch_size: 64
steps: 1000000
lr: 0.003
checkpoint_every_steps: 200
yield_grace_s: {grace_s}
resize_min_interval_s: 5
report_every_steps: 50
storage_path: {storage}
fault_injection: {{step_delay_s: 0.05}}
spare_workers: {spare_workers}
spare_control_workers: {spare_control_workers}
"""


def wait_for(pred: Any, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--grace-s", type=float, default=60.0)
    p.add_argument("--output", default=str(PROJECT / "bench" / "results" / "resize.json"))
    p.add_argument("--timeout-s", type=float, default=600.0, help="per wait")
    p.add_argument(
        "--spare-workers",
        type=int,
        default=0,
        help="the job's spare_workers (training/spares.py): restarts start in processes already up",
    )
    p.add_argument(
        "--spare-control-workers",
        type=int,
        default=0,
        help="the job's spare_control_workers: spares on the driver's node for Ray Train's controller and helpers",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import ray
    from tidal.cluster.cluster_spec import load_cluster_spec
    from tidal.cluster.local import LocalCluster

    cluster = LocalCluster(load_cluster_spec())
    cluster.start()
    storage = tempfile.mkdtemp(prefix="tidal-tr-bench-")
    results: dict[str, Any] = {}
    try:
        cluster.activate()
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
        results = run_cycles(cluster, storage, args)
    finally:
        ray.shutdown()
        cluster.stop()
        cluster.cleanup()
        shutil.rmtree(storage, ignore_errors=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    logger.info("wrote %s", out)
    print(json.dumps(results["summary"], indent=2))
    return 0


def run_cycles(cluster: Any, storage: str, args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from tidal.cluster.actor import get_or_create_arbiter
    from tidal.cluster.client import ArbiterClient
    from tidal.cluster.model import GPU_TYPE_LABEL, ServiceSpec
    from tidal.training.runner import NAMESPACE, signal_actor_name

    arbiter = get_or_create_arbiter(config=POLICY)
    ray.get(arbiter.reload_config.remote(POLICY))
    client = ArbiterClient()
    spec_path = Path(storage) / "job.yaml"
    spec_path.write_text(job_yaml(storage, args.grace_s, args.spare_workers, args.spare_control_workers))
    env = {**os.environ, **cluster.env()}
    sub_id = f"bench-resize-{int(time.time())}"
    subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--no-wait", "--submission-id", sub_id,
         "--working-dir", str(PROJECT), "--", "python", "-m", "tidal.training.run", str(spec_path)],
        env=env, check=True, capture_output=True,
    )  # fmt: skip

    def job() -> dict[str, Any] | None:
        for w in ray.get(arbiter.status.remote())["workloads"]:
            if w["name"] == JOB_NAME:
                return w
        return None

    def signal_snapshot() -> dict[str, Any]:
        try:
            handle = ray.get_actor(signal_actor_name(JOB_NAME), namespace=NAMESPACE)
        except ValueError:  # the job's runner has not started yet
            return {"progress": {}, "history": []}
        return ray.get(handle.snapshot.remote())

    cycles = []
    for i in range(args.cycles):
        # 1. The job trains at 4 for a while.
        wait_for(
            lambda: (s := signal_snapshot())["progress"].get("num_workers") == 4 and s.get("first_report_s")
            and (j := job()) and j["held"].get("H100") == 4,
            args.timeout_s, "the job training on 4 workers",
        )  # fmt: skip
        if args.spare_workers:
            # The restart should meet its spare workers up, not importing (training/spares.py).
            wait_for(
                lambda: (p := (job() or {}).get("progress") or {}).get("spares_wanted")
                and p["spares_idle"] >= p["spares_wanted"],
                args.timeout_s, "the job's spare workers idle",
            )  # fmt: skip
        time.sleep(2.0)
        since = time.time()
        # 2. A competitor asks for 2 H100s.
        client.register(ServiceSpec(COMPETITOR, 1.0, 2, 2, ("H100",), priority=100))
        stop = threading.Event()
        views: list[Any] = []  # the newest GrantView; the client is used from the beating thread only

        def beat(stop: threading.Event = stop, views: list[Any] = views) -> None:
            while not stop.is_set():
                view = client.heartbeat_nowait(COMPETITOR, demand_units=2, held={})
                if view is not None:
                    views[:] = [view]
                time.sleep(0.02)

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        wait_for(
            lambda views=views: views and views[0].grant.get("H100") >= 2,
            args.timeout_s, "the competitor's grant", interval_s=0.02,
        )  # fmt: skip
        granted_s = time.time()
        # 3. The competitor takes the GPUs for real.
        pg = placement_group([{"GPU": 1.0}] * 2, bundle_label_selector=[{GPU_TYPE_LABEL: "H100"}] * 2)
        ray.get(pg.ready(), timeout=args.timeout_s)
        usable_s = time.time()
        events = ray.get(arbiter.events.remote(since))
        shrink = next(e for e in events if e["kind"] == "shrink" and e["workload"] == JOB_NAME)
        released = next((e for e in events if e["kind"] == "released" and e["workload"] == JOB_NAME), None)
        forced = any(e["kind"] == "forced" and e["workload"] == JOB_NAME for e in events)
        # 4. The job trains at 2: its first step there ends the no-training gap.
        snap = wait_for(
            lambda: (s := signal_snapshot())["progress"].get("num_workers") == 2 and s.get("first_report_s") and s,
            args.timeout_s, "the job training on 2 workers",
        )  # fmt: skip
        hist = {h["attempt"]: h for h in snap["history"]}
        new, old = hist[snap["attempt"]], hist.get(snap["attempt"] - 1, {})
        cycle = {
            "cycle": i,
            "decision_to_release_s": released["detail"]["reclaim_s"] if released else None,
            "decision_to_grant_s": granted_s - shrink["t_s"],
            "decision_to_usable_s": usable_s - shrink["t_s"],
            "overhead_s": new["first_report_s"] - old["acked_s"] if "acked_s" in old else None,
            "restart_s": new["first_report_s"] - new["begun_s"],
            "acked_step": old.get("acked_step"),
            "resumed_step": new["first_step"] - 1,
            "forced": forced,
        }
        cycle["steps_lost"] = (
            max(0, cycle["acked_step"] - cycle["resumed_step"]) if cycle["acked_step"] is not None else None
        )
        logger.info("cycle %d: %s", i, cycle)
        cycles.append(cycle)
        # 5. The competitor leaves; the job grows back.
        remove_placement_group(pg)
        stop.set()
        beater.join()
        client.unregister(COMPETITOR)

    subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "stop", sub_id], env=env, capture_output=True)

    def med(key: str) -> float | None:
        vals = [c[key] for c in cycles if c[key] is not None]
        return statistics.median(vals) if vals else None

    return {
        "benchmark": "resize",
        "what": "digits job on 4 H100 workers shrunk to 2 by a competitor service, then grown back; median over cycles",
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "ray": ray.__version__,
        },
        "summary": {
            "cycles": len(cycles),
            "spare_workers": args.spare_workers,
            "spare_control_workers": args.spare_control_workers,
            "decision_to_release_s_median": med("decision_to_release_s"),
            "decision_to_grant_s_median": med("decision_to_grant_s"),
            "decision_to_usable_s_median": med("decision_to_usable_s"),
            "overhead_s_median": med("overhead_s"),
            "steps_lost_per_shrink": [c["steps_lost"] for c in cycles],
            "forced_stops": sum(c["forced"] for c in cycles),
            "restart_s_median": med("restart_s"),
        },
        "cycles": cycles,
    }


if __name__ == "__main__":
    sys.exit(main())
