"""``TidalConfig``: what a user's ``TidalTrainer`` adds to Ray Train's own configs (pure: no Ray, no torch).

Validated where the user builds it, before anything starts: a bad value raises :class:`TidalConfigError`
with one line per problem naming the field, the value and what is valid::

    >>> TidalConfig(gpu_types=[], yield_grace_s=0)
    Traceback (most recent call last):
    TidalConfigError: invalid TidalConfig:
      gpu_types: List should have at least 1 item after validation, not 0 (got [])
      yield_grace_s: Input should be greater than 0 (got 0)
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tidal.cluster.specs import format_validation_error

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class TidalConfigError(ValueError):
    """A ``TidalConfig`` (or its combination with the trainer's ``ScalingConfig``) that cannot run."""


class TidalConfig(BaseModel):
    """How the arbiter sees a ``TidalTrainer`` job.

    Attributes:
        gpu_types: accepted GPU types (``ray.io/accelerator-type`` label values), most preferred first.
        priority: higher wins GPUs first (services are usually 100, jobs 10).
        preemptible: whether a higher-priority workload may take the job below ``min_workers``.
        yield_grace_s: how long a yield may take (a checkpoint reported on every rank) before the worker
            group is stopped by force; it resumes from its last reported checkpoint.
        name: the job's name at the arbiter (default: ``RunConfig.name``, else one is made up).
        weight: share of free GPUs among jobs of equal priority.
        resize_min_interval_s: a grow waits until the worker group has run this long (a resize costs a
            restart of the worker group, so grows are batched); shrinks never wait.
        arbiter_name: the arbiter actor's name (namespace ``tidal``).
        controller_poll_s: how often Ray Train's controller polls its workers (Ray's default is 2 s): a
            grant change is acted on at the next poll.
        register_timeout_s: how long the controller waits for the arbiter's answer at start-up before it
            runs as plain Ray Train would.
        spare_workers: idle worker processes kept started for the job on the nodes of the GPU type it
            trains on (``tidal.training.spares``), so that a resize's new workers start in processes that
            have imported Ray and torch already; each costs a process's memory while it waits. 0: off.
        standalone: run without the arbiter: ``max_workers`` workers on the first of ``gpu_types``, never
            resized (for trying a job on a cluster that runs nothing else).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    gpu_types: list[str] = Field(min_length=1)
    priority: int = 10
    preemptible: bool = True
    yield_grace_s: float = Field(default=30.0, gt=0, le=3600)
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    weight: float = Field(default=1.0, gt=0)
    resize_min_interval_s: float = Field(default=60.0, ge=0, le=86400)
    arbiter_name: str = Field(default="tidal-arbiter", min_length=1)
    controller_poll_s: float = Field(default=0.5, gt=0, le=60)
    register_timeout_s: float = Field(default=30.0, gt=0, le=600)
    spare_workers: int = Field(default=0, ge=0, le=64)
    standalone: bool = False

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise TidalConfigError(format_validation_error(e, "TidalConfig")) from None

    @field_validator("gpu_types")
    @classmethod
    def _types_are_labels(cls, v: list[str]) -> list[str]:
        for t in v:
            if not t or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", t):
                raise ValueError(
                    f"GPU type {t!r} is not a label value (letters, digits, '_', '.', '-'), e.g. 'H100'"
                )
        if len(set(v)) != len(v):
            raise ValueError(f"GPU types repeat: {v}; list each once, most preferred first")
        return v


def job_name(cfg: TidalConfig, run_name: str | None, token: str) -> str:
    """The name the job registers under: the config's, else Ray Train's run name made a valid job name.

    Example: run name ``"My Run.v2"`` -> ``"my-run-v2"``; no run name, token ``"ab12cd"`` -> ``"train-ab12cd"``.
    """
    if cfg.name:
        return cfg.name
    if run_name:
        name = re.sub(r"[^a-z0-9_-]+", "-", run_name.lower()).strip("-_")[:63]
        if name and re.fullmatch(NAME_PATTERN, name):
            return name
    return f"train-{token}"


def worker_bounds(num_workers: Any) -> tuple[int, int]:
    """``ScalingConfig.num_workers`` as ``(min, max)``: an int is a fixed size, a pair a range.

    Raises:
        TidalConfigError: not a positive int or a pair ``min <= max`` of them.
    """
    if isinstance(num_workers, int) and not isinstance(num_workers, bool):
        lo = hi = num_workers
    elif isinstance(num_workers, tuple | list) and len(num_workers) == 2:
        lo, hi = num_workers
    else:
        raise TidalConfigError(
            f"invalid ScalingConfig:\n  num_workers: expected an int or (min, max) (got {num_workers!r})"
        )
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, hi)) or not 1 <= lo <= hi:
        raise TidalConfigError(
            f"invalid ScalingConfig:\n  num_workers: expected 1 <= min <= max, whole numbers (got {num_workers!r})"
        )
    return int(lo), int(hi)
