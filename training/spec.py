"""The training job spec: the YAML a user writes under ``training/jobs/``, validated at the boundary.

Pure: pydantic and PyYAML only. Importing this module imports neither ray nor torch; checking that the
model and data entrypoints import (``check_imports=True``) does import them, which is the point.

Two checks need the world outside the file, so they take it as validation context:

- ``known_gpu_types``: GPU types this cluster has (the arbiter's inventory, or ``--known-gpu-types``).
  A job asking for a type not in the list is refused.
- ``check_imports``: import ``model.class`` and ``data.factory`` and refuse the spec if they do not import.

Every error names the field, the bad value and what would be valid, e.g.::

    training/jobs/bad.yaml: gpu_types[1]: 'V100' is not a GPU type of this cluster; valid: A100, H100

Example YAML (see ``training/jobs/digits.yaml``)::

    name: digits
    model: {class: "tidal.training.models:DigitsMLP", kwargs: {hidden: 128}}
    data: {factory: "tidal.training.data:digits"}
    gpu_types: [H100, A100]
    min_workers: 1
    max_workers: 4
    global_batch_size: 64
    steps: 300
    storage_path: /mnt/shared/tidal-train   # default ~/.tidal/train
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from tidal.cluster.boundary import validation_problems
from tidal.cluster.model import TrainingJobSpec

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
DEFAULT_STORAGE_PATH = "~/.tidal/train"


class SpecError(ValueError):
    """A job spec was refused. ``str(error)`` lists every problem, one per line, field first."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def _check_entrypoint_syntax(field: str, value: str) -> str:
    module, sep, attr = value.partition(":")
    if not sep or not module or not attr or ":" in attr:
        raise ValueError(f"{field} must be 'module:attr' (e.g. 'tidal.training.models:DigitsMLP'), got {value!r}")
    return value


def import_entrypoint(value: str) -> Any:
    """Imports ``module:attr`` and returns the attribute.

    Raises:
        ValueError: naming the module or attribute that does not import, and why.
    """
    module_name, _, attr = value.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # an ImportError, or any error raised while the module runs
        raise ValueError(f"{value!r} does not import: module {module_name!r}: {type(e).__name__}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError as e:
        public = sorted(n for n in vars(module) if not n.startswith("_"))[:12]
        raise ValueError(
            f"{value!r} does not import: module {module_name!r} has no attribute {attr!r}"
            f" (it has: {', '.join(public)})"
        ) from e


class ModelRef(BaseModel):
    """The ``nn.Module`` to train: ``class`` as ``module:attr`` and its constructor ``kwargs``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    class_path: str = Field(alias="class", description="The model class, as 'module:attr'.")
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("class_path")
    @classmethod
    def _syntax(cls, v: str, info: ValidationInfo) -> str:
        _check_entrypoint_syntax("model.class", v)
        if (info.context or {}).get("check_imports"):
            obj = import_entrypoint(v)
            if not isinstance(obj, type):
                raise ValueError(f"{v!r} is a {type(obj).__name__}, not a class")
        return v


class DataRef(BaseModel):
    """The data: ``factory`` (``module:attr``) called with ``seed`` and ``kwargs`` returns a dataset."""

    model_config = ConfigDict(extra="forbid")

    factory: str = Field(description="A dataset factory, as 'module:attr' (see tidal.training.data).")
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _syntax(cls, v: str, info: ValidationInfo) -> str:
        _check_entrypoint_syntax("data.factory", v)
        if (info.context or {}).get("check_imports"):
            obj = import_entrypoint(v)
            if not callable(obj):
                raise ValueError(f"{v!r} is a {type(obj).__name__}, not callable")
        return v


class FaultInjection(BaseModel):
    """Test-only misbehaviour, to prove the trainer copes with it. Off by default; never set in production.

    Attributes:
        ignore_yield: the loop never yields when asked (it must then be stopped by force).
        step_delay_s: sleep this long in every step (makes a tiny model slow enough to observe).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    ignore_yield: bool = False
    step_delay_s: float = Field(default=0.0, ge=0.0, le=60.0)


class JobSpec(BaseModel):
    """An elastic training job, as written in ``training/jobs/*.yaml``.

    Sizing: the job runs ``min_workers..max_workers`` workers of ``gpus_per_worker`` GPUs each, all of
    one GPU type taken from ``gpu_types`` (most preferred first); the arbiter's grant picks the number.

    Optimisation: ``global_batch_size`` samples per optimiser step whatever the number of workers (each
    worker takes a share; ``max_micro_batch_size`` bounds one forward pass, with gradient accumulation
    above it), so resizing changes speed, not the loss curve. Length: ``steps``, or ``epochs`` (converted
    to steps with the dataset size).
    """

    # allow_inf_nan=False: a NaN or an infinity in any float field is refused, naming the field.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(pattern=NAME_PATTERN, description="Job name, unique on the cluster.")
    model: ModelRef
    data: DataRef

    gpus_per_worker: float = Field(default=1.0, gt=0)
    cpus_per_worker: float = Field(default=1.0, ge=0)
    min_workers: int = Field(default=1, ge=1)
    max_workers: int = Field(default=1, ge=1)
    gpu_types: list[str] = Field(min_length=1, description="Accepted GPU types, most preferred first.")
    priority: int = 10
    preemptible: bool = True
    weight: float = Field(default=1.0, gt=0)

    checkpoint_every_steps: int | None = Field(default=None, ge=1)
    checkpoint_period_s: float = Field(default=60.0, gt=0)
    num_checkpoints_to_keep: int = Field(default=2, ge=1)
    yield_grace_s: float = Field(default=30.0, gt=0)
    resize_min_interval_s: float = Field(default=60.0, ge=0)
    spare_workers: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Idle worker processes kept started, bound to this job, on the nodes of the GPU type it trains "
        "on, so that a resize's new worker group starts in processes that have already imported Ray, torch and "
        "Ray Train (training/spares.py). Each costs a process's memory (~0.4 GB with torch on CPU, no GPU memory) "
        "while it waits; they are started only while the job trains steadily. 0: off.",
    )
    max_failures: int = Field(
        default=3,
        ge=-1,
        description="Worker-group failures (a lost node, a crashed worker) Ray Train retries from the last "
        "checkpoint before the run ends (Ray Train's FailureConfig.max_failures); -1: without end. A resize is "
        "not a failure.",
    )
    health_check_interval_s: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="How often Ray Train's controller polls the workers and Tidal's scaling policy decides "
        "(TidalConfig.controller_poll_s; Ray's default is 2 s): a grant change is acted on, and a yielded group's "
        "GPUs freed, at the next poll; every poll costs CPU on the controller and the workers. An environment "
        "variable RAY_TRAIN_HEALTH_CHECK_INTERVAL_S wins.",
    )
    cpu_niceness: int = Field(
        default=0,
        ge=0,
        le=19,
        description="Each training worker raises its niceness by this much when it starts (os.nice), so "
        "that inference replicas sharing its host's CPUs keep their latency. 0: unchanged.",
    )

    global_batch_size: int = Field(ge=1)
    max_micro_batch_size: int | None = Field(default=None, ge=1)
    steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    backend: Literal["auto", "nccl", "gloo"] = Field(
        default="auto", description="torch.distributed backend; auto: NCCL where workers see CUDA, else gloo."
    )
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    seed: int = 0

    storage_path: str = Field(
        default=DEFAULT_STORAGE_PATH,
        min_length=1,
        validate_default=True,
        description="Local directory or fsspec/pyarrow URI (s3://...); default ~/.tidal/train, in the home of "
        "the user who runs the job (a fixed path under /tmp would be open to every user of the machine).",
    )
    export_path: str | None = Field(
        default=None, description="Where the final model goes for serving; default <storage_path>/<name>/model."
    )
    report_every_steps: int = Field(default=10, ge=1)
    expected_metrics: dict[str, float] = Field(
        default_factory=dict, description="Metrics the job is stated to reach: at least the value, at most for a *loss (test_loss: 2.0).",
    )
    fault_injection: FaultInjection = Field(default_factory=FaultInjection)

    @field_validator("gpu_types")
    @classmethod
    def _known_types(cls, v: list[str], info: ValidationInfo) -> list[str]:
        seen: set[str] = set()
        for t in v:
            if not t or t != t.strip():
                raise ValueError(f"GPU type {t!r} is empty or has surrounding spaces")
            if t in seen:
                raise ValueError(f"GPU type {t!r} is listed twice; list each type once, most preferred first")
            seen.add(t)
        known = (info.context or {}).get("known_gpu_types")
        if known is not None:
            unknown = [t for t in v if t not in known]
            if unknown:
                valid = ", ".join(sorted(known)) or "(none: the cluster reports no GPU types)"
                raise ValueError(
                    f"{', '.join(repr(t) for t in unknown)} {'is not a GPU type' if len(unknown) == 1 else 'are not GPU types'}"
                    f" of this cluster; valid: {valid}"
                )
        return v

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, v: str) -> str:
        if "://" not in v and not os.path.isabs(os.path.expanduser(v)):
            raise ValueError(
                f"storage_path {v!r} is a relative path; use an absolute directory (a job's working directory"
                " is a temporary copy) or a URI such as s3://bucket/prefix"
            )
        return v if "://" in v else os.path.expanduser(v)

    @field_validator("max_workers")
    @classmethod
    def _min_not_above_max(cls, v: int, info: ValidationInfo) -> int:
        lo = info.data.get("min_workers")
        if lo is not None and lo > v:
            raise ValueError(f"min_workers={lo} is above max_workers={v}; valid: min_workers <= max_workers")
        return v

    @field_validator("global_batch_size")
    @classmethod
    def _a_sample_per_worker(cls, v: int, info: ValidationInfo) -> int:
        hi = info.data.get("max_workers")
        if hi is not None and v < hi:
            raise ValueError(
                f"global_batch_size={v} is below max_workers={hi}: every worker needs at least one sample per"
                " step; valid: global_batch_size >= max_workers"
            )
        return v

    @model_validator(mode="after")
    def _length(self) -> JobSpec:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(
                f"steps, epochs: give exactly one of them (got steps={self.steps!r}, epochs={self.epochs!r})"
            )
        return self

    # ------------------------------------------------------------------------------------ derived

    def total_steps(self, num_samples: int) -> int:
        """Optimiser steps of the whole run: ``steps``, or ``ceil(epochs * num_samples / global_batch_size)``.

        Example: 2 epochs of 1437 samples at a global batch of 64 -> ceil(2874 / 64) = 45 steps.
        """
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None
        return max(1, math.ceil(self.epochs * num_samples / self.global_batch_size))

    def resolved_export_path(self) -> str:
        return self.export_path or f"{self.storage_path.rstrip('/')}/{self.name}/model"

    def to_training_job_spec(self) -> TrainingJobSpec:
        """The arbiter's view of this job (``tidal.cluster.model.TrainingJobSpec``)."""
        return TrainingJobSpec(
            name=self.name,
            gpus_per_worker=self.gpus_per_worker,
            min_workers=self.min_workers,
            max_workers=self.max_workers,
            gpu_types=tuple(self.gpu_types),
            priority=self.priority,
            preemptible=self.preemptible,
            weight=self.weight,
            checkpoint_period_s=self.checkpoint_period_s,
            yield_grace_s=self.yield_grace_s,
        )


def _problems(err: ValidationError) -> list[str]:
    # A job spec names its model's class ``class`` (``class_path`` in the model, a Python keyword aside).
    return [p.replace("model.class_path", "model.class", 1) for p in validation_problems(err)]


def parse_spec(
    data: Mapping[str, Any],
    *,
    source: str = "<spec>",
    known_gpu_types: Iterable[str] | None = None,
    check_imports: bool = False,
) -> JobSpec:
    """Validates a spec given as a mapping.

    Raises:
        SpecError: listing every problem as ``field: message (got value)``.
    """
    context = {
        "known_gpu_types": None if known_gpu_types is None else sorted(set(known_gpu_types)),
        "check_imports": check_imports,
    }
    try:
        return JobSpec.model_validate(dict(data), context=context)
    except ValidationError as e:
        raise SpecError(source, _problems(e)) from None


def load_spec(
    path: str | os.PathLike,
    *,
    known_gpu_types: Iterable[str] | None = None,
    check_imports: bool = False,
    text: str | None = None,
) -> JobSpec:
    """Reads and validates a job spec YAML file (or ``text``, its content sent by other means).

    Raises:
        SpecError: the file is missing, is not a YAML mapping, or fails validation.
    """
    source = str(path)
    if text is None:
        p = Path(path)
        if not p.is_file():
            raise SpecError(source, [f"job spec file not found (cwd {os.getcwd()})"])
        text = p.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(source, [f"not valid YAML: {e}"]) from None
    if not isinstance(data, dict):
        raise SpecError(source, [f"must be a YAML mapping of fields, got {type(data).__name__}"])
    return parse_spec(data, source=source, known_gpu_types=known_gpu_types, check_imports=check_imports)
