"""An elastic job's resize decisions, as a pure function of grant, state and time (no Ray, a made-up clock)."""

from __future__ import annotations

from tidal.training.elastic import (
    ElasticConfig,
    ElasticState,
    ForceStop,
    Keep,
    Phase,
    Start,
    Target,
    Wait,
    Yield,
    YieldReason,
    choose_target,
    decide,
)

CFG = ElasticConfig(
    gpu_types=("H100", "A100"), min_workers=2, max_workers=4, yield_grace_s=20.0, resize_min_interval_s=30.0
)


def running(gpu_type: str = "H100", n: int = 4, started_s: float = 0.0) -> ElasticState:
    return ElasticState().started(Target(gpu_type, n), started_s)


def test_a_job_waits_holding_nothing_while_its_grant_is_below_its_minimum():
    d = decide(ElasticState(), {"H100": 1}, now_s=0.0, cfg=CFG)
    assert isinstance(d, Wait) and "min_workers=2" in d.reason


def test_a_waiting_job_starts_with_all_it_is_granted_up_to_its_maximum():
    assert decide(ElasticState(), {"H100": 3}, 0.0, CFG) == Start(Target("H100", 3))
    assert decide(ElasticState(), {"H100": 8}, 0.0, CFG) == Start(Target("H100", 4))


def test_a_job_runs_on_the_type_with_most_workers_and_breaks_ties_by_preference():
    assert choose_target({"A100": 3, "H100": 2}, CFG) == Target("A100", 3)
    assert choose_target({"A100": 2, "H100": 2}, CFG) == Target("H100", 2)
    assert choose_target({"RTX4090": 4}, CFG) is None


def test_the_gpus_alive_cap_a_grant_that_outlived_a_node():
    assert decide(ElasticState(), {"H100": 4}, 0.0, CFG, capacity_gpus={"H100": 2.0}) == Start(Target("H100", 2))
    half = ElasticConfig(gpu_types=("H100",), min_workers=1, max_workers=8, gpus_per_worker=2.0)
    assert choose_target({"H100": 4}, half, capacity_gpus={"H100": 6.0}) == Target("H100", 3)


def test_a_shrink_asks_for_a_yield_at_once_with_the_grace_as_deadline():
    d = decide(running(), {"H100": 2}, now_s=100.0, cfg=CFG)
    assert d == Yield(YieldReason.SHRINK, Target("H100", 2), deadline_s=120.0)


def test_the_arbiters_release_deadline_wins_when_it_comes_first():
    d = decide(running(), {"H100": 2}, now_s=100.0, cfg=CFG, release_by_s=110.0)
    assert isinstance(d, Yield) and d.deadline_s == 110.0


def test_a_grant_below_the_minimum_yields_to_wait():
    d = decide(running(), {"H100": 1}, now_s=5.0, cfg=CFG)
    assert isinstance(d, Yield) and d.reason is YieldReason.BELOW_MIN and d.target is None


def test_a_grant_moved_to_another_type_yields_to_move():
    d = decide(running("H100", 4), {"A100": 2}, now_s=5.0, cfg=CFG)
    assert d == Yield(YieldReason.TYPE_CHANGE, Target("A100", 2), deadline_s=25.0)


def test_a_grow_waits_for_the_resize_interval_and_has_no_deadline():
    state = running("H100", 2, started_s=0.0)
    assert decide(state, {"H100": 4}, now_s=29.0, cfg=CFG) == Keep()
    assert decide(state, {"H100": 4}, now_s=30.0, cfg=CFG) == Yield(YieldReason.GROW, Target("H100", 4), None)


def test_an_unchanged_grant_keeps_the_trainer_running():
    assert decide(running("H100", 4), {"H100": 4}, now_s=1000.0, cfg=CFG) == Keep()
    assert decide(running("H100", 4), {"H100": 4, "A100": 2}, now_s=1000.0, cfg=CFG) == Keep()


def test_a_yield_past_its_deadline_is_stopped_by_force_and_not_before():
    state = running().yielding(YieldReason.SHRINK, now_s=100.0, deadline_s=120.0)
    assert decide(state, {"H100": 2}, now_s=119.9, cfg=CFG) == Keep()
    d = decide(state, {"H100": 2}, now_s=120.0, cfg=CFG)
    assert isinstance(d, ForceStop) and "20.0s" in d.reason


def test_a_grow_yield_is_never_forced():
    state = running("H100", 2).yielding(YieldReason.GROW, now_s=100.0, deadline_s=None)
    assert decide(state, {"H100": 4}, now_s=10_000.0, cfg=CFG) == Keep()


def test_after_an_attempt_ends_the_job_restarts_at_the_new_size():
    state = running().yielding(YieldReason.SHRINK, 100.0, 120.0).ended()
    assert state.phase is Phase.WAITING
    assert decide(state, {"H100": 2}, 101.0, CFG) == Start(Target("H100", 2))


def test_a_done_job_does_nothing():
    assert decide(running().done(), {"H100": 4}, 0.0, CFG) == Keep()
