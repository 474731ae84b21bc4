"""The policy protocol, its decision type, and the registry of policies by name.

A policy is a pure function of a snapshot and its own state: ``decide(snapshot, state) -> (decision,
state)``. It never reads a clock (the snapshot carries ``now_s``), never calls Ray, and never mutates its
inputs, so the same policy runs in unit tests, in the simulator and on a real cluster.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from tidal.cluster.model import Allocation, ClusterSnapshot, WorkloadName


@dataclass(frozen=True, slots=True)
class Infeasible:
    """A request the policy cannot meet now, and why (data, not an exception)."""

    workload: WorkloadName
    reason: str


@dataclass(frozen=True, slots=True)
class Reclaim:
    """A shrink of a training job to make room for another workload."""

    donor: WorkloadName
    recipient: WorkloadName
    gpu_type: str
    units: int


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """Target grants for every workload the policy saw (absent = nothing), plus what it could not do."""

    targets: Mapping[WorkloadName, Allocation]
    infeasible: tuple[Infeasible, ...] = ()
    reclaims: tuple[Reclaim, ...] = ()

    def target_of(self, name: WorkloadName) -> Allocation:
        return self.targets.get(name, Allocation())


@dataclass(frozen=True, slots=True)
class PolicyState:
    """State a policy carries between ticks. Policies put what they need in ``data`` (JSON-able)."""

    data: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Policy(Protocol):
    name: str

    def decide(self, snapshot: ClusterSnapshot, state: PolicyState) -> tuple[PolicyDecision, PolicyState]: ...


PolicyFactory = Callable[..., Policy]
_REGISTRY: dict[str, PolicyFactory] = {}


def register_policy(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    def deco(factory: PolicyFactory) -> PolicyFactory:
        _REGISTRY[name] = factory
        return factory

    return deco


def known_policies() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def resolve_policy(name: str) -> PolicyFactory:
    """A policy factory by registered name (``tidal``) or by ``module:attr`` path.

    Raises:
        ValueError: naming the bad value and what is valid.
    """
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"policy {name!r}: cannot import module {module_name!r}: {e}") from e
        try:
            return getattr(module, attr)
        except AttributeError as e:
            raise ValueError(f"policy {name!r}: module {module_name!r} has no attribute {attr!r}") from e
    raise ValueError(f"unknown policy {name!r}; valid: {', '.join(known_policies())} or 'module:attr'")


def _load_builtins() -> None:
    # Importing the modules runs their @register_policy decorators.
    from tidal.policies import fcfs, priority, static_split  # noqa: F401
