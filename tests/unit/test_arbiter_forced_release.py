"""Books that match reality: a forced stop counts only once the holder's report confirms it, a stop that is
not confirmed in time is followed by a harder one, a stop that cannot be sent says why, services are capped
to their grant per GPU type, and a holder that registers again reports what it still holds."""

import logging

import pytest
from builders import make_job, make_nodes, make_service
from tidal.cluster.arbiter import (
    ArbiterConfig,
    FakeBackend,
    ForceCall,
    ForceResult,
    ManualClock,
    ResourceArbiter,
)
from tidal.cluster.model import Allocation
from tidal.cluster.specs import SpecError
from tidal.policies.base import PolicyDecision

GRACE_S = 10.0
CONFIRM_S = 5.0


class ScriptedPolicy:
    """Replays a queue of target maps, one per tick; the last one repeats."""

    name = "scripted"

    def __init__(self, *targets):
        self.queue = list(targets)

    def decide(self, snapshot, state):
        t = self.queue.pop(0) if len(self.queue) > 1 else self.queue[0]
        return PolicyDecision({k: Allocation.of(v) for k, v in t.items()}), state


def _arbiter(policy, nodes=None, ttl_s=120.0, clock=None):
    backend = FakeBackend(nodes or make_nodes(H100=1))
    backend.force_result = ForceResult(issued=True, how="stop sent")  # as on Ray: the holder's report confirms it
    clock = clock or ManualClock(1000.0)
    config = ArbiterConfig(
        registration_ttl_s=ttl_s, default_yield_grace_s=GRACE_S, forced_release_confirm_s=CONFIRM_S
    )
    return ResourceArbiter(policy, backend, clock, config), backend, clock


def _job_forced_from_8_to_4():
    """A job holding 8 H100s, shrunk to 4 for a service at t=1000, and stopped by force at t=1010."""
    job = make_job(max_workers=8, gpu_types=("H100",), yield_grace_s=GRACE_S)
    svc = make_service(max_replicas=8, gpu_types=("H100",))
    arb, backend, clock = _arbiter(ScriptedPolicy({"job": {"H100": 8}}, {"job": {"H100": 4}, "svc": {"H100": 4}}))
    arb.register(job, meta={"stop_actor": "signal"})
    arb.register(svc)
    arb.tick()
    arb.heartbeat("job", held={"H100": 8})
    arb.tick()  # t=1000: shrink to 4
    clock.advance(GRACE_S)
    arb.heartbeat("job", held={"H100": 8})
    arb.tick()  # t=1010: the grace is over
    assert backend.forced == ["job"]
    return arb, backend, clock


def _kinds(arb, workload):
    return [e.kind for e in arb.events() if e.workload == workload]


def test_a_forced_holder_keeps_its_gpus_in_the_books_until_its_report_confirms_the_stop():
    arb, backend, clock = _job_forced_from_8_to_4()
    assert arb.snapshot().workloads[0].held == Allocation.of(H100=8)
    clock.advance(1)
    arb.tick()
    assert arb.grant_of("svc").grant == Allocation()  # the stop is sent, not yet seen to work
    arb.heartbeat("job", held={"H100": 8})  # a report sent before the stop took effect
    arb.tick()
    assert arb.grant_of("svc").grant == Allocation()
    clock.advance(1)
    arb.heartbeat("job", held={"H100": 4})
    arb.tick()
    assert arb.grant_of("svc").grant == Allocation.of(H100=4)
    confirmed = [e for e in arb.events() if e.kind == "force_confirmed"]
    assert [(e.workload, e.detail["attempts"], e.detail["reclaim_s"]) for e in confirmed] == [("job", 1, 12.0)]
    assert "released" not in _kinds(arb, "job")
    clock.advance(CONFIRM_S * 3)
    arb.tick()
    assert backend.forced == ["job"]  # confirmed: nothing harder follows


def test_a_forced_stop_not_confirmed_in_time_is_followed_by_a_harder_one_and_again_until_confirmed():
    arb, backend, clock = _job_forced_from_8_to_4()
    clock.advance(CONFIRM_S - 1)
    arb.heartbeat("job", held={"H100": 8})
    arb.tick()
    assert backend.forced == ["job"]
    clock.advance(1)
    arb.heartbeat("job", held={"H100": 6})  # let some go, not enough
    arb.tick()  # t=1015: no confirming report
    assert [(c.attempt, c.held, c.grant) for c in backend.force_calls] == [
        (1, Allocation.of(H100=8), Allocation.of(H100=4)),
        (2, Allocation.of(H100=6), Allocation.of(H100=4)),
    ]
    assert _kinds(arb, "job")[-1] == "force_escalated"
    assert arb.grant_of("svc").grant == Allocation.of(H100=2)  # the two it let go, no more
    clock.advance(CONFIRM_S)
    arb.tick()  # t=1020: still nothing: the harder stop again
    assert [c.attempt for c in backend.force_calls] == [1, 2, 3]
    arb.heartbeat("job", held={"H100": 4})
    arb.tick()
    assert arb.grant_of("svc").grant == Allocation.of(H100=4)
    assert _kinds(arb, "job")[-1] == "force_confirmed"


def test_a_forced_stop_that_cannot_be_sent_is_logged_with_its_reason_and_tried_harder(caplog):
    job = make_job(max_workers=8, gpu_types=("H100",), yield_grace_s=GRACE_S)
    arb, backend, clock = _arbiter(ScriptedPolicy({"job": {"H100": 8}}, {"job": {"H100": 4}}))
    backend.force_result = ForceResult(issued=False, reason="no actor 'signal' in namespace 'tidal'")
    arb.register(job)
    arb.tick()
    arb.heartbeat("job", held={"H100": 8})
    arb.tick()
    clock.advance(GRACE_S)
    with caplog.at_level(logging.ERROR, logger="tidal.cluster.arbiter"):
        arb.tick()
    failed = [e for e in arb.events() if e.kind == "force_failed"]
    assert [e.detail["reason"] for e in failed] == ["no actor 'signal' in namespace 'tidal'"]
    assert "no actor 'signal' in namespace 'tidal'" in caplog.text
    assert arb.snapshot().workloads[0].held == Allocation.of(H100=8)
    clock.advance(CONFIRM_S)
    arb.tick()
    assert [c.attempt for c in backend.force_calls] == [1, 2]


def test_a_backend_whose_stop_has_taken_effect_frees_the_excess_at_once():
    job = make_job(max_workers=8, gpu_types=("H100",), yield_grace_s=GRACE_S)
    svc = make_service(max_replicas=8, gpu_types=("H100",))
    arb, backend, clock = _arbiter(ScriptedPolicy({"job": {"H100": 8}}, {"job": {"H100": 4}, "svc": {"H100": 4}}))
    backend.force_result = ForceResult(issued=True, confirmed=True, how="simulated stop")
    arb.register(job)
    arb.register(svc)
    arb.tick()
    arb.heartbeat("job", held={"H100": 8})
    arb.tick()
    clock.advance(GRACE_S)
    arb.tick()
    assert arb.grant_of("svc").grant == Allocation.of(H100=4)
    assert list(arb.reclaim_durations_s) == [GRACE_S]


def test_a_service_replica_that_outlives_its_grace_is_stopped_on_the_type_reclaimed_and_its_gpus_wait():
    svc = make_service(max_replicas=8, gpu_types=("H100", "A100"))
    job = make_job(max_workers=4, gpu_types=("A100",))
    arb, backend, clock = _arbiter(
        ScriptedPolicy({"svc": {"H100": 2, "A100": 4}}, {"svc": {"H100": 2, "A100": 1}, "job": {"A100": 3}}),
        nodes=make_nodes(H100=(1, 2), A100=(1, 4)),
    )
    arb.register(svc, meta={"kind": "serve-deployment", "serve_app": "digits", "serve_deployment": "TidalModel"})
    arb.register(job)
    arb.tick()
    arb.heartbeat("svc", held={"H100": 2, "A100": 4})
    arb.tick()  # t=1000: the service gives 3 A100 replicas to the job
    clock.advance(GRACE_S - 1)
    arb.heartbeat("svc", held={"H100": 2, "A100": 4})  # replicas still draining
    arb.tick()
    assert backend.force_calls == []
    clock.advance(1)
    arb.heartbeat("svc", held={"H100": 2, "A100": 4})
    arb.tick()
    assert backend.force_calls == [
        ForceCall("svc", 1, Allocation.of(H100=2, A100=4), Allocation.of(H100=2, A100=1))
    ]
    assert arb.grant_of("job").grant == Allocation()  # the replicas are not seen gone yet
    arb.heartbeat("svc", held={"H100": 2, "A100": 1})
    arb.tick()
    assert arb.grant_of("job").grant == Allocation.of(A100=3)


def test_a_holder_that_registers_again_after_its_ttl_reports_what_it_holds_and_nothing_is_granted_into_it():
    a = make_job("a", max_workers=8, gpu_types=("H100",), yield_grace_s=GRACE_S)
    b = make_job("b", max_workers=8, gpu_types=("H100",))
    arb, backend, clock = _arbiter(ScriptedPolicy({"a": {"H100": 8}}, {"b": {"H100": 8}}), ttl_s=10.0)
    arb.register(a)
    arb.tick()
    arb.heartbeat("a", held={"H100": 8})
    clock.advance(11)
    arb.tick()  # a was silent past its TTL: its registration and grant are gone
    assert not arb.grant_of("a").registered
    view = arb.register(a, held={"H100": 8})  # its heartbeat came back unregistered: it registers again
    assert view.registered and view.release_by_s == pytest.approx(clock.now() + GRACE_S)
    arb.register(b)
    arb.tick()
    assert arb.grant_of("b").grant == Allocation()  # a still holds all 8
    assert {w.name: w.held for w in arb.snapshot().workloads}["a"] == Allocation.of(H100=8)
    clock.advance(GRACE_S)
    arb.heartbeat("a", held={"H100": 8})
    arb.heartbeat("b", held={})
    arb.tick()
    assert backend.forced == ["a"]  # what it holds beyond its grant is due back within its grace
    arb.heartbeat("a", held={})
    arb.tick()
    assert arb.grant_of("b").grant == Allocation.of(H100=8)


def test_a_holder_the_arbiter_lost_registers_with_what_it_holds_and_the_books_take_it():
    job = make_job(max_workers=8, gpu_types=("H100",))
    arb, _, _ = _arbiter(ScriptedPolicy({"job": {"H100": 8}}))
    view = arb.register(job, held={"H100": 3})
    assert view.registered
    assert arb.status()["workloads"][0]["held"] == {"H100": 3}
    arb.tick()
    assert arb.grant_of("job").grant == Allocation.of(H100=8) and arb.grant_of("job").release_by_s is None


def test_a_registration_with_a_bad_held_is_refused_naming_the_field():
    arb, _, _ = _arbiter(ScriptedPolicy({}))
    with pytest.raises(SpecError, match=r"held\['H100'\]"):
        arb.register(make_job(), held={"H100": -1})
    assert not arb.grant_of("job").registered


def test_a_restart_keeps_a_forced_stop_awaiting_its_confirmation_and_the_next_one_is_the_harder_one():
    arb, _, clock = _job_forced_from_8_to_4()
    state = arb.dump_state()
    clock.advance(60)  # downtime
    fresh, backend, _ = _arbiter(ScriptedPolicy({"job": {"H100": 4}, "svc": {"H100": 4}}), clock=clock)
    fresh.restore_state(state)
    fresh.heartbeat("job", held={"H100": 8})
    fresh.tick()
    assert backend.force_calls == [] and fresh.grant_of("svc").grant == Allocation()
    clock.advance(CONFIRM_S)
    fresh.heartbeat("job", held={"H100": 8})
    fresh.tick()
    assert [c.attempt for c in backend.force_calls] == [2]
