"""The policy's part of the policy file (YAML), validated with pydantic, and the policy it builds.

The policy file also holds the arbiter's and the warm pool's runtime sections (``arbiter:``, ``warm_pool:``);
``tidal.cluster.policy_file`` reads the whole file, this part included. The policy's part (example)::

    policy: tidal                  # tidal | static | ray-alone | module:attr
    gpu_types: [H100, H200, A100, RTX4090]
    prices_per_gpu_hour: {H100: 2.49, H200: 3.29, A100: 1.29, RTX4090: 0.34}
    speeds: {H100: 3.0, H200: 3.6, A100: 2.0, RTX4090: 1.0}
    headroom_fraction: 0.1
    restart_hold_s: 60             # a job stopped for a service waits this long after the last pressure
    static: {serving_share: {RTX4090: 1.0, A100: 0.5}, default_serving_share: 0.0}
    guards: {service_downscale_delay_s: 30, job_resize_min_interval_s: 60}

Every error names the field, the bad value and what would be valid; it is raised when the file is
loaded (start-up), never at 3 a.m.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tidal.cluster.boundary import format_validation_error
from tidal.policies.base import Policy, known_policies, resolve_policy
from tidal.policies.guards import GuardConfig, GuardedPolicy
from tidal.policies.priority import TidalPolicy, TidalPolicyConfig
from tidal.policies.static_split import StaticSplitConfig, StaticSplitPolicy

DEFAULT_PRICES = {"H100": 2.49, "H200": 3.29, "A100": 1.29, "RTX4090": 0.34}
DEFAULT_SPEEDS = {"H100": 3.0, "H200": 3.6, "A100": 2.0, "RTX4090": 1.0}

_M = TypeVar("_M", bound=BaseModel)


class PolicyConfigError(ValueError):
    """A policy file that cannot be used; the message says what to fix."""


class _Strict(BaseModel):
    # allow_inf_nan=False: a NaN or an infinity in any float field is refused, naming the field.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class GuardsModel(_Strict):
    service_downscale_delay_s: float = Field(30.0, ge=0)
    job_resize_min_interval_s: float = Field(60.0, ge=0)
    job_growth_min_workers: int = Field(1, ge=1)
    max_moves_per_window: int = Field(50, ge=1)
    moves_window_s: float = Field(60.0, gt=0)


class StaticModel(_Strict):
    serving_share: dict[str, float] = Field(default_factory=dict)
    default_serving_share: float = Field(0.0, ge=0, le=1)

    @field_validator("serving_share")
    @classmethod
    def _shares_in_range(cls, v: dict[str, float]) -> dict[str, float]:
        for t, s in v.items():
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"serving_share[{t}] = {s}: must be between 0 and 1")
        return v


class PolicyConfigModel(_Strict):
    policy: str = "tidal"
    gpu_types: list[str] | None = Field(
        None, description="Known GPU types (node label values); default: the keys of prices_per_gpu_hour."
    )
    prices_per_gpu_hour: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_PRICES))
    speeds: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_SPEEDS))
    headroom_fraction: float = Field(0.1, ge=0, le=10)
    restart_hold_s: float = Field(
        60.0,
        ge=0,
        description="A job stopped for a service starts again once its GPU type has had no service "
        "reclaim or unmet service demand for this long (tidal policy).",
    )
    static: StaticModel = Field(default_factory=StaticModel)
    guards: GuardsModel = Field(default_factory=GuardsModel)

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        if ":" in v:
            return v  # a module:attr path is resolved (and its import checked) in build_policy
        if v not in known_policies():
            raise ValueError(f"unknown policy {v!r}; valid: {', '.join(known_policies())} or 'module:attr'")
        return v

    @field_validator("prices_per_gpu_hour")
    @classmethod
    def _prices_non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        for t, p in v.items():
            if p < 0:
                raise ValueError(f"price for {t} is {p}: must be >= 0 ($ per GPU-hour)")
        return v

    @field_validator("speeds")
    @classmethod
    def _speeds_positive(cls, v: dict[str, float]) -> dict[str, float]:
        for t, s in v.items():
            if s <= 0:
                raise ValueError(f"speed for {t} is {s}: must be > 0 (relative throughput)")
        return v

    @model_validator(mode="after")
    def _types_known(self) -> PolicyConfigModel:
        known = set(self.known_gpu_types)
        for field_name, mapping in (
            ("prices_per_gpu_hour", self.prices_per_gpu_hour),
            ("speeds", self.speeds),
            ("static.serving_share", self.static.serving_share),
        ):
            for t in mapping:
                if t not in known:
                    raise ValueError(
                        f"{field_name}: unknown GPU type {t!r}; valid: {', '.join(sorted(known))} "
                        "(add it to gpu_types)"
                    )
        return self

    @property
    def known_gpu_types(self) -> list[str]:
        return list(self.gpu_types) if self.gpu_types is not None else list(self.prices_per_gpu_hour)


def validate_policy_config(model: type[_M], data: Any, source: str) -> _M:
    """``data`` (a mapping, or None for the defaults) validated as ``model``; raises ``PolicyConfigError``.

    ``model`` is ``PolicyConfigModel`` or a model that extends it with more sections of the file
    (``tidal.cluster.policy_file.PolicyFileModel``): the errors read the same for both.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyConfigError(f"invalid policy config {source}: expected a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise PolicyConfigError(format_validation_error(e, f"policy config {source}")) from None


def parse_policy_config(data: Any, source: str = "<dict>") -> PolicyConfigModel:
    """The policy's part of a policy file, from a mapping (None: the defaults); raises ``PolicyConfigError``."""
    return validate_policy_config(PolicyConfigModel, data, source)


def build_policy(cfg: PolicyConfigModel) -> GuardedPolicy:
    """The configured policy, wrapped in the guards."""
    inner: Policy
    if cfg.policy == "tidal":
        inner = TidalPolicy(
            TidalPolicyConfig(cfg.headroom_fraction, dict(cfg.speeds), restart_hold_s=cfg.restart_hold_s)
        )
    elif cfg.policy == "static":
        inner = StaticSplitPolicy(
            StaticSplitConfig(
                dict(cfg.static.serving_share),
                cfg.static.default_serving_share,
                cfg.headroom_fraction,
                dict(cfg.speeds),
            )
        )
    else:
        try:
            inner = resolve_policy(cfg.policy)()
        except (ValueError, TypeError) as e:
            raise PolicyConfigError(f"policy: {e}") from None
        if not hasattr(inner, "decide"):
            raise PolicyConfigError(f"policy: {cfg.policy!r} built {type(inner).__name__}, which has no decide()")
    g = cfg.guards
    return GuardedPolicy(
        inner,
        GuardConfig(
            g.service_downscale_delay_s,
            g.job_resize_min_interval_s,
            g.job_growth_min_workers,
            g.max_moves_per_window,
            g.moves_window_s,
        ),
    )
