"""Imported by every new worker process on a GPU node before it takes work (``RAY_preload_python_modules``
lists it): imports the modules of ``TIDAL_POOL_PRELOAD_MODULES`` only in a worker that is not bound to a job.

Ray's preload list is one per raylet: every new worker on the node imports all of it. The warm pool's idle
workers (``tidal.cluster.warm_pool``) are what a Serve replica starts in, so they want the model server
(``tidal.serving.app``: ``ray.serve`` and its web stack, ~1.3 CPU-seconds of imports here); but a Ray Train worker or
a job's spare (``tidal.training.spares``) is a process the raylet starts *for its job*, and never runs the model
server: in the demo that is 12 processes that would import it for nothing while the two cores are saturated.
The raylet tells them apart: it gives a worker started for a job that job's id in ``RAY_JOB_ID``, and an unbound
one (a pool worker, any job may take it) the nil id.

A worker started for a Ray Train run (a trainer's worker, or a job's spare waiting to become one) imports Ray
Train's worker module instead (~1 CPU-second here), which its actor would import on creation, in the middle of
a resize: such a process carries the variables Ray Train propagates from the driver to its controller and
workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``: ``TidalTrainer`` always sets it, for Tidal's own jobs too).

A Ray Train process also lowers its own CPU priority to ``TIDAL_TRAIN_WORKER_NICENESS`` (the local cluster's
``train_worker_niceness``) as it starts: a resize's worker group sets itself up (Ray Train's context, the process
group, the user's model) on the cores that the service's replicas share on one machine, and the training loop's
own ``cpu_niceness`` comes only once that is done.

``torch`` and whatever both kinds use stay in ``RAY_preload_python_modules`` itself; this module reads the
rest from the raylet's environment (``LocalClusterSpec.pool_preload_python_modules``, or the ``ray start``
commands of ``cluster.yaml``). A module that fails to import is logged and skipped, as Ray does for its own
list: the worker starts anyway and imports it when it needs it.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

POOL_MODULES_ENV = "TIDAL_POOL_PRELOAD_MODULES"
JOB_ID_ENV = "RAY_JOB_ID"  # set by the raylet on every worker process it starts
NIL_JOB_ID = "ffffffff"  # ray.JobID.nil().hex()
# Ray Train (2.60: ray.train.v2._internal.constants.ENV_VARS_TO_PROPAGATE) passes this from the driver to its
# controller and on to every worker's runtime env; the module is where its TrainWorker actor class lives.
RAY_TRAIN_MARKER_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
RAY_TRAIN_WORKER_MODULES = ("ray.train.v2._internal.execution.worker_group.worker",)
TRAIN_NICENESS_ENV = "TIDAL_TRAIN_WORKER_NICENESS"


def lower_priority_to(niceness: int) -> bool:
    """Raises this process's niceness to ``niceness`` if it is lower (never lowers it); True if it changed."""
    if niceness <= 0 or not hasattr(os, "getpriority"):
        return False
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current >= niceness:
        return False
    os.setpriority(os.PRIO_PROCESS, 0, min(19, niceness))
    return True


def bound_to_a_job(environ: Mapping[str, str]) -> bool:
    """Whether the raylet started this worker for a job (its ``RAY_JOB_ID`` is a job's, not the nil id)."""
    job = environ.get(JOB_ID_ENV, "")
    return bool(job) and job != NIL_JOB_ID


def ray_train_process(environ: Mapping[str, str]) -> bool:
    """Whether this worker was started for a Ray Train run (it carries the variables Ray Train propagates)."""
    return bound_to_a_job(environ) and RAY_TRAIN_MARKER_ENV in environ


def preload(
    environ: Mapping[str, str],
    import_module: Callable[[str], object] = importlib.import_module,
    renice: Callable[[int], bool] = lower_priority_to,
) -> list[str]:
    """Imports the pool modules if this worker is not bound to a job, Ray Train's worker module if it was
    started for a Ray Train run (niced first to ``TIDAL_TRAIN_WORKER_NICENESS``); returns the modules imported."""
    if ray_train_process(environ):
        try:
            renice(int(environ.get(TRAIN_NICENESS_ENV) or 0))
        except (ValueError, OSError):  # a bad value or a refused change: the worker starts as it is
            logger.exception("%s=%r not applied", TRAIN_NICENESS_ENV, environ.get(TRAIN_NICENESS_ENV))
        names = list(RAY_TRAIN_WORKER_MODULES)
    elif bound_to_a_job(environ):
        return []
    else:
        names = [m.strip() for m in environ.get(POOL_MODULES_ENV, "").split(",") if m.strip()]
    imported = []
    for name in names:
        try:
            import_module(name)
            imported.append(name)
        except Exception:  # the worker must start whatever a preload does
            logger.exception("preloading %s failed; the worker starts without it", name)
    return imported


if JOB_ID_ENV in os.environ:  # a worker process the raylet started (not a driver or a CLI importing this)
    preload(os.environ)
