"""Arbitrary registrations and heartbeats, garbage included, thrown at the arbiter (hypothesis).

Whatever the calls carry, a call either takes effect or is refused with a ``SpecError`` (a ``ValueError``),
``tick()`` never raises (errors propagate here: nothing contains them), and no tick grants more GPUs of a
type than the healthy nodes have. Restarts (``dump_state`` / ``restore_state``) are among the steps.
"""

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tidal.cluster.arbiter import ArbiterConfig, FakeBackend, ManualClock, ResourceArbiter
from tidal.cluster.model import Allocation, NodeSnapshot, ServiceSpec, TrainingJobSpec
from tidal.cluster.specs import SpecError
from tidal.policies.config import build_policy, parse_policy_config

TYPES = ("H100", "A100", "RTX4090")
NAMES = ("s0", "s1", "j0", "j1", "j2")
GARBAGE = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=4),
    st.just(math.nan),
    st.just(math.inf),
    st.just(-math.inf),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def mostly(valid, garbage=GARBAGE):
    """``valid`` nine times in ten, else garbage: enough valid calls that workloads register and GPUs move."""
    return st.integers(0, 9).flatmap(lambda k: garbage if k == 0 else valid)


GPU_TYPES = mostly(st.sampled_from((*TYPES, "T4")))
COUNT = mostly(st.integers(0, 12), st.integers(-3, -1) | GARBAGE)
GPUS = mostly(st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0]), st.sampled_from([0.0, -1.0]) | GARBAGE)
TIME = mostly(st.floats(0, 100))


@st.composite
def specs(draw):
    """A valid spec, with one or two fields replaced by garbage (or a bad value) half the time."""
    types = tuple(draw(st.lists(st.sampled_from((*TYPES, "T4")), min_size=1, max_size=3, unique=True)))
    lo = draw(st.integers(0, 3))
    if draw(st.booleans()):
        cls = ServiceSpec
        values = [draw(st.sampled_from(NAMES[:2])), draw(st.sampled_from([0.25, 0.5, 1.0, 2.0])), lo,
                  lo + draw(st.integers(0, 8)) or 1, types, 200.0, draw(st.integers(0, 200))]  # fmt: skip
    else:
        cls = TrainingJobSpec
        values = [draw(st.sampled_from(NAMES[2:])), draw(st.sampled_from([1.0, 2.0, 4.0])), lo + 1,
                  lo + 1 + draw(st.integers(0, 6)), types, draw(st.integers(0, 200)), draw(st.booleans()),
                  1.0, 60.0, draw(st.sampled_from([0.0, 5.0, 30.0]))]  # fmt: skip
    if draw(st.booleans()):
        bad = st.one_of(GARBAGE, st.sampled_from([0, -1, 0.0, -2.5, (), ("",), ("H100", "H100"), 100]))
        for i in draw(st.lists(st.integers(0, len(values) - 1), min_size=1, max_size=2)):
            values[i] = draw(bad)
    return cls(*values)


HASHABLE = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.just(math.nan), st.integers(-5, 5))
HELD = mostly(st.dictionaries(mostly(st.sampled_from((*TYPES, "T4")), HASHABLE), COUNT, max_size=3))

STEPS = st.one_of(
    st.tuples(st.just("register"), specs(), st.one_of(st.none(), COUNT), mostly(st.sampled_from([None, {"k": 1}]))),
    st.tuples(
        st.just("heartbeat"),
        mostly(st.sampled_from(NAMES)),
        st.one_of(st.none(), COUNT),
        st.one_of(st.none(), HELD, st.just("grant")),
        st.one_of(st.none(), TIME),
    ),
    st.tuples(st.just("unregister"), st.sampled_from(NAMES)),
    st.tuples(st.just("advance"), st.floats(0, 40)),
    st.tuples(st.just("node"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("restart")),
)


def granted_gpus(arb, status_workloads):
    out: dict[str, float] = {}
    for w in status_workloads:
        for t, n in w["grant_gpus"].items():
            out[t] = out.get(t, 0.0) + n
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.sampled_from(TYPES), st.sampled_from([2, 4, 8])), min_size=1, max_size=4),
    st.lists(STEPS, min_size=5, max_size=60),
)
def test_no_call_makes_a_tick_raise_or_grant_more_gpus_of_a_type_than_exist(node_specs, steps):
    nodes = [NodeSnapshot(f"n{i}", t, g) for i, (t, g) in enumerate(node_specs)]
    backend = FakeBackend(nodes)
    clock = ManualClock(1000.0)
    guards = {"guards": {"job_resize_min_interval_s": 0, "service_downscale_delay_s": 0}}
    config = ArbiterConfig(registration_ttl_s=30.0, default_yield_grace_s=10.0)

    def new_arbiter():
        return ResourceArbiter(build_policy(parse_policy_config(guards)), backend, clock, config)

    arb = new_arbiter()
    for step in steps:
        kind = step[0]
        try:
            if kind == "register":
                arb.register(step[1], step[3], step[2])
            elif kind == "heartbeat":
                name, demand, held, since = step[1:]
                if held == "grant":
                    held = arb.grant_of(name).grant if isinstance(name, str) else {}
                arb.heartbeat(name, demand_units=demand, held=held, seconds_since_checkpoint=since)
            elif kind == "unregister":
                arb.unregister(step[1])
        except SpecError:
            pass
        if kind == "advance":
            clock.advance(step[1])
        elif kind == "node" and step[1] < len(backend.nodes):
            backend.set_healthy(backend.nodes[step[1]].node_id, step[2])
        elif kind == "restart":
            state = arb.dump_state()
            arb = new_arbiter()
            arb.restore_state(state)
        report = arb.tick()
        capacity: dict[str, float] = {}
        for n in backend.nodes:
            if n.healthy:
                capacity[n.gpu_type] = capacity.get(n.gpu_type, 0.0) + n.num_gpus
        granted = granted_gpus(arb, arb.status()["workloads"])
        for t, g in granted.items():
            assert g <= capacity.get(t, 0.0) + 1e-9, (t, g, capacity, report.grants)
        assert all(isinstance(a, Allocation) for a in report.grants.values())
