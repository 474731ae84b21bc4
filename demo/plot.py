"""The timeline plot of a spike run (matplotlib, Agg backend: no display needed). Pure: no Ray.

Three panels over the same time axis (seconds from the start of the load, the spike shaded):

1. GPUs held by serving and by training, stacked per GPU type (serving in warm colours, training in
   greens), over the cluster's total: GPUs moving to serving during the spike and back after it.
2. Requests per second (offered and served) and p99 latency against the SLO.
3. Training steps per job.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from tidal.demo.scenario import LoadPhases  # noqa: E402
from tidal.demo.timeline import Sample, TimelineEvent  # noqa: E402

_SERVING_COLOURS = ["#c2185b", "#f06292", "#ff8a65", "#ffb74d"]
_TRAINING_COLOURS = ["#1b5e20", "#43a047", "#81c784", "#c5e1a5"]


def plot_timeline(
    samples: Sequence[Sample],
    phases: LoadPhases,
    path: str | Path,
    *,
    title: str,
    slo_ms: float,
    gpu_types: Sequence[str],
    events: Sequence[TimelineEvent] = (),
    setup_shown_s: float = 60.0,
) -> Path:
    """Writes the PNG to ``path`` and returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The set-up can take minutes on a small machine: show only its last ``setup_shown_s`` seconds.
    shown = [s for s in samples if s.phase != "setup" and s.t_s >= -setup_shown_s]
    if not shown:
        shown = list(samples)
    t = [s.t_s for s in shown]
    types = [x for x in gpu_types if any(s.capacity.get(x) for s in shown)]
    fig, (ax_gpu, ax_load, ax_steps) = plt.subplots(3, 1, figsize=(11, 9), sharex=True, height_ratios=[3, 2, 2])
    fig.suptitle(title)

    series, labels, colours = [], [], []
    for kind, palette in (("serving", _SERVING_COLOURS), ("training", _TRAINING_COLOURS)):
        for i, gt in enumerate(types):
            values = [(s.serving_gpus if kind == "serving" else s.training_gpus).get(gt, 0.0) for s in shown]
            if any(values):  # a workload never on that type gets no band and no legend entry
                series.append(values)
                labels.append(f"{kind} on {gt}")
                colours.append(palette[i % len(palette)])
    if t and series:
        ax_gpu.stackplot(t, *series, labels=labels, colors=colours, step="post", linewidth=0, zorder=2)
    if t:
        ax_gpu.step(t, [s.capacity_total for s in shown], where="post", color="black", lw=1, label="GPUs in the cluster")
    ax_gpu.set_ylabel("GPUs held")
    ax_gpu.legend(loc="upper left", fontsize=7, ncol=2)
    for e in events:
        if e.kind in ("shrink", "grow", "released", "forced") and t and e.t_s >= t[0]:
            ax_gpu.axvline(e.t_s, color="grey", lw=0.4, alpha=0.5)

    ax_load.plot(t, [s.offered_rps for s in shown], color="#5c6bc0", label="offered req/s")
    ax_load.plot(t, [s.ok_rps for s in shown], color="#26a69a", label="served req/s")
    ax_load.set_ylabel("requests/s")
    ax_p99 = ax_load.twinx()
    ax_p99.plot(t, [s.p99_ms if s.p99_ms is not None else float("nan") for s in shown], color="#e53935", lw=1, label="p99 (5 s window)")
    ax_p99.axhline(slo_ms, color="#e53935", ls="--", lw=0.8, label=f"SLO {slo_ms:.0f} ms")
    ax_p99.set_ylabel("p99 latency (ms)")
    ax_p99.set_yscale("log")
    h1, l1 = ax_load.get_legend_handles_labels()
    h2, l2 = ax_p99.get_legend_handles_labels()
    ax_load.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=7, ncol=2)

    jobs = sorted({j for s in shown for j in s.steps})
    for j in jobs:
        ax_steps.plot(t, [s.steps.get(j, 0) for s in shown], label=j)
    ax_steps.set_ylabel("training steps")
    ax_steps.set_xlabel("seconds from the start of the load")
    if jobs:
        ax_steps.legend(loc="upper left", fontsize=7)

    for ax in (ax_gpu, ax_load, ax_steps):
        ax.axvspan(phases.spike_start_s, phases.spike_end_s, color="#ffcdd2", alpha=0.35, lw=0, zorder=0)
        ax.grid(alpha=0.3)
    ax_gpu.text(phases.spike_start_s, ax_gpu.get_ylim()[1] * 0.98, " spike", va="top", fontsize=8, color="#b71c1c")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
