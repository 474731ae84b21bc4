"""``TidalScalingPolicy``'s bookkeeping, without Ray: when a yield counts as done, and what a forced stop loses.

The policy resizes only once every rank has parked *and* the controller has collected each rank's reports
up to its park (one report per rank per poll): its last checkpoint is then registered, and the next worker
group's ``ray.train.get_checkpoint()`` returns it.
"""

from __future__ import annotations

from types import SimpleNamespace

from ray.train import ScalingConfig
from tidal.training.elastic import ElasticState, Target
from tidal.training.trainer_policy import TidalJob, TidalScalingPolicy, _step_of

import tidal.train


def make_policy(num_workers: int = 2) -> TidalScalingPolicy:
    job = TidalJob("job-a", "tok", 1, 4, 1.0, tidal.train.TidalConfig(gpu_types=["H100"]))
    policy = TidalScalingPolicy(ScalingConfig(num_workers=(1, 4), use_gpu=True), job)
    policy._generation = 3
    policy._current = Target("H100", num_workers)
    policy._state = ElasticState().started(policy._current, 0.0)
    return policy


def poll(**reports_by_rank: dict | None) -> SimpleNamespace:
    """A poll status: ``r0={"step": 5}`` is rank 0's report with those metrics, ``r1=None`` no report."""
    statuses = {}
    for key, metrics in reports_by_rank.items():
        report = (
            None
            if metrics is None
            else SimpleNamespace(metrics=metrics, checkpoint=metrics.pop("ckpt", None))
        )
        statuses[int(key[1:])] = SimpleNamespace(training_report=report)
    return SimpleNamespace(worker_statuses=statuses)


def snapshot(parks: dict[int, int], generation: int = 3) -> dict:
    return {"generation": generation, "parks": {r: {"reports": n} for r, n in parks.items()}}


def test_a_yield_is_done_only_once_every_rank_parked_and_its_reports_were_collected():
    policy = make_policy(num_workers=2)
    policy._note_reports(poll(r0={"step": 5}, r1={"step": 5}))
    # Both ranks reported a second time (their yield checkpoint) and parked; the controller has one of each.
    assert not policy._all_parked(snapshot({0: 2, 1: 2}))
    policy._note_reports(poll(r0={"step": 7, "ckpt": "c"}, r1=None))
    assert not policy._all_parked(snapshot({0: 2, 1: 2})), "rank 1's checkpoint report is not collected yet"
    policy._note_reports(poll(r0=None, r1={"step": 7}))
    assert policy._all_parked(snapshot({0: 2, 1: 2}))


def test_a_park_from_an_older_worker_group_or_a_missing_rank_does_not_count():
    policy = make_policy(num_workers=2)
    policy._note_reports(poll(r0={"step": 1}, r1={"step": 1}))
    assert not policy._all_parked(snapshot({0: 1, 1: 1}, generation=2))
    assert not policy._all_parked(snapshot({0: 1}))
    assert policy._all_parked(snapshot({0: 1, 1: 1}))


def test_the_step_and_checkpoint_follow_rank_zeros_reports():
    policy = make_policy()
    policy._note_reports(poll(r0={"step": 50, "ckpt": "c50"}, r1={"step": 50}))
    policy._note_reports(poll(r0={"step": 55}, r1=None))
    policy._note_reports(poll(r0={"step": 60}, r1=None))
    assert (policy._last_step, policy._checkpoint_step) == (
        60,
        50,
    )  # a forced stop now loses at least 10 steps
    assert _step_of({"global_step": 7.0}) == 7 and _step_of({"loss": 0.1}) is None and _step_of(None) is None
    policy._note_reports(poll(r0={"loss": 0.1}, r1=None))  # no step metric: one report counts as one step
    assert policy._last_step == 61
