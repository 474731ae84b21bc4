"""The Ray backend's forced stop of a service on the session's local cluster: the replicas beyond the grant
on the type reclaimed are killed through Ray (Serve's replica actors, found by the state API), the others
are left alone."""

from __future__ import annotations

import pytest
from tidal.cluster.model import Allocation, ServiceSpec
from tidal.cluster.ray_backend import RayBackend
from tidal_testing import wait_for

pytestmark = pytest.mark.integration

APP, DEPLOYMENT = "rt-force", "RtForceEcho"
CLASS_NAME = f"ServeReplica:{APP}:{DEPLOYMENT}"


@pytest.fixture(scope="module")
def serve_app(ray_driver, local_cluster):
    from ray import serve

    serve.start(
        proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": local_cluster.serve_http_port}
    )

    @serve.deployment(name=DEPLOYMENT, num_replicas=2, ray_actor_options={"num_gpus": 1, "num_cpus": 0})
    class Echo:
        def __call__(self, request) -> str:
            return "ok"

    serve.run(Echo.bind(), name=APP, route_prefix=f"/{APP}", blocking=False)
    try:
        yield
    finally:
        serve.delete(APP)
        serve.shutdown()


def _alive_replicas() -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000) if a.class_name == CLASS_NAME]


def test_a_service_past_its_grace_loses_its_replicas_beyond_the_grant_on_the_type_reclaimed(serve_app):
    wait_for(lambda: len(_alive_replicas()) == 2, 90, message="two replicas running")
    backend = RayBackend()
    type_of = {n.node_id: n.gpu_type for n in backend.observe()}
    before = _alive_replicas()
    held: dict[str, int] = {}
    for a in before:
        held[type_of[a.node_id]] = held.get(type_of[a.node_id], 0) + 1
    reclaimed = sorted(held)[0]
    grant = {**held, reclaimed: held[reclaimed] - 1}
    spec = ServiceSpec(APP, 1.0, 1, 2, tuple(sorted(held)))
    result = backend.force_release(
        APP, spec, {"kind": "serve-deployment", "serve_app": APP, "serve_deployment": DEPLOYMENT},
        held=Allocation.of(held), grant=Allocation.of(grant), attempt=1,
    )  # fmt: skip
    assert result.issued and not result.confirmed, result.reason
    assert "killed 1 replica(s)" in result.how
    victim = min((a for a in before if type_of[a.node_id] == reclaimed), key=lambda a: a.name)
    assert victim.name in result.how
    wait_for(lambda: victim.name not in {a.name for a in _alive_replicas()}, 30, message="the replica killed")
    survivors = {a.name for a in before} - {victim.name}
    assert survivors <= {a.name for a in _alive_replicas()}
