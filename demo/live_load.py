"""A live, open-loop HTTP load for the demo and the spike benchmark, built on ``tidal.demo.loadgen``.

``tidal.demo.loadgen`` sends a schedule and returns every request's record at the end; the demo needs them
*while* the load runs (request rate and p99 on screen, the timeline). ``LiveLoad`` reuses the load
generator's pieces (Poisson arrivals from rate windows, ``RequestRecord``, ``percentile``, ``summarize``,
the ``/v1/predict`` body, the loopback check) and runs the same open-loop driver on a background thread,
appending each finished request to a list that ``window`` and ``records`` read at any time.

Latency is measured from each request's *scheduled* time, as in the load generator: a client that falls
behind its schedule counts the lag against the server (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tidal.demo import loadgen

logger = logging.getLogger(__name__)


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
    """Sends one POST per arrival time, on schedule, from a child process, and collects the records live.

    The driver runs in its own process (``python -m tidal.demo.live_load``): the demo's process also observes
    the cluster, and sharing one interpreter lock with that would delay requests and inflate their measured
    latency. Finished requests stream back as JSON lines on the child's stdout (every 0.1 s) and a thread
    appends them to ``records()``. Both processes time with ``time.monotonic()`` (one clock on Linux).

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
        lg = loadgen
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
        self._records: list[Any] = []  # loadgen.RequestRecord, appended by the reader thread
        self._proc: Any = None
        self._conn: Any = None
        self._reader: threading.Thread | None = None
        self._finished = threading.Event()
        self.started_mono: float | None = None
        self.wall_s: float = 0.0
        self.error: str | None = None

    # ------------------------------------------------------------------------------------ control

    def start(self, timeout_s: float = 60.0) -> float:
        """Starts the load; returns its start on ``time.monotonic()`` (the schedule's time zero)."""
        # A fresh interpreter (`python -m tidal.demo.live_load`), not multiprocessing: spawn would import the
        # caller's __main__ again in the child, which re-runs any script without a main guard.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tidal.demo.live_load"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        config = {
            "url": self.url,
            "arrivals_s": self.arrivals_s,
            "body": base64.b64encode(self.body).decode(),
            "timeout_s": self.timeout_s,
            "max_in_flight": self.max_in_flight,
        }
        self._proc.stdin.write(json.dumps(config) + "\n")
        self._proc.stdin.flush()
        first: list[Any] = []
        reader = threading.Thread(target=lambda: first.append(self._proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not first or not first[0]:
            self._kill()
            raise RuntimeError(f"the load generator did not start within {timeout_s:.0f} s")
        kind, value = json.loads(first[0])
        if kind != "started":
            self._kill()
            raise RuntimeError(f"the load generator failed to start: {value}")
        self.started_mono = float(value)
        self._reader = threading.Thread(target=self._read, name="demo-load-reader", daemon=True)
        self._reader.start()
        return self.started_mono

    def _read(self) -> None:
        RequestRecord = self._lg.RequestRecord
        try:
            for line in self._proc.stdout:
                kind, value = json.loads(line)
                if kind == "records":
                    self._records.extend(RequestRecord(*r) for r in value)
                elif kind == "done":
                    self.wall_s = float(value)
                    break
                elif kind == "error":
                    self.error = str(value)
                    logger.error("the load generator failed: %s", value)
                    break
            else:
                self.error = self.error or "the load generator exited before the end of its schedule"
        except (OSError, ValueError) as e:  # the child died mid-line: what arrived is what there is
            self.error = self.error or f"the load generator's output broke off: {e!r}"
        finally:
            self._finished.set()

    def stop(self) -> None:
        """Stops sending; requests in flight are given up (recorded as ``cancelled``)."""
        if self._proc is None:
            return
        try:
            self._proc.stdin.write("stop\n")
            self._proc.stdin.flush()
        except (OSError, ValueError):
            pass
        self._finished.wait(timeout=10)
        self._kill()

    def _kill(self) -> None:
        if self._proc is None:
            return
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)
        for stream in (self._proc.stdin, self._proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                stream.close()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Waits for the schedule to end and every request to finish; True if it did."""
        if self._proc is None:
            return True
        done = self._finished.wait(timeout=timeout_s)
        if done:
            self._kill()
        return done

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    # ------------------------------------------------------------------------------------ reading

    def records(self) -> list[Any]:
        """A copy of the finished requests so far (``loadgen.RequestRecord``)."""
        return list(self._records)

    def elapsed_s(self) -> float:
        return 0.0 if self.started_mono is None else time.monotonic() - self.started_mono

    def window(self, window_s: float = 5.0) -> WindowStats:
        """Throughput and latency of the requests that finished in the last ``window_s`` seconds."""
        now = self.elapsed_s()
        recent = [r for r in self._records[-20000:] if _finished_s(r) >= now - window_s]
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
        """``loadgen.summarize`` of every finished request."""
        return self._lg.summarize(self.records(), self.wall_s or self.elapsed_s())


# ---------------------------------------------------------------------------------- the child process


class _StdioChannel:
    """The child's end of the pipe: JSON lines out on stdout, a ``stop`` line in on stdin."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        threading.Thread(target=self._watch_stdin, daemon=True).start()

    def _watch_stdin(self) -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        # "stop", or the parent closed the pipe (it is gone): stop either way.
        self._stop.set()

    def send(self, message: tuple) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    def poll(self) -> bool:
        return self._stop.is_set()

    def recv(self) -> tuple:
        return ("stop", None)


def _child_main() -> None:
    """``python -m tidal.demo.live_load``: the load generator's process (reads its config from stdin)."""
    config = json.loads(sys.stdin.readline())
    conn = _StdioChannel()
    try:
        asyncio.run(
            _drive(
                conn, config["url"], config["arrivals_s"], base64.b64decode(config["body"]),
                config["timeout_s"], config["max_in_flight"],
            )
        )  # fmt: skip
    except BaseException as e:  # reported to the parent; the child must not die silently
        with contextlib.suppress(OSError):
            conn.send(("error", repr(e)))


async def _drive(conn: Any, url: str, arrivals_s: list[float], body: bytes, timeout_s: float, max_in_flight: int) -> None:
    import httpx

    loop = asyncio.get_running_loop()
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    headers = {"content-type": "application/json"}
    pending: list[tuple] = []
    in_flight = 0
    stopping = False

    def stop_asked() -> bool:
        nonlocal stopping
        if not stopping and conn.poll():
            kind, _ = conn.recv()
            stopping = kind == "stop"
        return stopping

    async def flusher() -> None:
        while True:
            await asyncio.sleep(0.1)
            if pending:
                batch = pending[:]
                pending.clear()
                conn.send(("records", batch))

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = loop.time()
        conn.send(("started", time.monotonic()))
        flush_task = asyncio.create_task(flusher())

        async def one(scheduled: float) -> None:
            nonlocal in_flight
            sent = loop.time() - t0
            status, error = 0, None
            try:
                r = await client.post(url, content=body, headers=headers)
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
            # The fields of loadgen.RequestRecord, in order.
            pending.append((scheduled, sent, (done - scheduled) * 1000, status, error))

        tasks: set[asyncio.Task] = set()
        for at in arrivals_s:
            delay = at - (loop.time() - t0)
            # Sleep in short slices so that a stop is honoured promptly.
            while delay > 0 and not stop_asked():
                await asyncio.sleep(min(delay, 0.2))
                delay = at - (loop.time() - t0)
            if stop_asked():
                break
            if in_flight >= max_in_flight:
                pending.append((at, loop.time() - t0, 0.0, 0, "client_overload"))
                continue
            in_flight += 1
            task = asyncio.create_task(one(at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks and not stop_asked():
            await asyncio.wait(set(tasks), timeout=0.2)
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        wall = loop.time() - t0
        flush_task.cancel()
        if pending:
            conn.send(("records", pending[:]))
        conn.send(("done", wall))


def _finished_s(record: Any) -> float:
    return record.scheduled_s + record.latency_ms / 1000.0


if __name__ == "__main__":
    _child_main()
