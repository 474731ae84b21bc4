"""The cluster spec: the YAML a user writes for a cluster (``cluster/configs/local.yaml``), validated.

A spec is a head and groups of identical GPU nodes, each group of one GPU type. ``tidal up`` and the tests
start it as a local cluster (``tidal.cluster.local``); the simulator reads the same format for clusters of
any size (``cluster/configs/sim-2048.yaml``). Pure: it imports neither ray nor torch, nor any process code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from tidal.cluster.boundary import format_validation_error, read_yaml
from tidal.cluster.model import GPU_TYPE_LABEL
from tidal.cluster.preload import POOL_MODULES_ENV, TRAIN_NICENESS_ENV

DEFAULT_SPEC_PATH = Path(__file__).parent / "configs" / "local.yaml"

# Ray's minimum object store (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES is 75 MiB).
_MIN_OBJECT_STORE_MB = 75


class _SpecModel(BaseModel):
    # allow_inf_nan=False: a NaN or an infinity in any float field is refused, naming the field.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _resources_non_negative(v: dict[str, float]) -> dict[str, float]:
    for name, amount in v.items():
        if amount < 0:
            raise ValueError(f"resources[{name}] = {amount}: a custom resource's amount must be >= 0")
    return v


class HeadSpec(_SpecModel):
    """The head node: GCS, dashboard, the arbiter actor. No GPUs, so no workload lands here by accident."""

    num_cpus: int = Field(1, ge=0, description="logical CPUs of the head")
    object_store_memory_mb: int = Field(150, ge=_MIN_OBJECT_STORE_MB)
    resources: dict[str, float] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)

    _resources = field_validator("resources")(_resources_non_negative)


class NodeGroupSpec(_SpecModel):
    """``count`` identical nodes with ``num_gpus`` GPUs of ``gpu_type`` each.

    Example: ``{gpu_type: H100, count: 2, num_gpus: 8}`` is two nodes named ``h100-0`` and ``h100-1`` with
    eight H100s each, 16 H100s in all.
    """

    gpu_type: str = Field(min_length=1, description="value of the ray.io/accelerator-type label")
    num_gpus: int = Field(ge=0, description="GPUs per node (Ray's --num-gpus takes an integer)")
    count: int = Field(1, ge=0, description="nodes in the group")
    num_cpus: int | None = Field(None, ge=0, description="logical CPUs per node; default num_gpus + 1")
    name: str | None = Field(None, description="node name prefix; default the GPU type in lower case")
    object_store_memory_mb: int = Field(200, ge=_MIN_OBJECT_STORE_MB)
    resources: dict[str, float] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)

    _resources = field_validator("resources")(_resources_non_negative)

    @field_validator("gpu_type")
    @classmethod
    def _gpu_type_is_a_label_value(cls, v: str) -> str:
        # Ray label values: alphanumerics, '-', '_' and '.', at most 63 characters.
        if len(v) > 63 or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError(
                f"gpu_type {v!r} is not a valid Ray label value (valid: up to 63 letters, digits, '-', '_', '.')"
            )
        return v

    @field_validator("labels")
    @classmethod
    def _labels_do_not_override_the_gpu_type(cls, v: dict[str, str]) -> dict[str, str]:
        if GPU_TYPE_LABEL in v:
            raise ValueError(f"labels must not set {GPU_TYPE_LABEL!r}: it comes from gpu_type")
        return v

    @property
    def prefix(self) -> str:
        return self.name or self.gpu_type.lower()

    @property
    def cpus_per_node(self) -> int:
        return self.num_gpus + 1 if self.num_cpus is None else self.num_cpus


class GcsFaultToleranceSpec(_SpecModel):
    """GCS fault tolerance: the head's GCS keeps its tables in an external Redis and reloads them on restart.

    Ray reads the Redis address from ``RAY_REDIS_ADDRESS`` and keys the cluster's tables by
    ``RAY_external_storage_namespace``; while the GCS is down, raylets keep their workers and wait up to
    ``reconnect_timeout_s`` (Ray's ``gcs_rpc_server_reconnect_timeout_s``) for it to come back on the same
    address, then exit. Example: ``{redis_address: "127.0.0.1:6390"}``.
    """

    redis_address: str = Field(description="host:port of the Redis server (redis:// or rediss:// allowed)")
    # Default: the local cluster's own id, so that two clusters on one Redis never read each other's tables.
    external_storage_namespace: str | None = Field(None, min_length=1)
    reconnect_timeout_s: int = Field(60, ge=1, description="how long raylets wait for a restarted GCS")

    @field_validator("redis_address")
    @classmethod
    def _host_and_port(cls, v: str) -> str:
        rest = v.split("://", 1)[1] if v.startswith(("redis://", "rediss://")) else v
        host, _, port = rest.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"redis_address {v!r} is not host:port (valid: e.g. 127.0.0.1:6379, redis://10.0.0.5:6379,"
                " rediss://host:6380)"
            )
        return v


class LocalClusterSpec(_SpecModel):
    """A cluster: a head and groups of GPU nodes. The format of ``cluster/configs/local.yaml``.

    ``health_check_period_ms`` and ``health_check_failure_threshold`` go to the GCS: a node that stops
    answering is declared dead after about their product (3 s by default here, 15 s in stock Ray), so that
    the arbiter sees a lost node quickly.
    """

    head: HeadSpec = Field(default_factory=HeadSpec)
    node_groups: list[NodeGroupSpec] = Field(default_factory=list)
    worker_ports_per_node: int = Field(100, ge=20, le=2000)
    health_check_period_ms: int = Field(1000, ge=100)
    health_check_failure_threshold: int = Field(3, ge=1)
    # Ray nices its worker processes (tasks, actors: Serve replicas, Train workers) to 15 so that a machine's
    # raylet stays responsive. Here every node's raylet, agents and GCS share one machine with the driver and
    # the load generator, all at niceness 0: niced workers then lose the CPU to the other nodes' control
    # plane (measured: 2 replicas at 24 req/s, p99 1.4 s at 15, 0.44 s at 0). RAY_worker_niceness in the
    # environment wins over this.
    worker_niceness: int = Field(0, ge=0, le=19)
    # Modules every new worker process on a GPU node imports before it takes work (Ray's
    # RAY_preload_python_modules): with the arbiter's warm pool (policy file, ``warm_pool``) a new Serve
    # replica then starts in a process that has them already (cluster/warm_pool.py has the figures).
    preload_python_modules: list[str] = Field(default_factory=list)
    # Modules only the workers not bound to a job import (the warm pool's, which Serve replicas take; not
    # Ray Train's workers or a job's spares): the node preloads tidal.cluster.preload, which reads this list
    # (TIDAL_POOL_PRELOAD_MODULES) and checks the worker's RAY_JOB_ID.
    pool_preload_python_modules: list[str] = Field(default_factory=list)
    # The niceness a Ray Train process takes as it starts (tidal.cluster.preload): on a GPU node a trainer's worker
    # or a job's spare, on the head its controller and the actors Ray Train starts there for every worker group
    # (the synchronization actor, the preemption watcher): a resize's set-up then yields the CPU to the service's
    # replicas and proxy on a machine they share. 0: unchanged.
    train_worker_niceness: int = Field(0, ge=0, le=19)
    # None: the GCS keeps its tables in memory and the cluster does not outlive it (Ray's default).
    gcs_fault_tolerance: GcsFaultToleranceSpec | None = None

    @field_validator("preload_python_modules", "pool_preload_python_modules")
    @classmethod
    def _module_names(cls, v: list[str], info: ValidationInfo) -> list[str]:
        for i, m in enumerate(v):
            if not all(part.isidentifier() for part in m.split(".")):
                raise ValueError(f"{info.field_name}.{i}: {m!r} is not a module name (e.g. torch, tidal.serving.app)")
        return v

    def raylet_preload_env(self, *, head: bool = False) -> dict[str, str]:
        """The environment variables that make a node's new workers preload the modules above: a GPU node's all
        of them; the head's only ``tidal.cluster.preload``, for the niceness of its Ray Train processes."""
        modules = [] if head else list(self.preload_python_modules)
        pool = [] if head else self.pool_preload_python_modules
        env: dict[str, str] = {}
        if pool or self.train_worker_niceness:
            modules.append("tidal.cluster.preload")
        if pool:
            env[POOL_MODULES_ENV] = ",".join(pool)
        if self.train_worker_niceness:
            env[TRAIN_NICENESS_ENV] = str(self.train_worker_niceness)
        if modules:
            env["RAY_preload_python_modules"] = ",".join(modules)
        return env

    @model_validator(mode="after")
    def _node_names_are_unique(self) -> LocalClusterSpec:
        seen: dict[str, int] = {}
        for i, g in enumerate(self.node_groups):
            if g.prefix in seen or g.prefix == "head":
                raise ValueError(
                    f"node_groups.{i}.name: {g.prefix!r} is used twice (groups {seen.get(g.prefix, 'head')} and {i});"
                    " give each group a distinct name"
                )
            seen[g.prefix] = i
        return self

    def nodes(self) -> list[NodePlan]:
        """One plan per worker node, in spec order: ``h100-0``, ``a100-0``, ..."""
        out = []
        for g in self.node_groups:
            for i in range(g.count):
                out.append(
                    NodePlan(
                        name=f"{g.prefix}-{i}",
                        gpu_type=g.gpu_type,
                        num_gpus=g.num_gpus,
                        num_cpus=g.cpus_per_node,
                        object_store_memory_mb=g.object_store_memory_mb,
                        resources=dict(g.resources),
                        labels={**g.labels, GPU_TYPE_LABEL: g.gpu_type},
                    )
                )
        return out

    def gpus_by_type(self) -> dict[str, int]:
        """Total GPUs per type, e.g. ``{"H100": 4, "A100": 2, "RTX4090": 2}`` for the default spec."""
        out: dict[str, int] = {}
        for n in self.nodes():
            out[n.gpu_type] = out.get(n.gpu_type, 0) + n.num_gpus
        return out


@dataclass(frozen=True)
class NodePlan:
    """One worker node to start."""

    name: str
    gpu_type: str
    num_gpus: int
    num_cpus: int
    object_store_memory_mb: int
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


def load_cluster_spec(path: str | os.PathLike | None = None) -> LocalClusterSpec:
    """Reads and validates a cluster spec YAML (default: ``cluster/configs/local.yaml``).

    Raises:
        ValueError: naming the file, the field, the bad value and what is valid.
    """
    p = Path(path) if path is not None else DEFAULT_SPEC_PATH
    raw = read_yaml(p, "cluster spec")
    return parse_cluster_spec(raw if raw is not None else {}, source=str(p))


def parse_cluster_spec(raw: Any, source: str = "<dict>") -> LocalClusterSpec:
    """Validates a spec given as a dict (see ``load_cluster_spec``)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"cluster spec {source}: expected a mapping with head/node_groups, got {type(raw).__name__}")
    try:
        return LocalClusterSpec.model_validate(raw)
    except ValidationError as e:
        raise ValueError(format_validation_error(e, f"cluster spec {source}")) from None
