"""Spare worker processes for a job's next worker group: a resize starts in processes that are already up.

Every resize of an elastic job restarts Ray Train's worker group (the controller stays), and each new worker is a
new Python process that imports Ray, the node's preloaded modules (torch) and Ray Train before its actor runs:
~7 s of CPU each here, and 30-40 s of wall time when four start at once on a busy 2-core host. The cluster's
warm pool (``tidal.cluster.warm_pool``) cannot help: its workers are bound to no job and have an empty runtime
env, while a Ray Train worker inherits its job's runtime env (working dir, env vars) and its controller's env
vars, and the raylet gives an idle worker only to an actor of the same job whose runtime env hashes the same.

So a ``TidalTrainer`` keeps its own: its scaling policy runs in the controller, so it knows the runtime env its
workers get (the controller's, which Ray Train's workers inherit unchanged) and asks the raylets of the nodes
of the type it trains on to start idle workers bound to its job with that env (the raylet's
``PrestartWorkers``, as the warm pool does). They idle at ~0 CPU until the next group's workers take them; the
top-up runs only while a group trains steadily, so that the imports never compete with a spike's replicas or
a resize. Ray ends them with the job.

``SpareWorkers.top_up`` is pure bookkeeping over a ``Raylets`` (fakes in unit tests); the policy calls it from
a thread so that a slow raylet never delays a decision.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tidal.cluster.warm_pool import PoolNode, Raylets

logger = logging.getLogger(__name__)


def process_started_s() -> float | None:
    """When this process started (wall-clock seconds), from Linux's /proc; None elsewhere.

    Every rank of a ``TidalTrainer`` says it when it joins a group: a process older than its group was
    started ahead (a spare worker), and the policy counts the group's warm workers.
    """
    try:
        stat = Path("/proc/self/stat").read_text()
        # Field 22 (starttime, clock ticks after boot); fields counted after the ")" that ends the name.
        started_after_boot = int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])  # the same clock as starttime
        return time.time() - (uptime - started_after_boot)
    except (OSError, ValueError, IndexError):
        return None


class SpareWorkers:
    """Keeps up to ``count`` idle workers of one job on the nodes of a GPU type. See the module docstring.

    Per node, at most as many as the node has room for workers of the job (its GPUs over
    ``gpus_per_worker``): the most the next group's placement group can put there. The raylet starts at
    most its startup concurrency per request (two processes on this machine's nodes, whatever was asked),
    so four spares take two rounds. A node topped up is left alone for ``node_cooldown_s`` (its new workers
    count as idle only once up), or until its idle count has grown since the request: a batch is up, and the
    next one can start (with the cooldown alone, the demo's second pair of spares would wait 30 s after the
    first is up). A batch whose processes come up at different times may then get one worker too many.
    """

    def __init__(
        self,
        raylets: Raylets,
        *,
        job_id: bytes,
        count: int,
        gpus_per_worker: float,
        keep_alive_s: float = 3600.0,
        node_cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if count < 0 or gpus_per_worker <= 0:
            raise ValueError(f"spare workers: count={count} (>= 0), gpus_per_worker={gpus_per_worker} (> 0)")
        self.raylets = raylets
        self.job_id = job_id
        self.count = count
        self.gpus_per_worker = gpus_per_worker
        self.keep_alive_s = keep_alive_s
        self.node_cooldown_s = node_cooldown_s
        self.clock = clock
        self.runtime_env: str | None = None
        # What the last top_up counted: the job's idle workers on the type's nodes, and how many it wants.
        self.idle = 0
        self.wanted = 0
        self._last_start: dict[str, float] = {}
        self._idle_at_start: dict[str, int] = {}  # per node: its idle count when spares were last asked for

    def top_up(self, gpu_type: str, nodes: Iterable[PoolNode]) -> dict[str, int]:
        """Starts the missing spares on the nodes of ``gpu_type``; returns the workers asked for, per node.

        Every call also counts the job's idle workers there (``idle``, out of ``wanted``). Nothing until the
        runtime env of the job's workers is known (``runtime_env``). Errors are logged and the node skipped:
        spares are an optimisation, never a reason for a worker group to fail.
        """
        started: dict[str, int] = {}
        if self.runtime_env is None:
            return started
        nodes = list(nodes)
        wants: dict[str, tuple[PoolNode, int]] = {}
        remaining = self.count
        for n in sorted((n for n in nodes if n.gpu_type == gpu_type), key=lambda n: n.node_id):
            if remaining <= 0:
                break
            want = min(remaining, int(n.num_gpus // self.gpus_per_worker))
            remaining -= want
            wants[n.node_id] = (n, want)
        now = self.clock()
        idle_total = wanted_total = 0
        for n, want in wants.values():
            if want <= 0:
                continue
            wanted_total += want
            try:
                idle = self.raylets.idle_workers(n.raylet_address, self.job_id)
                idle_total += min(idle, want)
                cooled = now - self._last_start.get(n.node_id, float("-inf")) >= self.node_cooldown_s
                if want > idle and (cooled or idle > self._idle_at_start.get(n.node_id, idle)):
                    self.raylets.prestart(n.raylet_address, want - idle, self.keep_alive_s, self.job_id, self.runtime_env)
                    started[n.node_id] = want - idle
                    self._last_start[n.node_id] = now
                    self._idle_at_start[n.node_id] = idle
            except Exception as e:  # a node going away, a raylet too busy to answer in time
                logger.warning("spare workers on node %s: %r", n.node_id, e)
        self.idle, self.wanted = idle_total, wanted_total
        return started
