"""A training runner that the arbiter no longer knows registers again with what it holds."""

from __future__ import annotations

from pathlib import Path

from tidal.cluster.model import Allocation, GrantView
from tidal.training.runner import ElasticRunner
from tidal.training.spec import load_spec

DIGITS = Path(__file__).resolve().parents[2] / "training" / "jobs" / "digits.yaml"


class RecordingGrantSource:
    """A grant source whose heartbeats say "not registered" (the registration expired) and that records
    every registration."""

    def __init__(self):
        self.registrations: list[dict] = []

    def register(self, spec, meta=None, *, held=None):
        self.registrations.append({"name": spec.name, "held": held})
        return GrantView(spec.name, Allocation.of(held or {}))

    def heartbeat_nowait(self, name, **report):
        return GrantView(name, Allocation(), registered=False, reason="not registered (expired or unknown)")

    def heartbeat(self, name, **report):
        return self.heartbeat_nowait(name, **report)

    def unregister(self, name):
        return True


def test_a_runner_whose_registration_expired_registers_again_with_the_gpus_it_holds():
    spec = load_spec(DIGITS)
    grants = RecordingGrantSource()
    runner = ElasticRunner(spec, grants, capacity=lambda: {"H100": 4.0})
    runner._meta = lambda: {"runner": "tidal.training.run"}  # (its real meta reads the Ray job's context)
    runner.held = {"H100": 2}
    runner._heartbeat()
    assert grants.registrations == [{"name": spec.name, "held": {"H100": 2}}]
    assert runner.view.registered and runner.view.grant == Allocation.of(H100=2)
