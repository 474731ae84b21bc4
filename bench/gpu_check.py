"""The GPU check of issue 23: the CUDA paths' tests, then a short resize of a Tidal job on one real GPU.

    python bench/gpu_check.py [--output bench/results/gpu_check.json] [--allow-cpu]

1. ``pytest -m gpu tests/gpu``: bf16 autocast in the built-in step, NCCL picked for workers that see CUDA and a
   one-rank NCCL group answering the yield's all-reduce, Ray's CUDA device manager kept (they skip without CUDA,
   and the JSON says so: a skip is never reported as a pass).
2. On a local Ray cluster of one node with one GPU, labelled with the device's type: the arbiter, Tidal's digits
   job (``ray job submit -- python -m tidal.training.run``, one worker). Once it trains, a priority-100 service
   wants the GPU: the job yields at a step boundary, reports a checkpoint and its controller waits holding
   nothing; the service leaves, and the job trains again from that checkpoint and runs to its end. Recorded:
   the device the workers trained on, decision -> GPU released, service gone -> training again, steps lost,
   and the job's summary.

Without CUDA, step 2 runs only with ``--allow-cpu`` (logical GPU, CPU and gloo: how this script was checked on
a machine without a GPU), and the JSON says ``"cuda": false``. Exit code 0 when every check that ran passed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parent.parent
SERVICE = "gpu-check-service"
JOB = "gpu-check"
POLICY = {"policy": "tidal", "guards": {"service_downscale_delay_s": 0, "job_resize_min_interval_s": 0}}

logger = logging.getLogger("bench.gpu_check")


def gpu_label(device_name: str) -> str:
    """A ``ray.io/accelerator-type`` value for a CUDA device name: ``"NVIDIA H100 80GB HBM3"`` -> ``"H100"``."""
    for known in ("H200", "H100", "A100", "L40S", "L4", "A10G", "RTX4090"):
        if known in device_name.replace(" ", ""):
            return known
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-") or "GPU"


def run_gpu_tests() -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-rA", "-p", "no:cacheprovider"],
        cwd=PROJECT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", out.stdout.splitlines()[-1])}
    return {"rc": out.returncode, "counts": counts, "tail": out.stdout[-3000:]}


def wait_for(pred: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def resize_check(label: str, steps: int, timeout_s: float) -> dict[str, Any]:
    """Step 2 of the module docstring, on a cluster of its own (stopped before it returns)."""
    import ray
    from tidal.cluster.actor import get_or_create_arbiter
    from tidal.cluster.client import ArbiterClient
    from tidal.cluster.cluster_spec import parse_cluster_spec
    from tidal.cluster.local import LocalCluster
    from tidal.cluster.model import ServiceSpec

    spec = parse_cluster_spec({
        "head": {"num_cpus": 1, "object_store_memory_mb": 150},
        "node_groups": [{"gpu_type": label, "count": 1, "num_gpus": 1, "num_cpus": 2, "object_store_memory_mb": 200}],
        "preload_python_modules": ["torch"],
    }, "gpu_check")  # fmt: skip
    cluster = LocalCluster(spec)
    storage = Path(tempfile.mkdtemp(prefix="tidal-gpu-check-"))
    cluster.start()
    try:
        cluster.activate()
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
        arbiter = get_or_create_arbiter(config=POLICY)
        job_spec = {
            "name": JOB, "model": {"class": "tidal.training.models:DigitsMLP", "kwargs": {"hidden": 128}},
            "data": {"factory": "tidal.training.data:digits"}, "gpu_types": [label], "min_workers": 1,
            "max_workers": 1, "global_batch_size": 64, "steps": steps, "lr": 0.003, "checkpoint_every_steps": 50,
            "report_every_steps": 5, "yield_grace_s": 30, "resize_min_interval_s": 0, "storage_path": str(storage),
            "fault_injection": {"step_delay_s": 0.05},
        }  # fmt: skip
        (storage / "job.yaml").write_text(yaml.safe_dump(job_spec))
        env = {**os.environ, **cluster.env()}
        env.pop("RAY_ADDRESS", None)
        sid = f"{JOB}-{int(time.time())}"
        subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", "--no-wait", "--submission-id", sid,
             "--working-dir", str(PROJECT), "--", "python", "-m", "tidal.training.run", str(storage / "job.yaml")],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip

        def progress() -> dict[str, Any]:
            w = next((w for w in ray.get(arbiter.status.remote())["workloads"] if w["name"] == JOB), None)
            return dict(w["progress"]) if w else {}

        before = wait_for(
            lambda: (p := progress()).get("training") and (p.get("checkpoint_step") or 0) >= 50 and p,
            timeout_s, "the job training past its first checkpoint",
        )  # fmt: skip
        client = ArbiterClient()
        client.register(ServiceSpec(SERVICE, 1.0, 1, 1, (label,), priority=100))
        stop = threading.Event()

        def keep_wanting() -> None:  # the service's heartbeat: it wants the GPU until it leaves
            while not stop.wait(0.5):
                client.heartbeat(SERVICE, demand_units=1, held={})

        beat = threading.Thread(target=keep_wanting, daemon=True)
        since = time.time()
        client.heartbeat(SERVICE, demand_units=1, held={})
        beat.start()
        wait_for(lambda: progress().get("workers") == 0, timeout_s, "the job releasing its GPU")
        events = ray.get(arbiter.events.remote(since))
        released = next((e for e in events if e["kind"] == "released" and e["workload"] == JOB), None)
        stopped = progress()
        stop.set()
        beat.join(timeout=5)
        client.unregister(SERVICE)
        left = time.monotonic()
        again = wait_for(lambda: (p := progress()).get("training") and p, timeout_s, "the job training again")
        back_s = time.monotonic() - left
        from ray.job_submission import JobSubmissionClient

        jobs = JobSubmissionClient(cluster.dashboard_url)
        status = wait_for(
            lambda: (s := str(jobs.get_job_status(sid).value)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
            timeout_s, "the job to end",
        )  # fmt: skip
        summary_path = storage / JOB / "tidal" / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        return {
            "job_status": status,
            "device": (summary.get("metrics") or {}).get("device"),
            "decision_to_release_s": (released or {}).get("detail", {}).get("reclaim_s"),
            "service_gone_to_training_s": back_s,
            "step_at_stop": stopped.get("step"),
            "resumed_from": again.get("resumed_from"),
            "checkpoint_step_before": before.get("checkpoint_step"),
            "steps_lost": summary.get("steps_lost"),
            "finished": summary.get("finished"),
            "groups": [(g.get("num_workers"), g.get("gpu_type")) for g in summary.get("groups", [])],
            "resizes": [(r.get("reason"), r.get("forced")) for r in summary.get("resizes", [])],
            "log_tail": jobs.get_job_logs(sid)[-2000:] if status != "SUCCEEDED" else "",
        }
    finally:
        ray.shutdown()
        cluster.stop()
        cluster.cleanup()
        shutil.rmtree(storage, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default=str(PROJECT / "bench" / "results" / "gpu_check.json"))
    p.add_argument("--allow-cpu", action="store_true", help="run the resize on a logical GPU where there is no CUDA")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--timeout-s", type=float, default=300.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else None
    result: dict[str, Any] = {"benchmark": "gpu_check", "cuda": cuda, "device_name": name, "tests": run_gpu_tests()}
    ok = result["tests"]["rc"] in (0, 5) and not result["tests"]["counts"].get("failed")
    if cuda or args.allow_cpu:
        label = gpu_label(name) if name else "H100"
        result["resize"] = resize_check(label, args.steps, args.timeout_s)
        r = result["resize"]
        ok = ok and r["job_status"] == "SUCCEEDED" and r["finished"] and r["steps_lost"] == 0
        ok = ok and r["resumed_from"] == r["step_at_stop"] and (not cuda or str(r["device"]).startswith("cuda"))
    else:
        result["resize"] = "not run: no CUDA device (--allow-cpu runs it on a logical GPU)"
    result["ok"] = bool(ok)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "tests"} | {"tests": result["tests"]["counts"]}, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
