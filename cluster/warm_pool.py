"""Warm workers on GPU nodes: a new Serve replica (or trainer) starts in a process that is already up.

A new inference replica on a node where no Ray worker is idle pays for a new Python process and its imports
before its constructor runs: ~6 s of CPU for ``torch`` + ``ray.serve`` + the model server here, and Ray
starts that process only when the replica is placed, i.e. *after* a spike has begun and *after* the arbiter
has taken the GPU from training. On the local cluster (``bench/spike.py``, Serve on free GPUs) the time to
capacity is ~25 s with cold workers, ~3 s when idle workers with those modules already imported wait on the
nodes.

Ray has both halves of the remedy, and this module keeps them working after the first spike:

- ``RAY_preload_python_modules`` (set on a node's raylet: ``LocalClusterSpec.preload_python_modules``, or
  the ``ray start`` commands of ``cluster.yaml``) makes every new worker process import those modules
  before it accepts work (the model server only in workers not bound to a job: ``tidal.cluster.preload``);
- the raylet's ``PrestartWorkers`` RPC starts idle worker processes that are not yet bound to a job (late
  binding) and keeps them ``keep_alive_s`` seconds. Ray calls it itself only when a raylet starts
  (``RAY_enable_worker_prestart``) and for task backlogs, so once replicas or trainers have taken the idle
  workers of a node, it has none left for the next spike.

``WarmPool.run_once`` counts the idle workers of each GPU node (the raylet's ``GetNodeStats``: workers with
no actor and no running task) and asks the raylet for the missing ones, at most ``max_starts_per_round``
per round so that refilling never competes for the CPU with the replicas it is meant to help. The arbiter
actor runs it every ``interval_s`` when the policy file's ``warm_pool.spare_workers_per_node`` is above 0;
a node just topped up is left alone for ``node_cooldown_s`` (its new workers are still importing), and no
worker is started until the grants have been still, and the node's idle workers untouched, for ``quiet_s``
(a spike takes from the pool; the pool refills after it).

Both RPCs are Ray's internal node-manager API (``ray.core.generated``), used as Ray's own dashboard does;
they are pinned by the Ray version in ``pyproject.toml``. Any error is logged and the round is skipped: a
warm pool is an optimisation, never a reason for the arbiter to fail.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from tidal.cluster.model import GPU_TYPE_LABEL

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolNode:
    """A node the pool keeps warm: its id, its raylet's address, how many GPUs it has and their type."""

    node_id: str
    raylet_address: str  # "ip:port" of the node manager
    num_gpus: float
    gpu_type: str | None = None  # its ray.io/accelerator-type label (tidal.training.spares keeps spares per type)


class Raylets(Protocol):
    """The two raylet calls the pool needs (``RayletRpc`` on Ray; a fake in unit tests)."""

    def idle_workers(self, address: str, job_id: bytes | None = None) -> int: ...

    def prestart(
        self,
        address: str,
        num_workers: int,
        keep_alive_s: float,
        job_id: bytes | None = None,
        serialized_runtime_env: str | None = None,
    ) -> None: ...


@dataclass
class RoundReport:
    """What one round saw and did: idle workers per node before, workers asked for per node."""

    idle: dict[str, int]
    started: dict[str, int]
    errors: dict[str, str]


class WarmPool:
    """Keeps ``spare`` idle Python workers on every node with GPUs. See the module docstring."""

    def __init__(
        self,
        raylets: Raylets,
        *,
        spare_workers_per_node: int,
        keep_alive_s: float = 3600.0,
        max_starts_per_round: int = 1,
        node_cooldown_s: float = 20.0,
        quiet_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if spare_workers_per_node < 0 or max_starts_per_round < 1 or keep_alive_s <= 0 or node_cooldown_s < 0:
            raise ValueError(
                f"warm pool: spare_workers_per_node={spare_workers_per_node} (>= 0), "
                f"max_starts_per_round={max_starts_per_round} (>= 1), keep_alive_s={keep_alive_s} (> 0), "
                f"node_cooldown_s={node_cooldown_s} (>= 0)"
            )
        self.raylets = raylets
        self.spare = spare_workers_per_node
        self.keep_alive_s = keep_alive_s
        self.max_starts_per_round = max_starts_per_round
        # A started worker shows as idle only once its process is up and has imported the preloaded
        # modules (seconds, more on a busy machine): a node is not topped up again within this time.
        self.node_cooldown_s = node_cooldown_s
        # Refills wait until the grants have not moved for this long: while GPUs move (a spike), the pool
        # hands out its workers, and starting new ones (seconds of imports each) would take CPU from the
        # replicas that need it.
        self.quiet_s = quiet_s
        self.clock = clock
        self._last_start: dict[str, float] = {}
        self._last_idle: dict[str, int] = {}
        self._last_taken: dict[str, float] = {}  # when a node's idle count last fell: its workers are in use

    def run_once(self, nodes: Iterable[PoolNode], last_move_s: float = float("-inf")) -> RoundReport:
        """One round: count idle workers on every GPU node, start the missing ones (fewest idle first).

        ``last_move_s``: when a grant last changed (``clock`` time); nothing is started within ``quiet_s`` of
        it, nor on a node within ``quiet_s`` of a round that saw its idle workers taken.
        """
        report = RoundReport(idle={}, started={}, errors={})
        if self.spare == 0 or self.clock() - last_move_s < self.quiet_s:
            return report
        gpu_nodes = [n for n in nodes if n.num_gpus > 0]
        now = self.clock()
        for n in gpu_nodes:
            try:
                idle = report.idle[n.node_id] = self.raylets.idle_workers(n.raylet_address)
            except Exception as e:  # a node going away mid-round: skip it this round
                report.errors[n.node_id] = repr(e)
                continue
            if idle < self._last_idle.get(n.node_id, 0):
                self._last_taken[n.node_id] = now
            self._last_idle[n.node_id] = idle
        budget = self.max_starts_per_round
        for n in sorted(gpu_nodes, key=lambda n: report.idle.get(n.node_id, self.spare)):
            missing = self.spare - report.idle.get(n.node_id, self.spare)
            if missing <= 0 or budget <= 0:
                continue
            if now - self._last_start.get(n.node_id, float("-inf")) < self.node_cooldown_s:
                continue
            if now - self._last_taken.get(n.node_id, float("-inf")) < self.quiet_s:
                continue  # its workers are being taken right now (replicas starting): refill after
            k = min(missing, budget)
            try:
                self.raylets.prestart(n.raylet_address, k, self.keep_alive_s)
            except Exception as e:
                report.errors[n.node_id] = repr(e)
                continue
            report.started[n.node_id] = k
            self._last_start[n.node_id] = now
            budget -= k
        return report


def nodes_from_ray(ray_nodes: Iterable[Mapping[str, Any]]) -> list[PoolNode]:
    """``ray.nodes()`` entries -> the alive nodes, with their raylet addresses and GPUs."""
    return [
        PoolNode(
            node_id=str(n["NodeID"]),
            raylet_address=f"{n['NodeManagerAddress']}:{n['NodeManagerPort']}",
            num_gpus=float((n.get("Resources") or {}).get("GPU", 0.0)),
            gpu_type=(n.get("Labels") or {}).get(GPU_TYPE_LABEL),
        )
        for n in ray_nodes
        if n.get("Alive")
    ]


class RayletRpc:
    """``Raylets`` over gRPC to each node manager (Ray's own channel: token auth and TLS as configured)."""

    def __init__(self, timeout_s: float = 5.0, channel_factory: Callable[[str], Any] | None = None) -> None:
        self.timeout_s = timeout_s
        self._channel_factory = channel_factory
        self._stubs: dict[str, Any] = {}

    def _stub(self, address: str) -> Any:
        stub = self._stubs.get(address)
        if stub is None:
            from ray._private.grpc_utils import init_grpc_channel
            from ray.core.generated import node_manager_pb2_grpc

            channel = (self._channel_factory or init_grpc_channel)(address)
            stub = self._stubs[address] = node_manager_pb2_grpc.NodeManagerServiceStub(channel)
        return stub

    def idle_workers(self, address: str, job_id: bytes | None = None) -> int:
        """Idle Python workers of the node: not bound to a job (``job_id`` None), or bound to ``job_id``."""
        from ray.core.generated import common_pb2, node_manager_pb2

        reply = self._stub(address).GetNodeStats(
            node_manager_pb2.GetNodeStatsRequest(include_memory_info=False), timeout=self.timeout_s
        )
        return sum(
            1
            for w in reply.core_workers_stats
            if w.worker_type == common_pb2.WorkerType.WORKER
            and w.language == common_pb2.Language.PYTHON
            and _is_nil(w.actor_id)
            # Not bound to a job yet (any job may take it), or bound to the one asked for.
            and (_is_nil(w.job_id) if job_id is None else w.job_id == job_id)
            and w.num_running_tasks == 0
            and w.num_pending_tasks == 0
        )

    def prestart(
        self,
        address: str,
        num_workers: int,
        keep_alive_s: float,
        job_id: bytes | None = None,
        serialized_runtime_env: str | None = None,
    ) -> None:
        """Starts idle workers: for any job, or bound to ``job_id`` with that runtime env (the raylet gives
        a worker only to tasks and actors whose runtime env hashes the same)."""
        from ray.core.generated import common_pb2, node_manager_pb2

        request = node_manager_pb2.PrestartWorkersRequest(
            language=common_pb2.Language.PYTHON,
            keep_alive_duration_secs=int(keep_alive_s),
            num_workers=num_workers,
        )
        if job_id is not None:
            request.job_id = job_id
        if serialized_runtime_env is not None:
            request.runtime_env_info.serialized_runtime_env = serialized_runtime_env
        self._stub(address).PrestartWorkers(request, timeout=self.timeout_s)

    def forget(self, keep: Iterable[str]) -> None:
        """Drops the stubs of nodes that are gone."""
        keep = set(keep)
        for a in [a for a in self._stubs if a not in keep]:
            del self._stubs[a]


def _is_nil(binary_id: bytes) -> bool:
    """Ray's nil ids are all 0xff bytes (an unset field is empty)."""
    return all(b == 0xFF for b in binary_id)
