"""Trace loaders and load scaling (tidal.cluster.sim.traces, tidal.cluster.sim.run)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tidal.cluster.sim.run import replicate_jobs
from tidal.cluster.sim.traces import (
    DAY_S,
    RateSeries,
    TraceError,
    load_inference_trace,
    load_request_trace,
    load_training_trace,
)

TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"
PHILLY = TRACES / "philly_2017-09_10.csv"
SERVEGEN = TRACES / "servegen_m-large_days1-7.csv"
AZURE = TRACES / "azure_llm_2023_code.csv"
needs_traces = pytest.mark.skipif(not PHILLY.exists(), reason="development traces are not on this machine")


@needs_traces
def test_philly_loads_every_job_aligned_to_midnight_of_its_first_day() -> None:
    jobs = load_training_trace(PHILLY)
    assert len(jobs) == 52_849
    assert jobs[0].submit_s == 10 * 3600 + 30 * 60 + 41  # 2017-09-04 10:30:41
    assert jobs[0].num_gpus == 8 and jobs[0].gpu_type is None
    assert all(a.submit_s <= b.submit_s for a, b in zip(jobs, jobs[1:], strict=False))


@needs_traces
def test_a_time_window_keeps_the_time_of_day() -> None:
    window = load_training_trace(PHILLY, start_day=30, days=1)
    assert window and all(0 <= j.submit_s < DAY_S for j in window)
    full = load_training_trace(PHILLY)
    in_day = [j for j in full if 30 * DAY_S <= j.submit_s < 31 * DAY_S]
    assert [j.submit_s for j in window] == [j.submit_s - 30 * DAY_S for j in in_day]


@needs_traces
def test_servegen_rate_trace_repeats_weekly() -> None:
    s = load_inference_trace(SERVEGEN)
    assert len(s.starts_s) == 1008 and s.period_s == 7 * DAY_S
    assert s.rate_at(3600) == s.rate_at(3600 + 7 * DAY_S) == s.rate_at(3600 + 14 * DAY_S)
    assert 48 < s.mean_rps() < 583 and s.peak_rps() == pytest.approx(583, abs=1)


@needs_traces
def test_azure_request_trace_bins_every_request() -> None:
    s = load_inference_trace(AZURE)
    assert sum(r * 60 for r in s.rates_rps) == pytest.approx(8819)
    assert s.starts_s[0] == 18 * 3600 + 17 * 60  # its first request's minute of the day


def test_seconds_and_iso_timestamps_both_load(tmp_path: Path) -> None:
    p = tmp_path / "jobs.csv"
    p.write_text("timestamp,duration,num_gpus,gpu_type,priority\n100,60,2,H100,5\n40,30,1,,\n")
    jobs = load_training_trace(p)
    assert [(j.submit_s, j.gpu_type, j.priority) for j in jobs] == [(40, None, None), (100, "H100", 5)]
    q = tmp_path / "reqs.csv"
    q.write_text("timestamp\n2024-01-01T00:00:30\n2024-01-01T00:00:45\n2024-01-01T00:01:10\n")
    s = load_request_trace(q, window_s=60)
    assert s.starts_s == (0.0, 60.0) and s.rates_rps == (2 / 60, 1 / 60)


def test_a_bad_row_names_file_row_column_and_what_is_valid(tmp_path: Path) -> None:
    p = tmp_path / "jobs.csv"
    p.write_text("timestamp,duration,num_gpus\n0,60,2\n5,60,two\n")
    with pytest.raises(
        TraceError, match=r"line 3: num_gpus = 'two' is not valid; expected a whole number >= 1"
    ):
        load_training_trace(p)
    q = tmp_path / "rates.csv"
    q.write_text("window_start_s,total_rate_rps\n0,5\n600,-1\n")
    with pytest.raises(TraceError, match=r"line 3: total_rate_rps = '-1'"):
        load_inference_trace(q)


def test_a_file_without_known_columns_is_refused_with_what_it_has(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(TraceError, match="expected a window_start_s column .* found: a, b"):
        load_inference_trace(p)


def test_linear_interpolation_runs_between_window_centres_and_wraps() -> None:
    s = RateSeries("x", (0.0, 600.0), (150.0, 270.0), 1200.0, repeat=True)
    assert [s.interpolated_rate_at(t) for t in (300, 600, 900, 1200)] == [150, 210, 270, 210]
    rate, _, end = s.segment_at(630, 60)
    assert (rate, end) == (pytest.approx(150 + 120 * 330 / 600), 660)  # midpoint 630 s
    assert s.segment_at(630, None) == (270.0, 1.0, 1200.0)


def test_replicating_jobs_scales_the_load_deterministically() -> None:
    jobs = load_training_trace(PHILLY, start_day=30, days=1) if PHILLY.exists() else []
    if not jobs:
        pytest.skip("development traces are not on this machine")
    doubled = replicate_jobs(jobs, 2.0, 1800, seed=0)
    assert len(doubled) == 2 * len(jobs)
    assert sum(j.duration_s * j.num_gpus for j in doubled) == pytest.approx(
        2 * sum(j.duration_s * j.num_gpus for j in jobs)
    )
    assert doubled == replicate_jobs(jobs, 2.0, 1800, seed=0)
    assert doubled != replicate_jobs(jobs, 2.0, 1800, seed=1)
    assert 1.4 * len(jobs) < len(replicate_jobs(jobs, 1.5, 1800, seed=0)) < 1.6 * len(jobs)
