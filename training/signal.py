"""``ProgressBoard``: where a training run with no arbiter to report to says how far it is.

Tidal's jobs report their progress to the arbiter (``tidal status``); a run the arbiter does not know (the
Ray-alone baseline of ``bench/spike.py``) has rank 0 of the built-in loop post it here instead, once a second,
so that the benchmark reads both systems' steps. In a module that imports neither torch nor Ray Train, so that
the actor's process stays small.
"""

from __future__ import annotations

from typing import Any

import ray

NAMESPACE = "tidal"


def progress_board_name(job_name: str) -> str:
    return f"tidal-progress-{job_name}"


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The newest progress a run's rank 0 posted (the loop's metrics: step, num_workers, gpu_type, ...)."""

    def __init__(self, job_name: str) -> None:
        self.job_name = job_name
        self.progress: dict[str, Any] = {}

    def post(self, progress: dict[str, Any]) -> None:
        self.progress = dict(progress)

    def snapshot(self) -> dict[str, Any]:
        return {"job": self.job_name, "progress": dict(self.progress)}
