"""The arithmetic of Tidal's Serve autoscaling hook: load -> demand -> replicas capped at the grant."""

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tidal.serving.autoscale_math import (
    HoldState,
    LoadObservation,
    ScalingBounds,
    decide_replicas,
    held_by_type,
    hold_demand,
    keepalive_demand,
    replicas_for_load,
    track_departures,
)


def obs(total: float, now_s: float = 0.0, current: int = 1) -> LoadObservation:
    return LoadObservation(now_s=now_s, total_requests=total, current_replicas=current)


BOUNDS = ScalingBounds(min_replicas=1, max_replicas=8, target_ongoing_requests=2.0, downscale_delay_s=30.0)


@pytest.mark.parametrize(
    ("total", "target", "expected"),
    [(7, 2, 4), (8, 2, 4), (0, 2, 0), (0.01, 2, 1), (6.0000000001, 2, 3), (1, 0.5, 2)],
)
def test_replicas_for_load_is_requests_over_target_rounded_up(total, target, expected):
    assert replicas_for_load(total, target) == expected


def test_demand_is_capped_at_the_grant_and_reported_uncapped():
    d = decide_replicas(obs(9), BOUNDS, HoldState(), grant_units=3)
    assert (d.load_replicas, d.demand_units, d.num_replicas, d.capped_by_grant) == (5, 5, 3, True)


def test_without_an_arbiter_replicas_follow_load_within_min_and_max():
    assert decide_replicas(obs(100), BOUNDS, HoldState(), grant_units=None).num_replicas == 8
    assert decide_replicas(obs(0), BOUNDS, HoldState(), grant_units=None).num_replicas == 1


def test_a_grant_below_the_minimum_still_keeps_the_minimum():
    # Serve enforces min_replicas whatever a policy returns; saying so keeps the two consistent.
    d = decide_replicas(obs(9), BOUNDS, HoldState(), grant_units=0)
    assert d.num_replicas == BOUNDS.min_replicas


def test_demand_rises_at_once_and_falls_only_after_the_downscale_hold():
    state = HoldState()
    state = hold_demand(4, state, now_s=0.0, downscale_delay_s=30.0)
    assert state.demand == 4
    for t, load in [(1.0, 2), (11.0, 3), (21.0, 1)]:
        state = hold_demand(load, state, now_s=t, downscale_delay_s=30.0)
        assert state.demand == 4, f"dropped at t={t}"
    state = hold_demand(1, state, now_s=31.0, downscale_delay_s=30.0)
    # Drops to the highest load seen during the hold, not to the last sample.
    assert state.demand == 3


def test_a_load_spike_during_the_hold_restarts_it():
    state = hold_demand(4, HoldState(), 0.0, 30.0)
    state = hold_demand(1, state, 1.0, 30.0)
    state = hold_demand(5, state, 20.0, 30.0)
    state = hold_demand(1, state, 40.0, 30.0)
    assert state.demand == 5  # the hold restarted at t=40


UPSCALE = ScalingBounds(
    min_replicas=1, max_replicas=8, target_ongoing_requests=2.0, downscale_delay_s=30.0, upscale_delay_s=0.5
)


def test_a_rise_reaches_the_arbiter_and_serve_once_it_has_lasted_the_upscale_delay():
    d = decide_replicas(obs(8, now_s=0.0), UPSCALE, HoldState(), grant_units=8)
    assert (d.load_replicas, d.demand_units, d.num_replicas) == (4, 1, 1)
    d = decide_replicas(obs(8, now_s=0.4), UPSCALE, d.state, grant_units=8)
    assert (d.demand_units, d.num_replicas) == (1, 1)
    d = decide_replicas(obs(8, now_s=0.5), UPSCALE, d.state, grant_units=8)
    assert (d.demand_units, d.num_replicas) == (4, 4)


def test_replicas_granted_after_the_delay_start_at_once():
    # A spike: demand 4 from t=0.5 with 1 replica granted; the arbiter reclaims 3 GPUs, free at t=2.
    d = decide_replicas(obs(8, now_s=0.0), UPSCALE, HoldState(), grant_units=1)
    for t in (0.1, 0.6, 1.9):
        d = decide_replicas(obs(8, now_s=t), UPSCALE, d.state, grant_units=1)
    assert d.num_replicas == 1 and d.demand_units == 4 and d.capped_by_grant
    d = decide_replicas(obs(8, now_s=2.0), UPSCALE, d.state, grant_units=4)
    assert d.num_replicas == 4  # at once: the delay ran out at t=0.5


def test_a_blip_shorter_than_the_upscale_delay_is_never_heard_and_leaves_the_downscale_hold_running():
    d = decide_replicas(obs(8, now_s=0.0), UPSCALE, HoldState(), grant_units=8)
    d = decide_replicas(obs(8, now_s=0.5), UPSCALE, d.state, grant_units=8)
    assert d.demand_units == 4
    d = decide_replicas(obs(2, now_s=1.0), UPSCALE, d.state, grant_units=8)  # the load wants 1: a hold
    assert d.state.lower_since_s == 1.0
    d = decide_replicas(obs(16, now_s=10.0), UPSCALE, d.state, grant_units=8)  # a blip: 8 replicas' worth
    assert (d.demand_units, d.num_replicas) == (4, 4)
    d = decide_replicas(obs(2, now_s=10.3), UPSCALE, d.state, grant_units=8)  # gone before 0.5 s
    assert d.state.above_since_s is None and d.state.lower_since_s == 1.0
    d = decide_replicas(obs(2, now_s=31.0), UPSCALE, d.state, grant_units=8)
    assert d.demand_units == 1  # 30 s after the load fell, as if the blip had not been


def test_a_rise_that_falls_back_before_the_upscale_delay_restarts_it():
    d = decide_replicas(obs(8, now_s=0.0), UPSCALE, HoldState(), grant_units=8)
    d = decide_replicas(obs(2, now_s=0.3), UPSCALE, d.state, grant_units=8)
    d = decide_replicas(obs(8, now_s=0.4), UPSCALE, d.state, grant_units=8)
    d = decide_replicas(obs(8, now_s=0.8), UPSCALE, d.state, grant_units=8)
    assert d.demand_units == 1  # 0.4 s above since it came back, not 0.5
    d = decide_replicas(obs(8, now_s=0.9), UPSCALE, d.state, grant_units=8)
    assert (d.demand_units, d.num_replicas) == (4, 4)


def test_without_an_upscale_delay_a_rise_counts_at_once():
    d = decide_replicas(obs(8, now_s=0.0), BOUNDS, HoldState(), grant_units=2)
    assert (d.demand_units, d.num_replicas) == (4, 2)


SURGE = ScalingBounds(
    min_replicas=1,
    max_replicas=8,
    target_ongoing_requests=1.0,
    downscale_delay_s=8.0,
    upscale_delay_s=0.5,
    surge_reserve_fraction=0.5,
)


def ramp(loads_at: list[tuple[float, float]], bounds: ScalingBounds, grant: int = 8):
    d = None
    for t, load in loads_at:
        d = decide_replicas(obs(load, now_s=t), bounds, HoldState() if d is None else d.state, grant)
    return d


def test_a_rise_asks_the_arbiter_for_half_the_rise_again_ahead_of_the_load():
    # The spike as Serve's 2 s look-back shows it: 1, then 3, then 4 replicas' worth.
    d = ramp([(0.0, 3), (0.5, 3)], SURGE)
    assert (d.demand_units, d.num_replicas) == (4, 3)  # 3 + (3 - 1) / 2: freed now, run when the load asks
    d = ramp([(0.0, 3), (0.5, 3), (1.0, 4), (1.5, 4)], SURGE)
    assert (d.demand_units, d.num_replicas) == (4, 4)  # the 4th replica runs on a GPU already granted
    assert ramp([(0.0, 6), (0.5, 6)], SURGE).demand_units == 8  # 6 + 2.5 -> 8, the max


def test_a_rise_of_one_replica_asks_for_nothing_more():
    # Rounded down: the base load's rises of one replica (a slow moment on a busy host) take no GPU ahead.
    d = ramp([(0.0, 2), (0.5, 2)], SURGE)
    assert (d.demand_units, d.num_replicas) == (2, 2)


def test_a_reserve_the_load_never_uses_lapses_after_the_downscale_delay():
    d = ramp([(0.0, 3), (0.5, 3), (8.4, 3)], SURGE)
    assert d.demand_units == 4
    d = ramp([(0.0, 3), (0.5, 3), (8.5, 3)], SURGE)
    assert (d.demand_units, d.state.reserve) == (3, 0)


def test_after_a_spike_the_reserve_is_gone_before_the_demand_falls():
    d = ramp([(0.0, 3), (0.5, 3), (1.0, 1), (8.5, 1)], SURGE)
    assert (d.state.demand, d.demand_units) == (3, 3)  # still held: the load fell at t=1
    d = ramp([(0.0, 3), (0.5, 3), (1.0, 1), (8.5, 1), (9.0, 1)], SURGE)
    assert (d.state.demand, d.demand_units) == (1, 1)


def test_a_later_smaller_rise_keeps_the_larger_reserve_until_it_lapses():
    d = ramp([(0.0, 5), (0.5, 5), (1.0, 6), (1.5, 6)], SURGE)  # 1 -> 5 asks 7; 5 -> 6 would ask 6
    assert (d.demand_units, d.num_replicas, d.state.reserve_since_s) == (7, 6, 0.5)


def test_without_a_reserve_fraction_the_arbiter_hears_the_demand_alone():
    d = ramp([(0.0, 3), (0.5, 3)], replace(SURGE, surge_reserve_fraction=0.0))
    assert (d.demand_units, d.num_replicas, d.state.reserve) == (3, 3, 0)


EARLY = replace(SURGE, early_reclaim_min_rise=2)


def test_a_surge_asks_for_its_gpus_at_once_and_serve_runs_them_after_the_upscale_delay():
    # The spike's first sample (1 -> 3): the arbiter hears 3 + 1 while the 0.5 s delay runs; Serve stays at 1.
    d = ramp([(0.0, 3)], EARLY)
    assert (d.demand_units, d.num_replicas, d.state.reserve_early) == (4, 1, True)
    assert ramp([(0.0, 3)], SURGE).demand_units == 1  # without it: nothing until the delay has passed
    # Delay passed: the rise is accepted, Serve runs 3 on GPUs already freed, the reserve is confirmed.
    d = ramp([(0.0, 3), (0.5, 3)], EARLY)
    assert (d.demand_units, d.num_replicas, d.state.reserve_early) == (4, 3, False)
    # A later, smaller accepted rise keeps the surge's ask (no give-back and retake within the ramp).
    d = ramp([(0.0, 4), (0.25, 3), (0.5, 3)], EARLY)
    assert (d.demand_units, d.num_replicas) == (5, 3)


def test_a_surge_that_falls_back_within_the_delay_drops_its_ask_at_once():
    d = ramp([(0.0, 3), (0.25, 1)], EARLY)
    assert (d.demand_units, d.num_replicas, d.state.reserve) == (1, 1, 0)
    # Still above the demand by less than the minimum rise: the delay runs on, and so does the ask.
    d = ramp([(0.0, 3), (0.25, 2)], EARLY)
    assert (d.demand_units, d.num_replicas) == (4, 1)


def test_a_rise_below_the_minimum_never_asks_early():
    d = ramp([(0.0, 2)], EARLY)
    assert (d.demand_units, d.num_replicas, d.state.reserve) == (1, 1, 0)
    assert ramp([(0.0, 3)], replace(EARLY, early_reclaim_min_rise=3)).demand_units == 1


def test_a_surge_blip_never_takes_away_a_reserve_already_accepted():
    # 1 -> 5 accepted at 0.5 (asks 7); a blip to 8 at 1.0 falls back at 1.25: the accepted reserve stays.
    d = ramp([(0.0, 5), (0.5, 5), (1.0, 8), (1.25, 5)], EARLY)
    assert (d.demand_units, d.num_replicas, d.state.reserve, d.state.reserve_early) == (7, 5, 7, False)


def test_without_a_reserve_fraction_a_surge_asks_for_the_load_alone():
    d = ramp([(0.0, 3)], replace(EARLY, surge_reserve_fraction=0.0))
    assert (d.demand_units, d.num_replicas) == (3, 1)


RAMP = replace(EARLY, ramp_window_s=2.0)


def test_a_ramp_of_single_steps_is_counted_from_its_base():
    # A spike that reaches the hook as 1, 2, 3, 4 replicas' worth, 0.5-1.5 s apart. Without the window: one
    # reclaim a step.
    steps = [(0.0, 2), (0.5, 2), (1.0, 3), (1.1, 3)]
    assert ramp(steps, EARLY).demand_units == 2  # 2 -> 3 is a rise of one: no reserve, not early
    d = ramp(steps, RAMP)
    assert (d.demand_units, d.num_replicas, d.state.reserve_early) == (4, 2, True)  # 3 + (3 - 1) / 2, early
    d = ramp([*steps, (1.5, 3)], RAMP)
    assert (d.demand_units, d.num_replicas, d.state.reserve_early) == (4, 3, False)


def test_a_rise_after_the_ramp_window_starts_a_ramp_of_its_own():
    d = ramp([(0.0, 2), (0.5, 2), (2.5, 3), (2.6, 3), (3.0, 3)], RAMP)
    assert (d.demand_units, d.num_replicas) == (3, 3)  # 2 -> 3 two seconds after the last rise: one replica


def test_scaling_bounds_refuse_nonsense():
    with pytest.raises(ValueError, match="min_replicas"):
        ScalingBounds(min_replicas=3, max_replicas=2, target_ongoing_requests=1)
    with pytest.raises(ValueError, match="target_ongoing_requests"):
        ScalingBounds(min_replicas=0, max_replicas=2, target_ongoing_requests=0)
    with pytest.raises(ValueError, match="upscale_delay_s"):
        ScalingBounds(min_replicas=0, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=-1)
    with pytest.raises(ValueError, match="surge_reserve_fraction"):
        ScalingBounds(min_replicas=0, max_replicas=2, target_ongoing_requests=1, surge_reserve_fraction=-1)
    with pytest.raises(ValueError, match="ramp_window_s"):
        ScalingBounds(min_replicas=0, max_replicas=2, target_ongoing_requests=1, ramp_window_s=-1)
    with pytest.raises(ValueError, match="early_reclaim_min_rise"):
        ScalingBounds(min_replicas=0, max_replicas=2, target_ongoing_requests=1, early_reclaim_min_rise=-1)
    with pytest.raises(ValueError, match="regrow_guard_s"):
        ScalingBounds(min_replicas=0, max_replicas=2, target_ongoing_requests=1, regrow_guard_s=-1)


def test_unknown_replicas_fill_the_grant_before_spilling_to_the_preferred_type():
    types = {"a": "H100", "b": None, "c": None}
    assert held_by_type(types, {"H100": 1, "A100": 1}, ["H100", "A100"]) == {"H100": 2, "A100": 1}


def test_known_replicas_are_counted_where_they_run_even_outside_the_grant():
    assert held_by_type({"a": "RTX4090"}, {"H100": 1}, ["H100"]) == {"RTX4090": 1}


def test_a_stopped_replica_counts_as_held_while_it_drains():
    departed = track_departures({"a": "H100", "b": "A100"}, {"a": "H100"}, {}, now_s=10.0, drain_hold_s=3.0)
    assert departed == {"b": ("A100", 10.0)}
    assert track_departures({"a": "H100"}, {"a": "H100"}, departed, now_s=12.0, drain_hold_s=3.0) == departed
    assert track_departures({"a": "H100"}, {"a": "H100"}, departed, now_s=13.0, drain_hold_s=3.0) == {}


def test_a_replica_that_comes_back_is_not_departed():
    departed = {"b": ("A100", 10.0)}
    assert track_departures({"a": "H100"}, {"a": "H100", "b": "A100"}, departed, 11.0, 3.0) == {}


def test_silence_after_zero_replicas_means_a_cold_start_needs_one():
    assert (
        keepalive_demand(
            now_s=12.0,
            last_call_s=10.0,
            last_current_replicas=0,
            last_demand=0,
            min_replicas=0,
            stale_after_s=1.0,
        )
        == 1
    )


def test_recent_calls_or_running_replicas_keep_the_last_demand():
    kw = {"min_replicas": 0, "stale_after_s": 1.0, "last_demand": 0}
    assert keepalive_demand(now_s=10.5, last_call_s=10.0, last_current_replicas=0, **kw) == 0
    assert keepalive_demand(now_s=20.0, last_call_s=10.0, last_current_replicas=2, **kw) == 0


@given(
    total=st.floats(min_value=0, max_value=1e4, allow_nan=False),
    min_r=st.integers(0, 5),
    extra=st.integers(0, 10),
    grant=st.one_of(st.none(), st.integers(0, 20)),
    target=st.floats(min_value=0.1, max_value=50),
    up=st.sampled_from([0.0, 0.5]),
    surge=st.sampled_from([0.0, 1.0, 2.5]),
    early=st.sampled_from([0, 1, 2]),
)
def test_replicas_never_exceed_the_grant_unless_the_minimum_does(
    total, min_r, extra, grant, target, up, surge, early
):
    bounds = ScalingBounds(
        min_r,
        max(1, min_r + extra),
        target,
        downscale_delay_s=0,
        upscale_delay_s=up,
        surge_reserve_fraction=surge,
        early_reclaim_min_rise=early,
    )
    d = decide_replicas(obs(total), bounds, HoldState(), grant)
    assert bounds.min_replicas <= d.demand_units <= bounds.max_replicas
    assert bounds.min_replicas <= d.num_replicas <= bounds.max_replicas
    assert d.num_replicas <= d.demand_units
    if grant is not None:
        assert d.num_replicas <= max(grant, bounds.min_replicas)


@given(loads=st.lists(st.integers(0, 20), min_size=1, max_size=30), delay=st.floats(0, 10))
def test_held_demand_is_never_below_the_current_load(loads, delay):
    state = HoldState()
    for i, load in enumerate(loads):
        state = hold_demand(load, state, float(i), delay)
        assert state.demand >= load


def test_a_replicas_p99_is_the_nearest_rank_of_its_recent_latencies_and_unknown_when_idle():
    from tidal.serving.autoscale_math import LatencyWindow

    window = LatencyWindow(window_s=30.0, max_samples=1000)
    assert window.p99_ms(0.0) is None
    for ms in range(1, 101):
        window.add(0.0, float(ms))
    assert window.p99_ms(1.0) == 99.0  # ceil(0.99 * 100) = the 99th of 100
    window.add(20.0, 5.0)
    assert window.p99_ms(31.0) == 5.0  # the first hundred are older than the window
    assert window.p99_ms(51.0) is None


GUARDED = replace(EARLY, regrow_guard_s=60.0, slo_p99_ms=1000.0)


def guarded(loads_at: list[tuple[float, float, float | None]], bounds: ScalingBounds = GUARDED):
    """``ramp`` with the replicas' p99 in each sample: (time, load, p99 ms)."""
    d = None
    for t, load, p99 in loads_at:
        o = LoadObservation(now_s=t, total_requests=load, current_replicas=1, p99_ms=p99)
        d = decide_replicas(o, bounds, HoldState() if d is None else d.state, 8)
    return d


# A spike (1 -> 4) ends at t=1; the demand falls back to 1 at t=9 (the 8 s downscale hold).
SPIKE_AND_BACK = [(0.0, 4, 300.0), (0.5, 4, 300.0), (1.0, 1, 300.0), (9.0, 1, 300.0)]


def test_after_a_spike_a_rise_that_meets_the_slo_takes_no_gpu_back_from_training():
    d = guarded(SPIKE_AND_BACK)
    assert (d.state.demand, d.state.fell_at_s) == (1, 9.0)
    # 20 s later the one replica's queue rises to 3 (a job's restart slowing it): p99 400 ms, within the SLO.
    d = guarded([*SPIKE_AND_BACK, (29.0, 3, 400.0), (29.5, 3, 400.0)])
    assert (d.demand_units, d.num_replicas, d.state.reserve) == (1, 1, 0)
    # Without the guard the same samples ask for 3 + 1 at once (the early reclaim) and run 3.
    d = guarded([*SPIKE_AND_BACK, (29.0, 3, 400.0), (29.5, 3, 400.0)], replace(GUARDED, regrow_guard_s=0.0))
    assert (d.demand_units, d.num_replicas) == (4, 3)


def test_a_missed_slo_an_unknown_p99_or_the_guards_end_lets_the_rise_through():
    missed = guarded([*SPIKE_AND_BACK, (29.0, 3, 1500.0), (29.5, 3, 1500.0)])
    unknown = guarded([*SPIKE_AND_BACK, (29.0, 3, None), (29.5, 3, None)])
    later = guarded([*SPIKE_AND_BACK, (69.0, 3, 400.0), (69.5, 3, 400.0)])  # 60 s after the fall at t=9
    assert [(d.demand_units, d.num_replicas) for d in (missed, unknown, later)] == [(4, 3)] * 3


def test_a_service_that_never_fell_is_not_guarded():
    d = guarded([(0.0, 1, 300.0), (5.0, 3, 300.0), (5.5, 3, 300.0)])
    assert d.state.fell_at_s is None and (d.demand_units, d.num_replicas) == (4, 3)


def test_an_idle_service_at_its_minimum_has_not_fallen_and_its_first_spike_is_not_guarded():
    # No load for the 8 s hold: the held demand drops below the minimum of 1, which the arbiter never heard.
    idle = [(0.0, 1, 300.0), (1.0, 0, None), (9.0, 0, None)]
    d = guarded(idle)
    assert (d.state.demand, d.demand_units, d.state.fell_at_s) == (0, 1, None)
    d = guarded([*idle, (20.0, 3, 300.0), (20.5, 3, 300.0)])
    assert (d.demand_units, d.num_replicas) == (4, 3)
