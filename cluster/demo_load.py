"""A live, open-loop HTTP load for the demo and the spike benchmark, built on ``bench/loadgen.py``.

``bench/loadgen.py`` sends a schedule and returns every request's record at the end; the demo needs them
*while* the load runs (request rate and p99 on screen, the timeline). ``LiveLoad`` reuses the load
generator's pieces (Poisson arrivals from rate windows, ``RequestRecord``, ``percentile``, ``summarize``,
the ``/v1/predict`` body, the loopback check) and runs the same open-loop driver on a background thread,
appending each finished request to a list that ``window`` and ``records`` read at any time.

Latency is measured from each request's *scheduled* time, as in the load generator: a client that falls
behind its schedule counts the lag against the server (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)


def loadgen() -> ModuleType:
    """``bench/loadgen.py`` as a module.

    ``bench/`` holds scripts, not an installed package: it imports as ``bench.loadgen`` from the project
    root (``make demo`` runs there); from anywhere else, the project root is found next to this package.
    """
    try:
        return importlib.import_module("bench.loadgen")
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parent.parent
        if not (root / "bench" / "loadgen.py").is_file():
            raise
        sys.path.insert(0, str(root))
        return importlib.import_module("bench.loadgen")


@dataclass(frozen=True)
class WindowStats:
    """Requests that *finished* in the last ``window_s`` seconds."""

    window_s: float
    completed: int
    ok: int
    failed: int
    ok_rps: float
    p50_ms: float | None
    p99_ms: float | None


class LiveLoad:
    """Sends one POST per arrival time, on schedule, from a background thread.

    Args:
        url: the ``/v1/predict`` URL (loopback only, as for the load generator).
        rate_windows: ``(start_s, rate_rps)`` pairs, piecewise-constant, the last one usually at rate 0.
        duration_s: the schedule's length.
        seed: for the arrivals and the request body.
        instances: instances per request.
        timeout_s: per request.
    """

    def __init__(
        self,
        url: str,
        rate_windows: Sequence[tuple[float, float]],
        duration_s: float,
        *,
        seed: int = 0,
        instances: int = 1,
        timeout_s: float = 30.0,
        max_in_flight: int = 2000,
    ) -> None:
        lg = loadgen()
        lg.check_loopback(url)
        self._lg = lg
        self.url = url
        self.arrivals_s: list[float] = lg.arrivals_from_rates(
            [lg.RateWindow(s, r) for s, r in rate_windows],
            time_scale=1.0,
            rate_scale=1.0,
            trace_start_s=0.0,
            max_duration_s=duration_s,
            max_requests=10_000_000,
            seed=seed,
        )
        self.body: bytes = lg.default_body(instances, 64, seed)
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self._records: list[Any] = []  # bench.loadgen.RequestRecord, appended from the load thread
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self.started_mono: float | None = None
        self.wall_s: float = 0.0
        self.error: BaseException | None = None

    # ------------------------------------------------------------------------------------ control

    def start(self) -> float:
        """Starts the load; returns its start on ``time.monotonic()`` (the schedule's time zero)."""
        ready = threading.Event()

        def run() -> None:
            try:
                asyncio.run(self._run(ready))
            except BaseException as e:  # reported by wait(); the thread must not die silently
                self.error = e
                ready.set()

        self._thread = threading.Thread(target=run, name="demo-load", daemon=True)
        self._thread.start()
        ready.wait(timeout=30)
        if self.error is not None:
            raise RuntimeError(f"the load generator failed to start: {self.error!r}") from self.error
        assert self.started_mono is not None
        return self.started_mono

    def stop(self) -> None:
        """Stops sending; requests in flight are given up (recorded as ``cancelled``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 5)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Waits for the schedule to end and every request to finish; True if it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout=timeout_s)
        return not self._thread.is_alive()

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    # ------------------------------------------------------------------------------------ reading

    def records(self) -> list[Any]:
        """A copy of the finished requests so far (``bench.loadgen.RequestRecord``)."""
        return list(self._records)

    def elapsed_s(self) -> float:
        return 0.0 if self.started_mono is None else time.monotonic() - self.started_mono

    def window(self, window_s: float = 5.0) -> WindowStats:
        """Throughput and latency of the requests that finished in the last ``window_s`` seconds."""
        now = self.elapsed_s()
        recent = [r for r in reversed(self._records[-20000:]) if _finished_s(r) >= now - window_s]
        ok = sorted(r.latency_ms for r in recent if 200 <= r.status < 300)
        span = min(window_s, now) or window_s
        return WindowStats(
            window_s=window_s,
            completed=len(recent),
            ok=len(ok),
            failed=len(recent) - len(ok),
            ok_rps=len(ok) / span,
            p50_ms=self._lg.percentile(ok, 50),
            p99_ms=self._lg.percentile(ok, 99),
        )

    def summary(self) -> dict[str, Any]:
        """``bench.loadgen.summarize`` of every finished request."""
        return self._lg.summarize(self.records(), self.wall_s or self.elapsed_s())

    # ------------------------------------------------------------------------------------ the driver

    async def _run(self, ready: threading.Event) -> None:
        import httpx

        lg = self._lg
        loop = asyncio.get_running_loop()
        limits = httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight)
        in_flight = 0
        headers = {"content-type": "application/json"}
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits) as client:
            t0 = loop.time()
            self.started_mono = time.monotonic()
            ready.set()

            async def one(scheduled: float) -> None:
                nonlocal in_flight
                sent = loop.time() - t0
                status, error = 0, None
                try:
                    r = await client.post(self.url, content=self.body, headers=headers)
                    status = r.status_code
                except httpx.TimeoutException:
                    error = "timeout"
                except httpx.HTTPError as e:
                    error = type(e).__name__
                except asyncio.CancelledError:
                    error = "cancelled"
                finally:
                    in_flight -= 1
                done = loop.time() - t0
                self._records.append(lg.RequestRecord(scheduled, sent, (done - scheduled) * 1000, status, error))

            tasks: set[asyncio.Task] = set()
            for at in self.arrivals_s:
                if self._stop.is_set():
                    break
                delay = at - (loop.time() - t0)
                if delay > 0:
                    # Sleep in short slices so that stop() is honoured promptly.
                    while delay > 0 and not self._stop.is_set():
                        await asyncio.sleep(min(delay, 0.2))
                        delay = at - (loop.time() - t0)
                    if self._stop.is_set():
                        break
                if in_flight >= self.max_in_flight:
                    self._records.append(lg.RequestRecord(at, loop.time() - t0, 0.0, 0, "client_overload"))
                    continue
                in_flight += 1
                task = asyncio.create_task(one(at))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks and not self._stop.is_set():
                await asyncio.wait(set(tasks), timeout=0.2)
            for task in list(tasks):
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self.wall_s = loop.time() - t0


def _finished_s(record: Any) -> float:
    return record.scheduled_s + record.latency_ms / 1000.0
