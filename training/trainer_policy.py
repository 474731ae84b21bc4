"""Tidal's sizing inside Ray Train v2's own controller: ``TidalScalingPolicy`` and ``TidalFailurePolicy``.

One controller runs the job for its whole life; each grant change restarts only the worker group. What to
do is decided by the pure ``tidal.training.elastic.decide``; this module observes (the arbiter's grant, the
workers' reports, the ranks' parks) and answers Ray Train's controller with its own decisions:

- **start** (no worker group: at start-up, after a release, after a failure): ``ResizeDecision(n)`` once
  the grant allows ``min_workers`` on an accepted type, ``NoopDecision`` until then (the controller stays
  up, holding nothing);
- **shrink, grow, move to another type**: the yield flag is set (``TrainerSignal``); every rank's
  ``should_yield()`` turns True at the same step boundary, the loop reports a checkpoint and returns, and
  the wrapper parks the rank. Once every rank has parked and the controller has collected each rank's last
  report (its checkpoint), or the grace has run out (a forced stop: the steps since the last reported
  checkpoint are lost), the policy returns ``ResizeDecision(new size)``: the controller shuts the old
  worker group down and starts the new one, whose label selector names the granted type
  (``on_controller_start_worker_group``). The GPUs given back are reported free to the arbiter right then,
  with the old group gone;
- **grant 0** (or below ``min_workers``): the same yield, then the worker group's placement group is removed
  (its GPUs are free at once) and the workers' deaths are a release, not a failure: ``TidalFailurePolicy``
  answers RETRY without counting it, and the controller waits in its restarting state for the next grant.

With no arbiter reachable at start-up the policy says so in the controller's log and behaves as Ray Train
would without it: a fixed group of ``max_workers``, the user's own label selector, never a yield.

Ray Train internals used here (no public API exists for them; ``tests/unit/test_train_v2_contract.py`` pins
each one against the installed Ray):
- ``ScalingPolicy`` (``make_decision_for_non_running_worker_group``, ``make_decision_for_running_worker_group``,
  ``_get_num_workers_for_resource_request``), ``NoopDecision``, ``ResizeDecision(num_workers,
  resources_per_worker)``, and the controller states that call them;
- ``ControllerCallback.on_controller_start_worker_group(scaling_config=, num_workers=)`` returning the label
  selector of the group about to start, called after the old group is shut down;
- ``WorkerGroupState.placement_group_handle.placement_group``, ``WorkerGroupPollStatus.worker_statuses[rank]
  .training_report`` (``metrics``, ``checkpoint``): one report per rank per poll;
- ``FailurePolicy.make_decision`` / ``FailureDecision`` / ``create_failure_policy``;
- ``TrainRunContext.run_id`` and ``run_config.storage_context`` (``storage_filesystem``, ``experiment_fs_path``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.train.v2._internal.execution.failure_handling import (
    FailureDecision,
    FailurePolicy,
    create_failure_policy,
)
from ray.train.v2._internal.execution.scaling_policy import (
    NoopDecision,
    ResizeDecision,
    ScalingDecision,
    ScalingPolicy,
)
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tidal.cluster.client import ArbiterClient
from tidal.cluster.model import GPU_TYPE_LABEL, GrantView, TrainingJobSpec
from tidal.training.elastic import (
    ElasticConfig,
    ElasticState,
    ForceStop,
    Keep,
    Phase,
    Start,
    Target,
    Wait,
    Yield,
    YieldReason,
    choose_target,
    decide,
)
from tidal.training.spares import SpareWorkers
from tidal.training.trainer_config import TidalConfig
from tidal.training.trainer_signal import NAMESPACE, TrainerSignal, signal_name

logger = logging.getLogger(__name__)

SUMMARY_FILE = "tidal_summary.json"
# While no worker group runs, Ray Train's controller asks for a decision in a loop with no sleep of its own:
# each ask waits this long for a grant change (the watch thread wakes it at once).
IDLE_WAIT_S = 0.25
HEARTBEAT_PERIOD_S = 1.0
SIGNAL_START_TIMEOUT_S = 300.0
SIGNAL_TIMEOUT_S = 10.0
FAILURE_BACKOFF_S = 3.0  # before a worker group starts again after a failure, per failure in a row (up to 5)
CAPACITY_CACHE_S = 1.0



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


# The policies of the runs whose controller lives in this process, by run token: the failure policy (a
# separate object, serialized apart from the scaling policy) finds its run's scaling policy here.
_POLICIES: dict[str, TidalScalingPolicy] = {}


@dataclass(frozen=True, slots=True)
class TidalJob:
    """What the policy needs about its job (built by ``TidalTrainer`` from its configs)."""

    name: str
    token: str
    min_workers: int
    max_workers: int
    gpus_per_worker: float
    config: TidalConfig
    submission_id: str | None = None  # the Ray job's submission id, when `ray job submit` started the driver

    def spec(self) -> TrainingJobSpec:
        c = self.config
        return TrainingJobSpec(
            self.name,
            self.gpus_per_worker,
            self.min_workers,
            self.max_workers,
            tuple(c.gpu_types),
            priority=c.priority,
            preemptible=c.preemptible,
            weight=c.weight,
            yield_grace_s=c.yield_grace_s,
        )

    def elastic(self) -> ElasticConfig:
        c = self.config
        return ElasticConfig(
            gpu_types=tuple(c.gpu_types),
            min_workers=self.min_workers,
            max_workers=self.max_workers,
            gpus_per_worker=self.gpus_per_worker,
            yield_grace_s=c.yield_grace_s,
            resize_min_interval_s=c.resize_min_interval_s,
        )


@dataclass
class _Ledger:
    """What the run did, for its summary file, the heartbeat's progress and the benchmarks."""

    groups: list[dict[str, Any]] = field(default_factory=list)
    resizes: list[dict[str, Any]] = field(default_factory=list)
    steps_lost: int = 0
    forced_stops: int = 0
    releases: int = 0


class TidalScalingPolicy(ScalingPolicy):
    """Ray Train's scaling policy, sized by the arbiter. See the module docstring."""

    def __init__(self, scaling_config: Any, job: TidalJob) -> None:
        super().__init__(scaling_config)
        self.job = job
        self._cfg = job.elastic()
        self._resources = dict(scaling_config._resources_per_worker_not_none)
        self._state = ElasticState()
        self._standalone = False
        self._generation = -1
        self._next: Target | None = None  # where the next worker group starts
        self._current: Target | None = None
        self._ledger = _Ledger()
        self._reports_seen: dict[int, int] = {}
        self._last_step: int | None = None
        self._checkpoint_step: int | None = None
        self._checkpoint_s: float | None = None
        self._resumed_from: int | None = None  # the checkpoint step the running group started from
        self._group_reported = False  # the controller has collected a report of the running group (it trains)
        # Worker-seconds held (a group exists) and spent training (it reports and is not yielding): goodput.
        self._failures = 0  # worker groups failed in a row (none has reported since)
        self._not_before_s = float("-inf")
        self._held_ws = 0.0
        self._train_ws = 0.0
        self._counted_s: float | None = None
        self._expect_release_failure = False
        self._wait_logged: str | None = None
        self._capacity: tuple[float, dict[str, float]] | None = None
        # Made in the controller (after_controller_start): threads, actor handles and clients do not pickle.
        self._client: ArbiterClient | None = None
        self._link_cv: threading.Condition | None = None
        self._view: GrantView | None = None
        self._report: dict[str, Any] | None = None
        self._report_seq = 0
        self._answered_seq = 0
        self._signal: Any = None
        self._wake: threading.Event | None = None
        self._stop: threading.Event | None = None
        self._controller: dict[str, Any] = {}
        self._storage: Any = None
        self._spares: SpareWorkers | None = None
        self._spares_due_s = 0.0
        self._spares_thread: threading.Thread | None = None

    # ------------------------------------------------------------------------ controller callbacks

    def after_controller_start(self, train_run_context: Any) -> None:
        _POLICIES[self.job.token] = self
        self._wake, self._stop = threading.Event(), threading.Event()
        context = ray.get_runtime_context()
        self._storage = train_run_context.run_config.storage_context
        self._controller = {
            "actor_id": context.get_actor_id(),
            "run_id": train_run_context.run_id,
            "pid": os.getpid(),
            "node_id": context.get_node_id(),
        }
        self._signal = TrainerSignal.options(  # type: ignore[attr-defined]
            name=signal_name(self.job.token),
            namespace=NAMESPACE,
            get_if_exists=True,
            # On the controller's node (the driver's), so that it lives as long as the controller: placed on a
            # GPU node, it would die with that node and take the run with it.
            scheduling_strategy=NodeAffinitySchedulingStrategy(context.get_node_id(), soft=False),
        ).remote(self.job.name)
        self._signal.set_controller.remote(self._controller)
        if self.job.config.standalone:
            self._standalone = True
            logger.info(
                "job %s: standalone: %d workers on %s, never resized",
                self.job.name, self.job.max_workers, self.job.config.gpu_types[0],
            )  # fmt: skip
            return
        client = ArbiterClient(name=self.job.config.arbiter_name)
        try:
            view = client.register(
                self.job.spec(),
                # ray_job_id: the driver's job; the arbiter expires the registration once it ends (a killed
                # driver takes this controller with it), without waiting out the TTL.
                meta={
                    "trainer": "TidalTrainer",
                    "controller": self._controller,
                    "ray_job_id": context.get_job_id(),
                    # The arbiter's forced stop: this run's signal actor first (the policy stops the group and
                    # the job resumes from its checkpoint), the whole Ray job if that is not confirmed in time.
                    "stop_actor": signal_name(self.job.token),
                    "stop_actor_namespace": NAMESPACE,
                    "stop_method": "force_stop",
                    "ray_job_submission_id": self.job.submission_id,
                },
                timeout_s=self.job.config.register_timeout_s,
            )
        except Exception as e:  # no arbiter, or none that answers: the job still runs, as Ray Train alone
            self._standalone = True
            logger.warning(
                "job %s: no arbiter %r reachable (%s): running as plain Ray Train at max_workers=%d, "
                "never resized by Tidal",
                self.job.name, self.job.config.arbiter_name, e, self.job.max_workers,
            )  # fmt: skip
            return
        self._client = client
        self._link_cv = threading.Condition()
        self._view = view
        threading.Thread(target=self._link, daemon=True, name=f"tidal-link-{self.job.name}").start()
        if self.job.config.spare_workers:
            from tidal.cluster.warm_pool import RayletRpc

            self._spares = SpareWorkers(
                RayletRpc(),
                job_id=bytes.fromhex(context.get_job_id()),
                count=min(self.job.config.spare_workers, self.job.max_workers),
                gpus_per_worker=self.job.gpus_per_worker,
            )
            # Ray Train's workers inherit this actor's runtime env unchanged (tidal.training.spares).
            self._spares.runtime_env = context.get_runtime_env_string()
        logger.info("job %s registered with the arbiter; grant %s", self.job.name, view.grant.as_dict())
        threading.Thread(target=self._watch, daemon=True, name=f"tidal-watch-{self.job.name}").start()

    def on_controller_start_worker_group(
        self, *, scaling_config: Any, num_workers: int
    ) -> dict[str, str] | None:
        """The old worker group is gone and a new one of ``num_workers`` is about to ask for its placement
        group: report the GPUs it gave back, start a new generation, and name the granted GPU type."""
        if self._standalone:
            # Without an arbiter: the user's own label selector, or the first GPU type when asked to be standalone.
            return {GPU_TYPE_LABEL: self._cfg.gpu_types[0]} if self.job.config.standalone else None
        target = self._next if self._next is not None and self._next.num_workers == num_workers else None
        if target is None:  # (a start the policy did not choose, e.g. a retry Ray Train made itself)
            target = Target(self._current.gpu_type if self._current else self._cfg.gpu_types[0], num_workers)
        now = time.time()
        self._generation += 1
        # The first call may wait for the signal actor's process to start: on a host busy starting several jobs
        # that takes a while, and the group cannot run without it (its ranks ask it for the generation).
        ray.get(self._signal.begin_group.remote(self._generation, num_workers), timeout=SIGNAL_START_TIMEOUT_S)
        self._current, self._next = target, None
        self._state = ElasticState().started(target, now)
        self._reports_seen = {}
        self._resumed_from = self._checkpoint_step
        self._group_reported = False
        self._heartbeat(blocking=True)
        self._ledger.groups.append(
            {
                "generation": self._generation,
                "gpu_type": target.gpu_type,
                "num_workers": num_workers,
                "started_s": now,
            }
        )
        last = self._ledger.resizes[-1] if self._ledger.resizes else None
        if last is not None and last.get("released_s", 0) is None:
            last["released_s"] = last["group_started_s"] = now  # the old group is gone: its GPUs are free
        logger.info(
            "job %s: worker group %d starts: %d x %s",
            self.job.name,
            self._generation,
            num_workers,
            target.gpu_type,
        )
        self._write_summary()
        return {GPU_TYPE_LABEL: target.gpu_type}

    async def before_controller_shutdown(self) -> None:
        self._leave("finished")

    def before_controller_abort(self) -> None:
        self._leave("aborted")

    # ---------------------------------------------------------------------------------- decisions

    def _get_num_workers_for_resource_request(self) -> int:
        return self.job.max_workers

    def make_decision_for_non_running_worker_group(self) -> ScalingDecision:
        if self._standalone:
            return self._resize(Target(self._cfg.gpu_types[0], self.job.max_workers))
        if self._state.phase is not Phase.WAITING:
            # The group failed (a release leaves the state WAITING): a lost node takes the GCS a moment to
            # declare dead, and a start before that asks for its GPUs again and waits out Ray Train's start
            # timeout. Back off a little, more for failures in a row.
            self._state = self._state.ended()
            # Lost with the group: its steps after the last checkpoint, as far as its collected reports show.
            self._ledger.steps_lost += max(0, (self._last_step or 0) - (self._checkpoint_step or 0))
            self._last_step = self._checkpoint_step
            self._failures += 1
            self._not_before_s = time.monotonic() + FAILURE_BACKOFF_S * min(self._failures, 5)
            self._capacity = None
        self._current = None
        view = self._heartbeat()
        grant = view.grant.as_dict() if view is not None and view.registered else {}
        decision = decide(self._state, grant, time.time(), self._cfg, capacity_gpus=self._capacity_gpus())
        if isinstance(decision, Start) and time.monotonic() >= self._not_before_s:
            self._wait_logged = None
            return self._resize(decision.target)
        if isinstance(decision, Start):
            assert self._wake is not None
            self._wake.wait(IDLE_WAIT_S)
            return NoopDecision()
        if isinstance(decision, Wait):
            if decision.reason != self._wait_logged:
                logger.info("job %s: waiting for GPUs: %s", self.job.name, decision.reason)
                self._wait_logged = decision.reason
            assert self._wake is not None
            self._wake.wait(IDLE_WAIT_S)
            self._wake.clear()
            return NoopDecision()
        raise ValueError(f"unexpected decision with no worker group: {decision!r}")

    def make_decision_for_running_worker_group(
        self, worker_group_state: Any, worker_group_status: Any
    ) -> ScalingDecision:
        self._note_reports(worker_group_status)
        if self._standalone or self._state.phase is Phase.WAITING:
            return NoopDecision()  # (WAITING: the group was released; its workers' deaths come next)
        try:
            snap = ray.get(self._signal.snapshot.remote(), timeout=SIGNAL_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:  # a busy host: decide at the next poll, never fail the run over it
            logger.warning("job %s: the signal actor did not answer in %.0f s", self.job.name, SIGNAL_TIMEOUT_S)
            return NoopDecision()
        view = self._heartbeat(snap)
        if view is None or not view.registered:
            return NoopDecision()  # (registering again, with what it holds: no grant to act on yet)
        grant = view.grant.as_dict()
        release_by_s = view.release_by_s if view is not None else None
        now = time.time()
        capacity = self._capacity_gpus()
        self._note_warm_start(snap)
        if self._state.phase is Phase.RUNNING:
            decision = decide(
                self._state, grant, now, self._cfg, capacity_gpus=capacity, release_by_s=release_by_s
            )
            if isinstance(decision, Keep):
                if snap["first_step_s"] is not None:
                    self._top_up_spares()
                return NoopDecision()
            if isinstance(decision, Yield):
                return self._request_yield(decision, now, grant)
            raise ValueError(f"unexpected decision for a running worker group: {decision!r}")
        # YIELDING: resume where the newest grant says (it may have changed again meanwhile).
        target = choose_target(grant, self._cfg, capacity)
        if self._all_parked(snap):
            return self._finish_yield(target, worker_group_state, snap, forced=False)
        decision = decide(
            self._state, grant, now, self._cfg, capacity_gpus=capacity, release_by_s=release_by_s
        )
        if isinstance(decision, ForceStop):
            logger.warning("job %s: %s: stopping the worker group by force", self.job.name, decision.reason)
            return self._finish_yield(target, worker_group_state, snap, forced=True)
        if snap.get("force_requested_s") is not None:
            logger.warning("job %s: the arbiter stops the worker group by force", self.job.name)
            return self._finish_yield(target, worker_group_state, snap, forced=True)
        requested = self._state.yield_requested_s or now
        if self._state.yield_reason is YieldReason.GROW and not snap["cooperative"]:
            # A loop that never calls should_yield() would never grow: it is stopped after its grace too.
            if now - requested >= self._cfg.yield_grace_s:
                return self._finish_yield(target, worker_group_state, snap, forced=True)
        return NoopDecision()

    # ------------------------------------------------------------------------------------ actions

    def _resize(self, target: Target) -> ResizeDecision:
        self._next = target
        return ResizeDecision(num_workers=target.num_workers, resources_per_worker=dict(self._resources))

    def _request_yield(self, decision: Yield, now: float, grant: dict[str, int]) -> NoopDecision:
        try:
            ray.get(self._signal.request_yield.remote(self._generation), timeout=SIGNAL_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:  # ask again at the next poll (the grant still says so)
            logger.warning("job %s: the signal actor did not take the yield in %.0f s", self.job.name, SIGNAL_TIMEOUT_S)
            return NoopDecision()
        self._state = self._state.yielding(decision.reason, now, decision.deadline_s)
        current = self._current
        self._ledger.resizes.append(
            {
                "reason": str(decision.reason),
                "from": {"gpu_type": current.gpu_type, "num_workers": current.num_workers}
                if current
                else None,
                "to": {"gpu_type": decision.target.gpu_type, "num_workers": decision.target.num_workers}
                if decision.target
                else None,
                "requested_s": now,
                "grant": dict(grant),
            }
        )
        logger.info(
            "job %s: yield requested (%s): %s -> %s", self.job.name, decision.reason, current, decision.target
        )
        return NoopDecision()

    def _finish_yield(
        self, target: Target | None, worker_group_state: Any, snap: dict[str, Any], forced: bool
    ) -> ScalingDecision:
        """Ends the yield: resize to ``target``, or, with nothing to run on, free the GPUs now."""
        now = time.time()
        lost = 0
        if forced:
            self._ledger.forced_stops += 1
            # Counted from the reports the controller collected: steps after the last report are not seen.
            lost = max(0, (self._last_step or 0) - (self._checkpoint_step or 0))
            self._ledger.steps_lost += lost
        record = self._ledger.resizes[-1] if self._ledger.resizes else {}
        record.update(
            forced=forced,
            steps_lost=lost,
            ended_s=now,
            last_step_s=snap.get("step_s"),
            last_step=snap.get("steps"),
            resumed_on={"gpu_type": target.gpu_type, "num_workers": target.num_workers} if target else None,
        )
        if target is None:
            # Nothing to run on: remove the group's placement group (its workers end, its GPUs are free at
            # once); the controller sees the workers die, and TidalFailurePolicy retries that as a release.
            self._expect_release_failure = True
            self._ledger.releases += 1
            try:
                remove_placement_group(worker_group_state.placement_group_handle.placement_group)
            except Exception as e:  # already gone with its workers: nothing more to free
                logger.warning("job %s: placement group not removed: %r", self.job.name, e)
            self._state = ElasticState()
            self._current = None
            record["group_started_s"] = None
            record["released_s"] = time.time()
            self._heartbeat(blocking=True)
            logger.info("job %s: released its GPUs; waiting for a grant", self.job.name)
            return NoopDecision()
        record["released_s"] = None  # set when the old group is gone (the next group's start)
        return self._resize(target)

    def take_expected_release(self) -> bool:
        """True once after the policy released its worker group: the workers' deaths are not a failure."""
        expected, self._expect_release_failure = self._expect_release_failure, False
        return expected

    # ---------------------------------------------------------------------------------- observing

    def _note_reports(self, status: Any) -> None:
        """Counts each rank's reports (one per rank per poll at most) and follows the step and checkpoint."""
        for rank, worker in status.worker_statuses.items():
            report = getattr(worker, "training_report", None)
            if report is None:
                continue
            self._reports_seen[rank] = self._reports_seen.get(rank, 0) + 1
            self._group_reported = True
            self._failures = 0
            if rank != 0:
                continue
            step = _step_of(report.metrics)
            self._last_step = step if step is not None else (self._last_step or 0) + 1
            if report.checkpoint is not None:
                self._checkpoint_step, self._checkpoint_s = self._last_step, time.time()

    def _all_parked(self, snap: dict[str, Any]) -> bool:
        """Every rank has parked, and the controller has collected every report it made before (so its
        last checkpoint is registered: the next group's get_checkpoint() returns it)."""
        parks = snap["parks"]
        n = self._current.num_workers if self._current else 0
        if snap["generation"] != self._generation or len(parks) < n:
            return False
        return all(self._reports_seen.get(int(r), 0) >= int(p["reports"]) for r, p in parks.items())

    def _heartbeat(self, snap: dict[str, Any] | None = None, *, blocking: bool = False) -> GrantView | None:
        """Hands the newest report to the link thread and returns the newest grant it has heard.

        The controller's own thread never calls the arbiter: it blocks for the whole start of a worker
        group (minutes on a busy host), and a job heard from by nobody for that long expires. ``blocking``
        waits (up to 5 s) until a beat carrying this report has been answered (a release).
        """
        if self._client is None:
            return None
        current = self._current
        self._count_worker_seconds(current)
        progress: dict[str, Any] = {
            "step": self._last_step if self._last_step is not None else (snap or {}).get("steps"),
            "workers": current.num_workers if current else 0,
            "gpu_type": current.gpu_type if current else None,
            "generation": self._generation,
            "controller_actor_id": self._controller.get("actor_id"),
            "run_id": self._controller.get("run_id"),
            "resizes": len(self._ledger.resizes),
            "steps_lost": self._ledger.steps_lost,
            "phase": str(self._state.phase),
            "resumed_from": self._resumed_from,
            "checkpoint_step": self._checkpoint_step,
            "training": current is not None and self._group_reported,
            "forced_stops": self._ledger.forced_stops,
            "goodput": self._goodput(),
            # Spare worker processes for the next group (training/spares.py): idle now, out of wanted.
            "spares_idle": self._spares.idle if self._spares is not None else 0,
            "spares_wanted": self._spares.wanted if self._spares is not None else 0,
        }
        since = time.time() - self._checkpoint_s if self._checkpoint_s is not None else None
        report = dict(
            demand_units=self.job.max_workers,
            held={current.gpu_type: current.num_workers} if current is not None else {},
            progress=progress,
            seconds_since_checkpoint=since,
        )
        assert self._link_cv is not None
        with self._link_cv:
            self._report = report
            self._report_seq += 1
            seq = self._report_seq
            if blocking:
                self._link_cv.notify_all()
                self._link_cv.wait_for(lambda: self._answered_seq >= seq, timeout=5.0)
            return self._view

    def _goodput(self) -> float | None:
        """Worker-seconds spent training over worker-seconds held (None before the job held any)."""
        return round(self._train_ws / self._held_ws, 4) if self._held_ws > 0 else None

    def _count_worker_seconds(self, current: Target | None) -> None:
        """Adds the time since the last count to the worker-seconds held, and to those spent training when the
        group trains (a report of it collected, no yield under way)."""
        now = time.monotonic()
        if self._counted_s is not None and current is not None:
            dt = now - self._counted_s
            self._held_ws += dt * current.num_workers
            if self._group_reported and self._state.phase is Phase.RUNNING:
                self._train_ws += dt * current.num_workers
        self._counted_s = now

    def _set_view(self, view: GrantView) -> None:
        """Keeps the newest grant: a reply with a lower generation than the one held is older (an arbiter
        that restarts from saved state keeps counting from there)."""
        assert self._link_cv is not None
        with self._link_cv:
            old = self._view
            if old is None or not view.registered or view.generation >= old.generation:
                self._view = view
            if old is None or view.grant != old.grant:
                assert self._wake is not None
                self._wake.set()

    def _link(self) -> None:
        """The link thread: one heartbeat at a time, every ``HEARTBEAT_PERIOD_S`` or at once when asked."""
        assert self._stop is not None and self._client is not None and self._link_cv is not None
        failures = 0
        while not self._stop.is_set():
            with self._link_cv:
                report, seq = self._report, self._report_seq
            try:
                if report is not None:
                    self._set_view(self._client.heartbeat(self.job.name, timeout_s=5.0, **report))
                failures = 0
            except Exception as e:  # the arbiter restarting: keep the last grant, the next beat tries again
                failures += 1
                if failures in (1, 10):
                    logger.warning("job %s: heartbeat failed: %r", self.job.name, e)
            with self._link_cv:
                self._answered_seq = max(self._answered_seq, seq)
                self._link_cv.notify_all()
                if self._report_seq == seq:
                    self._link_cv.wait(HEARTBEAT_PERIOD_S)

    def _watch(self) -> None:
        """Holds a watch_grant call on the arbiter, so a grant change is heard (and an idle policy woken) at once."""
        assert self._stop is not None and self._client is not None and self._link_cv is not None
        failures = 0
        while not self._stop.is_set():
            with self._link_cv:
                known = self._view
            try:
                view = self._client.watch_grant(
                    self.job.name, known.grant.as_dict() if known else None, timeout_s=10.0
                )
                failures = 0
            except Exception as e:  # the arbiter restarting: heartbeats carry on; retry after a pause
                failures += 1
                if failures in (1, 10):
                    logger.warning("job %s: watch_grant failed: %r", self.job.name, e)
                self._stop.wait(1.0)
                continue
            self._set_view(view)

    def _note_warm_start(self, snap: dict[str, Any]) -> None:
        """Once every rank of the group has said hello: how many ran in processes started before the group
        (spares), in the group's ledger entry (``warm_workers``) and the log."""
        group = self._ledger.groups[-1] if self._ledger.groups else None
        started = snap.get("processes_started") or {}
        if group is None or "warm_workers" in group or len(started) < group["num_workers"] or not snap.get("first_step_s"):
            return
        group["warm_workers"] = sum(1 for s in started.values() if s is not None and s < group["started_s"])
        # Where a start's time goes: Ray Train's set-up until every rank's train function runs, then the
        # user's own (imports, model, checkpoint load) until rank 0's first step.
        group["joined_s"], group["first_step_s"] = snap.get("joined_s"), snap.get("first_step_s")
        logger.info(
            "job %s: worker group %d: %d of %d workers started warm (in spare processes)",
            self.job.name, group["generation"], group["warm_workers"], group["num_workers"],
        )  # fmt: skip

    def _top_up_spares(self) -> None:
        """Every 10 s while the group trains steadily, keeps the job's spare workers started on the nodes of
        its GPU type, from a thread (raylet calls must not hold the controller's loop)."""
        spares, current = self._spares, self._current
        now = time.monotonic()
        if spares is None or current is None or now < self._spares_due_s:
            return
        if self._spares_thread is not None and self._spares_thread.is_alive():
            return
        self._spares_due_s = now + 10.0

        def top_up() -> None:
            from tidal.cluster.warm_pool import nodes_from_ray

            try:
                started = spares.top_up(current.gpu_type, nodes_from_ray(ray.nodes()))
            except Exception as e:  # an optimisation only: try again next time
                logger.warning("job %s: spare workers: %r", self.job.name, e)
                return
            if started:
                logger.info(
                    "job %s: started %d spare workers on %s",
                    self.job.name,
                    sum(started.values()),
                    current.gpu_type,
                )
                self._spares_due_s = min(self._spares_due_s, time.monotonic() + 2.0)

        self._spares_thread = threading.Thread(
            target=top_up, daemon=True, name=f"tidal-spares-{self.job.name}"
        )
        self._spares_thread.start()

    def _capacity_gpus(self) -> dict[str, float]:
        """GPUs per type on alive nodes, re-read at most once a second (a grant can outlive a node)."""
        now = time.monotonic()
        if self._capacity is None or now - self._capacity[0] > CAPACITY_CACHE_S:
            self._capacity = (now, gpu_capacity())
        return self._capacity[1]

    # --------------------------------------------------------------------------------- the end

    def _leave(self, how: str) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._link_cv is not None:
            with self._link_cv:
                self._link_cv.notify_all()
        self._write_summary(ended=how)
        if self._client is not None:
            try:
                self._client.unregister(self.job.name)
            except Exception as e:  # its registration expires on its own
                logger.warning("job %s: unregister failed: %r", self.job.name, e)
            self._client = None
        _POLICIES.pop(self.job.token, None)

    def summary(self, ended: str | None = None) -> dict[str, Any]:
        return {
            "job": self.job.name,
            "controller": dict(self._controller),
            "standalone": self._standalone,
            "groups": list(self._ledger.groups),
            "resizes": list(self._ledger.resizes),
            "steps_lost": self._ledger.steps_lost,
            "forced_stops": self._ledger.forced_stops,
            "releases": self._ledger.releases,
            "goodput": self._goodput(),
            "last_step": self._last_step,
            "checkpoint_step": self._checkpoint_step,
            "ended": ended,
        }

    def _write_summary(self, ended: str | None = None) -> None:
        """``tidal_summary.json`` in the run's storage directory (beside Ray Train's checkpoints)."""
        storage = self._storage
        if storage is None:
            return
        try:
            fs, base = storage.storage_filesystem, storage.experiment_fs_path
            fs.create_dir(base, recursive=True)
            with fs.open_output_stream(f"{base}/{SUMMARY_FILE}") as f:
                f.write(json.dumps(self.summary(ended), indent=1, default=str).encode())
        except Exception as e:  # a summary is for people and benchmarks: never fail the run over it
            logger.warning("job %s: summary not written: %r", self.job.name, e)


class TidalFailurePolicy(FailurePolicy):
    """Ray Train's failure policy (the user's ``FailureConfig``), except that the workers' deaths after the
    scaling policy released their group are a release: RETRY, not counted against ``max_failures``."""

    def __init__(self, failure_config: Any, token: str) -> None:
        super().__init__(failure_config)
        self.token = token
        self._inner = create_failure_policy(failure_config)

    def make_decision(self, training_failed_error: Any) -> FailureDecision:
        policy = _POLICIES.get(self.token)
        if policy is not None and policy.take_expected_release():
            logger.info("job %s: worker group released for the arbiter (not a failure)", policy.job.name)
            return FailureDecision.RETRY
        return self._inner.make_decision(training_failed_error)


def _step_of(metrics: Any) -> int | None:
    if isinstance(metrics, dict):
        for key in ("step", "global_step", "training_iteration"):
            value = metrics.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return int(value)
    return None
