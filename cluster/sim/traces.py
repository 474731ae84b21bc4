"""Trace loaders for the simulator: training jobs (CSV) and inference load (rate CSV or request CSV).

Pure: no Ray, no torch. Every row is validated at the boundary: a malformed row (a garbled, NaN, infinite or
negative number, a missing cell) stops the load with an error that names the file, the line, the column, the
bad value and what would be valid. No row is skipped silently but blank ones.

Time: the simulator's clock starts at 0 = midnight of the first day of the training trace, so that
traces line up by time of day (their dates are offset or anonymised). A trace with wall-clock
timestamps (ISO date-times) keeps its time of day; a trace in plain seconds starts at midnight.

Formats (see ``docs/simulator.md``):

- training jobs: ``timestamp`` (ISO date-time or seconds), ``duration`` (seconds at the requested size
  on the reference GPU type), ``num_gpus``; optional ``gpu_type`` (the job needs that type) and
  ``priority`` (an int, higher wins). Other columns are ignored.
- inference rate: ``window_start_s`` and a rate column (``total_rate_rps``, ``rate_rps`` or ``rate``,
  or the one named by ``rate_column``), one row per window; windows are as long as the gap between
  consecutive starts.
- inference requests: one row per request with a ``TIMESTAMP`` or ``timestamp`` column (ISO date-time
  or seconds); binned into windows of ``window_s`` seconds.
"""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DAY_S = 86_400.0
RATE_COLUMNS = ("total_rate_rps", "rate_rps", "rate")
REQUEST_TIME_COLUMNS = ("TIMESTAMP", "timestamp")


class TraceError(ValueError):
    """A trace that cannot be used; the message names the file, line, column, value and what is valid."""


# ------------------------------------------------------------------------------------------ time parsing


def _parse_time(value: str) -> tuple[float, bool]:
    """Seconds and whether the value was a wall-clock date-time (True) or plain seconds (False).

    Wall-clock values are seconds since 1970 in UTC-naive arithmetic (only differences and the time of
    day matter).
    """
    v = value.strip()
    try:
        seconds = float(v)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"{v!r} is not a time")
        return seconds, False
    t = dt.datetime.fromisoformat(v)  # raises ValueError on garbage
    if t.tzinfo is not None:
        t = t.replace(tzinfo=None)
    return (t - dt.datetime(1970, 1, 1)).total_seconds(), True


def _midnight(seconds: float, wall_clock: bool) -> float:
    """Midnight of the day of ``seconds`` for wall-clock times; the first value itself otherwise."""
    return math.floor(seconds / DAY_S) * DAY_S if wall_clock else 0.0


def _open_rows(path: str | Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the rows, each with the line of the file where it ends (1: the header)."""
    p = Path(path)
    try:
        with p.open(newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [(reader.line_num, row) for row in reader]
    except OSError as e:
        raise TraceError(f"cannot read trace {p}: {e.strerror}") from None
    except csv.Error as e:
        raise TraceError(f"trace {p}, line {reader.line_num}: not valid CSV: {e}") from None
    if not header:
        raise TraceError(f"trace {p} is empty: expected a CSV header row")
    return [h.strip() for h in header], rows


def _column(header: list[str], candidates: Sequence[str], path: str | Path, what: str) -> int:
    for c in candidates:
        if c in header:
            return header.index(c)
    raise TraceError(
        f"trace {path}: no {what} column; expected one of {', '.join(candidates)} (found: {', '.join(header)})"
    )


def _bad(path: str | Path, line: int, column: str, value: str, valid: str) -> TraceError:
    return TraceError(f"trace {path}, line {line}: {column} = {value!r} is not valid; expected {valid}")


def _time_kind(wall: bool) -> str:
    return "an ISO date-time, like the rows above" if wall else "seconds >= 0, like the rows above"


# ---------------------------------------------------------------------------------------- training jobs


@dataclass(frozen=True, slots=True)
class TrainingJobRecord:
    """One job of a training trace, in simulator time.

    Attributes:
        index: position in the trace (after the time window), stable across runs: names and seeded
            choices derive from it.
        submit_s: submit time, seconds since the simulator's time 0.
        duration_s: run time at the requested size on the reference GPU type.
        num_gpus: the requested size.
        gpu_type: the required GPU type, or None (the simulator's seeded rule picks accepted types).
        priority: the job's priority, or None (the simulator's default).
    """

    index: int
    submit_s: float
    duration_s: float
    num_gpus: int
    gpu_type: str | None = None
    priority: int | None = None


def load_training_trace(
    path: str | Path,
    *,
    start_day: float = 0.0,
    days: float | None = None,
    max_jobs: int | None = None,
) -> list[TrainingJobRecord]:
    """Reads a training-job CSV and keeps the jobs submitted in ``[start_day, start_day + days)``.

    Times are shifted so that 0 is midnight of day ``start_day`` of the trace (day 0 is the day of the
    first submit): a window keeps its time of day.

    Example: a trace starting 2017-09-04 10:30:41 with ``start_day=0`` puts its first job at 37,841 s.

    Raises:
        TraceError: a missing column or a bad value, naming the row.
    """
    header, rows = _open_rows(path)
    i_ts = _column(header, ("timestamp", "submit_time", "TIMESTAMP"), path, "submit time")
    i_dur = _column(header, ("duration", "duration_s"), path, "duration")
    i_gpus = _column(header, ("num_gpus",), path, "num_gpus")
    i_type = header.index("gpu_type") if "gpu_type" in header else None
    i_prio = header.index("priority") if "priority" in header else None
    parsed: list[tuple[float, float, int, str | None, int | None]] = []
    wall = None
    for k, row in rows:
        if not row or all(not c.strip() for c in row):
            continue
        try:
            ts, is_wall = _parse_time(row[i_ts])
        except (ValueError, IndexError):
            raise _bad(path, k, header[i_ts], _cell(row, i_ts), "an ISO date-time or seconds >= 0") from None
        if wall is not None and is_wall != wall:
            raise _bad(path, k, header[i_ts], row[i_ts], _time_kind(wall))
        wall = is_wall
        try:
            dur = float(row[i_dur])
            if not math.isfinite(dur) or dur <= 0:
                raise ValueError
        except (ValueError, IndexError):
            raise _bad(path, k, "duration", _cell(row, i_dur), "seconds > 0") from None
        try:
            g = float(row[i_gpus])
            if not math.isfinite(g) or g < 1 or g != int(g):
                raise ValueError
        except (ValueError, IndexError):
            raise _bad(path, k, "num_gpus", _cell(row, i_gpus), "a whole number >= 1") from None
        gpu_type = row[i_type].strip() or None if i_type is not None and i_type < len(row) else None
        prio = None
        if i_prio is not None and i_prio < len(row) and row[i_prio].strip():
            try:
                prio = int(row[i_prio])
            except ValueError:
                raise _bad(path, k, "priority", row[i_prio], "an integer (higher wins)") from None
        parsed.append((ts, dur, int(g), gpu_type, prio))
    if not parsed:
        raise TraceError(f"trace {path} has no jobs")
    parsed.sort(key=lambda r: r[0])
    t0 = _midnight(parsed[0][0], bool(wall)) + start_day * DAY_S
    t_end = math.inf if days is None else t0 + days * DAY_S
    jobs: list[TrainingJobRecord] = []
    for ts, dur, g, gpu_type, prio in parsed:
        if ts < t0 or ts >= t_end:
            continue
        jobs.append(TrainingJobRecord(len(jobs), ts - t0, dur, g, gpu_type, prio))
        if max_jobs is not None and len(jobs) >= max_jobs:
            break
    return jobs


def _cell(row: list[str], i: int) -> str:
    return row[i] if i < len(row) else ""


# ------------------------------------------------------------------------------------- inference load


@dataclass(frozen=True)
class RateSeries:
    """Request rate as a step function: ``rates_rps[i]`` holds from ``starts_s[i]`` to ``starts_s[i+1]``.

    ``period_s`` is the length of one pass of the trace; with ``repeat`` the series wraps around, so a
    7-day trace covers 8 weeks. ``cv`` is the optional burstiness of arrivals inside each window
    (ServeGen's ``rate_weighted_cv``), 1.0 (Poisson) where unknown.
    """

    name: str
    starts_s: tuple[float, ...]
    rates_rps: tuple[float, ...]
    period_s: float
    repeat: bool = True
    cv: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.starts_s or len(self.starts_s) != len(self.rates_rps):
            raise TraceError(
                f"rate series {self.name!r}: needs as many window starts as rates, and at least one"
            )
        if self.period_s <= self.starts_s[-1] - self.starts_s[0]:
            raise TraceError(f"rate series {self.name!r}: period_s {self.period_s} shorter than its windows")
        ends = self.starts_s[1:] + (self.starts_s[0] + self.period_s,)
        # Window centres relative to the first start, for interpolation (frozen: set once here).
        object.__setattr__(
            self,
            "_centres",
            [(a + b) / 2.0 - self.starts_s[0] for a, b in zip(self.starts_s, ends, strict=True)],
        )

    def window_at(self, t_s: float) -> tuple[int, float]:
        """Index of the window holding ``t_s`` and the time that window ends (absolute), or (-1, next start)."""
        base = 0.0
        local = t_s - self.starts_s[0]
        if self.repeat:
            k = math.floor(local / self.period_s)
            base = k * self.period_s
            local -= base
        elif local >= self.period_s:
            return -1, math.inf
        if local < 0:
            return -1, self.starts_s[0]
        i = bisect.bisect_right(self.starts_s, self.starts_s[0] + local) - 1
        nxt = self.starts_s[i + 1] if i + 1 < len(self.starts_s) else self.starts_s[0] + self.period_s
        return i, base + nxt

    def rate_at(self, t_s: float) -> float:
        i, _ = self.window_at(t_s)
        return self.rates_rps[i] if i >= 0 else 0.0

    def interpolated_rate_at(self, t_s: float) -> float:
        """The rate at ``t_s`` on the line between window centres (a window's rate is its average).

        Example: windows of 600 s at 150 and 270 rps: at the first window's end (300 s past its centre)
        the rate is 210 rps.
        """
        origin, period, rates = self.starts_s[0], self.period_s, self.rates_rps
        local = t_s - origin
        if self.repeat:
            local %= period
        elif local < 0 or local >= period:
            return 0.0
        centres = self._centres  # type: ignore[attr-defined]
        n = len(centres)
        k = bisect.bisect_right(centres, local) - 1
        if k == -1:
            if not self.repeat:
                return rates[0]
            left, right, r_l, r_r = centres[-1] - period, centres[0], rates[-1], rates[0]
        elif k == n - 1:
            if not self.repeat:
                return rates[-1]
            left, right, r_l, r_r = centres[-1], centres[0] + period, rates[-1], rates[0]
        else:
            left, right, r_l, r_r = centres[k], centres[k + 1], rates[k], rates[k + 1]
        return r_l + (r_r - r_l) * (local - left) / (right - left)

    def segment_at(self, t_s: float, resolution_s: float | None) -> tuple[float, float, float]:
        """Rate, burstiness CV and end of the constant-rate segment that holds ``t_s``.

        ``resolution_s`` None: the trace's own windows (a step function). Otherwise segments of
        ``resolution_s`` (aligned to multiples of it), each at the interpolated rate of its midpoint.
        """
        i, end = self.window_at(t_s)
        cv = self.cv[i] if (i >= 0 and self.cv is not None) else 1.0
        if resolution_s is None:
            return (self.rates_rps[i] if i >= 0 else 0.0), cv, end
        if i < 0:
            return 0.0, cv, end
        seg_start = math.floor(t_s / resolution_s) * resolution_s
        seg_end = seg_start + resolution_s
        return self.interpolated_rate_at(seg_start + resolution_s / 2.0), cv, seg_end

    def cv_at(self, t_s: float) -> float:
        if self.cv is None:
            return 1.0
        i, _ = self.window_at(t_s)
        return self.cv[i] if i >= 0 else 1.0

    def peak_rps(self) -> float:
        return max(self.rates_rps)

    def mean_rps(self) -> float:
        total = 0.0
        for i, r in enumerate(self.rates_rps):
            end = self.starts_s[i + 1] if i + 1 < len(self.starts_s) else self.starts_s[0] + self.period_s
            total += r * (end - self.starts_s[i])
        return total / self.period_s

    def scaled(self, multiplier: float) -> RateSeries:
        if multiplier < 0 or not math.isfinite(multiplier):
            raise TraceError(f"rate multiplier {multiplier} is not valid; expected a finite number >= 0")
        return RateSeries(
            self.name,
            self.starts_s,
            tuple(r * multiplier for r in self.rates_rps),
            self.period_s,
            self.repeat,
            self.cv,
        )


def load_rate_trace(
    path: str | Path, *, rate_column: str | None = None, repeat: bool = True, name: str | None = None
) -> RateSeries:
    """Reads a rate CSV (``window_start_s`` plus a rate column). See the module docstring."""
    header, rows = _open_rows(path)
    i_start = _column(header, ("window_start_s",), path, "window start")
    i_rate = _column(header, (rate_column,) if rate_column else RATE_COLUMNS, path, "rate")
    i_cv = header.index("rate_weighted_cv") if "rate_weighted_cv" in header else None
    starts: list[float] = []
    rates: list[float] = []
    cvs: list[float] = []
    for k, row in rows:
        if not row or all(not c.strip() for c in row):
            continue
        try:
            s = float(row[i_start])
            if not math.isfinite(s) or s < 0:
                raise ValueError
        except (ValueError, IndexError):
            raise _bad(path, k, "window_start_s", _cell(row, i_start), "seconds >= 0") from None
        try:
            r = float(row[i_rate])
            if not math.isfinite(r) or r < 0:
                raise ValueError
        except (ValueError, IndexError):
            raise _bad(path, k, header[i_rate], _cell(row, i_rate), "requests per second >= 0") from None
        if starts and s <= starts[-1]:
            raise _bad(
                path, k, "window_start_s", row[i_start], f"a start after the previous one ({starts[-1]:g})"
            )
        starts.append(s)
        rates.append(r)
        if i_cv is not None:
            cell = _cell(row, i_cv).strip()
            if not cell:
                cvs.append(1.0)  # unknown for this window: Poisson
                continue
            try:
                cv = float(cell)
                if not math.isfinite(cv) or cv < 0:
                    raise ValueError
            except ValueError:
                raise _bad(path, k, "rate_weighted_cv", cell, "a coefficient of variation >= 0, or empty") from None
            cvs.append(cv)
    if not starts:
        raise TraceError(f"trace {path} has no windows")
    window = (starts[1] - starts[0]) if len(starts) > 1 else 600.0
    period = starts[-1] - starts[0] + window
    # Traces in plain seconds start at midnight (0): shift so the first window starts at its own offset.
    return RateSeries(
        name or Path(path).stem,
        tuple(starts),
        tuple(rates),
        period,
        repeat,
        tuple(cvs) if i_cv is not None else None,
    )


def load_request_trace(
    path: str | Path, *, window_s: float = 60.0, repeat: bool = True, name: str | None = None
) -> RateSeries:
    """Reads a request CSV (one row per request) and bins it into a rate per ``window_s`` window.

    Wall-clock timestamps keep their time of day (the first window starts at the first request's
    time of day, rounded down to the window); plain seconds start at 0.

    Example: 8,819 requests over 57 minutes with 60 s windows -> 57 windows, 2.6 req/s on average.
    """
    if window_s <= 0:
        raise TraceError(f"window_s = {window_s} is not valid; expected seconds > 0")
    header, rows = _open_rows(path)
    i_ts = _column(header, REQUEST_TIME_COLUMNS, path, "request time")
    times: list[float] = []
    wall: bool | None = None
    for k, row in rows:
        if not row or all(not c.strip() for c in row):
            continue
        try:
            t, is_wall = _parse_time(row[i_ts])
        except (ValueError, IndexError):
            raise _bad(path, k, header[i_ts], _cell(row, i_ts), "an ISO date-time or seconds >= 0") from None
        if wall is not None and is_wall != wall:
            raise _bad(path, k, header[i_ts], row[i_ts], _time_kind(wall))
        wall = is_wall
        times.append(t)
    if not times:
        raise TraceError(f"trace {path} has no requests")
    times.sort()
    origin = _midnight(times[0], bool(wall))
    first = math.floor((times[0] - origin) / window_s) * window_s
    n = int(math.floor((times[-1] - origin - first) / window_s)) + 1
    counts = [0] * n
    for t in times:
        counts[min(n - 1, int((t - origin - first) // window_s))] += 1
    starts = tuple(first + i * window_s for i in range(n))
    return RateSeries(
        name or Path(path).stem, starts, tuple(c / window_s for c in counts), n * window_s, repeat
    )


def load_inference_trace(
    path: str | Path, *, window_s: float = 60.0, rate_column: str | None = None, repeat: bool = True
) -> RateSeries:
    """A rate CSV if it has ``window_start_s``, a request CSV if it has ``TIMESTAMP``/``timestamp``."""
    header, _ = _open_rows(path)
    if "window_start_s" in header:
        return load_rate_trace(path, rate_column=rate_column, repeat=repeat)
    if any(c in header for c in REQUEST_TIME_COLUMNS):
        return load_request_trace(path, window_s=window_s, repeat=repeat)
    raise TraceError(
        f"trace {path}: not an inference trace; expected a window_start_s column (rate CSV) or a "
        f"TIMESTAMP/timestamp column (request CSV), found: {', '.join(header)}"
    )
