"""Elastic training on the session's local cluster, under the real arbiter, through the real ``ray job submit``.

Every job here is the digits classifier (small, so that restarts dominate), slowed to about 0.1 s a step so
that the test can act while it trains: a job must run long enough (20-30 s of steps) that it cannot finish
before the test's next move lands, however slow the machine. Grants are steered by a competing high-priority service registered
with the arbiter (the Tidal policy reclaims GPUs from training for it).

A job stopped below its minimum (it yields, holds nothing while it waits, resumes from its checkpoint) is
shown on the same cluster by ``tests/e2e/test_saturated_spike.py``, where a spike's replicas take the GPUs the
stopped jobs gave up.

The loss-curve tolerance: a run that resizes must follow the loss curve of the same job trained on one
worker in this process (``tidal.training.loop.reference_history``) within ``LOSS_TOLERANCE`` at every step. The
data order, the shares and the loss scale make the optimisation identical at every size; only the
floating-point summation order differs (4 gloo workers vs one process: at most 3e-7 over 100 steps here).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from ray.util.placement_group import placement_group_table
from tidal.cluster.model import GPU_TYPE_LABEL
from tidal.serving.manifest import load_manifest, load_model
from tidal.training.data import digits
from tidal.training.loop import evaluate
from tidal_testing import arbiter_policy, wait_for
from training_harness import (
    TEST_POLICY,
    Competitor,
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
def competitors(arbiter: Any) -> Iterator[list[Competitor]]:
    made: list[Competitor] = []
    yield made
    for c in made:
        c.leave()


@pytest.fixture()
def jobs() -> Iterator[list[Any]]:
    submitted: list[Any] = []
    yield submitted
    for job in submitted:
        if job.status() in ("RUNNING", "PENDING"):
            job.stop()


def test_a_job_shrinks_to_two_grows_back_to_four_and_follows_the_loss_curve_of_a_run_that_never_resized(
    arbiter, local_cluster, ray_driver, storage, tmp_path, competitors, jobs
):
    # restart_delay_s: the job keeps its 2 H100s in a placement group for 4 s before it restarts on them.
    # spare_workers: it keeps 4 worker processes started for its next attempt (tidal.training.spares), and
    # spare_control_workers 5 more on the driver's node for Ray Train's controller and its helpers.
    spec = digits_job(
        "elastic-424", storage, min_workers=2, max_workers=4, steps=400, restart_delay_s=4, spare_workers=4,
        spare_control_workers=5,
    )
    job = submit_job(spec, local_cluster, tmp_path)
    jobs.append(job)
    first = wait_progress(
        arbiter, job.name, lambda p: p.get("num_workers") == 4 and (p.get("step") or 0) >= 10, START_TIMEOUT_S,
        "the job training on 4 H100 workers",
    )  # fmt: skip
    first = wait_progress(
        arbiter, job.name, lambda p: p.get("spares_wanted") == 9 and p.get("spares_idle") == 9, START_TIMEOUT_S,
        "the job's 4 spare workers idle on the H100 node and 5 on the driver's",
    )  # fmt: skip

    rival = Competitor("rival-424", "H100", max_units=2)
    competitors.append(rival)
    rival.want(2)

    def holding_two_h100s():
        groups = placement_group_table().values()
        return [g for g in groups if g["name"].startswith("tidal-hold-elastic-424-") and g["state"] == "CREATED"]

    (held,) = wait_for(holding_two_h100s, START_TIMEOUT_S, 0.2, "the job holding its 2 H100s between attempts")
    h100_nodes = {n["NodeID"] for n in ray_driver.nodes() if n.get("Labels", {}).get(GPU_TYPE_LABEL) == "H100"}
    assert held["bundles"] == {0: {"GPU": 1.0}, 1: {"GPU": 1.0}} and set(held["bundles_to_node_id"].values()) <= h100_nodes
    shrunk = wait_progress(
        arbiter, job.name,
        lambda p: p.get("num_workers") == 2 and p.get("phase") == "running" and (p.get("step") or 0) > first["step"],
        START_TIMEOUT_S, "the job training on 2 workers",
    )  # fmt: skip
    wait_progress(
        arbiter, job.name, lambda p: (p.get("step") or 0) >= shrunk["step"] + 5, START_TIMEOUT_S,
        "a few steps at 2 workers",
    )  # fmt: skip
    # The new attempt's controller removed the hold right before its workers asked for the GPUs.
    assert not holding_two_h100s(), "the hold outlived the restart: " + job.logs()[-6000:]
    rival.want(0)
    wait_progress(
        arbiter, job.name, lambda p: p.get("num_workers") == 4 and p.get("phase") == "running", START_TIMEOUT_S,
        "the job grown back to 4",
    )  # fmt: skip

    assert job.wait_done(JOB_TIMEOUT_S) == "SUCCEEDED", job.logs()[-3000:]
    summary = job.summary()
    assert [(a["num_workers"], a["outcome"]) for a in summary["attempts"]] == [
        (4, "yielded"), (2, "yielded"), (4, "finished"),
    ], summary["attempts"]  # fmt: skip
    assert summary["steps_lost"] == 0
    # The first attempt started cold (no spare can exist before the job's workers' runtime env is known);
    # the restart on 2 ran in spare processes, started before it began.
    assert [a["warm_start"] for a in summary["attempts"][:2]] == [False, True], summary["attempts"]
    # Each yield freed its workers' GPUs at its acknowledgement (JobSignal.ack_yield), before fit() returned.
    yielded = [a["index"] for a in summary["attempts"] if a["outcome"] == "yielded"]
    assert [e["attempt"] for e in summary["resizes"] if e["event"] == "released"] == yielded, summary["resizes"]
    # Each attempt resumed exactly at the step where the previous one checkpointed as it yielded.
    assert summary["attempts"][0]["resumed_from"] == 0
    for before, after in zip(summary["attempts"], summary["attempts"][1:], strict=False):
        assert after["resumed_from"] == before["checkpoint_step"] == before["last_step"] > 0
    gap, at_step = max_loss_gap(summary["history"], reference_losses(spec))
    assert gap <= LOSS_TOLERANCE, f"loss differs from the never-resized run by {gap:.2e} at step {at_step}"
    # The final model is a checkpoint serving loads, and it scores what the run reported.
    manifest = load_manifest(summary["export_path"])
    assert manifest.model_class == "tidal.training.models:DigitsMLP" and manifest.version == "elastic-424-step400"
    scores = evaluate(load_model(summary["export_path"]), digits(), torch.device("cpu"))
    assert scores["test_accuracy"] == pytest.approx(summary["metrics"]["test_accuracy"], abs=1e-9)


def test_a_job_that_ignores_the_yield_is_stopped_by_force_after_its_grace_and_loses_only_steps_since_its_checkpoint(
    arbiter, local_cluster, ray_driver, storage, tmp_path, competitors, jobs
):
    every = 10
    spec = digits_job(
        "elastic-stubborn", storage, gpu_types=["RTX4090"], min_workers=1, max_workers=2, steps=150,
        checkpoint_every_steps=every, yield_grace_s=5,
        fault_injection={"ignore_yield": True, "step_delay_s": 0.15},
    )  # fmt: skip
    job = submit_job(spec, local_cluster, tmp_path)
    jobs.append(job)
    wait_progress(
        arbiter, job.name, lambda p: p.get("num_workers") == 2 and (p.get("step") or 0) >= every + 2,
        START_TIMEOUT_S, "the job training on 2 RTX4090 workers past its first checkpoint",
    )  # fmt: skip
    since = time.time()
    rival = Competitor("rival-stubborn", "RTX4090", max_units=1)
    competitors.append(rival)
    rival.want(1)
    assert job.wait_done(JOB_TIMEOUT_S) == "SUCCEEDED", job.logs()[-3000:]
    shrink = next(e for e in ray_driver.get(arbiter.events.remote(since)) if e["kind"] == "shrink" and e["workload"] == job.name)

    summary = job.summary()
    forced, resumed = summary["attempts"][0], summary["attempts"][1]
    assert (forced["num_workers"], forced["outcome"]) == (2, "forced")
    assert (resumed["num_workers"], resumed["outcome"]) == (1, "finished")
    # It kept training past the request (it ignored it) until stopped: the grace after the arbiter's shrink.
    stop = next(e for e in summary["resizes"] if e["event"] == "force_stop")
    assert stop["t_s"] - shrink["t_s"] >= spec["yield_grace_s"]
    asked = next(e for e in summary["resizes"] if e["event"] == "yield_requested")
    assert forced["last_step"] > asked["step"], "it trained on after the request"
    # Lost: only the steps after its last checkpoint, and the next attempt resumed from that checkpoint.
    assert forced["checkpoint_step"] % every == 0 and forced["checkpoint_step"] > 0
    assert 0 <= forced["steps_lost"] < every
    assert resumed["resumed_from"] == forced["checkpoint_step"]
    # Resuming is exact: the recomputed steps give the losses the lost ones had.
    gap, at_step = max_loss_gap(summary["history"], reference_losses(spec))
    assert gap <= LOSS_TOLERANCE, f"loss differs from the never-resized run by {gap:.2e} at step {at_step}"


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
            arbiter, job.name, lambda p: p.get("num_workers") == 2 and (p.get("step") or 0) >= every + 2,
            START_TIMEOUT_S, "the job training on both L4 nodes past its first checkpoint",
        )  # fmt: skip
        local_cluster.kill_node(added[1])
        assert job.wait_done(JOB_TIMEOUT_S) == "SUCCEEDED", job.logs()[-3000:]
    finally:
        for name in added:
            if not local_cluster.nodes[name].killed:
                local_cluster.kill_node(name)

    summary = job.summary()
    failed, resumed = summary["attempts"][0], summary["attempts"][-1]
    assert (failed["num_workers"], failed["outcome"]) == (2, "failed")
    assert (resumed["num_workers"], resumed["outcome"]) == (1, "finished")
    assert resumed["resumed_from"] == failed["checkpoint_step"] > 0
    assert failed["steps_lost"] < every + 2  # the progress report may trail the last step by one poll
    gap, at_step = max_loss_gap(summary["history"], reference_losses(spec))
    assert gap <= LOSS_TOLERANCE, f"loss differs from the never-resized run by {gap:.2e} at step {at_step}"


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
