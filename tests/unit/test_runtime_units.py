"""Pure parts of the Ray runtime: node-table parsing, transient inventory errors, metrics, CLI refusals."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tidal.cluster.arbiter import ArbiterEvent, TickReport
from tidal.cluster.cli import main
from tidal.cluster.metrics import ArbiterMetrics
from tidal.cluster.model import NodeSnapshot
from tidal.cluster.ray_backend import InventoryUnavailableError, RayBackend, nodes_from_table


def _row(node_id: str, gpu_type: str | None, gpus: float, alive: bool = True) -> dict:
    labels = {"ray.io/node-id": node_id}
    if gpu_type:
        labels["ray.io/accelerator-type"] = gpu_type
    return {"NodeID": node_id, "Alive": alive, "Labels": labels, "Resources": {"GPU": gpus} if gpus else {"CPU": 1.0}}


def test_node_table_gives_labelled_gpu_nodes_only_and_dead_ones_as_unhealthy():
    rows = [_row("head", None, 0), _row("a", "A100", 2), _row("h", "H100", 4), _row("d", "A100", 0, alive=False)]
    assert nodes_from_table(rows) == (
        NodeSnapshot("a", "A100", 2.0, True),
        NodeSnapshot("d", "A100", 0.0, False),
        NodeSnapshot("h", "H100", 4.0, True),
    )


class ScriptedNodeTable:
    """Replays a queue of node tables; an exception in the queue is raised instead."""

    def __init__(self, *items):
        self.items = list(items)

    def __call__(self):
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


def test_backend_keeps_the_last_snapshot_through_transient_errors_and_raises_after_repeated_ones():
    table = [_row("a", "A100", 2)]
    err = ConnectionError("GCS unavailable")
    backend = RayBackend(ScriptedNodeTable(table, err, err, table, err, err, err), max_consecutive_failures=3)
    first = backend.observe()
    assert backend.observe() == first and backend.observe() == first
    assert backend.observe() == first and backend.consecutive_failures == 0
    backend.observe(), backend.observe()
    with pytest.raises(InventoryUnavailableError, match="3 failures in a row"):
        backend.observe()


def test_backend_raises_at_once_when_it_never_had_a_snapshot():
    with pytest.raises(InventoryUnavailableError):
        RayBackend(ScriptedNodeTable(TimeoutError("slow"))).observe()


def test_dead_node_keeps_the_gpu_count_it_had_while_alive():
    backend = RayBackend(ScriptedNodeTable([_row("a", "A100", 2)], [_row("a", "A100", 0, alive=False)]))
    backend.observe()
    assert backend.observe() == (NodeSnapshot("a", "A100", 2.0, False),)


def _status(workloads):
    return {
        "capacity": {"H100": 4.0, "A100": 2.0},
        "nodes": {"H100": 1, "A100": 1},
        "granted": {"H100": 2.0},
        "free": {"H100": 2.0, "A100": 2.0},
        "allocation_ratio": 2 / 6,
        "cost_per_hour": 4.98,
        "workloads": workloads,
    }


def _wl(name, grant):
    return {
        "name": name, "kind": "training", "gpus_per_unit": 1.0, "demand_units": 4, "grant": grant,
        "held": grant, "cost_per_hour": 4.98,
    }


def _samples(m: ArbiterMetrics) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(m.render())
        for s in fam.samples
    }


def test_metrics_follow_status_and_drop_series_of_gone_workloads():
    m = ArbiterMetrics()
    m.update(_status([_wl("job", {"H100": 2})]), tick_s=0.002)
    s = _samples(m)
    assert s[("tidal_gpus", (("gpu_type", "H100"), ("state", "free")))] == 2.0
    assert s[("tidal_grant_gpus", (("gpu_type", "H100"), ("kind", "training"), ("workload", "job")))] == 2.0
    assert s[("tidal_allocation_ratio", ())] == pytest.approx(1 / 3)
    m.update(_status([]))
    assert not any(k[0] == "tidal_grant_gpus" for k in _samples(m))


def test_metrics_count_reclaims_and_observe_reclaim_and_decision_times():
    m = ArbiterMetrics()
    events = (
        ArbiterEvent(1.0, "reclaim", "job", {"recipient": "svc", "gpu_type": "H100", "units": 2}),
        ArbiterEvent(3.5, "released", "job", {"reclaim_s": 2.5}),
        ArbiterEvent(4.0, "forced", "job2", {}),
    )
    m.on_tick(TickReport(4.0, 1.5, {}, (), events))
    s = _samples(m)
    assert s[("tidal_reclaims_total", (("donor", "job"), ("gpu_type", "H100")))] == 2.0
    assert s[("tidal_reclaim_duration_seconds_sum", ())] == 2.5
    assert s[("tidal_forced_releases_total", (("workload", "job2"),))] == 1.0
    assert s[("tidal_decision_seconds_sum", ())] == pytest.approx(0.0015)


def test_metrics_count_stops_and_starts_of_grants():
    m = ArbiterMetrics()
    events = (
        ArbiterEvent(1.0, "shrink", "job", {"from": {"H100": 4}, "to": {}}),
        ArbiterEvent(1.0, "shrink", "job2", {"from": {"H100": 4}, "to": {"H100": 2}}),
        ArbiterEvent(9.0, "grow", "job", {"from": {}, "to": {"H100": 4}}),
    )
    m.on_tick(TickReport(9.0, 1.0, {}, (), events))
    s = _samples(m)
    assert s[("tidal_stops_total", (("workload", "job"),))] == 1.0
    assert ("tidal_stops_total", (("workload", "job2"),)) not in s
    assert s[("tidal_starts_total", (("workload", "job"),))] == 1.0


def test_tidal_down_with_nothing_up_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TIDAL_HOME", str(tmp_path))
    assert main(["down"]) == 0
    assert "Nothing is up" in capsys.readouterr().out


def test_tidal_env_with_nothing_up_fails_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TIDAL_HOME", str(tmp_path))
    assert main(["env"]) == 1
    assert "nothing is up" in capsys.readouterr().err


def test_arbiter_start_refuses_a_bad_policy_file_before_touching_any_cluster(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TIDAL_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    bad = tmp_path / "policy.yaml"
    bad.write_text(json.dumps({"policy": "tidal", "arbiter": {"tick_interval_s": 0}}))
    assert main(["arbiter", "start", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "tick_interval_s" in err and "nothing was changed" in err


def test_up_refuses_a_bad_cluster_spec_without_starting_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TIDAL_HOME", str(tmp_path))
    spec = tmp_path / "cluster.yaml"
    spec.write_text("node_groups:\n  - {gpu_type: A100, num_gpus: -1}\n")
    assert main(["up", "--config", str(spec)]) == 2
    assert "node_groups[0].num_gpus" in capsys.readouterr().err
    assert not (tmp_path / "local-cluster.json").exists()


def test_grafana_dashboard_charts_only_metrics_the_arbiter_exports():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    dash = json.loads((root / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\btidal_[a-z_]+", e)}
    families = {fam.name for fam in ArbiterMetrics().registry.collect()}
    missing = {u for u in used if re.sub(r"_(bucket|sum|count|total)$", "", u) not in families}
    assert used and not missing, f"dashboard uses metrics nobody exports: {sorted(missing)}"
