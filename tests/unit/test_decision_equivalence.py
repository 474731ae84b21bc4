"""Speed work must not change decisions: seeded multi-tick runs against digests of known decisions.

The tidal digests are those of the priority rule (a service grows to its want, reclaiming lower-priority
jobs down to zero, before lower-priority waiting jobs start; stopped jobs wait out the restart hold); the
others are those of the plain decision path, without its shortcuts (memoised fits and hopeless types,
per-type versions, reused grants, the packer's sorted capacities), which must decide the same. A change
that alters what the arbiter decides fails here; if the change of behaviour is intended, record the
new digests (run this file with ``TIDAL_PRINT_DIGESTS=1``) and say so in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import pytest
from tidal.cluster.arbiter import ArbiterConfig, FakeBackend, ManualClock, ResourceArbiter
from tidal.cluster.model import NodeSnapshot, ServiceSpec, TrainingJobSpec
from tidal.policies.config import build_policy, parse_policy_config

TYPES = ("H100", "H200", "A100", "RTX4090")


class RecordingPolicy:
    """Wraps the guarded policy and keeps every decision, in a canonical JSON-able form."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.log: list = []

    def decide(self, snapshot, state):
        d, s = self.inner.decide(snapshot, state)
        self.log.append(
            [
                sorted((n, a.as_dict()) for n, a in d.targets.items()),
                [[i.workload, i.reason] for i in d.infeasible],
                [[r.donor, r.recipient, r.gpu_type, r.units] for r in d.reclaims],
            ]
        )
        return d, s


def run_scenario(policy_name: str, seed: int, ticks: int) -> str:
    """A long queue at several priorities, big jobs that fragmentation keeps out, spiky services,
    releases that lag a tick, jobs finishing and arriving, a node dying and coming back."""
    rng = random.Random(seed)
    nodes = [NodeSnapshot(f"n{i:03d}", TYPES[i % 4] if i % 5 else "A100", 8) for i in range(40)]
    clock = ManualClock()
    policy = RecordingPolicy(
        build_policy(parse_policy_config({"policy": policy_name, "static": {"default_serving_share": 0.25}}))
    )
    backend = FakeBackend(nodes)
    arb = ResourceArbiter(policy, backend, clock, ArbiterConfig(registration_ttl_s=1e9))
    services = []
    for i in range(6):
        prefs = tuple(rng.sample(TYPES, k=rng.randint(1, 3)))
        spec = ServiceSpec(f"svc-{i}", rng.choice([0.5, 1.0, 2.0]), 1, 64, prefs, priority=100)
        arb.register(spec, demand_units=2)
        services.append(spec)
    jobs: dict[str, TrainingJobSpec] = {}

    def arrive(big: bool) -> None:
        g = rng.choice([4.0, 8.0]) if big else rng.choice([1.0, 1.0, 2.0, 4.0])
        lo = rng.randint(1, 3) if big else rng.choice([1, 1, 2])
        spec = TrainingJobSpec(
            f"job-{len(jobs) + 1000 * big:05d}",
            g,
            lo,
            lo + rng.randint(0, 5),
            tuple(rng.sample(TYPES, k=rng.randint(1, 4))),
            priority=rng.choice([5, 8, 9]) if big else rng.choice([0, 1, 2, 2]),
            preemptible=big or rng.random() > 0.3,
            weight=rng.choice([1.0, 2.0]),
        )
        arb.register(spec, demand_units=spec.max_workers)
        jobs[spec.name] = spec

    for _ in range(150):
        arrive(big=False)
    lagging: dict = {}
    for k in range(ticks):
        for s in services:
            demand = rng.randint(20, 60) if (k // 6) % 2 else rng.randint(0, 6)
            arb.heartbeat(s.name, demand_units=demand, held=arb.grant_of(s.name).grant)
        for name in sorted(jobs):
            grant = arb.grant_of(name).grant
            held = lagging.get(name, grant) if rng.random() < 0.3 else grant
            lagging[name] = grant
            arb.heartbeat(name, held=held, seconds_since_checkpoint=rng.random() * 600)
            if grant and rng.random() < 0.03:
                arb.unregister(name)
                del jobs[name]
        for _ in range(rng.randint(0, 3)):
            arrive(big=rng.random() < 0.5)
        if k == ticks // 3:
            backend.set_healthy("n007", False)
        if k == 2 * ticks // 3:
            backend.set_healthy("n007", True)
        clock.advance(rng.choice([5.0, 31.0, 61.0]))
        arb.tick()
    return hashlib.sha256(json.dumps(policy.log, sort_keys=True).encode()).hexdigest()


DIGESTS = {
    ("tidal", 1): "b0c58c79d937f98aaeda1af39239a520d0b1facb3f5e99e9993a0345da663a64",
    ("tidal", 2): "4e6424b2bfd15b3d24b7f06ecbc34cdd6b7e2ea0ce855d8de63bad0016699da9",
    ("static", 3): "3ac5831f8b0c9d2b28c03a3995efdc130c55093cf9b5f4b668b410fdff40e563",
    ("ray-alone", 4): "4cb257f360b602344687ecbf08be8f25fc9c3ab5dfcb09599d1e96f235817a2a",
}


@pytest.mark.parametrize(("policy_name", "seed"), sorted(DIGESTS))
def test_decisions_over_a_seeded_run_are_the_ones_recorded_before_the_speed_work(policy_name, seed):
    digest = run_scenario(policy_name, seed, ticks=30)
    if os.environ.get("TIDAL_PRINT_DIGESTS"):
        print(f'    ("{policy_name}", {seed}): "{digest}",')
    assert digest == DIGESTS[(policy_name, seed)]
