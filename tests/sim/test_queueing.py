"""The per-segment queue model of simulated services (tidal.cluster.sim.queueing)."""

from __future__ import annotations

import math

import pytest
from tidal.cluster.sim.queueing import erlang_c, integrate_segment


def _exact_erlang_c(m: int, a: float) -> float:
    inv_b = 1.0
    for k in range(1, m + 1):
        inv_b = 1.0 + inv_b * k / a
    b = 1.0 / inv_b
    return m * b / (m - a * (1.0 - b))


def test_erlang_c_matches_textbook_values() -> None:
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: a request waits with probability rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)


@pytest.mark.parametrize("m", [64, 200, 1000, 3000])
@pytest.mark.parametrize("rho", [0.8, 0.9, 0.97])
def test_erlang_c_for_many_servers_stays_within_five_percent_of_the_exact_recursion(
    m: int, rho: float
) -> None:
    exact = _exact_erlang_c(m, rho * m)
    assert erlang_c(m, rho * m) == pytest.approx(exact, rel=0.05, abs=1e-12)


def test_overloaded_segment_meets_the_slo_only_until_the_backlog_passes_the_slack() -> None:
    # 20 rps into 10 rps of capacity with 40 slots (4 s service): backlog grows 10/s; an arrival meets
    # the 10 s SLO while it waits <= 6 s, i.e. backlog <= 60, i.e. for the first 6 s of the minute.
    res, _ = integrate_segment(duration_s=60, lam=20, cap_rps=10, m=40, backlog=0, slo_s=10, timeout_s=1000)
    assert res.arrivals == pytest.approx(1200)
    assert res.within_slo == pytest.approx(120)
    assert res.backlog_end == pytest.approx(600)


def test_backlog_is_capped_by_the_timeout() -> None:
    res, _ = integrate_segment(duration_s=60, lam=20, cap_rps=10, m=40, backlog=0, slo_s=10, timeout_s=30)
    assert res.backlog_end == pytest.approx(300)  # 30 s of waiting at 10 rps


def test_draining_backlog_then_stable_queue() -> None:
    # 100 waiting, 5 rps spare: empty after 20 s; arrivals meet the SLO once backlog <= 6 s * 10 = 60,
    # i.e. from t = 8 s; after the backlog is gone, the M/M/40 queue at rho 0.5 almost never waits.
    res, _ = integrate_segment(duration_s=60, lam=5, cap_rps=10, m=40, backlog=100, slo_s=10, timeout_s=1000)
    assert res.backlog_end == 0
    assert res.within_slo == pytest.approx(5 * 12 + 5 * 40, rel=1e-6)


def test_no_replica_misses_every_request() -> None:
    res, _ = integrate_segment(duration_s=10, lam=100, cap_rps=0, m=0, backlog=0, slo_s=10, timeout_s=60)
    assert (res.arrivals, res.within_slo) == (1000, 0)


def test_stable_queue_near_saturation_misses_some_requests() -> None:
    # 4 slots at rho 0.95 wait long: P(W > slack) is large, so the share within the SLO drops.
    res, _ = integrate_segment(duration_s=60, lam=0.95, cap_rps=1.0, m=4, backlog=0, slo_s=10, timeout_s=1000)
    s = 4.0
    decay = (4 - 0.95 * s) / s
    expected = 1 - erlang_c(4, 0.95 * s) * math.exp(-decay * (10 - s))
    assert res.within_slo / res.arrivals == pytest.approx(expected)
    assert res.within_slo / res.arrivals < 0.9
