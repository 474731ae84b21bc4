"""The arbiter's Ray backend: the inventory from Ray's node table, forced release through Ray's own APIs.

``observe()`` reads every node of the cluster (``ray.nodes()``): a node counts when it carries the GPU type
label ``ray.io/accelerator-type`` (Ray sets it on real GPUs; ``LocalCluster`` and ``cluster.yaml`` set it
explicitly) and has GPUs; dead nodes stay in the snapshot as unhealthy, so that their GPUs leave the
capacity. A failed read is a transient error: it is logged, the last good snapshot is returned, and only
``max_consecutive_failures`` failures in a row raise.

``apply()`` has nothing to push: workloads read their grants through their heartbeats (``ArbiterClient``),
which keeps every call on the workloads' side non-blocking. It only logs grant changes.

``force_release()`` stops a workload that kept GPUs past its yield grace, by what its registration ``meta``
names, first match wins: ``stop_actor`` (with ``stop_actor_namespace`` and ``stop_method``, default
``force_stop``: that method of that actor is called, as the training runner asks), ``submission_id`` (a
``ray job submit`` job: stopped through the job API), or ``actor_name`` (with ``actor_namespace``: the actor
is killed, without restart).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import ray
from tidal.cluster.model import GPU_TYPE_LABEL, Allocation, NodeSnapshot, WorkloadName, WorkloadSpec

logger = logging.getLogger(__name__)


class InventoryUnavailableError(RuntimeError):
    """The node table could not be read several times in a row."""


def _transient_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, OSError]
    for name in ("RaySystemError", "GetTimeoutError", "RpcError", "GcsError"):
        cls = getattr(ray.exceptions, name, None)
        if isinstance(cls, type):
            errors.append(cls)
    return tuple(errors)


def nodes_from_table(rows: list[Mapping[str, Any]]) -> tuple[NodeSnapshot, ...]:
    """Turns ``ray.nodes()`` rows into node snapshots: labelled GPU nodes only, dead ones as unhealthy.

    Example: a row ``{"NodeID": "ab12", "Alive": True, "Labels": {"ray.io/accelerator-type": "A100"},
    "Resources": {"GPU": 2.0, "CPU": 3.0}}`` gives ``NodeSnapshot("ab12", "A100", 2.0, True)``; the head
    (no label, no GPU) gives nothing. A dead node has no resources left in the table, so its GPU count is
    the last one seen alive (``known_gpus``), or 0.
    """
    out = []
    for row in rows:
        labels = row.get("Labels") or {}
        gpu_type = labels.get(GPU_TYPE_LABEL)
        if not gpu_type:
            continue
        num_gpus = float((row.get("Resources") or {}).get("GPU", 0.0))
        alive = bool(row.get("Alive"))
        if alive and num_gpus <= 0:
            continue
        out.append(NodeSnapshot(str(row["NodeID"]), str(gpu_type), num_gpus, alive))
    return tuple(sorted(out, key=lambda n: (n.gpu_type, n.node_id)))


class RayBackend:
    """Observes the inventory from Ray and stops workloads by force. See the module docstring.

    Args:
        read_nodes: returns the node table rows (default ``ray.nodes``); injected in tests.
        max_consecutive_failures: failed reads in a row tolerated before ``observe`` raises.
        dashboard_url: for the job API; default: the cluster's own dashboard.
    """

    def __init__(
        self,
        read_nodes: Callable[[], list[Mapping[str, Any]]] | None = None,
        max_consecutive_failures: int = 5,
        dashboard_url: str | None = None,
        force_timeout_s: float = 10.0,
    ) -> None:
        self._read_nodes = read_nodes or ray.nodes
        self.max_consecutive_failures = max_consecutive_failures
        self._dashboard_url = dashboard_url
        self.force_timeout_s = force_timeout_s
        self._last_good: tuple[NodeSnapshot, ...] | None = None
        self._gpus_seen: dict[str, float] = {}
        self.consecutive_failures = 0
        self.last_observed_s = 0.0
        self._last_applied: dict[WorkloadName, Allocation] = {}
        self.forced: list[tuple[WorkloadName, str]] = []

    # ------------------------------------------------------------------------------------ observe

    def observe(self) -> tuple[NodeSnapshot, ...]:
        try:
            rows = self._read_nodes()
        except _transient_errors() as e:
            self.consecutive_failures += 1
            if self._last_good is None or self.consecutive_failures >= self.max_consecutive_failures:
                raise InventoryUnavailableError(
                    f"cannot read Ray's node table ({self.consecutive_failures} failures in a row): {e!r}"
                ) from e
            logger.warning(
                "reading Ray's node table failed (%d in a row, keeping the last snapshot of %d nodes): %r",
                self.consecutive_failures, len(self._last_good), e,
            )
            return self._last_good
        self.consecutive_failures = 0
        nodes = []
        for n in nodes_from_table(rows):
            if n.healthy:
                self._gpus_seen[n.node_id] = n.num_gpus
                nodes.append(n)
            else:
                # A dead node lost its resources in the table: keep the count it had, marked unhealthy.
                nodes.append(NodeSnapshot(n.node_id, n.gpu_type, self._gpus_seen.get(n.node_id, n.num_gpus), False))
        self._last_good = tuple(nodes)
        self.last_observed_s = time.time()
        return self._last_good

    # -------------------------------------------------------------------------------------- apply

    def apply(self, grants: Mapping[WorkloadName, Allocation]) -> None:
        if dict(grants) != self._last_applied:
            logger.debug("grants now %s", {n: str(g) for n, g in grants.items()})
            self._last_applied = dict(grants)

    # ------------------------------------------------------------------------------- force release

    def force_release(self, name: WorkloadName, spec: WorkloadSpec, meta: Mapping[str, Any]) -> None:
        """Stops ``name`` by the handle its ``meta`` gives; logs (never raises) when it cannot."""
        try:
            if meta.get("stop_actor"):
                # The workload names a method that stops what holds its GPUs and keeps the rest (the training
                # runner's signal actor aborts the trainer; the runner resumes from its checkpoint later).
                # Fire and forget: the tick loop must not wait on a workload's actor.
                handle = ray.get_actor(str(meta["stop_actor"]), namespace=meta.get("stop_actor_namespace"))
                method = str(meta.get("stop_method") or "force_stop")
                getattr(handle, method).remote()
                self.forced.append((name, f"{meta['stop_actor']}.{method}()"))
            elif meta.get("submission_id"):
                self._stop_job(str(meta["submission_id"]))
                self.forced.append((name, f"job {meta['submission_id']}"))
            elif meta.get("actor_name"):
                namespace = meta.get("actor_namespace")
                handle = ray.get_actor(str(meta["actor_name"]), namespace=namespace)
                ray.kill(handle, no_restart=True)
                self.forced.append((name, f"actor {meta['actor_name']}"))
            else:
                logger.error(
                    "cannot stop %s by force: its registration meta has none of stop_actor, submission_id, actor_name"
                    " (meta keys: %s)",
                    name, sorted(meta),
                )
                return
            logger.warning("stopped %s by force (%s)", name, self.forced[-1][1])
        except Exception:
            # A failed forced stop must not stop the arbiter's loop; the workload may be gone already.
            logger.exception("forced stop of %s failed (meta %s)", name, dict(meta))

    def _stop_job(self, submission_id: str) -> None:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.dashboard_url())
        client.stop_job(submission_id)

    def dashboard_url(self) -> str:
        if self._dashboard_url:
            return self._dashboard_url
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
        return url if url.startswith("http") else f"http://{url}"
