"""Deploying, promoting and deleting Tidal Serve applications (Ray glue for ``tidal serve ...``).

Everything goes through Serve's declarative path, the one ``serve deploy`` uses: the controller keeps
the config of every application deployed from a config, and a change to it is applied as a diff.

**Promote** (zero-downtime rollout of a new checkpoint) changes only the deployment's ``user_config``
(``model.checkpoint``). Serve applies a ``user_config``-only change by calling ``reconfigure`` on the
running replicas, which load the new checkpoint beside the old one and swap it in
(``tidal.serving.app.ModelServer.reconfigure``): no replica restarts, nothing is dropped, and the replica count
and their GPUs stay as they are. The checkpoint is checked here first (manifest valid, weights present,
model class importable, same input shape), so that a bad checkpoint fails the command, not the replicas.

A training job promotes its final checkpoint by calling :func:`promote_checkpoint` from its driver.
"""

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema, ServeInstanceDetails
from tidal.serving.config import (
    TIDAL_MODEL_MODULES,
    ModelOptions,
    ServeAppArgs,
    allowed_model_modules,
    runtime_env_with_api_key,
)
from tidal.serving.manifest import (
    WEIGHTS_FILE,
    CheckpointError,
    check_model_class_allowed,
    import_model_class,
    load_manifest,
)

logger = logging.getLogger(__name__)

BUILDER_PATH = "tidal.serving.app:build_app"


class RolloutError(RuntimeError):
    """A deploy, promote or delete that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class PromoteResult:
    app_name: str
    deployment_name: str
    checkpoint: str
    version: str
    previous_checkpoint: str | None
    duration_s: float


def tidal_apps(details: ServeInstanceDetails) -> dict[str, dict[str, Any]]:
    """Applications deployed from a config with Tidal's builder: name -> their config (as deployed)."""
    out = {}
    for name, app in details.applications.items():
        cfg = app.deployed_app_config
        if cfg is not None and cfg.import_path == BUILDER_PATH:
            out[name] = cfg.model_dump(exclude_unset=True)
    return out


def serve_details() -> ServeInstanceDetails:
    return ServeInstanceDetails(**_get_global_client().get_serve_details())


def deploy_config(
    config: Mapping[str, Any],
    *,
    http_port: int | None = None,
    host: str = "127.0.0.1",
    wait: bool = True,
    timeout_s: float = 300.0,
) -> list[str]:
    """Deploy a Serve config (the format of ``serving/config.yaml``), as ``serve deploy`` does.

    Tidal applications' ``args`` are validated first (:class:`ServeAppArgs`, the checkpoint's manifest and
    its model class against the allowed modules). An application's API key variable (``api_key_env``), when
    set in this process's environment and not in the application's ``runtime_env``, is copied there: the
    application is built with it, and every replica gets the key from that build. Serve is started if it is
    not running, on ``http_port`` when given (the port the cluster reserved for it) rather than the config's.

    Returns:
        The names of the applications deployed.
    """
    cfg = dict(config)
    cfg["applications"] = [dict(a) for a in cfg.get("applications", [])]
    for app in cfg["applications"]:
        if app.get("import_path") == BUILDER_PATH:
            name = app.get("name", "default")
            try:
                args = ServeAppArgs.model_validate(app.get("args", {}))
                manifest = load_manifest(args.model.checkpoint)
                check_model_class_allowed(manifest.model_class, allowed_model_modules(args))
            except (ValueError, CheckpointError) as e:
                raise RolloutError(f"application {name!r}: invalid args: {e}") from e
            runtime_env = runtime_env_with_api_key(app.get("runtime_env"), args, os.environ)
            if runtime_env is not None:
                app["runtime_env"] = runtime_env
            # Send the path as resolved here ("~", $VARS), not as written: the cluster's env may differ.
            app["args"] = {
                **app.get("args", {}),
                "model": {**app["args"].get("model", {}), "checkpoint": args.model.checkpoint},
            }
    http = dict(cfg.get("http_options") or {})
    if http_port is not None:
        http.update(host=host, port=http_port)
        cfg["http_options"] = http
    schema = ServeDeploySchema.model_validate(cfg)
    serve.start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
    )
    _get_global_client().deploy_apps(schema)
    names = [a.name for a in schema.applications]
    if wait:
        _wait_running(names, deadline=time.monotonic() + timeout_s)
    return names


def _wait_running(names: list[str], deadline: float) -> None:
    """Until every named application is RUNNING; raises on DEPLOY_FAILED or at the deadline."""
    last: dict[str, str] = {}
    while True:
        apps = serve_details().applications
        last = {n: (str(apps[n].status) if n in apps else "missing") for n in names}
        failed = [n for n in names if n in apps and apps[n].status == "DEPLOY_FAILED"]
        if failed:
            raise RolloutError(f"application {failed[0]!r} failed to deploy: {apps[failed[0]].message}")
        if all(n in apps and apps[n].status == "RUNNING" for n in names):
            return
        if time.monotonic() > deadline:
            raise RolloutError(f"applications not running in time: {last}")
        time.sleep(0.5)


def check_promotable(
    checkpoint: str | Path,
    current: ModelOptions | None,
    allowed_modules: Sequence[str] = TIDAL_MODEL_MODULES,
) -> str:
    """Check a checkpoint before it is rolled out; return its version.

    Raises:
        RolloutError: the manifest is missing or invalid, the weights are missing, the model class is not
            from ``allowed_modules`` (the application's) or does not import, or the input shape differs from
            the model being served (clients would break).
    """
    try:
        manifest = load_manifest(checkpoint)
        if not (Path(checkpoint) / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"checkpoint {str(checkpoint)!r} has no {WEIGHTS_FILE}")
        import_model_class(manifest.model_class, allowed_modules)
    except CheckpointError as e:
        raise RolloutError(f"cannot promote {checkpoint}: {e}") from e
    if current is not None:
        try:
            old = load_manifest(current.checkpoint)
        except CheckpointError:
            old = None  # the old checkpoint is gone: nothing to compare with
        if old is not None and old.input_shape != manifest.input_shape:
            raise RolloutError(
                f"cannot promote {checkpoint}: its input_shape {manifest.input_shape} differs from the "
                f"served model's {old.input_shape} ({current.checkpoint}); clients would break. Deploy it "
                "as a new application instead"
            )
    return manifest.version


def _pick_app(apps: Mapping[str, dict[str, Any]], app_name: str | None) -> str:
    if app_name is not None:
        if app_name not in apps:
            raise RolloutError(
                f"no Tidal application named {app_name!r} deployed from a config; deployed: "
                f"{sorted(apps) or 'none'} (deploy with `tidal serve deploy` or `serve deploy`)"
            )
        return app_name
    if len(apps) != 1:
        raise RolloutError(
            f"name the application to promote (--app): Tidal applications deployed: {sorted(apps) or 'none'}"
        )
    return next(iter(apps))


def promote_checkpoint(
    checkpoint: str | Path,
    *,
    app_name: str | None = None,
    precision: str | None = None,
    wait: bool = True,
    timeout_s: float = 120.0,
) -> PromoteResult:
    """Roll out ``checkpoint`` to a running Tidal application without dropping a request.

    Only the deployment's ``user_config`` changes (see the module docstring). With ``wait``, returns once
    Serve reports the application running and the deployment healthy again after the update.

    Raises:
        RolloutError: no such application, a bad checkpoint, or the update did not finish in time.
    """
    t0 = time.monotonic()
    checkpoint = str(Path(checkpoint).expanduser().resolve())
    details = serve_details()
    apps = tidal_apps(details)
    name = _pick_app(apps, app_name)
    app_cfg = apps[name]
    args = ServeAppArgs.model_validate(app_cfg.get("args", {}))
    deployments = [dict(d) for d in app_cfg.get("deployments", [])]
    entry = next((d for d in deployments if d.get("name") == args.deployment_name), None)
    if entry is None:
        entry = {"name": args.deployment_name}
        deployments.append(entry)
    current = ModelOptions.model_validate(entry.get("user_config") or args.model.model_dump())
    version = check_promotable(checkpoint, current, allowed_model_modules(args))
    new_options = current.model_copy(update={"checkpoint": checkpoint})
    if precision is not None:
        new_options = ModelOptions.model_validate({**new_options.model_dump(), "precision": precision})
    entry["user_config"] = new_options.model_dump()
    app_cfg["deployments"] = deployments
    before_s = details.applications[name].last_deployed_time_s

    config: dict[str, Any] = {
        "proxy_location": details.proxy_location,
        "http_options": details.http_options.model_dump() if details.http_options else {},
        "applications": [
            app_cfg if n == name else cfg
            for n, cfg in (
                (n, a.deployed_app_config.model_dump(exclude_unset=True))
                for n, a in details.applications.items()
                if a.deployed_app_config is not None
            )
        ],
    }
    if details.target_capacity is not None:
        config["target_capacity"] = details.target_capacity
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    logger.info("promoting %s (version %s) on %s/%s", checkpoint, version, name, args.deployment_name)
    if wait:
        _wait_rolled_out(name, args.deployment_name, before_s, deadline=t0 + timeout_s)
    return PromoteResult(
        name, args.deployment_name, checkpoint, version, current.checkpoint, time.monotonic() - t0
    )


def _wait_rolled_out(app: str, deployment: str, before_s: float, deadline: float) -> None:
    last = "no status yet"
    while time.monotonic() < deadline:
        d = serve_details()
        a = d.applications.get(app)
        if a is not None and a.last_deployed_time_s > before_s:
            dep = a.deployments.get(deployment)
            last = f"application {a.status}, deployment {dep.status if dep else 'missing'}"
            if a.status == "RUNNING" and dep is not None and dep.status == "HEALTHY":
                return
            if a.status == "DEPLOY_FAILED" or (dep is not None and dep.status == "DEPLOY_FAILED"):
                raise RolloutError(f"rollout of {app}/{deployment} failed: {a.message or dep.message}")
        time.sleep(0.2)
    raise RolloutError(f"rollout of {app}/{deployment} not finished in time ({last})")


def delete_app(app_name: str, *, unregister: bool = True) -> None:
    """Delete a Serve application and, for a Tidal one, unregister its service from the arbiter now
    (without this the arbiter would free its grant only when the registration expires)."""
    details = serve_details()
    apps = tidal_apps(details)
    if app_name not in details.applications:
        raise RolloutError(f"no application named {app_name!r}; running: {sorted(details.applications)}")
    _get_global_client().delete_apps([app_name], blocking=True)
    if unregister and app_name in apps:
        args = ServeAppArgs.model_validate(apps[app_name].get("args", {}))
        try:
            from tidal.cluster.client import ArbiterClient

            client = ArbiterClient(
                name=args.autoscaling.arbiter_name, namespace=args.autoscaling.arbiter_namespace
            )
            if client.available():
                client.unregister(args.service.name)
        except Exception as e:  # the app is deleted already; expiry frees the grant anyway
            logger.warning(
                "could not unregister %r from the arbiter (%s); it will expire", args.service.name, e
            )


def replicas_by_gpu_type(app_name: str, deployment_name: str) -> dict[str, int]:
    """Running replicas per GPU type, read from each replica's node label (state API + node table)."""
    from tidal.cluster.model import GPU_TYPE_LABEL

    d = serve_details()
    dep = d.applications[app_name].deployments[deployment_name]
    node_ids = [r.node_id for r in dep.replicas if r.state == "RUNNING"]
    labels = {n["NodeID"]: n.get("Labels", {}) for n in ray.nodes()}
    out: dict[str, int] = {}
    for nid in node_ids:
        t = labels.get(nid, {}).get(GPU_TYPE_LABEL, "unknown")
        out[t] = out.get(t, 0) + 1
    return out
