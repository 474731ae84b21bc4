"""Serve replicas follow the arbiter's grants, on a real cluster, over real HTTP.

The module runs its own arbiter actor (``tidal-arbiter-sv``), so that other modules' workloads on the
session's arbiter cannot change its grants. Its policy is the static split, whose grants an operator sets
by config (``reload_config``): A100 for serving only -> the service may hold at most 2 replicas (one
A100 GPU each) however high its load; H100 added -> up to its max of 3 (2 A100 + 1 H100). That is how
these tests move the grant up and down while a steady load (8 concurrent clients, closed loop: 8 requests
always outstanding, a demand of 4 replicas at 2 per replica, capped at the max of 3) keeps the service
wanting more.
"""

import threading
import time
from collections import Counter

import httpx
import pytest
from tidal.cluster.local import SERVE_CONTROLLER_ENV
from tidal.serving.rollout import delete_app, deploy_config, replicas_by_gpu_type, serve_details

pytestmark = pytest.mark.integration

ARBITER = "tidal-arbiter-sv"
APP = "digits-tidal"
DEPLOYMENT = "TidalModel"


def policy_config(serving_share):
    return {
        "policy": "static",
        "headroom_fraction": 0.0,
        "static": {"serving_share": serving_share},
        "guards": {"service_downscale_delay_s": 0.0},
        "arbiter": {"tick_interval_s": 0.5, "registration_ttl_s": 10.0},
    }


A100_ONLY = {"A100": 1.0, "H100": 0.0, "RTX4090": 1.0}
A100_AND_H100 = {"A100": 1.0, "H100": 1.0, "RTX4090": 1.0}


@pytest.fixture(scope="module")
def arbiter(ray_driver):
    from tidal.cluster.actor import get_or_create_arbiter, kill_arbiter

    handle = get_or_create_arbiter(config=policy_config(A100_ONLY), name=ARBITER, tick_interval_s=0.5)
    ray_driver.get(handle.reload_config.remote(policy_config(A100_ONLY)))
    yield handle
    kill_arbiter(name=ARBITER)


def workload(ray, arbiter, name=APP):
    status = ray.get(arbiter.status.remote(), timeout=10)
    return next((w for w in status["workloads"] if w["name"] == name), None)


@pytest.fixture(scope="module")
def tidal_app(serve_instance, local_cluster, arbiter, digits_checkpoints):
    ckpt = digits_checkpoints["v1"]
    cfg = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": local_cluster.serve_http_port},
        "applications": [
            {
                "name": APP,
                "route_prefix": f"/{APP}",
                "import_path": "tidal.serving.app:build_app",
                "args": {
                    "service": {
                        "name": APP,
                        "gpu_types": ["A100", "H100"],
                        "min_replicas": 1,
                        "max_replicas": 3,
                    },
                    "model": {"checkpoint": str(ckpt)},
                    "num_cpus_per_replica": 0.25,
                    "autoscaling": {
                        "arbiter_name": ARBITER,
                        "target_ongoing_requests": 2,
                        "downscale_delay_s": 5,
                        "upscale_delay_s": 0.5,
                    },
                },
            }
        ],
    }
    deploy_config(cfg, http_port=local_cluster.serve_http_port)
    yield {"url": f"http://127.0.0.1:{local_cluster.serve_http_port}/{APP}/v1/predict", "checkpoint": ckpt}
    if APP in serve_details().applications:
        delete_app(APP)


class SteadyLoad:
    """``n`` clients, each sending the next request when the last one returns (closed loop)."""

    def __init__(self, url: str, n: int) -> None:
        self.url, self.n = url, n
        self.results: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(n)]

    def _client(self) -> None:
        with httpx.Client(timeout=60) as c:
            while not self._stop.is_set():
                try:
                    status = c.post(self.url, json={"instances": [[1.0] * 64]}).status_code
                except httpx.HTTPError:
                    status = 0
                self.results.append((time.monotonic(), status))

    def __enter__(self) -> "SteadyLoad":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def statuses_since(self, t0: float) -> Counter:
        return Counter(s for t, s in self.results if t >= t0)


@pytest.fixture(scope="module")
def load(tidal_app):
    with SteadyLoad(tidal_app["url"], 8) as load:
        yield load


def serve_target_replicas() -> int:
    return serve_details().applications[APP].deployments[DEPLOYMENT].target_num_replicas


def test_the_service_registers_with_its_spec_when_deployed(ray_driver, arbiter, tidal_app, wait_for):
    w = wait_for(lambda: workload(ray_driver, arbiter), timeout_s=30, message="the service registered")
    assert (w["kind"], w["gpus_per_unit"], w["min_units"], w["max_units"]) == ("service", 1.0, 1, 3)


def test_under_load_replicas_grow_up_to_the_grant_and_no_further(
    ray_driver, arbiter, tidal_app, load, wait_for
):
    ray_driver.get(arbiter.reload_config.remote(policy_config(A100_ONLY)))
    # The load needs 3 replicas (the max); the grant allows 2 (the A100s); the H100s stay free in Ray.
    wait_for(
        lambda: (w := workload(ray_driver, arbiter)) and w["demand_units"] == 3 and w["held"] == {"A100": 2},
        timeout_s=180,
        message="demand of 3 reported while holding the 2 granted A100 replicas",
    )
    assert workload(ray_driver, arbiter)["grant"] == {"A100": 2}
    assert serve_target_replicas() == 2
    assert replicas_by_gpu_type(APP, DEPLOYMENT) == {"A100": 2}
    assert ray_driver.available_resources().get("GPU", 0) >= 2  # free GPUs that the grant keeps us off


def test_under_load_the_service_reports_its_p99_for_tidal_status(
    ray_driver, arbiter, tidal_app, load, wait_for
):
    from tidal.cluster.cli import service_rows

    w = wait_for(
        lambda: (w := workload(ray_driver, arbiter)) and w["progress"].get("p99_ms") and w,
        timeout_s=60,
        message="a p99 pushed by the replicas and reported by the hook",
    )
    assert 0 < w["progress"]["p99_ms"] < 60_000
    (row,) = [
        r for r in service_rows(ray_driver.get(arbiter.status.remote(), timeout=10)) if r["name"] == APP
    ]
    assert row["p99_ms"] is not None and row["replicas"] >= 1 and row["gpu_types"] == ["A100", "H100"]


def test_the_serve_controller_runs_with_the_clusters_placement_settings(tidal_app, local_cluster):
    """The replicas below are placed by Serve's controller (pack scheduling), not by the GCS's fallbacks."""
    from ray.util.state import list_actors

    # The session cluster's address, not the one Ray would detect: other clusters may run on this machine.
    (controller,) = list_actors(
        address=local_cluster.address,
        filters=[("class_name", "=", "ServeController"), ("state", "=", "ALIVE")],
    )
    with open(f"/proc/{controller.pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    for k, v in SERVE_CONTROLLER_ENV.items():
        assert env.get(k.encode()) == v.encode(), (k, env.get(k.encode()))


def test_when_the_grant_grows_replicas_grow_onto_the_granted_type(
    ray_driver, arbiter, tidal_app, load, wait_for
):
    ray_driver.get(arbiter.reload_config.remote(policy_config(A100_AND_H100)))
    wait_for(
        lambda: workload(ray_driver, arbiter)["grant"] == {"A100": 2, "H100": 1},
        timeout_s=30,
        message="grant {A100: 2, H100: 1}",
    )
    wait_for(
        lambda: replicas_by_gpu_type(APP, DEPLOYMENT) == {"A100": 2, "H100": 1},
        timeout_s=240,
        message="3 replicas: 2 on the A100 node, 1 on the H100 node",
    )
    wait_for(
        lambda: workload(ray_driver, arbiter)["held"] == {"A100": 2, "H100": 1},
        timeout_s=30,
        message="the arbiter sees the replicas held per type",
    )


def test_when_the_grant_shrinks_replicas_drain_without_failing_a_request(
    ray_driver, arbiter, tidal_app, load, wait_for
):
    ray_driver.get(arbiter.reload_config.remote(policy_config(A100_AND_H100)))
    wait_for(
        lambda: replicas_by_gpu_type(APP, DEPLOYMENT) == {"A100": 2, "H100": 1}, timeout_s=240, message="3"
    )
    t0 = time.monotonic()
    ray_driver.get(arbiter.reload_config.remote(policy_config(A100_ONLY)))
    wait_for(
        lambda: replicas_by_gpu_type(APP, DEPLOYMENT) == {"A100": 2} and serve_target_replicas() == 2,
        timeout_s=120,
        message="the H100 replica drained away",
    )
    wait_for(
        lambda: workload(ray_driver, arbiter)["held"] == {"A100": 2},
        timeout_s=30,
        message="the H100 reported released",
    )
    statuses = load.statuses_since(t0)
    assert statuses[200] > 0 and set(statuses) == {200}, statuses


def test_deleting_the_application_unregisters_the_service_at_once(
    ray_driver, arbiter, tidal_app, load, wait_for
):
    load.__exit__()
    delete_app(APP)
    wait_for(lambda: workload(ray_driver, arbiter) is None, timeout_s=10, message="the service unregistered")
