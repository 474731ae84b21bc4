"""``make demo`` (``python -m tidal.demo``): Tidal moving GPUs between training and an inference spike, live.

It starts a local heterogeneous Ray cluster (4 H100, 2 A100, 2 RTX4090: logical GPUs on this machine), the
arbiter, an inference service (Ray Serve, min 1 replica, prefers RTX4090 > A100 > H100) and two training
jobs submitted with ``ray job submit`` (a high-priority one on H100s, a low-priority one on A100s), lets
training fill the idle GPUs, then drives real HTTP load that spikes 8x for a minute. On a terminal it
shows, live, each GPU type's split between serving and training, the request rate, p99 and the training
steps as GPUs move to serving and back; elsewhere (CI) it prints plain progress lines. It ends with a
summary table and writes ``demo-output/``:

- ``timeline.png``: GPUs held per GPU type and workload, load and p99, training steps, over time;
- ``summary.json``: the figures and every sample; ``summary.txt``: the table; ``demo.log``: the log.

Everything it started is stopped at the end, on Ctrl-C (SIGINT), on SIGTERM and on errors.

Usage::

    make demo
    python -m tidal.demo [--plain] [--spike-s 60] [--output-dir demo-output]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tidal.demo.display import make_display, render_text, summary_table
from tidal.demo.scenario import DEFAULT_POLICY_PATH, ScenarioError, load_scenario

logger = logging.getLogger("tidal.demo")

GPU_TYPES = ["H100", "A100", "RTX4090"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tidal.demo", description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default=None, help="scenario YAML (default demo/configs/demo-scenario.yaml)")
    p.add_argument("--policy", default=str(DEFAULT_POLICY_PATH), help="the arbiter's policy file")
    p.add_argument("--output-dir", default="demo-output", help="where timeline.png and summary.* go")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")
    view.add_argument("--live", action="store_true", help="the live view even when stdout is not a terminal")
    p.add_argument("--pre-spike-s", type=float, default=None, help="base load before the spike")
    p.add_argument("--spike-s", type=float, default=None, help="length of the spike")
    p.add_argument("--post-spike-s", type=float, default=None, help="base load after the spike")
    p.add_argument("--keep-work-dir", action="store_true", help="keep /tmp/tidal-e2e-* (cluster logs) for debugging")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        scenario = load_scenario(args.scenario).with_overrides(
            pre_spike_s=args.pre_spike_s, spike_s=args.spike_s, post_spike_s=args.post_spike_s
        )
    except ScenarioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _log_to_file(out_dir / "demo.log")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    live = True if args.live else (False if args.plain else None)
    display = make_display("Tidal demo", scenario.load.slo_ms, GPU_TYPES, live=live)
    stop = threading.Event()
    _install_signal_handlers(stop)

    from tidal.demo.run import run_system
    from tidal.demo.runtime import DemoRuntime, SystemConfig

    t_start = time.monotonic()
    rt = DemoRuntime(scenario, policy_path=args.policy, progress=display.line, keep_work_dir=args.keep_work_dir)
    result = None
    exit_code = 0
    try:
        rt.start_cluster()
        rt.connect()
        phases = scenario.phases()
        result = run_system(
            rt,
            SystemConfig.named("tidal"),
            on_sample=lambda s: display.update(s, spike_rps=phases.spike_rps),
            on_event=display.line,
            stop=stop,
        )
    except KeyboardInterrupt:
        display.line("interrupted: stopping everything that was started")
        exit_code = 130
    except Exception as e:
        logger.exception("the demo failed")
        display.line(f"the demo failed: {e!r} (details in {out_dir / 'demo.log'}); stopping everything")
        exit_code = 1
    finally:
        # Ctrl-C during the tear-down must not leave half of it undone.
        with _signals_ignored():
            rt.close()
            leftovers = rt.leftover_processes()
            display.close()
    if leftovers:
        print(f"warning: {len(leftovers)} processes of the demo's cluster are still alive: {sorted(leftovers)}", file=sys.stderr)
        exit_code = exit_code or 1
    else:
        print("all Ray processes of the demo's cluster stopped")
    if result is not None:
        _write_outputs(result, scenario, out_dir, time.monotonic() - t_start)
    return exit_code


def _write_outputs(result: Any, scenario: Any, out_dir: Path, duration_s: float) -> None:
    from rich.console import Console
    from tidal.demo.plot import plot_timeline

    f = result.figures
    phases = scenario.phases()
    rows = summary_rows(f, scenario)
    rows.append(("demo duration (start to stop)", f"{duration_s:.0f} s"))
    table = summary_table("Tidal demo: an 8x inference spike on a cluster full of training", rows)
    Console().print(table)
    (out_dir / "summary.txt").write_text(render_text(table))
    png = plot_timeline(
        result.samples,
        phases,
        out_dir / "timeline.png",
        title=f"Tidal: {phases.spike_rps / phases.base_rps:g}x inference spike on H100x4, A100x2, RTX4090x2 (logical GPUs)",
        slo_ms=scenario.load.slo_ms,
        gpu_types=GPU_TYPES,
        events=result.events,
    )
    data = {"scenario": scenario.model_dump(), "duration_s": duration_s, **result.to_dict()}
    (out_dir / "summary.json").write_text(json.dumps(data, indent=1, default=str))
    print(f"wrote {png}, {out_dir / 'summary.json'}, {out_dir / 'summary.txt'}")


def summary_rows(f: dict[str, Any], scenario: Any) -> list[tuple[str, str]]:
    """The summary table's rows from a run's figures."""

    def s(v: Any, unit: str = "", fmt: str = "{:.1f}", missing: str = "never (within the spike)") -> str:
        return missing if v is None else (fmt.format(v) + unit)

    by_job = ", ".join(f"{j} {n:,}" for j, n in (f.get("train_steps_by_job") or {}).items())
    return [
        ("time to capacity (spike start -> all needed replicas running)", s(f["time_to_capacity_s"], " s")),
        ("replicas needed / peak running", f"{f['replicas_needed']} / {f['peak_replicas_running']}"),
        ("reclaim: shrink decision -> GPUs free (median)", s(f["reclaim_s"], " s") if f["reclaims"] else "no reclaim"),
        ("requests / failed", f"{f['requests']:,} / {f['failed_requests']:,}"),
        ("latency p50 / p99 (all requests)", f"{s(f['p50_ms'], ' ms', '{:.0f}')} / {s(f['p99_ms'], ' ms', '{:.0f}')}"),
        ("p99 during the spike", s(f["spike_p99_ms"], " ms", "{:.0f}")),
        (f"SLO attainment (succeeded within {scenario.load.slo_ms:g} ms)", s(f["slo_attainment"], "", "{:.4f}")),
        ("training steps during the load", f"{f['train_steps']:,} ({by_job})" if by_job else f"{f['train_steps']:,}"),
        ("training steps lost", str(f["lost_steps"])),
        ("GPU allocation ratio (GPU-seconds held / existing)", s(f["gpu_allocation_ratio"], "", "{:.3f}")),
        (
            "training goodput (GPU-s trained / GPU-s the service left, spike + 70 s)",
            s(f.get("training_goodput"), "", "{:.3f}", missing="-"),
        ),
        ("reclaims after the spike (at the base load)", str(f.get("post_spike_reclaims", "-"))),
        (
            "GPUs back to training after the spike",
            s(f["gpus_back_to_training_s"], " s", missing=f"not within the {scenario.load.post_spike_s:g} s after it"),
        ),
    ]


def _log_to_file(path: Path) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM behaves like Ctrl-C: the run stops and everything started is stopped."""

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


class _signals_ignored:
    """Ignores SIGINT/SIGTERM while tearing down (a second Ctrl-C must not abort the clean-up)."""

    def __enter__(self) -> None:
        self._old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
