"""The simulator's outputs: ``summary.json`` and PNG plots (matplotlib, Agg backend: no display).

Plots:
- ``gpus_<policy>.png``: granted GPUs over time by GPU type and workload kind (stacked), with capacity
  and the demand (what an oracle would allocate is min(demand, capacity)).
- ``jct_cdf.png``: CDF of job completion times, one line per policy.
- ``latency.png``: the services' p99 latency per minute (max over 10-minute bins), with the SLO.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tidal.cluster.sim.simulator import PolicyResult

SUMMARY_KEYS = (
    "slo_attainment",
    "slo_minutes",
    "gpu_allocation_ratio",
    "avg_jct_s",
    "p99_jct_s",
    "avg_queue_s",
    "preemptions",
    "job_stops",
    "job_restarts",
    "job_quick_restops",
    "lost_gpu_hours",
    "cost_usd",
    "jobs_finished",
)

TYPE_COLORS = {"H200": "#5b2a86", "H100": "#1f77b4", "A100": "#2ca02c", "RTX4090": "#ff7f0e"}
POLICY_COLORS = {"tidal": "#1f77b4", "static": "#7f7f7f", "ray-alone": "#d62728"}


def summarize(results: Mapping[str, PolicyResult], meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON written to ``summary.json``: one entry per policy, plus the oracle bound and run facts.

    The oracle's ``gpu_allocation_ratio`` is ``min(demand, capacity)`` integrated over the tidal run
    (over the first policy's if tidal did not run); the metrics it has no meaning for are null.
    """
    out: dict[str, Any] = {}
    for name, r in results.items():
        out[name] = {k: _clean(v) for k, v in r.items() if not k.startswith("_")}
    if results:
        ref = results.get("tidal") or next(iter(results.values()))
        out["oracle"] = {k: None for k in SUMMARY_KEYS}
        out["oracle"].update(
            {
                "policy": "oracle",
                "gpu_allocation_ratio": ref["oracle_allocation_ratio"],
                "bound_from_run": ref["policy"],
                "note": "allocation bound: min(demand, capacity) at every moment of that run",
            }
        )
    if meta:
        out["_run"] = dict(meta)
    return out


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


def write_summary(out_dir: Path, summary: Mapping[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    return path


def format_table(summary: Mapping[str, Any]) -> str:
    """A Markdown table of the headline metrics, one row per policy (docs/benchmarks.md's format)."""
    cols = [
        ("policy", "policy", "{}"),
        ("slo_attainment", "SLO req", "{:.4f}"),
        ("slo_minutes", "SLO min", "{:.4f}"),
        ("gpu_allocation_ratio", "alloc", "{:.3f}"),
        ("avg_jct_s", "avg JCT h", "h"),
        ("p99_jct_s", "p99 JCT h", "h"),
        ("avg_queue_s", "avg queue h", "h"),
        ("preemptions", "preempt", "{}"),
        ("job_stops", "stops", "{}"),
        ("job_restarts", "restarts", "{}"),
        ("job_quick_restops", "re-stops <10 min", "{}"),
        ("lost_gpu_hours", "lost GPU-h", "{:.1f}"),
        ("cost_usd", "cost $", "{:,.0f}"),
        ("jobs_finished", "jobs done", "{}"),
    ]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for name, r in summary.items():
        if name.startswith("_"):
            continue
        cells = []
        for key, _, fmt in cols:
            v = name if key == "policy" else r.get(key)
            if v is None:
                cells.append("-")
            elif fmt == "h":
                cells.append(f"{v / 3600.0:.2f}")
            else:
                cells.append(fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plots


def write_plots(out_dir: Path, results: Mapping[str, PolicyResult]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, r in results.items():
        paths.append(_plot_gpus(plt, out_dir / f"gpus_{name}.png", name, r))
    paths.append(_plot_jct(plt, out_dir / "jct_cdf.png", results))
    paths.append(_plot_latency(plt, out_dir / "latency.png", results))
    return paths


def _plot_gpus(plt: Any, path: Path, name: str, r: PolicyResult) -> Path:
    samples = r["_series"]["samples"]
    days = [s["t_s"] / 86_400.0 for s in samples]
    keys = sorted({k for s in samples for k in s["granted"]}, key=lambda k: (k.split("/")[0] != "service", k))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    if samples and keys:
        ys = [[max(0.0, s["granted"].get(k, 0.0)) for s in samples] for k in keys]
        colors = [TYPE_COLORS.get(k.split("/")[1], None) for k in keys]
        hatches = ["//" if k.startswith("service") else "" for k in keys]
        polys = ax.stackplot(days, ys, labels=keys, colors=colors, alpha=0.85)
        for p, h in zip(polys, hatches, strict=True):
            p.set_hatch(h)
            if h:
                p.set_alpha(1.0)
        cap = [sum(s["capacity"].values()) for s in samples]
        demand = [s["demand_gpus"] for s in samples]
        ax.plot(days, cap, color="black", lw=1.0, label="capacity")
        ax.plot(days, demand, color="black", lw=0.6, ls=":", label="demand")
        ax.set_ylim(0, max(cap) * 1.15)
    ax.set_xlabel("day")
    ax.set_ylabel("granted GPUs")
    ax.set_title(
        f"{name}: GPUs by type and workload (hatched = serving)   "
        f"allocation {r['gpu_allocation_ratio']:.2f}, oracle {r['oracle_allocation_ratio']:.2f}"
    )
    ax.legend(loc="upper left", ncol=5, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_jct(plt: Any, path: Path, results: Mapping[str, PolicyResult]) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        jct = r["_series"]["jct_s"]
        if not jct:
            continue
        n = len(jct)
        ax.step(
            [x / 3600.0 for x in jct],
            [(i + 1) / n for i in range(n)],
            where="post",
            label=f"{name} (avg {sum(jct) / n / 3600.0:.1f} h)",
            color=POLICY_COLORS.get(name),
        )
    ax.set_xscale("log")
    ax.set_xlabel("job completion time (hours, log)")
    ax.set_ylabel("share of finished jobs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_latency(plt: Any, path: Path, results: Mapping[str, PolicyResult], bin_min: int = 10) -> Path:
    fig, ax = plt.subplots(figsize=(12, 4.5))
    slo = None
    for name, r in results.items():
        for svc, lat in r["_series"]["latency_p99_s"].items():
            slo = r["_series"]["slo_s"][svc]
            binned = [max(0.1, *lat[i : i + bin_min]) for i in range(0, len(lat), bin_min)]
            ax.plot(
                [i * bin_min / 1440.0 for i in range(len(binned))],
                binned,
                lw=0.7,
                label=f"{name}: {svc}",
                color=POLICY_COLORS.get(name),
            )
    if slo is not None:
        ax.axhline(slo, color="black", ls="--", lw=1, label=f"SLO p99 {slo:g} s")
    ax.set_yscale("log")
    ax.set_xlabel("day")
    ax.set_ylabel(f"p99 latency (s, max per {bin_min} min)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
