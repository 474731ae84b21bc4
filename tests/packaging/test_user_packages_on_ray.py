"""A user's repository with its own ``training/``, ``serving/``, ``cluster/``, ``policies/`` and ``demo/``
packages, run through real Ray next to Tidal (issue 22): Tidal installs under ``tidal.*`` only, so the user's
packages and Tidal's import side by side in the job's driver, in its Ray Train workers and in Serve replicas.

- The job: the real ``ray job submit --working-dir USERDIR -- python -m tidal.training.run jobs/JOB.yaml``,
  whose model is the user's ``training.models:UserDigitsNet`` (Tidal has a ``tidal.training.models`` too).
- Serve: ``serve deploy`` (Ray's CLI, through the dashboard) of a config whose applications run in USERDIR as a
  remote ``working_dir`` (a ``file://`` zip, as an s3:// one would be): Tidal's model server with the digits
  checkpoint, Tidal's model server with a checkpoint of the user's model class, and the user's own
  ``serving.app:app``; each answers over real HTTP.

The user's packages write marker files (``user_project``) saying where each import came from and, in the
same process, where Tidal's ``tidal.training`` / ``tidal.serving`` came from.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from tidal_testing import serve_apps_to_keep, wait_for
from user_project import (
    USER_MODEL_CLASS,
    clean_env,
    markers,
    write_user_checkpoint,
    write_user_project,
    zip_user_project,
)

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
# A worker group starts in 10-40 s on a 2-core machine (several processes importing torch); Serve replicas
# load torch too. The waits bound failures, not the expected run time.
JOB_TIMEOUT_S = 420
DEPLOY_TIMEOUT_S = 300
# Grants move at once for this module's job (the default guards batch them by a minute).
TEST_POLICY = {"policy": "tidal", "guards": {"service_downscale_delay_s": 0, "job_resize_min_interval_s": 0}}


def tidal_file(module: str) -> str:
    """Where ``module`` (a Tidal package) comes from in this process: the installed Tidal."""
    return str(importlib.import_module(module).__file__)


def is_user_file(path: str, package: str) -> bool:
    """True when ``path`` is the user's ``package/__init__.py`` (as Ray unpacked it), not Tidal's folder."""
    p = Path(path)
    return p.name == "__init__.py" and p.parent.name == package and 'OWNER = "user"' in p.read_text()


@pytest.fixture()
def user_project(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """The user's repository, its markers and a scratch folder (storage, checkpoints); removed at the end."""
    root = write_user_project(tmp_path / "userproj", tmp_path / "markers")
    yield {"root": root, "markers": tmp_path / "markers", "tmp": tmp_path}
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def arbiter(ray_driver: Any) -> Any:
    """The session cluster's arbiter (a job registers with it), started as the training tests start it."""
    from tidal.cluster.actor import get_or_create_arbiter

    return get_or_create_arbiter(config=TEST_POLICY)


# ----------------------------------------------------------------------------------------------- the job


def user_job_spec(name: str, storage: Path) -> dict[str, Any]:
    """A tiny Tidal job (``python -m tidal.training.run``) on the user's model: 20 steps on one H100 worker, a checkpoint every 10."""
    return {
        "name": name,
        "model": {"class": USER_MODEL_CLASS, "kwargs": {"hidden": 32}},
        "data": {"factory": "tidal.training.data:digits"},
        "gpu_types": ["H100"],
        "min_workers": 1,
        "max_workers": 1,
        "global_batch_size": 64,
        "steps": 20,
        "lr": 0.01,
        "seed": 5,
        "checkpoint_every_steps": 10,
        "report_every_steps": 5,
        "resize_min_interval_s": 0,
        "storage_path": str(storage),
    }


@pytest.fixture()
def submitted(local_cluster: Any) -> Iterator[list[str]]:
    """Submission ids of this test's jobs; any still running at the end is stopped."""
    from ray.job_submission import JobSubmissionClient

    ids: list[str] = []
    yield ids
    client = JobSubmissionClient(local_cluster.dashboard_url)
    for sid in ids:
        if str(client.get_job_status(sid).value) in ("PENDING", "RUNNING"):
            client.stop_job(sid)
            wait_for(
                lambda sid=sid: str(client.get_job_status(sid).value) in ("STOPPED", "FAILED", "SUCCEEDED"),
                60, 0.5, f"job {sid} to stop",
            )  # fmt: skip


def test_a_job_submitted_from_a_user_repo_trains_the_users_model_as_a_tidal_job(
    local_cluster, ray_driver, arbiter, user_project, submitted
):
    from ray.job_submission import JobSubmissionClient

    root, marks = user_project["root"], user_project["markers"]
    storage = user_project["tmp"] / "storage"
    name = f"pkg-user-{uuid.uuid4().hex[:6]}"
    (root / "jobs").mkdir()
    (root / "jobs" / f"{name}.yaml").write_text(yaml.safe_dump(user_job_spec(name, storage)))
    sid = f"test-{name}"
    subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--no-wait", "--submission-id", sid, "--working-dir", str(root),
         "--", "python", "-m", "tidal.training.run", f"jobs/{name}.yaml"],
        env=clean_env(**local_cluster.env()), check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    submitted.append(sid)
    client = JobSubmissionClient(local_cluster.dashboard_url)
    status = wait_for(
        lambda: (s := str(client.get_job_status(sid).value)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
        JOB_TIMEOUT_S, 1.0, f"job {name} to end",
    )  # fmt: skip
    logs = client.get_job_logs(sid)
    assert status == "SUCCEEDED", logs[-4000:]

    # The job ran to its last step, checkpointed and exported the user's model.
    summary = json.loads((storage / name / "tidal" / "summary.json").read_text())
    assert summary["finished"] and summary["final_step"] == 20, summary
    assert summary["checkpoint_path"] and Path(summary["checkpoint_path"]).exists(), summary
    export = Path(summary["export_path"])
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["model_class"] == USER_MODEL_CLASS and manifest["model_kwargs"] == {"hidden": 32}
    state = torch.load(export / "model.pt", map_location="cpu", weights_only=True)
    assert sorted(state) == ["user_body.0.bias", "user_body.0.weight", "user_head.bias", "user_head.weight"]
    assert f"job {name}: exported the final model" in logs
    assert [(g["num_workers"], g["gpu_type"]) for g in summary["groups"]] == [(1, "H100")], summary["groups"]

    # The user's model was built by Tidal's code in the driver (export) and in a Ray Train worker (training),
    # each time with the user's `training` package and Tidal's `tidal.training` loaded side by side.
    builds = markers(marks, "build-model")
    assert {b["argv0"] for b in builds} >= {"run.py", "default_worker.py"}, builds
    for b in builds:
        assert b["owner"] == "user" and is_user_file(b["training"], "training"), b
        assert b["tidal.training"] == tidal_file("tidal.training"), b
    # Tidal imported none of the user's other packages (a stray top-level import would have).
    imported = {m["event"] for m in markers(marks)}
    assert imported == {"import-training", "build-model"}, imported


# --------------------------------------------------------------------------------------------------- Serve

TIDAL_APP = "pkg-tidal-digits"
TIDAL_USER_MODEL_APP = "pkg-tidal-user-model"
USER_APP = "pkg-user-app"


def tidal_app(name: str, checkpoint: Path, working_dir: str) -> dict[str, Any]:
    """Tidal's model server (``tidal.serving.app:build_app``) run in the user's working_dir."""
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "tidal.serving.app:build_app",
        "runtime_env": {"working_dir": working_dir},
        "args": {
            "service": {"name": name, "gpu_types": ["A100", "RTX4090"], "min_replicas": 1, "max_replicas": 1},
            "model": {"checkpoint": str(checkpoint)},
            "num_cpus_per_replica": 0.25,
            # The user's model module (training.models:UserDigitsNet), allowed by the operator, who is the user.
            "allowed_model_modules": ["training.models"],
            # No arbiter under this name: the policy runs in its fallback mode (Serve's behaviour).
            "autoscaling": {"arbiter_name": "tidal-pkg-no-arbiter"},
        },
    }


def serve_details(local_cluster: Any) -> Any:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    from ray.serve.schema import ServeInstanceDetails

    return ServeInstanceDetails(**ServeSubmissionClient(local_cluster.dashboard_url).get_serve_details())


def app_states(local_cluster: Any, names: list[str]) -> dict[str, tuple[str, str]]:
    """Each application's Serve status and message (``("MISSING", "")`` before Serve knows it)."""
    apps = serve_details(local_cluster).applications
    return {n: (str(apps[n].status.value), apps[n].message) if n in apps else ("MISSING", "") for n in names}


def deploy_settled(local_cluster: Any, names: list[str]) -> dict[str, tuple[str, str]] | None:
    """The states once every application runs or one has failed (no point waiting then), else None."""
    states = app_states(local_cluster, names)
    done = all(s == "RUNNING" for s, _ in states.values()) or any(
        s == "DEPLOY_FAILED" for s, _ in states.values()
    )
    return states if done else None


@pytest.fixture()
def deployed(local_cluster: Any, ray_driver: Any, user_project: dict[str, Path]) -> Iterator[dict[str, Any]]:
    """The three applications deployed with ``serve deploy``; deleted at the end (Serve shut down if this
    fixture started it). Applications already running stay in the config, since a deploy replaces the set."""
    from ray import serve
    from tidal.training.digits_checkpoint import digits_data, train_digits_checkpoint

    root, tmp = user_project["root"], user_project["tmp"]
    x, _ = digits_data()
    instances = x[:8].tolist()
    digits_ckpt = train_digits_checkpoint(tmp / "digits-ckpt", version="pkg-digits-v1", epochs=1)
    user_ckpt = tmp / "user-ckpt"
    user_outputs = write_user_checkpoint(root, user_ckpt, instances)
    working_dir = zip_user_project(root, tmp / "userproj.zip").as_uri()

    serve_was_running, others = serve_apps_to_keep(
        serve_details(local_cluster), TIDAL_APP, TIDAL_USER_MODEL_APP, USER_APP
    )
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": local_cluster.serve_http_port},
        "applications": [
            *others,
            tidal_app(TIDAL_APP, digits_ckpt, working_dir),
            tidal_app(TIDAL_USER_MODEL_APP, user_ckpt, working_dir),
            {
                "name": USER_APP,
                "route_prefix": f"/{USER_APP}",
                "import_path": "serving.app:app",
                "runtime_env": {"working_dir": working_dir},
            },
        ],
    }
    config_path = tmp / "serve-config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    mine = [TIDAL_APP, TIDAL_USER_MODEL_APP, USER_APP]
    try:
        subprocess.run(
            [str(BIN / "serve"), "deploy", str(config_path)],
            env=clean_env(**local_cluster.env()), check=True, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        states = wait_for(
            lambda: deploy_settled(local_cluster, mine), DEPLOY_TIMEOUT_S, 1.0, "the applications to run"
        )
        yield {
            "states": states,
            "base": f"http://127.0.0.1:{local_cluster.serve_http_port}",
            "instances": instances,
            "digits_ckpt": digits_ckpt,
            "user_outputs": user_outputs,
            "markers": user_project["markers"],
        }
    finally:
        apps = serve_details(local_cluster).applications
        for n in mine:
            if n in apps:
                serve.delete(n, _blocking=True)
        if not serve_was_running:
            serve.shutdown()


def test_serve_runs_tidals_model_server_and_the_users_app_from_a_user_repo_over_http(deployed):
    from tidal.serving.manifest import load_model

    assert all(s == "RUNNING" for s, _ in deployed["states"].values()), deployed["states"]
    base, instances = deployed["base"], deployed["instances"]

    # Tidal's server with Tidal's model, in the user's working_dir.
    r = httpx.post(f"{base}/{TIDAL_APP}/v1/predict", json={"instances": instances}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    with torch.no_grad():
        expected = load_model(deployed["digits_ckpt"], "cpu")(torch.tensor(instances))
    assert body["model_version"] == "pkg-digits-v1"
    assert torch.allclose(torch.tensor(body["outputs"]), expected, atol=1e-4)

    # Tidal's server with the user's model class (training.models:UserDigitsNet), imported in the replica.
    r = httpx.post(f"{base}/{TIDAL_USER_MODEL_APP}/v1/predict", json={"instances": instances}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "user-digits-v1"
    assert torch.allclose(torch.tensor(body["outputs"]), torch.tensor(deployed["user_outputs"]), atol=1e-4)
    models = httpx.get(f"{base}/{TIDAL_USER_MODEL_APP}/v1/models", timeout=60).json()["models"]
    assert models[0]["model_class"] == USER_MODEL_CLASS

    # The user's own app from the user's `serving` package (Tidal has a `tidal.serving.app` too).
    r = httpx.get(f"{base}/{USER_APP}", timeout=60)
    assert r.status_code == 200, r.text
    user = r.json()
    assert user["owner"] == "user" and is_user_file(user["serving"], "serving"), user
    assert is_user_file(user["training"], "training"), user

    # In the replica of Tidal's server, the user's model came from the user's `training` package, with
    # Tidal's `tidal.serving` loaded beside it.
    in_replicas = [
        m for m in markers(deployed["markers"], "build-model") if m["argv0"] == "default_worker.py"
    ]
    assert in_replicas, markers(deployed["markers"])
    for m in in_replicas:
        assert is_user_file(m["training"], "training") and m["tidal.serving"] == tidal_file(
            "tidal.serving"
        ), m
