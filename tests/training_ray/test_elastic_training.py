"""Tidal's own jobs (``python -m tidal.training.run JOB.yaml``: a ``TidalTrainer`` around the built-in loop) on the
session's local cluster, under the real arbiter, through the real ``ray job submit``.

Every job here is the digits classifier, slowed to about 0.1 s a step so that the test can act while it trains.
The resize paths are one ``TidalTrainer`` whoever wrote the loop, so each is tested once: a cooperative shrink and
grow back with its loss curve is a user's script in ``test_tidal_trainer.py`` (with a loop that never asks
``should_yield()``); Tidal's own jobs yielding to a spike and resuming from their checkpoints, 0 steps lost, is
``tests/e2e/test_saturated_spike.py``; here, a job that loses a node.

The loss-curve tolerance: a run that resizes must follow the loss curve of the same job trained on one
worker in this process (``tidal.training.loop.reference_history``) within ``LOSS_TOLERANCE`` at every step. The
data order, the shares and the loss scale make the optimisation identical at every size; only the
floating-point summation order differs (4 gloo workers vs one process: at most 3e-7 over 100 steps here).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tidal.serving.manifest import load_manifest, load_model
from tidal.training.data import digits
from tidal.training.loop import evaluate
from tidal_testing import arbiter_policy, wait_for
from training_harness import (
    TEST_POLICY,
    digits_job,
    max_loss_gap,
    reference_losses,
    submit_job,
    wait_progress,
    workload,
)

pytestmark = pytest.mark.integration

LOSS_TOLERANCE = 1e-4
# A worker group starts in 10-40 s on this 2-core machine (several processes importing torch); waits are
# generous because other test sessions may share the machine. They bound failures, not the expected run time.
START_TIMEOUT_S = 300
JOB_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def arbiter(ray_driver: Any) -> Iterator[Any]:
    """The session cluster's arbiter, with the test policy for this module (its old config is put back)."""
    with arbiter_policy(ray_driver, TEST_POLICY) as handle:
        yield handle


@pytest.fixture()
def storage() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tidal-tr-store-") as d:
        yield Path(d)


@pytest.fixture()
def jobs() -> Iterator[list[Any]]:
    submitted: list[Any] = []
    yield submitted
    for job in submitted:
        if job.status() in ("RUNNING", "PENDING"):
            job.stop()


def test_killing_a_node_under_a_job_resumes_it_from_its_checkpoint_on_the_gpus_left(
    arbiter, local_cluster, ray_driver, storage, tmp_path, jobs
):
    # Two nodes of a type of their own, added for this test, so that the session's nodes stay untouched.
    added = ["l4-kill-a", "l4-kill-b"]
    for name in added:
        local_cluster.add_node(name, "L4", num_gpus=1)
    try:
        wait_for(
            lambda: ray_driver.get(arbiter.status.remote())["capacity"].get("L4") == 2.0, 60,
            message="the arbiter seeing 2 L4s",
        )  # fmt: skip
        every = 10
        spec = digits_job(
            "elastic-nodeloss", storage, gpu_types=["L4"], min_workers=1, max_workers=2, steps=150,
            checkpoint_every_steps=every,
        )  # fmt: skip
        job = submit_job(spec, local_cluster, tmp_path)
        jobs.append(job)
        wait_progress(
            arbiter, job.name,
            lambda p: p.get("workers") == 2 and p.get("training") and (p.get("checkpoint_step") or 0) >= every,
            START_TIMEOUT_S, "the job training on both L4 nodes past its first checkpoint",
        )  # fmt: skip
        local_cluster.kill_node(added[1])
        assert job.wait_done(JOB_TIMEOUT_S) == "SUCCEEDED", job.logs()[-3000:]
    finally:
        for name in added:
            if not local_cluster.nodes[name].killed:
                local_cluster.kill_node(name)

    summary = job.summary()
    assert summary["finished"]
    # The same controller started a group of 1 on the L4 left, from the last checkpoint (a start on both L4s in
    # between is possible when the GCS declares the node dead after the policy's back-off: it fails again).
    sizes = [(g["num_workers"], g["gpu_type"]) for g in summary["groups"]]
    assert sizes[0] == (2, "L4") and sizes[-1] == (1, "L4"), summary["groups"]
    # Lost: at most the steps after the last checkpoint (the ledger counts those its reports showed).
    assert summary["forced_stops"] == 0 and 0 <= summary["steps_lost"] < every
    gap, at_step = max_loss_gap(summary["history"], reference_losses(spec))
    assert gap <= LOSS_TOLERANCE, f"loss differs from the never-resized run by {gap:.2e} at step {at_step}"
    # The final model is a checkpoint serving loads, and it scores what the run reported.
    manifest = load_manifest(summary["export_path"])
    assert manifest.model_class == "tidal.training.models:DigitsMLP" and manifest.version == "elastic-nodeloss-step150"
    scores = evaluate(load_model(summary["export_path"]), digits(), torch.device("cpu"))
    assert scores["test_accuracy"] == pytest.approx(summary["metrics"]["test_accuracy"], abs=1e-9)


def test_a_bad_job_spec_is_refused_before_anything_starts_naming_field_value_and_what_is_valid(
    arbiter, local_cluster, storage, tmp_path, jobs
):
    bad_fields = digits_job("elastic-bad", storage, min_workers=5, max_workers=4)
    bad_fields["model"] = {"class": "tidal.training.models:NoSuchNet"}
    bad_type = digits_job("elastic-bad-type", storage, gpu_types=["H100", "V100"])
    # Both submitted at once: each driver fails on its own.
    job, job2 = submit_job(bad_fields, local_cluster, tmp_path), submit_job(bad_type, local_cluster, tmp_path)
    jobs.extend([job, job2])
    assert job.wait_done(120) == "FAILED"
    logs = job.logs()
    assert "max_workers: min_workers=5 is above max_workers=4" in logs
    assert "model.class: 'tidal.training.models:NoSuchNet' does not import" in logs

    assert job2.wait_done(120) == "FAILED"
    logs2 = job2.logs()
    assert "gpu_types: 'V100' is not a GPU type of this cluster; valid: A100, H100" in logs2
    # Refused before registering: the arbiter never heard of either job.
    assert workload(arbiter, "elastic-bad") is None and workload(arbiter, "elastic-bad-type") is None


def test_tidal_train_refuses_an_unknown_gpu_type_without_submitting_anything(local_cluster, storage, tmp_path, capsys):
    from ray.job_submission import JobSubmissionClient
    from tidal.training.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(digits_job("elastic-cli-bad", storage, gpu_types=["B200"])))
    before = {j.submission_id for j in JobSubmissionClient(local_cluster.dashboard_url).list_jobs()}
    assert main(["train", str(path), "--address", local_cluster.dashboard_url]) == 2
    err = capsys.readouterr().err
    assert "nothing submitted" in err
    assert "gpu_types: 'B200' is not a GPU type of this cluster; valid: A100, H100" in err
    after = {j.submission_id for j in JobSubmissionClient(local_cluster.dashboard_url).list_jobs()}
    assert after == before
