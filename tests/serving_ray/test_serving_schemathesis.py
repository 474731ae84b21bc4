"""Schemathesis against Tidal's model server, live on the local cluster: a client can trust its API.

Schemathesis (``schemathesis run``, as a user would run it) reads the server's own ``/openapi.json`` and sends
requests generated from it, valid and invalid, checking every answer against the schema: no 5xx for any body,
every status and body documented, valid requests accepted, invalid ones refused, the API key enforced. The
number of examples per operation is bounded so that the run takes about a minute.

The application takes its API key from its ``runtime_env`` (not from ``args``, not from a node's
environment): the key is resolved once when the application is built and every replica enforces it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

APP = "digits-api"
ROUTE = "/digits-api"
API_KEY = "schemathesis-key-0123"
# Examples per operation and phase (three operations; coverage and fuzzing run, stateful has no links to
# follow): bounded so that the run takes under a minute on two shared cores.
MAX_EXAMPLES = 200
# 413 is how the server refuses a body or an instance count over its limits (documented in the schema);
# Schemathesis's default list of refusals for invalid data does not name it.
SCHEMATHESIS_TOML = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "413", "422"]
"""


@pytest.fixture(scope="module")
def api_app(serve_instance, local_cluster, digits_checkpoints):
    from tidal.serving.rollout import delete_app, deploy_config, serve_details

    cfg = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": local_cluster.serve_http_port},
        "applications": [
            {
                "name": APP,
                "route_prefix": ROUTE,
                "import_path": "tidal.serving.app:build_app",
                "runtime_env": {"env_vars": {"TIDAL_SERVE_API_KEY": API_KEY}},
                "args": {
                    "service": {"name": APP, "gpu_types": ["A100"], "min_replicas": 1, "max_replicas": 1},
                    "model": {"checkpoint": str(digits_checkpoints["v1"])},
                    "num_cpus_per_replica": 0.25,
                    # Small enough for generated bodies to stay quick, large enough that every body the
                    # schema allows (8 instances of 64 numbers) fits under max_body_bytes.
                    "max_instances_per_request": 8,
                    "autoscaling": {"arbiter_name": "tidal-st-no-arbiter"},
                },
            }
        ],
    }
    assert "TIDAL_SERVE_API_KEY" not in os.environ  # the key comes from the runtime_env alone
    deploy_config(cfg, http_port=local_cluster.serve_http_port)
    yield f"http://127.0.0.1:{local_cluster.serve_http_port}{ROUTE}"
    if APP in serve_details().applications:
        delete_app(APP)


def test_the_schema_documents_the_request_body_every_error_and_the_key(api_app):
    assert httpx.get(f"{api_app}/openapi.json", timeout=30).status_code == 401
    assert httpx.get(f"{api_app}/docs", timeout=30).status_code == 401
    spec = httpx.get(f"{api_app}/openapi.json", headers={"X-API-Key": API_KEY}, timeout=30).json()
    predict = spec["paths"]["/v1/predict"]["post"]
    ref = predict["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    instances = body["properties"]["instances"]
    assert (instances["minItems"], instances["maxItems"]) == (1, 8)
    assert (instances["items"]["minItems"], instances["items"]["maxItems"]) == (64, 64)
    assert instances["items"]["items"] == {"type": "number", "minimum": -1e6, "maximum": 1e6}
    assert set(predict["responses"]) == {"200", "400", "401", "413", "422", "500", "503"}
    assert predict["security"] and "security" not in spec["paths"]["/healthz"]["get"]
    assert spec["servers"] == [{"url": ROUTE}]
    docs = httpx.get(f"{api_app}/docs", headers={"X-API-Key": API_KEY}, timeout=30)
    assert docs.status_code == 200 and "PredictRequest" in docs.text


def test_schemathesis_finds_no_failure_on_the_live_endpoint(api_app, tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_TOML)
    report = tmp_path / "report.json"
    cmd = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--no-color",
        "--config-file",
        str(config),
        "run",
        f"{api_app}/openapi.json",
        "--header",
        f"Authorization: Bearer {API_KEY}",
        "--checks",
        "all",
        "--mode",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "1",
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--request-timeout",
        "30",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    run = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"}
    )
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    cases = json.loads(report.read_text())["test_cases"]
    assert cases["generated"] > 3 * 20 and cases["with_failures"] == 0, cases
