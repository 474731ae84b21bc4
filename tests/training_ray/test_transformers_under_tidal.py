"""A Hugging Face Transformers ``Trainer`` inside a ``TidalTrainer`` (issue 23): ``tidal.train.TransformersCallback``
next to Ray's ``RayTrainReportCallback``, on the local cluster, submitted with the real ``ray job submit``.

The script (``user_hf_project/hf_train.py``) builds a tiny GPT-2 from a config (no download) and trains it on
counting sequences with ``transformers.Trainer`` on 2 RTX4090 workers; a high-priority service takes one of the
two GPUs, the Trainer saves and stops at the next step boundary, and the run goes on with 1 worker from that
checkpoint (``resume_from_checkpoint``) to its last step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tidal_testing import arbiter_policy, wait_for
from training_harness import TEST_POLICY, Competitor, workload

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers", reason="Transformers is in the test extra (pip install -e .[test])")

PROJECT = Path(__file__).parent / "user_hf_project"
RAY_CLI = str(Path(sys.executable).parent / "ray")
STEPS = 60
START_TIMEOUT_S = 240  # bounds for failures on a busy 2-core machine, not the expected time


@pytest.fixture(scope="module")
def arbiter(ray_driver: Any) -> Iterator[Any]:
    with arbiter_policy(ray_driver, TEST_POLICY) as handle:
        yield handle


def test_a_transformers_trainer_saves_and_stops_at_a_shrink_and_resumes_at_the_new_size(
    local_cluster, ray_driver, arbiter, tmp_path
):
    from ray.job_submission import JobSubmissionClient

    root = tmp_path / "hfproj"
    shutil.copytree(PROJECT, root, ignore=shutil.ignore_patterns("__pycache__"))
    name = f"user-hf-{uuid.uuid4().hex[:6]}"
    storage, sid = tmp_path / "storage", f"test-{name}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [RAY_CLI, "job", "submit", "--no-wait", "--submission-id", sid, "--working-dir", str(root),
         "--", "python", "hf_train.py", "--name", name, "--storage", str(storage), "--steps", str(STEPS)],
        env={**env, **local_cluster.env()}, check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    client = JobSubmissionClient(local_cluster.dashboard_url)
    competitor = None
    try:

        def training_on(workers: int) -> dict[str, Any] | None:
            status = str(client.get_job_status(sid).value)
            if status not in ("PENDING", "RUNNING"):
                return {"ended": status}  # (stops the wait: the job will not train any more)
            w = workload(arbiter, name)
            p = dict(w["progress"]) if w else {}
            return p if p.get("workers") == workers and p.get("training") else None

        # Two workers, past the Trainer's first save (RayTrainReportCallback reports at each save).
        first = wait_for(lambda: training_on(2), START_TIMEOUT_S, 0.5, f"{name} training on 2 RTX4090s")
        assert "ended" not in first, client.get_job_logs(sid)[-4000:]
        competitor = Competitor(f"svc-{name}", "RTX4090", 1)
        competitor.want(1)
        status = wait_for(
            lambda: (s := str(client.get_job_status(sid).value)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
            START_TIMEOUT_S, 1.0, f"{name} to end",
        )  # fmt: skip
    finally:
        if competitor is not None:
            competitor.leave()
        if str(client.get_job_status(sid).value) in ("PENDING", "RUNNING"):
            client.stop_job(sid)
    logs = client.get_job_logs(sid)
    assert status == "SUCCEEDED", logs[-4000:]

    # One controller; the Trainer saved and stopped at the shrink (not by force), and the group of 1 resumed
    # from that checkpoint and trained to the last step.
    summary = json.loads((storage / name / "tidal_summary.json").read_text())
    assert [(g["num_workers"], g["gpu_type"]) for g in summary["groups"]] == [(2, "RTX4090"), (1, "RTX4090")]
    assert [(r["reason"], r["forced"]) for r in summary["resizes"]] == [("shrink", False)], summary["resizes"]
    assert summary["steps_lost"] == 0 and summary["ended"] == "finished", summary
    result = json.loads(next(line for line in logs.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])
    assert result["metrics"]["step"] == STEPS, result
    # The checkpoint the job yielded at holds the Trainer's state at that step; the last one the final step's.
    ckpt = Path(result["checkpoint"]) / "checkpoint"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses and losses[-1] < losses[0], losses
