"""The Ray backend's forced stops, with Ray's node table, state API and kills injected: a service is capped to
its grant on the type reclaimed, a job's second stop is harder, and a stop that cannot be sent says why; and
the metrics that count them."""

from __future__ import annotations

import pytest
from builders import make_job, make_service
from prometheus_client.parser import text_string_to_metric_families
from tidal.cluster.arbiter import ArbiterEvent, TickReport
from tidal.cluster.metrics import ArbiterMetrics
from tidal.cluster.model import Allocation
from tidal.cluster.ray_backend import RayBackend


def _row(node_id: str, gpu_type: str, gpus: float) -> dict:
    return {
        "NodeID": node_id,
        "Alive": True,
        "Labels": {"ray.io/accelerator-type": gpu_type},
        "Resources": {"GPU": gpus},
    }


NODES = [_row("h1", "H100", 2), _row("a1", "A100", 4)]


def _replica(i: int, node_id: str, app: str = "digits", deployment: str = "TidalModel") -> dict:
    return {
        "name": f"SERVE_REPLICA::{app}#{deployment}#r{i}",
        "class_name": f"ServeReplica:{app}:{deployment}",
        "node_id": node_id,
        "state": "ALIVE",
    }


class FakeRay:
    """The actors the state API lists, and the ones killed (name, namespace)."""

    def __init__(self, actors):
        self.actors = list(actors)
        self.killed: list[tuple[str, str]] = []

    def list_actors(self, filters):
        assert ("state", "=", "ALIVE") in filters
        return [a for a in self.actors if (a["name"], "serve") not in self.killed]

    def kill(self, name, namespace):
        self.killed.append((name, namespace))


def _backend(fake: FakeRay) -> RayBackend:
    return RayBackend(lambda: NODES, list_actors=fake.list_actors, kill_actor=fake.kill)


SERVICE_META = {"kind": "serve-deployment", "serve_app": "digits", "serve_deployment": "TidalModel"}


def test_a_service_beyond_its_grant_loses_the_replicas_beyond_it_on_the_type_reclaimed_only():
    fake = FakeRay(
        [_replica(1, "h1"), _replica(2, "h1"), _replica(3, "a1"), _replica(4, "a1"), _replica(5, "a1"),
         _replica(6, "a1", app="other")]
    )  # fmt: skip
    result = _backend(fake).force_release(
        "digits", make_service("digits"), SERVICE_META,
        held=Allocation.of(H100=2, A100=3), grant=Allocation.of(H100=2, A100=1), attempt=1,
    )  # fmt: skip
    assert result.issued and not result.confirmed
    assert fake.killed == [
        ("SERVE_REPLICA::digits#TidalModel#r3", "serve"),
        ("SERVE_REPLICA::digits#TidalModel#r4", "serve"),
    ]
    assert "2 replica(s) of digits/TidalModel" in result.how


def test_a_service_whose_meta_names_no_deployment_is_found_as_the_only_deployment_of_its_application():
    fake = FakeRay([_replica(1, "a1"), _replica(2, "a1")])
    result = _backend(fake).force_release(
        "digits", make_service("digits"), {"kind": "serve-deployment"},
        held=Allocation.of(A100=2), grant=Allocation.of(A100=1), attempt=2,
    )  # fmt: skip
    assert result.issued and fake.killed == [("SERVE_REPLICA::digits#TidalModel#r1", "serve")]


def test_a_service_that_cannot_be_found_in_serve_is_not_stopped_and_says_why():
    fake = FakeRay([_replica(1, "a1", app="other")])
    result = _backend(fake).force_release(
        "digits", make_service("digits"), {"kind": "serve-deployment"},
        held=Allocation.of(A100=2), grant=Allocation.of(A100=1), attempt=1,
    )  # fmt: skip
    assert not result.issued and "no Serve deployment found for service 'digits'" in result.reason
    assert fake.killed == []


def test_a_failing_state_api_is_reported_as_the_reason_not_raised():
    def broken(filters):
        raise ConnectionError("dashboard unavailable")

    backend = RayBackend(lambda: NODES, list_actors=broken, kill_actor=lambda n, ns: None)
    result = backend.force_release(
        "digits", make_service("digits"), SERVICE_META,
        held=Allocation.of(A100=2), grant=Allocation.of(A100=1), attempt=1,
    )  # fmt: skip
    assert not result.issued and result.reason == "ConnectionError: dashboard unavailable"


@pytest.mark.parametrize(
    ("meta", "attempt", "reason"),
    [
        ({"runner": "x"}, 1, "none of stop_actor, submission_id, actor_name"),
        ({"stop_actor": "sig"}, 2, "none of ray_job_submission_id, submission_id, actor_name"),
    ],
)
def test_a_job_without_a_handle_for_the_stop_asked_is_not_stopped_and_says_why(meta, attempt, reason):
    result = _backend(FakeRay([])).force_release(
        "job", make_job(), meta, held=Allocation.of(H100=2), grant=Allocation.of(H100=1), attempt=attempt
    )
    assert not result.issued and reason in result.reason


def test_a_jobs_harder_stop_ends_its_ray_job_through_the_job_api():
    stopped = []
    backend = _backend(FakeRay([]))
    backend._stop_job = stopped.append  # (the job API needs a dashboard)
    meta = {"stop_actor": "sig", "ray_job_submission_id": "raysubmit_7"}
    result = backend.force_release(
        "job", make_job(), meta, held=Allocation.of(H100=2), grant=Allocation.of(H100=1), attempt=2
    )
    assert result.issued and stopped == ["raysubmit_7"] and result.how == "job raysubmit_7 stopped"


def test_metrics_count_harder_stops_and_failed_ones_and_time_a_confirmed_forced_release():
    m = ArbiterMetrics()
    events = (
        ArbiterEvent(10.0, "forced", "job", {"attempt": 1}),
        ArbiterEvent(15.0, "force_escalated", "job", {"attempt": 2}),
        ArbiterEvent(15.0, "force_failed", "svc", {"attempt": 1, "reason": "no deployment"}),
        ArbiterEvent(16.0, "force_confirmed", "job", {"reclaim_s": 16.0, "attempts": 2}),
    )
    m.on_tick(TickReport(16.0, 1.0, {}, (), events))
    s = {
        (x.name, tuple(sorted(x.labels.items()))): x.value
        for f in text_string_to_metric_families(m.render())
        for x in f.samples
    }
    assert s[("tidal_forced_release_escalations_total", (("workload", "job"),))] == 1.0
    assert s[("tidal_forced_release_failures_total", (("workload", "svc"),))] == 1.0
    assert s[("tidal_reclaim_duration_seconds_sum", ())] == 16.0


def test_a_service_named_app_dot_deployment_is_found_by_its_name():
    fake = FakeRay([_replica(1, "h1", app="shop", deployment="Ranker"), _replica(2, "h1", app="shop", deployment="Other")])
    result = _backend(fake).force_release(
        "shop.Ranker", make_service("shop.Ranker"), {"kind": "serve-deployment"},
        held=Allocation.of(H100=1), grant=Allocation(), attempt=1,
    )  # fmt: skip
    assert result.issued and fake.killed == [("SERVE_REPLICA::shop#Ranker#r1", "serve")]
