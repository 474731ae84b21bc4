"""The load generator's schedules and summary (pure parts; the HTTP driver runs in the integration tests)."""

from pathlib import Path

import pytest
from tidal.demo import loadgen

TRACES = Path("/work/shared/traces")
BOUNDS = {"max_duration_s": 1e9, "max_requests": 10**9, "seed": 1}


def test_a_rate_trace_plays_the_same_requests_per_window_in_less_wall_time():
    windows = [loadgen.RateWindow(0, 10.0), loadgen.RateWindow(600, 20.0), loadgen.RateWindow(1200, 0.0)]
    arr = loadgen.arrivals_from_rates(windows, time_scale=60, rate_scale=1.0, trace_start_s=0, **BOUNDS)
    first = [t for t in arr if t < 10]
    second = [t for t in arr if 10 <= t < 20]
    # 600 s at 10 rps = 6000 requests in 10 wall seconds; the next window has twice as many.
    assert 5600 < len(first) < 6400
    assert 11200 < len(second) < 12800
    assert arr == sorted(arr) and arr[-1] < 20


def test_rate_scale_multiplies_the_load_and_the_seed_makes_it_repeatable():
    windows = [loadgen.RateWindow(0, 100.0), loadgen.RateWindow(10, 0.0)]
    a = loadgen.arrivals_from_rates(windows, time_scale=1, rate_scale=0.5, trace_start_s=0, **BOUNDS)
    b = loadgen.arrivals_from_rates(windows, time_scale=1, rate_scale=0.5, trace_start_s=0, **BOUNDS)
    assert a == b
    assert 400 < len(a) < 600


def test_schedules_stop_at_their_bounds():
    windows = [loadgen.RateWindow(0, 1000.0), loadgen.RateWindow(100, 0.0)]
    arr = loadgen.arrivals_from_rates(
        windows, time_scale=1, rate_scale=1, trace_start_s=0, max_duration_s=2.0, max_requests=10**6, seed=0
    )
    assert arr[-1] < 2.0
    arr = loadgen.arrivals_from_rates(
        windows, time_scale=1, rate_scale=1, trace_start_s=0, max_duration_s=100, max_requests=50, seed=0
    )
    assert len(arr) == 50


def test_a_request_trace_replays_scaled_thinned_and_replicated():
    times = [0.0, 1.0, 2.0, 3.0]
    assert loadgen.arrivals_from_requests(times, time_scale=2, rate_scale=1, trace_start_s=0, **BOUNDS) == [
        0.0,
        0.5,
        1.0,
        1.5,
    ]
    assert loadgen.arrivals_from_requests(times, time_scale=1, rate_scale=2, trace_start_s=1, **BOUNDS) == [
        0.0,
        0.0,
        1.0,
        1.0,
        2.0,
        2.0,
    ]
    many = [i * 0.01 for i in range(10_000)]
    thinned = loadgen.arrivals_from_requests(many, time_scale=1, rate_scale=0.25, trace_start_s=0, **BOUNDS)
    assert 2200 < len(thinned) < 2800


@pytest.mark.skipif(not TRACES.exists(), reason="shared traces not on this machine")
def test_the_shared_traces_parse():
    windows = loadgen.read_rate_trace(TRACES / "servegen_m-large_days1-7.csv")
    assert len(windows) == 1008 and windows[1].start_s - windows[0].start_s == 600
    times = loadgen.read_request_trace(TRACES / "azure_llm_2023_code.csv")
    assert len(times) == 8819 and times[0] == 0.0 and 3000 < times[-1] < 3600


def test_a_rate_trace_without_its_columns_is_refused_naming_them(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="window_start_s and total_rate_rps"):
        loadgen.read_rate_trace(p)


def test_percentiles_interpolate_and_the_summary_counts_errors_apart():
    assert loadgen.percentile([1, 2, 3, 4], 50) == 2.5
    assert loadgen.percentile([], 99) is None
    R = loadgen.RequestRecord
    recs = [R(0, 0, 10.0, 200), R(0, 0, 20.0, 200), R(0, 0, 5.0, 422), R(0, 0, 0.0, 0, "timeout")]
    s = loadgen.summarize(recs, wall_s=2.0)
    assert (s["requests"], s["ok"], s["errors"]) == (4, 2, 2)
    assert s["errors_by_kind"] == {"http_422": 1, "timeout": 1}
    assert s["throughput_rps"] == 1.0
    assert s["latency_ms"]["p50"] == 15.0


def test_only_loopback_targets_are_allowed():
    loadgen.check_loopback("http://127.0.0.1:8123/v1/predict")
    loadgen.check_loopback("http://localhost:8123/")
    with pytest.raises(ValueError, match="not loopback"):
        loadgen.check_loopback("http://example.com/v1/predict")
    assert loadgen.main(["--url", "http://10.0.0.1:1/", "--constant-rps", "1"]) == 2
