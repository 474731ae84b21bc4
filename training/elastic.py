"""Resize decisions of an elastic job: a pure function of the grant, the job's state and the time.

No Ray, no torch, no clock: ``TidalTrainer``'s scaling policy (``tidal.training.trainer_policy``, in Ray Train's
controller) observes the grant and the time, calls :func:`decide`, and carries out the decision. The same
function runs in unit tests with made-up grants.

A job's life, one worker group (an *attempt*) at a time::

    WAITING --Start(type, n)--> RUNNING --Yield(reason)--> YIELDING --(trainer ended)--> WAITING ...
                                    \\                            \\--ForceStop (grace ran out)--> WAITING
                                     \\--(trainer finished the run)--> DONE

Rules:
- Start when the grant allows at least ``min_workers`` on one accepted GPU type; otherwise wait, holding
  nothing.
- Shrink (grant below the current size, below the minimum, or moved to another GPU type): yield at once;
  a yield that is not done by the deadline (the job's yield grace, or the arbiter's ``release_by_s`` when
  that comes first) is followed by a forced stop.
- Grow (grant above the current size): yield too, but only once the attempt has run for
  ``resize_min_interval_s`` (a resize restarts the worker group, so they are batched); never forced, since a job that
  grows holds nothing beyond its grant.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace


class Phase(enum.StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    YIELDING = "yielding"
    DONE = "done"


class YieldReason(enum.StrEnum):
    SHRINK = "shrink"
    BELOW_MIN = "below_min"
    TYPE_CHANGE = "type_change"
    GROW = "grow"

    @property
    def releases_gpus(self) -> bool:
        """A yield that gives GPUs back (and so must finish within the grace)."""
        return self is not YieldReason.GROW


@dataclass(frozen=True, slots=True)
class Target:
    """Where the next attempt runs: ``num_workers`` workers on ``gpu_type``."""

    gpu_type: str
    num_workers: int


@dataclass(frozen=True, slots=True)
class ElasticConfig:
    """The job's sizing knobs (from its spec)."""

    gpu_types: tuple[str, ...]
    min_workers: int
    max_workers: int
    gpus_per_worker: float = 1.0
    yield_grace_s: float = 30.0
    resize_min_interval_s: float = 60.0


@dataclass(frozen=True, slots=True)
class ElasticState:
    """What the job is doing now.

    Attributes:
        phase: see :class:`Phase`.
        current: the running attempt's type and size (RUNNING/YIELDING), else None.
        attempt_started_s: when the running attempt started (for the grow interval).
        yield_reason: why the policy asked the loop to yield (YIELDING).
        yield_requested_s: when it asked.
        yield_deadline_s: when a releasing yield is stopped by force; None for a grow.
    """

    phase: Phase = Phase.WAITING
    current: Target | None = None
    attempt_started_s: float | None = None
    yield_reason: YieldReason | None = None
    yield_requested_s: float | None = None
    yield_deadline_s: float | None = None

    def started(self, target: Target, now_s: float) -> ElasticState:
        return ElasticState(Phase.RUNNING, target, now_s)

    def yielding(self, reason: YieldReason, now_s: float, deadline_s: float | None) -> ElasticState:
        return replace(
            self, phase=Phase.YIELDING, yield_reason=reason, yield_requested_s=now_s, yield_deadline_s=deadline_s
        )

    def ended(self) -> ElasticState:
        """The attempt's trainer has ended (yielded, stopped or failed): wait for the next start."""
        return ElasticState(Phase.WAITING)

    def done(self) -> ElasticState:
        return ElasticState(Phase.DONE)


# ---------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Keep:
    """Nothing to do now."""


@dataclass(frozen=True, slots=True)
class Wait:
    """No trainer runs and none can start: the grant is below the minimum."""

    reason: str


@dataclass(frozen=True, slots=True)
class Start:
    target: Target


@dataclass(frozen=True, slots=True)
class Yield:
    """Ask the loop to checkpoint and stop at its next step boundary."""

    reason: YieldReason
    target: Target | None
    deadline_s: float | None


@dataclass(frozen=True, slots=True)
class ForceStop:
    """The loop did not yield within its grace: stop the trainer by force."""

    reason: str


ElasticDecision = Keep | Wait | Start | Yield | ForceStop


def usable_units(
    gpu_type: str,
    grant: Mapping[str, int],
    cfg: ElasticConfig,
    capacity_gpus: Mapping[str, float] | None = None,
) -> int:
    """Workers the job can run on ``gpu_type``: the grant, capped by ``max_workers`` and by the GPUs that
    exist (when known; a grant can outlive a node for up to one arbiter tick).

    Example: grant {H100: 4}, max 8, capacity {H100: 2.0} at 1 GPU per worker -> 2.
    """
    n = min(int(grant.get(gpu_type, 0)), cfg.max_workers)
    if capacity_gpus is not None:
        n = min(n, int(capacity_gpus.get(gpu_type, 0.0) / cfg.gpus_per_worker + 1e-9))
    return max(0, n)


def choose_target(
    grant: Mapping[str, int],
    cfg: ElasticConfig,
    capacity_gpus: Mapping[str, float] | None = None,
) -> Target | None:
    """The type and size to run on, or None when no accepted type reaches ``min_workers``.

    A job runs on one type at a time: the accepted type with the most usable workers, ties broken by the
    job's preference order. Example: grant {A100: 2, H100: 2}, types (H100, A100) -> H100 x 2.
    """
    best: Target | None = None
    for gpu_type in cfg.gpu_types:
        n = usable_units(gpu_type, grant, cfg, capacity_gpus)
        if n >= cfg.min_workers and (best is None or n > best.num_workers):
            best = Target(gpu_type, n)
    return best


def decide(
    state: ElasticState,
    grant: Mapping[str, int],
    now_s: float,
    cfg: ElasticConfig,
    *,
    capacity_gpus: Mapping[str, float] | None = None,
    release_by_s: float | None = None,
) -> ElasticDecision:
    """The job's next move. See the module docstring for the rules.

    Args:
        state: the job's state.
        grant: the arbiter's grant, workers per GPU type.
        now_s: the time, on the same clock as ``release_by_s``.
        cfg: the job's knobs.
        capacity_gpus: GPUs per type that exist now, when known.
        release_by_s: the arbiter's deadline to give GPUs back, when it set one.
    """
    target = choose_target(grant, cfg, capacity_gpus)
    if state.phase is Phase.DONE:
        return Keep()
    if state.phase is Phase.WAITING:
        if target is None:
            return Wait(
                f"grant {dict(grant) or '{}'} allows fewer than min_workers={cfg.min_workers} on {list(cfg.gpu_types)}"
            )
        return Start(target)
    if state.phase is Phase.YIELDING:
        if state.yield_deadline_s is not None and now_s >= state.yield_deadline_s:
            return ForceStop(
                f"no yield within {now_s - (state.yield_requested_s or now_s):.1f}s of the request "
                f"({state.yield_reason})"
            )
        return Keep()
    # RUNNING
    current = state.current
    assert current is not None, "a running state has a target"
    reason: YieldReason | None = None
    if target is None:
        reason = YieldReason.BELOW_MIN
    elif usable_units(current.gpu_type, grant, cfg, capacity_gpus) < current.num_workers:
        # The grant on our type dropped: shrink (maybe onto another type with more room).
        reason = YieldReason.TYPE_CHANGE if target.gpu_type != current.gpu_type else YieldReason.SHRINK
    elif target.num_workers > current.num_workers:
        ran_s = now_s - (state.attempt_started_s if state.attempt_started_s is not None else now_s)
        if ran_s >= cfg.resize_min_interval_s:
            reason = YieldReason.GROW
    if reason is None:
        return Keep()
    deadline = None
    if reason.releases_gpus:
        deadline = now_s + cfg.yield_grace_s
        if release_by_s is not None:
            deadline = min(deadline, release_by_s)
    return Yield(reason, target, deadline)
