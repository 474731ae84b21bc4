"""Workload specs at the boundary: pydantic models for what users write (YAML, CLI, HTTP).

They validate and turn into the frozen ``ServiceSpec`` / ``TrainingJobSpec`` the arbiter uses. Pass
``known_gpu_types`` to reject a GPU type the cluster does not have, naming what it has.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tidal.cluster.model import ServiceSpec, TrainingJobSpec


class SpecError(ValueError):
    """A workload spec that cannot be used; the message names the field, the value and what is valid."""


class _WorkloadModel(BaseModel):
    # allow_inf_nan=False: a NaN or an infinity in any float field is refused, naming the field.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    gpu_types: list[str] = Field(min_length=1, description="acceptable GPU types, most preferred first")
    priority: int = 10

    @field_validator("gpu_types")
    @classmethod
    def _no_duplicates(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"gpu_types {v} lists a type twice")
        return v


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


def format_validation_error(e: ValidationError, what: str) -> str:
    """One line per problem: ``field: message (got value)``."""
    lines = [f"invalid {what}:"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


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
