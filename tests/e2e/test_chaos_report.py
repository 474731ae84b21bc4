"""How bench/chaos.py checks the books and splits failed requests (pure, no Ray)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from tidal.demo.loadgen import RequestRecord

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chaos():
    spec = importlib.util.spec_from_file_location("chaos_bench", ROOT / "bench" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def workload(name, kind, grant, held, per_unit=1.0):
    return {
        "name": name, "kind": kind, "gpus_per_unit": per_unit, "grant": grant, "held": held,
        "grant_gpus": {t: n * per_unit for t, n in grant.items()},
    }  # fmt: skip


def status(*workloads, capacity):
    return {"capacity": capacity, "workloads": list(workloads)}


def test_books_that_match_rays_view_add_up(chaos):
    st = status(
        workload("demo", "service", {"A100": 1, "RTX4090": 2}, {"A100": 1, "RTX4090": 2}),
        workload("demo-lo", "training", {"A100": 1}, {"A100": 1}),
        capacity={"A100": 2.0, "RTX4090": 2.0},
    )
    report = chaos.books_report(st, {"A100": 2.0, "RTX4090": 2.0}, {"A100": 1.0, "RTX4090": 2.0}, {"A100": 1.0}, "demo")
    assert report["grants_add_up"] is True
    assert all(report["checks"].values())


def test_a_type_granted_beyond_its_alive_gpus_does_not_add_up(chaos):
    # The RTX4090 node died: Ray has none left, and the books still grant two.
    st = status(workload("demo", "service", {"RTX4090": 2}, {}), capacity={"RTX4090": 2.0})
    report = chaos.books_report(st, {}, {}, {}, "demo")
    assert report["checks"]["grants_within_capacity"] is False
    assert report["checks"]["arbiter_capacity_is_rays"] is False
    assert report["grants_add_up"] is False


def test_a_holder_beyond_its_grant_or_workers_beyond_the_books_do_not_add_up(chaos):
    st = status(workload("demo-lo", "training", {"A100": 1}, {"A100": 2}), capacity={"A100": 2.0})
    report = chaos.books_report(st, {"A100": 2.0}, {}, {"A100": 2.0}, "demo")
    assert report["checks"]["held_within_grants"] is False
    assert report["held_beyond_grant"] == [{"name": "demo-lo", "held": {"A100": 2}, "grant": {"A100": 1}}]
    st = status(workload("demo-lo", "training", {"A100": 1}, {"A100": 1}), capacity={"A100": 2.0})
    assert chaos.books_report(st, {"A100": 2.0}, {}, {"A100": 2.0}, "demo")["checks"]["train_workers_within_jobs_held"] is False


def test_a_service_whose_replicas_are_not_its_held_gpus_does_not_add_up(chaos):
    st = status(workload("demo", "service", {"A100": 2}, {"A100": 2}), capacity={"A100": 2.0})
    report = chaos.books_report(st, {"A100": 2.0}, {"A100": 1.0}, {}, "demo")
    assert report["checks"]["service_held_is_its_replicas"] is False


def test_failed_requests_are_split_by_whether_they_were_sent_before_the_fault(chaos):
    records = [
        RequestRecord(1.0, 1.0, 100.0, 200),  # answered before the fault at 5 s
        RequestRecord(4.8, 4.8, 400.0, 500),  # in flight at 5 s, failed
        RequestRecord(4.9, 4.9, 200.0, 200),  # in flight at 5 s, answered
        RequestRecord(6.0, 6.0, 30000.0, 0, "timeout"),  # sent after the fault, failed
    ]
    split = chaos.request_split(records, 5.0)
    assert split["requests"] == 4 and split["failed_requests"] == 2
    assert split["in_flight_at_fault"] == 2
    assert split["failed_sent_before_fault"] == 1 and split["failed_sent_after_fault"] == 1
    assert split["failed_errors"] == ["0 timeout", "500"]


def test_the_grants_a_restarted_arbiter_restored_are_its_first_answer_less_its_own_later_moves(chaos):
    first = {"demo": {"A100": 1, "RTX4090": 2}, "demo-hi": {"H100": 3}}
    events = [
        {"kind": "released", "workload": "demo-lo", "detail": {}},
        {"kind": "shrink", "workload": "demo-hi", "detail": {"from": {"H100": 4}, "to": {"H100": 3}}},
        {"kind": "grow", "workload": "demo", "detail": {"from": {"RTX4090": 2}, "to": {"A100": 1, "RTX4090": 2}}},
        {"kind": "grow", "workload": "demo", "detail": {"from": {"A100": 1, "RTX4090": 2}, "to": {"A100": 2}}},
        {"kind": "grow", "workload": "new-job", "detail": {"from": {}, "to": {"A100": 1}}},
    ]
    assert chaos.grants_before_events(first, events) == {"demo": {"RTX4090": 2}, "demo-hi": {"H100": 4}}
    assert chaos.grants_before_events(first, []) == first
