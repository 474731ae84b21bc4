"""An arbiter restart loses nothing: pending releases, their deadlines, and patience until holders report.

A restart is ``dump_state()`` on the old arbiter and ``restore_state()`` on a new one, on the same manual
clock (advanced by the downtime in between), as the actor does through Ray's internal KV.
"""

import pytest
from builders import make_job, make_nodes
from tidal.cluster.arbiter import ArbiterConfig, FakeBackend, ManualClock, ResourceArbiter
from tidal.cluster.model import Allocation
from tidal.policies.base import PolicyDecision


class ScriptedPolicy:
    """Replays a queue of target maps, one per tick; the last one repeats."""

    name = "scripted"

    def __init__(self, *targets):
        self.queue = list(targets)

    def decide(self, snapshot, state):
        t = self.queue.pop(0) if len(self.queue) > 1 else self.queue[0]
        return PolicyDecision({k: Allocation.of(v) for k, v in t.items()}), state


def _arbiter(policy, clock=None, backend=None):
    backend = backend or FakeBackend(make_nodes(H100=1))
    clock = clock or ManualClock(1000.0)
    return ResourceArbiter(policy, backend, clock, ArbiterConfig(registration_ttl_s=120.0)), backend, clock


def _restart(arb, clock, downtime_s, targets):
    """The state of ``arb`` restored into a new arbiter after ``downtime_s`` seconds."""
    state = arb.dump_state()
    clock.advance(downtime_s)
    fresh, backend, _ = _arbiter(ScriptedPolicy(targets), clock)
    fresh.restore_state(state)
    return fresh, backend


def _job_shrunk_from_8_to(units, yield_grace_s=10.0):
    """A job holding 8 H100s whose grant was just cut to ``units`` (at t=1000)."""
    job = make_job(max_workers=8, gpu_types=("H100",), yield_grace_s=yield_grace_s)
    arb, backend, clock = _arbiter(ScriptedPolicy({"job": {"H100": 8}}, {"job": {"H100": units}}))
    arb.register(job)
    arb.tick()
    arb.heartbeat("job", held={"H100": 8})
    arb.tick()
    assert arb.grant_of("job").grant == Allocation.of(H100=units)
    return arb, backend, clock


def test_a_restore_keeps_every_pending_release_with_its_own_deadline():
    job = make_job(max_workers=8, gpu_types=("H100",), yield_grace_s=10)
    arb, _, clock = _arbiter(ScriptedPolicy({"job": {"H100": 8}}, {"job": {"H100": 6}}, {"job": {"H100": 4}}))
    arb.register(job)
    arb.tick()
    arb.heartbeat("job", held={"H100": 8})
    arb.tick()  # t=1000: shrink to 6, due by 1010
    clock.advance(5)
    arb.tick()  # t=1005: shrink to 4, due by 1015
    clock.advance(1)
    arb.heartbeat("job", held={"H100": 6})  # the first shrink is honoured, the second is under way
    fresh, backend = _restart(arb, clock, 1, {"job": {"H100": 4}})  # 9 s of the second grace left at t=1007
    fresh.heartbeat("job", held={"H100": 6})
    clock.advance(4)  # t=1011: past the first shrink's deadline, not the second's
    fresh.heartbeat("job", held={"H100": 6})
    fresh.tick()
    assert backend.forced == []
    assert fresh.grant_of("job").release_by_s == pytest.approx(1016.0)
    clock.advance(5)  # t=1016
    fresh.tick()
    assert backend.forced == ["job"]


def test_release_deadlines_survive_a_restart_as_remaining_time_not_wall_clock():
    arb, _, clock = _job_shrunk_from_8_to(4)
    clock.advance(4)  # 6 s of its grace left
    fresh, backend = _restart(arb, clock, 100, {"job": {"H100": 4}})  # down for 100 s
    fresh.heartbeat("job", held={"H100": 8})  # still holding 8: it has 6 s left from now
    fresh.tick()
    assert backend.forced == []
    clock.advance(5)
    fresh.heartbeat("job", held={"H100": 8})
    fresh.tick()
    assert backend.forced == []
    clock.advance(2)
    fresh.tick()
    assert backend.forced == ["job"]


def test_after_a_restore_nothing_is_forced_before_the_holder_reports_and_a_holder_that_let_go_is_not_stopped():
    arb, _, clock = _job_shrunk_from_8_to(4)
    clock.advance(9)  # 1 s of grace left when the actor dies
    fresh, backend = _restart(arb, clock, 60, {"job": {"H100": 4}})
    fresh.tick()  # the restarted actor ticks before any holder was heard from
    clock.advance(2)  # the remaining second is over, but the saved `held` is stale
    fresh.tick()
    assert backend.forced == []
    fresh.heartbeat("job", held={"H100": 4})  # it let go while the arbiter was down
    fresh.tick()
    assert backend.forced == []
    assert fresh.grant_of("job").release_by_s is None
    assert "released" in [e.kind for e in fresh.events()]


def test_after_a_restore_a_silent_holder_is_forced_only_after_the_restore_grace():
    arb, _, clock = _job_shrunk_from_8_to(4)
    clock.advance(9)
    state = arb.dump_state()
    clock.advance(60)
    backend = FakeBackend(make_nodes(H100=1))
    config = ArbiterConfig(registration_ttl_s=120.0, restore_grace_s=20.0)
    fresh = ResourceArbiter(ScriptedPolicy({"job": {"H100": 4}}), backend, clock, config)
    fresh.restore_state(state)
    clock.advance(19)
    fresh.tick()
    assert backend.forced == []
    clock.advance(2)
    fresh.tick()
    assert backend.forced == ["job"]


def test_restore_refuses_state_that_does_not_parse_and_keeps_what_it_had():
    arb, _, _ = _job_shrunk_from_8_to(4)
    state = arb.dump_state()
    state["registrations"][0]["spec"]["gpus_per_worker"] = float("nan")
    other, _, _ = _arbiter(ScriptedPolicy({}))
    other.register(make_job("kept", gpu_types=("H100",)))
    with pytest.raises(ValueError, match=r"gpus_per_worker.*nan"):
        other.restore_state(state)
    assert other.grant_of("kept").registered and not other.grant_of("job").registered


@pytest.mark.parametrize(
    "broken",
    [
        {"grants": {"job": {"H100": -3}}},
        {"grants": {"job": {"H100": "four"}}},
        {"registrations": [{"spec": {"kind": "training"}}]},
        {"policy_state": [1, 2]},
    ],
)
def test_restored_state_is_validated_like_a_registration(broken):
    arb, _, _ = _job_shrunk_from_8_to(4)
    state = {**arb.dump_state(), **broken}
    fresh, _, _ = _arbiter(ScriptedPolicy({}))
    with pytest.raises(ValueError, match="arbiter state"):
        fresh.restore_state(state)
