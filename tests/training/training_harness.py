"""Helpers of the elastic-training integration tests: jobs submitted with the real ``ray job submit``, a
competing service that steers the arbiter's grant, and extra GPU nodes a test may kill.

Ports of the extra nodes come from this test area's range (45000-49999); their temp dirs are /tmp/tidal-tr-*.
(A plain module, not a conftest: a second ``conftest`` module would shadow ``from conftest import wait_for``.)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from conftest import wait_for

logger = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parents[2]
RAY_CLI = str(Path(sys.executable).parent / "ray")
PORT_RANGE = (45000, 49999)
# Guards at zero so that the test's competitor moves grants at once (the defaults batch them by a minute).
TEST_POLICY = {"policy": "tidal", "guards": {"service_downscale_delay_s": 0, "job_resize_min_interval_s": 0}}


def digits_job(name: str, storage: Path, **overrides: Any) -> dict[str, Any]:
    """A small, slow-enough digits job: every test job starts from this."""
    spec: dict[str, Any] = {
        "name": name,
        "model": {"class": "training.models:DigitsMLP", "kwargs": {"hidden": 64}},
        "data": {"factory": "training.data:digits"},
        "gpu_types": ["H100"],
        "min_workers": 1,
        "max_workers": 4,
        "global_batch_size": 64,
        "steps": 120,
        "lr": 0.003,
        "lr_schedule": "cosine",
        "warmup_steps": 10,
        "seed": 7,
        "checkpoint_every_steps": None,
        "yield_grace_s": 60,
        "resize_min_interval_s": 0,
        "report_every_steps": 20,
        "storage_path": str(storage),
        "fault_injection": {"step_delay_s": 0.1},
    }
    spec.update(overrides)
    return spec


@dataclass
class SubmittedJob:
    """A training job submitted with ``ray job submit``: its spec, submission id and where it writes."""

    spec: dict[str, Any]
    submission_id: str
    spec_path: Path
    dashboard_url: str

    @property
    def name(self) -> str:
        return self.spec["name"]

    def summary_path(self) -> Path:
        return Path(self.spec["storage_path"]) / self.name / "tidal" / "summary.json"

    def summary(self) -> dict[str, Any]:
        return json.loads(self.summary_path().read_text())

    def _client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url)

    def status(self) -> str:
        return str(self._client().get_job_status(self.submission_id).value)

    def logs(self) -> str:
        return self._client().get_job_logs(self.submission_id)

    def wait_done(self, timeout_s: float) -> str:
        return wait_for(
            lambda: (s := self.status()) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
            timeout_s,
            interval_s=1.0,
            message=f"job {self.name} to end",
        )

    def stop(self) -> None:
        self._client().stop_job(self.submission_id)


def submit_job(spec: dict[str, Any], local_cluster: Any, spec_dir: Path) -> SubmittedJob:
    """The real ``ray job submit --working-dir <project> -- python -m training.run JOB.yaml``."""
    path = spec_dir / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    sid = f"test-{spec['name']}-{uuid.uuid4().hex[:6]}"
    subprocess.run(
        [RAY_CLI, "job", "submit", "--no-wait", "--submission-id", sid, "--working-dir", str(PROJECT),
         "--", "python", "-m", "training.run", str(path)],
        env={**os.environ, **local_cluster.env()}, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return SubmittedJob(spec, sid, path, local_cluster.dashboard_url)


def reference_losses(spec: dict[str, Any]) -> list[list[float]]:
    """The loss curve of the same job trained in this process on one worker: the run that never resized."""
    from training.loop import reference_history
    from training.spec import parse_spec

    return reference_history(parse_spec(spec))


def max_loss_gap(history: list[list[float]], reference: list[list[float]]) -> tuple[float, int]:
    """The largest |loss - reference loss| over the steps, and at which step (histories must cover the same steps)."""
    assert [int(s) for s, _ in history] == [int(s) for s, _ in reference], "the runs did not take the same steps"
    gaps = [(abs(a - b), int(s)) for (s, a), (_, b) in zip(history, reference, strict=True)]
    return max(gaps)


def workload(arbiter: Any, name: str) -> dict[str, Any] | None:
    """The arbiter's status entry of workload ``name`` (grant, held, progress), or None."""
    import ray

    for w in ray.get(arbiter.status.remote())["workloads"]:
        if w["name"] == name:
            return w
    return None


def progress(arbiter: Any, name: str) -> dict[str, Any]:
    w = workload(arbiter, name)
    return dict(w["progress"]) if w else {}


class Competitor:
    """A high-priority service registered with the arbiter that wants ``demand`` replicas of one GPU type.

    It holds nothing (the test only steers the grant); a thread heartbeats it so that it does not expire.
    """

    def __init__(self, name: str, gpu_type: str, max_replicas: int, priority: int = 100) -> None:
        from cluster.client import ArbiterClient
        from cluster.model import ServiceSpec

        self.name = name
        self.client = ArbiterClient()
        self.client.register(ServiceSpec(name, 1.0, 0, max_replicas, (gpu_type,), priority=priority))
        self.demand = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"competitor-{name}")
        self._thread.start()

    def want(self, replicas: int) -> None:
        self.demand = replicas
        self.client.heartbeat(self.name, demand_units=replicas, held={})

    def _beat(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.client.heartbeat(self.name, demand_units=self.demand, held={})
            except Exception as e:  # noqa: BLE001 - the next beat retries
                logger.warning("competitor heartbeat failed: %r", e)

    def leave(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.client.unregister(self.name)


# ------------------------------------------------------------------------------------- extra nodes


@dataclass
class ExtraNode:
    """A raylet this test started on the session cluster, in its own session (so it can be killed alone)."""

    name: str
    sid: int
    temp_dir: Path
    ports: list[int] = field(default_factory=list)
    killed: bool = False

    def pids(self) -> set[int]:
        return _session_and_children(self.sid)

    def kill(self) -> None:
        """SIGKILL on the raylet and every process it started, as a machine failure would."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.killed = True


def _session_and_children(sid: int) -> set[int]:
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[3]))  # ppid, session id
    pids = {pid for pid, (_, s) in table.items() if s == sid}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(pids)
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in pids:
                pids.add(c)
                stack.append(c)
    return pids


def _free_block(start: int, size: int) -> int:
    """The first block of ``size`` free ports at or after ``start`` inside this area's port range."""
    base = start
    while base + size <= PORT_RANGE[1]:
        ok = True
        for port in range(base, base + size):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
        base += size
    raise RuntimeError(f"no {size} free ports in {PORT_RANGE}")


class ExtraNodes:
    """GPU nodes joined to the session cluster by a test: ``add(name, gpu_type, num_gpus)``; ``kill_all()``
    ends every one (the killed ones stay dead in the GCS's node table)."""

    def __init__(self, local_cluster: Any, ray_module: Any) -> None:
        self.local_cluster = local_cluster
        self.ray = ray_module
        self.nodes: list[ExtraNode] = []
        self.root = Path(tempfile.mkdtemp(prefix="tidal-tr-nodes-", dir="/tmp"))
        self.next_port = PORT_RANGE[0]

    def add(self, name: str, gpu_type: str, num_gpus: int, num_cpus: int | None = None) -> ExtraNode:
        local_cluster, ray_driver = self.local_cluster, self.ray
        base = _free_block(self.next_port, 120)
        self.next_port = base + 120
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        env.update(local_cluster.auth_env())
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        args = [
            RAY_CLI, "start", f"--address={local_cluster.address}", "--node-ip-address=127.0.0.1",
            f"--node-name={name}", f"--temp-dir={temp_dir}", f"--num-gpus={num_gpus}",
            f"--num-cpus={num_cpus if num_cpus is not None else num_gpus + 1}",
            f"--object-store-memory={100 * 1024 * 1024}",
            f"--node-manager-port={base}", f"--object-manager-port={base + 1}", f"--metrics-export-port={base + 2}",
            f"--dashboard-agent-listen-port={base + 3}", f"--dashboard-agent-grpc-port={base + 4}",
            f"--runtime-env-agent-port={base + 5}", f"--min-worker-port={base + 20}", f"--max-worker-port={base + 119}",
            f"--labels=ray.io/accelerator-type={gpu_type}", "--disable-usage-stats",
        ]  # fmt: skip
        log = open(temp_dir / "ray-start.log", "w")  # noqa: SIM115 - closed below, the child keeps its copy
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        node = ExtraNode(name, proc.pid, temp_dir, list(range(base, base + 120)))
        self.nodes.append(node)
        if proc.wait(timeout=120) != 0:
            raise RuntimeError(f"ray start for {name} failed: {(temp_dir / 'ray-start.log').read_text()[-2000:]}")
        wait_for(
            lambda: any(n["NodeName"] == name and n["Alive"] for n in ray_driver.nodes()),
            timeout_s=90,
            message=f"node {name} to register",
        )
        return node

    def kill_all(self) -> None:
        for node in self.nodes:
            node.kill()
        subprocess.run(["rm", "-rf", str(self.root)], check=False)


def wait_progress(arbiter: Any, name: str, cond: Any, timeout_s: float, what: str) -> dict[str, Any]:
    """Waits until the job's progress at the arbiter satisfies ``cond`` and returns it."""
    return wait_for(lambda: (p := progress(arbiter, name)) and cond(p) and p, timeout_s, interval_s=0.3, message=what)


