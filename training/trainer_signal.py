"""The rendezvous between a ``TidalTrainer``'s scaling policy (in Ray Train's controller) and its workers.

One small actor per run (``TrainerSignal``), owned by the controller, so it ends with it. It imports neither
torch nor Ray Train, so its process stays small; it outlives worker groups (one controller for the job's
life), counts each worker group as a *generation*, and takes a park from every rank.

- The policy calls ``begin_group`` as it starts a worker group, ``request_yield`` on a grant change, and
  reads ``snapshot`` on each of its decisions.
- Rank 0 keeps one ``wait_yield`` in flight (answered the moment a yield is requested) and calls
  ``progress`` (rate-limited) with its step count; ``should_yield()`` turns rank 0's answer into every rank's.
- Every rank calls ``hello`` as it joins a group, with when its process started: a process older than its
  group was a spare, started ahead (a warm start).
- Every rank calls ``park`` once its loop has yielded: the number of reports it made in this group tells the
  policy when the controller has collected its last checkpoint.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray

NAMESPACE = "tidal"


def signal_name(token: str) -> str:
    return f"tidal-trainer-{token}"


@ray.remote(num_cpus=0, max_concurrency=8)
class TrainerSignal:
    """See the module docstring. Times are wall-clock seconds (``time.time()``)."""

    def __init__(self, job: str) -> None:
        self.job = job
        self.generation = -1
        self.num_workers = 0
        self.yield_requested_s: float | None = None
        self.parks: dict[int, dict[str, Any]] = {}
        self.processes_started: dict[int, float | None] = {}
        self.joined_s: float | None = None  # when the group's last rank said hello (its train function runs)
        self.steps = 0
        self.step_s: float | None = None
        self.first_step_s: float | None = None
        self.cooperative = False  # a rank called should_yield() in this generation
        self.force_requested_s: float | None = None  # the arbiter asked for a forced stop (force_stop)
        self.controller: dict[str, Any] = {}
        self._event = threading.Event()

    def set_controller(self, info: dict[str, Any]) -> None:
        self.controller = dict(info)

    def begin_group(self, generation: int, num_workers: int) -> None:
        self._event.set()  # a held wait_yield of the old group returns now (it answers for that group)
        self._event = threading.Event()
        self.generation, self.num_workers = generation, num_workers
        self.yield_requested_s = None
        self.parks = {}
        self.processes_started = {}
        self.joined_s = None
        self.steps, self.step_s, self.first_step_s, self.cooperative = 0, None, None, False
        self.force_requested_s = None

    def request_yield(self, generation: int) -> bool:
        if generation != self.generation:
            return False
        if self.yield_requested_s is None:
            self.yield_requested_s = time.time()
        self._event.set()
        return True

    def wait_yield(self, generation: int, timeout_s: float) -> bool:
        """Whether a yield is requested for ``generation``: as soon as one is, else after ``timeout_s``."""
        event = self._event
        if generation == self.generation and self.yield_requested_s is None:
            event.wait(timeout_s)
        return generation == self.generation and self.yield_requested_s is not None

    def current(self) -> int:
        return self.generation

    def hello(self, generation: int, rank: int, process_started_s: float | None) -> None:
        """Rank ``rank`` joined ``generation``; its process started at ``process_started_s`` (None: unknown)."""
        if generation == self.generation:
            self.processes_started[rank] = process_started_s
            self.joined_s = time.time()

    def progress(self, generation: int, steps: int, step_s: float) -> None:
        if generation != self.generation:
            return
        self.cooperative = True
        self.steps, self.step_s = steps, step_s
        if self.first_step_s is None:
            self.first_step_s = step_s

    def park(self, generation: int, rank: int, reports: int, steps: int, step_s: float | None) -> None:
        """Rank ``rank`` has yielded after ``reports`` reports in this group (its last one a checkpoint)."""
        if generation != self.generation:
            return
        self.parks[rank] = {"reports": reports, "parked_s": time.time()}
        if rank == 0 and step_s is not None:
            self.steps, self.step_s = steps, step_s

    def force_stop(self) -> bool:
        """The arbiter's forced stop (its ``stop_actor`` meta names this actor): the policy ends the running
        group by force at its next decision, as when the job's own grace runs out. True if a group runs."""
        if self.generation < 0:
            return False
        self.force_requested_s = time.time()
        return True

    def snapshot(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "num_workers": self.num_workers,
            "yield_requested_s": self.yield_requested_s,
            "parks": {r: dict(p) for r, p in self.parks.items()},
            "processes_started": dict(self.processes_started),
            "joined_s": self.joined_s,
            "steps": self.steps,
            "step_s": self.step_s,
            "first_step_s": self.first_step_s,
            "cooperative": self.cooperative,
            "force_requested_s": self.force_requested_s,
            "controller": dict(self.controller),
        }
