"""The spike scenario of ``make demo`` and ``bench/spike.py``, validated at the boundary (pure: no Ray, no torch).

The scenario file (``demo/configs/demo-scenario.yaml``) holds four things:

- ``load``: the request rate over time: ``base_rps`` for ``pre_spike_s``, ``base_rps * spike_factor`` for
  ``spike_s``, ``base_rps`` again for ``post_spike_s``; the SLO and what the spike needs;
- ``served_model``: the model the service serves and the device time per batch it stands in for;
- ``service``: the ``args`` of ``tidal.serving.app:build_app`` (the format of ``serving/config.yaml``);
- ``jobs``: training job specs (the format of ``training/jobs/*.yaml``).

``LoadPhases`` turns ``load`` into phase boundaries and the piecewise-constant rate windows that the load
generator plays.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tidal.cluster.boundary import format_validation_error, read_yaml

DEFAULT_SCENARIO_PATH = Path(__file__).parent / "configs" / "demo-scenario.yaml"
DEFAULT_POLICY_PATH = Path(__file__).parent / "configs" / "demo-policy.yaml"


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the field, the value and what is valid."""


class LoadModel(BaseModel):
    """The load: a base rate, one spike, and how success is judged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_rps: float = Field(gt=0, description="requests per second outside the spike")
    spike_factor: float = Field(ge=1, description="the spike's rate over base_rps (8 -> 8x)")
    pre_spike_s: float = Field(ge=0)
    spike_s: float = Field(gt=0)
    post_spike_s: float = Field(ge=0)
    replicas_needed: int = Field(ge=1, description="replicas the spike needs; time to capacity waits for them")
    slo_ms: float = Field(gt=0, description="a request meets the SLO if it succeeds within this latency")
    instances_per_request: int = Field(1, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    settle_s: float = Field(
        10.0, ge=0, le=600,
        description="before the load, every job must have trained at its granted size this long (steady state)",
    )  # fmt: skip
    seed: int = 0


class ServedModelModel(BaseModel):
    """The model the service serves (``tidal.demo.model.DeviceTimedMLP``, trained by the run)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden: int = Field(128, ge=1)
    device_ms_per_batch: float = Field(
        0.0, ge=0, le=10_000, description="time a GPU would take per batch; waited on CPU replicas only"
    )


class ScenarioConfig(BaseModel):
    """The whole scenario file. ``service`` and ``jobs`` are validated by their own packages when used."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    load: LoadModel
    served_model: ServedModelModel = Field(default_factory=ServedModelModel)
    service: dict[str, Any]
    jobs: list[dict[str, Any]] = Field(min_length=1)

    @model_validator(mode="after")
    def _service_can_reach_what_the_spike_needs(self) -> ScenarioConfig:
        svc = self.service.get("service") or {}
        max_replicas = svc.get("max_replicas")
        if isinstance(max_replicas, int) and self.load.replicas_needed > max_replicas:
            raise ValueError(
                f"load.replicas_needed={self.load.replicas_needed} is above service.service.max_replicas="
                f"{max_replicas}; valid: 1..{max_replicas}"
            )
        names = [j.get("name") for j in self.jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"jobs: names must be distinct, got {names}")
        return self

    @property
    def service_name(self) -> str:
        return str(self.service["service"]["name"])

    @property
    def job_names(self) -> list[str]:
        return [str(j["name"]) for j in self.jobs]

    def phases(self) -> LoadPhases:
        return LoadPhases.of(self.load)

    def with_overrides(self, **load_overrides: Any) -> ScenarioConfig:
        """A copy with some ``load`` fields changed (validated again), e.g. a shorter spike for a smoke test."""
        data = self.model_dump()
        data["load"].update({k: v for k, v in load_overrides.items() if v is not None})
        return parse_scenario(data, "overrides")

    def service_args(self, checkpoint: str, autoscaling_policy: str | None = None) -> dict[str, Any]:
        """The service's ``build_app`` args with the checkpoint filled in (and, optionally, the policy)."""
        args = copy.deepcopy(self.service)
        args.setdefault("model", {})["checkpoint"] = checkpoint
        if autoscaling_policy is not None:
            args.setdefault("autoscaling", {})["policy"] = autoscaling_policy
        return args

    def job_spec(self, name: str, storage_path: str) -> dict[str, Any]:
        """One job's spec with its storage path filled in."""
        for j in self.jobs:
            if j["name"] == name:
                spec = copy.deepcopy(j)
                spec["storage_path"] = storage_path
                return spec
        raise KeyError(f"no job named {name!r}; valid: {', '.join(self.job_names)}")


@dataclass(frozen=True)
class LoadPhases:
    """Phase boundaries in seconds from the start of the load.

    Example: pre 20, spike 60, post 70 -> spike from 20 to 80, end at 150.
    """

    base_rps: float
    spike_rps: float
    spike_start_s: float
    spike_end_s: float
    end_s: float

    @staticmethod
    def of(load: LoadModel) -> LoadPhases:
        start = load.pre_spike_s
        end = start + load.spike_s
        return LoadPhases(load.base_rps, load.base_rps * load.spike_factor, start, end, end + load.post_spike_s)

    def rate_windows(self) -> list[tuple[float, float]]:
        """``(start_s, rate_rps)`` windows for the load generator, ending with a zero-rate window."""
        out = []
        if self.spike_start_s > 0:
            out.append((0.0, self.base_rps))
        out.append((self.spike_start_s, self.spike_rps))
        if self.end_s > self.spike_end_s:
            out.append((self.spike_end_s, self.base_rps))
        out.append((self.end_s, 0.0))
        return out

    def phase_at(self, t_s: float) -> str:
        """``pre``, ``spike`` or ``post`` for a time since the start of the load (``done`` after the end)."""
        if t_s < self.spike_start_s:
            return "pre"
        if t_s < self.spike_end_s:
            return "spike"
        if t_s < self.end_s:
            return "post"
        return "done"

    def rate_at(self, t_s: float) -> float:
        phase = self.phase_at(t_s)
        return {"pre": self.base_rps, "spike": self.spike_rps, "post": self.base_rps}.get(phase, 0.0)


def parse_scenario(data: Any, source: str = "<dict>") -> ScenarioConfig:
    if not isinstance(data, dict):
        raise ScenarioError(f"scenario {source}: expected a mapping with load/service/jobs, got {type(data).__name__}")
    try:
        return ScenarioConfig.model_validate(data)
    except ValidationError as e:
        raise ScenarioError(format_validation_error(e, f"scenario {source}")) from None


def load_scenario(path: str | Path | None = None) -> ScenarioConfig:
    """Reads and validates a scenario file (default: ``demo/configs/demo-scenario.yaml``).

    Raises:
        ScenarioError: naming the file, the field, the bad value and what is valid.
    """
    p = Path(path) if path is not None else DEFAULT_SCENARIO_PATH
    return parse_scenario(read_yaml(p, "scenario", ScenarioError), str(p))
