"""The runner's pieces that need no cluster: stated metrics, and the grant source used without an arbiter."""

from __future__ import annotations

from tidal.cluster.model import Allocation, TrainingJobSpec
from tidal.training.elastic import ElasticState, Phase, Target, YieldReason
from tidal.training.runner import (
    YIELD_POLL_S,
    YIELD_POLL_WINDOW_S,
    CapacityGrantSource,
    _Attempt,
    attempt_wait_s,
    metric_reached,
    restart_due,
    restart_not_before,
    restore_yield_grace,
    spares_due,
    starting_yield_deadline,
)


def test_a_loss_must_be_at_most_its_threshold_and_anything_else_at_least():
    assert metric_reached("test_loss", 1.9, 2.0)
    assert not metric_reached("test_loss", 2.1, 2.0)
    assert metric_reached("test_accuracy", 0.96, 0.95)
    assert not metric_reached("test_accuracy", 0.94, 0.95)
    assert not metric_reached("test_accuracy", None, 0.95)


def test_without_an_arbiter_a_job_gets_its_preferred_type_that_fits_up_to_its_maximum():
    capacity = {"H100": 1.0, "A100": 8.0}
    source = CapacityGrantSource(capacity=lambda: capacity)
    view = source.register(TrainingJobSpec("j", 1.0, 2, 4, ("H100", "A100")))
    assert view.registered and view.grant == Allocation.of(A100=4)  # 1 H100 is below the minimum of 2
    capacity["H100"] = 3.0
    assert source.heartbeat("j").grant == Allocation.of(H100=3)
    capacity.clear()
    view = source.heartbeat_nowait("j")
    assert view is not None and view.grant == Allocation() and "no accepted GPU type" in (view.reason or "")
    assert source.unregister("j") and not source.heartbeat("j").registered


def test_a_failed_attempt_backs_off_per_failure_a_yielded_one_waits_its_restart_delay():
    assert restart_not_before("failed", 100.0, 2, 3.0, 20.0) == 106.0
    assert restart_not_before("yielded", 100.0, 0, 3.0, 20.0) == 120.0
    assert restart_not_before("yielded", 100.0, 0, 3.0, 0.0) == 100.0
    assert restart_not_before("forced", 100.0, 0, 3.0, 20.0) == float("-inf")


def test_only_a_yield_that_gave_gpus_back_waits_the_restart_delay():
    assert restart_not_before("yielded", 100.0, 0, 3.0, 20.0, "shrink") == 120.0
    assert restart_not_before("yielded", 100.0, 0, 3.0, 20.0, "type_change") == 120.0
    # A grow gave nothing back: its bigger restart waits for nobody (the delay would idle the demo's jobs 60 s).
    assert restart_not_before("yielded", 100.0, 0, 3.0, 20.0, "grow") == float("-inf")


def test_a_restart_delay_ends_when_the_grant_is_back_at_the_size_given_up_from():
    # Shrunk from 4 workers at t=100 with a 60 s delay: still 3 allowed at t=130 -> wait; 4 again -> go now.
    assert not restart_due(130.0, 160.0, 3, 4)
    assert restart_due(130.0, 160.0, 4, 4)
    assert restart_due(130.0, 160.0, 5, 4)  # more than before is back too
    assert restart_due(160.0, 160.0, 3, 4)  # the delay is over: restart at what is left
    # A failure's back-off (nothing given up from) is never cut short, whatever the grant.
    assert not restart_due(103.0, 106.0, 8, None)
    assert restart_due(106.0, 106.0, 1, None)


def test_spares_wait_the_delay_after_a_restarts_first_step_not_after_the_first_attempts():
    # A restart (attempt 1) that first stepped at t=100, delay 40 s: not at 120, at 140.
    assert not spares_due(120.0, 0.0, 1, 100.0, 40.0)
    assert spares_due(140.0, 0.0, 1, 100.0, 40.0)
    # The first attempt starts its spares as soon as it trains (the demo waits for them before its load).
    assert spares_due(120.0, 0.0, 0, 100.0, 40.0)
    # The runner's own rhythm (due_s) holds either way; a restart not yet stepped (inf) never is due.
    assert not spares_due(150.0, 155.0, 1, 100.0, 40.0)
    assert not spares_due(150.0, 0.0, 1, float("inf"), 0.0)


def test_a_starting_attempt_asked_to_give_gpus_back_gets_a_short_grace_not_none():
    # A first step may be done and not yet reported: two seconds to checkpoint at the step boundary.
    assert starting_yield_deadline(100.0, 120.0) == 102.0
    assert starting_yield_deadline(100.0, None) == 102.0
    assert starting_yield_deadline(100.0, 101.0) == 101.0  # never later than the yield's own deadline


def test_a_starting_attempt_seen_training_during_its_short_yield_gets_the_whole_grace_back():
    attempt = _Attempt(index=2, target=Target("H100", 4), started_s=90.0, start_step=158)
    attempt.starting_yield, attempt.starting_yield_full_deadline_s = True, 120.0
    running = ElasticState().started(Target("H100", 4), 90.0)
    state = running.yielding(YieldReason.SHRINK, 100.0, starting_yield_deadline(100.0, 120.0))
    restored = restore_yield_grace(state, attempt)
    assert (restored.phase, restored.yield_deadline_s, attempt.starting_yield) == (Phase.YIELDING, 120.0, False)
    assert restore_yield_grace(restored, attempt) is restored  # once only
    # Nothing to restore: a yield asked after the first step, or no yield running.
    plain = _Attempt(index=3, target=Target("H100", 4), started_s=90.0, start_step=158)
    assert restore_yield_grace(state, plain) is state
    attempt.starting_yield = True
    assert restore_yield_grace(running, attempt) is running


class _FakePg:
    def __init__(self, bundles: list, selectors: list, name: str) -> None:
        self.bundles, self.selectors, self.name = bundles, selectors, name


def test_a_hold_extended_to_a_bigger_grant_asks_only_for_the_added_gpus_and_keeps_the_rest(monkeypatch):
    import tidal.training.runner as runner

    made: list[_FakePg] = []
    removed: list[_FakePg] = []

    def fake_pg(bundles, strategy, name, bundle_label_selector):
        if any(p.name == name for p in made if p not in removed):  # as Ray: "name ... already exists"
            raise RuntimeError(f"Failed to create placement group because name {name!r} already exists.")
        made.append(_FakePg(bundles, bundle_label_selector, name))
        return made[-1]

    monkeypatch.setattr(runner, "placement_group", fake_pg)
    monkeypatch.setattr(runner, "remove_pg", lambda pg, job: removed.append(pg))
    hold = runner.GpuHold("j", 1.0, ["H100", "A100"])
    hold.hold({"H100": 3}, wait=False)
    hold.extend({"H100": 4, "RTX4090": 1})  # a type the job cannot train on is never held
    assert [len(p.bundles) for p in made] == [3, 1] and made[1].selectors == [{runner.GPU_TYPE_LABEL: "H100"}]
    assert hold.grant == {"H100": 4} and removed == []  # nothing held was let go in between
    hold.extend({"H100": 4})
    assert len(made) == 2  # nothing more to ask for
    hold.extend({"H100": 5})  # a third group, under a third name
    assert [p.name for p in made] == ["tidal-hold-j-1", "tidal-hold-j-2", "tidal-hold-j-3"]
    handed = hold.hand_over()
    assert handed == tuple(made) and hold.grant == {} and hold.hand_over() == ()
    # A new hold while the handed-over ones still live (their controller has not removed them yet): a new name.
    hold.hold({"H100": 1}, wait=False)
    assert made[-1].name == "tidal-hold-j-4" and removed == []  # the handed-over groups are the new owner's
    with monkeypatch.context() as m:  # a hold that cannot be placed is logged, not raised: the restart goes on
        m.setattr(runner, "placement_group", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")))
        hold.extend({"H100": 2})
    assert hold.grant == {"H100": 1}
    hold.release()
    assert removed == [made[-1]]


def test_the_loop_looks_often_while_a_yields_gpus_are_not_yet_reported_free():
    assert attempt_wait_s(0.25, yield_age_s=None, released=False) == 0.25
    assert attempt_wait_s(0.25, yield_age_s=0.4, released=False) == YIELD_POLL_S < 0.25
    assert attempt_wait_s(0.25, yield_age_s=0.4, released=True) == 0.25
    assert attempt_wait_s(0.25, yield_age_s=YIELD_POLL_WINDOW_S, released=False) == 0.25  # a slow yield
    assert attempt_wait_s(0.01, yield_age_s=0.4, released=False) == 0.01  # never slower than asked


def _signal(job: str = "j"):
    from tidal.training.signal import JobSignal

    return JobSignal.__ray_actor_class__(job)  # the plain class: its methods, without an actor


def _wait_yield_in_thread(sig, attempt: int):
    import threading

    answer: list[bool] = []
    t = threading.Thread(target=lambda: answer.append(sig.wait_yield(attempt, 60.0)), daemon=True)
    t.start()
    return t, answer


def test_a_held_wait_for_a_yield_is_answered_when_the_yield_is_requested_not_at_its_timeout():
    sig = _signal()
    sig.begin_attempt(0)
    t, answer = _wait_yield_in_thread(sig, 0)
    t.join(timeout=0.2)
    assert t.is_alive() and answer == []  # no yield asked: the call is held
    assert sig.request_yield(0, "shrink")
    t.join(timeout=10)  # (held for 60 s if the request did not wake it)
    assert answer == [True]


def test_a_wait_for_an_attempt_that_is_over_returns_when_the_next_attempt_begins():
    sig = _signal()
    sig.begin_attempt(0)
    t, answer = _wait_yield_in_thread(sig, 0)
    sig.begin_attempt(1)
    t.join(timeout=10)
    assert answer == [False]
    # A yield asked of the new attempt is not one for the old, and a wait for the old one is not held.
    assert not sig.request_yield(0, "shrink") and sig.wait_yield(0, 60.0) is False
    assert sig.request_yield(1, "shrink") and sig.wait_yield(1, 60.0) is True


class _WatchedGrants:
    """A grant source with ``watch_grant``: each call waits until the test hands it the next view."""

    def __init__(self) -> None:
        import queue

        self.views: queue.Queue = queue.Queue()
        self.known: list[dict] = []

    def watch_grant(self, name, known, *, timeout_s):
        self.known.append(dict(known))
        return self.views.get(timeout=30)


def test_a_changed_grant_from_the_held_watch_wakes_the_loop_and_an_unchanged_one_does_not():
    import threading

    from tidal.cluster.model import GrantView
    from tidal.training.runner import ElasticRunner
    from tidal.training.spec import load_spec

    grants = _WatchedGrants()
    runner = ElasticRunner(load_spec("training/jobs/digits.yaml"), grants)
    runner.view = GrantView("digits", Allocation.of({"H100": 4}))
    watcher = threading.Thread(target=runner._watch_grant, args=(grants.watch_grant,), daemon=True)
    watcher.start()
    grants.views.put(GrantView("digits", Allocation.of({"H100": 4})))  # a watch that timed out unchanged
    grants.views.put(GrantView("digits", Allocation.of({"H100": 3})))  # the tick shrank the job
    assert runner._wake.wait(timeout=30)
    assert grants.known[:2] == [{"H100": 4}, {"H100": 4}]
    runner._wake.clear()
    grants.views.put(GrantView("digits", Allocation.of({"H100": 3})))  # the next watch: still 3
    runner.stop()  # wakes the loop itself, and ends the watcher after its current call
    grants.views.put(GrantView("digits", Allocation.of({"H100": 3})))
    watcher.join(timeout=30)
    assert not watcher.is_alive() and grants.known[2] == {"H100": 3}
