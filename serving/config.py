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
import re
from collections.abc import Collection, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tidal.cluster.model import GPU_TYPE_LABEL, ServiceSpec
from tidal.cluster.specs import GpuTypeList, ServiceSpecModel

DEFAULT_API_KEY_ENV = "TIDAL_SERVE_API_KEY"
# The public name of the policy (``tidal.serve.TidalPolicy`` is ``tidal.serving.autoscale.TidalAutoscalingPolicy``):
# the one path every Tidal service names, Tidal's own model server included.
TIDAL_POLICY_PATH = "tidal.serve:TidalPolicy"
GPU_TYPE_METRIC_PREFIX = "tidal_gpu_type:"
UNKNOWN_GPU_TYPE = "unknown"  # what the model server pushes when its node has no GPU type label
# A replica may push its own latency p99 (ms) as this custom autoscaling metric; ``tidal status`` shows it.
P99_METRIC = "tidal_p99_ms"
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
    regrow_guard_s: float = Field(
        default=60.0,
        ge=0,
        description="With the Tidal policy: for this long after the demand last fell (a spike's end), a rise of "
        "the load is not heard while the replicas' p99 meets the service's SLO: the GPUs training grew back into "
        "are taken again only if the service misses its SLO. 0 turns it off.",
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

    What the arbiter must know and the deployment does not say: the accepted GPU types, the priority, the
    SLO, and optionally the service's name. ``min_replicas``, ``max_replicas`` and
    ``target_ongoing_requests`` come from the deployment's own ``autoscaling_config``, and the GPUs per
    replica from its ``ray_actor_options`` (or placement group bundles): nothing is stated twice.

    Attributes:
        name: the service's name at the arbiter; by default ``<app>.<deployment>``
            (:func:`default_service_name`).
        gpu_types: accepted GPU types (values of the ``ray.io/accelerator-type`` label), most preferred first.
        priority: higher wins GPUs from lower (training jobs default to 10, services to 100).
        slo_p99_ms: the service's latency objective, for the policy and ``tidal status``.
        downscale_delay_s, upscale_delay_s: the load hold and delay the policy applies itself, before the
            arbiter hears the demand (Serve's own delays around the policy should be short:
            :func:`serve_delay_warnings`).
        drain_hold_s: a replica that left the running set still counts as held this long (it drains its
            requests and exits); the arbiter must not hand its GPU to someone else before that.
        stale_after_s: no policy call for this long while the last call saw zero replicas means Serve's
            cold-start path is starting a replica: report a demand of at least 1.
        keepalive_s: keep heartbeating without policy calls at most this long (then let the arbiter
            expire the registration: the deployment is gone).
        grant_ttl_s: a grant older than this (the arbiter stopped answering) no longer caps replicas.
        grant_poll_s: while the demand is above the grant, the link asks the arbiter this often (for at
            most ``tidal.serving.autoscale.GRANT_POLL_WINDOW_S``), not every ``heartbeat_period_s``.
        regrow_guard_s: for this long after the demand last fell, a rise is heard only if the replicas' p99
            (their ``tidal_p99_ms`` metric) misses ``slo_p99_ms`` (``tidal.serving.autoscale_math``); a
            deployment whose replicas report no p99 is not guarded.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
    )
    gpu_types: GpuTypeList = Field(min_length=1)
    priority: int = Field(default=100, ge=0)
    slo_p99_ms: float = Field(default=500.0, gt=0)
    downscale_delay_s: float = Field(default=30.0, ge=0)
    upscale_delay_s: float = Field(default=0.0, ge=0)
    surge_reserve_fraction: float = Field(default=0.0, ge=0, le=10)
    early_reclaim_min_rise: int = Field(default=0, ge=0)
    ramp_window_s: float = Field(default=0.0, ge=0)
    regrow_guard_s: float = Field(default=60.0, ge=0)
    heartbeat_period_s: float = Field(default=0.5, gt=0, le=5)
    arbiter_name: str = "tidal-arbiter"
    arbiter_namespace: str = "tidal"
    drain_hold_s: float = Field(default=3.0, ge=0)
    stale_after_s: float = Field(default=1.0, gt=0)
    keepalive_s: float = Field(default=120.0, gt=0)
    grant_ttl_s: float = Field(default=5.0, gt=0)
    grant_poll_s: float = Field(default=0.1, gt=0, le=5)


# What a message says is valid, per field of ``policy_kwargs`` whose pydantic message would not say it plainly.
_POLICY_KWARGS_VALID = {
    "gpu_types": "a non-empty list of GPU types (values of the ray.io/accelerator-type node label: letters, digits, "
    "'-', '_' and '.', at most 63 characters), most preferred first, each once, e.g. [A100, H100]",
    "priority": "an integer >= 0 (training jobs default to 10, services to 100)",
    "name": "1-128 characters: letters, digits, '_', '.' and '-', starting with a letter or digit",
}


def policy_kwargs_problems(policy_kwargs: Any, known_gpu_types: Collection[str] | None = None) -> list[str]:
    """Each problem of a deployment's ``policy_kwargs`` for Tidal's policy, one line naming the field, the bad
    value and what is valid; empty when they are fine.

    ``known_gpu_types``: the GPU types the cluster has or expects (``tidal.serving.deploy_check`` gathers them);
    a type in ``gpu_types`` outside them is refused. None: not checked.

    Example: ``{"gpu_types": ["A100", "B300"], "priority": -5}`` with known ``{"A100", "H100"}`` ->
    ``["policy_kwargs.priority: -5 is not valid: Input should be greater than or equal to 0; valid: an integer
    >= 0 (...)"]`` (the type is checked once the kwargs parse), and ``{"gpu_types": ["B300"]}`` ->
    ``["policy_kwargs.gpu_types: unknown GPU type 'B300': no node of the cluster has it and the arbiter's policy
    file does not list it; valid: A100, H100 (...)"]``.
    """
    if not isinstance(policy_kwargs, Mapping):
        return [f"policy_kwargs: a mapping, not {policy_kwargs!r}; valid: e.g. {{gpu_types: [A100]}}"]
    try:
        options = TidalPolicyOptions.model_validate(dict(policy_kwargs))
    except ValidationError as e:
        return [_kwargs_error_line(err) for err in e.errors()]
    if known_gpu_types is None:
        return []
    known = set(known_gpu_types)
    return [
        f"policy_kwargs.gpu_types: unknown GPU type {t!r}: no node of the cluster has it and the arbiter's policy "
        f"file does not list it; valid: {', '.join(sorted(known)) or '(none known)'} (for a type whose nodes are "
        "still to come, list it in the policy file's gpu_types)"
        for t in options.gpu_types
        if t not in known
    ]


def _kwargs_error_line(err: Mapping[str, Any]) -> str:
    loc = [p for p in err.get("loc", ()) if p != "__root__"]
    field = str(loc[0]) if loc else ""
    where = "policy_kwargs" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    if err.get("type") == "missing":
        return f"{where}: missing; valid: {_POLICY_KWARGS_VALID.get(field, 'a value')}"
    if err.get("type") == "extra_forbidden":
        options = ", ".join(TidalPolicyOptions.model_fields)
        return f"{where}: unknown option (got {err.get('input')!r}); valid options: {options}"
    valid = _POLICY_KWARGS_VALID.get(field)
    return f"{where}: {err.get('input')!r} is not valid: {msg}" + (f"; valid: {valid}" if valid else "")


def default_service_name(app_name: str | None, deployment_name: str) -> str:
    """``<app>.<deployment>``, with any character the arbiter does not take in a name replaced by ``-``.

    Example: app ``"my app"``, deployment ``"Model"`` -> ``"my-app.Model"``; no app -> ``"Model"``.
    """
    raw = f"{app_name}.{deployment_name}" if app_name else deployment_name
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", raw)[:128]
    return name if name[:1].isalnum() else f"s{name}"[:128]


def service_spec_for(
    options: TidalPolicyOptions,
    *,
    app_name: str | None,
    deployment_name: str,
    min_replicas: int,
    max_replicas: int,
    gpus_per_replica: float,
) -> ServiceSpec:
    """The :class:`ServiceSpec` of a deployment: its bounds and GPUs from Serve, the rest from ``options``.

    Raises:
        ValueError: the deployment asks for no GPU, or its bounds are invalid (the message names the field).
    """
    if gpus_per_replica <= 0:
        raise ValueError(
            f"deployment {deployment_name!r} asks for no GPU per replica (ray_actor_options.num_gpus, or GPU "
            "in its placement_group_bundles): a Tidal service needs GPUs; set num_gpus"
        )
    return ServiceSpecModel(
        name=options.name or default_service_name(app_name, deployment_name),
        gpu_types=list(options.gpu_types),
        priority=options.priority,
        gpus_per_replica=gpus_per_replica,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        slo_p99_ms=options.slo_p99_ms,
    ).to_spec()


def gpus_per_replica_of(
    ray_actor_options: Mapping[str, Any] | None,
    placement_group_bundles: list[Mapping[str, Any]] | None = None,
) -> float:
    """GPUs one replica takes: the GPUs of its placement group bundles when it has them (an LLM replica
    with tensor parallelism), else ``ray_actor_options.num_gpus``.

    Example: ``{"num_gpus": 0}`` and bundles ``[{"CPU": 1}, {"GPU": 1}, {"GPU": 1}]`` -> 2.0.
    """
    if placement_group_bundles:
        total = sum(float(b.get("GPU", 0) or 0) for b in placement_group_bundles)
        if total > 0:
            return total
    return float((ray_actor_options or {}).get("num_gpus") or 0.0)


def selector_gpu_types(ray_actor_options: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The GPU types a deployment's replicas are pinned to (label selector, then fallbacks), in order.

    Example: ``{"label_selector": {"ray.io/accelerator-type": "A100"},
    "fallback_strategy": [{"label_selector": {"ray.io/accelerator-type": "H100"}}]}`` -> ``("A100", "H100")``.
    Empty when the replicas are not pinned to a type.
    """
    opts = ray_actor_options or {}
    out: list[str] = []
    for sel in [
        opts.get("label_selector") or {},
        *[(f or {}).get("label_selector") or {} for f in opts.get("fallback_strategy") or []],
    ]:
        t = sel.get(GPU_TYPE_LABEL)
        if t and t not in out:
            out.append(t)
    return tuple(out)


# Serve's own delays wrap every custom policy (``ray.serve.autoscaling_policy._apply_autoscaling_config``):
# a smaller number from the policy takes effect only after ``downscale_delay_s``, a larger one after
# ``upscale_delay_s``. Above these, the warning below is given. A grant shrink must take effect within about a
# second: the arbiter grants the GPUs to others only once they are released (1.0 s is what Tidal's own server
# runs with, ``AutoscalingOptions.grant_shrink_delay_s``). Replicas granted for a spike should start at once
# (Tidal's server runs with 0; 1 s allows a user's small setting).
MAX_SERVE_DOWNSCALE_DELAY_S = 2.0
MAX_SERVE_UPSCALE_DELAY_S = 1.0
# Serve's defaults, when a config leaves the delays out (ray.serve.config.AutoscalingConfig).
SERVE_DEFAULT_UPSCALE_DELAY_S = 30.0
SERVE_DEFAULT_DOWNSCALE_DELAY_S = 600.0


def serve_delay_warnings(
    service: str,
    *,
    upscale_delay_s: float,
    downscale_delay_s: float,
    downscale_to_zero_delay_s: float | None = None,
) -> list[str]:
    """Warnings, with the fix, for Serve delays that would keep GPUs after a grant shrinks or delay a spike.

    Example: Serve's defaults (30 s up, 600 s down) -> two warnings: a smaller grant removes replicas only
    600 s later (the arbiter waits for those GPUs meanwhile), and granted replicas start 30 s after the load
    asked for them.
    """
    out = []
    down = max(downscale_delay_s, downscale_to_zero_delay_s or 0.0)
    if down > MAX_SERVE_DOWNSCALE_DELAY_S:
        out.append(
            f"service {service!r}: Serve's downscale_delay_s is {down:g} s, so after the arbiter shrinks its grant "
            f"Serve keeps the extra replicas (and their GPUs) up to {down:g} s longer, and whoever the GPUs were "
            f"granted to waits. Fix: set autoscaling_config.downscale_delay_s: 1 (and downscale_to_zero_delay_s, "
            f"if set) and move the load hold to policy_kwargs.downscale_delay_s: {down:g}; "
            "tidal.serve.autoscaling_config(...) writes both"
        )
    if upscale_delay_s > MAX_SERVE_UPSCALE_DELAY_S:
        out.append(
            f"service {service!r}: Serve's upscale_delay_s is {upscale_delay_s:g} s, so replicas the arbiter "
            f"grants for a spike start {upscale_delay_s:g} s after the load asked for them. Fix: set "
            f"autoscaling_config.upscale_delay_s: 0 and move the delay to policy_kwargs.upscale_delay_s: "
            f"{upscale_delay_s:g} (applied before the arbiter hears the rise); tidal.serve.autoscaling_config(...) "
            "writes both"
        )
    return out


def placement_warnings(service: str, gpu_types: list[str], pinned_types: tuple[str, ...]) -> list[str]:
    """A warning when replicas are not pinned to the accepted GPU types (they could land on any GPU).

    Example: gpu_types [A100, H100], pinned () -> one warning naming the ``ray_actor_options`` to add.
    """
    if pinned_types and set(pinned_types) <= set(gpu_types):
        return []
    want = ray_actor_options_for_types(gpu_types, 1.0)
    fix = {k: want[k] for k in ("label_selector", "fallback_strategy") if k in want}
    if not pinned_types:
        what = "are not pinned to a GPU type"
    else:
        what = f"are pinned to {list(pinned_types)}, not all of them accepted"
    return [
        f"service {service!r}: its replicas {what}, so they can start on GPUs the arbiter has not granted "
        f"it (accepted: {gpu_types}). Fix: add to ray_actor_options {fix}; "
        "tidal.serve.ray_actor_options(...) writes it"
    ]


def ray_actor_options_for_types(gpu_types: list[str], num_gpus: float, **extra: Any) -> dict[str, Any]:
    """Replica resources and placement on the accepted types, preferred type first.

    Ray tries ``label_selector`` (the most preferred type) and then each ``fallback_strategy`` entry in
    order, so a replica lands on the first accepted type that has a free GPU. The arbiter decides which
    types have free GPUs (it shrinks training there), so replicas follow the grant.

    Example: gpu_types [A100, H100], 1 GPU ->
    ``{"num_gpus": 1, "label_selector": {"ray.io/accelerator-type": "A100"},
    "fallback_strategy": [{"label_selector": {"ray.io/accelerator-type": "H100"}}]}``.
    """
    opts: dict[str, Any] = {**extra, "num_gpus": num_gpus, "label_selector": {GPU_TYPE_LABEL: gpu_types[0]}}
    if len(gpu_types) > 1:
        opts["fallback_strategy"] = [{"label_selector": {GPU_TYPE_LABEL: t}} for t in gpu_types[1:]]
    return opts


def user_autoscaling_config(
    *,
    gpu_types: list[str],
    min_replicas: int = 1,
    max_replicas: int = 1,
    target_ongoing_requests: float = 2.0,
    priority: int = 100,
    slo_p99_ms: float = 500.0,
    name: str | None = None,
    downscale_delay_s: float = 30.0,
    upscale_delay_s: float = 0.0,
    grant_shrink_delay_s: float = 1.0,
    look_back_period_s: float | None = None,
    **policy_kwargs: Any,
) -> dict[str, Any]:
    """Serve's ``autoscaling_config`` for a deployment under Tidal (``tidal.serve.autoscaling_config``).

    Serve's own delays are set short (0 s up, ``grant_shrink_delay_s`` down): the policy applies the load
    delays itself (``upscale_delay_s``, ``downscale_delay_s``), before the arbiter hears the demand, so a
    smaller grant removes replicas at once and granted replicas start at once. ``policy_kwargs`` go to the
    policy as they are (e.g. ``arbiter_name``, ``surge_reserve_fraction``).

    Raises:
        pydantic.ValidationError: a bad value; the message names the field.

    Example: ``user_autoscaling_config(gpu_types=["A100"], max_replicas=4)`` ->
    ``{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2.0, "upscale_delay_s": 0.0,
    "downscale_delay_s": 1.0, "policy": {"policy_function": "tidal.serve:TidalPolicy", "policy_kwargs":
    {"gpu_types": ["A100"], "priority": 100, ...}}}``.
    """
    kwargs = TidalPolicyOptions(
        name=name,
        gpu_types=gpu_types,
        priority=priority,
        slo_p99_ms=slo_p99_ms,
        downscale_delay_s=downscale_delay_s,
        upscale_delay_s=upscale_delay_s,
        **policy_kwargs,
    ).model_dump(exclude_defaults=True)
    kwargs.update(gpu_types=list(gpu_types), priority=priority, slo_p99_ms=slo_p99_ms)
    # Serve's own bounds, checked here rather than at the controller.
    ServiceSpecModel(
        name="x", gpu_types=list(gpu_types), min_replicas=min_replicas, max_replicas=max_replicas
    )
    if not (target_ongoing_requests > 0 and grant_shrink_delay_s >= 0):
        raise ValueError(
            f"target_ongoing_requests must be > 0 and grant_shrink_delay_s >= 0, got {target_ongoing_requests} "
            f"and {grant_shrink_delay_s}"
        )
    cfg: dict[str, Any] = {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "target_ongoing_requests": target_ongoing_requests,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": grant_shrink_delay_s,
        "policy": {"policy_function": TIDAL_POLICY_PATH, "policy_kwargs": kwargs},
    }
    if look_back_period_s is not None:
        cfg["look_back_period_s"] = look_back_period_s
    return cfg


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
    """The model server's replica resources and placement (:func:`ray_actor_options_for_types`)."""
    return ray_actor_options_for_types(
        list(args.service.gpu_types), args.service.gpus_per_replica, num_cpus=args.num_cpus_per_replica
    )


def tidal_policy_kwargs(args: ServeAppArgs) -> dict[str, Any]:
    """The JSON-able kwargs Serve passes to the policy for Tidal's model server.

    The same kwargs as any user deployment's: the service's name, types, priority and SLO, and the server's
    tuning. Its bounds are the deployment's ``autoscaling_config`` and its GPUs its ``ray_actor_options``
    (both written from ``args.service`` by this module), as for any deployment.
    """
    a = args.autoscaling
    return TidalPolicyOptions(
        name=args.service.name,
        gpu_types=list(args.service.gpu_types),
        priority=args.service.priority,
        slo_p99_ms=args.service.slo_p99_ms,
        downscale_delay_s=a.downscale_delay_s,
        upscale_delay_s=a.upscale_delay_s,
        surge_reserve_fraction=a.surge_reserve_fraction,
        early_reclaim_min_rise=a.early_reclaim_min_rise,
        # A step of the traffic reaches Serve's averaged metric as a ramp one look-back long.
        ramp_window_s=a.look_back_period_s,
        regrow_guard_s=a.regrow_guard_s,
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
