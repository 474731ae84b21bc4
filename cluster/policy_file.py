"""The policy file (YAML): the policy's part, and the arbiter's and the warm pool's runtime sections.

The policy's part (``policy``, ``gpu_types``, prices, speeds, headroom, ``static``, ``guards``) is
``tidal.policies.config``'s, which builds the policy from it; this module adds the sections that tune the
arbiter's loop and the warm pool, which are no policy's business
(every key of the file: docs/policy.md)::

    arbiter: {tick_interval_s: 1.0, registration_ttl_s: 15, metrics_port: 9108, metrics_host: 127.0.0.1}
    warm_pool: {spare_workers_per_node: 2}

Every error names the field, the bad value and what would be valid; it is raised when the file is
loaded (start-up), never at 3 a.m.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from tidal.cluster.arbiter import ArbiterConfig
from tidal.cluster.boundary import read_yaml
from tidal.policies.config import PolicyConfigError, PolicyConfigModel, validate_policy_config


class _Strict(BaseModel):
    # allow_inf_nan=False: a NaN or an infinity in any float field is refused, naming the field.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ArbiterModel(_Strict):
    """The arbiter's loop (``tidal.cluster.actor``) and its registrations (``ArbiterConfig``)."""

    tick_interval_s: float = Field(1.0, gt=0, le=60)
    registration_ttl_s: float = Field(15.0, gt=0)
    default_yield_grace_s: float = Field(30.0, ge=0)
    forced_release_confirm_s: float = Field(10.0, gt=0)
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address the metrics exporter binds: this machine only by default; 0.0.0.0 (every "
        "interface) for a Prometheus on another machine.",
    )
    state_path: str | None = None

    @field_validator("metrics_host")
    @classmethod
    def _an_address(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", v):
                raise ValueError(
                    f"metrics_host {v!r} is not an IP address or host name; valid: e.g. 127.0.0.1 (this machine "
                    "only), 0.0.0.0 (every interface), or a host name"
                ) from None
        return v


class WarmPoolModel(_Strict):
    """Idle worker processes kept on every GPU node (``tidal.cluster.warm_pool``); 0 turns the pool off."""

    spare_workers_per_node: int = Field(0, ge=0, le=64)
    interval_s: float = Field(5.0, gt=0)
    keep_alive_s: float = Field(3600.0, gt=0)
    max_starts_per_round: int = Field(1, ge=1)
    node_cooldown_s: float = Field(20.0, ge=0)
    quiet_s: float = Field(15.0, ge=0)


class PolicyFileModel(PolicyConfigModel):
    """The whole policy file: the policy's part (``PolicyConfigModel``), ``arbiter`` and ``warm_pool``."""

    arbiter: ArbiterModel = Field(default_factory=ArbiterModel)
    warm_pool: WarmPoolModel = Field(default_factory=WarmPoolModel)


def parse_policy_file(data: Any, source: str = "<dict>") -> PolicyFileModel:
    """A policy file's content, from a mapping (None: the defaults); raises ``PolicyConfigError``."""
    return validate_policy_config(PolicyFileModel, data, source)


def load_policy_file(path: str | Path | None) -> PolicyFileModel:
    """Reads and validates a policy file; ``None`` gives the defaults. Raises ``PolicyConfigError``."""
    if path is None:
        return PolicyFileModel()
    p = Path(path)
    return parse_policy_file(read_yaml(p, "policy config", PolicyConfigError), str(p))


def arbiter_config(cfg: PolicyFileModel) -> ArbiterConfig:
    """The ``ResourceArbiter``'s knobs from the file's ``arbiter`` section."""
    a = cfg.arbiter
    return ArbiterConfig(
        registration_ttl_s=a.registration_ttl_s,
        default_yield_grace_s=a.default_yield_grace_s,
        forced_release_confirm_s=a.forced_release_confirm_s,
    )
