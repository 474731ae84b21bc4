"""The arbiter's saved state (``ResourceArbiter.dump_state``) at the boundary: its schema, validated on restore.

A restore reads what an older process wrote, perhaps an older version of Tidal: it is checked as a user's
input is, each spec as a registration would be (``tidal.cluster.specs``), every count a whole number >= 0,
every time finite, and an error names the field, the value and what is valid. Nothing is half-restored:
``ResourceArbiter.restore_state`` parses all of it first.

Versions: 1 kept one release deadline per workload (its first shrink's); 2 keeps every pending release
with the seconds left of its grace (``remaining_s``), so that downtime does not eat a holder's grace, and
a forced stop not yet confirmed (``force_attempts``, ``confirm_remaining_s``; absent: none).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tidal.cluster.model import WorkloadSpec
from tidal.cluster.specs import GpuTypeName, format_validation_error, parse_workload_spec

STATE_VERSION = 2

Units = dict[GpuTypeName, Annotated[int, Field(ge=0)]]


class StateError(ValueError):
    """A saved arbiter state that cannot be restored; the message names the field, the value and what is valid."""


class _Model(BaseModel):
    # Fields a later version adds are ignored; a value of a known field that is wrong is not.
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False, arbitrary_types_allowed=True)


class ReleaseModel(_Model):
    """A shrink not yet released: the holder must be down to ``grant`` within ``remaining_s``."""

    remaining_s: float
    grant: Units


class RegistrationModel(_Model):
    spec: Any
    registered_s: float
    demand_units: int = Field(ge=0)
    held: Units = Field(default_factory=dict)
    progress: dict[str, Any] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)
    shrink_issued_s: float | None = None
    release_deadlines: list[ReleaseModel] = Field(default_factory=list)
    # Forced stops sent and not yet confirmed by the holder's report, and the seconds left until a harder one.
    force_attempts: int = Field(0, ge=0)
    confirm_remaining_s: float | None = Field(None, ge=0)

    @field_validator("spec", mode="plain")
    @classmethod
    def _spec(cls, v: Any) -> WorkloadSpec:
        return parse_workload_spec(v)


class ArbiterStateModel(_Model):
    version: Literal[1, 2]
    registrations: list[RegistrationModel]
    grants: dict[str, Units] = Field(default_factory=dict)
    policy_state: dict[str, Any] = Field(default_factory=dict)
    generation: int = Field(0, ge=0)


def parse_arbiter_state(data: Any) -> ArbiterStateModel:
    """The validated state; raises ``StateError`` ("invalid arbiter state: ...") naming every problem."""
    try:
        return ArbiterStateModel.model_validate(data)
    except ValidationError as e:
        raise StateError(format_validation_error(e, "arbiter state")) from None
