"""The Tidal Serve application on a real local cluster, over real HTTP.

One application (one replica of the default digits model) serves the tests of this module; it runs
without an arbiter (its policy falls back to Serve's behaviour), so these tests do not depend on what
other test modules did to the shared arbiter. Placement on granted GPU types and the grants themselves
are tested in ``test_serving_arbiter.py``.
"""

import json
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch
from tidal.serving.manifest import load_model
from tidal.serving.rollout import replicas_by_gpu_type, serve_details
from tidal.training.digits_checkpoint import digits_data

pytestmark = pytest.mark.integration

APP = "digits-http"
ROUTE = "/digits-http"
API_KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def checkpoints(digits_checkpoints):
    return digits_checkpoints


def app_config(name, route, checkpoint, service, **args):
    return {
        "name": name,
        "route_prefix": route,
        "import_path": "tidal.serving.app:build_app",
        "args": {
            "service": {"name": name, **service},
            "model": {"checkpoint": str(checkpoint)},
            "num_cpus_per_replica": 0.25,
            **args,
        },
    }


@pytest.fixture(scope="module")
def serve_app(serve_instance, local_cluster, checkpoints):
    """The digits app on the session's Serve; deleted (with the cold-start app) at the end."""
    from tidal.serving.rollout import delete_app, deploy_config

    cfg = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": local_cluster.serve_http_port},
        "applications": [
            app_config(
                APP,
                ROUTE,
                checkpoints["v1"],
                {"gpu_types": ["A100", "H100"], "min_replicas": 1, "max_replicas": 1},
                api_key=API_KEY,
                max_instances_per_request=64,
                max_body_bytes=64 * 1024,
                # As wide as float32: the model itself then meets inputs whose outputs overflow.
                max_abs_input=3.4e38,
                # No arbiter under this name: the policy runs in its fallback mode.
                autoscaling={"arbiter_name": "tidal-sv-no-arbiter"},
            )
        ],
    }
    deploy_config(cfg, http_port=local_cluster.serve_http_port)
    base = f"http://127.0.0.1:{local_cluster.serve_http_port}{ROUTE}"
    yield {"base": base, "config": cfg}
    for name in (APP, "digits-cold"):
        if name in serve_details().applications:
            delete_app(name)


def tidal_serve(*argv: str) -> int:
    """Run ``tidal serve ARGV`` in this process (already connected to the cluster)."""
    import argparse

    from tidal.serving.cli import register_cli

    parser = argparse.ArgumentParser(prog="tidal")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", *argv])
    return args.func(args)


def auth():
    return {"Authorization": f"Bearer {API_KEY}"}


def test_predictions_over_http_match_the_model_run_directly(serve_app, checkpoints):
    x, _ = digits_data()
    batch = x[:20]
    r = httpx.post(
        f"{serve_app['base']}/v1/predict", json={"instances": batch.tolist()}, headers=auth(), timeout=30
    )
    assert r.status_code == 200, r.text
    body = r.json()
    model = load_model(checkpoints["v1"], "cpu")
    with torch.no_grad():
        expected = model(batch)
    assert body["model_version"] == "digits-v1"
    assert torch.allclose(torch.tensor(body["outputs"]), expected, atol=1e-4)
    assert body["predictions"] == [str(i) for i in expected.argmax(1).tolist()]


@pytest.mark.parametrize(
    ("body", "status", "field", "message"),
    [
        (b"{not json", 400, "body", "not valid JSON"),
        (b'{"instances": [[1, 2, 3]]}', 422, "instances[0]", "expected 64 values"),
        (json.dumps({"instances": [["a"] * 64]}).encode(), 422, "instances[0][0]", "expected a number"),
        (json.dumps({"instances": [[0] * 64] * 65}).encode(), 413, "instances", "limit of 64"),
        (json.dumps({"instances": [[0.5] * 64] * 300}).encode(), 413, "body", "limit of 65536"),
        (b'{"inputs": []}', 422, "inputs", "unknown field"),
        (b"[1, 2]", 422, "body", "expected a JSON object"),
        (b"[" * 50_000, 400, "body", "nested too deeply"),
        (b"\xff\xfe\x00garbage", 400, "body", "not valid JSON"),
        # Numbers no float holds, and the literals Python's parser accepts: refused naming the value.
        (b'{"instances": [[' + b"9" * 5000 + b", 0" * 63 + b"]]}", 422, "instances[0][0]", "finite"),
        (b'{"instances": [[0, 1e400' + b", 0" * 62 + b"]]}", 422, "instances[0][1]", "finite"),
        (b'{"instances": [[NaN' + b", 0" * 63 + b"]]}", 422, "instances[0][0]", "got nan"),
        (b'{"instances": [[0, -Infinity' + b", 0" * 62 + b"]]}", 422, "instances[0][1]", "got -inf"),
        (
            json.dumps({"instances": [[-1e308] * 64]}).encode(),
            422,
            "instances[0][0]",
            "to 3.4e+38, got -1e+308",
        ),
        # Within float32, but the model's outputs overflow: reported, never answered with nulls.
        (json.dumps({"instances": [[0] * 64, [3e38] * 64]}).encode(), 422, "instances[1]", "not finite"),
        (json.dumps({"instances": 10**30}).encode(), 422, "instances", "expected a list"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_problem(serve_app, body, status, field, message):
    r = httpx.post(f"{serve_app['base']}/v1/predict", content=body, headers=auth(), timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field and message in err["message"]


def test_every_route_but_health_needs_the_api_key(serve_app):
    base = serve_app["base"]
    one = {"instances": [[0] * 64]}
    assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
    for path in ("/v1/models", "/openapi.json", "/docs"):
        assert httpx.get(f"{base}{path}", timeout=30).status_code == 401, path
        assert httpx.get(f"{base}{path}", headers=auth(), timeout=30).status_code == 200, path
    r = httpx.post(f"{base}/v1/predict", json=one, headers={"X-API-Key": "wrong-key-000"}, timeout=30)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert (
        httpx.post(f"{base}/v1/predict", json=one, headers={"X-API-Key": API_KEY}, timeout=30).status_code
        == 200
    )
    models = httpx.get(f"{base}/v1/models", headers=auth(), timeout=30).json()["models"]
    assert models[0]["input_shape"] == [64] and models[0]["model_class"] == "tidal.training.models:DigitsMLP"


def test_a_new_checkpoint_rolls_out_without_a_failed_request(serve_app, checkpoints, wait_for):
    base = serve_app["base"]
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client():
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                r = c.post(f"{base}/v1/predict", json={"instances": [[1.0] * 64]}, headers=auth())
                results.append(
                    (r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text)
                )

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) > 10, timeout_s=30, message="traffic before the rollout")
        assert tidal_serve("promote", str(checkpoints["v2"]), "--app", APP) == 0
        n = len(results)
        wait_for(lambda: len(results) > n + 10, timeout_s=30, message="traffic after the rollout")
    finally:
        stop.set()
        for t in threads:
            t.join()
    statuses = Counter(s for s, _ in results)
    assert statuses == Counter({200: len(results)}), statuses
    versions = [v for _, v in results]
    assert versions[0] == "digits-v1" and versions[-1] == "digits-v2"
    # Once every replica serves v2, no request sees v1 again.
    last_v1 = max(i for i, v in enumerate(versions) if v == "digits-v1")
    assert all(v == "digits-v2" for v in versions[last_v1 + 1 :])


def test_promote_refuses_a_checkpoint_that_clients_could_not_use(serve_app, tmp_path, capsys):
    from tidal.serving.manifest import write_model_checkpoint
    from tidal.training.models import DigitsMLP

    bad = write_model_checkpoint(
        DigitsMLP(in_features=32, hidden=8),
        tmp_path / "bad",
        model_class="tidal.training.models:DigitsMLP",
        model_kwargs={"in_features": 32, "hidden": 8},
        version="bad",
        input_shape=[32],
    )
    assert tidal_serve("promote", str(bad), "--app", APP) == 2
    assert "input_shape [32] differs" in capsys.readouterr().err
    assert tidal_serve("promote", str(tmp_path / "missing"), "--app", APP) == 2


def test_tidal_serve_status_lists_the_application_with_its_replicas_by_gpu_type(serve_app, capsys):
    assert tidal_serve("status", "--json") == 0
    rows = {r["app"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[APP]["service"] == APP
    assert sum(rows[APP]["replicas_by_gpu_type"].values()) == 1


def test_a_killed_replica_is_replaced(serve_app, ray_driver, wait_for):
    ray = ray_driver

    def running_ids():
        dep = serve_details().applications[APP].deployments["TidalModel"]
        return {r.replica_id: r.actor_name for r in dep.replicas if r.state == "RUNNING"}

    before = running_ids()
    assert len(before) == 1
    victim_id, victim_name = next(iter(before.items()))
    ray.kill(ray.get_actor(victim_name, namespace="serve"), no_restart=True)
    wait_for(
        lambda: victim_id not in running_ids() and len(running_ids()) == 1,
        timeout_s=90,
        message="a new replica in place of the killed one",
    )
    with pytest.raises(ValueError):
        ray.get_actor(victim_name, namespace="serve")  # the victim's name is gone with it
    r = httpx.post(
        f"{serve_app['base']}/v1/predict", json={"instances": [[0] * 64]}, headers=auth(), timeout=30
    )
    assert r.status_code == 200


def test_min_replicas_zero_holds_nothing_when_idle_and_the_first_request_waits_for_a_replica(
    serve_app, local_cluster, checkpoints
):
    from tidal.serving.rollout import deploy_config

    cold = app_config(
        "digits-cold",
        "/digits-cold",
        checkpoints["v1"],
        {"gpu_types": ["RTX4090"], "min_replicas": 0, "max_replicas": 1},
        autoscaling={"arbiter_name": "tidal-sv-no-arbiter", "downscale_to_zero_delay_s": 1},
    )
    cfg = dict(serve_app["config"])
    cfg["applications"] = [*cfg["applications"], cold]
    deploy_config(cfg, http_port=local_cluster.serve_http_port)
    assert replicas_by_gpu_type("digits-cold", "TidalModel") == {}
    url = f"http://127.0.0.1:{local_cluster.serve_http_port}/digits-cold/v1/predict"
    t0 = time.monotonic()
    r = httpx.post(url, json={"instances": [[0] * 64]}, timeout=120)
    cold_start_s = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert replicas_by_gpu_type("digits-cold", "TidalModel") == {"RTX4090": 1}
    print(f"cold start from zero replicas: {cold_start_s:.1f} s")


def test_tidal_serve_deploys_the_shipped_config_file_and_deletes_it(
    serve_app, checkpoints, local_cluster, capsys
):
    # Runs last in this module: a deploy replaces the set of applications, as `serve deploy` does.
    from tidal.serving import config as serving_config

    config_file = str(Path(serving_config.__file__).parent / "config.yaml")
    port = str(local_cluster.serve_http_port)
    assert (
        tidal_serve("deploy", config_file, "--checkpoint", str(checkpoints["v1"]), "--http-port", port) == 0
    )
    apps = serve_details().applications
    assert set(apps) == {"digits"} and apps["digits"].status == "RUNNING"
    # min_replicas 0 in the shipped file: an idle service starts with no replica and holds no GPU.
    assert replicas_by_gpu_type("digits", "TidalModel") == {}
    assert local_cluster.serve_http_port == serve_details().http_options.port
    assert tidal_serve("delete", "digits") == 0
    assert "digits" not in serve_details().applications
    assert "deleted digits" in capsys.readouterr().out
