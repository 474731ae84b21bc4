"""Measures what a shrink costs an elastic training job, on a real local Ray cluster, on two paths side by
side in one run: ``runner`` (``tidal.training.run``: a new Ray Train controller per attempt) and ``trainer``
(``tidal.train.TidalTrainer`` running a user's Ray Train script, ``tests/training_ray/user_trainer_project``:
one controller for the job's life).

On the runner path, a digits job (submitted with ``ray job submit``) trains on 4 H100 workers under the real
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
- ``cpu_s``: CPU-seconds of every process of the cluster (``ClusterCpu``: psutil, by an environment mark
  they all inherit) from the shrink's start to the first step at the new size; ``steady_cpu_per_s`` is the
  cluster's rate while the job trains steadily, measured just before.

On the trainer path the same cycle runs; the steps' times come from rank 0's trace of the script.

Usage::

    .venv/bin/python bench/resize.py                      # starts its own local cluster (about 30 s)
    .venv/bin/python bench/resize.py --cycles 5 --output bench/results/resize.json
    .venv/bin/python bench/resize.py --paths trainer --spare-workers 4   # one path

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


def spares_up(workload: dict[str, Any] | None) -> bool:
    """Whether a job's spare workers are all started and idle, as its heartbeat's progress reports them."""
    p = (workload or {}).get("progress") or {}
    return bool(p.get("spares_wanted")) and p["spares_idle"] >= p["spares_wanted"]


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
    p.add_argument(
        "--paths",
        default="runner,trainer",
        help="which paths to measure, in this order, on one cluster: runner (the per-attempt runner, "
        "tidal.training.run), trainer (tidal.train.TidalTrainer, one controller)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import ray
    from tidal.cluster.cluster_spec import load_cluster_spec
    from tidal.cluster.local import LocalCluster

    # Every process of the cluster inherits this mark: the CPU sampler finds them by it.
    os.environ["TIDAL_BENCH_MARK"] = marker = f"resize-{os.getpid()}-{time.time_ns()}"
    load_before = os.getloadavg()
    cluster = LocalCluster(load_cluster_spec())
    cluster.start()
    storage = tempfile.mkdtemp(prefix="tidal-tr-bench-")
    cpu = ClusterCpu(marker)
    paths: dict[str, Any] = {}
    try:
        cluster.activate()
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
        for path in [x.strip() for x in args.paths.split(",") if x.strip()]:
            run = {"runner": run_cycles, "trainer": run_trainer_cycles}[path]
            paths[path] = run(cluster, storage, args, cpu)
    finally:
        cpu.close()
        ray.shutdown()
        cluster.stop()
        cluster.cleanup()
        shutil.rmtree(storage, ignore_errors=True)
    results = {
        "benchmark": "resize",
        "what": "a job on 4 H100 workers shrunk to 2 by a competitor service, then grown back; median over "
        "cycles; runner: tidal.training.run (a new Ray Train controller per attempt); trainer: "
        "tidal.train.TidalTrainer running a user's Ray Train script (one controller)",
        "command": " ".join(["python", "bench/resize.py", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "python": platform.python_version(),
            "ray": ray.__version__,
        },
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "spare_workers": args.spare_workers,
        "spare_control_workers": args.spare_control_workers,
        "summary": {k: v["summary"] for k, v in paths.items()},
        "paths": paths,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    logger.info("wrote %s", out)
    print(json.dumps(results["summary"], indent=2))
    return 0


class ClusterCpu:
    """CPU-seconds (user + system) of every process of the bench's cluster, sampled every ``period_s``.

    A cluster process is one whose environment carries ``marker`` (set in this process before the cluster
    starts: the GCS, raylets, Ray's agents, every worker, job drivers and Ray Train's actors inherit it).
    A process's last sample is kept after it exits, so a worker killed by a resize still counts (all but
    at most one period of its time).
    """

    def __init__(self, marker: str, period_s: float = 0.2) -> None:
        import psutil

        self._psutil = psutil
        self.marker = marker
        self.period_s = period_s
        self._members: dict[tuple[int, float], bool] = {}
        self._cpu: dict[tuple[int, float], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cluster-cpu")
        self._thread.start()

    def _is_member(self, proc: Any) -> bool:
        try:
            return proc.environ().get("TIDAL_BENCH_MARK") == self.marker
        except (self._psutil.Error, OSError):
            return False

    def _sample(self) -> None:
        for proc in self._psutil.process_iter(["pid", "create_time"]):
            key = (proc.info["pid"], proc.info["create_time"] or 0.0)
            member = self._members.get(key)
            if member is None:
                member = self._members[key] = self._is_member(proc)
            if not member:
                continue
            try:
                t = proc.cpu_times()
            except (self._psutil.Error, OSError):
                continue
            with self._lock:
                self._cpu[key] = t.user + t.system

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def total_s(self) -> float:
        self._sample()
        with self._lock:
            return sum(self._cpu.values())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Competitor:
    """A service of priority 100 asking for 2 H100s, heartbeating; ``take()`` places their placement group."""

    def __init__(self, client: Any) -> None:
        from tidal.cluster.model import ServiceSpec

        self.client = client
        self.client.register(ServiceSpec(COMPETITOR, 1.0, 2, 2, ("H100",), priority=100))
        self.stop = threading.Event()
        self.views: list[Any] = []  # the newest GrantView; the client is used from the beating thread only
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()
        self.pg: Any = None

    def _beat(self) -> None:
        while not self.stop.is_set():
            view = self.client.heartbeat_nowait(COMPETITOR, demand_units=2, held={})
            if view is not None:
                self.views[:] = [view]
            time.sleep(0.02)

    def take(self, timeout_s: float) -> tuple[float, float]:
        """Waits for the grant, then for a placement group on 2 H100s: (granted_s, usable_s)."""
        import ray
        from ray.util.placement_group import placement_group
        from tidal.cluster.model import GPU_TYPE_LABEL

        wait_for(
            lambda: self.views and self.views[0].grant.get("H100") >= 2,
            timeout_s,
            "the competitor's grant",
            0.02,
        )
        granted_s = time.time()
        self.pg = placement_group([{"GPU": 1.0}] * 2, bundle_label_selector=[{GPU_TYPE_LABEL: "H100"}] * 2)
        ray.get(self.pg.ready(), timeout=timeout_s)
        return granted_s, time.time()

    def leave(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self.pg is not None:
            remove_placement_group(self.pg)
        self.stop.set()
        self.thread.join()
        self.client.unregister(COMPETITOR)


def run_cycles(
    cluster: Any, storage: str, args: argparse.Namespace, cpu: ClusterCpu | None = None
) -> dict[str, Any]:
    """The per-attempt runner (``tidal.training.run``, the path before issue 23)."""
    import ray
    from tidal.cluster.actor import get_or_create_arbiter
    from tidal.cluster.client import ArbiterClient
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
            wait_for(lambda: spares_up(job()), args.timeout_s, "the job's spare workers idle")
        base = steady_cpu_rate(cpu)
        since = time.time()
        cpu0 = cpu.total_s() if cpu else None
        # 2. A competitor asks for 2 H100s, and takes them for real once granted.
        competitor = Competitor(client)
        granted_s, usable_s = competitor.take(args.timeout_s)
        events = ray.get(arbiter.events.remote(since))
        shrink = next(e for e in events if e["kind"] == "shrink" and e["workload"] == JOB_NAME)
        released = next((e for e in events if e["kind"] == "released" and e["workload"] == JOB_NAME), None)
        forced = any(e["kind"] == "forced" and e["workload"] == JOB_NAME for e in events)
        # 3. The job trains at 2: its first step there ends the no-training gap.
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
        cycle.update(cpu_of(cpu, cpu0, since, new["first_report_s"], base))
        cycle["steps_lost"] = (
            max(0, cycle["acked_step"] - cycle["resumed_step"]) if cycle["acked_step"] is not None else None
        )
        logger.info("runner cycle %d: %s", i, cycle)
        cycles.append(cycle)
        # 4. The competitor leaves; the job grows back.
        competitor.leave()

    subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "stop", sub_id], env=env, capture_output=True
    )
    wait_for(lambda: job() is None, args.timeout_s, "the runner's job to end")
    return summarize("runner", cycles, args)


TRAINER_PROJECT = PROJECT / "tests" / "training_ray" / "user_trainer_project"
TRAINER_JOB = "bench-resize-tt"


def run_trainer_cycles(
    cluster: Any, storage: str, args: argparse.Namespace, cpu: ClusterCpu | None = None
) -> dict[str, Any]:
    """``tidal.train.TidalTrainer`` (issue 23): a user's Ray Train script (the test's), one controller."""
    import ray
    from tidal.cluster.actor import get_or_create_arbiter
    from tidal.cluster.client import ArbiterClient

    arbiter = get_or_create_arbiter(config=POLICY)
    ray.get(arbiter.reload_config.remote(POLICY))
    client = ArbiterClient()
    trace = Path(storage) / "trainer-trace.jsonl"
    summary_path = Path(storage) / TRAINER_JOB / "tidal_summary.json"  # the policy's ledger
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(cluster.env())
    sub_id = f"bench-resize-tt-{int(time.time())}"
    subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--no-wait", "--submission-id", sub_id,
         "--working-dir", str(TRAINER_PROJECT), "--", "python", "my_train.py", "--name", TRAINER_JOB,
         "--storage", storage, "--steps", "1000000", "--step-delay-s", "0.05", "--trace", str(trace),
         "--spare-workers", str(args.spare_workers)],
        env=env, check=True, capture_output=True,
    )  # fmt: skip

    def job() -> dict[str, Any] | None:
        for w in ray.get(arbiter.status.remote())["workloads"]:
            if w["name"] == TRAINER_JOB:
                return w
        return None

    def rows() -> list[dict[str, Any]]:
        try:
            return [json.loads(line) for line in trace.read_text().splitlines() if line.endswith("}")]
        except FileNotFoundError:
            return []

    def training_at(n: int, after_s: float = 0.0) -> dict[str, Any] | None:
        j = job()
        if not j or j["held"].get("H100") != n or (j["progress"] or {}).get("workers") != n:
            return None
        return next((r for r in rows() if r["t"] > after_s and r["world_size"] == n), None)

    cycles = []
    for i in range(args.cycles):
        wait_for(
            lambda: training_at(4, time.time() - 1.0),
            args.timeout_s,
            "the trainer's job training on 4 workers",
        )
        if args.spare_workers:  # as on the runner path: the resize should meet its spares up
            wait_for(lambda: spares_up(job()), args.timeout_s, "the trainer's spare workers idle")
        base = steady_cpu_rate(cpu)
        since = time.time()
        cpu0 = cpu.total_s() if cpu else None
        competitor = Competitor(client)
        granted_s, usable_s = competitor.take(args.timeout_s)
        events = ray.get(arbiter.events.remote(since))
        shrink = next(e for e in events if e["kind"] == "shrink" and e["workload"] == TRAINER_JOB)
        released = next((e for e in events if e["kind"] == "released" and e["workload"] == TRAINER_JOB), None)
        first = wait_for(
            lambda since=since: training_at(2, since),
            args.timeout_s,
            "the trainer's job training on 2 workers",
        )
        before = [r for r in rows() if r["t"] <= first["t"] and r["world_size"] == 4]
        last = before[-1]
        cycle = {
            "cycle": i,
            "decision_to_release_s": released["detail"]["reclaim_s"] if released else None,
            "decision_to_grant_s": granted_s - shrink["t_s"],
            "decision_to_usable_s": usable_s - shrink["t_s"],
            "overhead_s": first["t"] - last["t"],
            "last_step": last["step"],
            "resumed_step": first["step"] - 1,
            "forced": False,
        }
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if summary.get("resizes"):
            cycle["forced"] = bool(summary["resizes"][-1].get("forced"))
            cycle["controller_actor_id"] = summary["controller"]["actor_id"]
        cycle.update(cpu_of(cpu, cpu0, since, first["t"], base))
        cycle["steps_lost"] = max(0, cycle["last_step"] - cycle["resumed_step"])
        logger.info("trainer cycle %d: %s", i, cycle)
        cycles.append(cycle)
        competitor.leave()

    subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "stop", sub_id], env=env, capture_output=True
    )
    wait_for(lambda: job() is None, args.timeout_s, "the trainer's job to end")
    out = summarize("trainer", cycles, args)
    out["summary"]["one_controller"] = len({c.get("controller_actor_id") for c in cycles}) == 1
    # Each worker group: its size and how many of its workers ran in spare processes started ahead.
    ledger = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    out["groups"] = [
        {k: g.get(k) for k in ("generation", "num_workers", "warm_workers", "started_s", "joined_s", "first_step_s")}
        for g in ledger.get("groups", [])
    ]
    out["resizes"] = ledger.get("resizes", [])  # the policy's timeline of each resize (wall-clock seconds)
    return out


def steady_cpu_rate(cpu: ClusterCpu | None, window_s: float = 5.0) -> float | None:
    """The cluster's CPU-seconds per second while the job trains steadily (the rate a resize adds to)."""
    if cpu is None:
        return None
    c0, t0 = cpu.total_s(), time.time()
    time.sleep(window_s)
    return (cpu.total_s() - c0) / (time.time() - t0)


def cpu_of(
    cpu: ClusterCpu | None, cpu0: float | None, t0: float, t1: float, base_rate: float | None
) -> dict[str, Any]:
    """CPU-seconds from the shrink's start to the first step at the new size: all of it, and beyond the
    steady training rate measured just before (what the resize itself cost)."""
    if cpu is None or cpu0 is None:
        return {"cpu_s": None, "cpu_s_beyond_steady": None}
    used = cpu.total_s() - cpu0
    beyond = used - base_rate * max(0.0, t1 - t0) if base_rate is not None else None
    return {"cpu_s": used, "cpu_s_beyond_steady": beyond, "steady_cpu_per_s": base_rate, "window_s": t1 - t0}


def summarize(path: str, cycles: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    def med(key: str) -> float | None:
        vals = [c[key] for c in cycles if c.get(key) is not None]
        return statistics.median(vals) if vals else None

    return {
        "path": path,
        "summary": {
            "cycles": len(cycles),
            "decision_to_release_s_median": med("decision_to_release_s"),
            "decision_to_grant_s_median": med("decision_to_grant_s"),
            "decision_to_usable_s_median": med("decision_to_usable_s"),
            "overhead_s_median": med("overhead_s"),
            "cpu_s_median": med("cpu_s"),
            "cpu_s_beyond_steady_median": med("cpu_s_beyond_steady"),
            "steps_lost_per_shrink": [c["steps_lost"] for c in cycles],
            "forced_stops": sum(bool(c["forced"]) for c in cycles),
            "restart_s_median": med("restart_s"),
        },
        "cycles": cycles,
    }


if __name__ == "__main__":
    sys.exit(main())
