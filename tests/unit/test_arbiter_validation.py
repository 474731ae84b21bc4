"""The arbiter's own calls are validated at the boundary, and no workload's data or policy error ends a tick."""

import math

import pytest
from builders import make_job, make_nodes, make_service
from tidal.cluster.arbiter import ArbiterConfig, FakeBackend, ManualClock, ResourceArbiter
from tidal.cluster.model import Allocation, spec_to_dict
from tidal.cluster.specs import SpecError, parse_workload_spec
from tidal.policies.base import PolicyDecision
from tidal.policies.config import build_policy, parse_policy_config

FAST_GUARDS = {"guards": {"job_resize_min_interval_s": 0, "service_downscale_delay_s": 0}}


def make_arbiter(policy=None, **config):
    backend = FakeBackend(make_nodes(H100=1))
    clock = ManualClock(1000.0)
    policy = policy or build_policy(parse_policy_config(FAST_GUARDS))
    return ResourceArbiter(policy, backend, clock, ArbiterConfig(registration_ttl_s=15.0, **config)), backend, clock


@pytest.mark.parametrize(
    ("spec", "field", "shown"),
    [
        (make_service(gpus_per_replica=math.nan), "gpus_per_replica", "nan"),
        (make_service(gpus_per_replica=math.inf), "gpus_per_replica", "inf"),
        (make_service(gpus_per_replica=0.0), "gpus_per_replica", "0.0"),
        (make_service(gpus_per_replica=-1.0), "gpus_per_replica", "-1.0"),
        (make_job(gpus_per_worker=math.nan), "gpus_per_worker", "nan"),
        (make_job(gpus_per_worker=-2.0), "gpus_per_worker", "-2.0"),
        (make_service(min_replicas=5, max_replicas=2), "min_replicas", "5"),
        (make_job(min_workers=9, max_workers=8), "min_workers", "9"),
        (make_job(yield_grace_s=math.nan), "yield_grace_s", "nan"),
        (make_service(gpu_types=()), "gpu_types", "[]"),
        (make_service(gpu_types=("",)), "gpu_types", "''"),
        (make_service(gpu_types=("H100", 7)), "gpu_types", "7"),
        (make_service(gpu_types=("H 100",)), "gpu_types", "'H 100'"),
        (make_service(max_replicas="4"), "max_replicas", "'4'"),
        (make_job(priority=1.5), "priority", "1.5"),
        (make_job(name=""), "name", "''"),
    ],
)
def test_a_registration_with_bad_values_is_refused_naming_the_field_the_value_and_what_is_valid(spec, field, shown):
    arb, _, _ = make_arbiter()
    with pytest.raises(SpecError) as err:
        arb.register(spec)
    message = str(err.value)
    assert field in message and shown in message
    assert not arb.grant_of(spec.name).registered
    arb.tick()


def test_a_registration_with_a_negative_or_non_integer_demand_is_refused():
    arb, _, _ = make_arbiter()
    with pytest.raises(SpecError, match=r"demand_units.*-1"):
        arb.register(make_job(), demand_units=-1)
    with pytest.raises(SpecError, match=r"demand_units.*nan"):
        arb.register(make_job(), demand_units=math.nan)
    assert not arb.grant_of("job").registered


@pytest.mark.parametrize(
    ("kwargs", "field", "shown"),
    [
        ({"demand_units": -1}, "demand_units", "-1"),
        ({"demand_units": math.nan}, "demand_units", "nan"),
        ({"demand_units": 2.5}, "demand_units", "2.5"),
        ({"demand_units": "3"}, "demand_units", "'3'"),
        ({"held": {"H100": -1}}, "held", "-1"),
        ({"held": {"H100": 1.5}}, "held", "1.5"),
        ({"held": {"H100": math.nan}}, "held", "nan"),
        ({"held": {7: 1}}, "held", "7"),
        ({"held": [("H100", 1)]}, "held", "[('H100', 1)]"),
        ({"seconds_since_checkpoint": math.nan}, "seconds_since_checkpoint", "nan"),
        ({"seconds_since_checkpoint": -5.0}, "seconds_since_checkpoint", "-5.0"),
        ({"seconds_since_checkpoint": "soon"}, "seconds_since_checkpoint", "'soon'"),
        ({"progress": 12}, "progress", "12"),
    ],
)
def test_a_heartbeat_with_bad_values_is_refused_naming_the_field_and_changes_nothing(kwargs, field, shown):
    arb, _, _ = make_arbiter()
    arb.register(make_job(max_workers=4, gpu_types=("H100",)), demand_units=4)
    arb.tick()
    before = arb.status()["workloads"]
    with pytest.raises(SpecError) as err:
        arb.heartbeat("job", **kwargs)
    assert field in str(err.value) and shown in str(err.value)
    assert arb.status()["workloads"] == before
    arb.tick()
    assert arb.grant_of("job").grant == Allocation.of(H100=4)


def test_a_spec_as_a_dict_is_validated_with_its_kind_at_the_actor_boundary():
    spec = make_service(gpus_per_replica=0.5)
    assert parse_workload_spec(spec_to_dict(spec)) == spec
    assert parse_workload_spec(spec_to_dict(make_job())) == make_job()
    with pytest.raises(SpecError, match=r"gpus_per_replica.*nan"):
        parse_workload_spec({**spec_to_dict(spec), "gpus_per_replica": math.nan})
    with pytest.raises(SpecError, match=r"kind.*'batch'.*service, training"):
        parse_workload_spec({**spec_to_dict(spec), "kind": "batch"})
    with pytest.raises(SpecError, match="a mapping"):
        parse_workload_spec(["not", "a", "dict"])


def test_a_policy_that_raises_does_not_end_a_containing_tick_and_the_last_good_grants_stay():
    class FlakyPolicy:
        name = "flaky"

        def __init__(self):
            self.calls = 0

        def decide(self, snapshot, state):
            self.calls += 1
            if self.calls == 2:
                raise ZeroDivisionError("a workload's data broke the policy")
            return PolicyDecision({"job": Allocation.of(H100=4)}), state

    arb, backend, clock = make_arbiter(FlakyPolicy(), contain_errors=True)  # as the actor runs it
    arb.register(make_job(max_workers=4, gpu_types=("H100",)))
    arb.tick()
    clock.advance(1)
    report = arb.tick()  # the policy raises
    assert report.grants == {"job": Allocation.of(H100=4)}
    assert backend.applied[-1] == {"job": Allocation.of(H100=4)}
    errors = [e for e in arb.events() if e.kind == "error"]
    assert len(errors) == 1 and "ZeroDivisionError" in errors[0].detail["error"]
    assert arb.tick_errors == 1 and "ZeroDivisionError" in arb.last_tick_error
    clock.advance(1)
    arb.tick()  # and the next tick decides again
    assert arb.grant_of("job").grant == Allocation.of(H100=4)


def test_a_policy_error_propagates_by_default_as_tests_and_the_simulator_want():
    class BrokenPolicy:
        name = "broken"

        def decide(self, snapshot, state):
            raise ZeroDivisionError("boom")

    backend = FakeBackend(make_nodes(H100=1))
    arb = ResourceArbiter(BrokenPolicy(), backend, ManualClock(0.0), ArbiterConfig())
    with pytest.raises(ZeroDivisionError):
        arb.tick()
