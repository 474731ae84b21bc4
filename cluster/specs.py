"""Workload specs at the boundary: pydantic models for what users write (YAML, CLI, HTTP).

They validate and turn into the frozen ``ServiceSpec`` / ``TrainingJobSpec`` the arbiter uses. Pass
``known_gpu_types`` to reject a GPU type the cluster does not have, naming what it has.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from tidal.cluster.boundary import format_validation_error
from tidal.cluster.model import ServiceSpec, TrainingJobSpec, WorkloadKind, WorkloadSpec

# A GPU type is a value of the node label ``ray.io/accelerator-type``: Ray's rule for label values (at most
# 63 characters, alphanumeric at both ends, ``-``, ``_`` and ``.`` inside).
GPU_TYPE_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
GpuTypeName = Annotated[str, StringConstraints(pattern=GPU_TYPE_PATTERN)]


def _each_type_once(v: list[str]) -> list[str]:
    if len(set(v)) != len(v):
        raise ValueError(f"gpu_types {v} lists a type twice")
    return v


# GPU types in order of preference, each once (a service's, a job's, a deployment's policy_kwargs).
GpuTypeList = Annotated[list[GpuTypeName], AfterValidator(_each_type_once)]


class SpecError(ValueError):
    """A workload spec that cannot be used; the message names the field, the value and what is valid."""


class _WorkloadModel(BaseModel):
    # allow_inf_nan=False: a NaN or an infinity in any float field is refused, naming the field.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    gpu_types: GpuTypeList = Field(min_length=1, description="acceptable GPU types, most preferred first")
    priority: int = 10


class ServiceSpecModel(_WorkloadModel):
    gpus_per_replica: float = Field(1.0, gt=0, le=64)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    slo_p99_ms: float = Field(500.0, gt=0)
    priority: int = 100

    @model_validator(mode="after")
    def _min_le_max(self) -> ServiceSpecModel:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas}); "
                "min_replicas must be <= max_replicas"
            )
        return self

    def to_spec(self) -> ServiceSpec:
        return ServiceSpec(
            self.name,
            self.gpus_per_replica,
            self.min_replicas,
            self.max_replicas,
            tuple(self.gpu_types),
            self.slo_p99_ms,
            self.priority,
        )


class TrainingJobSpecModel(_WorkloadModel):
    gpus_per_worker: float = Field(1.0, gt=0, le=64)
    min_workers: int = Field(1, ge=1)
    max_workers: int = Field(1, ge=1)
    preemptible: bool = True
    weight: float = Field(1.0, gt=0)
    checkpoint_period_s: float = Field(60.0, gt=0)
    yield_grace_s: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _min_le_max(self) -> TrainingJobSpecModel:
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"min_workers ({self.min_workers}) is above max_workers ({self.max_workers}); "
                "min_workers must be <= max_workers"
            )
        return self

    def to_spec(self) -> TrainingJobSpec:
        return TrainingJobSpec(
            self.name,
            self.gpus_per_worker,
            self.min_workers,
            self.max_workers,
            tuple(self.gpu_types),
            self.priority,
            self.preemptible,
            self.weight,
            self.checkpoint_period_s,
            self.yield_grace_s,
        )


def _check_types(gpu_types: list[str], known: Iterable[str] | None, what: str) -> None:
    if known is None:
        return
    known_set = set(known)
    for t in gpu_types:
        if t not in known_set:
            raise SpecError(
                f"invalid {what}:\n  gpu_types: unknown GPU type {t!r}; valid: {', '.join(sorted(known_set))}"
            )


def parse_service_spec(data: Any, known_gpu_types: Iterable[str] | None = None) -> ServiceSpec:
    try:
        m = ServiceSpecModel.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, "service spec")) from None
    _check_types(m.gpu_types, known_gpu_types, f"service spec {m.name!r}")
    return m.to_spec()


def parse_training_job_spec(data: Any, known_gpu_types: Iterable[str] | None = None) -> TrainingJobSpec:
    try:
        m = TrainingJobSpecModel.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, "training job spec")) from None
    _check_types(m.gpu_types, known_gpu_types, f"training job spec {m.name!r}")
    return m.to_spec()


class _RegisteredServiceModel(ServiceSpecModel):
    """A service as the arbiter takes it: also parked at zero (``max_replicas`` 0), which asks for nothing."""

    max_replicas: int = Field(1, ge=0)


_MODELS: dict[WorkloadKind, type[ServiceSpecModel] | type[TrainingJobSpecModel]] = {
    WorkloadKind.SERVICE: _RegisteredServiceModel,
    WorkloadKind.TRAINING: TrainingJobSpecModel,
}


def _plain(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with numbers as Python's own (a numpy integer is an ``int``) and ``gpu_types`` as a list, for
    strict validation: a string where a number belongs, a bool where a count belongs, or a fraction of a
    worker is refused, not coerced."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            out[k] = list(v) if k == "gpu_types" and isinstance(v, tuple) else v
        elif isinstance(v, numbers.Integral):
            out[k] = int(v)
        else:
            out[k] = float(v)
    return out


def _validate(kind: WorkloadKind, data: Mapping[str, Any]) -> WorkloadSpec:
    model = _MODELS[kind]
    what = "service spec" if kind is WorkloadKind.SERVICE else "training job spec"
    try:
        m = model.model_validate(_plain(data), strict=True)
    except ValidationError as e:
        name = data.get("name")
        raise SpecError(format_validation_error(e, f"{what} {name!r}" if isinstance(name, str) else what)) from None
    return m.to_spec()


def parse_workload_spec(data: Any) -> WorkloadSpec:
    """A spec from its dict with its kind (``tidal.cluster.model.spec_to_dict``), as the arbiter's actor and
    its saved state receive it. Raises ``SpecError`` naming the field, the value and what is valid."""
    if not isinstance(data, Mapping):
        raise SpecError(f"invalid workload spec: expected a mapping with a kind, got {data!r}")
    fields = dict(data)
    kind = fields.pop("kind", None)
    try:
        kind = WorkloadKind(kind)
    except ValueError:
        valid = ", ".join(str(k) for k in WorkloadKind)
        raise SpecError(f"invalid workload spec:\n  kind: unknown kind {kind!r}; valid: {valid}") from None
    return _validate(kind, fields)


def check_spec(spec: Any) -> WorkloadSpec:
    """``spec`` itself when every field is valid, as a user's spec file would be checked; raises ``SpecError``
    naming the field, the value and what is valid (what ``ResourceArbiter.register`` refuses)."""
    if not isinstance(spec, ServiceSpec | TrainingJobSpec):
        raise SpecError(f"invalid workload spec: expected a ServiceSpec or a TrainingJobSpec, got {spec!r}")
    _validate(spec.kind, {f: getattr(spec, f) for f in spec.__dataclass_fields__})
    return spec
