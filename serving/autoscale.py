"""Tidal's custom Serve autoscaling policy: the Ray glue around :mod:`tidal.serving.autoscale_math`.

Configured per deployment (``tidal.serving.config.autoscaling_config_for`` writes it)::

    autoscaling_config:
      policy:
        policy_function: tidal.serving.autoscale:TidalAutoscalingPolicy
        policy_kwargs: {service: {...}, target_ongoing_requests: 2, ...}

Serve (2.60) instantiates the class once per deployment version inside the Serve controller and calls it
every control-loop tick (0.1 s) with an ``AutoscalingContext``; it wraps the result with its own
scaling factors, delays and ``[min, max]`` bounds (``ray.serve.autoscaling_policy._apply_autoscaling_config``).

Each call is arithmetic on in-memory values only; it never waits on the network:

1. observe: ongoing + queued requests, running replicas, and each replica's GPU type. Replicas report
   their node's ``ray.io/accelerator-type`` as a custom autoscaling metric (``tidal_gpu_type:<TYPE>`` = 1,
   see ``tidal.serving.app.ModelServer.record_autoscaling_stats``), so no state-API call is needed here.
2. decide: demand from load (with a downscale hold), capped at the latest grant.
3. report: hand demand and held units to the :class:`ArbiterLink`, whose own thread talks to the arbiter.

The link's thread registers the service (a blocking call, so never on Serve's control loop), heartbeats
every ``heartbeat_period_s`` with the newest demand and holdings, and keeps the newest grant for the
next policy call. A changed demand goes out at once, not at the next period; and while the demand is above
the grant (GPUs are being taken back from training for it), the thread asks every ``grant_poll_s``, for at
most ``GRANT_POLL_WINDOW_S``, so that replicas start as soon as the arbiter grants the freed GPUs. (At a
0.5 s period both waits cost 0.25 s on average, each spike, in a time to capacity of ~5 s here.)
It also covers the one case where Serve does not call the policy: at zero replicas
with a request waiting, Serve's cold-start path starts a replica by itself; the link then reports a
demand of 1 so that the arbiter frees a GPU for it (see ``autoscale_math.keepalive_demand``).

With no arbiter reachable (not started, unreachable, or ``tidal.cluster.client`` missing), the grant is None and
the policy scales on load alone within ``[min, max]``, Serve's default behaviour; it logs that once, and
once again when the arbiter is back.

Registration lifecycle: the service registers lazily, on the first policy call after deployment. On
deletion the policy object is dropped by Serve, its link thread stops, and the arbiter expires the
silent registration after its TTL (15 s by default), freeing the grant; ``tidal serve delete`` also
unregisters at once.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from tidal.cluster.model import EMPTY, Allocation, ServiceSpec
from tidal.serving.autoscale_math import (
    HoldState,
    LoadObservation,
    ScalingBounds,
    decide_replicas,
    held_by_type,
    keepalive_demand,
    track_departures,
)
from tidal.serving.config import GPU_TYPE_METRIC_PREFIX, TidalPolicyOptions

# A child of Serve's logger, so these lines land in the Serve controller's log next to Serve's own
# autoscaling decisions, where an operator looks first.
logger = logging.getLogger("ray.serve.tidal")


class ArbiterClientLike(Protocol):
    """The part of ``tidal.cluster.client.ArbiterClient`` the link uses (blocking calls, on the link thread)."""

    def available(self) -> bool: ...

    def register(
        self, spec: ServiceSpec, meta: Mapping[str, Any] | None = None, *, demand_units: int | None = None
    ) -> Any: ...

    def heartbeat(self, name: str, *, demand_units: int | None = ..., held: Any = ..., **kw: Any) -> Any: ...


def default_client_factory(name: str, namespace: str) -> ArbiterClientLike:
    """``tidal.cluster.client.ArbiterClient``; imported here so that a missing module only means 'no arbiter'."""
    from tidal.cluster.client import ArbiterClient

    return ArbiterClient(name=name, namespace=namespace)


# The link asks every grant_poll_s while the demand is above the grant for at most this long, then at its
# heartbeat period again: a service the cluster cannot serve any further (every GPU taken by workloads of
# higher priority) must not keep calling the arbiter ten times a second.
GRANT_POLL_WINDOW_S = 15.0


@dataclass(frozen=True, slots=True)
class _Report:
    at_s: float
    demand_units: int
    held: Mapping[str, int]
    current_replicas: int


class ArbiterLink:
    """Talks to the arbiter on its own daemon thread; the policy only reads and writes memory.

    :meth:`step` is one round (register if needed, heartbeat, keep the grant) and is what tests drive
    directly with a fake client and explicit times; :meth:`start` runs it every ``heartbeat_period_s``.
    """

    def __init__(
        self,
        spec: ServiceSpec,
        options: TidalPolicyOptions,
        client_factory: Callable[[str, str], ArbiterClientLike] = default_client_factory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.options = options
        self._client_factory = client_factory
        self._clock = clock
        self._lock = threading.Lock()
        self._report: _Report | None = None
        self._grant: Allocation | None = None
        self._grant_at_s = float("-inf")
        self._client: ArbiterClientLike | None = None
        self._registered = False
        self._stop = threading.Event()
        self._wake = threading.Event()  # set: the link thread runs its next round now
        self._wanting_since_s: float | None = None  # the demand has been above the grant since then
        self._thread: threading.Thread | None = None
        self.tried = False  # a round has tried to reach the arbiter (until then, no grant is no news)

    # ------------------------------------------------------------- called by the policy (memory only)

    def report(self, demand_units: int, held: Mapping[str, int], current_replicas: int) -> None:
        with self._lock:
            last = self._report
            self._report = _Report(self._clock(), demand_units, dict(held), current_replicas)
        if last is None or last.demand_units != demand_units:
            self._wake.set()  # the arbiter hears of a new demand now, not at the next period

    def wait_s(self) -> float:
        """How long the link thread waits for its next round (unless a new demand wakes it first)."""
        with self._lock:
            report, grant = self._report, self._grant
        if report is None or grant is None or report.demand_units <= grant.total():
            self._wanting_since_s = None
            return self.options.heartbeat_period_s
        now = self._clock()
        if self._wanting_since_s is None:
            self._wanting_since_s = now
        if now - self._wanting_since_s < GRANT_POLL_WINDOW_S:
            return min(self.options.grant_poll_s, self.options.heartbeat_period_s)
        return self.options.heartbeat_period_s

    def grant(self) -> Allocation | None:
        """The newest grant, or None if there is none younger than ``grant_ttl_s`` (no arbiter)."""
        with self._lock:
            if self._clock() - self._grant_at_s > self.options.grant_ttl_s:
                return None
            return self._grant

    def start(self) -> None:
        """Start the heartbeat thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=_run_link, args=(self,), name=f"tidal-arbiter-link-{self.spec.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # ------------------------------------------------------------ the link thread (blocking calls)

    def step(self) -> None:
        """One round: connect, register if needed, heartbeat the newest report, keep the grant.

        Raises whatever the client raises; :func:`_run_link` logs it and carries on.
        """
        now = self._clock()
        with self._lock:
            report = self._report
        if report is None:
            return  # the policy has not been called yet: nothing to say
        if now - report.at_s > self.options.keepalive_s:
            return  # no policy calls for long: the deployment is gone; let the registration expire
        self.tried = True
        if self._client is None:
            self._client = self._client_factory(self.options.arbiter_name, self.options.arbiter_namespace)
        if not self._registered:
            # (Re-)register only while Serve is calling the policy: a deleted deployment must not be
            # brought back by a heartbeat that was in flight when it went.
            if now - report.at_s > self.options.stale_after_s or not self._client.available():
                return
            view = self._client.register(
                self.spec, meta={"kind": "serve-deployment"}, demand_units=report.demand_units
            )
            self._registered = bool(getattr(view, "registered", True))
            if not self._registered:
                raise RuntimeError(f"arbiter refused registration of {self.spec.name!r}: {view.reason}")
            logger.info("registered service %r with the arbiter", self.spec.name)
        demand = keepalive_demand(
            now_s=now,
            last_call_s=report.at_s,
            last_current_replicas=report.current_replicas,
            last_demand=report.demand_units,
            min_replicas=self.spec.min_replicas,
            stale_after_s=self.options.stale_after_s,
        )
        view = self._client.heartbeat(self.spec.name, demand_units=demand, held=dict(report.held))
        if not view.registered:
            # Expired (e.g. the arbiter restarted without our registration): register again next round.
            self._registered = False
            return
        with self._lock:
            self._grant = view.grant
            self._grant_at_s = now


def _run_link(link: ArbiterLink) -> None:
    """The link thread's loop. Holds the link only (never the policy), so the policy can be collected."""
    failures = 0
    while True:
        link._wake.wait(link.wait_s())
        link._wake.clear()
        if link._stop.is_set():
            return
        try:
            link.step()
            failures = 0
        except Exception as e:  # the thread must outlive a bad round: the next one may succeed
            failures += 1
            if failures in (1, 10) or failures % 100 == 0:
                logger.warning(
                    "service %r: arbiter call failed (%d in a row): %s: %s",
                    link.spec.name,
                    failures,
                    type(e).__name__,
                    e,
                )
            if failures >= 3:
                # Reconnect and register again: the actor may have been restarted elsewhere.
                link._client = None
                link._registered = False


class TidalAutoscalingPolicy:
    """Serve autoscaling policy that reports demand to Tidal's arbiter and caps replicas at its grant.

    Serve passes ``policy_kwargs`` (validated as :class:`tidal.serving.config.TidalPolicyOptions`). The class
    attributes are seams for unit tests (a fake client, a manual clock, no thread); production keeps them.
    """

    client_factory: Callable[[str, str], ArbiterClientLike] = staticmethod(default_client_factory)
    clock: Callable[[], float] = staticmethod(time.monotonic)
    run_link_thread: bool = True

    def __init__(self, **policy_kwargs: Any) -> None:
        self.options = TidalPolicyOptions.model_validate(policy_kwargs)
        self.spec = self.options.service.to_spec()
        self.bounds = ScalingBounds(
            min_replicas=self.spec.min_replicas,
            max_replicas=self.spec.max_replicas,
            target_ongoing_requests=self.options.target_ongoing_requests,
            downscale_delay_s=self.options.downscale_delay_s,
            upscale_delay_s=self.options.upscale_delay_s,
            surge_reserve_fraction=self.options.surge_reserve_fraction,
            early_reclaim_min_rise=self.options.early_reclaim_min_rise,
            ramp_window_s=self.options.ramp_window_s,
        )
        self.link = ArbiterLink(self.spec, self.options, self.client_factory, self.clock)
        self._hold = HoldState()
        self._running: dict[str, str | None] = {}
        self._departed: dict[str, tuple[str | None, float]] = {}
        self._mode: str | None = None  # "arbiter" | "fallback", for log-once
        # Stop the link thread when Serve drops this policy (deployment deleted or redeployed).
        weakref.finalize(self, self.link.stop)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        now = self.clock()
        if self.run_link_thread:
            self.link.start()
        # 1. observe
        obs = LoadObservation(
            now_s=now,
            total_requests=float(ctx.total_num_requests or 0.0),
            current_replicas=int(ctx.current_num_replicas),
        )
        running = replica_gpu_types(ctx)
        self._departed = track_departures(
            self._running, running, self._departed, now, self.options.drain_hold_s
        )
        self._running = running
        # 2. decide
        grant = self.link.grant()
        decision = decide_replicas(obs, self.bounds, self._hold, None if grant is None else grant.total())
        self._hold = decision.state
        # 3. report
        counted = {**{rid: t for rid, (t, _) in self._departed.items()}, **running}
        held = held_by_type(counted, (grant or EMPTY).as_dict(), self.spec.gpu_types)
        self.link.report(decision.demand_units, held, obs.current_replicas)
        self._log_mode(grant)
        return decision.num_replicas, {}

    def _log_mode(self, grant: Allocation | None) -> None:
        mode = "fallback" if grant is None else "arbiter"
        if mode == self._mode or (grant is None and not self.link.tried):
            return
        if mode == "fallback":
            logger.warning(
                "service %r: no grant from arbiter %s/%s; scaling on load alone within [%d, %d] "
                "(Serve's default behaviour) until it answers",
                self.spec.name,
                self.options.arbiter_namespace,
                self.options.arbiter_name,
                self.spec.min_replicas,
                self.spec.max_replicas,
            )
        else:
            logger.info("service %r: arbiter answers; replicas capped at its grant %s", self.spec.name, grant)
        self._mode = mode


def replica_gpu_types(ctx: Any) -> dict[str, str | None]:
    """Running replica id -> the GPU type its node carries (None until the replica has reported it).

    Reads the ``tidal_gpu_type:<TYPE>`` custom metrics that replicas push with Serve's own autoscaling
    metrics, so it costs no remote call inside the controller.
    """
    out: dict[str, str | None] = {_rid(r): None for r in ctx.running_replicas}
    metrics = ctx.aggregated_metrics or {}
    for key, per_replica in metrics.items():
        if not key.startswith(GPU_TYPE_METRIC_PREFIX):
            continue
        gpu_type = key[len(GPU_TYPE_METRIC_PREFIX) :]
        for rid, value in per_replica.items():
            r = _rid(rid)
            if r in out and value and value > 0.5:
                out[r] = gpu_type
    return out


def _rid(replica_id: Any) -> str:
    return getattr(replica_id, "unique_id", None) or str(replica_id)
