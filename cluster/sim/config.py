"""Knobs of the simulator and of its workload models, validated at the boundary (YAML or CLI).

The policy's own knobs (speeds, prices, headroom, guards, static split) come from the policy file
(``tidal.policies.config``); these are the simulator's: how simulated services and jobs behave, how often the
arbiter ticks, and how trace jobs become ``TrainingJobSpec``s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tidal.cluster.boundary import format_validation_error, read_yaml


class SimConfigError(ValueError):
    """A simulator configuration that cannot be used; the message says what to fix."""


class _Strict(BaseModel):
    # allow_inf_nan=False: a NaN or an infinity in any float field is refused, naming the field.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ServiceModelConfig(_Strict):
    """How a simulated inference service behaves (one per inference trace).

    Attributes:
        replica_rps: requests per second one replica serves, per GPU type it accepts.
        service_time_s: latency of one request when nothing waits, per GPU type (with ``replica_rps``
            it gives a replica's concurrent slots, ``rps * service_time_s``).
        gpu_types: accepted types, most preferred first (default: the types of ``replica_rps`` by rate).
        slo_p99_s: the latency SLO (p99).
        target_utilization: demand is the replicas that serve the current rate at this utilisation.
        startup_s: from a granted replica to it serving (model load), per GPU type or one value.
        drain_s: a removed replica finishes its requests for this long before its GPUs are free.
        autoscale_delay_s: from a rate change to the demand the service reports (metrics look-back).
        backlog_drain_s: a backlog adds the replicas that clear it in this long to the demand.
        timeout_s: a request that would wait longer is dropped (a miss).
        rate_interpolation: ``linear``: a window's rate is its average, and the rate moves on the line
            between window centres, in steps of ``rate_resolution_s``; ``step``: the window's rate holds
            for the whole window and jumps at its end (2x jumps in ServeGen's 10-minute windows).
        burstiness_from_trace: stretch the waiting tail by the trace's per-window CV (Allen-Cunneen);
            off by default (ServeGen's ``rate_weighted_cv`` is a per-client figure, not the aggregate's).
    """

    replica_rps: dict[str, float] = Field(default_factory=lambda: {"H200": 1.3, "H100": 1.0, "A100": 0.5})
    service_time_s: dict[str, float] = Field(default_factory=lambda: {"H200": 3.0, "H100": 3.5, "A100": 5.0})
    gpu_types: list[str] | None = None
    gpus_per_replica: float = Field(1.0, gt=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(100_000, ge=1)
    priority: int = 100
    slo_p99_s: float = Field(10.0, gt=0)
    target_utilization: float = Field(0.7, gt=0, le=1)
    startup_s: float | dict[str, float] = 120.0
    drain_s: float = Field(20.0, ge=0)
    autoscale_delay_s: float = Field(30.0, ge=0)
    backlog_drain_s: float = Field(60.0, gt=0)
    timeout_s: float = Field(60.0, gt=0)
    burstiness_from_trace: bool = False
    rate_interpolation: Literal["linear", "step"] = "linear"
    rate_resolution_s: float = Field(60.0, gt=0)

    @field_validator("replica_rps", "service_time_s")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        for t, x in v.items():
            if x <= 0:
                raise ValueError(f"value for GPU type {t} is {x}: must be > 0")
        return v

    @field_validator("startup_s")
    @classmethod
    def _startup_non_negative(cls, v: float | dict[str, float]) -> float | dict[str, float]:
        for t, x in (v.items() if isinstance(v, dict) else [("", v)]):
            if x < 0:
                where = f"[{t}]" if t else ""
                raise ValueError(f"startup_s{where} = {x}: must be seconds >= 0")
        return v

    @model_validator(mode="after")
    def _types_consistent(self) -> ServiceModelConfig:
        for t in self.accepted_types:
            if t not in self.replica_rps or t not in self.service_time_s:
                raise ValueError(
                    f"gpu_types lists {t!r} but replica_rps/service_time_s do not; "
                    f"valid: {', '.join(sorted(set(self.replica_rps) & set(self.service_time_s)))}"
                )
        return self

    @property
    def accepted_types(self) -> list[str]:
        if self.gpu_types is not None:
            return list(self.gpu_types)
        return sorted(self.replica_rps, key=lambda t: -self.replica_rps[t])

    def startup_of(self, gpu_type: str) -> float:
        if isinstance(self.startup_s, dict):
            return self.startup_s.get(gpu_type, max(self.startup_s.values(), default=120.0))
        return self.startup_s


class TypeClass(_Strict):
    """A share of trace jobs (without a GPU type) that accepts these types (missing ones are dropped)."""

    share: float = Field(gt=0)
    gpu_types: list[str] = Field(min_length=1)


class TrainingModelConfig(_Strict):
    """How trace jobs become ``TrainingJobSpec``s and how a simulated job runs.

    The spec rule (per trace job asking for ``n`` GPUs): one GPU per worker; ``min_workers =
    ceil(n * min_fraction)``, ``max_workers = ceil(n * max_scale)``; accepted types from the job's
    ``gpu_type`` or, if it has none, from a seeded draw over ``type_classes`` (jobs of at least
    ``multi_node_gpus`` GPUs drop the types in ``single_node_only_types``); priority from the trace or
    ``default_priority``; non-preemptible with probability ``non_preemptible_fraction``.

    Speed: a job of ``w`` workers on type ``t`` advances ``speed[t] / speed[reference] * scaling(w / n)``
    reference-seconds per second, where ``scaling(x) = x`` for ``x <= 1`` and ``x ** scaling_exponent``
    above (diminishing returns past the requested size).
    """

    reference_gpu_type: str = "A100"
    min_fraction: float = Field(0.5, gt=0, le=1)
    max_scale: float = Field(2.0, ge=1)
    scaling_exponent: float = Field(0.8, gt=0, le=1)
    checkpoint_period_s: float = Field(1800.0, gt=0)
    yield_grace_s: float = Field(120.0, ge=0)
    restart_s: float = Field(60.0, ge=0)
    checkpoint_save_base_s: float = Field(10.0, ge=0)
    checkpoint_save_per_gpu_s: float = Field(1.0, ge=0)
    step_time_s: tuple[float, float] = (0.5, 5.0)
    default_priority: int = 10
    non_preemptible_fraction: float = Field(0.0, ge=0, le=1)
    type_classes: list[TypeClass] = Field(
        default_factory=lambda: [
            TypeClass(share=0.5, gpu_types=["H200", "H100", "A100", "RTX4090"]),
            TypeClass(share=0.35, gpu_types=["H200", "H100", "A100"]),
            TypeClass(share=0.15, gpu_types=["H200", "H100"]),
        ]
    )
    multi_node_gpus: int = Field(16, ge=1)
    single_node_only_types: list[str] = Field(default_factory=lambda: ["RTX4090"])

    @field_validator("step_time_s")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError(f"step_time_s {list(v)}: must be [low, high] with 0 <= low <= high")
        return v


class ArbiterLoopConfig(_Strict):
    """How the simulated arbiter loop runs.

    Attributes:
        tick_s: periodic tick (1 s on a real cluster; 60 s is enough at datacenter scale).
        event_tick_delay_s: after a registration or a release, tick this soon (event-driven tick).
        event_tick_min_gap_s: but never sooner than this after the previous tick (bounds the ticks at
            datacenter scale, where some workload changes nearly every second).
        heartbeat_delay_s: a workload reads a changed grant this long after the tick (its heartbeat
            period on a real cluster).
        keepalive_s: every workload heartbeats at least this often; registrations expire after 3x.
    """

    tick_s: float = Field(60.0, gt=0)
    event_tick_delay_s: float = Field(5.0, ge=0)
    event_tick_min_gap_s: float = Field(20.0, ge=0)
    heartbeat_delay_s: float = Field(1.0, ge=0)
    keepalive_s: float = Field(600.0, gt=0)


class NodeFailure(_Strict):
    """One node failure: ``node`` (a node id, or a GPU type: its first healthy node) fails at ``at_s``."""

    at_s: float = Field(ge=0)
    node: str
    repair_s: float | None = Field(None, gt=0, description="back after this long; never if unset")


class SimConfig(_Strict):
    """Everything the simulator needs besides the traces, the cluster and the policy file."""

    seed: int = 0
    days: float | None = Field(
        None, gt=0, description="simulated horizon; default: the training trace's span"
    )
    start_day: float = Field(0.0, ge=0)
    drain_s: float = Field(0.0, ge=0, description="keep simulating this long after the horizon (no new jobs)")
    rate_multiplier: float | None = Field(None, gt=0)
    inference_peak_share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="scale inference so that its peak needs this share of the cluster's GPUs",
    )
    training_load: float = Field(
        1.0,
        gt=0,
        description="replicate trace jobs: 2.0 = every job twice (seeded jitter), 1.5 = half of them twice",
    )
    training_jitter_s: float = Field(
        1800.0, ge=0, description="replicas submit up to this long before or after"
    )
    request_window_s: float = Field(60.0, gt=0)
    repeat_inference: bool = True
    sample_s: float = Field(600.0, gt=0, description="resolution of the time series in plots")
    warmup_s: float = Field(
        600.0, ge=0, description="service metrics skip this first stretch (services start cold at time 0)"
    )
    arbiter: ArbiterLoopConfig = Field(default_factory=ArbiterLoopConfig)
    service: ServiceModelConfig = Field(default_factory=ServiceModelConfig)
    training: TrainingModelConfig = Field(default_factory=TrainingModelConfig)
    node_failures: list[NodeFailure] = Field(default_factory=list)
    node_failure_rate_per_day: float = Field(0.0, ge=0, description="random failures per node-day (seeded)")
    node_repair_s: float = Field(4 * 3600.0, gt=0)


def parse_sim_config(data: Any, source: str = "<dict>") -> SimConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SimConfigError(
            f"invalid simulator config {source}: expected a mapping, got {type(data).__name__}"
        )
    try:
        return SimConfig.model_validate(data)
    except ValidationError as e:
        raise SimConfigError(format_validation_error(e, f"simulator config {source}")) from None


def load_sim_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> SimConfig:
    """Reads a simulator YAML (optional) and applies ``overrides`` (from CLI flags; ``None`` values are
    skipped, nested dicts such as ``{"arbiter": {"tick_s": 30}}`` are merged into the file's)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml(p, "simulator config", SimConfigError)
        if loaded is not None and not isinstance(loaded, dict):
            raise SimConfigError(
                f"invalid simulator config {p}: expected a mapping, got {type(loaded).__name__}"
            )
        data = dict(loaded or {})
    _merge(data, overrides or {})
    return parse_sim_config(data, str(path) if path else "<flags>")


def _merge(into: dict[str, Any], overrides: dict[str, Any]) -> None:
    for k, v in overrides.items():
        if v is None:
            continue
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            into[k] = dict(into[k])
            _merge(into[k], v)
        elif isinstance(v, dict):
            into[k] = {kk: vv for kk, vv in v.items() if vv is not None}
        else:
            into[k] = v
