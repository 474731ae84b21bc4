"""The arbiter's Ray backend: the inventory from Ray's node table, forced release through Ray's own APIs.

``observe()`` reads every node of the cluster (``ray.nodes()``): a node counts when it carries the GPU type
label ``ray.io/accelerator-type`` (Ray sets it on real GPUs; ``LocalCluster`` and ``cluster.yaml`` set it
explicitly) and has GPUs; dead nodes stay in the snapshot as unhealthy, so that their GPUs leave the
capacity. A failed read is a transient error: it is logged, the last good snapshot is returned, and only
``max_consecutive_failures`` failures in a row raise.

``apply()`` has nothing to push: workloads read their grants through their heartbeats (``ArbiterClient``),
which keeps every call on the workloads' side non-blocking. It only logs grant changes.

``force_release()`` stops a workload that kept GPUs past its yield grace, and says what it did or why it
could not (a ``ForceResult``: it never raises, and never claims the stop took effect: the holder's next
report confirms it). The arbiter asks again, harder, when no confirming report came in time.

- A service (a Serve deployment): the replicas beyond its grant on each GPU type it holds too many of are
  killed (Ray's state API lists the deployment's replica actors and their nodes; a node's type is its
  ``ray.io/accelerator-type`` label). Serve's controller replaces a killed replica only up to the target its
  autoscaling policy returns, which Tidal's hook caps at the grant. The deployment is the one its meta names
  (``serve_app``, ``serve_deployment``), else the one the service's name names (``<app>.<deployment>``), else
  the only deployment of the application named as the service.
  Every attempt does the same: it kills what is still beyond the grant.
- A job, first attempt, by what its registration ``meta`` names, first match wins: ``stop_actor`` (with
  ``stop_actor_namespace`` and ``stop_method``, default ``force_stop``: that method of that actor is called,
  as ``TidalTrainer`` asks: its run's signal actor), ``submission_id`` (a ``ray job submit`` job: stopped through the job API), or
  ``actor_name`` (with ``actor_namespace``: the actor is killed, without restart).
- A job, later attempts (the harder stop): its Ray job is stopped through the job API
  (``ray_job_submission_id``, which ``TidalTrainer`` reports, or ``submission_id``): the driver, its Train
  controller and workers and their placement groups end; else the ``actor_name`` actor is killed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import ray
from tidal.cluster.arbiter import ForceResult
from tidal.cluster.model import (
    GPU_TYPE_LABEL,
    Allocation,
    NodeSnapshot,
    WorkloadKind,
    WorkloadName,
    WorkloadSpec,
)

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
        force_timeout_s: how long a forced stop may wait on Ray's state API.
        list_actors: the alive actors matching state-API filters (default: ``ray.util.state.list_actors``);
            injected in tests.
        kill_actor: kills the named actor in a namespace, without restart; injected in tests.
        dead_jobs: the ids (hex) of Ray jobs that ended (default: Ray's job table); injected in tests.
        job_check_interval_s: how often ``ended`` reads it, at most.
    """

    def __init__(
        self,
        read_nodes: Callable[[], list[Mapping[str, Any]]] | None = None,
        max_consecutive_failures: int = 5,
        dashboard_url: str | None = None,
        force_timeout_s: float = 10.0,
        list_actors: Callable[[list[tuple[str, str, str]]], list[Any]] | None = None,
        kill_actor: Callable[[str, str], None] | None = None,
        dead_jobs: Callable[[], set[str]] | None = None,
        job_check_interval_s: float = 2.0,
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
        self._list_actors = list_actors or self._alive_actors
        self._kill_actor = kill_actor or _kill_named_actor
        self._dead_jobs = dead_jobs or _dead_ray_jobs
        self.job_check_interval_s = job_check_interval_s
        self._next_job_check_s = 0.0

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

    # ---------------------------------------------------------------------------------------- ended

    def ended(self, registrations: Mapping[WorkloadName, Any]) -> set[WorkloadName]:
        """Registered workloads whose Ray job ended (their ``meta``'s ``ray_job_id``, which ``TidalTrainer``
        reports): a killed driver takes its Train controller and workers with it, so Ray has
        freed their GPUs already. Read every ``job_check_interval_s`` at most; empty when Ray cannot answer."""
        now = time.monotonic()
        if now < self._next_job_check_s:
            return set()
        self._next_job_check_s = now + self.job_check_interval_s
        jobs = {name: str(r.meta["ray_job_id"]) for name, r in registrations.items() if r.meta.get("ray_job_id")}
        if not jobs:
            return set()
        try:
            dead = self._dead_jobs()
        except Exception as e:  # never fail the tick for it: the TTL still expires a silent holder
            logger.debug("reading Ray's job table failed: %r", e)
            return set()
        return {name for name, job in jobs.items() if job in dead}

    # -------------------------------------------------------------------------------------- apply

    def apply(self, grants: Mapping[WorkloadName, Allocation]) -> None:
        if dict(grants) != self._last_applied:
            logger.debug("grants now %s", {n: str(g) for n, g in grants.items()})
            self._last_applied = dict(grants)

    # ------------------------------------------------------------------------------- force release

    def force_release(
        self,
        name: WorkloadName,
        spec: WorkloadSpec,
        meta: Mapping[str, Any],
        *,
        held: Allocation,
        grant: Allocation,
        attempt: int,
    ) -> ForceResult:
        """Stops what ``name`` holds beyond ``grant`` by the handle its kind and ``meta`` give. See the module
        docstring. A stop that cannot be sent comes back with ``issued=False`` and the reason (also logged)."""
        try:
            if spec.kind is WorkloadKind.SERVICE:
                how = self._cap_replicas(name, meta, held, grant)
            elif attempt == 1:
                how = self._stop(meta)
            else:
                how = self._stop_harder(meta)
        except Exception as e:
            # The tick loop goes on; the arbiter logs the reason, records it, and asks again later.
            reason = f"{type(e).__name__}: {e}"
            logger.warning("forced stop %d of %s failed (meta %s): %s", attempt, name, dict(meta), reason)
            return ForceResult(issued=False, reason=reason)
        if how is None:
            reason = _no_handle(spec, meta, attempt)
            return ForceResult(issued=False, reason=reason)
        self.forced.append((name, how))
        logger.warning("stopped %s by force, attempt %d (%s)", name, attempt, how)
        return ForceResult(issued=True, how=how)

    def _stop(self, meta: Mapping[str, Any]) -> str | None:
        if meta.get("stop_actor"):
            # The workload names a method that stops what holds its GPUs and keeps the rest (the training
            # run's signal actor has its scaling policy stop the worker group; the job resumes from its checkpoint).
            # Fire and forget: the tick loop must not wait on a workload's actor.
            handle = ray.get_actor(str(meta["stop_actor"]), namespace=meta.get("stop_actor_namespace"))
            method = str(meta.get("stop_method") or "force_stop")
            getattr(handle, method).remote()
            return f"{meta['stop_actor']}.{method}()"
        if meta.get("submission_id"):
            self._stop_job(str(meta["submission_id"]))
            return f"job {meta['submission_id']} stopped"
        if meta.get("actor_name"):
            return self._kill(meta)
        return None

    def _stop_harder(self, meta: Mapping[str, Any]) -> str | None:
        submission_id = meta.get("ray_job_submission_id") or meta.get("submission_id")
        if submission_id:
            # The driver ends, and with it its Train controller, its workers and their placement groups.
            self._stop_job(str(submission_id))
            return f"job {submission_id} stopped"
        if meta.get("actor_name"):
            return self._kill(meta)
        return None

    def _kill(self, meta: Mapping[str, Any]) -> str:
        handle = ray.get_actor(str(meta["actor_name"]), namespace=meta.get("actor_namespace"))
        ray.kill(handle, no_restart=True)
        return f"actor {meta['actor_name']} killed"

    # ------------------------------------------------------------------------------ services

    def _cap_replicas(
        self, name: WorkloadName, meta: Mapping[str, Any], held: Allocation, grant: Allocation
    ) -> str | None:
        """Kills the deployment's replicas beyond ``grant`` on each type where it holds more; returns what
        was killed, or None when the deployment cannot be found (the reason is logged)."""
        excess = {t: n - grant.get(t) for t, n in held.items if n > grant.get(t)}
        app, deployment = meta.get("serve_app"), meta.get("serve_deployment")
        filters = [("state", "=", "ALIVE")]
        if app and deployment:
            filters.append(("class_name", "=", f"{_REPLICA_CLASS_PREFIX}{app}:{deployment}"))
        replicas = self._list_actors(filters)
        replicas = [a for a in replicas if str(_field(a, "class_name") or "").startswith(_REPLICA_CLASS_PREFIX)]
        if not (app and deployment):
            # A service named "<app>.<deployment>", or the application named as the service if it has one
            # deployment.
            classes = {str(_field(a, "class_name")) for a in replicas}
            dotted = f"{_REPLICA_CLASS_PREFIX}{name.replace('.', ':', 1)}"
            if "." in name and dotted in classes:
                app, deployment = name.split(".", 1)
            else:
                deployments = {c for c in classes if _app_of(c) == name}
                if len(deployments) != 1:
                    logger.warning(
                        "service %s: its meta names no serve_app/serve_deployment, no deployment is named %r, and "
                        "Serve has %d deployments in an application named %r", name, name, len(deployments), name,
                    )  # fmt: skip
                    return None
                app, deployment = name, next(iter(deployments)).split(":", 2)[2]
        class_name = f"{_REPLICA_CLASS_PREFIX}{app}:{deployment}"
        type_of = self._gpu_type_by_node()
        # (In name order: any choice frees the same GPUs, and this one is the same on every attempt.)
        ours = sorted(
            (a for a in replicas if _field(a, "class_name") == class_name), key=lambda a: str(_field(a, "name") or "")
        )
        killed: list[str] = []
        for gpu_type, n in sorted(excess.items()):
            on_type = [a for a in ours if type_of.get(str(_field(a, "node_id") or "")) == gpu_type]
            for a in on_type[:n]:
                actor_name = str(_field(a, "name") or "")
                self._kill_actor(actor_name, _SERVE_NAMESPACE)
                killed.append(f"{actor_name} on {gpu_type}")
        if not killed:
            return f"no replica of {app}/{deployment} beyond its grant {grant} is alive"
        return f"killed {len(killed)} replica(s) of {app}/{deployment}: " + ", ".join(killed)

    def _gpu_type_by_node(self) -> dict[str, str]:
        return {n.node_id: n.gpu_type for n in nodes_from_table(self._read_nodes())}

    def _alive_actors(self, filters: list[tuple[str, str, str]]) -> list[Any]:
        from ray.util.state import list_actors

        return list(
            list_actors(
                filters=filters,  # type: ignore[arg-type]
                limit=10_000,
                timeout=max(1, int(self.force_timeout_s)),
                raise_on_missing_output=False,
            )
        )

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


# Serve names its replica actors' class "ServeReplica:<app>:<deployment>" and the actors themselves
# "SERVE_REPLICA::<app>#<deployment>#<id>", in the namespace "serve" (ray.serve._private.common, constants).
_REPLICA_CLASS_PREFIX = "ServeReplica:"
_SERVE_NAMESPACE = "serve"


def _field(actor: Any, key: str) -> Any:
    return actor.get(key) if isinstance(actor, Mapping) else getattr(actor, key, None)


def _app_of(class_name: Any) -> str | None:
    parts = str(class_name or "").split(":", 2)
    return parts[1] if len(parts) == 3 else None


def _kill_named_actor(name: str, namespace: str) -> None:
    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)


def _no_handle(spec: WorkloadSpec, meta: Mapping[str, Any], attempt: int) -> str:
    if spec.kind is WorkloadKind.SERVICE:
        return f"no Serve deployment found for service {spec.name!r} (meta keys: {sorted(meta)})"
    if attempt == 1:
        wanted = "stop_actor, submission_id, actor_name"
    else:
        wanted = "ray_job_submission_id, submission_id, actor_name"
    return f"its registration meta has none of {wanted} (meta keys: {sorted(meta)})"


def _dead_ray_jobs() -> set[str]:
    """The ids (hex) of the Ray jobs that ended, from the GCS's job table.

    Ray internal (no public call reads the job table without the dashboard): the worker's GCS client's
    ``get_all_job_info``, keyed by ``JobID``, each with ``is_dead``. Pinned by
    tests/unit/test_ray_backend_ended.py::test_rays_job_table_call_is_what_the_backend_reads.
    """
    from ray._private.worker import global_worker

    infos = global_worker.gcs_client.get_all_job_info(
        skip_submission_job_info_field=True, skip_is_running_tasks_field=True, timeout=5
    )
    return {job_id.hex() for job_id, info in infos.items() if info.is_dead}
