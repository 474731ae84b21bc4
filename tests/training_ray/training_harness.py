"""Helpers of the elastic-training integration tests: jobs submitted with the real ``ray job submit``, a
competing service that steers the arbiter's grant, and the reference loss curve.

(A plain module, imported by name from the tests next to it.)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tidal_testing import wait_for

logger = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parents[2]
RAY_CLI = str(Path(sys.executable).parent / "ray")
# Guards at zero so that the test's competitor moves grants at once (the defaults batch them by a minute).
TEST_POLICY = {"policy": "tidal", "guards": {"service_downscale_delay_s": 0, "job_resize_min_interval_s": 0}}


def digits_job(name: str, storage: Path, **overrides: Any) -> dict[str, Any]:
    """A small, slow-enough digits job: every test job starts from this."""
    spec: dict[str, Any] = {
        "name": name,
        "model": {"class": "tidal.training.models:DigitsMLP", "kwargs": {"hidden": 64}},
        "data": {"factory": "tidal.training.data:digits"},
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
    """The real ``ray job submit --working-dir <project> -- python -m tidal.training.run JOB.yaml``."""
    path = spec_dir / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    sid = f"test-{spec['name']}-{uuid.uuid4().hex[:6]}"
    subprocess.run(
        [RAY_CLI, "job", "submit", "--no-wait", "--submission-id", sid, "--working-dir", str(PROJECT),
         "--", "python", "-m", "tidal.training.run", str(path)],
        env={**os.environ, **local_cluster.env()}, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return SubmittedJob(spec, sid, path, local_cluster.dashboard_url)


def reference_losses(spec: dict[str, Any]) -> list[list[float]]:
    """The loss curve of the same job trained in this process on one worker: the run that never resized."""
    from tidal.training.loop import reference_history
    from tidal.training.spec import parse_spec

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
    """A high-priority workload registered with the arbiter that wants ``demand`` units of one GPU type.

    ``kind="service"``: a service; the Tidal policy reclaims GPUs above a job's minimum for it.
    ``kind="job"``: a training job; the policy may stop a lower-priority job below its minimum for it.
    It holds nothing (the test only steers the grant); a thread heartbeats it so that it does not expire.
    """

    def __init__(self, name: str, gpu_type: str, max_units: int, priority: int = 100, kind: str = "service") -> None:
        from tidal.cluster.client import ArbiterClient
        from tidal.cluster.model import ServiceSpec, TrainingJobSpec

        self.name = name
        self.client = ArbiterClient()
        if kind == "service":
            spec: Any = ServiceSpec(name, 1.0, 0, max_units, (gpu_type,), priority=priority)
        else:
            spec = TrainingJobSpec(name, 1.0, 1, max_units, (gpu_type,), priority=priority, preemptible=False)
        self.demand = 0
        self.client.register(spec)
        self.want(0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"competitor-{name}")
        self._thread.start()

    def want(self, units: int) -> None:
        self.demand = units
        self.client.heartbeat(self.name, demand_units=units, held={})

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


def wait_progress(arbiter: Any, name: str, cond: Any, timeout_s: float, what: str) -> dict[str, Any]:
    """Waits until the job's progress at the arbiter satisfies ``cond`` and returns it."""
    return wait_for(lambda: (p := progress(arbiter, name)) and cond(p) and p, timeout_s, interval_s=0.3, message=what)


