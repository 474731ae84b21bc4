"""The arithmetic of Tidal's Serve autoscaling hook: pure, no Ray, no torch, no wall clock.

The Ray glue (:mod:`tidal.serving.autoscale`) turns Serve's :class:`AutoscalingContext` into a
:class:`LoadObservation`, calls :func:`decide_replicas`, and hands the demand to the arbiter. Everything
that decides a number lives here so that it can be tested with plain values.

Four numbers matter per decision:

- **load replicas**: what the load needs now, Serve's own rule: ongoing plus queued requests over the
  target per replica, rounded up. 7 requests at a target of 2 -> 4 replicas.
- **demand**: the load replicas after an upscale delay (a rise counts once it has lasted
  ``upscale_delay_s``) and a downscale hold (the load must stay low for ``downscale_delay_s`` before demand
  drops), clamped to ``[min, max]``: the arbiter does not move GPUs on a blip or a lull. This is what the
  arbiter hears (or the reserve, while that is higher).
- **reserve**: when a rise of the demand is accepted, the arbiter is asked for ``surge_reserve_fraction``
  of that rise again (rounded down), ahead of the load (a step in the traffic reaches Serve's averaged
  metric as a ramp over its look-back, so the first rise is rarely the last): the GPUs for the rest of the
  ramp are freed in the same reclaim, not in one reclaim per step. Serve does not run them until the load
  asks; the reserve lapses ``downscale_delay_s`` after the rise that set it.
  A surge (a load ``early_reclaim_min_rise`` or more replicas above the demand) asks for its rise and
  reserve at once, while its upscale delay still runs: the reclaim overlaps the delay.
- **regrow guard**: for ``regrow_guard_s`` after the demand last fell (a spike's end), a rise of the load
  whose replicas' p99 still meets the SLO is not heard: the GPUs training grew back into stay with training
  unless the service actually misses its SLO.
- **replicas**: what Serve is told to run: the demand, capped at the grant (see :func:`decide_replicas`).
  With no arbiter reachable (``grant_units is None``) it is the demand alone: Serve's default behaviour
  within ``[min, max]``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class DeploymentSnapshot:
    """What Serve's controller says of one deployment, read off the policy's control loop.

    Attributes:
        gpus_per_replica: GPUs one replica takes (``ray_actor_options.num_gpus``, or its placement group's).
        pinned_gpu_types: the GPU types its label selector and fallbacks allow, in order (empty: any node).
        replica_gpu_types: replica id -> the ``ray.io/accelerator-type`` of its node (None: a node without
            the label); a replica not placed on a node yet is absent.
    """

    gpus_per_replica: float
    pinned_gpu_types: tuple[str, ...]
    replica_gpu_types: Mapping[str, str | None]


@dataclass(frozen=True, slots=True)
class LoadObservation:
    """What Serve reports at one control-loop tick.

    Attributes:
        now_s: the tick's time in seconds (any monotone clock; only differences are used).
        total_requests: ongoing plus queued requests over all replicas and handles (may be fractional:
            Serve averages over its look-back window).
        current_replicas: replicas running now.
        p99_ms: the highest p99 latency the running replicas report (None: none reports one).
    """

    now_s: float
    total_requests: float
    current_replicas: int
    p99_ms: float | None = None


@dataclass(frozen=True, slots=True)
class ScalingBounds:
    """The knobs of one service's scaling (validated at the boundary, in :mod:`tidal.serving.config`)."""

    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float
    downscale_delay_s: float = 30.0
    upscale_delay_s: float = 0.0
    surge_reserve_fraction: float = 0.0
    early_reclaim_min_rise: int = 0
    ramp_window_s: float = 0.0
    regrow_guard_s: float = 0.0
    slo_p99_ms: float | None = None

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                f"got min_replicas={self.min_replicas}, max_replicas={self.max_replicas}"
            )
        if self.target_ongoing_requests <= 0:
            raise ValueError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
        if self.downscale_delay_s < 0:
            raise ValueError(f"downscale_delay_s must be >= 0, got {self.downscale_delay_s}")
        if self.upscale_delay_s < 0:
            raise ValueError(f"upscale_delay_s must be >= 0, got {self.upscale_delay_s}")
        if self.surge_reserve_fraction < 0:
            raise ValueError(f"surge_reserve_fraction must be >= 0, got {self.surge_reserve_fraction}")
        if self.ramp_window_s < 0:
            raise ValueError(f"ramp_window_s must be >= 0, got {self.ramp_window_s}")
        if self.early_reclaim_min_rise < 0:
            raise ValueError(f"early_reclaim_min_rise must be >= 0, got {self.early_reclaim_min_rise}")
        if self.regrow_guard_s < 0:
            raise ValueError(f"regrow_guard_s must be >= 0, got {self.regrow_guard_s}")


@dataclass(frozen=True, slots=True)
class HoldState:
    """Carried between ticks: the demand in force and since when the load has wanted less.

    ``lower_since_s`` is None while the load wants at least ``demand``; ``peak_lower`` is the highest
    load seen since the load started wanting less (demand drops to it, not to the last sample).
    ``above_since_s`` is when the load rose above ``demand`` (None while it is not above): the upscale delay.
    ``reserve`` is what the arbiter is asked for ahead of a rise (0: none), set at ``reserve_since_s``;
    ``reserve_early`` while it was set by a surge still in its upscale delay (not yet accepted).
    ``ramp_base`` is the demand before the ramp that the last rise (at ``ramp_at_s``) belongs to.
    ``fell_at_s`` is when the demand (within min and max) last fell (None: it never has): the regrow guard runs
    from it.
    """

    demand: int = 0
    lower_since_s: float | None = None
    peak_lower: int = 0
    above_since_s: float | None = None
    reserve: int = 0
    reserve_since_s: float = 0.0
    reserve_early: bool = False
    ramp_base: int = 0
    ramp_at_s: float | None = None
    fell_at_s: float | None = None


@dataclass(frozen=True, slots=True)
class ScalingDecision:
    """One tick's output.

    Attributes:
        load_replicas: what the load alone needs now (before hold and bounds).
        demand_units: what to report to the arbiter: the held demand, or the reserve while it is higher
            (within ``[min, max]``).
        num_replicas: what Serve should run (the held demand, not the reserve, capped at the grant when
            there is one).
        capped_by_grant: the grant, not the load, set ``num_replicas``.
        state: the :class:`HoldState` for the next tick.
    """

    load_replicas: int
    demand_units: int
    num_replicas: int
    capped_by_grant: bool
    state: HoldState


def clamp(n: int, lo: int, hi: int) -> int:
    """``n`` bounded to ``[lo, hi]``."""
    return max(lo, min(hi, n))


def replicas_for_load(total_requests: float, target_ongoing_requests: float) -> int:
    """Replicas the load needs: ``ceil(total / target)``.

    Examples: 7 requests at target 2 -> 4; 0 requests -> 0; 0.01 requests -> 1 (any load needs a replica).
    A tiny tolerance keeps float noise from adding a replica: 6.0000000001 / 2 -> 3.
    """
    if total_requests <= 0:
        return 0
    return max(1, math.ceil(total_requests / target_ongoing_requests - 1e-9))


def hold_demand(load_replicas: int, state: HoldState, now_s: float, downscale_delay_s: float) -> HoldState:
    """Raise demand at once; lower it only after the load wanted less for ``downscale_delay_s``.

    Example with a 30 s delay and demand 4: load wants 2 at t=0, 3 at t=10, 1 at t=20 -> demand stays 4;
    at t=30 it drops to 3 (the highest the load wanted during the window), and the window restarts.
    """
    if load_replicas >= state.demand:
        return HoldState(demand=load_replicas)
    if state.lower_since_s is None:
        state = HoldState(demand=state.demand, lower_since_s=now_s, peak_lower=load_replicas)
    else:
        state = replace(state, peak_lower=max(state.peak_lower, load_replicas))
    if now_s - state.lower_since_s >= downscale_delay_s:
        return HoldState(demand=state.peak_lower)
    return state


def decide_replicas(
    obs: LoadObservation,
    bounds: ScalingBounds,
    state: HoldState,
    grant_units: int | None,
) -> ScalingDecision:
    """One tick of the hook: demand for the arbiter, and replicas for Serve.

    Args:
        obs: Serve's metrics now.
        bounds: min/max replicas, target requests per replica, downscale hold, upscale delay.
        state: carried from the previous tick (``HoldState()`` at first).
        grant_units: replicas the arbiter grants (all GPU types together); None when no arbiter is
            reachable, which means: scale on load alone, within ``[min, max]``.

    Returns:
        The decision. ``num_replicas`` never exceeds ``grant_units`` unless ``min_replicas`` does (Serve
        enforces its minimum whatever a policy says; the arbiter grants minimums first).

    The upscale delay is Serve's rule, applied here to the load: a load above the demand in force counts only
    once it has stayed above for ``upscale_delay_s``; a load that falls back before that restarts the delay.
    Then the arbiter hears the new demand and Serve runs it (as soon as the grant allows: the deployment runs
    with Serve's own delay at 0, ``tidal.serving.config.autoscaling_config_for``, so replicas granted after a
    reclaim start at once, not ``upscale_delay_s`` after the grant). A blip of the load (one sample of
    Serve's metrics, e.g. while a restarting trainer takes the CPU) must not reach the arbiter: held there for
    the downscale delay, it takes GPUs from training at the base load after every spike, and the restarts
    that follow make the next blip.

    The reserve (``surge_reserve_fraction`` > 0): a rise from ``d0`` to ``d1`` asks the arbiter for
    ``d1 + floor((d1 - d0) * fraction)``. In the spike benchmark the traffic's step reaches the hook as 1, then
    3, then 4 replicas' worth (Serve averages over a 2 s look-back); without the reserve each step is a
    reclaim of its own, each waiting for a training step boundary and a checkpoint (1.2-1.5 s apart here).
    With fraction 0.5 the first step asks for 4: one reclaim. Rounded down, so that a rise of one replica
    asks for nothing more: with ceil and fraction 1, the base load's rises from 1 to 2 replicas after a
    spike (the jobs' restarts slow the replicas) would ask for 3 and take a GPU from training for nothing.

    The early reclaim (``early_reclaim_min_rise`` > 0): a load at least that many replicas above the demand
    in force asks the arbiter for the rise and its reserve at once, while the upscale delay still runs; Serve
    still runs them only once the delay has passed. Training's reclaim (a step boundary, a checkpoint, the
    workers' exit: 0.3-1.2 s here) then runs during the delay instead of after it. A surge that
    falls back within the delay drops the ask at once; its cost is the one needless yield of a training job.
    A rise of one replica (the base load's blips after a spike) never asks early: the minimum is 2 by default.

    The ramp (``ramp_window_s`` > 0, the deployment's look-back period): a rise within that long of the last
    one continues the same ramp, and both the reserve and the early reclaim count it from the ramp's base. A
    step of the traffic can reach the hook as 1, 2, 3, then 4 replicas' worth (as 1, 3, 4 at other times):
    steps of one replica each, which ask neither for a reserve nor early, and each would be a reclaim of its
    own, 1.4-1.7 s apart here. Counted from the base, 1 -> 2 -> 3 asks for 3 + 1 at once, and early.

    The regrow guard (``regrow_guard_s`` > 0): within that long of the demand's last fall, a load above the
    demand counts as the demand while the replicas' p99 meets ``slo_p99_ms``. After a spike the jobs grow back
    into the GPUs the service gave up, and their restarts (on a shared host) or a slow moment raise the queue at
    the base load by a replica or two: heard, it takes a GPU from training again for a service that meets its
    SLO. A p99 above the SLO, or none reported, lets the rise through as without the guard.

    Example: 9 requests, target 2, min 1, max 8, grant 3 -> load 5; once it has lasted ``upscale_delay_s``,
    demand 5 and replicas 3 (capped).
    """
    load = replicas_for_load(obs.total_requests, bounds.target_ongoing_requests)
    floor = max(state.demand, bounds.min_replicas)
    if load > floor and _regrow_guarded(obs, bounds, state):
        load = floor
    # A rise within ramp_window_s of the last one continues its ramp: counted from the ramp's base.
    ramp_live = state.ramp_at_s is not None and obs.now_s - state.ramp_at_s < bounds.ramp_window_s
    base = min(state.ramp_base, floor) if ramp_live else floor
    early = 0  # a surge still in its upscale delay, whose GPUs the arbiter is asked for already
    if load > floor:
        above_since = obs.now_s if state.above_since_s is None else state.above_since_s
        if obs.now_s - above_since + 1e-9 < bounds.upscale_delay_s:  # (float noise: 0.9 - 0.4 < 0.5)
            new_state = replace(state, above_since_s=above_since)  # not yet: the hold runs on as it was
            if bounds.early_reclaim_min_rise and load - base >= bounds.early_reclaim_min_rise:
                early = min(load, bounds.max_replicas)
        else:
            new_state = hold_demand(load, state, obs.now_s, bounds.downscale_delay_s)
    else:
        new_state = replace(hold_demand(load, state, obs.now_s, bounds.downscale_delay_s), above_since_s=None)
    new_state = _update_reserve(state, new_state, floor, base, obs.now_s, bounds, early)
    if new_state.demand > floor or early:
        new_state = replace(new_state, ramp_base=base, ramp_at_s=obs.now_s)
    demand = clamp(new_state.demand, bounds.min_replicas, bounds.max_replicas)
    # A fall the arbiter hears (not the held demand's fall below the minimum while the service idles).
    fell = demand < clamp(state.demand, bounds.min_replicas, bounds.max_replicas)
    new_state = replace(new_state, fell_at_s=obs.now_s if fell else state.fell_at_s)
    asked = clamp(max(new_state.demand, new_state.reserve), bounds.min_replicas, bounds.max_replicas)
    if grant_units is None:
        return ScalingDecision(load, asked, demand, False, new_state)
    capped = max(bounds.min_replicas, min(demand, grant_units))
    return ScalingDecision(load, asked, capped, capped < demand, new_state)


def _regrow_guarded(obs: LoadObservation, bounds: ScalingBounds, state: HoldState) -> bool:
    """Whether a rise now is held back by the regrow guard: within ``regrow_guard_s`` of the demand's last fall,
    with the replicas' p99 known and within the SLO."""
    if not bounds.regrow_guard_s or state.fell_at_s is None or obs.now_s - state.fell_at_s >= bounds.regrow_guard_s:
        return False
    return obs.p99_ms is not None and bounds.slo_p99_ms is not None and obs.p99_ms <= bounds.slo_p99_ms


def _update_reserve(
    old: HoldState, new: HoldState, floor: int, base: int, now_s: float, bounds: ScalingBounds, early: int = 0
) -> HoldState:
    """The reserve after one tick: set by an accepted rise, dropped ``downscale_delay_s`` later.

    (The demand itself cannot fall sooner: it falls ``downscale_delay_s`` after the load fell, and the load
    fell after the rise that set the reserve.) A surge to ``early`` replicas still in its upscale delay sets
    it too, unconfirmed: dropped at once if the load falls back before the delay has passed (a blip), kept
    as any other once the rise is accepted.
    """
    live = old.reserve if now_s - old.reserve_since_s < bounds.downscale_delay_s else 0
    accepted = new.demand > floor
    # A surge does not replace a reserve already accepted (dropping it with the blip would drop both), if
    # that reserve is more than the demand in force.
    rise_to = new.demand if accepted else (early if live <= floor or old.reserve_early else 0)
    if rise_to > floor and (bounds.surge_reserve_fraction > 0 or early):
        ahead = rise_to + int((rise_to - base) * bounds.surge_reserve_fraction + 1e-9)
        if ahead >= live:
            return replace(new, reserve=ahead, reserve_since_s=now_s, reserve_early=not accepted)
    unconfirmed = old.reserve_early and not accepted
    fell_back = unconfirmed and new.above_since_s is None  # a surge's load back at the demand: a blip
    if live and not fell_back:
        return replace(
            new, reserve=old.reserve, reserve_since_s=old.reserve_since_s, reserve_early=unconfirmed
        )
    return replace(new, reserve=0, reserve_since_s=0.0, reserve_early=False)


def held_by_type(
    replica_types: Mapping[str, str | None],
    grant: Mapping[str, int],
    preferred_types: Sequence[str],
) -> dict[str, int]:
    """Running replicas per GPU type, for the arbiter's ``held``.

    ``replica_types`` maps each running replica to the GPU type its node carries, or None while the
    replica has not reported it yet (its first metrics push is still on the way). An unknown replica is
    counted, never dropped: under-reporting would let the arbiter hand out GPUs that are still in use.
    It goes to the first type (in preference order, then the grant's other types) whose grant is not yet
    filled by known replicas, else to the most preferred type.

    Example: replicas a->H100, b->None, grant {H100: 1, A100: 1}, preferred [H100, A100]
    -> {H100: 1, A100: 1}.
    """
    held: dict[str, int] = {}
    unknown = 0
    for gpu_type in replica_types.values():
        if gpu_type is None:
            unknown += 1
        else:
            held[gpu_type] = held.get(gpu_type, 0) + 1
    order = list(dict.fromkeys([*preferred_types, *grant.keys()]))
    for _ in range(unknown):
        target = next((t for t in order if held.get(t, 0) < grant.get(t, 0)), None)
        if target is None:
            target = order[0] if order else "unknown"
        held[target] = held.get(target, 0) + 1
    return held


def keepalive_demand(
    *,
    now_s: float,
    last_call_s: float,
    last_current_replicas: int,
    last_demand: int,
    min_replicas: int,
    stale_after_s: float,
) -> int:
    """The demand to keep reporting when Serve has stopped calling the policy.

    Serve calls the policy every control-loop tick (0.1 s) except in one case: at zero running replicas
    with requests waiting, its cold-start fast path starts a replica without asking the policy. If the
    policy's last call saw zero replicas and the calls have stopped for ``stale_after_s``, a request is
    waiting for a replica: demand is at least 1, so the arbiter frees a GPU for it (otherwise a
    ``min_replicas: 0`` service whose GPUs all went to training would wait forever).

    Example: last call 2 s ago saw 0 replicas and demand 0, stale after 1 s -> 1.
    """
    if last_current_replicas == 0 and now_s - last_call_s >= stale_after_s:
        return max(1, min_replicas, last_demand)
    return last_demand


def track_departures(
    previous: Mapping[str, str | None],
    current: Mapping[str, str | None],
    departed: Mapping[str, tuple[str | None, float]],
    now_s: float,
    drain_hold_s: float,
) -> dict[str, tuple[str | None, float]]:
    """Replicas that left the running set recently, with their GPU type and when they left.

    A replica Serve stops leaves the running set at once but keeps its GPU while it drains its requests
    and exits; counting it as held for ``drain_hold_s`` keeps the arbiter from handing that GPU to
    training before it is free (release before grant). A replica that comes back is no longer departed.

    Example: previous {a: H100, b: A100}, current {a: H100}, at t=10 with a 3 s hold -> {b: (A100, 10)};
    the same call at t=13 with that as ``departed`` and no change -> {}.
    """
    out = {
        rid: (t, left_s)
        for rid, (t, left_s) in departed.items()
        if rid not in current and now_s - left_s < drain_hold_s
    }
    for rid, t in previous.items():
        if rid not in current and rid not in out and drain_hold_s > 0:
            out[rid] = (t, now_s)
    return out


class LatencyWindow:
    """Recent request latencies of one replica, for the p99 it reports (``tidal status``).

    Keeps the last ``max_samples`` latencies younger than ``window_s``. Not thread-safe: a replica's event loop
    owns it.

    Example: latencies 1..100 ms added at t=0 -> ``p99_ms(now_s=1)`` = 99.0 (nearest rank); at t=31 with a
    30 s window -> None (nothing recent).
    """

    def __init__(self, window_s: float = 30.0, max_samples: int = 2048) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add(self, now_s: float, latency_ms: float) -> None:
        self._samples.append((now_s, latency_ms))

    def p99_ms(self, now_s: float) -> float | None:
        while self._samples and now_s - self._samples[0][0] > self.window_s:
            self._samples.popleft()
        if not self._samples:
            return None
        values = sorted(v for _, v in self._samples)
        return values[max(0, math.ceil(0.99 * len(values)) - 1)]
