"""Prometheus metrics of the arbiter (prometheus-client), exported by the arbiter actor over HTTP.

Fed from two places: ``on_tick`` (a ``ResourceArbiter.listeners`` entry: decision time, reclaim events) and
``update`` (the arbiter's ``status()`` after each tick: inventory, grants, demand, cost). A private
``CollectorRegistry`` keeps these apart from whatever else the process registers.

Metrics (``deploy/grafana-dashboard.json`` charts them):

==========================================  =========  ===================================================
name                                        type       labels
==========================================  =========  ===================================================
tidal_gpus                                  gauge      gpu_type, state (total | granted | free)
tidal_nodes                                 gauge      gpu_type (healthy nodes)
tidal_grant_units / tidal_grant_gpus        gauge      workload, kind, gpu_type
tidal_held_units                            gauge      workload, kind, gpu_type
tidal_demand_units                          gauge      workload, kind
tidal_demand_gpus                           gauge      workload, kind, gpu_type (demand at the type it is
                                                       granted, else "any")
tidal_cost_per_hour_dollars                 gauge      workload, kind
tidal_allocation_ratio                      gauge      (granted GPUs / healthy GPUs)
tidal_cluster_cost_per_hour_dollars         gauge
tidal_workloads                             gauge      kind
tidal_reclaims_total                        counter    donor, gpu_type
tidal_forced_releases_total                 counter    workload
tidal_forced_release_escalations_total      counter    workload (a harder stop: the last one unconfirmed)
tidal_forced_release_failures_total         counter    workload (a forced stop that could not be sent)
tidal_expirations_total                     counter    workload
tidal_reclaim_duration_seconds              histogram  (shrink decided -> GPUs released or forced)
tidal_decision_seconds                      histogram  (policy decide() time)
tidal_tick_seconds                          histogram  (a whole tick: observe, decide, plan, persist)
==========================================  =========  ===================================================
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from tidal.cluster.arbiter import TickReport

logger = logging.getLogger(__name__)

_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_RECLAIM_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class ArbiterMetrics:
    """The arbiter's Prometheus metrics. ``serve(port)`` exports them; ``render()`` gives the text."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.gpus = Gauge("tidal_gpus", "GPUs by type and state", ["gpu_type", "state"], registry=r)
        self.nodes = Gauge("tidal_nodes", "Healthy GPU nodes by type", ["gpu_type"], registry=r)
        wl = ["workload", "kind", "gpu_type"]
        self.grant_units = Gauge("tidal_grant_units", "Granted units (replicas/workers)", wl, registry=r)
        self.grant_gpus = Gauge("tidal_grant_gpus", "Granted GPUs", wl, registry=r)
        self.held_units = Gauge("tidal_held_units", "Units the workload reports holding", wl, registry=r)
        self.demand_units = Gauge("tidal_demand_units", "Units the workload needs now", ["workload", "kind"], registry=r)
        self.demand_gpus = Gauge("tidal_demand_gpus", "GPUs the workload needs now", wl, registry=r)
        self.cost = Gauge("tidal_cost_per_hour_dollars", "$ per hour of the grant", ["workload", "kind"], registry=r)
        self.allocation_ratio = Gauge("tidal_allocation_ratio", "Granted GPUs / healthy GPUs", registry=r)
        self.cluster_cost = Gauge("tidal_cluster_cost_per_hour_dollars", "$ per hour of all grants", registry=r)
        self.workloads = Gauge("tidal_workloads", "Registered workloads", ["kind"], registry=r)
        self.reclaims = Counter("tidal_reclaims", "Units reclaimed from a donor", ["donor", "gpu_type"], registry=r)
        self.forced = Counter("tidal_forced_releases", "Workloads stopped by force", ["workload"], registry=r)
        self.force_escalations = Counter(
            "tidal_forced_release_escalations", "Harder stops after an unconfirmed forced stop", ["workload"], registry=r
        )
        self.force_failures = Counter(
            "tidal_forced_release_failures", "Forced stops that could not be sent", ["workload"], registry=r
        )
        self.expired = Counter("tidal_expirations", "Registrations expired (silent workloads)", ["workload"], registry=r)
        # Churn: a grant that falls to nothing stops its workload (a job then waits, checkpointed); one
        # that rises from nothing starts it, a restart if it was stopped before.
        self.stops = Counter("tidal_stops", "Grants shrunk to nothing (the workload stops)", ["workload"], registry=r)
        self.starts = Counter("tidal_starts", "Grants grown from nothing (the workload starts)", ["workload"], registry=r)
        self.reclaim_duration = Histogram(
            "tidal_reclaim_duration_seconds", "Shrink decided -> GPUs released", buckets=_RECLAIM_BUCKETS, registry=r
        )
        self.decision = Histogram(
            "tidal_decision_seconds", "Policy decide() time", buckets=_SECONDS_BUCKETS, registry=r
        )
        self.tick = Histogram("tidal_tick_seconds", "Whole tick time", buckets=_SECONDS_BUCKETS, registry=r)
        self._labelled: dict[Gauge, set[tuple[str, ...]]] = {}
        self.port: int | None = None

    # ------------------------------------------------------------------------------------ feeding

    def on_tick(self, report: TickReport) -> None:
        """A ``ResourceArbiter.listeners`` entry: decision time and what the tick's events say."""
        self.decision.observe(report.decide_ms / 1e3)
        for e in report.events:
            if e.kind == "reclaim":
                self.reclaims.labels(e.workload, str(e.detail.get("gpu_type", ""))).inc(
                    float(e.detail.get("units", 1))
                )
            elif e.kind in ("released", "force_confirmed") and "reclaim_s" in e.detail:
                self.reclaim_duration.observe(float(e.detail["reclaim_s"]))
            elif e.kind == "shrink" and not e.detail.get("to"):
                self.stops.labels(e.workload).inc()
            elif e.kind == "grow" and not e.detail.get("from"):
                self.starts.labels(e.workload).inc()
            elif e.kind == "forced":
                self.forced.labels(e.workload).inc()
            elif e.kind == "force_escalated":
                self.force_escalations.labels(e.workload).inc()
            elif e.kind == "force_failed":
                self.force_failures.labels(e.workload).inc()
            elif e.kind == "expired":
                self.expired.labels(e.workload).inc()

    def update(self, status: Mapping[str, Any], tick_s: float | None = None) -> None:
        """Sets every gauge from an arbiter ``status()``; series of gone workloads are removed."""
        if tick_s is not None:
            self.tick.observe(tick_s)
        cap: Mapping[str, float] = status.get("capacity", {})
        granted: Mapping[str, float] = status.get("granted", {})
        free: Mapping[str, float] = status.get("free", {})
        gpu_rows = {}
        for t in set(cap) | set(granted):
            gpu_rows[(t, "total")] = cap.get(t, 0.0)
            gpu_rows[(t, "granted")] = granted.get(t, 0.0)
            gpu_rows[(t, "free")] = free.get(t, 0.0)
        self._set(self.gpus, gpu_rows)
        self._set(self.nodes, {(t,): float(n) for t, n in status.get("nodes", {}).items()})
        grant_units, grant_gpus, held, demand, demand_gpus, cost = {}, {}, {}, {}, {}, {}
        kinds: dict[tuple[str, ...], float] = {}
        for w in status.get("workloads", []):
            name, kind, g = w["name"], w["kind"], float(w["gpus_per_unit"])
            for t, n in w.get("grant", {}).items():
                grant_units[(name, kind, t)] = float(n)
                grant_gpus[(name, kind, t)] = float(n) * g
            for t, n in w.get("held", {}).items():
                held[(name, kind, t)] = float(n)
            demand[(name, kind)] = float(w["demand_units"])
            where = next(iter(w.get("grant") or {}), None) or next(iter(w.get("gpu_types") or []), "any")
            demand_gpus[(name, kind, where)] = float(w["demand_units"]) * g
            cost[(name, kind)] = float(w.get("cost_per_hour", 0.0))
            kinds[(kind,)] = kinds.get((kind,), 0.0) + 1
        self._set(self.grant_units, grant_units)
        self._set(self.grant_gpus, grant_gpus)
        self._set(self.held_units, held)
        self._set(self.demand_units, demand)
        self._set(self.demand_gpus, demand_gpus)
        self._set(self.cost, cost)
        self._set(self.workloads, kinds)
        self.allocation_ratio.set(float(status.get("allocation_ratio", 0.0)))
        self.cluster_cost.set(float(status.get("cost_per_hour", 0.0)))

    def _set(self, gauge: Gauge, rows: Mapping[tuple[str, ...], float]) -> None:
        for labels, value in rows.items():
            gauge.labels(*labels).set(value)
        for labels in self._labelled.get(gauge, set()) - set(rows):
            try:
                gauge.remove(*labels)
            except KeyError:
                pass
        self._labelled[gauge] = set(rows)

    # ------------------------------------------------------------------------------------ export

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Starts the HTTP exporter (``/metrics``) in a daemon thread; returns the port.

        ``addr`` is the address it binds: this machine only by default; ``0.0.0.0`` (the policy file's
        ``arbiter.metrics_host``) lets a Prometheus on another machine scrape it, and anyone else who can reach
        the port read it.
        """
        start_http_server(port, addr=addr, registry=self.registry)
        self.port = port
        logger.info("arbiter metrics on http://%s:%d/metrics", addr, port)
        return port

    def render(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()
