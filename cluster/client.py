"""``ArbiterClient``: how a workload talks to the arbiter actor, from any Ray driver, actor or worker.

Six calls. ``register`` (blocking, at start-up), ``heartbeat_nowait`` (never blocks: for hot paths such as
Serve's autoscaling policy, which runs inside the Serve controller), ``heartbeat`` (blocking, with a timeout),
``watch_grant`` (blocking until the grant changes: for a thread of its own, see below), ``unregister``, and
``available``.

``heartbeat_nowait`` keeps at most one call in flight per workload: it fires a call, and on later calls
reads its reply with ``ray.wait([ref], timeout=0)`` (no wait) and fires the next one. While a call is in
flight the newest report is kept and sent with the next call, so a release is never lost, only coalesced.
It returns the newest ``GrantView`` that has arrived (None before the first).

``watch_grant`` holds a call on the arbiter that returns as soon as the workload's grant changes (the tick
that decides a shrink answers it), and makes its view the newest: a caller that waits on it in a thread of
its own hears of a shrink at once instead of at its next heartbeat. A heartbeat reply fired before that view
arrived and older than it (a lower generation) does not replace it.

If a reply says the workload is not registered (it expired, or the arbiter lost it), the client registers
it again with the spec and meta it registered with, and what it last reported it holds, without blocking.

Example::

    client = ArbiterClient()
    view = client.register(TrainingJobSpec("job-a", 1.0, 1, 4, ("H100",)), meta={"submission_id": sid})
    while running:
        view = client.heartbeat_nowait("job-a", held={"H100": workers}, progress={"step": step}) or view
        ...  # shrink to view.grant when it drops below what is held
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from tidal.cluster.actor import ARBITER_NAME, ARBITER_NAMESPACE
from tidal.cluster.model import GpuType, GrantView, WorkloadName, WorkloadSpec

logger = logging.getLogger(__name__)


class ArbiterUnavailableError(RuntimeError):
    """The arbiter actor does not exist (not started) or did not answer in time."""


@dataclass
class _Pending:
    ref: ray.ObjectRef | None = None
    fired_s: float = 0.0
    queued: dict[str, Any] | None = None  # the newest report, waiting for the call in flight
    latest: GrantView | None = None
    watched_s: float = float("-inf")  # when a watch_grant view became ``latest``
    reregister: ray.ObjectRef | None = None
    held: dict[str, int] | None = None  # the newest ``held`` reported, sent again with a re-registration
    errors: int = 0
    last_rtt_s: float | None = None
    rtts_s: list[float] = field(default_factory=list)


class ArbiterClient:
    """Talks to the arbiter actor ``name`` in ``namespace``. See the module docstring.

    Args:
        lookup_interval_s: how often, at most, a missing actor is looked up again (so that a caller's hot
            path does not hammer the GCS while the arbiter is down).
    """

    def __init__(
        self,
        name: str = ARBITER_NAME,
        namespace: str = ARBITER_NAMESPACE,
        *,
        lookup_interval_s: float = 1.0,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.lookup_interval_s = lookup_interval_s
        self._handle: Any = None
        self._last_lookup_s = float("-inf")
        self._pending: dict[WorkloadName, _Pending] = {}
        self._registrations: dict[WorkloadName, tuple[WorkloadSpec, dict[str, Any]]] = {}
        self._latest_lock = threading.Lock()  # watch_grant runs in another thread than heartbeat_nowait

    # ------------------------------------------------------------------------------------ lookup

    def _actor(self, *, force: bool = False) -> Any:
        if self._handle is not None:
            return self._handle
        now = time.monotonic()
        if not force and now - self._last_lookup_s < self.lookup_interval_s:
            return None
        self._last_lookup_s = now
        try:
            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        except ValueError:
            self._handle = None
        return self._handle

    def available(self) -> bool:
        """True when the arbiter actor exists (it may still be restarting)."""
        return self._actor(force=True) is not None

    def _require(self) -> Any:
        handle = self._actor(force=True)
        if handle is None:
            raise ArbiterUnavailableError(
                f"no arbiter actor {self.name!r} in namespace {self.namespace!r}: start it with "
                "`tidal arbiter start` (or `tidal up`)"
            )
        return handle

    # ------------------------------------------------------------------------------------ calls

    def register(
        self,
        spec: WorkloadSpec,
        meta: Mapping[str, Any] | None = None,
        *,
        demand_units: int | None = None,
        held: Mapping[GpuType, int] | None = None,
        timeout_s: float = 30.0,
    ) -> GrantView:
        """Registers ``spec`` (idempotent; keeps an existing grant). Blocking: call it at start-up.

        ``demand_units`` is the demand to start from (default: the spec's max): a service registering at
        deploy time should pass what its load needs now, or it asks for ``max_replicas`` until its first
        heartbeat. ``held`` is what the workload holds as it registers (a workload registering again after
        its registration expired still holds GPUs): the arbiter grants nobody else into them.
        """
        handle = self._require()
        meta_d = dict(meta or {})
        held_d = None if held is None else dict(held)
        view = self._get(handle.register.remote(spec, meta_d, demand_units, held_d), timeout_s, "register")
        if view.registered:
            self._registrations[spec.name] = (spec, meta_d)
            p = self._pending.setdefault(spec.name, _Pending())
            p.latest = view
            if held_d is not None:
                p.held = held_d
        return view

    def heartbeat_nowait(
        self,
        name: WorkloadName,
        *,
        demand_units: int | None = None,
        held: Mapping[GpuType, int] | None = None,
        progress: Mapping[str, Any] | None = None,
        seconds_since_checkpoint: float | None = None,
    ) -> GrantView | None:
        """Reports and returns the newest grant that has arrived, without ever blocking."""
        p = self._pending.setdefault(name, _Pending())
        report = _report(demand_units, held, progress, seconds_since_checkpoint)
        if held is not None:
            p.held = report["held"]
        p.queued = _merge(p.queued, report)
        self._collect(name, p)
        if p.ref is None and p.reregister is None:
            handle = self._actor()
            if handle is not None:
                try:
                    p.ref = handle.heartbeat.remote(name, **(p.queued or {}))
                    p.fired_s = time.monotonic()
                    p.queued = None
                except Exception as e:  # the handle can be stale after the actor was deleted
                    logger.warning("heartbeat for %s not sent: %r", name, e)
                    self._handle = None
        return p.latest

    def heartbeat(
        self,
        name: WorkloadName,
        *,
        demand_units: int | None = None,
        held: Mapping[GpuType, int] | None = None,
        progress: Mapping[str, Any] | None = None,
        seconds_since_checkpoint: float | None = None,
        timeout_s: float = 5.0,
    ) -> GrantView:
        """Reports and waits for the reply (at most ``timeout_s``)."""
        handle = self._require()
        p = self._pending.setdefault(name, _Pending())
        report = _merge(p.queued, _report(demand_units, held, progress, seconds_since_checkpoint))
        if held is not None:
            p.held = report["held"]
        p.queued = None
        t0 = time.monotonic()
        view = self._get(handle.heartbeat.remote(name, **report), timeout_s, "heartbeat")
        p.last_rtt_s = time.monotonic() - t0
        p.latest = view
        if not view.registered and name in self._registrations:
            spec, meta = self._registrations[name]
            view = self._get(handle.register.remote(spec, meta, None, p.held), timeout_s, "register")
            p.latest = view
        return view

    def watch_grant(
        self, name: WorkloadName, known: Mapping[GpuType, int] | None, *, timeout_s: float = 10.0
    ) -> GrantView:
        """Blocks until the arbiter's grant for ``name`` differs from ``known``, or ``timeout_s`` passes;
        returns the view then (the newest one ``heartbeat_nowait`` returns from then on, too).

        Raises:
            ArbiterUnavailableError: no arbiter, or it did not answer within ``timeout_s`` + 10 s.
        """
        handle = self._require()
        fired_s = time.monotonic()
        view: GrantView = self._get(
            handle.watch_grant.remote(name, dict(known or {}), timeout_s), timeout_s + 10.0, "watch_grant"
        )
        p = self._pending.setdefault(name, _Pending())
        with self._latest_lock:
            if p.latest is None or view.generation >= p.latest.generation or p.fired_s < fired_s:
                p.latest = view
                p.watched_s = time.monotonic()
        return view

    def unregister(self, name: WorkloadName, *, timeout_s: float = 10.0) -> bool:
        """Gives the workload's grant back at once (rather than at registration expiry)."""
        self._registrations.pop(name, None)
        self._pending.pop(name, None)
        handle = self._actor(force=True)
        if handle is None:
            return False
        return bool(self._get(handle.unregister.remote(name), timeout_s, "unregister"))

    def latest(self, name: WorkloadName) -> GrantView | None:
        """The newest reply for ``name`` that has arrived, without sending anything."""
        p = self._pending.get(name)
        if p is None:
            return None
        self._collect(name, p)
        return p.latest

    def status(self, *, timeout_s: float = 10.0) -> dict[str, Any]:
        return self._get(self._require().status.remote(), timeout_s, "status")

    # ------------------------------------------------------------------------------------ helpers

    def _collect(self, name: WorkloadName, p: _Pending) -> None:
        if p.reregister is not None:
            ready, _ = ray.wait([p.reregister], timeout=0)
            if ready:
                try:
                    p.latest = ray.get(p.reregister)
                except Exception as e:
                    logger.warning("re-registering %s failed: %r", name, e)
                p.reregister = None
        if p.ref is None:
            return
        ready, _ = ray.wait([p.ref], timeout=0)
        if not ready:
            return
        try:
            view: GrantView = ray.get(p.ref)
            p.errors = 0
            p.last_rtt_s = time.monotonic() - p.fired_s
            with self._latest_lock:
                if not _stale(view, p):
                    p.latest = view
        except Exception as e:
            # The actor died for good, or the call failed: keep the last grant, look the actor up again.
            p.errors += 1
            logger.warning("heartbeat for %s failed (%d in a row): %r", name, p.errors, e)
            self._handle = None
            p.ref = None
            return
        p.ref = None
        if not view.registered and name in self._registrations:
            handle = self._actor()
            if handle is not None:
                spec, meta = self._registrations[name]
                logger.info("arbiter does not know %s (%s): registering it again", name, view.reason)
                p.reregister = handle.register.remote(spec, meta, None, p.held)

    def _get(self, ref: ray.ObjectRef, timeout_s: float, what: str) -> Any:
        try:
            return ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise ArbiterUnavailableError(f"arbiter did not answer {what} within {timeout_s} s") from e
        except ray.exceptions.RayActorError as e:
            self._handle = None
            raise ArbiterUnavailableError(f"arbiter actor is gone ({what}): {e}") from e


def _stale(reply: GrantView, p: _Pending) -> bool:
    """A heartbeat reply fired before a watched view arrived, and older than it: the watched view stays.

    (A reply fired after it always wins, even with a lower generation: an arbiter restored from an older
    state counts from there.)
    """
    latest = p.latest
    return latest is not None and p.fired_s < p.watched_s and reply.generation < latest.generation


def _report(
    demand_units: int | None,
    held: Mapping[GpuType, int] | None,
    progress: Mapping[str, Any] | None,
    seconds_since_checkpoint: float | None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if demand_units is not None:
        out["demand_units"] = int(demand_units)
    if held is not None:
        out["held"] = dict(held)
    if progress is not None:
        out["progress"] = dict(progress)
    if seconds_since_checkpoint is not None:
        out["seconds_since_checkpoint"] = float(seconds_since_checkpoint)
    return out


def _merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The newest value of each field wins; progress dicts are merged (the arbiter merges them too)."""
    if not old:
        return dict(new)
    out = {**old, **new}
    if "progress" in old and "progress" in new:
        out["progress"] = {**old["progress"], **new["progress"]}
    return out
