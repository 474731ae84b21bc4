"""The arbiter class with a fake backend and a manual clock: release before grant, expiry, restarts."""

import pytest
from builders import make_job, make_nodes, make_service
from tidal.cluster.arbiter import ArbiterConfig, FakeBackend, ManualClock, ResourceArbiter
from tidal.cluster.model import Allocation
from tidal.policies.base import PolicyDecision, PolicyState
from tidal.policies.config import build_policy, parse_policy_config

FAST_GUARDS = {"guards": {"job_resize_min_interval_s": 0, "service_downscale_delay_s": 0}}


def make_arbiter(nodes=None, ttl_s=15.0, policy=None, **cfg):
    backend = FakeBackend(nodes or make_nodes(H100=1))
    clock = ManualClock(1000.0)
    policy = policy or build_policy(parse_policy_config({**FAST_GUARDS, **cfg}))
    arbiter = ResourceArbiter(policy, backend, clock, ArbiterConfig(registration_ttl_s=ttl_s), {"H100": 2.0})
    return arbiter, backend, clock


class ScriptedPolicy:
    """Replays a queue of target maps, one per tick."""

    name = "scripted"

    def __init__(self, *targets):
        self.queue = list(targets)

    def decide(self, snapshot, state):
        t = self.queue.pop(0) if self.queue else {}
        return PolicyDecision({k: Allocation.of(v) for k, v in t.items()}), state


def test_gpus_go_to_the_recipient_only_after_the_donor_reports_their_release():
    svc = make_service(max_replicas=8, gpu_types=("H100",))
    job = make_job(max_workers=8, gpu_types=("H100",))
    policy = ScriptedPolicy({"job": {"H100": 8}}, {"job": {"H100": 4}, "svc": {"H100": 4}}, {"job": {"H100": 4}, "svc": {"H100": 4}})
    arb, _, clock = make_arbiter(policy=policy)
    arb.register(job)
    arb.register(svc)
    arb.tick()
    arb.heartbeat("job", held={"H100": 8})
    clock.advance(1)
    arb.tick()
    assert arb.grant_of("job").grant == Allocation.of(H100=4)
    assert arb.grant_of("svc").grant == Allocation()  # the job still holds 8
    assert arb.grant_of("job").release_by_s == pytest.approx(clock.now() + job.yield_grace_s)
    clock.advance(2)
    arb.heartbeat("job", held={"H100": 4})
    assert arb.needs_tick()
    arb.tick()
    assert arb.grant_of("svc").grant == Allocation.of(H100=4)
    assert list(arb.reclaim_durations_s) == [2.0]


def test_a_service_whose_demand_rises_above_its_grant_asks_for_an_early_tick_and_nothing_else_does():
    svc = make_service(max_replicas=8, gpu_types=("H100",))
    job = make_job(max_workers=8, gpu_types=("H100",))
    arb, _, clock = make_arbiter(nodes=make_nodes(H100=4))
    arb.register(svc, demand_units=1)
    arb.register(job)
    arb.tick()
    arb.heartbeat("job", held=arb.grant_of("job").grant)
    clock.advance(1)
    arb.tick()
    assert arb.grant_of("svc").grant == Allocation.of(H100=1) and not arb.needs_early_tick()
    arb.heartbeat("svc", demand_units=1)  # unchanged
    arb.heartbeat("job", demand_units=6)  # a job's demand is not urgent
    assert not arb.needs_early_tick()
    arb.heartbeat("svc", demand_units=3)
    # Early for the actor, not for the simulator, which ticks early on needs_tick() only.
    assert arb.needs_early_tick() and not arb.needs_tick()
    arb.tick()
    assert not arb.needs_early_tick()
    arb.heartbeat("svc", demand_units=2)  # a fall is not urgent (the guards hold the peak anyway)
    assert not arb.needs_early_tick()


def test_a_donor_that_ignores_the_shrink_is_stopped_by_force_after_its_grace():
    job = make_job(max_workers=8, gpu_types=("H100",), yield_grace_s=10)
    svc = make_service(max_replicas=8, gpu_types=("H100",))
    policy = ScriptedPolicy({"job": {"H100": 8}}, *([{"job": {"H100": 4}, "svc": {"H100": 4}}] * 3))
    arb, backend, clock = make_arbiter(policy=policy)
    arb.register(job, meta={"submission_id": "raysubmit_1"})
    arb.register(svc)
    arb.tick()
    arb.heartbeat("job", held={"H100": 8})
    arb.tick()
    clock.advance(5)
    arb.heartbeat("job", held={"H100": 8})
    arb.tick()
    assert backend.forced == [] and arb.grant_of("svc").grant == Allocation()
    clock.advance(5)
    arb.heartbeat("job", held={"H100": 8})
    arb.tick()
    assert backend.forced == ["job"]
    assert arb.grant_of("svc").grant == Allocation.of(H100=4)
    assert any(e.kind == "forced" for e in arb.events())


def test_a_silent_workload_loses_its_registration_and_grant_after_the_ttl():
    job = make_job(max_workers=8, gpu_types=("H100",))
    arb, _, clock = make_arbiter(ttl_s=10)
    arb.register(job)
    arb.tick()
    assert arb.grant_of("job").grant == Allocation.of(H100=8)
    clock.advance(9)
    arb.tick()
    assert arb.grant_of("job").registered
    clock.advance(2)
    arb.tick()
    view = arb.heartbeat("job", held={"H100": 8})
    assert not view.registered and view.grant == Allocation()
    assert [e.kind for e in arb.events()][-1] == "expired"


def test_state_survives_a_dump_and_restore_into_a_new_arbiter():
    svc = make_service(max_replicas=4, gpu_types=("H100",))
    job = make_job(max_workers=8, gpu_types=("H100",))
    arb, backend, clock = make_arbiter()
    arb.register(svc)
    arb.register(job)
    arb.heartbeat("svc", demand_units=3, held={})
    arb.tick()
    state = arb.dump_state()
    clock.advance(100)  # downtime longer than the TTL is not silence
    fresh = ResourceArbiter(build_policy(parse_policy_config(FAST_GUARDS)), backend, clock)
    fresh.restore_state(state)
    assert fresh.grant_of("svc").grant == arb.grant_of("svc").grant
    assert fresh.grant_of("job").grant == arb.grant_of("job").grant
    fresh.tick()
    assert fresh.grant_of("job").registered


def test_restore_refuses_an_unknown_state_version():
    arb, _, _ = make_arbiter()
    with pytest.raises(ValueError, match="version"):
        arb.restore_state({"version": 99})


def test_a_name_registered_as_a_service_cannot_register_as_a_job():
    arb, _, _ = make_arbiter()
    arb.register(make_service("x"))
    view = arb.register(make_job("x"))
    assert not view.registered and "already registered as a service" in view.reason


def test_unregister_gives_the_gpus_back_at_the_next_tick():
    a = make_job("a", max_workers=8, gpu_types=("H100",))
    b = make_job("b", max_workers=8, gpu_types=("H100",))
    arb, _, clock = make_arbiter()
    arb.register(a)
    arb.tick()
    arb.heartbeat("a", held={"H100": 8})
    arb.register(b)
    clock.advance(1)
    arb.tick()
    assert arb.grant_of("b").grant == Allocation()
    assert arb.unregister("a") and not arb.unregister("a")
    arb.tick()
    assert arb.grant_of("b").grant == Allocation.of(H100=8)


def test_status_reports_allocation_ratio_cost_and_infeasible_requests():
    job = make_job(max_workers=4, gpu_types=("H100",))
    big = make_job("big", gpus_per_worker=16, gpu_types=("H100",))
    arb, _, _ = make_arbiter()
    arb.register(job)
    arb.register(big)
    arb.tick()
    s = arb.status()
    assert s["capacity"] == {"H100": 8.0}
    assert s["allocation_ratio"] == pytest.approx(0.5)
    assert s["cost_per_hour"] == pytest.approx(4 * 2.0)
    assert [i["workload"] for i in s["infeasible"]] == ["big"]


def test_a_dead_node_takes_its_grants_back():
    nodes = make_nodes(H100=2)
    job = make_job(max_workers=16, gpu_types=("H100",))
    arb, backend, clock = make_arbiter(nodes=nodes)
    arb.register(job)
    arb.tick()
    assert arb.grant_of("job").grant == Allocation.of(H100=16)
    backend.set_healthy(nodes[1].node_id, False)
    arb.tick()
    assert arb.grant_of("job").grant == Allocation.of(H100=8)


def test_listeners_see_every_tick_report():
    arb, _, _ = make_arbiter()
    seen = []
    arb.listeners.append(seen.append)
    arb.register(make_job(max_workers=2, gpu_types=("H100",)))
    arb.tick()
    assert seen[0].grants["job"] == Allocation.of(H100=2)
    assert seen[0].decide_ms >= 0.0


def test_policy_state_persists_between_ticks():
    class CountingPolicy:
        name = "counting"

        def decide(self, snapshot, state):
            return PolicyDecision({}), PolicyState({"n": state.data.get("n", 0) + 1})

    arb, _, _ = make_arbiter(policy=CountingPolicy())
    arb.tick()
    arb.tick()
    assert arb.dump_state()["policy_state"] == {"n": 2}


def test_a_second_shrink_during_a_release_gets_its_own_full_grace():
    job = make_job(max_workers=8, gpu_types=("H100",), yield_grace_s=10)
    policy = ScriptedPolicy({"job": {"H100": 8}}, {"job": {"H100": 6}}, {"job": {"H100": 6}}, *([{"job": {"H100": 4}}] * 4))
    arb, backend, clock = make_arbiter(policy=policy)
    arb.register(job)
    arb.tick()
    arb.heartbeat("job", held={"H100": 8})
    arb.tick()  # t=0: shrink to 6, deadline t=10
    clock.advance(8)
    arb.heartbeat("job", held={"H100": 6})  # released in time
    arb.tick()
    arb.tick()  # t=8: shrink to 4, deadline t=18
    clock.advance(4)
    arb.heartbeat("job", held={"H100": 6})
    arb.tick()  # t=12: past the first deadline, but the first shrink was honoured
    assert backend.forced == []
    clock.advance(7)
    arb.heartbeat("job", held={"H100": 6})
    arb.tick()  # t=19: the second shrink's grace is over
    assert backend.forced == ["job"]


def test_reconfigure_swaps_the_policy_and_keeps_grants():
    arb, _, _ = make_arbiter()
    arb.register(make_job(max_workers=4, gpu_types=("H100",)))
    arb.tick()
    before = arb.grant_of("job").grant
    arb.reconfigure(ScriptedPolicy({"job": {"H100": 2}}), prices_per_gpu_hour={"H100": 1.0}, reset_policy_state=True)
    assert arb.grant_of("job").grant == before and arb.needs_tick()
    arb.tick()
    assert arb.grant_of("job").grant == Allocation.of(H100=2)
    assert arb.status()["cost_per_hour"] == 2.0


def test_a_snapshot_follows_every_heartbeat_field_that_changed_and_reuses_the_rest():
    job = make_job(max_workers=8, gpu_types=("H100",))
    waiting = make_job("waiting", max_workers=8, gpu_types=("H100",))
    arb, _, clock = make_arbiter()
    arb.register(job, demand_units=8)
    arb.register(waiting, demand_units=8)
    first = {w.name: w for w in arb.snapshot().workloads}
    again = {w.name: w for w in arb.snapshot().workloads}
    assert again["job"] is first["job"] and again["waiting"] is first["waiting"]
    arb.heartbeat("job", demand_units=3)
    assert next(w for w in arb.snapshot().workloads if w.name == "job").demand_units == 3
    arb.heartbeat("job", held={"H100": 2}, seconds_since_checkpoint=12.5)
    w = next(w for w in arb.snapshot().workloads if w.name == "job")
    assert w.held == Allocation.of(H100=2) and w.seconds_since_checkpoint == 12.5
    arb.heartbeat("waiting", demand_units=8, held={})  # nothing changed: the same snapshot
    assert next(w for w in arb.snapshot().workloads if w.name == "waiting") is first["waiting"]
    arb.register(make_job("waiting", max_workers=2, gpu_types=("H100",)), demand_units=2)
    w = next(w for w in arb.snapshot().workloads if w.name == "waiting")
    assert w.spec.max_workers == 2 and w.demand_units == 2
    view = arb.heartbeat("waiting")
    assert arb.heartbeat("waiting") is view  # an unchanged view is handed out again
    clock.advance(1.0)
    arb.tick()
    assert arb.heartbeat("waiting").generation == arb.generation


def _service_granted_h100_and_a_job_on_one_a100():
    """A service granted 2 H100 units (accepting A100 first), a job granted one of the two A100s; t=1000."""
    svc = make_service(max_replicas=4, gpu_types=("A100", "H100"))
    job = make_job(max_workers=1, gpu_types=("A100",))
    targets = {"svc": {"H100": 2}, "job": {"A100": 1}}
    arb, _, clock = make_arbiter(nodes=make_nodes(A100=(1, 2), H100=(1, 2)), policy=ScriptedPolicy(targets, targets))
    arb.register(svc)
    arb.register(job)
    arb.tick()
    arb.heartbeat("job", held={"A100": 1})
    return arb, clock


def test_a_service_grant_follows_a_replica_that_serve_placed_on_a_free_gpu_of_another_accepted_type():
    # Serve put one of the two replicas on the free A100 (its fallbacks accept it): the books move that unit's
    # grant there, so the H100 it does not use is free for the next decision instead of idle under its grant.
    arb, _ = _service_granted_h100_and_a_job_on_one_a100()
    view = arb.heartbeat("svc", held={"A100": 1, "H100": 1})
    assert view.grant == Allocation.of({"A100": 1, "H100": 1})
    assert [e.detail for e in arb.events() if e.kind == "follow"] == [
        {"from": {"H100": 2}, "to": {"A100": 1, "H100": 1}}
    ]
    assert arb.snapshot().grants["job"] == Allocation.of({"A100": 1})  # nobody else's grant moved
    assert not view.release_by_s  # nothing is asked back: it holds what it is granted


def test_a_service_grant_does_not_follow_a_replica_onto_gpus_granted_to_another_workload():
    arb, _ = _service_granted_h100_and_a_job_on_one_a100()
    arb.heartbeat("job", held={})  # the job let go of its A100 in Ray, but it is still granted it
    view = arb.heartbeat("svc", held={"A100": 2})  # one replica on the free A100, one on the job's
    assert view.grant == Allocation.of({"A100": 1, "H100": 1})  # only the free one is followed
    assert arb.snapshot().grants["job"] == Allocation.of({"A100": 1})


def test_a_service_grant_follows_its_replica_onto_a_dead_jobs_gpu_once_the_job_expires():
    # bench/chaos.py's driver case: the job's driver died, Ray freed its A100 at once and Serve placed a replica
    # there, but the books still give the A100 to the job until its registration expires.
    svc = make_service(max_replicas=2, gpu_types=("A100", "H100"))
    job = make_job(max_workers=1, gpu_types=("A100",))
    targets = {"svc": {"H100": 2}, "job": {"A100": 1}}
    seen = []

    class FirstTargetsThenKeep:  # what the policy is given after the first tick, it keeps
        name = "keep"

        def decide(self, snapshot, state):
            seen.append(dict(snapshot.grants))
            if len(seen) > 1:
                return PolicyDecision(dict(snapshot.grants)), state
            return PolicyDecision({k: Allocation.of(v) for k, v in targets.items()}), state

    arb, _, clock = make_arbiter(nodes=make_nodes(A100=(1, 1), H100=(1, 2)), policy=FirstTargetsThenKeep())
    arb.register(svc)
    arb.register(job)
    arb.tick()
    arb.heartbeat("job", held={"A100": 1})  # then silent
    assert arb.heartbeat("svc", held={"A100": 1, "H100": 1}).grant == Allocation.of({"H100": 2})
    clock.advance(16.0)  # past the 15 s TTL
    arb.heartbeat("svc", held={"A100": 1, "H100": 1})
    arb.tick()
    assert seen[-1] == {"svc": Allocation.of({"A100": 1, "H100": 1})}  # what the policy decided from
    assert arb.snapshot().grants == {"svc": Allocation.of({"A100": 1, "H100": 1})}
