"""What the demo prints: a live ``rich`` view on a terminal, plain progress lines otherwise (CI, a pipe).

Pure presentation: it reads ``Sample``s and event lines and never talks to Ray.

- ``LiveDisplay``: one screen, redrawn on every sample: each GPU type's GPUs split between serving and
  training (a bar of coloured cells), the service's replicas, request rate, p99 against the SLO, failed
  requests, each training job's size and steps, and the latest events (GPUs moving).
- ``PlainDisplay``: a line per event and a status line every ``every_s`` seconds.
- ``summary_table``: the closing table (rich), also rendered as text for a log.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from tidal.demo.timeline import Sample

PHASE_LABELS = {
    "setup": "setting up",
    "fill": "training fills the idle GPUs",
    "pre": "base load",
    "spike": "SPIKE",
    "post": "spike over: GPUs go back to training",
    "done": "done",
}


class Display(Protocol):
    def line(self, text: str) -> None: ...

    def update(self, sample: Sample, *, spike_rps: float | None = None) -> None: ...

    def close(self) -> None: ...


def make_display(
    title: str, slo_ms: float, gpu_types: Sequence[str], *, live: bool | None = None, stream: TextIO | None = None
) -> Display:
    """A ``LiveDisplay`` on a terminal, a ``PlainDisplay`` otherwise (or as ``live`` says)."""
    stream = stream or sys.stdout
    if live is None:
        live = stream.isatty()
    if live:
        return LiveDisplay(title, slo_ms, gpu_types, Console(file=stream))
    return PlainDisplay(slo_ms, gpu_types, stream)


def _fmt_t(s: Sample) -> str:
    """Set-up time counts from the start of the run; after that, time counts from the start of the load."""
    if s.phase in ("setup", "fill"):
        return f"set-up {s.t_s:.0f} s"
    return f"t={s.t_s:+.0f} s"


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f} ms"


def _fmt_gpus(d: Mapping[str, float], types: Sequence[str]) -> str:
    return " ".join(f"{t} {d.get(t, 0):g}" for t in types if d.get(t, 0))


class PlainDisplay:
    """Plain progress lines: events as they happen, a status line every ``every_s`` seconds."""

    def __init__(self, slo_ms: float, gpu_types: Sequence[str], stream: TextIO, every_s: float = 5.0) -> None:
        self.slo_ms = slo_ms
        self.gpu_types = list(gpu_types)
        self.stream = stream
        self.every_s = every_s
        self._last_status = float("-inf")
        self._last_phase: str | None = None

    def line(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self.stream, flush=True)

    def update(self, sample: Sample, *, spike_rps: float | None = None) -> None:
        now = time.monotonic()
        if sample.phase != self._last_phase:
            self.line(f"--- {PHASE_LABELS.get(sample.phase, sample.phase)} ({_fmt_t(sample)})")
            self._last_phase = sample.phase
        if now - self._last_status < self.every_s:
            return
        self._last_status = now
        jobs = ", ".join(
            f"{j} {sample.job_workers.get(j, 0)}x{sample.job_gpu_type.get(j) or '-'} step {sample.steps.get(j, 0)}"
            for j in sorted(set(sample.steps) | set(sample.job_workers))
        )
        self.line(
            f"{_fmt_t(sample)} {sample.phase:5s} | serving [{_fmt_gpus(sample.serving_gpus, self.gpu_types) or '-'}]"
            f" training [{_fmt_gpus(sample.training_gpus, self.gpu_types) or '-'}] | replicas "
            f"{sample.replicas_running}/{sample.replicas_target if sample.replicas_target is not None else '-'}"
            f" | {sample.offered_rps:.0f} rps offered, {sample.ok_rps:.0f} ok/s, p99 {_fmt_ms(sample.p99_ms)},"
            f" failed {sample.requests_failed} | {jobs or 'no training'}"
        )

    def close(self) -> None:
        self.stream.flush()


class LiveDisplay:
    """The live terminal view (``rich.live.Live``), redrawn on every ``update``."""

    def __init__(self, title: str, slo_ms: float, gpu_types: Sequence[str], console: Console) -> None:
        self.title = title
        self.slo_ms = slo_ms
        self.gpu_types = list(gpu_types)
        self.console = console
        self.events: deque[str] = deque(maxlen=8)
        self._sample: Sample | None = None
        self._spike_rps: float | None = None
        self._live = Live(self._render(), console=console, refresh_per_second=4, transient=False)
        self._live.start()

    def line(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
        self._live.update(self._render())

    def update(self, sample: Sample, *, spike_rps: float | None = None) -> None:
        self._sample = sample
        self._spike_rps = spike_rps
        self._live.update(self._render())

    def close(self) -> None:
        self._live.stop()

    # ------------------------------------------------------------------------------------ render

    def _render(self) -> Panel:
        s = self._sample
        parts: list[Any] = []
        if s is None:
            parts.append(Text("starting...", style="dim"))
        else:
            parts += [self._gpu_table(s), Text(""), self._service_line(s), self._jobs_table(s)]
        parts.append(Text(""))
        parts.append(Text("events", style="bold"))
        for e in self.events:
            parts.append(Text(e, style="dim" if "phase" in e else ""))
        phase = PHASE_LABELS.get(s.phase, s.phase) if s else "starting"
        style = "bold red" if s is not None and s.phase == "spike" else "bold cyan"
        subtitle = _fmt_t(s) if s else ""
        return Panel(Group(*parts), title=f"[bold]{self.title}[/] - [{style}]{phase}[/]", subtitle=subtitle)

    def _gpu_table(self, s: Sample) -> Table:
        t = Table(box=None, pad_edge=False, header_style="bold")
        t.add_column("GPU type")
        t.add_column("GPUs", justify="right")
        t.add_column("serving", justify="right", style="magenta")
        t.add_column("training", justify="right", style="green")
        t.add_column("idle", justify="right", style="dim")
        t.add_column("split (S serving, T training, . idle)")
        types = [x for x in self.gpu_types if x in s.capacity] + sorted(set(s.capacity) - set(self.gpu_types))
        for gt in types:
            cap = s.capacity.get(gt, 0.0)
            sv, tr = s.serving_gpus.get(gt, 0.0), s.training_gpus.get(gt, 0.0)
            idle = s.idle_gpus(gt)
            bar = Text()
            bar.append("S" * round(sv), style="bold magenta")
            bar.append("T" * round(tr), style="bold green")
            bar.append("." * max(0, round(cap) - round(sv) - round(tr)), style="dim")
            t.add_row(gt, f"{cap:g}", f"{sv:g}", f"{tr:g}", f"{idle:g}", bar)
        return t

    def _service_line(self, s: Sample) -> Text:
        txt = Text()
        txt.append("service  ", style="bold")
        target = "-" if s.replicas_target is None else str(s.replicas_target)
        txt.append(f"replicas {s.replicas_running} running")
        if s.replicas_starting:
            txt.append(f" (+{s.replicas_starting} starting)", style="yellow")
        txt.append(f", target {target}")
        if s.service_demand is not None:
            txt.append(f", demand {s.service_demand}")
        txt.append("   load ", style="bold")
        txt.append(f"{s.offered_rps:.0f} rps offered, {s.ok_rps:.0f} ok/s   ")
        p99_style = "red" if s.p99_ms is not None and s.p99_ms > self.slo_ms else "green"
        txt.append(f"p99 {_fmt_ms(s.p99_ms)}", style=p99_style)
        txt.append(f" (SLO {self.slo_ms:.0f} ms)   failed {s.requests_failed}/{s.requests_sent}")
        return txt

    def _jobs_table(self, s: Sample) -> Table:
        t = Table(box=None, pad_edge=False, header_style="bold")
        t.add_column("training job")
        t.add_column("workers", justify="right")
        t.add_column("GPU type")
        t.add_column("steps", justify="right")
        t.add_column("steps lost", justify="right")
        for job in sorted(set(s.steps) | set(s.job_workers)):
            n = s.job_workers.get(job, 0)
            t.add_row(
                job,
                str(n) if n else Text("waiting", style="yellow"),
                s.job_gpu_type.get(job) or "-",
                f"{s.steps.get(job, 0):,}",
                str(s.steps_lost.get(job, 0)),
            )
        return t


def summary_table(title: str, rows: Sequence[tuple[str, str]]) -> Table:
    t = Table(title=title, header_style="bold", title_style="bold")
    t.add_column("measure")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, v)
    return t


def render_text(renderable: Any, width: int = 100) -> str:
    """A rich renderable as plain text (for logs and files)."""
    console = Console(width=width, record=True, file=_Null(), color_system=None)
    console.print(renderable)
    return console.export_text()


class _Null:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass
