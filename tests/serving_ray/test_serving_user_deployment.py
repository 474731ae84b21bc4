"""A user's own Serve deployment under Tidal, from its config alone, on a real cluster over real HTTP.

The application is a plain ``@serve.deployment`` class in the user's own module (no Tidal code; it sleeps
0.25 s per request), run in its own ``working_dir`` (a ``file://`` zip) and deployed from a Serve config, as
``serve deploy`` does, whose ``autoscaling_config`` names ``tidal.serve:TidalPolicy``. Its GPUs per replica
(1), bounds (1-3) and placement (A100 first, then H100) are the deployment's own settings.

The module runs its own arbiter (``tidal-arbiter-ud``) with the static split, whose grants it sets by config:
A100 for serving only -> at most 2 replicas (one A100 GPU each) however high the load; H100 added -> up to the
max of 3. A steady load of 8 concurrent clients (closed loop) keeps the service wanting its max.
"""

import threading
import time
import zipfile
from collections import Counter
from pathlib import Path

import httpx
import pytest
from tidal.serving.rollout import delete_app, deploy_config, replicas_by_gpu_type, serve_details

pytestmark = pytest.mark.integration

ARBITER = "tidal-arbiter-ud"
APP, DEPLOYMENT = "shop", "Echo"
SERVICE = f"{APP}.{DEPLOYMENT}"  # the name a service gets by default: app and deployment
PLAIN_APP = "plain"  # the same class, deployed with Serve's default delays

USER_MODULE = """
import asyncio

from ray import serve
from starlette.requests import Request


@serve.deployment
class Echo:
    async def __call__(self, request: Request) -> dict:
        await asyncio.sleep(0.25)
        return {"ok": True}


app = Echo.bind()
"""


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


def selector(*types):
    first, *rest = types
    return {
        "label_selector": {"ray.io/accelerator-type": first},
        "fallback_strategy": [{"label_selector": {"ray.io/accelerator-type": t}} for t in rest],
    }


def app_config(name, working_dir, deployment):
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "user_models:app",
        "runtime_env": {"working_dir": working_dir},
        "deployments": [{"name": DEPLOYMENT, **deployment}],
    }


def user_deployment(gpu_types):
    """The user's deployment settings: Serve's own, plus the policy's line (what a user writes)."""
    return {
        "max_ongoing_requests": 8,
        "ray_actor_options": {"num_gpus": 1, "num_cpus": 0.25, **selector(*gpu_types)},
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 3,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 0,
            "downscale_delay_s": 1,
            "look_back_period_s": 2,
            "metrics_interval_s": 0.5,
            "policy": {
                "policy_function": "tidal.serve:TidalPolicy",
                "policy_kwargs": {
                    "gpu_types": list(gpu_types),
                    "arbiter_name": ARBITER,
                    "downscale_delay_s": 5,
                },
            },
        },
    }


@pytest.fixture(scope="module")
def arbiter(ray_driver):
    from tidal.cluster.actor import get_or_create_arbiter, kill_arbiter

    handle = get_or_create_arbiter(config=policy_config(A100_ONLY), name=ARBITER, tick_interval_s=0.5)
    ray_driver.get(handle.reload_config.remote(policy_config(A100_ONLY)))
    yield handle
    kill_arbiter(name=ARBITER)


@pytest.fixture(scope="module")
def working_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-project")
    zip_path = root / "userproj.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr("userproj/user_models.py", USER_MODULE)
    return Path(zip_path).as_uri()


@pytest.fixture(scope="module")
def user_app(serve_instance, local_cluster, arbiter, working_dir):
    cfg = {
        "proxy_location": "HeadOnly",
        "applications": [app_config(APP, working_dir, user_deployment(["A100", "H100"]))],
    }
    deploy_config(cfg, http_port=local_cluster.serve_http_port)
    yield {"url": f"{serve_instance}/{APP}", "config": cfg}
    if APP in serve_details().applications:
        delete_app(APP, unregister=False)


def workload(ray, arbiter, name=SERVICE):
    status = ray.get(arbiter.status.remote(), timeout=10)
    return next((w for w in status["workloads"] if w["name"] == name), None)


class SteadyLoad:
    """``n`` clients, each sending the next request when the last one returns (closed loop)."""

    def __init__(self, url: str, n: int) -> None:
        self.url = url
        self.results: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(n)]

    def _client(self) -> None:
        with httpx.Client(timeout=60) as c:
            while not self._stop.is_set():
                try:
                    status = c.get(self.url).status_code
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


@pytest.fixture(scope="module")
def load(user_app):
    with SteadyLoad(user_app["url"], 8) as load:
        yield load


def serve_target_replicas(app=APP) -> int:
    return serve_details().applications[app].deployments[DEPLOYMENT].target_num_replicas


def test_a_user_deployment_registers_with_the_bounds_and_gpus_of_its_own_config(
    ray_driver, arbiter, user_app, wait_for
):
    w = wait_for(lambda: workload(ray_driver, arbiter), timeout_s=60, message=f"{SERVICE} registered")
    assert (w["kind"], w["gpus_per_unit"], w["min_units"], w["max_units"]) == ("service", 1.0, 1, 3)
    # Its hook learned where the replica runs without any code in it: held on the replica's node's type.
    wait_for(
        lambda: workload(ray_driver, arbiter)["held"] == replicas_by_gpu_type(APP, DEPLOYMENT) == {"A100": 1},
        timeout_s=60,
        message="the one replica held on A100, as its node's label says",
    )
    progress = workload(ray_driver, arbiter)["progress"]
    assert (progress["serve_app"], progress["serve_deployment"], progress["warnings"]) == (
        APP,
        DEPLOYMENT,
        [],
    )


def test_under_load_it_grows_to_its_grant_and_no_further_on_the_granted_type(
    ray_driver, arbiter, user_app, load, wait_for
):
    ray_driver.get(arbiter.reload_config.remote(policy_config(A100_ONLY)))
    # The load needs 4 replicas (8 requests at 2 each), capped at the max of 3; the grant allows 2 (the A100s).
    wait_for(
        lambda: (w := workload(ray_driver, arbiter)) and w["demand_units"] == 3 and w["held"] == {"A100": 2},
        timeout_s=180,
        message="demand of 3 reported while holding the 2 granted A100 replicas",
    )
    assert workload(ray_driver, arbiter)["grant"] == {"A100": 2}
    assert serve_target_replicas() == 2
    assert replicas_by_gpu_type(APP, DEPLOYMENT) == {"A100": 2}
    assert ray_driver.available_resources().get("GPU", 0) >= 2  # free GPUs that the grant keeps it off


def test_a_bigger_grant_adds_a_replica_on_the_newly_granted_type(
    ray_driver, arbiter, user_app, load, wait_for
):
    ray_driver.get(arbiter.reload_config.remote(policy_config(A100_AND_H100)))
    wait_for(
        lambda: replicas_by_gpu_type(APP, DEPLOYMENT) == {"A100": 2, "H100": 1},
        timeout_s=180,
        message="a third replica on the H100 now granted",
    )
    w = wait_for(
        lambda: (w := workload(ray_driver, arbiter)) and w["held"] == {"A100": 2, "H100": 1} and w,
        timeout_s=30,
        message="the hook reports the H100 replica as held",
    )
    for gpu_type, n in w["held"].items():
        assert n <= w["grant"].get(gpu_type, 0)
    ok = Counter(s for _, s in load.results)
    assert ok[200] > 0 and ok[0] == 0


def test_serves_default_delays_are_warned_about_in_tidal_status(
    ray_driver, arbiter, user_app, working_dir, local_cluster, wait_for
):
    from tidal.cluster.cli import service_rows

    plain = user_deployment(["RTX4090"])
    for key in ("upscale_delay_s", "downscale_delay_s"):
        del plain["autoscaling_config"][key]  # Serve's defaults: 30 s up, 600 s down
    plain["autoscaling_config"]["max_replicas"] = 1
    plain["autoscaling_config"]["policy"]["policy_kwargs"]["name"] = PLAIN_APP
    cfg = dict(user_app["config"])
    cfg["applications"] = [*cfg["applications"], app_config(PLAIN_APP, working_dir, plain)]
    deploy_config(cfg, http_port=local_cluster.serve_http_port)
    try:
        w = wait_for(
            lambda: (w := workload(ray_driver, arbiter, PLAIN_APP)) and w["progress"].get("warnings") and w,
            timeout_s=90,
            message="the service's warnings reported to the arbiter",
        )
        down, up = w["progress"]["warnings"]
        assert "downscale_delay_s is 600 s" in down and "Fix:" in down
        assert "upscale_delay_s is 30 s" in up and "Fix:" in up
        status = ray_driver.get(arbiter.status.remote(), timeout=10)
        (row,) = [r for r in service_rows(status) if r["name"] == PLAIN_APP]
        assert row["warnings"] == [down, up]
        # And once in the Serve controller's log, where Serve logs its own autoscaling decisions.
        logs = Path(local_cluster.session_dir) / "logs" / "serve"
        text = wait_for(
            lambda: (
                (t := "".join(p.read_text(errors="replace") for p in logs.glob("controller_*.log"))).count(
                    down
                )
                and t
            ),
            timeout_s=30,
            message="the warning in the controller's log",
        )
        assert text.count(down) == 1 and text.count(up) == 1
    finally:
        delete_app(PLAIN_APP, unregister=False)


# Each app's policy_kwargs, and what its DEPLOY_FAILED message must say (the field, the bad value, what is valid).
BAD_KWARGS = {
    "bad-type": (
        {"gpu_types": ["B300"]},
        ["policy_kwargs.gpu_types: unknown GPU type 'B300'", "valid: A100"],
    ),
    "bad-priority": (
        {"gpu_types": ["RTX4090"], "priority": -5},
        ["policy_kwargs.priority: -5 is not valid", "valid: an integer >= 0"],
    ),
    "bad-missing": ({"priority": 100}, ["policy_kwargs.gpu_types: missing; valid: a non-empty list"]),
}


def kwargs_app(name, working_dir, kwargs):
    deployment = user_deployment(["RTX4090"])
    deployment["autoscaling_config"]["max_replicas"] = 1
    deployment["autoscaling_config"]["policy"]["policy_kwargs"] = {
        **kwargs,
        "arbiter_name": ARBITER,
        "name": name,
    }
    return app_config(name, working_dir, deployment)


def test_bad_policy_kwargs_fail_their_applications_deploy_naming_the_field_and_a_corrected_config_deploys(
    ray_driver, arbiter, user_app, working_dir, local_cluster, wait_for
):
    bad = [kwargs_app(name, working_dir, kwargs) for name, (kwargs, _) in BAD_KWARGS.items()]
    cfg = {**user_app["config"], "applications": [*user_app["config"]["applications"], *bad]}
    deploy_config(cfg, http_port=local_cluster.serve_http_port, wait=False)
    try:
        apps = wait_for(
            lambda: (
                (a := serve_details().applications)
                and all(n in a and str(a[n].status.value) == "DEPLOY_FAILED" for n in BAD_KWARGS)
                and a
            ),
            timeout_s=120,
            message="the three applications DEPLOY_FAILED",
        )
        for name, (_, expected) in BAD_KWARGS.items():
            for part in expected:
                assert part in apps[name].message, apps[name].message
            assert f"deployment '{DEPLOYMENT}'" in apps[name].message
            assert workload(ray_driver, arbiter, name) is None
        # The other application was not touched: it runs, answers, and its service is heard.
        assert str(apps[APP].status.value) == "RUNNING"
        assert httpx.get(user_app["url"], timeout=30).status_code == 200
        assert workload(ray_driver, arbiter) is not None

        # The priority corrected (and the other two dropped), the same application deploys and registers.
        fixed = kwargs_app("bad-priority", working_dir, {"gpu_types": ["RTX4090"], "priority": 5})
        cfg = {**user_app["config"], "applications": [*user_app["config"]["applications"], fixed]}
        deploy_config(cfg, http_port=local_cluster.serve_http_port)  # raises on DEPLOY_FAILED
        w = wait_for(
            lambda: workload(ray_driver, arbiter, "bad-priority"),
            timeout_s=60,
            message="the corrected app registered",
        )
        assert w["priority"] == 5
    finally:
        for name in BAD_KWARGS:
            if name in serve_details().applications:
                delete_app(name, unregister=False)


def test_deleting_the_application_unregisters_the_service(ray_driver, arbiter, user_app, load, wait_for):
    assert workload(ray_driver, arbiter) is not None
    delete_app(APP, unregister=False)  # as `serve delete` would: Tidal is not asked
    wait_for(
        lambda: workload(ray_driver, arbiter) is None,
        timeout_s=60,
        message=f"{SERVICE} unregistered after its deletion",
    )
    # Unregistered by its hook, not expired after its heartbeats stopped.
    kinds = [
        e["kind"] for e in ray_driver.get(arbiter.events.remote(), timeout=10) if e["workload"] == SERVICE
    ]
    assert "unregistered" in kinds and "expired" not in kinds
