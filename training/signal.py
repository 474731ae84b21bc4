"""The per-job signal actor: the rendezvous between a job's runner and its training loop.

In a module of its own that imports neither torch nor Ray Train, so that the actor's process does not
either: defined in ``tidal.training.runner`` (which imports ``ray.train.torch``, hence torch), each job's signal
actor would be a 390 MB process that spends a few CPU-seconds importing torch while the job starts.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group

logger = logging.getLogger(__name__)


# Calls held by ``wait_yield`` take a thread each (one per attempt's rank 0, a stale one at most until its
# timeout): the rest serve the runner and the loop's reports.
@ray.remote(num_cpus=0, max_concurrency=8)
class JobSignal:
    """The per-job rendezvous between the runner and its training loop (one per runner, on its node).

    Rank 0 of the loop calls ``poll`` every step (progress in, "yield?" out), keeps one ``wait_yield`` in
    flight (answered the moment a yield is requested), calls ``checkpointed`` after each checkpoint and
    ``ack_yield`` when it yields (which frees the GPUs). The runner calls ``begin_attempt``, ``request_yield``
    and reads ``snapshot``. The Ray Train controller registers itself with ``set_controller`` (for a forced
    stop).
    """

    def __init__(self, job_name: str) -> None:
        self.job_name = job_name
        self.attempt = -1
        self.yield_for: int | None = None
        self.yield_reason: str | None = None
        self.progress: dict[str, Any] = {}
        self.checkpoint_step: int | None = None
        self.checkpoint_dir: str | None = None
        self.checkpoint_s: float | None = None
        self.acked: dict[str, Any] | None = None
        self.first_report_s: float | None = None
        self.controllers: dict[int, Any] = {}
        # The runtime env Ray Train's workers run in (the controller's: they inherit it), for spare workers.
        self.worker_runtime_env: str | None = None
        # Per attempt: when it began, trained its first step, yielded (for benchmarks and post-mortems).
        self.history: dict[int, dict[str, Any]] = {}
        # Set when a yield is requested for the current attempt, or when the attempt is over (a new one began).
        self._yield_event = threading.Event()

    def begin_attempt(self, attempt: int) -> None:
        self.history[attempt] = {"attempt": attempt, "begun_s": time.time()}
        self._yield_event.set()  # a stale wait_yield returns now; it answers for the old attempt
        self._yield_event = threading.Event()
        self.attempt = attempt
        self.yield_for = None
        self.yield_reason = None
        self.acked = None
        self.first_report_s = None
        self.progress = {}

    def request_yield(self, attempt: int, reason: str) -> bool:
        if attempt != self.attempt:
            return False
        self.yield_for, self.yield_reason = attempt, reason
        self._yield_event.set()
        return True

    def wait_yield(self, attempt: int, timeout_s: float) -> bool:
        """Whether a yield is requested for ``attempt``, answered as soon as one is, else after ``timeout_s``.

        ``poll`` answers only when it is called: once a step, so a yield requested just after a poll is
        seen a step later (0.4-0.6 s a step in the demo's spike). Held here, the answer is waiting
        for the loop at its next step boundary.
        """
        event = self._yield_event  # (begin_attempt sets it before it puts a new one in its place)
        if attempt == self.attempt:
            event.wait(timeout_s)
        return self.yield_for == attempt

    def poll(self, attempt: int, progress: dict[str, Any]) -> dict[str, Any]:
        self.report(attempt, progress)
        return {"yield": self.yield_for == attempt}

    def report(self, attempt: int, progress: dict[str, Any]) -> None:
        if attempt == self.attempt:
            self.progress = dict(progress, reported_s=time.time())
            if self.first_report_s is None:
                self.first_report_s = self.progress["reported_s"]
                self.history.setdefault(attempt, {}).update(
                    first_report_s=self.first_report_s,
                    first_step=progress.get("step"),
                    resumed_from=progress.get("resumed_from"),
                    process_started_s=progress.get("process_started_s"),
                )
            if self.checkpoint_step is None and "last_checkpoint_step" in progress:
                self.checkpoint_step = int(progress["last_checkpoint_step"])

    def checkpointed(self, attempt: int, step: int, dir_name: str | None = None) -> None:
        """A checkpoint every rank has persisted (``dir_name`` under the run's storage directory)."""
        self.checkpoint_step, self.checkpoint_dir, self.checkpoint_s = step, dir_name, time.time()

    def ack_yield(self, attempt: int, step: int, dir_name: str | None = None, worker_pg: Any = None) -> None:
        """The loop yielded at ``step`` with its checkpoint ``dir_name`` whole on every rank. Removes the
        worker group's placement group ``worker_pg`` (which ends the workers): the GPUs are free at once,
        where Ray Train's own teardown waits for its next health check and each worker's shutdown (1-4 s
        on a busy host). The runner reads ``acked["released_s"]`` and reports the GPUs free."""
        if attempt != self.attempt:
            return
        if dir_name is not None:
            self.checkpointed(attempt, step, dir_name)
        self.acked = {"attempt": attempt, "step": step, "t_s": time.time()}
        if worker_pg is not None:
            remove_pg(worker_pg, self.job_name)
            self.acked["released_s"] = time.time()
        self.history.setdefault(attempt, {}).update(acked_s=self.acked["t_s"], acked_step=step)

    def set_controller(self, attempt: int, handle: Any, runtime_env: str | None = None) -> None:
        self.controllers = {attempt: handle}
        if runtime_env is not None:
            self.worker_runtime_env = runtime_env

    def get_worker_runtime_env(self) -> str | None:
        return self.worker_runtime_env

    def get_controller(self, attempt: int) -> Any:
        return self.controllers.get(attempt)

    def force_stop(self) -> bool:
        """Aborts the current attempt's trainer (for an arbiter that stops workloads through this actor).

        The runner sees its attempt end with an error and resumes from the last checkpoint.
        """
        controller = self.controllers.get(self.attempt)
        if controller is None:
            return False
        controller.abort.remote()
        return True

    def snapshot(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "progress": dict(self.progress),
            "checkpoint_step": self.checkpoint_step,
            "checkpoint_dir": self.checkpoint_dir,
            "checkpoint_s": self.checkpoint_s,
            "acked": self.acked,
            "first_report_s": self.first_report_s,
            "yield_requested": self.yield_for == self.attempt,
            "history": [dict(h) for _, h in sorted(self.history.items())],
        }


def remove_pg(pg: Any, job: str) -> None:
    try:
        remove_placement_group(pg)
    except Exception as e:  # already removed, or the cluster is going away (the group dies with its owner)
        logger.warning("could not remove placement group %s of %s: %r", pg.id.hex(), job, e)
