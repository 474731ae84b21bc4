"""Tidal's serving options, validated at the boundary (pure: pydantic only, no Ray, no torch).

A Serve config file (``serving/config.yaml``) names the application builder
``tidal.serving.app:build_app`` and passes it ``args``; :class:`ServeAppArgs` validates them before anything
starts, so a typo fails ``serve deploy`` with a message naming the field, not a replica at 3 a.m.

- ``service``: the :class:`~tidal.cluster.model.ServiceSpec` the arbiter sees (GPUs per replica, min/max,
  accepted GPU types in preference order, SLO, priority). Serve's ``min_replicas``/``max_replicas`` are
  derived from it, so the two can never disagree.
- ``model``: the deployment's ``user_config`` (:class:`ModelOptions`): checkpoint, precision, batching.
  Changing it reconfigures running replicas in place; that is how ``tidal serve promote`` rolls out a
  new checkpoint without restarting a replica or dropping a request.
- ``autoscaling``: target load per replica, delays, and which policy drives Serve (``tidal`` or Serve's
  ``default``).
- ``api_key``/``api_key_env``: the application's API key, resolved once where the application is built
  (:func:`resolve_api_key`) and handed to every replica, so no replica serves without it.
- ``allowed_model_modules``: the modules a checkpoint's manifest may name its model class from
  (:func:`allowed_model_modules`): importing a module runs its code, so an operator chooses them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from tidal.cluster.model import GPU_TYPE_LABEL
from tidal.cluster.specs import ServiceSpecModel

DEFAULT_API_KEY_ENV = "TIDAL_SERVE_API_KEY"
TIDAL_POLICY_PATH = "tidal.serving.autoscale:TidalAutoscalingPolicy"
GPU_TYPE_METRIC_PREFIX = "tidal_gpu_type:"
# The model modules every application allows: Tidal's own. An application adds its own in
# ``allowed_model_modules`` (the demo adds tidal.demo.model).
TIDAL_MODEL_MODULES = ("tidal.training.models",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The service spec at the boundary is the cluster's own model (one validation for every entry point).
ServiceOptions = ServiceSpecModel


class ModelOptions(_Strict):
    """The deployment's ``user_config``: reconfigurable on running replicas without a restart."""

    checkpoint: str = Field(min_length=1, description="Checkpoint directory (model.pt + manifest.json).")
    precision: Literal["fp32", "bf16", "int8"] = Field(
        default="fp32",
        description="fp32; bf16 (weights and inputs in bfloat16); int8 (dynamic quantization of "
        "nn.Linear, CPU only).",
    )
    max_batch_size: int = Field(default=16, ge=1, le=4096)
    batch_wait_timeout_s: float = Field(default=0.002, ge=0, le=1)

    @field_validator("checkpoint")
    @classmethod
    def _expand(cls, v: str) -> str:
        # "~" and "$VARS" expand where the config is read (the deploying host, the replicas' nodes).
        return os.path.expandvars(os.path.expanduser(v))


class AutoscalingOptions(_Strict):
    """How replicas follow load and grants.

    ``policy: tidal`` uses :class:`tidal.serving.autoscale.TidalAutoscalingPolicy` (reports demand to the
    arbiter, caps replicas at the grant); ``policy: default`` is Serve's own queue-length policy with the
    same targets (for comparison, or for a cluster without Tidal).
    """

    policy: Literal["tidal", "default"] = "tidal"
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    upscale_delay_s: float = Field(
        default=0.5,
        ge=0,
        description="The load must stay above the demand in force this long before replicas are added "
        "(with the Tidal policy the policy applies it, before the arbiter hears the rise: a blip moves no GPU, "
        "and replicas granted later start at once).",
    )
    downscale_delay_s: float = Field(
        default=30.0, ge=0, description="Load must stay low this long before demand drops."
    )
    surge_reserve_fraction: float = Field(
        default=0.5,
        ge=0,
        le=10,
        description="With the Tidal policy: a rise of the demand by N replicas also asks the arbiter for "
        "floor(N x this) more GPUs, ahead of the load (freed from training in the same reclaim; Serve runs them "
        "only once the load needs them; they go back after downscale_delay_s if it does not). 0 turns it off.",
    )
    early_reclaim_min_rise: int = Field(
        default=2,
        ge=0,
        description="With the Tidal policy: a load this many replicas or more above the demand in force asks "
        "the arbiter for its GPUs (and the reserve) at once, while upscale_delay_s still runs, so that training's "
        "reclaim overlaps the delay; Serve runs the replicas only once the delay has passed, and a surge that "
        "falls back within it drops the ask. 0 turns it off.",
    )
    grant_shrink_delay_s: float = Field(
        default=1.0,
        ge=0,
        description="Serve-level downscale delay: how fast a smaller grant (or decided demand) "
        "removes replicas. The load hold above is applied by the Tidal policy itself.",
    )
    downscale_to_zero_delay_s: float | None = Field(default=None, ge=0)
    look_back_period_s: float = Field(default=5.0, gt=0)
    metrics_interval_s: float = Field(default=1.0, gt=0)
    heartbeat_period_s: float = Field(default=0.5, gt=0, le=5)
    arbiter_name: str = "tidal-arbiter"
    arbiter_namespace: str = "tidal"


class TidalPolicyOptions(_Strict):
    """What :class:`tidal.serving.autoscale.TidalAutoscalingPolicy` is built with (Serve's ``policy_kwargs``).

    Attributes:
        drain_hold_s: a replica that left the running set still counts as held this long (it drains its
            requests and exits); the arbiter must not hand its GPU to someone else before that.
        stale_after_s: no policy call for this long while the last call saw zero replicas means Serve's
            cold-start path is starting a replica: report a demand of at least 1.
        keepalive_s: keep heartbeating without policy calls at most this long (then let the arbiter
            expire the registration: the deployment is gone).
        grant_ttl_s: a grant older than this (the arbiter stopped answering) no longer caps replicas.
        grant_poll_s: while the demand is above the grant, the link asks the arbiter this often (for at
            most ``tidal.serving.autoscale.GRANT_POLL_WINDOW_S``), not every ``heartbeat_period_s``.
    """

    service: ServiceOptions
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    downscale_delay_s: float = Field(default=30.0, ge=0)
    upscale_delay_s: float = Field(default=0.0, ge=0)
    surge_reserve_fraction: float = Field(default=0.0, ge=0, le=10)
    early_reclaim_min_rise: int = Field(default=0, ge=0)
    ramp_window_s: float = Field(default=0.0, ge=0)
    heartbeat_period_s: float = Field(default=0.5, gt=0, le=5)
    arbiter_name: str = "tidal-arbiter"
    arbiter_namespace: str = "tidal"
    drain_hold_s: float = Field(default=3.0, ge=0)
    stale_after_s: float = Field(default=1.0, gt=0)
    keepalive_s: float = Field(default=120.0, gt=0)
    grant_ttl_s: float = Field(default=5.0, gt=0)
    grant_poll_s: float = Field(default=0.1, gt=0, le=5)


class ServeAppArgs(_Strict):
    """The ``args`` of the application in a Serve config file (see ``serving/config.yaml``)."""

    service: ServiceOptions
    model: ModelOptions
    autoscaling: AutoscalingOptions = Field(default_factory=AutoscalingOptions)
    deployment_name: str = Field(default="TidalModel", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    num_cpus_per_replica: float = Field(default=1.0, ge=0)
    max_ongoing_requests: int = Field(default=32, ge=1)
    max_concurrent_batches: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Batches one replica runs at once (Serve's @serve.batch max_concurrent_batches). Serve "
        "forms a batch as soon as its first request has waited batch_wait_timeout_s, not when the previous "
        "batch is done, so with 1 a slow model runs batches of one request in a row; 2 or more lets the "
        "next batch run while one is on the device. Fixed when a replica starts.",
    )
    max_queued_requests: int = Field(default=-1, ge=-1, description="-1: unbounded (Serve default).")
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=0)
    max_instances_per_request: int = Field(default=256, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=64)
    max_abs_input: float = Field(
        default=1e6,
        gt=0,
        le=3.4e38,
        description="Inputs beyond this magnitude are refused with 422 naming the value (the OpenAPI schema "
        "states the bound). Raise it for a model whose features are large; 3.4e38 is float32's limit.",
    )
    api_key: str | None = Field(
        default=None,
        min_length=8,
        description="Require this key (Authorization: Bearer KEY or X-API-Key) on every route but "
        "/healthz, the OpenAPI schema and docs included. Prefer api_key_env: a key in a config file is "
        "readable by anyone who reads the config.",
    )
    api_key_env: str = Field(
        default=DEFAULT_API_KEY_ENV,
        min_length=1,
        description="Environment variable holding the API key, read once where the application is built: "
        "set it in the application's runtime_env env_vars (`tidal serve deploy` copies it there from its own "
        "environment). Replicas get the key from the build, never from their node's environment.",
    )
    allowed_model_modules: list[str] = Field(
        default_factory=list,
        description="Modules (or packages, with their sub-modules) whose classes a checkpoint's manifest may "
        f"name as its model, besides Tidal's own {list(TIDAL_MODEL_MODULES)}. Importing a module runs its code: "
        "list only modules you trust.",
    )

    @field_validator("allowed_model_modules")
    @classmethod
    def _module_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name or not all(part.isidentifier() for part in name.split(".")):
                raise ValueError(f"expected dotted module names such as 'mypkg.models', got {name!r}")
        return v


def allowed_model_modules(args: ServeAppArgs) -> tuple[str, ...]:
    """Tidal's own model modules plus the application's ``allowed_model_modules``."""
    return TIDAL_MODEL_MODULES + tuple(m for m in args.allowed_model_modules if m not in TIDAL_MODEL_MODULES)


def runtime_env_with_api_key(
    runtime_env: Mapping[str, Any] | None, args: ServeAppArgs, environ: Mapping[str, str]
) -> dict[str, Any] | None:
    """The application's ``runtime_env`` with the deployer's API key variable added to its ``env_vars``.

    A deploy from a shell that has ``$TIDAL_SERVE_API_KEY`` (``args.api_key_env``) builds the application with
    that key. A key in ``args.api_key`` or already in the ``runtime_env`` wins; without a key in ``environ``
    the ``runtime_env`` is returned as it was.

    Example: ``runtime_env_with_api_key({"working_dir": "."}, args, {"TIDAL_SERVE_API_KEY": "k" * 16})`` ->
    ``{"working_dir": ".", "env_vars": {"TIDAL_SERVE_API_KEY": "kkkkkkkkkkkkkkkk"}}``.
    """
    key = environ.get(args.api_key_env)
    env_vars = dict((runtime_env or {}).get("env_vars") or {})
    if not key or args.api_key is not None or args.api_key_env in env_vars:
        return dict(runtime_env) if runtime_env is not None else None
    return {**(runtime_env or {}), "env_vars": {**env_vars, args.api_key_env: key}}


def resolve_api_key(args: ServeAppArgs, environ: Mapping[str, str]) -> str | None:
    """The application's API key: ``args.api_key``, else ``environ[args.api_key_env]``, else None (no key).

    ``environ`` is the environment where the application is built (its runtime_env's env_vars included);
    the key found there goes to every replica.

    Raises:
        ValueError: the variable is set but shorter than 8 characters (the message names it).
    """
    if args.api_key:
        return args.api_key
    key = environ.get(args.api_key_env, "").strip()
    if key and len(key) < 8:
        raise ValueError(
            f"api_key_env: ${args.api_key_env} holds a key of {len(key)} characters; use at least 8"
        )
    return key or None


def ray_actor_options_for(args: ServeAppArgs) -> dict[str, Any]:
    """Replica resources and placement: GPUs per replica on the accepted types, preferred type first.

    Ray tries ``label_selector`` (the most preferred type) and then each ``fallback_strategy`` entry in
    order, so a replica lands on the first accepted type that has a free GPU. The arbiter decides which
    types have free GPUs (it shrinks training there), so replicas follow the grant.

    Example: gpu_types [A100, H100] ->
    ``{"label_selector": {"ray.io/accelerator-type": "A100"},
    "fallback_strategy": [{"label_selector": {"ray.io/accelerator-type": "H100"}}], ...}``.
    """
    types = args.service.gpu_types
    opts: dict[str, Any] = {
        "num_gpus": args.service.gpus_per_replica,
        "num_cpus": args.num_cpus_per_replica,
        "label_selector": {GPU_TYPE_LABEL: types[0]},
    }
    if len(types) > 1:
        opts["fallback_strategy"] = [{"label_selector": {GPU_TYPE_LABEL: t}} for t in types[1:]]
    return opts


def tidal_policy_kwargs(args: ServeAppArgs) -> dict[str, Any]:
    """The JSON-able kwargs Serve passes to :class:`tidal.serving.autoscale.TidalAutoscalingPolicy`."""
    a = args.autoscaling
    return TidalPolicyOptions(
        service=args.service,
        target_ongoing_requests=a.target_ongoing_requests,
        downscale_delay_s=a.downscale_delay_s,
        upscale_delay_s=a.upscale_delay_s,
        surge_reserve_fraction=a.surge_reserve_fraction,
        early_reclaim_min_rise=a.early_reclaim_min_rise,
        # A step of the traffic reaches Serve's averaged metric as a ramp one look-back long.
        ramp_window_s=a.look_back_period_s,
        heartbeat_period_s=a.heartbeat_period_s,
        arbiter_name=a.arbiter_name,
        arbiter_namespace=a.arbiter_namespace,
        drain_hold_s=min(args.graceful_shutdown_timeout_s, 3.0),
    ).model_dump()


def autoscaling_config_for(args: ServeAppArgs) -> dict[str, Any]:
    """Serve's ``autoscaling_config`` for the deployment, bounds taken from the service spec."""
    a = args.autoscaling
    cfg: dict[str, Any] = {
        "min_replicas": args.service.min_replicas,
        "max_replicas": args.service.max_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_s,
        "look_back_period_s": a.look_back_period_s,
        "metrics_interval_s": a.metrics_interval_s,
    }
    if a.policy == "tidal":
        # The Tidal policy holds load-driven downscaling itself (downscale_delay_s); Serve's own
        # delay only paces grant-driven shrinks, which must be quick (the arbiter waits for them).
        cfg["downscale_delay_s"] = a.grant_shrink_delay_s
        # It also applies upscale_delay_s itself, to the load before the arbiter hears it, not to the number
        # capped at the grant: replicas granted after a reclaim then start at once
        # (tidal.serving.autoscale_math.decide_replicas).
        cfg["upscale_delay_s"] = 0.0
        cfg["policy"] = {"policy_function": TIDAL_POLICY_PATH, "policy_kwargs": tidal_policy_kwargs(args)}
    else:
        cfg["downscale_delay_s"] = a.downscale_delay_s
    if a.downscale_to_zero_delay_s is not None:
        cfg["downscale_to_zero_delay_s"] = a.downscale_to_zero_delay_s
    return cfg
