"""The Ray glue of the demo and the spike benchmark: start, observe and stop everything a run needs.

``DemoRuntime`` owns, for one run:

- a ``tidal.cluster.local.LocalCluster`` (4 H100, 2 A100, 2 RTX4090 by default) in a temp dir of its own
  (``/tmp/tidal-e2e-*``), its ports leased by the cluster itself;
- a Ray driver connection from this process;
- the arbiter actor (``tidal.cluster.actor.get_or_create_arbiter``) with the demo's policy file;
- the inference service, deployed through the serving package (``tidal.serving.rollout.deploy_config``,
  the path ``serve deploy`` takes) on the port the cluster reserved for Serve;
- the training jobs, submitted with the real ``ray job submit`` CLI: ``python -m tidal.training.run JOB.yaml``
  (a ``TidalTrainer`` sized by the arbiter) or ``python bench/spike_ray_alone_job.py JOB.yaml`` (a plain Ray Train elastic job,
  for the Ray-alone baseline).

``observe`` samples what Ray reports (the actor table, Serve's replica states, the jobs' progress: from the
arbiter for Tidal's jobs, from their progress boards for the Ray-alone ones) into a ``tidal.demo.timeline.Sample``.

``close`` stops everything it started, in reverse order, and is safe to call twice and after a partial
start: the demo and the benchmark call it from ``finally`` (Ctrl-C and errors included).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tidal.cluster.model import GPU_TYPE_LABEL
from tidal.demo.scenario import DEFAULT_POLICY_PATH, ScenarioConfig
from tidal.demo.timeline import Sample, classify_actors

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SPEC_ENV_VAR = "TIDAL_JOB_SPEC_YAML_B64"
RAY_ALONE_JOB_SCRIPT = "bench/spike_ray_alone_job.py"
DRIVER_NAMESPACE = "tidal-demo"
TRAIN_NAMESPACE = "tidal"  # tidal.training.signal.NAMESPACE: where a Ray-alone job's progress board lives


@dataclass(frozen=True)
class SystemConfig:
    """Which system a run measures.

    - ``tidal``: the arbiter, Tidal's Serve autoscaling hook, Tidal's training jobs' controllers.
    - ``ray-alone``: no arbiter; Serve's default autoscaler (same min/max and targets); the jobs as plain
      Ray Train elastic jobs, ``ScalingConfig(num_workers=(min, max))``.
    - ``serve-only``: no training at all, Serve's default autoscaler: how fast Serve reaches capacity when
      the GPUs are already free (no reclaim needed). The arbiter runs, with nothing registered, for its warm
      pool alone (``tidal.cluster.warm_pool``): the reference starts its replicas in the same warm processes as
      Tidal does, so that the two differ by the reclaim only.
    """

    name: str
    arbiter: bool
    autoscaling_policy: str  # tidal.serving.config.AutoscalingOptions.policy: tidal | default
    job_runner: str | None  # tidal | ray-train | None (no training)

    @staticmethod
    def named(name: str) -> SystemConfig:
        systems = {
            "tidal": SystemConfig("tidal", True, "tidal", "tidal"),
            "ray-alone": SystemConfig("ray-alone", False, "default", "ray-train"),
            "serve-only": SystemConfig("serve-only", True, "default", None),
        }
        if name not in systems:
            raise ValueError(f"unknown system {name!r}; valid: {', '.join(systems)}")
        return systems[name]


@dataclass
class JobHandle:
    name: str
    submission_id: str
    runner: str
    submitted_s: float
    storage_path: str


@dataclass
class _ObserverCache:
    node_types: dict[str, str | None] = field(default_factory=dict)
    capacity: dict[str, float] = field(default_factory=dict)
    nodes_read_mono: float = float("-inf")
    actors_read_mono: float = float("-inf")
    split: tuple[dict[str, float], dict[str, float]] = ({}, {})
    signals: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    # Steps seen and then gone: a job that restarted from a checkpoint older than its last step.
    regressed: dict[str, int] = field(default_factory=dict)
    reported_lost: dict[str, int] = field(default_factory=dict)
    # Each Tidal job's progress as its controller last reported it to the arbiter.
    arbiter_progress: dict[str, dict[str, Any]] = field(default_factory=dict)


class DemoRuntime:
    """Starts, observes and stops one run's cluster and workloads. See the module docstring.

    Args:
        scenario: the validated scenario.
        policy_path: the arbiter's policy file (default ``demo/configs/demo-policy.yaml``).
        work_dir: where the cluster, checkpoints and job storage go; a new ``/tmp/tidal-e2e-*`` by default
            (removed by ``close`` when this object created it).
        progress: called with one human-readable line per step of the set-up and tear-down.
    """

    def __init__(
        self,
        scenario: ScenarioConfig,
        *,
        policy_path: str | os.PathLike | None = None,
        work_dir: str | os.PathLike | None = None,
        progress: Callable[[str], None] | None = None,
        keep_work_dir: bool = False,
        cluster: Any = None,
        route_prefix: str = "/",
    ) -> None:
        self.scenario = scenario
        self.policy_path = Path(policy_path) if policy_path else DEFAULT_POLICY_PATH
        self._owns_work_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="tidal-e2e-", dir="/tmp"))
        self.keep_work_dir = keep_work_dir
        self.progress = progress or (lambda line: logger.info("%s", line))
        # A cluster handed in (a test session's) is used as it is and left running by close().
        self.cluster: Any = cluster
        self._owns_cluster = cluster is None
        self.route_prefix = route_prefix
        self.arbiter: Any = None
        self.checkpoint: str | None = None
        self._checkpoint_thread: threading.Thread | None = None
        self.jobs: dict[str, JobHandle] = {}
        self.service_deployed = False
        self._deploy_t0 = time.monotonic()
        self._ray_connected = False
        self._cache = _ObserverCache()
        self._closed = False
        # Each run's jobs get their own storage (a job resumes from whatever checkpoint its storage holds).
        self.run_tag = "run"

    # ------------------------------------------------------------------------------- start

    def start_cluster(self) -> None:
        from tidal.cluster.cluster_spec import load_cluster_spec
        from tidal.cluster.local import LocalCluster

        # The model to serve trains (a second of torch) while the cluster starts (mostly waiting).
        self._checkpoint_thread = threading.Thread(target=self._prepare_checkpoint_quietly, daemon=True)
        self._checkpoint_thread.start()

        from tidal.cluster.local import LocalClusterError

        self.progress("starting the local cluster (H100x4, A100x2, RTX4090x2: logical GPUs, one raylet per node)")
        for attempt in range(1, 3):
            self.cluster = LocalCluster(load_cluster_spec(), root_dir=self.work_dir / f"c{attempt}")
            try:
                self.cluster.start()
                break
            except LocalClusterError as e:
                # On a busy machine a worker node's `ray start` can give up before the head answers; the
                # cluster stopped what it started, so a second try starts clean.
                if attempt == 2:
                    raise
                self.progress(f"the cluster did not start ({str(e).splitlines()[0]}); trying once more")
        self.progress(
            f"cluster up in {self.cluster.startup_s:.1f} s: {self.cluster.address}, dashboard "
            f"{self.cluster.dashboard_url}"
        )

    def connect(self) -> None:
        """Connects this process to the cluster as a Ray driver (or uses the connection it already has)."""
        import ray

        if ray.is_initialized():
            self._ray_connected = True
            self._refresh_nodes(force=True)
            return
        self.cluster.activate()
        ray.init(
            address=self.cluster.address,
            namespace=DRIVER_NAMESPACE,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        self._ray_connected = True
        self._refresh_nodes(force=True)

    def _prepare_checkpoint_quietly(self) -> None:
        with _logged("training the model to serve"):
            self.prepare_checkpoint()

    def prepare_checkpoint(self) -> str:
        """The model the service serves: the digits classifier trained here for a second, written as a
        ``tidal.demo.model.DeviceTimedMLP`` checkpoint (see ``served_model`` in the scenario)."""
        from tidal.demo.model import train_demo_checkpoint

        if self._checkpoint_thread is not None and threading.current_thread() is not self._checkpoint_thread:
            self._checkpoint_thread.join()
        if self.checkpoint is None:
            m = self.scenario.served_model
            self.checkpoint = train_demo_checkpoint(
                str(self.work_dir / "model" / "digits-v1"), device_ms_per_batch=m.device_ms_per_batch, hidden=m.hidden
            )
        return self.checkpoint

    def start_arbiter(self) -> None:
        from tidal.cluster.actor import get_or_create_arbiter

        self.progress(f"starting the arbiter (policy file {self._rel(self.policy_path)})")
        self.arbiter = get_or_create_arbiter(self.policy_path, metrics_port=self.cluster.metrics_port)

    def deploy_service(self, autoscaling_policy: str) -> None:
        """Deploys the scenario's service and waits until it answers over HTTP."""
        self.start_service(autoscaling_policy)
        self.wait_service_ready()

    def start_service(self, autoscaling_policy: str) -> None:
        """Deploys the scenario's service (``tidal.serving.rollout.deploy_config``, the path of ``serve deploy``)
        without waiting for it to run."""
        from tidal.serving.rollout import deploy_config

        args = self.scenario.service_args(self.prepare_checkpoint(), autoscaling_policy)
        svc = args["service"]
        self.progress(
            f"deploying service {svc['name']!r} (min {svc['min_replicas']}, max {svc['max_replicas']} replicas, "
            f"prefers {' > '.join(svc['gpu_types'])}; autoscaling: {autoscaling_policy})"
        )
        config = {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": self.cluster.serve_http_port},
            "applications": [
                {
                    "name": svc["name"],
                    "route_prefix": self.route_prefix,
                    "import_path": "tidal.serving.app:build_app",
                    "args": args,
                }
            ],
        }
        (self.work_dir / "serve-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self._deploy_t0 = time.monotonic()
        deploy_config(config, http_port=self.cluster.serve_http_port, wait=False)
        self.service_deployed = True

    def wait_service_settled(self, timeout_s: float = 60.0) -> None:
        """Waits until the arbiter knows the service and its grant is back to its minimum.

        A service registers asking for its max replicas until its first report of the load (the client
        cannot pass a demand with the registration); jobs that registered in that window would start small
        and then restart to grow. Waiting for it costs a few seconds; a restart costs much more.
        """
        import ray

        name = self.scenario.service_name
        min_units = int(self.scenario.service["service"]["min_replicas"])

        def settled() -> bool:
            status = ray.get(self.arbiter.status.remote(), timeout=5)
            for w in status.get("workloads", []):
                if w["name"] == name:
                    return sum((w.get("grant") or {}).values()) <= min_units and w.get("demand_units", 0) <= min_units
            return False

        try:
            self._wait(settled, timeout_s, f"the arbiter to settle service {name!r} at its minimum")
            self.progress(f"service {name!r} registered with the arbiter; its grant is back to its minimum")
        except TimeoutError as e:
            logger.warning("%s; going on", e)

    def wait_warm_pool(self, timeout_s: float = 90.0) -> None:
        """Waits until the arbiter's warm pool has its spare workers idle on every GPU node (if it has a pool).

        A cluster meets a spike with its pools full; right after the cluster, the service and the jobs
        started (each taking idle workers), they are still refilling, one process at a time.
        """
        import ray

        if self.arbiter is None:
            return
        spare = ray.get(self.arbiter.stats.remote(), timeout=5)["warm_pool"]["spare_workers_per_node"]
        if spare == 0:
            return

        def full() -> bool:
            last = ray.get(self.arbiter.stats.remote(), timeout=5)["warm_pool"]["last"]
            idle = last.get("idle") or {}
            return bool(idle) and min(idle.values()) >= spare

        try:
            self._wait(full, timeout_s, f"the warm pool to hold {spare} idle workers on every GPU node")
            self.progress(f"warm pool full: {spare} idle workers on every GPU node")
        except TimeoutError as e:
            logger.warning("%s; going on", e)

    def wait_spare_workers(self, timeout_s: float = 90.0) -> None:
        """Waits until every Tidal job has the spare workers its spec asks for idle (``tidal.training.spares``).

        They start once a job trains steadily; the spike should meet them imported, not importing.
        """
        import ray

        if self.arbiter is None:
            return
        # The jobs that keep spares; until a job's first top-up has counted them it reports none wanted.
        names = {
            h.name for h in self.jobs.values()
            if h.runner == "tidal" and int(self.scenario.job_spec(h.name, "").get("spare_workers") or 0) > 0
        }  # fmt: skip

        def ready() -> bool:
            status = ray.get(self.arbiter.status.remote(), timeout=5)
            progress = {w["name"]: w.get("progress") or {} for w in status["workloads"] if w["name"] in names}
            return set(progress) == names and all(
                0 < p.get("spares_wanted", 0) <= p.get("spares_idle", 0) for p in progress.values()
            )

        try:
            self._wait(ready, timeout_s, "the training jobs' spare workers to be up")
        except TimeoutError as e:
            logger.warning("%s; going on", e)

    def wait_workers_started(self, timeout_s: float = 60.0, window_s: float = 2.0, max_cpu_s: float = 0.2) -> None:
        """Waits until no Ray worker process of the cluster is still starting: the ``ray::IDLE`` processes
        (new workers importing, or idle ones) used less than ``max_cpu_s`` of CPU over ``window_s``.

        The pool's and the spares' counts say a worker is up only once it has registered; a batch asked for
        a moment before is still importing torch. Two spares still importing when the load begins are
        enough, on this machine's two cores, for the one replica to answer in 0.6-1.1 s for ten seconds:
        Serve then asks for three replicas at 2 req/s and takes an A100 from training before the spike. Reads /proc
        (the local cluster runs on this machine); elsewhere it returns at once.
        """
        if self.cluster is None:
            return
        deadline = time.monotonic() + timeout_s
        before = idle_worker_cpu_s(self.cluster.pids())
        while before and time.monotonic() < deadline:
            time.sleep(window_s)
            after = idle_worker_cpu_s(self.cluster.pids())
            used = starting_cpu_s(before, after)
            if used < max_cpu_s:
                return
            before = after
        if before:
            logger.warning("worker processes were still starting after %.0f s; going on", timeout_s)

    def wait_service_ready(self, timeout_s: float = 180.0) -> None:
        """Waits until the service's application runs and answers ``/v1/predict`` with 200."""
        from tidal.serving.rollout import serve_details

        name = self.scenario.service_name

        def running() -> bool:
            app = serve_details().applications.get(name)
            status = str(getattr(app.status, "value", app.status)) if app is not None else "missing"
            if status == "DEPLOY_FAILED":
                raise RuntimeError(f"service {name!r} failed to deploy: {app.message}")
            return status == "RUNNING" and self._service_http_ok()

        self._wait(running, timeout_s, "the service to answer over HTTP", fatal=(RuntimeError,))
        self.progress(f"service answers at {self.predict_url} ({time.monotonic() - self._deploy_t0:.1f} s)")

    @property
    def predict_url(self) -> str:
        prefix = self.route_prefix.rstrip("/")
        return f"http://127.0.0.1:{self.cluster.serve_http_port}{prefix}/v1/predict"

    def _service_http_ok(self) -> bool:
        import httpx

        body = {"instances": [[0.0] * 64]}
        try:
            return httpx.post(self.predict_url, json=body, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def submit_jobs(self, runner: str) -> None:
        """Submits every job of the scenario with ``ray job submit`` (``runner``: tidal | ray-train).

        One after the other: two submissions of the same working directory at once upload the same package
        (``gcs://_ray_pkg_<hash>.zip``), and the loser's job then fails to find it ("prematurely deleted").
        """
        for name in self.scenario.job_names:
            name, proc, handle = self._start_submit(name, runner)
            try:
                stdout, stderr = proc.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"`ray job submit` for {name} failed ({proc.returncode}):\n{stdout}\n{stderr}")
            self.jobs[name] = handle

    def _start_submit(self, name: str, runner: str) -> tuple[str, subprocess.Popen, JobHandle]:
        storage = self.work_dir / "train" / f"{self.run_tag}-{runner}"
        spec = self.scenario.job_spec(name, str(storage))
        spec_yaml = yaml.safe_dump(spec, sort_keys=False)
        (self.work_dir / f"{name}.yaml").write_text(spec_yaml)
        encoded = base64.b64encode(spec_yaml.encode()).decode()
        if runner == "tidal":
            entry = ["python", "-m", "tidal.training.run", f"{name}.yaml", "--spec-from-env", SPEC_ENV_VAR]
        elif runner == "ray-train":
            entry = ["python", RAY_ALONE_JOB_SCRIPT, f"{name}.yaml", "--spec-from-env", SPEC_ENV_VAR]
        else:
            raise ValueError(f"unknown job runner {runner!r}; valid: tidal, ray-train")
        submission_id = f"demo-{name}-{runner}-{uuid.uuid4().hex[:6]}"
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--no-wait",
            f"--submission-id={submission_id}",
            f"--working-dir={PROJECT_ROOT}",
            "--runtime-env-json=" + json.dumps({"env_vars": {SPEC_ENV_VAR: encoded}}),
            "--",
            *entry,
        ]
        env = {**os.environ, **self.cluster.env()}
        env.pop("RAY_ADDRESS", None)  # `ray job submit` talks to the dashboard (RAY_API_SERVER_ADDRESS)
        self.progress(f"ray job submit -- {' '.join(entry[:4])}  ({name}, {_describe_job(spec)})")
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT
        )
        return name, proc, JobHandle(name, submission_id, runner, time.time(), str(storage))

    # ------------------------------------------------------------------------------- observe

    def _refresh_nodes(self, force: bool = False) -> None:
        import ray

        if not force and time.monotonic() - self._cache.nodes_read_mono < 5.0:
            return
        types: dict[str, str | None] = {}
        cap: dict[str, float] = {}
        for n in ray.nodes():
            labels = n.get("Labels") or {}
            t = labels.get(GPU_TYPE_LABEL)
            types[n["NodeID"]] = t
            if n.get("Alive") and t:
                cap[t] = cap.get(t, 0.0) + float((n.get("Resources") or {}).get("GPU", 0.0))
        self._cache.node_types, self._cache.capacity = types, cap
        self._cache.nodes_read_mono = time.monotonic()

    def capacity(self) -> dict[str, float]:
        self._refresh_nodes()
        return dict(self._cache.capacity)

    def observe(self, t_s: float, phase: str) -> Sample:
        """One sample of the cluster (the load's figures are filled in by the caller)."""
        self._refresh_nodes()
        sample = Sample(t_s=t_s, phase=phase, capacity=dict(self._cache.capacity))
        # The actor table goes through the dashboard: read it at most once a second (Serve's replica states,
        # which time to capacity is measured from, are read on every sample).
        if time.monotonic() - self._cache.actors_read_mono >= 1.0:
            with _logged("actor table"):
                self._cache.split = classify_actors(
                    self._list_actors(), self._cache.node_types, self.scenario.service_name
                )
                self._cache.actors_read_mono = time.monotonic()
        sample.serving_gpus, sample.training_gpus = (dict(d) for d in self._cache.split)
        if self.service_deployed:
            with _logged("serve details"):
                self._observe_serve(sample)
        if self.arbiter is not None:
            with _logged("arbiter status"):
                self._observe_arbiter(sample)
        with _logged("job progress"):
            self._observe_jobs(sample)
        return sample

    def _list_actors(self) -> list[dict[str, Any]]:
        from ray.util.state import list_actors

        rows = list_actors(
            address=self.cluster.dashboard_url,
            filters=[("state", "!=", "DEAD")],
            detail=True,
            limit=10_000,
            raise_on_missing_output=False,
            timeout=10,
        )
        return [
            {
                "class_name": a.class_name,
                "state": a.state,
                "node_id": a.node_id,
                "required_resources": a.required_resources,
            }
            for a in rows
        ]

    def _observe_serve(self, sample: Sample) -> None:
        from tidal.serving.rollout import serve_details

        app = serve_details().applications.get(self.scenario.service_name)
        if app is None:
            return
        for dep in app.deployments.values():
            sample.replicas_target = dep.target_num_replicas
            for r in dep.replicas:
                state = str(getattr(r.state, "value", r.state))
                if state == "RUNNING":
                    sample.replicas_running += 1
                elif state in ("STARTING", "PENDING_MIGRATION", "RECOVERING", "UPDATING"):
                    sample.replicas_starting += 1

    def _observe_arbiter(self, sample: Sample) -> None:
        import ray

        status = ray.get(self.arbiter.status.remote(), timeout=5)
        for w in status.get("workloads", []):
            sample.grants[w["name"]] = dict(w.get("grant") or {})
            if w["name"] == self.scenario.service_name:
                sample.service_demand = int(w.get("demand_units") or 0)
            elif w["name"] in self.jobs:
                p = w.get("progress") or {}
                self._cache.arbiter_progress[w["name"]] = dict(p)
                if p.get("steps_lost") is not None:
                    self._cache.reported_lost[w["name"]] = int(p["steps_lost"])

    def _observe_jobs(self, sample: Sample) -> None:
        """Each job's step, size and GPU type: a Tidal job's from the arbiter (its controller's heartbeat,
        read by ``_observe_arbiter``), a Ray-alone job's from its progress board."""
        for name, h in self.jobs.items():
            if h.runner == "tidal":
                p = self._cache.arbiter_progress.get(name)
                if p is None:
                    continue
                # Training: a group runs and the controller has collected a report of it (it has stepped).
                running = bool(p.get("training")) and int(p.get("workers") or 0) > 0
                self._note_step(name, p.get("step"))
                workers = int(p.get("workers") or 0)
            else:
                p = self._board_progress(name)
                if p is None:
                    continue
                running = bool(p)
                self._note_step(name, p.get("step"))
                workers = int(p.get("num_workers") or 0)
            sample.job_workers[name] = workers if running else 0
            sample.job_gpu_type[name] = p.get("gpu_type") if running else None
            if running and p.get("resumed_from") is not None:
                sample.resumed_from[name] = int(p["resumed_from"])
        sample.steps = dict(self._cache.steps)
        for name in self.jobs:
            lost = max(self._cache.regressed.get(name, 0), self._cache.reported_lost.get(name, 0))
            sample.steps_lost[name] = lost

    def _note_step(self, name: str, step: Any) -> None:
        if step is None:
            return
        best = self._cache.steps.get(name, 0)
        if int(step) < best:
            # Restarted from an older checkpoint: the steps in between were computed twice.
            self._cache.regressed[name] = self._cache.regressed.get(name, 0) + best - int(step)
            logger.info("job %s went back from step %d to %d", name, best, step)
        self._cache.steps[name] = max(best, int(step))

    def _board_progress(self, name: str) -> dict[str, Any] | None:
        """What a Ray-alone job's rank 0 last posted (``tidal.training.signal.ProgressBoard``), or None."""
        import ray
        from tidal.training.signal import progress_board_name

        handle = self._cache.signals.get(name)
        if handle is None:
            try:
                handle = ray.get_actor(progress_board_name(name), namespace=TRAIN_NAMESPACE)
            except ValueError:
                return None  # the job's driver has not created it yet
            self._cache.signals[name] = handle
        try:
            return dict(ray.get(handle.snapshot.remote(), timeout=3).get("progress") or {})
        except Exception:  # the job ended (its board with it): keep the last figures
            self._cache.signals.pop(name, None)
            return None

    def arbiter_events(self, since_wall_s: float = float("-inf")) -> list[dict[str, Any]]:
        import ray

        if self.arbiter is None:
            return []
        return ray.get(self.arbiter.events.remote(since_wall_s), timeout=10)

    def job_summaries(self) -> dict[str, dict[str, Any]]:
        """Each Tidal job's summary: ``tidal/summary.json`` (written by ``python -m tidal.training.run`` as it
        ends), else its trainer's ledger ``tidal_summary.json`` (written by its controller at every worker
        group's start and as it ends: a job stopped with ``ray job stop`` may be killed before the first)."""
        from tidal.training.trainer_policy import SUMMARY_FILE as LEDGER_FILE

        out = {}
        for name, h in self.jobs.items():
            for p in (Path(h.storage_path) / name / "tidal" / "summary.json", Path(h.storage_path) / name / LEDGER_FILE):
                if p.is_file():
                    with contextlib.suppress(ValueError):
                        out[name] = json.loads(p.read_text())
                        break
        return out

    def job_statuses(self) -> dict[str, str]:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.cluster.dashboard_url)
        return {n: str(client.get_job_status(h.submission_id)) for n, h in self.jobs.items()}

    def check_jobs_alive(self) -> None:
        """Raises if a job ended (it should train until it is stopped), with the tail of its log."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.cluster.dashboard_url)
        for name, h in self.jobs.items():
            status = client.get_job_status(h.submission_id)
            if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.SUCCEEDED):
                tail = "\n".join(client.get_job_logs(h.submission_id).splitlines()[-15:])
                info = client.get_job_info(h.submission_id)
                raise RuntimeError(
                    f"training job {name} ({h.submission_id}) ended: {status}: {info.message}\n{tail}"
                )

    # ------------------------------------------------------------------------------- stop

    def stop_jobs(self, timeout_s: float = 60.0) -> None:
        """``ray job stop`` for each job (SIGTERM to its driver: its controller unregisters and writes its ledger)."""
        if not self.jobs or self.cluster is None:
            return
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.cluster.dashboard_url)
        for name, h in self.jobs.items():
            with _logged(f"stopping job {name}"):
                client.stop_job(h.submission_id)
        deadline = time.monotonic() + timeout_s
        for name, h in self.jobs.items():
            while time.monotonic() < deadline:
                try:
                    if client.get_job_status(h.submission_id).is_terminal():
                        break
                except Exception:  # the dashboard may be busy: ask again
                    pass
                time.sleep(0.5)
            else:
                logger.warning("job %s did not stop within %.0f s", name, timeout_s)
        self._cache.signals.clear()

    def wait_no_workloads(self, timeout_s: float = 60.0) -> bool:
        """Waits until no replica of the service and no Ray Train worker holds a GPU (between two systems)."""

        def empty() -> bool:
            serving, training = classify_actors(
                self._list_actors(), self._cache.node_types, self.scenario.service_name
            )
            return not serving and not training

        try:
            self._wait(empty, timeout_s, "every GPU to be free")
            return True
        except TimeoutError as e:
            logger.warning("%s", e)
            return False

    def delete_service(self) -> None:
        if not self.service_deployed:
            return
        from ray import serve
        from tidal.serving.rollout import delete_app

        with _logged("deleting the service"):
            delete_app(self.scenario.service_name, unregister=self.arbiter is not None)
        if self._owns_cluster:
            # On a shared cluster (a test session's), Serve may host other applications: leave it up.
            with _logged("shutting Serve down"):
                serve.shutdown()
        self.service_deployed = False

    def stop_arbiter(self) -> None:
        if self.arbiter is None:
            return
        from tidal.cluster.actor import kill_arbiter

        with _logged("stopping the arbiter"):
            kill_arbiter()
        self.arbiter = None

    def reset(self) -> None:
        """Stops the workloads and the arbiter but keeps the cluster (between two systems of the benchmark)."""
        self.stop_jobs()
        self.delete_service()
        self.stop_arbiter()
        self.jobs.clear()
        self._cache.actors_read_mono = float("-inf")
        self._cache.steps.clear()
        self._cache.regressed.clear()
        self._cache.reported_lost.clear()
        self._cache.arbiter_progress.clear()
        self.wait_no_workloads()

    def close(self) -> None:
        """Stops everything this runtime started, whatever state it is in. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.progress("stopping everything that was started")
        if self._ray_connected:
            with _logged("stopping the jobs"):
                self.stop_jobs(timeout_s=30)
            self.delete_service()
            self.stop_arbiter()
            import ray

            if self._owns_cluster:
                with _logged("disconnecting"):
                    ray.shutdown()
            self._ray_connected = False
        if self.cluster is not None and self._owns_cluster:
            with _logged("stopping the cluster"):
                stopped = self.cluster.stop()
                self.progress(f"cluster stopped ({len(stopped)} processes)")
            if not self.keep_work_dir:
                self.cluster.cleanup()
        if self._owns_work_dir and not self.keep_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def leftover_processes(self) -> set[int]:
        """This cluster's processes still alive (should be none after ``close``)."""
        if self.cluster is None or not self._owns_cluster:
            return set()
        return self.cluster.pids()

    # ------------------------------------------------------------------------------- helpers

    def _wait(
        self,
        cond: Callable[[], Any],
        timeout_s: float,
        what: str,
        interval_s: float = 0.5,
        fatal: tuple[type[BaseException], ...] = (),
    ) -> Any:
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = cond()
                if value:
                    return value
            except fatal:
                raise
            except Exception as e:  # a service still starting refuses connections: not yet
                last_error = e
            time.sleep(interval_s)
        raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}" + (f" (last error {last_error!r})" if last_error else ""))

    @staticmethod
    def _rel(p: Path) -> str:
        try:
            return str(p.resolve().relative_to(PROJECT_ROOT))
        except ValueError:
            return str(p)


IDLE_WORKER_TITLE = b"ray::IDLE"  # a Ray worker process with no task or actor (yet)


def idle_worker_cpu_s(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds used so far by each process of ``pids`` titled ``ray::IDLE`` (Linux /proc; {} elsewhere or
    for processes gone meanwhile)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[int, float] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if not f.read().startswith(IDLE_WORKER_TITLE):
                    continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        except (OSError, ValueError, IndexError):
            continue
    return out


def starting_cpu_s(before: Mapping[int, float], after: Mapping[int, float]) -> float:
    """CPU used between two ``idle_worker_cpu_s`` readings: a process new in ``after`` counts all its CPU (it
    started in between); one gone from ``after`` (it took work, or ended) counts nothing."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def _describe_job(spec: Mapping[str, Any]) -> str:
    return (
        f"priority {spec.get('priority')}, {spec.get('min_workers')}-{spec.get('max_workers')} workers on "
        f"{' > '.join(spec.get('gpu_types', []))}"
    )


@contextlib.contextmanager
def _logged(what: str):
    """Logs and swallows a failure of one observation or one tear-down step: the rest must still happen."""
    try:
        yield
    except Exception as e:
        logger.warning("%s failed: %r", what, e)
