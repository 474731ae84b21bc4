"""Tidal's custom Serve autoscaling policy: the Ray glue around :mod:`tidal.serving.autoscale_math`.

Any deployment opts in from its own config: ``policy_function: tidal.serve:TidalPolicy`` with its
``policy_kwargs`` (the config a user writes is shown in :mod:`tidal.serve`; Tidal's model server is one such
deployment, ``tidal.serving.config.autoscaling_config_for``).

Serve (2.60) instantiates the class once per deployment version inside the Serve controller and calls it
every control-loop tick (0.1 s) with an ``AutoscalingContext``; it wraps the result with its own
scaling factors, delays and ``[min, max]`` bounds (``ray.serve.autoscaling_policy._apply_autoscaling_config``).
The service's bounds and target load come from that context's ``config`` (the deployment's own
``autoscaling_config``), its GPUs per replica from the deployment's ``ray_actor_options`` (read by the link
thread from the controller), its name (``<app>.<deployment>`` unless ``policy_kwargs.name``), GPU types,
priority and SLO from ``policy_kwargs``: nothing is stated twice, and the replica's code is the user's own.

Each call is arithmetic on in-memory values only; it never waits on the network:

1. observe: ongoing + queued requests, running replicas, and each replica's GPU type: from the
   ``tidal_gpu_type:<TYPE>`` custom metric where a replica pushes it (Tidal's model server does: the fast
   path), else from the link's cache, which its thread fills off the control loop (replica -> node, from
   Serve's controller; node -> ``ray.io/accelerator-type`` label, from the node table).
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
once again when the arbiter is back. A deployment that asks for no GPU is never registered (logged once).

Serve's own delays around the policy should be short: a long ``downscale_delay_s`` keeps GPUs after a grant
shrinks, a long ``upscale_delay_s`` delays granted replicas. The policy logs one warning with the fix in the
controller's log (``tidal.serving.config.serve_delay_warnings``) and reports it with every heartbeat, for
``tidal status``; so does a deployment whose replicas are not pinned to its GPU types.

Registration lifecycle: the service registers lazily, on the first policy call after deployment. When Serve
drops the policy (the deployment deleted or redeployed), its link thread stops; if the deployment is gone
from Serve's controller, the thread unregisters the service at once (a redeployed one keeps its registration
for the next version's policy), and otherwise the arbiter expires the silent registration after its TTL.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError
from tidal.cluster.model import EMPTY, GPU_TYPE_LABEL, Allocation, ServiceSpec
from tidal.serving.autoscale_math import (
    DeploymentSnapshot,
    HoldState,
    LoadObservation,
    ScalingBounds,
    clamp,
    decide_replicas,
    held_by_type,
    keepalive_demand,
    replicas_for_load,
    track_departures,
)
from tidal.serving.config import (
    GPU_TYPE_METRIC_PREFIX,
    P99_METRIC,
    UNKNOWN_GPU_TYPE,
    TidalPolicyOptions,
    default_service_name,
    gpus_per_replica_of,
    placement_warnings,
    selector_gpu_types,
    serve_delay_warnings,
    service_spec_for,
)
from tidal.serving.deploy_check import install_deploy_check

# A child of Serve's logger, so these lines land in the Serve controller's log next to Serve's own
# autoscaling decisions, where an operator looks first.
logger = logging.getLogger("ray.serve.tidal")


class ArbiterClientLike(Protocol):
    """The part of ``tidal.cluster.client.ArbiterClient`` the link uses (blocking calls, on the link thread)."""

    def available(self) -> bool: ...

    def register(
        self,
        spec: ServiceSpec,
        meta: Mapping[str, Any] | None = None,
        *,
        demand_units: int | None = None,
        held: Mapping[str, int] | None = None,
    ) -> Any: ...

    def heartbeat(self, name: str, *, demand_units: int | None = ..., held: Any = ..., **kw: Any) -> Any: ...

    def unregister(self, name: str) -> Any: ...


class DeploymentInspectorLike(Protocol):
    """Reads one deployment off Serve's controller (blocking: on the link thread only)."""

    def observe(self, app_name: str, deployment_name: str) -> DeploymentSnapshot | None:
        """The deployment now, or None once it is gone."""
        ...


def default_client_factory(name: str, namespace: str) -> ArbiterClientLike:
    """``tidal.cluster.client.ArbiterClient``; imported here so that a missing module only means 'no arbiter'."""
    from tidal.cluster.client import ArbiterClient

    return ArbiterClient(name=name, namespace=namespace)


class ServeDeploymentInspector:
    """The deployment's GPUs per replica, placement and replicas' nodes, from Serve's controller; each node's
    GPU type from the node table, cached (a node keeps its label).

    Runs inside the Serve controller (the policy's process), on the link thread: the call to the controller
    is served by its event loop while this thread waits.
    """

    def __init__(self) -> None:
        self._controller: Any = None
        self._node_types: dict[str, str | None] = {}

    def observe(self, app_name: str, deployment_name: str) -> DeploymentSnapshot | None:
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        if self._controller is None:
            self._controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        try:
            details = ray.get(
                self._controller.get_deployment_details.remote(app_name or "", deployment_name), timeout=10
            )
        except KeyError:  # (Ray raises the controller's KeyError as one): the deployment is gone
            return None
        schema = details.deployment_config
        options = _plain(getattr(schema, "ray_actor_options", None))
        bundles = getattr(schema, "placement_group_bundles", None)
        nodes = {r.replica_id: r.node_id for r in details.replicas}
        if any(n and n not in self._node_types for n in nodes.values()):
            for node in ray.nodes():
                self._node_types[node["NodeID"]] = (node.get("Labels") or {}).get(GPU_TYPE_LABEL)
        return DeploymentSnapshot(
            gpus_per_replica=gpus_per_replica_of(options, bundles if isinstance(bundles, list) else None),
            pinned_gpu_types=selector_gpu_types(options),
            replica_gpu_types={rid: self._node_types.get(n) for rid, n in nodes.items() if n},
        )


def _plain(value: Any) -> dict[str, Any]:
    """A schema's field as a dict (Serve gives a pydantic model, a dict, or its DEFAULT sentinel)."""
    if isinstance(value, Mapping):
        return dict(value)
    dump = getattr(value, "model_dump", None) or getattr(value, "dict", None)
    return dict(dump(exclude_unset=False)) if callable(dump) else {}


@dataclass(frozen=True, slots=True)
class ServeTarget:
    """The deployment a policy serves, as Serve's context names and bounds it."""

    app_name: str
    deployment_name: str
    min_replicas: int
    max_replicas: int


# The link asks every grant_poll_s while the demand is above the grant for at most this long, then at its
# heartbeat period again: a service the cluster cannot serve any further (every GPU taken by workloads of
# higher priority) must not keep calling the arbiter ten times a second.
GRANT_POLL_WINDOW_S = 15.0
# A stopped link waits at most this long for its deployment to leave Serve's controller before it decides the
# deployment was redeployed, not deleted (and keeps the registration for the next version's policy).
CLOSE_WAIT_S = 5.0
CLOSE_POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class _Report:
    at_s: float
    demand_units: int
    held: Mapping[str, int]
    current_replicas: int
    unknown_replicas: tuple[str, ...] = ()  # running replicas whose GPU type is not known yet
    p99_ms: float | None = None


class ArbiterLink:
    """Talks to the arbiter (and reads the deployment off Serve's controller) on its own daemon thread; the
    policy only reads and writes memory.

    :meth:`step` is one round (resolve the spec and unknown replicas' GPU types if needed, register if needed,
    heartbeat, keep the grant) and is what tests drive directly with a fake client, a fake inspector and
    explicit times; :meth:`start` runs it every ``heartbeat_period_s``.

    Args:
        target: the deployment (its name in Serve, its bounds).
        name: the service's name at the arbiter.
        warnings: what the policy found wrong in the deployment's settings (reported in every heartbeat).
    """

    def __init__(
        self,
        target: ServeTarget,
        name: str,
        options: TidalPolicyOptions,
        client_factory: Callable[[str, str], ArbiterClientLike] = default_client_factory,
        clock: Callable[[], float] = time.monotonic,
        inspector_factory: Callable[[], DeploymentInspectorLike] = ServeDeploymentInspector,
        warnings: list[str] | None = None,
    ) -> None:
        self.target = target
        self.name = name
        self.options = options
        self.spec: ServiceSpec | None = None  # once the deployment's GPUs per replica are known
        self.warnings = list(warnings or [])
        self._client_factory = client_factory
        self._inspector_factory = inspector_factory
        self._inspector: DeploymentInspectorLike | None = None
        self._clock = clock
        self._lock = threading.Lock()
        self._report: _Report | None = None
        self._grant: Allocation | None = None
        self._grant_at_s = float("-inf")
        self._client: ArbiterClientLike | None = None
        self._registered = False
        self._spec_error: str | None = None
        self._replica_types: dict[
            str, str | None
        ] = {}  # resolved off the control loop, kept (a replica stays put)
        self._stop = threading.Event()
        self._wake = threading.Event()  # set: the link thread runs its next round now
        self._wanting_since_s: float | None = None  # the demand has been above the grant since then
        self._thread: threading.Thread | None = None
        self.tried = False  # a round has tried to reach the arbiter (until then, no grant is no news)
        self.close_wait_s = CLOSE_WAIT_S

    # ------------------------------------------------------------- called by the policy (memory only)

    def report(
        self,
        demand_units: int,
        held: Mapping[str, int],
        current_replicas: int,
        unknown_replicas: tuple[str, ...] = (),
        p99_ms: float | None = None,
    ) -> None:
        with self._lock:
            last = self._report
            self._report = _Report(
                self._clock(), demand_units, dict(held), current_replicas, unknown_replicas, p99_ms
            )
        if (
            last is None
            or last.demand_units != demand_units
            or (unknown_replicas and not last.unknown_replicas)
        ):
            self._wake.set()  # the arbiter hears of a new demand now, not at the next period

    def replica_types(self) -> dict[str, str | None]:
        """Replica id -> GPU type, for the replicas the link thread has resolved (None: its node has no label)."""
        with self._lock:
            return dict(self._replica_types)

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
            target=_run_link, args=(self,), name=f"tidal-arbiter-link-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # ------------------------------------------------------------ the link thread (blocking calls)

    def step(self) -> None:
        """One round: learn the deployment if needed, register if needed, heartbeat the newest report, keep
        the grant.

        Raises whatever the client or the inspector raises; :func:`_run_link` logs it and carries on.
        """
        now = self._clock()
        with self._lock:
            report = self._report
        if report is None:
            return  # the policy has not been called yet: nothing to say
        if now - report.at_s > self.options.keepalive_s:
            return  # no policy calls for long: the deployment is gone; let the registration expire
        self.tried = True
        if self.spec is None or any(r not in self._replica_types for r in report.unknown_replicas):
            self._observe()
        if self.spec is None:
            return  # not visible in Serve yet, or no GPUs asked for: the policy scales on load alone
        if self._client is None:
            self._client = self._client_factory(self.options.arbiter_name, self.options.arbiter_namespace)
        if not self._registered:
            # (Re-)register only while Serve is calling the policy: a deleted deployment must not be
            # brought back by a heartbeat that was in flight when it went.
            if now - report.at_s > self.options.stale_after_s or not self._client.available():
                return
            view = self._client.register(
                self.spec,
                # The backend's forced release finds the deployment by these (tidal.cluster.ray_backend).
                meta={
                    "kind": "serve-deployment",
                    "serve_app": self.target.app_name,
                    "serve_deployment": self.target.deployment_name,
                },
                demand_units=report.demand_units,
                held=dict(report.held),  # replicas already running keep their GPUs from the first tick
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
        view = self._client.heartbeat(
            self.spec.name, demand_units=demand, held=dict(report.held), progress=self._progress(report)
        )
        if not view.registered:
            # Expired (e.g. the arbiter restarted without our registration): register again next round.
            self._registered = False
            return
        with self._lock:
            self._grant = view.grant
            self._grant_at_s = now

    def close(self) -> None:
        """Unregister now if the deployment is gone from Serve (the link thread's last act after :meth:`stop`).

        A deployment still in Serve was redeployed: the next version's policy heartbeats the same
        registration, so it is kept.
        """
        if not self._registered or self._client is None or self.spec is None:
            return
        if self._inspector is None:
            self._inspector = self._inspector_factory()
        # Serve drops the policy as it removes the deployment: give the removal a moment to show.
        polls = max(1, round(self.close_wait_s / CLOSE_POLL_S))
        for i in range(polls):
            if self._inspector.observe(*self._names()) is None:
                break
            if i == polls - 1:
                return  # still in Serve: redeployed
            time.sleep(CLOSE_POLL_S)
        self._client.unregister(self.spec.name)
        self._registered = False
        logger.info("service %r: deployment deleted; unregistered from the arbiter", self.spec.name)

    def _names(self) -> tuple[str, str]:
        return self.target.app_name, self.target.deployment_name

    def _observe(self) -> None:
        """Read the deployment off Serve's controller: its spec (once) and its replicas' GPU types."""
        if self._inspector is None:
            self._inspector = self._inspector_factory()
        snap = self._inspector.observe(*self._names())
        if snap is None:
            return
        with self._lock:
            self._replica_types.update(snap.replica_gpu_types)
        if self.spec is not None:
            return
        try:
            self.spec = service_spec_for(
                self.options,
                app_name=self.target.app_name,
                deployment_name=self.target.deployment_name,
                min_replicas=self.target.min_replicas,
                max_replicas=self.target.max_replicas,
                gpus_per_replica=snap.gpus_per_replica,
            )
        except ValueError as e:
            if str(e) != self._spec_error:
                logger.error("service %r is not put under Tidal: %s", self.name, e)
                self._spec_error = str(e)
            return
        for w in placement_warnings(self.spec.name, list(self.spec.gpu_types), snap.pinned_gpu_types):
            warn_once(w)
            self.warnings.append(w)

    def _progress(self, report: _Report) -> dict[str, Any]:
        """What ``tidal status`` shows of the service besides its demand and grant."""
        out: dict[str, Any] = {
            "replicas": report.current_replicas,
            "serve_app": self.target.app_name,
            "serve_deployment": self.target.deployment_name,
            "warnings": list(self.warnings),
        }
        if self.spec is not None:
            out["gpu_types"] = list(self.spec.gpu_types)
            out["slo_p99_ms"] = self.spec.slo_p99_ms
        if report.p99_ms is not None:
            out["p99_ms"] = report.p99_ms
        return out


def _run_link(link: ArbiterLink) -> None:
    """The link thread's loop. Holds the link only (never the policy), so the policy can be collected."""
    failures = 0
    while True:
        link._wake.wait(link.wait_s())
        link._wake.clear()
        if link._stop.is_set():
            try:
                link.close()
            except Exception as e:  # the registration expires anyway
                logger.warning(
                    "service %r: could not unregister (%s: %s); it will expire",
                    link.name,
                    type(e).__name__,
                    e,
                )
            return
        try:
            link.step()
            failures = 0
        except Exception as e:  # the thread must outlive a bad round: the next one may succeed
            failures += 1
            if failures in (1, 10) or failures % 100 == 0:
                logger.warning(
                    "service %r: arbiter call failed (%d in a row): %s: %s",
                    link.name,
                    failures,
                    type(e).__name__,
                    e,
                )
            if failures >= 3:
                # Reconnect and register again: the actor may have been restarted elsewhere.
                link._client = None
                link._inspector = None
                link._registered = False


class TidalAutoscalingPolicy:
    """Serve autoscaling policy that reports demand to Tidal's arbiter and caps replicas at its grant
    (``tidal.serve.TidalPolicy``).

    Serve passes ``policy_kwargs`` (validated as :class:`tidal.serving.config.TidalPolicyOptions`); the first
    call binds the policy to its deployment (Serve's context names it and carries its ``autoscaling_config``).
    The class attributes are seams for unit tests (a fake client, a fake inspector, a manual clock, no
    thread); production keeps them.
    """

    client_factory: Callable[[str, str], ArbiterClientLike] = staticmethod(default_client_factory)
    inspector_factory: Callable[[], DeploymentInspectorLike] = ServeDeploymentInspector
    clock: Callable[[], float] = staticmethod(time.monotonic)
    run_link_thread: bool = True

    def __init__(self, **policy_kwargs: Any) -> None:
        # Serve builds the policy inside its controller, where an exception would stop the reconciliation of
        # every application at each control-loop tick: bad kwargs are logged (naming the field) instead, and
        # the deployment scales on load alone, outside Tidal. Bad kwargs normally fail the deploy before this
        # (tidal.serving.deploy_check); this covers a deploy the check cannot see (its module docstring).
        self.config_error: str | None = None
        try:
            self.options = TidalPolicyOptions.model_validate(policy_kwargs)
        except ValidationError as e:
            self.config_error = f"invalid policy_kwargs {policy_kwargs!r}: {e}"
            self.options = TidalPolicyOptions(gpu_types=["invalid"])  # a placeholder: config_error keeps it from registering
            logger.error(
                "the deployment is NOT under Tidal, and scales on load alone within its [min, max] replicas: %s",
                self.config_error,
            )
        self.bounds: ScalingBounds | None = None
        self.link: ArbiterLink | None = None
        self._hold = HoldState()
        self._running: dict[str, str | None] = {}
        self._departed: dict[str, tuple[str | None, float]] = {}
        self._mode: str | None = None  # "arbiter" | "fallback", for log-once

    def _bind(self, ctx: Any) -> ArbiterLink:
        """Learn the deployment from Serve's context: its name, bounds, target load and Serve's delays."""
        cfg = ctx.config
        app, deployment = ctx.app_name or "", ctx.deployment_name
        name = self.options.name or default_service_name(app, deployment)
        warnings = serve_delay_warnings(
            name,
            upscale_delay_s=float(cfg.upscale_delay_s),
            downscale_delay_s=float(cfg.downscale_delay_s),
            downscale_to_zero_delay_s=getattr(cfg, "downscale_to_zero_delay_s", None),
        )
        for w in warnings:
            warn_once(w)
        o = self.options
        self.bounds = ScalingBounds(
            min_replicas=int(cfg.min_replicas),
            max_replicas=int(cfg.max_replicas),
            target_ongoing_requests=float(cfg.target_ongoing_requests),
            downscale_delay_s=o.downscale_delay_s,
            upscale_delay_s=o.upscale_delay_s,
            surge_reserve_fraction=o.surge_reserve_fraction,
            early_reclaim_min_rise=o.early_reclaim_min_rise,
            ramp_window_s=o.ramp_window_s,
            regrow_guard_s=o.regrow_guard_s,
            slo_p99_ms=o.slo_p99_ms,
        )
        target = ServeTarget(app, deployment, self.bounds.min_replicas, self.bounds.max_replicas)
        link = ArbiterLink(
            target, name, o, self.client_factory, self.clock, self.inspector_factory, warnings=warnings
        )
        # Stop the link thread when Serve drops this policy (deployment deleted or redeployed).
        weakref.finalize(self, link.stop)
        return link

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        if self.config_error is not None:
            cfg = ctx.config
            load = replicas_for_load(float(ctx.total_num_requests or 0.0), float(cfg.target_ongoing_requests))
            return clamp(load, int(cfg.min_replicas), int(cfg.max_replicas)), {}
        now = self.clock()
        if self.link is None:
            self.link = self._bind(ctx)
        link, bounds = self.link, self.bounds
        assert bounds is not None
        if self.run_link_thread:
            link.start()
        # 1. observe
        p99_ms = replica_p99_ms(ctx)
        obs = LoadObservation(
            now_s=now,
            total_requests=float(ctx.total_num_requests or 0.0),
            current_replicas=int(ctx.current_num_replicas),
            p99_ms=p99_ms,
        )
        running = replica_gpu_types(ctx)
        unknown = tuple(r for r, t in running.items() if t is None)
        if unknown:
            resolved = link.replica_types()
            running.update({r: resolved[r] for r in unknown if r in resolved})
            unknown = tuple(r for r in unknown if r not in resolved)
        self._departed = track_departures(
            self._running, running, self._departed, now, self.options.drain_hold_s
        )
        self._running = running
        # 2. decide
        grant = link.grant()
        decision = decide_replicas(obs, bounds, self._hold, None if grant is None else grant.total())
        self._hold = decision.state
        # 3. report
        counted = {**{rid: t for rid, (t, _) in self._departed.items()}, **running}
        held = held_by_type(counted, (grant or EMPTY).as_dict(), self.options.gpu_types)
        link.report(decision.demand_units, held, obs.current_replicas, unknown, p99_ms)
        self._log_mode(grant)
        return decision.num_replicas, {}

    def _log_mode(self, grant: Allocation | None) -> None:
        mode = "fallback" if grant is None else "arbiter"
        link, bounds = self.link, self.bounds
        assert link is not None and bounds is not None
        if mode == self._mode or (grant is None and not link.tried):
            return
        if mode == "fallback":
            logger.warning(
                "service %r: no grant from arbiter %s/%s; scaling on load alone within [%d, %d] "
                "(Serve's default behaviour) until it answers",
                link.name,
                self.options.arbiter_namespace,
                self.options.arbiter_name,
                bounds.min_replicas,
                bounds.max_replicas,
            )
        else:
            logger.info("service %r: arbiter answers; replicas capped at its grant %s", link.name, grant)
        self._mode = mode


# What this process (the Serve controller) has warned about: each warning once, however often Serve builds the
# policy again (every redeploy of the deployment builds a new one).
_WARNED: set[str] = set()
_WARNED_LOCK = threading.Lock()


def warn_once(message: str) -> None:
    """Log ``message`` as a warning in the controller's log, unless this process has logged it already."""
    with _WARNED_LOCK:
        if message in _WARNED:
            return
        _WARNED.add(message)
    logger.warning(message)


def replica_p99_ms(ctx: Any) -> float | None:
    """The highest ``tidal_p99_ms`` custom metric over running replicas, or None when none pushes it."""
    values = [v for v in ((ctx.aggregated_metrics or {}).get(P99_METRIC) or {}).values() if v is not None]
    return max(values) if values else None


def replica_gpu_types(ctx: Any) -> dict[str, str | None]:
    """Running replica id -> the GPU type its node carries (None until the replica has reported it).

    Reads the ``tidal_gpu_type:<TYPE>`` custom metrics that Tidal's model server pushes with Serve's own
    autoscaling metrics: the fast path, no remote call at all. A replica that pushes none (any user's) stays
    None here, and the link thread resolves it off the control loop.
    """
    out: dict[str, str | None] = {_rid(r): None for r in ctx.running_replicas}
    metrics = ctx.aggregated_metrics or {}
    for key, per_replica in metrics.items():
        if not key.startswith(GPU_TYPE_METRIC_PREFIX):
            continue
        gpu_type = key[len(GPU_TYPE_METRIC_PREFIX) :]
        for rid, value in per_replica.items():
            r = _rid(rid)
            if r in out and value and value > 0.5 and gpu_type != UNKNOWN_GPU_TYPE:
                out[r] = gpu_type
    return out


def _rid(replica_id: Any) -> str:
    return getattr(replica_id, "unique_id", None) or str(replica_id)


# In Serve's controller, importing this module (Serve imports the policy's module to build a deployment's config)
# puts the policy_kwargs check in place before the deploy goes on: bad kwargs fail their application's deploy.
install_deploy_check()
