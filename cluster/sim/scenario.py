"""Small, self-contained simulator scenarios in YAML, with bounds on their results.

A scenario holds its own cluster, inference rate, training jobs, simulator knobs and, per policy, the
bounds its metrics must stay within (in the spirit of kueue's
``test/performance/scheduler/configs/baseline/rangespec.yaml``: every bound is commented in the YAML
with where its number comes from). The tests in ``tests/sim/`` run them; so can anyone::

    python -c "from tidal.cluster.sim.scenario import *; print(check_bounds(*run_scenario(load_scenario('x.yaml'))))"

Format::

    name: burst
    policies: [tidal, static, ray-alone]
    cluster: {node_groups: [{gpu_type: H100, count: 4, num_gpus: 8}]}   # the `tidal up` format
    sim: {days: 0.25, seed: 0, service: {...}, training: {...}}          # tidal.cluster.sim.config.SimConfig
    policy_config: {headroom_fraction: 0.1}                               # tidal.cluster.policy_file (optional)
    inference:                                                            # one service
      window_s: 600
      rates_rps: [10, 10, 40, 10]        # or: diurnal: {min_rps: 5, max_rps: 30, peak_hour: 14}
    jobs:                                # submit_s, duration_s (reference type), num_gpus[, gpu_type, priority]
      - {submit_s: 0, duration_s: 36000, num_gpus: 8}
    job_stream: {count: 40, every_s: 1800, num_gpus: [1, 2, 4], duration_s: [3600, 7200]}   # optional
    bounds:
      tidal: {slo_minutes: {min: 0.97}}
      ray-alone: {slo_minutes: {max: 0.9}}
    compare:                             # a metric against another policy's (or another metric)
      - {policy: tidal, metric: avg_jct_s, of_policy: static, max_ratio: 0.667}
      - {policy: tidal, metric: gpu_allocation_ratio, of_metric: oracle_allocation_ratio, min_ratio: 0.95}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tidal.cluster.boundary import format_validation_error, read_yaml
from tidal.cluster.cluster_spec import parse_cluster_spec
from tidal.cluster.model import NodeSnapshot
from tidal.cluster.policy_file import parse_policy_file
from tidal.cluster.sim.config import parse_sim_config
from tidal.cluster.sim.run import prepare_inputs, run_policies
from tidal.cluster.sim.simulator import PolicyResult, SimInputs
from tidal.cluster.sim.traces import RateSeries, TrainingJobRecord


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message says what to fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Diurnal(_Strict):
    """A day-shaped rate: a cosine from ``min_rps`` (12 h from the peak) to ``max_rps`` at ``peak_hour``."""

    min_rps: float = Field(ge=0)
    max_rps: float = Field(ge=0)
    peak_hour: float = Field(14.0, ge=0, lt=24)


class InferenceModel(_Strict):
    name: str = "svc"
    window_s: float = Field(600.0, gt=0)
    rates_rps: list[float] | None = None
    diurnal: Diurnal | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> InferenceModel:
        if (self.rates_rps is None) == (self.diurnal is None):
            raise ValueError(
                "inference: give exactly one of rates_rps (a list) or diurnal (min_rps, max_rps)"
            )
        return self

    def series(self) -> RateSeries:
        if self.rates_rps is not None:
            rates = tuple(float(r) for r in self.rates_rps)
        else:
            d = self.diurnal
            assert d is not None
            n = max(1, round(86_400.0 / self.window_s))
            rates = tuple(
                d.min_rps
                + (d.max_rps - d.min_rps)
                * 0.5
                * (1 + math.cos(2 * math.pi * (((i + 0.5) * self.window_s / 3600.0) - d.peak_hour) / 24.0))
                for i in range(n)
            )
        starts = tuple(i * self.window_s for i in range(len(rates)))
        return RateSeries(self.name, starts, rates, len(rates) * self.window_s, repeat=True)


class JobModel(_Strict):
    submit_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)
    num_gpus: int = Field(ge=1)
    gpu_type: str | None = None
    priority: int | None = None


class JobStream(_Strict):
    """``count`` jobs, one every ``every_s`` from ``start_s``; sizes and durations cycle through the lists."""

    count: int = Field(ge=1)
    start_s: float = Field(0.0, ge=0)
    every_s: float = Field(gt=0)
    num_gpus: list[int] = Field(min_length=1)
    duration_s: list[float] = Field(min_length=1)

    def jobs(self) -> list[JobModel]:
        return [
            JobModel(
                submit_s=self.start_s + i * self.every_s,
                num_gpus=self.num_gpus[i % len(self.num_gpus)],
                duration_s=self.duration_s[i % len(self.duration_s)],
            )
            for i in range(self.count)
        ]


class Bound(_Strict):
    min: float | None = None
    max: float | None = None


class Comparison(_Strict):
    """``policy.metric / of_policy.of_metric`` within ``[min_ratio, max_ratio]`` (each defaults to the
    policy and metric compared)."""

    policy: str
    metric: str
    of_policy: str | None = None
    of_metric: str | None = None
    min_ratio: float | None = Field(None, ge=0)
    max_ratio: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _something_to_check(self) -> Comparison:
        if self.min_ratio is None and self.max_ratio is None:
            raise ValueError("compare: give min_ratio, max_ratio or both")
        if self.of_policy is None and self.of_metric is None:
            raise ValueError("compare: give of_policy, of_metric or both (else it compares a metric to itself)")
        return self

    def describe(self) -> str:
        ref = f"{self.of_policy or self.policy}.{self.of_metric or self.metric}"
        return f"{self.policy}.{self.metric} / {ref}"


class ScenarioModel(_Strict):
    name: str
    description: str = ""
    policies: list[str] = Field(default_factory=lambda: ["tidal", "static", "ray-alone"])
    cluster: dict[str, Any]
    sim: dict[str, Any] = Field(default_factory=dict)
    policy_config: dict[str, Any] = Field(default_factory=dict)
    inference: InferenceModel | None = None
    jobs: list[JobModel] = Field(default_factory=list)
    job_stream: JobStream | None = None
    bounds: dict[str, dict[str, Bound]] = Field(default_factory=dict)
    compare: list[Comparison] = Field(default_factory=list)


def load_scenario(path: str | Path) -> ScenarioModel:
    p = Path(path)
    raw = read_yaml(p, "scenario", ScenarioError)
    try:
        return ScenarioModel.model_validate(raw)
    except ValidationError as e:
        raise ScenarioError(format_validation_error(e, f"scenario {p}")) from None


def scenario_inputs(s: ScenarioModel) -> SimInputs:
    """The ``SimInputs`` of a scenario (through the same ``prepare_inputs`` path as the CLI)."""
    spec = parse_cluster_spec(s.cluster, source=f"scenario {s.name}: cluster")
    nodes = tuple(NodeSnapshot(p.name, p.gpu_type, float(p.num_gpus)) for p in spec.nodes() if p.num_gpus > 0)
    sim_cfg = parse_sim_config(s.sim, f"scenario {s.name}: sim")
    policy_cfg = parse_policy_file(s.policy_config, f"scenario {s.name}: policy_config")
    base = prepare_inputs(
        nodes=nodes, training_trace=None, inference_traces=(), policy_config=policy_cfg, sim_config=sim_cfg
    )
    jobs = tuple(
        TrainingJobRecord(i, j.submit_s, j.duration_s, j.num_gpus, j.gpu_type, j.priority)
        for i, j in enumerate(
            sorted([*s.jobs, *(s.job_stream.jobs() if s.job_stream else [])], key=lambda j: j.submit_s)
        )
    )
    series = (s.inference.series(),) if s.inference is not None else ()
    horizon = sim_cfg.days * 86_400.0 if sim_cfg.days is not None else base.horizon_s
    return SimInputs(nodes, jobs, series, policy_cfg, sim_cfg, horizon)


def run_scenario(s: ScenarioModel, processes: int = 1) -> tuple[ScenarioModel, dict[str, PolicyResult]]:
    return s, run_policies(scenario_inputs(s), s.policies, processes=processes)


def check_bounds(s: ScenarioModel, results: dict[str, PolicyResult]) -> list[str]:
    """Every bound the results break, as ``policy.metric = value, outside [min, max]``; empty if none."""
    out = []
    for policy, metrics in s.bounds.items():
        if policy not in results:
            out.append(f"{policy}: has bounds but did not run (policies: {', '.join(results)})")
            continue
        for metric, b in metrics.items():
            v = results[policy].get(metric)
            if v is None or (b.min is not None and v < b.min) or (b.max is not None and v > b.max):
                out.append(f"{s.name}: {policy}.{metric} = {v!r}, outside [{b.min}, {b.max}]")
    for c in s.compare:
        ref_policy = c.of_policy or c.policy
        missing = [p for p in (c.policy, ref_policy) if p not in results]
        if missing:
            out.append(f"{s.name}: {c.describe()}: {', '.join(missing)} did not run (policies: {', '.join(results)})")
            continue
        v = results[c.policy].get(c.metric)
        ref = results[ref_policy].get(c.of_metric or c.metric)
        if v is None or ref is None or ref == 0:
            out.append(f"{s.name}: {c.describe()}: cannot compare {v!r} with {ref!r}")
            continue
        r = v / ref
        if (c.min_ratio is not None and r < c.min_ratio) or (c.max_ratio is not None and r > c.max_ratio):
            out.append(f"{s.name}: {c.describe()} = {v:g} / {ref:g} = {r:.4f}, outside [{c.min_ratio}, {c.max_ratio}]")
    return out


def comparisons(s: ScenarioModel, results: dict[str, PolicyResult]) -> dict[str, float | None]:
    """Each comparison's ratio, by its description (None where it cannot be computed)."""
    out: dict[str, float | None] = {}
    for c in s.compare:
        v = results.get(c.policy, {}).get(c.metric)
        ref = results.get(c.of_policy or c.policy, {}).get(c.of_metric or c.metric)
        out[c.describe()] = v / ref if v is not None and ref else None
    return out
