"""Open-loop HTTP load generator for Tidal's serving endpoint (loopback only).

Requests are sent on a schedule, whatever the replies do (open loop): a slow server builds a queue and
its latency shows it, instead of slowing the client down (closed-loop generators hide overload that way).
Latency is measured from each request's *scheduled* time, so a client that falls behind its schedule
counts that lag against the server too (no coordinated omission).

Schedules:

- ``--constant-rps R --duration-s D``: Poisson arrivals at R per second.
- ``--rate-trace FILE``: a rate per window, e.g. ``/work/shared/traces/servegen_m-large_days1-7.csv``
  (``window_start_s``, ``total_rate_rps``): Poisson arrivals at a piecewise-constant rate.
- ``--request-trace FILE``: one request per row with a timestamp, e.g.
  ``/work/shared/traces/azure_llm_2023_code.csv`` (``TIMESTAMP``): replayed at the recorded times.

``--time-scale K`` plays K trace seconds per wall second (a 10-minute window at K=60 lasts 10 s);
``--rate-scale F`` multiplies the rate (a request trace is thinned or replicated). ``--trace-start-s`` and
the bounds ``--max-requests`` / ``--max-duration-s`` cut a slice. Every request's latency and status go
into the JSON written to ``--out`` (default ``bench/results/loadgen-<time>.json``): p50/p95/p99,
throughput, and errors by kind.

Example::

    .venv/bin/python -m tidal.demo.loadgen --url http://127.0.0.1:52080/v1/predict \\
        --rate-trace /work/shared/traces/servegen_m-large_days1-7.csv --time-scale 600 --rate-scale 0.2 \\
        --max-duration-s 30 --out bench/results/loadgen-servegen.json
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
RESULTS_DIR = Path("bench") / "results"  # relative to the working directory, as bench/ scripts write


# ------------------------------------------------------------------------------ schedules (pure)


@dataclass(frozen=True)
class RateWindow:
    start_s: float
    rate_rps: float


def read_rate_trace(path: str | Path) -> list[RateWindow]:
    """Rate windows from a CSV with ``window_start_s`` and ``total_rate_rps`` (or ``rate_rps``) columns."""
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rate = row.get("total_rate_rps", row.get("rate_rps"))
            if rate is None or "window_start_s" not in row:
                raise ValueError(
                    f"{path}: a rate trace needs columns window_start_s and total_rate_rps (or rate_rps); "
                    f"got {sorted(row)}"
                )
            out.append(RateWindow(float(row["window_start_s"]), float(rate)))
    out.sort(key=lambda w: w.start_s)
    return out


def read_request_trace(path: str | Path) -> list[float]:
    """Request times in seconds from the first, from a CSV whose first column (or ``TIMESTAMP``) holds a
    timestamp (``2023-11-16 18:17:03.9799600``) or seconds."""
    times = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        col = next((i for i, h in enumerate(header) if h.strip().lower() in ("timestamp", "time", "t_s")), 0)
        for row in reader:
            times.append(_parse_time(row[col]))
    if not times:
        return []
    t0 = min(times)
    return sorted(t - t0 for t in times)


def _parse_time(s: str) -> float:
    s = s.strip()
    try:
        return float(s)
    except ValueError:
        pass
    # Python's fromisoformat takes at most 6 fractional digits; Azure's trace has 7.
    if "." in s:
        head, frac = s.split(".", 1)
        s = f"{head}.{frac[:6]}"
    return datetime.fromisoformat(s).timestamp()


def arrivals_from_rates(
    windows: Sequence[RateWindow],
    *,
    time_scale: float,
    rate_scale: float,
    trace_start_s: float,
    max_duration_s: float,
    max_requests: int,
    seed: int,
) -> list[float]:
    """Poisson arrival times (wall seconds from the start) for a piecewise-constant rate trace.

    A trace window ``[a, b)`` at rate r plays on the wall clock over ``[a, b) / time_scale`` at rate
    ``r * rate_scale * time_scale`` (the same requests per trace window, in less wall time), so
    ``time_scale`` compresses time and ``rate_scale`` alone changes the load.

    Example: one 600 s window at 10 rps, time_scale 60, rate_scale 0.5 -> 10 wall seconds at 300 rps.
    """
    rng = random.Random(seed)
    out: list[float] = []
    if not windows:
        return out
    ends = [w.start_s for w in windows[1:]] + [windows[-1].start_s + _last_window_len(windows)]
    for w, end in zip(windows, ends, strict=True):
        a, b = max(w.start_s, trace_start_s), end
        if b <= a:
            continue
        wall_a = (a - trace_start_s) / time_scale
        wall_b = (b - trace_start_s) / time_scale
        rate = w.rate_rps * rate_scale * time_scale
        t = wall_a
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= wall_b or t >= max_duration_s or len(out) >= max_requests:
                break
            out.append(t)
        if wall_b >= max_duration_s or len(out) >= max_requests:
            break
    return out


def _last_window_len(windows: Sequence[RateWindow]) -> float:
    return windows[-1].start_s - windows[-2].start_s if len(windows) > 1 else 1.0


def arrivals_from_requests(
    times: Sequence[float],
    *,
    time_scale: float,
    rate_scale: float,
    trace_start_s: float,
    max_duration_s: float,
    max_requests: int,
    seed: int,
) -> list[float]:
    """Replay recorded request times, ``time_scale`` times faster, thinned or replicated by ``rate_scale``.

    Each recorded request becomes ``floor(rate_scale)`` requests, plus one more with probability
    ``frac(rate_scale)`` (seeded), so 0.5 keeps about half and 2.5 sends two or three. Copies of one
    request go out together: a trace's bursts stay bursts.
    """
    rng = random.Random(seed)
    whole, frac = int(math.floor(rate_scale)), rate_scale - math.floor(rate_scale)
    out: list[float] = []
    for t in times:
        if t < trace_start_s:
            continue
        wall = (t - trace_start_s) / time_scale
        if wall >= max_duration_s:
            break
        n = whole + (1 if rng.random() < frac else 0)
        out.extend([wall] * n)
        if len(out) >= max_requests:
            return out[:max_requests]
    return out


def constant_arrivals(rps: float, duration_s: float, max_requests: int, seed: int) -> list[float]:
    return arrivals_from_rates(
        [RateWindow(0.0, rps), RateWindow(duration_s, 0.0)],
        time_scale=1.0,
        rate_scale=1.0,
        trace_start_s=0.0,
        max_duration_s=duration_s,
        max_requests=max_requests,
        seed=seed,
    )


# ------------------------------------------------------------------------------- summary (pure)


@dataclass
class RequestRecord:
    scheduled_s: float
    sent_s: float
    latency_ms: float  # from the scheduled time to the last byte of the reply
    status: int  # HTTP status, 0 when no reply (connection error, timeout)
    error: str | None = None


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values.

    Example: percentile([1, 2, 3, 4], 50) -> 2.5.
    """
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    if lo == hi:
        return float(sorted_values[lo])
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def summarize(records: Iterable[RequestRecord], wall_s: float) -> dict:
    """Counts, throughput and latency percentiles (successful requests only) of one run."""
    recs = list(records)
    ok = sorted(r.latency_ms for r in recs if 200 <= r.status < 300)
    by_status = Counter(str(r.status) for r in recs)
    errors = Counter(r.error or f"http_{r.status}" for r in recs if not 200 <= r.status < 300)
    lag = sorted(max(0.0, (r.sent_s - r.scheduled_s) * 1000) for r in recs)
    return {
        "requests": len(recs),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors),
        "status_counts": dict(by_status),
        "wall_s": wall_s,
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else 0.0,
        "offered_rps": len(recs) / wall_s if wall_s > 0 else 0.0,
        "latency_ms": {
            "p50": percentile(ok, 50),
            "p95": percentile(ok, 95),
            "p99": percentile(ok, 99),
            "max": ok[-1] if ok else None,
            "mean": sum(ok) / len(ok) if ok else None,
        },
        "send_lag_ms": {"p50": percentile(lag, 50), "p99": percentile(lag, 99)},
    }


# ------------------------------------------------------------------------------------ the driver


@dataclass
class LoadConfig:
    url: str
    arrivals_s: list[float] = field(repr=False)
    body: bytes = field(repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    timeout_s: float = 30.0
    max_in_flight: int = 2000


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK_HOSTS:
        raise ValueError(
            f"--url host {host!r} is not loopback; this load generator only targets {LOOPBACK_HOSTS}"
        )


async def run_load(cfg: LoadConfig) -> tuple[list[RequestRecord], float]:
    """Send one request per arrival time, on schedule; return every request's record and the wall time.

    A request that finds ``max_in_flight`` requests outstanding is not sent and is recorded as the error
    ``client_overload`` (the client stays open-loop and bounded in memory).
    """
    import httpx

    check_loopback(cfg.url)
    records: list[RequestRecord] = []
    in_flight = 0
    limits = httpx.Limits(max_connections=cfg.max_in_flight, max_keepalive_connections=cfg.max_in_flight)
    async with httpx.AsyncClient(timeout=cfg.timeout_s, limits=limits) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def one(scheduled: float) -> None:
            nonlocal in_flight
            sent = loop.time() - t0
            status, error = 0, None
            try:
                r = await client.post(cfg.url, content=cfg.body, headers=cfg.headers)
                status = r.status_code
            except httpx.TimeoutException:
                error = "timeout"
            except httpx.HTTPError as e:
                error = type(e).__name__
            finally:
                in_flight -= 1
            done = loop.time() - t0
            records.append(RequestRecord(scheduled, sent, (done - scheduled) * 1000, status, error))

        tasks = []
        for at in cfg.arrivals_s:
            delay = at - (loop.time() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight >= cfg.max_in_flight:
                records.append(RequestRecord(at, loop.time() - t0, 0.0, 0, "client_overload"))
                continue
            in_flight += 1
            tasks.append(asyncio.create_task(one(at)))
        if tasks:
            await asyncio.gather(*tasks)
        wall = loop.time() - t0
    return records, wall


def default_body(num_instances: int, input_size: int, seed: int) -> bytes:
    """A ``/v1/predict`` body: ``num_instances`` instances of ``input_size`` numbers in [0, 16]."""
    rng = random.Random(seed)
    inst = [[round(rng.uniform(0, 16), 3) for _ in range(input_size)] for _ in range(num_instances)]
    return json.dumps({"instances": inst}).encode()


def build_arrivals(args: argparse.Namespace) -> list[float]:
    bounds = {
        "max_duration_s": args.max_duration_s,
        "max_requests": args.max_requests,
        "seed": args.seed,
    }
    if args.rate_trace:
        return arrivals_from_rates(
            read_rate_trace(args.rate_trace),
            time_scale=args.time_scale,
            rate_scale=args.rate_scale,
            trace_start_s=args.trace_start_s,
            **bounds,
        )
    if args.request_trace:
        return arrivals_from_requests(
            read_request_trace(args.request_trace),
            time_scale=args.time_scale,
            rate_scale=args.rate_scale,
            trace_start_s=args.trace_start_s,
            **bounds,
        )
    duration = min(args.duration_s, args.max_duration_s)
    return constant_arrivals(args.constant_rps * args.rate_scale, duration, args.max_requests, args.seed)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="e.g. http://127.0.0.1:PORT/v1/predict (loopback only)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--rate-trace", help="CSV with window_start_s,total_rate_rps")
    src.add_argument("--request-trace", help="CSV with one request per row (TIMESTAMP first)")
    src.add_argument("--constant-rps", type=float, help="Poisson arrivals at this rate")
    p.add_argument("--duration-s", type=float, default=10.0, help="with --constant-rps")
    p.add_argument("--time-scale", type=float, default=1.0, help="trace seconds per wall second")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the rate")
    p.add_argument("--trace-start-s", type=float, default=0.0, help="skip the trace up to here")
    p.add_argument("--max-requests", type=int, default=20_000)
    p.add_argument("--max-duration-s", type=float, default=60.0)
    p.add_argument("--instances", type=int, default=1, help="instances per request")
    p.add_argument("--input-size", type=int, default=64, help="numbers per instance")
    p.add_argument("--body-file", help="send this JSON body instead")
    p.add_argument("--api-key", help="sent as Authorization: Bearer")
    p.add_argument("--timeout-s", type=float, default=30.0)
    p.add_argument("--max-in-flight", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="a name for this run, stored in the JSON")
    p.add_argument("--out", help="JSON output path (default bench/results/loadgen-<time>.json)")
    args = p.parse_args(argv)
    for name in ("time_scale", "rate_scale", "max_duration_s", "timeout_s"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.max_requests <= 0 or args.max_in_flight <= 0:
        p.error("--max-requests and --max-in-flight must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        check_loopback(args.url)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    arrivals = build_arrivals(args)
    body = (
        Path(args.body_file).read_bytes()
        if args.body_file
        else default_body(args.instances, args.input_size, args.seed)
    )
    headers = {"content-type": "application/json"}
    if args.api_key:
        headers["authorization"] = f"Bearer {args.api_key}"
    cfg = LoadConfig(args.url, arrivals, body, headers, args.timeout_s, args.max_in_flight)
    logger.info(
        "sending %d requests over %.1f s to %s", len(arrivals), arrivals[-1] if arrivals else 0, args.url
    )
    records, wall = asyncio.run(run_load(cfg))
    result = {
        "label": args.label,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": {k: v for k, v in vars(args).items() if k != "api_key"},
        "summary": summarize(records, wall),
        "requests": [asdict(r) for r in sorted(records, key=lambda r: r.scheduled_s)],
    }
    out = Path(args.out) if args.out else RESULTS_DIR / f"loadgen-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    s = result["summary"]
    print(
        json.dumps(
            {
                "out": str(out),
                **{k: s[k] for k in ("requests", "ok", "errors", "throughput_rps", "latency_ms")},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
