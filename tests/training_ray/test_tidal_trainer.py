"""A user's own Ray Train script under Tidal (issue 23): ``tidal.train.TidalTrainer`` on the local cluster.

The script (``user_trainer_project/my_train.py``) is written as Ray's docs write a ``TorchTrainer`` example
(its own model and optimizer, a ``DistributedSampler``, ``prepare_model``, reports with checkpoints, resume
from ``get_checkpoint()``) plus the lines marked ``# Tidal``; its directory has its own ``training/``
package. It is submitted with the real ``ray job submit --working-dir DIR -- python my_train.py``, and a
high-priority service registered with the arbiter takes two of the job's four H100s and gives them back.
"""

from __future__ import annotations

import importlib.util
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
import torch
from tidal_testing import arbiter_policy, wait_for
from training_harness import TEST_POLICY, Competitor, workload

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).parent / "user_trainer_project"
RAY_CLI = str(Path(sys.executable).parent / "ray")
STEPS = 400
# Bounds for failures, not the expected run time: a worker group of cold processes starts in 10-150 s on this
# 2-core machine (46, 92 and 144 s at load 30-50).
START_TIMEOUT_S = 240
RESIZE_TIMEOUT_S = 240
# The forced-stop test's yield grace: long enough that the stop is visibly the grace's (the policy polls every
# 0.5 s), short enough not to idle the suite.
GRACE_S = 6.0
# The resized run's final loss on the whole data set against a run that never resized (one process, the
# same global batch of 64, the same 400 steps): the data order differs with the size (DistributedSampler
# shards by rank), so the curves differ by sampling noise; the run that never resized ends at MSE 0.0060.
LOSS_TOLERANCE = 0.35  # relative


@pytest.fixture(scope="module")
def arbiter(ray_driver: Any) -> Iterator[Any]:
    """The session's arbiter with this module's policy (the old one put back after, for later modules)."""
    with arbiter_policy(ray_driver, TEST_POLICY) as handle:
        yield handle


@pytest.fixture()
def user_dir(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "userproj"
    shutil.copytree(PROJECT, root, ignore=shutil.ignore_patterns("__pycache__"))
    yield root
    shutil.rmtree(tmp_path, ignore_errors=True)


def user_model_module(root: Path) -> Any:
    """The user's ``training/model.py``, loaded under a name of its own (``training`` is the user's package)."""
    spec = importlib.util.spec_from_file_location("user_trainer_model", root / "training" / "model.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def reference_loss(model_module: Any, steps: int, global_batch: int = 64) -> float:
    """The script's loop in this process on one worker: the run that never resized."""
    torch.manual_seed(0)
    model = model_module.TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = model_module.make_dataset()
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=global_batch, sampler=sampler)
    step = 0
    while step < steps:
        sampler.set_epoch(step)
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return full_loss(model_module, model)


def full_loss(model_module: Any, model: torch.nn.Module) -> float:
    x, y = model_module.make_dataset().tensors
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))


def submit(local_cluster: Any, root: Path, sid: str, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [RAY_CLI, "job", "submit", "--no-wait", "--submission-id", sid, "--working-dir", str(root),
         "--", "python", "my_train.py", *args],
        env={**env, **local_cluster.env()}, check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def job_status(local_cluster: Any, sid: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(local_cluster.dashboard_url).get_job_status(sid).value)


def job_logs(local_cluster: Any, sid: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(local_cluster.dashboard_url).get_job_logs(sid)


def test_a_users_script_shrinks_to_two_workers_and_grows_back_under_one_controller_losing_no_steps(
    local_cluster, ray_driver, arbiter, user_dir
):
    name = f"user-tt-{uuid.uuid4().hex[:6]}"
    storage, trace = user_dir.parent / "storage", user_dir.parent / "trace.jsonl"
    sid = f"test-{name}"
    submit(local_cluster, user_dir, sid, "--name", name, "--storage", str(storage), "--steps", str(STEPS),
           "--trace", str(trace))  # fmt: skip
    competitor = None
    try:
        # Four workers on H100s (the whole grant), stepping.
        def at(workers: int, min_step: int) -> dict[str, Any] | None:
            w = workload(arbiter, name)
            p = dict(w["progress"]) if w else {}
            ok = (
                p.get("workers") == workers
                and (p.get("step") or 0) >= min_step
                and w["held"] == {"H100": workers}
            )
            assert job_status(local_cluster, sid) in ("PENDING", "RUNNING"), job_logs(local_cluster, sid)[
                -3000:
            ]
            return p if ok else None

        first = wait_for(lambda: at(4, 10), START_TIMEOUT_S, 0.5, f"{name} training on 4 H100s")
        # A service of priority 100 wants two H100s: the job yields at a step boundary and goes on with 2.
        competitor = Competitor(f"svc-{name}", "H100", 2)
        competitor.want(2)
        shrunk = wait_for(lambda: at(2, first["step"] + 10), RESIZE_TIMEOUT_S, 0.5, f"{name} on 2 H100s")
        # The service leaves: the job grows back to 4 at its next step boundary.
        competitor.leave()
        competitor = None
        grown = wait_for(lambda: at(4, shrunk["step"] + 5), RESIZE_TIMEOUT_S, 0.5, f"{name} back on 4 H100s")
        status = wait_for(
            lambda: (s := job_status(local_cluster, sid)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
            START_TIMEOUT_S, 1.0, f"{name} to end",
        )  # fmt: skip
    finally:
        if competitor is not None:
            competitor.leave()
        if job_status(local_cluster, sid) in ("PENDING", "RUNNING"):
            subprocess.run(
                [RAY_CLI, "job", "stop", sid], env={**os.environ, **local_cluster.env()}, timeout=60
            )
    logs = job_logs(local_cluster, sid)
    assert status == "SUCCEEDED", logs[-4000:]

    # One Ray Train controller for the whole run: the arbiter heard the same one at each size, and its ledger
    # holds the three worker groups, each started on H100s by the label selector of its grant.
    controllers = {p["controller_actor_id"] for p in (first, shrunk, grown)}
    summary = json.loads((storage / name / "tidal_summary.json").read_text())
    assert controllers == {summary["controller"]["actor_id"]}, (controllers, summary["controller"])
    assert [(g["num_workers"], g["gpu_type"]) for g in summary["groups"]] == [
        (4, "H100"),
        (2, "H100"),
        (4, "H100"),
    ]
    assert [(r["reason"], r["forced"]) for r in summary["resizes"]] == [("shrink", False), ("grow", False)]
    assert summary["steps_lost"] == 0 and summary["ended"] == "finished", summary

    # 0 steps lost: every step was trained exactly once, at 4, then 2, then 4 workers.
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "a step was trained twice or skipped"
    sizes = [
        r["world_size"] for i, r in enumerate(rows) if i == 0 or r["world_size"] != rows[i - 1]["world_size"]
    ]
    assert sizes == [4, 2, 4], sizes

    # The loss at the end is that of a run that never resized, within the sampling noise of the data order.
    model_module = user_model_module(user_dir)
    result = json.loads(
        next(line for line in logs.splitlines() if line.startswith("RESULT "))[len("RESULT ") :]
    )
    model = model_module.TinyNet()
    state = torch.load(Path(result["checkpoint"]) / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == STEPS
    model.load_state_dict(state["model"])
    resized, reference = full_loss(model_module, model), reference_loss(model_module, STEPS)
    assert abs(resized - reference) <= LOSS_TOLERANCE * reference, (resized, reference)
    assert workload(arbiter, name) is None, "the job unregistered at its end"


def test_a_loop_that_never_calls_should_yield_is_stopped_after_its_grace_and_resumes_from_its_last_checkpoint(
    local_cluster, ray_driver, arbiter, user_dir
):
    name = f"user-tf-{uuid.uuid4().hex[:6]}"
    storage, trace = user_dir.parent / "storage", user_dir.parent / "trace.jsonl"
    sid = f"test-{name}"
    submit(local_cluster, user_dir, sid, "--name", name, "--storage", str(storage), "--steps", "100000",
           "--trace", str(trace), "--no-yield", "--yield-grace-s", str(GRACE_S))  # fmt: skip
    competitor = None
    try:
        wait_for(
            lambda: (w := workload(arbiter, name)) and w["held"] == {"H100": 4} and (w["progress"].get("step") or 0) >= 60,
            START_TIMEOUT_S, 0.5, f"{name} past its first checkpoint on 4 H100s",
        )  # fmt: skip
        competitor = Competitor(f"svc-{name}", "H100", 2)
        competitor.want(2)
        # No should_yield(): the job keeps its four workers through its grace, then loses two by force.
        shrunk = wait_for(
            lambda: (w := workload(arbiter, name)) and w["progress"].get("workers") == 2 and w["progress"].get("step")
            and w,
            RESIZE_TIMEOUT_S, 0.5, f"{name} stopped by force and running on 2 H100s",
        )  # fmt: skip
        first_at_2 = wait_for(
            lambda: next((json.loads(x) for x in trace.read_text().splitlines() if '"world_size": 2' in x), None),
            RESIZE_TIMEOUT_S, 0.5, f"{name}'s first step on 2 workers",
        )  # fmt: skip
    finally:
        if competitor is not None:
            competitor.leave()
        subprocess.run([RAY_CLI, "job", "stop", sid], env={**os.environ, **local_cluster.env()}, timeout=60)
    summary = json.loads((storage / name / "tidal_summary.json").read_text())
    (resize,) = summary["resizes"]
    assert resize["reason"] == "shrink" and resize["forced"], resize
    # Stopped at its deadline: the grace from the arbiter's shrink decision, which the policy hears up to a
    # poll (0.5 s) and a heartbeat later than the arbiter made it.
    assert resize["ended_s"] - resize["requested_s"] >= GRACE_S - 2.0, "stopped before its grace ran out"
    assert shrunk["progress"]["controller_actor_id"] == summary["controller"]["actor_id"]
    # It resumed from its last reported checkpoint (one every 50 steps): the steps since it are lost, and counted.
    rows = [json.loads(x) for x in trace.read_text().splitlines()]
    last_at_4 = max(r["step"] for r in rows if r["world_size"] == 4)
    assert (first_at_2["step"] - 1) % 50 == 0 and first_at_2["step"] - 1 < last_at_4, (first_at_2, last_at_4)
    assert 0 < summary["steps_lost"] <= last_at_4 - (first_at_2["step"] - 1), summary
