"""Measures what a shrink costs an elastic training job under the arbiter, on a real local Ray cluster.

Two paths run side by side on one cluster, both one ``tidal.training.trainer.TidalTrainer`` (one Ray Train
controller for the job's life):

- ``job``: Tidal's built-in digits job, ``ray job submit ... -- python -m tidal.training.run JOB.yaml`` (the
  built-in loop ``tidal.training.loop``);
- ``trainer``: a user's Ray Train script under ``TidalTrainer`` (``tests/training_ray/user_trainer_project``).

On each path the job trains on 4 H100 workers under the real arbiter. Each cycle, a high-priority competitor
service asks for 2 H100s; the arbiter shrinks the job, the job yields at a step boundary, checkpoints, and the
trainer starts a new worker group of 2; the competitor then *places* a placement group of 2 H100 GPUs (the
proof that the GPUs are free). The competitor leaves and the job grows back to 4. With ``--spare-workers``,
each cycle first waits for the job's spare workers to be up (``spares_up``: its heartbeat's progress).

Both paths are measured the same way (``measure_shrinks``): the arbiter's events and the job's heartbeat
progress while the cycle runs, and the trainer's ledger (``tidal_summary.json``, its scaling policy's groups
and resizes, in ``<storage>/<run name>/``) for the steps' times. Per shrink it records:

- ``decision_to_release_s``: from the arbiter's shrink decision (its ``shrink`` event) to the job's
  heartbeat saying it let the GPUs go (the arbiter's ``released`` event, its reclaim time).
- ``decision_to_grant_s``: from the shrink decision to the competitor's grant (release before grant).
- ``decision_to_usable_s``: from the shrink decision to the competitor's placement group being ready on
  the freed GPUs (what a service waiting for them sees): "the GPUs are free".
- ``overhead_s``: seconds with no training: from rank 0's last step before the yield to its first step in
  the new worker group (the ledger); ``restart_s`` is the part from the new group's start to that step.
- ``last_step``, ``resumed_step``, ``steps_lost``: the last step before the yield, the checkpoint step the new
  group resumed from, and the steps computed and thrown away (0 for a cooperative yield).
- ``cpu_s``: CPU-seconds of every process of the cluster (``ClusterCpu``: psutil, by an environment mark
  they all inherit) from the shrink's start until the job's progress says it trains at the new size;
  ``steady_cpu_per_s`` is the cluster's rate while the job trains steadily, measured just before.

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


def job_yaml(storage: str, grace_s: float, spare_workers: int = 0) -> str:
    # report_every_steps: 5, as the user's script reports: the job's progress says it trains a few steps
    # after its first one, on both paths alike.
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
report_every_steps: 5
storage_path: {storage}
fault_injection: {{step_delay_s: 0.05}}
spare_workers: {spare_workers}
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
    p.add_argument("--grace-s", type=float, default=60.0, help="the job path's yield_grace_s")
    p.add_argument("--output", default=str(PROJECT / "bench" / "results" / "resize.json"))
    p.add_argument("--timeout-s", type=float, default=600.0, help="per wait")
    p.add_argument(
        "--spare-workers",
        type=int,
        default=0,
        help="the job's spare_workers (training/spares.py): restarts start in processes already up",
    )
    p.add_argument(
        "--paths",
        default="job,trainer",
        help="which paths to measure, in this order, on one cluster: job (Tidal's built-in digits job, "
        "python -m tidal.training.run), trainer (a user's Ray Train script under tidal.train.TidalTrainer)",
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
            run = {"job": run_job_cycles, "trainer": run_trainer_cycles}[path]
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
        "cycles; both paths one TidalTrainer (one Ray Train controller); job: Tidal's built-in digits job "
        "(python -m tidal.training.run); trainer: a user's Ray Train script",
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


def run_job_cycles(
    cluster: Any, storage: str, args: argparse.Namespace, cpu: ClusterCpu | None = None
) -> dict[str, Any]:
    """Tidal's built-in digits job (``python -m tidal.training.run JOB.yaml``: a ``TidalTrainer`` around the
    built-in loop), submitted with ``ray job submit`` from the project's folder."""
    spec_path = Path(storage) / "job.yaml"
    spec_path.write_text(job_yaml(storage, args.grace_s, args.spare_workers))
    env = {**os.environ, **cluster.env()}
    entrypoint = ["python", "-m", "tidal.training.run", str(spec_path)]
    return measure_shrinks("job", JOB_NAME, PROJECT, entrypoint, env, storage, args, cpu)


TRAINER_PROJECT = PROJECT / "tests" / "training_ray" / "user_trainer_project"
TRAINER_JOB = "bench-resize-tt"


def run_trainer_cycles(
    cluster: Any, storage: str, args: argparse.Namespace, cpu: ClusterCpu | None = None
) -> dict[str, Any]:
    """A user's Ray Train script (the test's) under ``tidal.train.TidalTrainer``, submitted from its folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(cluster.env())
    entrypoint = [
        "python", "my_train.py", "--name", TRAINER_JOB, "--storage", storage, "--steps", "1000000",
        "--step-delay-s", "0.05", "--spare-workers", str(args.spare_workers),
    ]  # fmt: skip
    return measure_shrinks("trainer", TRAINER_JOB, TRAINER_PROJECT, entrypoint, env, storage, args, cpu)


def measure_shrinks(
    path: str,
    name: str,
    working_dir: Path,
    entrypoint: list[str],
    env: dict[str, str],
    storage: str,
    args: argparse.Namespace,
    cpu: ClusterCpu | None,
) -> dict[str, Any]:
    """Submits a ``TidalTrainer`` job registering as ``name`` (``ray job submit``), shrinks it ``args.cycles``
    times with a ``Competitor``, stops it; returns ``path``'s figures (``summarize``), its ledger's groups and
    resizes, and whether one controller ran every cycle.

    While a cycle runs it reads the arbiter (the shrink, the release, the job's held GPUs and heartbeat
    progress); the steps' times come from the trainer's ledger (``tidal_summary.json``) once the job has
    ended: the policy writes it as each worker group starts, and it notes a group's first step after that.
    """
    import ray
    from tidal.cluster.actor import get_or_create_arbiter
    from tidal.cluster.client import ArbiterClient
    from tidal.training.trainer_policy import SUMMARY_FILE

    arbiter = get_or_create_arbiter(config=POLICY)
    ray.get(arbiter.reload_config.remote(POLICY))
    client = ArbiterClient()
    ledger_path = Path(storage) / name / SUMMARY_FILE  # the policy's ledger (RunConfig(name, storage_path))
    ray_cli = str(Path(sys.executable).parent / "ray")
    sub_id = f"{name}-{int(time.time())}"
    subprocess.run(
        [ray_cli, "job", "submit", "--no-wait", "--submission-id", sub_id, "--working-dir", str(working_dir),
         "--", *entrypoint],
        env=env, check=True, capture_output=True,
    )  # fmt: skip

    def job() -> dict[str, Any] | None:
        for w in ray.get(arbiter.status.remote())["workloads"]:
            if w["name"] == name:
                return w
        return None

    def training_at(n: int) -> dict[str, Any] | None:
        """The job's heartbeat progress once it holds ``n`` H100s and a worker group of ``n`` has reported."""
        j = job() or {"held": {}}
        progress = j.get("progress") or {}
        training = j["held"].get("H100") == n and progress.get("workers") == n and progress.get("training")
        return progress if training else None

    cycles = []
    for i in range(args.cycles):
        # 1. The job trains at 4 (cycle 0: its first group; then: grown back after the last cycle's shrink).
        before = wait_for(lambda: training_at(4), args.timeout_s, f"the {path} job training on 4 workers")
        if args.spare_workers:  # the resize should meet its spare workers up (training/spares.py)
            wait_for(lambda: spares_up(job()), args.timeout_s, f"the {path} job's spare workers idle")
        base = steady_cpu_rate(cpu)
        since = time.time()
        cpu0 = cpu.total_s() if cpu else None
        # 2. A competitor asks for 2 H100s, and takes them for real once granted.
        competitor = Competitor(client)
        granted_s, usable_s = competitor.take(args.timeout_s)
        events = ray.get(arbiter.events.remote(since))
        shrink = next(e for e in events if e["kind"] == "shrink" and e["workload"] == name)
        released = next((e for e in events if e["kind"] == "released" and e["workload"] == name), None)
        # 3. The job trains at 2.
        after = wait_for(lambda: training_at(2), args.timeout_s, f"the {path} job training on 2 workers")
        cycle = {
            "cycle": i,
            "since_s": since,
            "decision_to_release_s": released["detail"]["reclaim_s"] if released else None,
            "decision_to_grant_s": granted_s - shrink["t_s"],
            "decision_to_usable_s": usable_s - shrink["t_s"],
            "resumed_from_before": before.get("resumed_from"),
            "resumed_step": after.get("resumed_from"),
            "controller_actor_id": after.get("controller_actor_id"),
        }
        cycle.update(cpu_of(cpu, cpu0, since, time.time(), base))
        logger.info("%s cycle %d: %s", path, i, cycle)
        cycles.append(cycle)
        # 4. The competitor leaves; the job grows back.
        competitor.leave()

    # The last grow's worker group starting writes the ledger with the last shrink's group noted in full.
    wait_for(lambda: training_at(4), args.timeout_s, f"the {path} job grown back to 4 workers")
    subprocess.run([ray_cli, "job", "stop", sub_id], env=env, capture_output=True)
    wait_for(lambda: job() is None, args.timeout_s, f"the {path} job to end")
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {}
    for cycle in cycles:
        cycle.update(ledger_figures(ledger, cycle.pop("since_s"), cycle.pop("resumed_from_before")))
        cycle["steps_lost"] = (
            max(0, cycle["last_step"] - cycle["resumed_step"])
            if cycle["last_step"] is not None and cycle["resumed_step"] is not None
            else None
        )
    out = summarize(path, cycles, args)
    out["summary"]["one_controller"] = len({c.get("controller_actor_id") for c in cycles}) == 1
    # Each worker group: its size and how many of its workers ran in spare processes started ahead.
    out["groups"] = [
        {
            k: g.get(k)
            for k in ("generation", "num_workers", "warm_workers", "started_s", "joined_s", "first_step_s")
        }
        for g in ledger.get("groups", [])
    ]
    out["resizes"] = ledger.get("resizes", [])  # the policy's timeline of each resize (wall-clock seconds)
    return out


def ledger_figures(ledger: dict[str, Any], since_s: float, resumed_from: int | None) -> dict[str, Any]:
    """A shrink's figures from the trainer's ledger: its first resize requested after ``since_s`` and the
    first worker group of 2 started after it. ``resumed_from``: the checkpoint step the shrunk group had
    started from (its progress), to which the ledger's count of that group's steps adds up."""
    resize = next((r for r in ledger.get("resizes", []) if r.get("requested_s", 0) >= since_s), None)
    if resize is None:
        return {"overhead_s": None, "restart_s": None, "last_step": None, "forced": False}
    ended_s = resize.get("ended_s") or since_s
    group = next(
        (g for g in ledger.get("groups", []) if g["started_s"] >= ended_s and g["num_workers"] == 2), {}
    )
    first_s, last_s = group.get("first_step_s"), resize.get("last_step_s")
    steps = resize.get("last_step")  # the steps rank 0 made in the shrunk group (last told, if forced)
    return {
        "overhead_s": first_s - last_s if first_s is not None and last_s is not None else None,
        "restart_s": first_s - group["started_s"] if first_s is not None else None,
        "last_step": (resumed_from or 0) + steps if steps is not None else None,
        "forced": bool(resize.get("forced")),
    }


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
