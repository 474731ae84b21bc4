"""The request-queue model of a simulated service: M/M/c waiting when stable, a fluid backlog when not.

Simulating each request of 8 weeks of traffic is too slow, so a service's queue is integrated over
*segments*: stretches of time with a constant arrival rate ``lam`` (the rate window of the trace) and a
constant set of running replicas (it changes only at simulator events). Per segment:

- **Servers.** Replica ``r`` of GPU type ``t`` serves ``replica_rps[t]`` requests per second with a
  latency of ``service_time_s[t]`` when nothing waits, so it has ``replica_rps * service_time_s``
  slots (Little's law; an LLM replica batches several requests). Replicas pool into ``m`` slots with
  capacity ``cap_rps`` and mean service time ``s = m / cap_rps``.
- **Stable** (no backlog, ``lam < cap_rps``): M/M/m waiting (Erlang C). A request waits with
  probability ``C(m, a)``, ``a = lam * s``, and then ``P(W > w) = C * exp(-(m - a) * w / (s * f))``;
  ``f = (cv^2 + 1) / 2`` stretches the tail for bursty arrivals (Allen-Cunneen; ``cv = 1`` is
  Poisson). Latency is the wait plus ``s`` (service latency taken as fixed), so the share of requests
  within the SLO is ``1 - C * exp(-(m - a) * (slo - s) / (s * f))``.
- **Overloaded or draining** (``lam >= cap_rps`` or a backlog ``q > 0``): a fluid queue,
  ``dq/dt = lam - cap_rps``, first come first served. A request arriving with backlog ``q`` waits
  ``q / cap_rps``; it meets the SLO when ``q <= (slo - s) * cap_rps``. Requests that would wait longer
  than ``timeout_s`` are dropped (missed), which caps the backlog at ``cap_rps * timeout_s``.

Example: 600 rps on 300 H100 replicas (1 rps and 4 slots each, 3.5 s latency): ``m = 1200`` slots,
``cap = 300`` rps... overloaded, the backlog grows by 300 requests a second and the SLO (slack 6.5 s x
300 rps = 1,950 requests) is missed after 6.5 s. On 900 replicas (``cap = 900``, ``rho = 0.67``)
``C`` is ~1e-60: every request meets the SLO.

Pure: no Ray, no numpy needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_SMALL_M = 64  # below this many slots, Erlang B by its exact recursion


def erlang_c(m: int, a: float) -> float:
    """Probability that a request waits in an M/M/m queue with offered load ``a`` Erlangs (a < m).

    Erlang B first (exact recursion for small ``m``; for large ``m``, the Poisson pmf in log space over
    a normal approximation of the Poisson cdf, which is above 1/2 when ``a < m``, so its relative
    error stays small), then ``C = m B / (m - a (1 - B))``.

    Example: ``erlang_c(2, 1.0)`` = 1/3.
    """
    if m <= 0:
        return 1.0
    if a <= 0:
        return 0.0
    if a >= m:
        return 1.0
    if m < _SMALL_M:
        inv_b = 1.0
        for k in range(1, m + 1):
            inv_b = 1.0 + inv_b * k / a
        b = 1.0 / inv_b
    else:
        log_pmf = m * math.log(a) - a - math.lgamma(m + 1)
        if log_pmf < -700:
            return 0.0
        cdf = 1.0 - 0.5 * math.erfc((m + 0.5 - a) / math.sqrt(2.0 * a))
        b = min(1.0, math.exp(log_pmf) / max(cdf, 1e-300))
    return min(1.0, m * b / (m - a * (1.0 - b)))


@dataclass(frozen=True, slots=True)
class SegmentResult:
    """What one segment did: arrivals, arrivals within the SLO, backlog at its end, p99 latency."""

    arrivals: float
    within_slo: float
    backlog_end: float
    p99_latency_s: float


@dataclass(slots=True)
class StableTail:
    """Cached Erlang C figures for one (slots, load, burstiness) triple."""

    key: tuple
    within: float
    p99_s: float


def stable_tail(
    m: int, cap_rps: float, lam: float, slo_s: float, burstiness: float, cache: StableTail | None
) -> StableTail:
    """Share within the SLO and p99 latency of a stable M/M/m queue (see the module docstring)."""
    key = (m, cap_rps, lam, slo_s, burstiness)
    if cache is not None and cache.key == key:
        return cache
    s = m / cap_rps
    a = lam * s
    c = erlang_c(m, a)
    decay = (m - a) / (s * burstiness)  # per second of waiting
    slack = slo_s - s
    within = 0.0 if slack < 0 else 1.0 - c * math.exp(-decay * slack)
    p99 = s + (math.log(c / 0.01) / decay if c > 0.01 else 0.0)
    return StableTail(key, max(0.0, within), p99)


def integrate_segment(
    *,
    duration_s: float,
    lam: float,
    cap_rps: float,
    m: int,
    backlog: float,
    slo_s: float,
    timeout_s: float,
    burstiness: float = 1.0,
    cache: StableTail | None = None,
) -> tuple[SegmentResult, StableTail | None]:
    """Advances a service's queue over one segment of constant rate and capacity.

    Args:
        duration_s: segment length.
        lam: arrivals per second.
        cap_rps: requests per second the running replicas serve (0 when none runs).
        m: their slots (concurrent requests).
        backlog: requests waiting at the start.
        slo_s: latency target.
        timeout_s: a request that would wait longer is dropped (counts as missed).
        burstiness: tail stretch ``(cv^2 + 1) / 2``; 1 for Poisson arrivals.
        cache: the previous ``StableTail``, reused when nothing changed.

    Returns:
        The segment's result and the (possibly new) cache.

    Example: 10 s at 100 rps with no replica: 1,000 arrivals, 0 within, all dropped, p99 = timeout.
    """
    arrivals = lam * duration_s
    if duration_s <= 0:
        return SegmentResult(0.0, 0.0, backlog, 0.0), cache
    if cap_rps <= 0 or m <= 0:
        return SegmentResult(arrivals, 0.0, 0.0, timeout_s), cache
    s = m / cap_rps
    slack = slo_s - s
    q_ok = max(0.0, slack) * cap_rps  # the backlog up to which an arrival still meets the SLO
    q_cap = cap_rps * timeout_s
    q0 = min(backlog, q_cap)
    if lam >= cap_rps:
        growth = lam - cap_rps
        q1 = min(q_cap, q0 + growth * duration_s)
        if slack < 0:
            ok_time = 0.0
        elif growth <= 0:
            ok_time = duration_s if q0 <= q_ok else 0.0
        else:
            ok_time = min(duration_s, max(0.0, (q_ok - q0) / growth))
        p99 = s + max(q0, q1) / cap_rps
        return SegmentResult(arrivals, lam * ok_time, q1, min(p99, s + timeout_s)), cache
    # Draining (if q0 > 0), then stable.
    drain = cap_rps - lam
    t_empty = q0 / drain
    if t_empty >= duration_s:
        q1 = q0 - drain * duration_s
        ok_time = 0.0 if slack < 0 else max(0.0, duration_s - max(0.0, (q0 - q_ok) / drain))
        return SegmentResult(arrivals, lam * ok_time, q1, s + q0 / cap_rps), cache
    ok_drain = 0.0 if slack < 0 else max(0.0, t_empty - max(0.0, (q0 - q_ok) / drain))
    tail = stable_tail(m, cap_rps, lam, slo_s, burstiness, cache)
    within = lam * ok_drain + lam * (duration_s - t_empty) * tail.within
    p99 = tail.p99_s if q0 <= 0 else max(tail.p99_s, s + q0 / cap_rps)
    return SegmentResult(arrivals, within, 0.0, p99), tail
