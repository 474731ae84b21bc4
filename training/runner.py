"""The elastic training runner: the Ray glue of ``training`` (the driver that ``ray job submit`` starts).

It registers the job with the arbiter, waits for a grant of at least ``min_workers``, and runs a Ray Train
``TorchTrainer`` with that many workers on the granted GPU type (``ScalingConfig.label_selector``). Each
trainer run is one *attempt*; all attempts share one Ray Train run name and storage path, so each one
resumes from the latest checkpoint (``ray.train.get_checkpoint()``).

What to do next is decided by the pure ``tidal.training.elastic.decide``; this module observes and acts:

- **Grant**: through a :class:`GrantSource` (``tidal.cluster.client.ArbiterClient`` in production), heartbeating
  what it holds and its progress; with the arbiter's client, a thread also keeps a ``watch_grant`` call in
  flight, which wakes the loop as soon as a tick changes the grant.
- **Yield**: a small named actor per job (:class:`JobSignal`) that rank 0 of the training loop polls every
  step without blocking; the loop checkpoints at its next step boundary, acknowledges and returns.
- **Force**: a Ray Train controller callback hands the controller's handle to the signal actor; a yield
  that misses its deadline is ended with ``TrainController.abort()`` (what Ctrl-C on ``fit()`` does),
  and the next attempt resumes from the last checkpoint.
- **Failure** (a node died under the job): the attempt ends with an error; the next attempt starts on the
  GPUs left (the runner caps the grant by the GPUs alive) from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal as signal_module
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _TorchBackend
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tidal.cluster.model import GPU_TYPE_LABEL, GrantView, TrainingJobSpec
from tidal.cluster.warm_pool import RayletRpc, nodes_from_ray
from tidal.training.elastic import (
    AttemptRecord,
    ElasticConfig,
    ElasticState,
    ForceStop,
    Keep,
    Phase,
    RunLedger,
    Start,
    Target,
    Wait,
    Yield,
    YieldReason,
    decide,
)
from tidal.training.signal import JobSignal, remove_pg
from tidal.training.spares import SpareWorkers
from tidal.training.spec import JobSpec

logger = logging.getLogger(__name__)

NAMESPACE = "tidal"
SUMMARY_FILE = "summary.json"


def signal_actor_name(job_name: str) -> str:
    return f"tidal-train-signal-{job_name}"


# ------------------------------------------------------------------------------------- the seams


class GrantSource(Protocol):
    """Where the grant comes from: ``tidal.cluster.client.ArbiterClient`` in production."""

    def register(
        self, spec: TrainingJobSpec, meta: Mapping[str, Any] | None = None, *, held: Mapping[str, int] | None = None
    ) -> GrantView: ...

    def heartbeat_nowait(
        self,
        name: str,
        *,
        demand_units: int | None = None,
        held: Mapping[str, int] | None = None,
        progress: Mapping[str, Any] | None = None,
        seconds_since_checkpoint: float | None = None,
    ) -> GrantView | None: ...

    def heartbeat(
        self,
        name: str,
        *,
        demand_units: int | None = None,
        held: Mapping[str, int] | None = None,
        progress: Mapping[str, Any] | None = None,
        seconds_since_checkpoint: float | None = None,
        timeout_s: float = 5.0,
    ) -> GrantView: ...

    def unregister(self, name: str) -> Any: ...


def gpu_capacity() -> dict[str, float]:
    """GPUs per GPU type on the alive nodes (``ray.io/accelerator-type`` label), from the GCS."""
    out: dict[str, float] = {}
    for node in ray.nodes():
        labels = node.get("Labels") or {}
        gpu_type = labels.get(GPU_TYPE_LABEL)
        if node.get("Alive") and gpu_type:
            out[gpu_type] = out.get(gpu_type, 0.0) + float((node.get("Resources") or {}).get("GPU", 0.0))
    return out


def known_gpu_types() -> set[str]:
    """Every GPU type a node of this cluster has had (alive or not: a type may be between nodes)."""
    return {
        (node.get("Labels") or {}).get(GPU_TYPE_LABEL)
        for node in ray.nodes()
        if (node.get("Labels") or {}).get(GPU_TYPE_LABEL)
    }


# ------------------------------------------------------------------------------- the signal actor


class _RegisterController(ControllerCallback):
    """Runs inside Ray Train's controller actor: hands its handle to the job's signal actor.

    Ray Train keeps the controller handle inside ``fit()``; its own Ctrl-C handler stops a run with
    ``controller.abort()``. This callback (``RunConfig(callbacks=...)`` passes non-user callbacks through to
    the controller) is how the runner gets the same handle, for a forced stop.
    """

    def __init__(self, signal_name: str, attempt: int) -> None:
        self.signal_name = signal_name
        self.attempt = attempt

    def after_controller_start(self, train_run_context: Any) -> None:
        context = ray.get_runtime_context()
        signal = ray.get_actor(self.signal_name, namespace=NAMESPACE)
        # Ray Train's workers inherit this actor's runtime env unchanged (training/spares.py).
        signal.set_controller.remote(self.attempt, context.current_actor, context.get_runtime_env_string())


class _ReleaseHold(WorkerGroupCallback):
    """Runs inside Ray Train's controller: removes the job's GPU hold (``GpuHold``) right before the worker
    group asks for its placement group, so that the GPUs go from the hold to the workers with no gap.

    Released by the runner at the attempt's start instead, the GPUs would be free in Ray for the seconds the
    controller takes to start (10-40 s on a busy 2-core machine), and a Serve replica whose label selector
    falls back to their type would take one: the job would then wait for the GPU it was granted.
    """

    def __init__(self, job: str, pgs: Sequence[Any] | None) -> None:
        self.job = job
        self.pgs = list(pgs or ())

    def before_worker_group_start(self, worker_group_context: Any) -> None:
        for pg in self.pgs:
            remove_pg(pg, self.job)
        if self.pgs:
            logger.info("job %s: released its GPU hold for the new worker group", self.job)
        self.pgs = []


# --------------------------------------------------------------------------------------- the runner


@dataclass
class _Attempt:
    index: int
    target: Target
    started_s: float
    start_step: int
    thread: threading.Thread | None = None
    result: Any = None
    error: BaseException | None = None
    forced: bool = False
    force_reason: str | None = None
    yield_requested_s: float | None = None
    yield_reason: str | None = None
    first_step_noted: bool = False
    first_step_s: float = float("inf")  # when the runner saw its first step (clock time)
    released: bool = False  # its workers' GPUs were freed on the yield's acknowledgement (JobSignal.ack_yield)
    held_pgs: tuple[Any, ...] = ()  # the hold handed to this attempt's controller (removed by the runner if it never was)
    # A releasing yield asked while it had not been seen training gets STARTING_YIELD_GRACE_S; this is the
    # yield's own deadline, restored if the attempt is seen training before that (it checkpoints then).
    starting_yield_full_deadline_s: float | None = None
    starting_yield: bool = False


@dataclass
class RunSummary:
    """What a run did, written to ``<storage_path>/<name>/tidal/summary.json``."""

    name: str
    finished: bool
    final_step: int
    total_steps: int | None
    restarts: int
    steps_lost: int
    attempts: list[dict[str, Any]]
    resizes: list[dict[str, Any]]
    history: list[list[float]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    expected_metrics: dict[str, float] = field(default_factory=dict)
    reached_expected: bool | None = None
    export_path: str | None = None
    checkpoint_path: str | None = None


class RunnerError(RuntimeError):
    """The run cannot go on (e.g. the training code fails again and again)."""


class GpuHold:
    """Keeps the GPUs a job was granted while it is between two attempts, in a placement group.

    After a shrink, Ray Train has shut the whole worker group down before the runner can restart on the GPUs
    it kept (after ``restart_delay_s``, and the restart itself takes seconds). Meanwhile those GPUs are free
    in Ray, and a Serve replica whose label selector falls back to their type takes them (a replica granted
    an H100 starts on the A100 that the job is about to restart on, and the job then waits out the whole
    spike). The runner therefore asks for a placement group over its grant *before* it reports the
    GPUs released, so that the request is queued ahead of any replica the arbiter's next grant will start,
    and hands it to the next attempt's controller, which removes it right before its workers ask for the
    GPUs (``_ReleaseHold``).
    """

    def __init__(
        self, job: str, gpus_per_worker: float, gpu_types: Sequence[str], ready_timeout_s: float = 0.5
    ) -> None:
        self.job = job
        self.gpus_per_worker = gpus_per_worker
        self.gpu_types = frozenset(gpu_types)
        self.ready_timeout_s = ready_timeout_s
        self.pgs: list[Any] = []  # one placement group, plus one per ``extend``
        self._placed = 0
        self.grant: dict[str, int] = {}

    def hold(self, grant: Mapping[str, int], wait: bool = True) -> None:
        """Holds ``grant`` (units = workers) on the job's GPU types, replacing what was held; an empty
        grant releases. Units of other types (which the job cannot train on) are not held. ``wait``:
        wait up to ``ready_timeout_s`` for it to be placed (not when the GPUs are still in use)."""
        grant = self._own(grant)
        if grant == self.grant:
            return
        self.release()
        pg = self._place(grant, wait)
        if pg is not None:
            self.pgs, self.grant = [pg], grant

    def extend(self, grant: Mapping[str, int]) -> None:
        """Holds ``grant`` without letting go of what is held: only the GPUs beyond it are asked for, in one
        more placement group, so that none of the held ones is free in between (``hold`` replaces)."""
        more = {t: n - self.grant.get(t, 0) for t, n in self._own(grant).items() if n > self.grant.get(t, 0)}
        if not more:
            return
        try:
            pg = self._place(more, wait=False)
        except Exception as e:  # a courtesy: the restart goes on without it
            logger.warning("job %s: could not hold the GPUs its grant added (%s): %r", self.job, more, e)
            return
        if pg is not None:
            self.pgs.append(pg)
            self.grant = {**self.grant, **{t: self.grant.get(t, 0) + n for t, n in more.items()}}

    def _own(self, grant: Mapping[str, int]) -> dict[str, int]:
        """The units of ``grant`` on the job's GPU types (the only ones it can train on, so holds)."""
        return {t: int(n) for t, n in grant.items() if n > 0 and t in self.gpu_types}

    def _place(self, grant: Mapping[str, int], wait: bool) -> Any:
        bundles: list[dict[str, float]] = []
        selectors: list[dict[str, str]] = []
        for gpu_type, n in sorted(grant.items()):
            bundles += [{"GPU": self.gpus_per_worker}] * n
            selectors += [{GPU_TYPE_LABEL: gpu_type}] * n
        if not bundles:
            return None
        # A placement group's name must be unique while the group lives ("name ... already exists"), and a
        # handed-over hold lives on until the next attempt's controller removes it: one number per group.
        self._placed += 1
        name = f"tidal-hold-{self.job}-{self._placed}"
        pg = placement_group(bundles, strategy="PACK", name=name, bundle_label_selector=selectors)
        if wait:
            # Placed within milliseconds when the GPUs are free; never wait long: the hold is a courtesy.
            ray.wait([pg.ready()], timeout=self.ready_timeout_s)
        return pg

    def release(self) -> None:
        for pg in self.pgs:
            remove_pg(pg, self.job)
        self.pgs, self.grant = [], {}

    def hand_over(self) -> tuple[Any, ...]:
        """Forgets the placement groups and returns them (empty if nothing is held): their new owner removes
        them (``_ReleaseHold``, when the next attempt's workers ask for the GPUs)."""
        pgs, self.pgs, self.grant = tuple(self.pgs), [], {}
        return pgs


def restart_not_before(
    outcome: str,
    now: float,
    failures: int,
    failure_backoff_s: float,
    restart_delay_s: float,
    yield_reason: str | None = None,
) -> float:
    """The earliest time the next attempt may start, after one that ended with ``outcome``.

    A failed attempt backs off ``failure_backoff_s`` per failure in a row (a lost node takes the GCS a few
    seconds to declare dead, and the arbiter a tick more to shrink the grant); one that yielded GPUs back
    waits the job's ``restart_delay_s``; any other restarts at once, a yield to grow too (it gave nothing
    back, and the bigger grant is what the job waits for).

    Example: ``restart_not_before("failed", 100.0, 2, 3.0, 0.0)`` is 106.0.
    """
    if outcome == "failed":
        return now + failure_backoff_s * failures
    if outcome == "yielded" and (yield_reason is None or YieldReason(yield_reason).releases_gpus):
        return now + restart_delay_s
    return float("-inf")


def restart_due(now: float, not_before_s: float, target_workers: int, gave_up_from: int | None) -> bool:
    """Whether a job waiting to restart may start its next attempt now, at ``target_workers``.

    At ``not_before_s`` (see :func:`restart_not_before`) at the latest; earlier when the wait is a restart
    delay after giving GPUs back (``gave_up_from``: the size of the attempt that gave them) and the grant is
    back to that size: the spike that took them is over, so the job restarts once, at its old size, instead
    of once at the smaller size and again to grow (each restart of Ray Train's worker group costs tens of
    seconds of the whole job). A failure's back-off is never cut short (``gave_up_from`` is None then).

    Example: a job that shrank from 4 workers with a delay until t=160 restarts at t=130 once its grant
    allows 4 again: ``restart_due(130.0, 160.0, 4, 4)`` is True, ``restart_due(130.0, 160.0, 3, 4)`` False.
    """
    return now >= not_before_s or (gave_up_from is not None and target_workers >= gave_up_from)


STARTING_YIELD_GRACE_S = 2.0


def starting_yield_deadline(now: float, deadline_s: float | None) -> float:
    """The force-stop deadline of a yield that gives GPUs back from an attempt not yet seen training.

    ``STARTING_YIELD_GRACE_S`` from now (or the yield's own deadline if sooner): an attempt still starting
    has nothing to checkpoint and may never start (its placement group waiting for GPUs that are gone), so
    it does not get the whole grace; but its first step may have finished a moment ago, unreported, and
    then it checkpoints at its next step boundary within that time instead of losing the step.

    Example: ``starting_yield_deadline(100.0, 120.0)`` is 102.0; ``starting_yield_deadline(100.0, 101.0)``
    is 101.0; with no deadline (``None``), 102.0.
    """
    soon = now + STARTING_YIELD_GRACE_S
    return soon if deadline_s is None else min(deadline_s, soon)


def restore_yield_grace(state: ElasticState, attempt: _Attempt) -> ElasticState:
    """The state once a starting attempt is seen training while its shortened yield runs: the yield's own
    deadline back (and the attempt's note of it cleared); ``state`` itself otherwise.

    A loop that trains checkpoints at its next step boundary; the shortened deadline is for a loop that has
    not stepped yet. Kept, it stops by force a loop that has just made its first step on two busy cores (2 s
    after the request, before its next step boundary), and that step is lost.

    Example: YIELDING with deadline 102 (asked at 100, own deadline 120) -> YIELDING with deadline 120.
    """
    if not attempt.starting_yield or state.phase is not Phase.YIELDING:
        return state
    attempt.starting_yield = False
    return dataclasses.replace(state, yield_deadline_s=attempt.starting_yield_full_deadline_s)


YIELD_POLL_S = 0.05
YIELD_POLL_WINDOW_S = 10.0
# A held watch_grant call returns after this long with the grant unchanged (and is sent again).
GRANT_WATCH_S = 10.0


def attempt_wait_s(poll_interval_s: float, yield_age_s: float | None, released: bool) -> float:
    """How long the loop waits on a running attempt before it looks again.

    ``YIELD_POLL_S`` for the first ``YIELD_POLL_WINDOW_S`` of a yield whose GPUs are not yet reported free
    (``yield_age_s``: seconds since it was asked for, None if none was), so that the arbiter hears of them
    within a twentieth of a second (a service's replicas wait for them); else the runner's
    ``poll_interval_s`` (a yield that takes longer is a slow checkpoint or a stop, not worth 20 looks a
    second). At 0.25 s the runner would notice freed GPUs 0.25-0.5 s late, in a reclaim of ~1.3 s from
    decision to GPUs free on this machine.

    Example: ``attempt_wait_s(0.25, 0.4, False)`` is 0.05; ``attempt_wait_s(0.25, 0.4, True)`` is 0.25.
    """
    if yield_age_s is not None and yield_age_s < YIELD_POLL_WINDOW_S and not released:
        return min(YIELD_POLL_S, poll_interval_s)
    return poll_interval_s


def spares_due(now: float, due_s: float, attempt_index: int, first_step_s: float, delay_s: float) -> bool:
    """Whether a top-up of spare workers may run now, for an attempt that trains steadily.

    Not before ``due_s`` (the runner's 10 s rhythm), and for a restart (any attempt but the first, index 0)
    not before ``delay_s`` after its first step (the job spec's ``spare_workers_delay_s``).

    Example: a restart whose first step came at t=100 with a 40 s delay: ``spares_due(120.0, 0.0, 1, 100.0,
    40.0)`` is False, at t=140 True; the first attempt (index 0) is due at t=120 already.
    """
    if now < due_s:
        return False
    return attempt_index == 0 or now >= first_step_s + delay_s


class ElasticRunner:
    """Runs one job to completion under a changing grant. See the module docstring.

    Args:
        spec: the validated job spec.
        grants: the grant source (an ``ArbiterClient``).
        poll_interval_s: how often the runner heartbeats and decides.
        max_consecutive_failures: attempts that fail (not yielded, not forced) without progress in a row
            before the run gives up.
        failure_backoff_s: wait this long (times the failures in a row) before restarting after a failure.
        capacity: GPUs per type alive now (``gpu_capacity`` by default).
        clock: wall-clock seconds, the arbiter's clock (``release_by_s`` is on it).
    """

    def __init__(
        self,
        spec: JobSpec,
        grants: GrantSource,
        *,
        poll_interval_s: float = 0.25,
        max_consecutive_failures: int = 3,
        failure_backoff_s: float = 3.0,
        capacity: Callable[[], Mapping[str, float]] = gpu_capacity,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spec = spec
        self.grants = grants
        self.poll_interval_s = poll_interval_s
        self.max_consecutive_failures = max_consecutive_failures
        self.failure_backoff_s = failure_backoff_s
        self.capacity = capacity
        self.clock = clock
        self.cfg = ElasticConfig(
            gpu_types=tuple(spec.gpu_types),
            min_workers=spec.min_workers,
            max_workers=spec.max_workers,
            gpus_per_worker=spec.gpus_per_worker,
            yield_grace_s=spec.yield_grace_s,
            resize_min_interval_s=spec.resize_min_interval_s,
        )
        self.state = ElasticState()
        self.ledger = RunLedger()
        self.held: dict[str, int] = {}
        self.hold = GpuHold(spec.name, spec.gpus_per_worker, spec.gpu_types)
        self.view: GrantView | None = None
        self.attempt: _Attempt | None = None
        self.attempt_index = 0
        self.last_snapshot: dict[str, Any] = {}
        self.checkpoint_step = 0
        # The checkpoint the loop last reported whole (see ``tidal.training.loop.resume_checkpoint``).
        self.checkpoint_dir: str | None = None
        self.last_result: Any = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # set: the loop looks now (a grant changed, the attempt ended, stop)
        self._signal: Any = None
        self._capacity_cache: tuple[float, Mapping[str, float]] = (0.0, {})
        self._not_before_s = float("-inf")
        self._gave_up_from: int | None = None  # the size a shrink-yield left, while its restart delay runs
        self.spares: SpareWorkers | None = None
        self._spares_thread: threading.Thread | None = None
        self._spares_due_s = float("-inf")
        self._driver_node_id: str | None = None  # where Ray Train's controller runs (spares for it and its helpers)

    # ------------------------------------------------------------------------------------ public

    def run(self) -> RunSummary:
        """Registers, trains through grants and resizes to the last step, exports, unregisters."""
        # Ray Train polls its workers every 2 s by default; a yielded loop is noticed, and its GPUs freed, only
        # at the next poll (JobSpec.health_check_interval_s, 0.25 s by default).
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(self.spec.health_check_interval_s))
        self._signal = JobSignal.options(
            name=signal_actor_name(self.spec.name),
            namespace=NAMESPACE,
            # On the driver's node, like Ray Train's controller: it lives and dies with the runner.
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
        ).remote(self.spec.name)
        if self.spec.spare_workers > 0:
            self.spares = SpareWorkers(
                RayletRpc(),
                job_id=bytes.fromhex(ray.get_runtime_context().get_job_id()),
                count=min(self.spec.spare_workers, self.spec.max_workers),
                gpus_per_worker=self.spec.gpus_per_worker,
                control_count=self.spec.spare_control_workers,
            )
            self._driver_node_id = ray.get_runtime_context().get_node_id()
        try:
            self.view = self.grants.register(self.spec.to_training_job_spec(), self._meta(), held=dict(self.held))
        except Exception as e:  # e.g. ArbiterUnavailableError: no arbiter on this cluster
            raise RunnerError(f"cannot register job {self.spec.name!r} with the arbiter: {e}") from e
        if not self.view.registered:
            raise RunnerError(f"the arbiter refused job {self.spec.name!r}: {self.view.reason}")
        logger.info("job %s registered; grant %s", self.spec.name, self.view.grant)
        watch = getattr(self.grants, "watch_grant", None)
        if callable(watch):
            threading.Thread(
                target=self._watch_grant, args=(watch,), name=f"grant-watch-{self.spec.name}", daemon=True
            ).start()
        finished = False
        try:
            finished = self._loop()
        finally:
            alive = self.attempt is not None and self.attempt.thread is not None and self.attempt.thread.is_alive()
            # On `ray job stop` (SIGTERM) Ray kills this process 3 s later, and the trainer with it (its
            # controller and workers are this driver's actors): only unregister and write the summary then.
            if alive and not self._stop.is_set():
                assert self.attempt is not None and self.attempt.thread is not None
                self._force_stop(self.attempt, "the runner is stopping", wait=True)
                self.attempt.thread.join(timeout=30)
            self.hold.release()
            try:
                self.grants.unregister(self.spec.name)
            except Exception as e:  # the arbiter may be gone; its registration then expires on its own
                logger.warning("could not unregister %s: %s", self.spec.name, e)
        return self._finish(finished)

    def stop(self) -> None:
        """Asks the run to end (e.g. on SIGTERM from ``ray job stop``); ``run`` then returns unfinished."""
        self._stop.set()
        self._wake.set()

    # ------------------------------------------------------------------------------------ the loop

    def _loop(self) -> bool:
        failures = 0
        waiting_logged: str | None = None
        while not self._stop.is_set():
            now = self.clock()
            self._heartbeat()
            grant = self.view.grant.as_dict() if self.view is not None else {}
            decision = decide(
                self.state, grant, now, self.cfg,
                capacity_gpus=self._capacity(),
                release_by_s=self.view.release_by_s if self.view is not None else None,
            )  # fmt: skip
            match decision:
                case Keep():
                    pass
                case Wait(reason=reason):
                    self.hold.release()
                    self.held = {}
                    if reason != waiting_logged:
                        logger.info("job %s waits: %s", self.spec.name, reason)
                        self.ledger = self.ledger.note({"t_s": now, "event": "wait", "reason": reason})
                        waiting_logged = reason
                case Start(target=target):
                    # Not before restart_not_before() says (a failure's back-off, a yield's restart delay), unless
                    # restart_due() sees the grant back at the size the yield gave up from.
                    if restart_due(now, self._not_before_s, target.num_workers, self._gave_up_from):
                        waiting_logged = None
                        # Hold the GPUs the grant added since the shrink too, until the workers ask for them:
                        # the controller takes 10-40 s to start here, and a replica that could not have its
                        # own GPU yet (one still draining) falls back to a granted, free H100 meanwhile, and
                        # the job would never get back to its size.
                        if self.hold.grant:
                            self.hold.extend(grant)
                        self._start_attempt(target, now)
                    elif self.hold.grant:
                        # Waiting out a restart delay: keep holding what the grant says now, no more.
                        self.hold.hold(grant)
                        self.held = dict(self.hold.grant)
                case Yield(reason=reason, target=target, deadline_s=deadline):
                    assert self.attempt is not None
                    if reason.releases_gpus and not self.attempt.first_step_noted and self._not_started_training():
                        # Still starting: stop it soon rather than after the whole grace (its placement
                        # group may even wait for GPUs that are gone), but not at once: its first step may be
                        # done already and not yet reported (stopped at once, that step is lost), and a loop
                        # that has stepped checkpoints at its next step boundary. Not for a grow: a starting
                        # controller stopped so can take over 50 s to abort (the hold asked for below, the
                        # whole new grant, may hold the GPUs its worker group waits for). A grow yields at the
                        # first step instead.
                        self.attempt.starting_yield = True
                        self.attempt.starting_yield_full_deadline_s = deadline
                        deadline = starting_yield_deadline(now, deadline)
                    ray.get(self._signal.request_yield.remote(self.attempt.index, str(reason)))
                    self.attempt.yield_requested_s, self.attempt.yield_reason = now, str(reason)
                    if not self._stop.is_set():
                        # Asked for now, placed as the workers' GPUs come free: queued ahead of any replica
                        # the arbiter starts on the GPUs this yield gives up (see GpuHold).
                        self.hold.hold(grant, wait=False)
                    self.state = self.state.yielding(reason, now, deadline)
                    logger.info(
                        "job %s: %s from %s to %s; asked the loop to yield (deadline %s)",
                        self.spec.name, reason, self.state.current, target,
                        "none" if deadline is None else f"{deadline - now:.1f}s",
                    )  # fmt: skip
                    self.ledger = self.ledger.note(
                        {"t_s": now, "event": "yield_requested", "reason": str(reason), "grant": grant,
                         "step": (self.last_snapshot.get("progress") or {}).get("step"),
                         "from": asdict(self.state.current) if self.state.current else None,
                         "to": asdict(target) if target else None}
                    )  # fmt: skip
                case ForceStop(reason=reason):
                    assert self.attempt is not None
                    self._force_stop(self.attempt, reason)
                case _:
                    raise AssertionError(f"unknown decision {decision!r}")

            attempt = self.attempt
            if attempt is None:
                self._wake.wait(self.poll_interval_s)
                self._wake.clear()
                continue
            self._top_up_spares(attempt, now)
            assert attempt.thread is not None
            # Freed GPUs are reported from the snapshot this round's heartbeat took, before the wait, not
            # after it (that cost another poll interval).
            self._note_release(attempt)
            asked = attempt.yield_requested_s
            self._wake.wait(
                timeout=attempt_wait_s(self.poll_interval_s, None if asked is None else now - asked, attempt.released)
            )
            self._wake.clear()  # (before the looks below: a wake from now on is seen at the next wait)
            if attempt.thread.is_alive():
                continue
            record = self._end_attempt(attempt)
            if record.outcome == "finished":
                self.state = self.state.done()
                return True
            if record.outcome == "failed":
                failures = failures + 1 if record.last_step <= record.start_step else 1
            else:
                failures = 0
            self._not_before_s = restart_not_before(
                record.outcome, self.clock(), failures, self.failure_backoff_s, self.spec.restart_delay_s,
                attempt.yield_reason,
            )  # fmt: skip
            gave_back = record.outcome == "yielded" and self._not_before_s > float("-inf")
            self._gave_up_from = attempt.target.num_workers if gave_back else None
            if record.outcome == "failed":
                self._capacity_cache = (0.0, self._capacity_cache[1])
                if failures >= self.max_consecutive_failures:
                    raise RunnerError(
                        f"job {self.spec.name}: {failures} attempts in a row failed without progress; last error: "
                        f"{attempt.error!r}"
                    )
        return False

    def _top_up_spares(self, attempt: _Attempt, now: float) -> None:
        """Every 10 s while the attempt trains steadily (first step done, and for a restart the job's
        ``spare_workers_delay_s`` since; no yield asked; 2 s after a round that started some), tops up the
        spare workers on the nodes of its GPU type and the driver's node, from a thread (raylet RPCs must
        not delay a heartbeat)."""
        spares = self.spares
        if (
            spares is None
            or not attempt.first_step_noted
            or attempt.yield_requested_s is not None
            or not spares_due(now, self._spares_due_s, attempt.index, attempt.first_step_s, self.spec.spare_workers_delay_s)
            or (self._spares_thread is not None and self._spares_thread.is_alive())
        ):
            return
        self._spares_due_s = now + 10.0
        gpu_type = attempt.target.gpu_type

        def top_up() -> None:
            try:
                if spares.runtime_env is None:
                    spares.runtime_env = ray.get(self._signal.get_worker_runtime_env.remote(), timeout=10)
                started = spares.top_up(gpu_type, nodes_from_ray(ray.nodes()), self._driver_node_id)
            except Exception as e:  # an optimisation only: log and try again next time
                logger.warning("job %s: spare workers: %r", self.spec.name, e)
                return
            if started:
                logger.info("job %s: started %s spare workers on %s", self.spec.name, sum(started.values()), gpu_type)
                # A raylet starts one or two per request (its startup concurrency: 1 on a 1-CPU head here):
                # count again soon, so that the next batch follows the last one up, not 10 s later.
                self._spares_due_s = min(self._spares_due_s, self.clock() + 2.0)

        self._spares_thread = threading.Thread(target=top_up, name=f"spares-{self.spec.name}", daemon=True)
        self._spares_thread.start()

    # ------------------------------------------------------------------------------ attempts

    def _start_attempt(self, target: Target, now: float) -> None:
        index = self.attempt_index
        self.attempt_index += 1
        ray.get(self._signal.begin_attempt.remote(index))
        # The attempt's controller removes the hold right before its workers ask for the GPUs (_ReleaseHold).
        held_pgs = self.hold.hand_over()
        attempt = _Attempt(
            index=index, target=target, started_s=now, start_step=self.checkpoint_step, held_pgs=held_pgs
        )
        self.held = {target.gpu_type: target.num_workers}
        # Tell the arbiter at once what we now hold (acknowledges a shrink: held = the new size).
        self._heartbeat(blocking=True)
        torch_config = self._torch_config()
        backend = torch_config.backend or "auto"
        trainer = TorchTrainer(
            _train_fn(),
            train_loop_config=self._loop_config(index, target),
            torch_config=torch_config,
            scaling_config=ScalingConfig(
                num_workers=target.num_workers,
                use_gpu=True,
                resources_per_worker={"GPU": self.spec.gpus_per_worker, "CPU": self.spec.cpus_per_worker},
                label_selector={GPU_TYPE_LABEL: target.gpu_type},
            ),
            run_config=RunConfig(
                name=self.spec.name,
                storage_path=self.spec.storage_path,
                checkpoint_config=CheckpointConfig(num_to_keep=self.spec.num_checkpoints_to_keep),
                # The runner, not Ray Train, decides how to go on after a failure (maybe on fewer GPUs).
                failure_config=FailureConfig(max_failures=0),
                callbacks=[
                    _RegisterController(signal_actor_name(self.spec.name), index),
                    _ReleaseHold(self.spec.name, held_pgs),
                ],
            ),
        )

        def fit() -> None:
            try:
                attempt.result = trainer.fit()
            except BaseException as e:  # the attempt's outcome; the runner decides what follows
                attempt.error = e
            finally:
                self._wake.set()

        attempt.thread = threading.Thread(target=fit, name=f"fit-{self.spec.name}-{index}", daemon=True)
        self.attempt = attempt
        self.state = self.state.started(target, now)
        self.ledger = self.ledger.note(
            {"t_s": now, "event": "start", "attempt": index, "gpu_type": target.gpu_type,
             "num_workers": target.num_workers, "from_step": self.checkpoint_step, "backend": backend}
        )  # fmt: skip
        logger.info(
            "job %s attempt %d: %d workers on %s (backend %s) from step %d",
            self.spec.name, index, target.num_workers, target.gpu_type, backend, self.checkpoint_step,
        )  # fmt: skip
        attempt.thread.start()

    def _note_release(self, attempt: _Attempt) -> None:
        """Reports a yielding attempt's GPUs free as soon as the signal actor has freed them (the loop's
        acknowledgement), rather than when Ray Train's controller has noticed and ``fit()`` returned."""
        acked = self.last_snapshot.get("acked") or {}
        if attempt.released or acked.get("attempt") != attempt.index or "released_s" not in acked:
            return
        attempt.released = True
        self.held = dict(self.hold.grant)
        self._heartbeat(blocking=True)
        logger.info(
            "job %s attempt %d: GPUs freed at its yield (step %s), %.2f s after the request; holding %s",
            self.spec.name, attempt.index, acked.get("step"), acked["released_s"] - (attempt.yield_requested_s or 0.0),
            self.held or "nothing",
        )  # fmt: skip
        self.ledger = self.ledger.note(
            {"t_s": self.clock(), "event": "released", "attempt": attempt.index, "step": acked.get("step"),
             "held": dict(self.held)}
        )  # fmt: skip

    def _end_attempt(self, attempt: _Attempt) -> AttemptRecord:
        now = self.clock()
        for pg in attempt.held_pgs:  # the attempt may have ended before its workers started
            remove_pg(pg, self.spec.name)
        snap = ray.get(self._signal.snapshot.remote())
        self.last_snapshot = snap
        # fit() may return (its workers gone) before the runner's poll saw the release: note it first.
        self._note_release(attempt)
        progress = snap.get("progress") or {}
        last_step = max(int(progress.get("step", attempt.start_step)), attempt.start_step)
        ckpt_step = snap.get("checkpoint_step")
        ckpt_dir = snap.get("checkpoint_dir") if ckpt_step is not None else self.checkpoint_dir
        ckpt_step = attempt.start_step if ckpt_step is None else int(ckpt_step)
        finished = False
        if attempt.error is None and attempt.result is not None:
            self.last_result = attempt.result
            metrics = attempt.result.metrics or {}
            finished = bool(metrics.get("done"))
            if attempt.result.checkpoint is not None and int(metrics.get("step", ckpt_step)) > ckpt_step:
                ckpt_step = int(metrics["step"])
                ckpt_dir = attempt.result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
        if finished:
            outcome = "finished"
        elif attempt.forced:
            outcome = "forced"
        elif snap.get("acked") and snap["acked"].get("attempt") == attempt.index and (attempt.error is None or attempt.released):
            # (A released attempt's fit() reports its workers gone: the signal actor removed them.)
            outcome = "yielded"
            last_step = max(last_step, int(snap["acked"]["step"]))
        else:
            outcome = "failed"
        mine = next((h for h in snap.get("history") or [] if h.get("attempt") == attempt.index), {})
        record = AttemptRecord(
            index=attempt.index,
            gpu_type=attempt.target.gpu_type,
            num_workers=attempt.target.num_workers,
            started_s=attempt.started_s,
            ended_s=now,
            start_step=attempt.start_step,
            last_step=max(last_step, ckpt_step),
            checkpoint_step=ckpt_step,
            outcome=outcome,
            reason=attempt.force_reason or attempt.yield_reason or (repr(attempt.error) if attempt.error else None),
            yield_requested_s=attempt.yield_requested_s,
            resumed_from=mine.get("resumed_from"),
            warm_start=_warm_start(mine),
        )
        self.ledger = self.ledger.add(record)
        self.checkpoint_step, self.checkpoint_dir = ckpt_step, ckpt_dir
        self.attempt = None
        self.held = {}
        self.state = self.state.ended()
        if outcome == "yielded" and not self._stop.is_set():
            # Keep what the job was granted until its next attempt (see GpuHold), asked for before the
            # heartbeat below tells the arbiter that the rest is free.
            grant = self.view.grant.as_dict() if self.view is not None else {}
            self.hold.hold(grant)
            self.held = dict(self.hold.grant)
            if self.hold.grant:
                self.ledger = self.ledger.note({"t_s": now, "event": "hold", "grant": dict(self.hold.grant)})
        if outcome != "finished":
            # The GPUs are free (Ray Train shut the worker group down before fit() returned): say so now.
            self._heartbeat(blocking=True)
        self.ledger = self.ledger.note(
            {"t_s": now, "event": "end", "attempt": attempt.index, "outcome": outcome,
             "last_step": record.last_step, "checkpoint_step": ckpt_step, "steps_lost": record.steps_lost,
             "acked_s": (snap.get("acked") or {}).get("t_s"),
             "release_s": (now - attempt.yield_requested_s) if attempt.yield_requested_s else None}
        )  # fmt: skip
        log = logger.warning if outcome in ("failed", "forced") else logger.info
        log(
            "job %s attempt %d %s at step %d (checkpoint %d, %d steps lost)%s",
            self.spec.name, attempt.index, outcome, record.last_step, ckpt_step, record.steps_lost,
            f": {attempt.error!r}" if outcome == "failed" else "",
        )  # fmt: skip
        return record

    def _force_stop(self, attempt: _Attempt, reason: str, wait: bool = False) -> None:
        """Stops the attempt's trainer the way Ray Train's Ctrl-C does: ``TrainController.abort()``.

        The abort runs in its own thread unless ``wait``: the loop goes on heartbeating meanwhile, and the
        attempt ends when ``fit()`` returns, as any other. A controller still starting its worker group takes
        ~20 s to abort here; a loop blocked that long sends no heartbeat, and the arbiter lets the job's
        registration expire (``registration_ttl_s``) and drops its grant.
        """
        if attempt.forced:
            return
        logger.warning("job %s attempt %d: stopping by force: %s", self.spec.name, attempt.index, reason)
        attempt.forced, attempt.force_reason = True, reason
        self.ledger = self.ledger.note({"t_s": self.clock(), "event": "force_stop", "attempt": attempt.index, "reason": reason})
        aborter = threading.Thread(
            target=self._abort_controller, args=(attempt.index,), name=f"abort-{self.spec.name}-{attempt.index}",
            daemon=True,
        )  # fmt: skip
        aborter.start()
        if wait:
            aborter.join()

    def _abort_controller(self, index: int) -> None:
        try:
            controller = None
            deadline = time.monotonic() + 10.0
            while controller is None and time.monotonic() < deadline:
                controller = ray.get(self._signal.get_controller.remote(index))
                if controller is None:
                    time.sleep(0.1)  # the controller registers itself as it starts
            if controller is None:
                logger.error("job %s attempt %d: no controller handle to abort", self.spec.name, index)
                return
            ray.get(controller.abort.remote(), timeout=60)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            # abort() ends the controller actor, so its own call reports the actor gone: expected.
            logger.debug("controller abort returned %r", e)
        except Exception:  # a failure in this thread must not go unseen (nothing retries the abort)
            logger.exception("job %s attempt %d: aborting the controller failed", self.spec.name, index)

    # ------------------------------------------------------------------------------- helpers

    def _watch_grant(self, watch: Callable[..., GrantView]) -> None:
        """Keeps a ``watch_grant`` call on the arbiter and wakes the loop the moment the grant changes.

        The loop heartbeats every ``poll_interval_s`` and reads each reply a round later, so by heartbeats
        alone a shrink reaches it 0.25-0.5 s after the arbiter decides it: a third of the reclaim on this
        machine. The watched view becomes the client's newest, which the loop's next heartbeat returns.
        """
        known = self.view.grant.as_dict() if self.view is not None else {}
        failures = 0
        while not self._stop.is_set():
            try:
                view = watch(self.spec.name, known, timeout_s=GRANT_WATCH_S)
                failures = 0
            except Exception as e:  # the arbiter restarting or gone: heartbeats carry on; try again soon
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    logger.warning("job %s: grant watch failed (%d in a row): %r", self.spec.name, failures, e)
                self._stop.wait(min(5.0, 0.5 * failures))
                continue
            if view.grant.as_dict() != known or not view.registered:
                known = view.grant.as_dict()
                self._wake.set()
            if not view.registered:
                # The loop registers again at its next heartbeat; until then a watch would return at once.
                self._stop.wait(self.poll_interval_s)

    def _heartbeat(self, blocking: bool = False) -> None:
        snap = self.last_snapshot
        if self.attempt is not None:
            try:
                snap = ray.get(self._signal.snapshot.remote(), timeout=5)
                self.last_snapshot = snap
            except ray.exceptions.GetTimeoutError:
                pass
        since_ckpt = None
        if snap.get("checkpoint_s"):
            since_ckpt = max(0.0, self.clock() - snap["checkpoint_s"])
        if (
            self.attempt is not None
            and not self.attempt.first_step_noted
            and snap.get("attempt") == self.attempt.index
            and snap.get("first_report_s")
        ):
            self.attempt.first_step_noted = True
            self.attempt.first_step_s = self.clock()
            restored = restore_yield_grace(self.state, self.attempt)
            if restored is not self.state:
                self.state = restored
                logger.info("job %s attempt %d: training; its yield gets its whole grace", self.spec.name, self.attempt.index)
            resumed_from = next(
                (h.get("resumed_from") for h in snap.get("history") or [] if h.get("attempt") == self.attempt.index), None
            )
            if resumed_from is not None and self.ledger.attempts and self.ledger.attempts[-1].checkpoint_step != resumed_from:
                logger.warning(
                    "job %s attempt %d resumed from step %d, not %d: the last attempt's record now says so",
                    self.spec.name, self.attempt.index, resumed_from, self.ledger.attempts[-1].checkpoint_step,
                )  # fmt: skip
                self.ledger = self.ledger.resumed(int(resumed_from))
            self.ledger = self.ledger.note(
                {"t_s": snap["first_report_s"], "event": "first_step", "attempt": self.attempt.index,
                 "step": (snap.get("progress") or {}).get("step"),
                 "startup_s": snap["first_report_s"] - self.attempt.started_s}
            )  # fmt: skip
        kwargs = dict(
            demand_units=self.spec.max_workers,
            held=dict(self.held),
            progress=self._progress(snap),
            seconds_since_checkpoint=since_ckpt,
        )
        if blocking:
            view = self.grants.heartbeat(self.spec.name, **kwargs)
        else:
            view = self.grants.heartbeat_nowait(self.spec.name, **kwargs)
        if view is None:
            return
        if not view.registered:
            logger.warning("job %s not registered at the arbiter (%s); registering again", self.spec.name, view.reason)
            # With what it holds: the arbiter must not grant its GPUs to another holder meanwhile.
            view = self.grants.register(self.spec.to_training_job_spec(), self._meta(), held=dict(self.held))
        self.view = view

    def _progress(self, snap: Mapping[str, Any]) -> dict[str, Any]:
        p = snap.get("progress") or {}
        current = self.state.current
        return {
            "phase": str(self.state.phase),
            "step": p.get("step", self.checkpoint_step),
            "total_steps": p.get("total_steps"),
            "loss": p.get("loss"),
            "samples_per_s": p.get("samples_per_s") if self.state.phase is not Phase.WAITING else 0.0,
            "num_workers": current.num_workers if current else 0,
            "gpu_type": current.gpu_type if current else None,
            "restarts": max(0, self.attempt_index - 1),
            "steps_lost": self.ledger.steps_lost,
            "last_checkpoint_step": snap.get("checkpoint_step"),
            # Spare workers (tidal.training.spares): idle and wanted on the current type's nodes, at the last count.
            "spares_idle": self.spares.idle if self.spares is not None else 0,
            "spares_wanted": self.spares.wanted if self.spares is not None else 0,
        }

    def _capacity(self) -> Mapping[str, float]:
        t, cap = self._capacity_cache
        if time.monotonic() - t > 1.0:
            try:
                cap = dict(self.capacity())
                self._capacity_cache = (time.monotonic(), cap)
            except Exception as e:  # a slow GCS: keep the last good view
                logger.warning("could not read the GPU inventory: %s", e)
        return cap

    def _not_started_training(self) -> bool:
        try:
            snap = ray.get(self._signal.snapshot.remote(), timeout=5)
        except ray.exceptions.GetTimeoutError:
            return False
        return not snap.get("first_report_s")

    def _torch_config(self) -> TorchConfig:
        if self.spec.backend == "auto":
            return AutoTorchConfig()
        return TorchConfig(backend=self.spec.backend)

    def _loop_config(self, index: int, target: Target) -> dict[str, Any]:
        return {
            "spec": self.spec.model_dump(mode="json", by_alias=True),
            "attempt": index,
            "gpu_type": target.gpu_type,
            "restarts": len(self.ledger.attempts),
            "steps_lost": self.ledger.steps_lost,
            "signal_name": signal_actor_name(self.spec.name),
            "namespace": NAMESPACE,
            "resume": {"step": self.checkpoint_step, "dir": self.checkpoint_dir} if self.checkpoint_dir else None,
        }

    def _meta(self) -> dict[str, Any]:
        job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
        return {
            "runner": "tidal.training.run",
            "ray_job_id": ray.get_runtime_context().get_job_id(),
            "ray_job_submission_id": (job_config.get("metadata") or {}).get("job_submission_id"),
            # Not `submission_id`: stopping the Ray job would end this runner, and the job would never resume.
            # A forced stop goes to the trainer: the runner does it itself at its deadline, and an arbiter
            # backend can do it by calling `force_stop` on the signal actor.
            "stop_actor": signal_actor_name(self.spec.name),
            "stop_actor_namespace": NAMESPACE,
            "stop_method": "force_stop",
            "storage_path": self.spec.storage_path,
        }

    # ------------------------------------------------------------------------------- the end

    def _finish(self, finished: bool) -> RunSummary:
        history: list[list[float]] = []
        metrics: dict[str, Any] = {}
        export_path = None
        ckpt_path = None
        result = self.last_result
        if result is not None and result.checkpoint is not None:
            ckpt_path = result.checkpoint.path
            with result.checkpoint.as_directory() as d:
                history, metrics, export_path = _export(self.spec, Path(d), finished)
        expected = dict(self.spec.expected_metrics)
        reached = None
        if finished and expected:
            reached = all(metric_reached(k, metrics.get(k), v) for k, v in expected.items())
        summary = RunSummary(
            name=self.spec.name,
            finished=finished,
            final_step=int(history[-1][0]) if history else self.checkpoint_step,
            total_steps=(self.last_snapshot.get("progress") or {}).get("total_steps"),
            restarts=self.ledger.restarts,
            steps_lost=self.ledger.steps_lost,
            attempts=[{**asdict(a), "steps_lost": a.steps_lost} for a in self.ledger.attempts],
            resizes=[dict(e) for e in self.ledger.events],
            history=history,
            metrics=metrics,
            expected_metrics=expected,
            reached_expected=reached,
            export_path=export_path,
            checkpoint_path=ckpt_path,
        )
        _write_text(f"{self.spec.storage_path.rstrip('/')}/{self.spec.name}/tidal/{SUMMARY_FILE}", json.dumps(asdict(summary), indent=1))
        return summary


def _warm_start(history: Mapping[str, Any]) -> bool | None:
    """Whether the attempt's rank 0 ran in a process started before the attempt began (a spare worker);
    None when unknown (it never trained, or the platform has no process start times)."""
    started, begun = history.get("process_started_s"), history.get("begun_s")
    if started is None or begun is None:
        return None
    return bool(started < begun)


def metric_reached(name: str, value: Any, threshold: float) -> bool:
    """A metric named ``*loss`` must be at most its threshold, any other at least: test_loss 1.9 <= 2.0."""
    if value is None:
        return False
    return float(value) <= threshold if name.endswith("loss") else float(value) >= threshold


def _train_fn() -> Callable[[dict[str, Any]], None]:
    # Imported here so that the driver does not need the loop's imports until it starts a trainer.
    from tidal.training.loop import train_loop_per_worker

    return train_loop_per_worker


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


class _AutoTorchBackend(_TorchBackend):
    """Ray Train's torch backend, with the process-group backend chosen on the workers themselves:
    NCCL where rank 0 sees CUDA, gloo where it does not (logical GPUs, as on this machine).

    The driver cannot tell (it may run on a node without GPUs), and asking a separate task would start a
    process and import torch once more per resize.
    """

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        cuda = bool(worker_group.execute_single(0, _cuda_available))
        chosen = dataclasses.replace(backend_config, backend="nccl" if cuda else "gloo")
        logger.info("workers %s CUDA: torch.distributed backend %s", "see" if cuda else "do not see", chosen.backend)
        super().on_start(worker_group, chosen)


@dataclasses.dataclass
class AutoTorchConfig(TorchConfig):
    """``TorchConfig`` with ``backend`` left to the workers: NCCL on CUDA, gloo on CPU."""

    @property
    def backend_cls(self) -> type:
        return _AutoTorchBackend


def _export(spec: JobSpec, ckpt_dir: Path, finished: bool) -> tuple[list[list[float]], dict[str, Any], str | None]:
    """Loads the final checkpoint and, if the run finished, writes the model for serving."""
    import torch
    from tidal.training.loop import META_FILE, STATE_FILE, build_model

    state = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=True)
    meta = json.loads((ckpt_dir / META_FILE).read_text())
    history = [list(h) for h in state["history"]]
    metrics = dict(meta.get("metrics") or {})
    if not finished:
        return history, metrics, None
    from tidal.serving.manifest import write_model_checkpoint

    model = build_model(spec)
    model.load_state_dict(state["model"])
    target = spec.resolved_export_path()
    local = target
    if "://" in target:
        local = tempfile.mkdtemp(prefix="tidal-tr-export-")
        local = os.path.join(local, "model")
    write_model_checkpoint(
        model,
        local,
        model_class=spec.model.class_path,
        model_kwargs=dict(spec.model.kwargs),
        version=f"{spec.name}-step{state['step']}",
        input_shape=meta["input_shape"],
        labels=meta.get("labels"),
        metrics={k: v for k, v in metrics.items() if k in ("step", "loss", "test_loss", "test_accuracy", "epoch")},
    )
    if local != target:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(target)
        pyarrow.fs.copy_files(local, path, destination_filesystem=fs)
    logger.info("job %s: exported the final model (step %d) to %s", spec.name, state["step"], target)
    return history, metrics, target


def _write_text(uri_or_path: str, text: str) -> None:
    if "://" in uri_or_path:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(uri_or_path)
        fs.create_dir(os.path.dirname(path), recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
        return
    p = Path(uri_or_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(p)


def install_sigterm_handler(runner: ElasticRunner) -> None:
    """``ray job stop`` sends SIGTERM to the driver: stop the trainer and unregister before exiting."""

    def handler(signum: int, frame: Any) -> None:
        logger.warning("job %s: signal %d, stopping", runner.spec.name, signum)
        runner.stop()

    signal_module.signal(signal_module.SIGTERM, handler)


class CapacityGrantSource:
    """A grant source for running without an arbiter (``--standalone``): it grants every GPU of the
    job's most preferred type that has at least ``min_workers`` worth, up to ``max_workers``.

    It never shrinks a job; it is for trying a job on a cluster that runs nothing else.
    """

    def __init__(self, capacity: Callable[[], Mapping[str, float]] = gpu_capacity) -> None:
        self.capacity = capacity
        self.specs: dict[str, TrainingJobSpec] = {}

    def _view(self, name: str) -> GrantView:
        from tidal.cluster.model import Allocation

        spec = self.specs.get(name)
        if spec is None:
            return GrantView(name, Allocation(), registered=False, reason="not registered")
        cap = self.capacity()
        for t in spec.gpu_types:
            n = min(spec.max_workers, int(cap.get(t, 0.0) / spec.gpus_per_worker + 1e-9))
            if n >= spec.min_workers:
                return GrantView(name, Allocation.of({t: n}))
        return GrantView(name, Allocation(), reason=f"no accepted GPU type has {spec.min_workers} workers' worth")

    def register(
        self, spec: TrainingJobSpec, meta: Mapping[str, Any] | None = None, *, held: Mapping[str, int] | None = None
    ) -> GrantView:
        self.specs[spec.name] = spec
        return self._view(spec.name)

    def heartbeat_nowait(self, name: str, **kwargs: Any) -> GrantView | None:
        return self._view(name)

    def heartbeat(self, name: str, **kwargs: Any) -> GrantView:
        return self._view(name)

    def unregister(self, name: str) -> bool:
        return self.specs.pop(name, None) is not None
