"""``tidal simulate``: run policies on traces over a simulated cluster; write summary.json and plots.

``register_cli(subparsers)`` adds the ``simulate`` sub-command to the ``tidal`` CLI (``tidal.cluster.cli``);
``python -m tidal.cluster.sim.cli ...`` runs it on its own. Example::

    tidal simulate --cluster cluster/configs/sim-2048.yaml \\
        --training-trace ../shared/traces/philly_2017-09_10.csv \\
        --inference-trace ../shared/traces/servegen_m-large_days1-7.csv \\
        --inference-peak-share 0.333 --days 56 --policy tidal,static,ray-alone --out sim-out
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from tidal.cluster.flags import bounded_int, finite_float

DEFAULT_CLUSTER = Path(__file__).resolve().parent.parent / "configs" / "sim-2048.yaml"


def _job_types(value: str) -> list[dict[str, Any]]:
    """``0.5:H200/H100/A100/RTX4090,0.5:H200/H100`` -> type classes (share, accepted types)."""
    out = []
    for part in value.split(","):
        share, sep, types = part.partition(":")
        try:
            s = float(share)
        except ValueError:
            s = -1.0
        if not sep or not math.isfinite(s) or s <= 0 or not types:
            raise argparse.ArgumentTypeError(
                f"--job-types part {part!r} is not valid; expected SHARE:TYPE/TYPE/... with a finite SHARE > 0, "
                "e.g. 0.5:H100/A100"
            )
        out.append({"share": s, "gpu_types": types.split("/")})
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", default=str(DEFAULT_CLUSTER), help="node spec YAML (the `tidal up` format)")
    p.add_argument(
        "--training-trace", help="training-job CSV (timestamp, duration, num_gpus[, gpu_type, priority])"
    )
    p.add_argument(
        "--inference-trace",
        action="append",
        default=[],
        help="rate CSV (window_start_s + rate) or request CSV (TIMESTAMP); repeat or comma-separate for several services",
    )
    p.add_argument("--policy", default="tidal,static,ray-alone", help="comma-separated policies to compare")
    p.add_argument("--out", required=True, help="output directory (summary.json, PNG plots)")
    p.add_argument(
        "--policy-config", help="policy YAML (speeds, prices, headroom, guards); default: built-in"
    )
    p.add_argument("--sim-config", help="simulator YAML (tidal.cluster.sim.config.SimConfig); flags override it")
    p.add_argument("--seed", type=bounded_int(ge=0), help="seed of every random choice (default 0)")
    p.add_argument("--days", type=finite_float(gt=0, unit="days"), help="simulated days (default: the training trace's span)")
    p.add_argument("--start-day", type=finite_float(ge=0, unit="days"), help="skip this many days of the training trace")
    p.add_argument("--drain-s", type=finite_float(ge=0, unit="seconds"), help="simulate this long past the horizon, with no new jobs")
    p.add_argument("--max-jobs", type=bounded_int(ge=1), help="keep only the first N jobs of the window")
    p.add_argument(
        "--training-load",
        type=finite_float(gt=0),
        help="replicate trace jobs to scale training load (2 = every job twice, seeded submit jitter)",
    )
    p.add_argument(
        "--rate-multiplier", type=finite_float(gt=0), help="multiply the inference rate (after --inference-peak-share)"
    )
    p.add_argument(
        "--inference-peak-share",
        type=finite_float(gt=0, le=1, unit="a share"),
        help="scale inference so that its peak needs this share of the cluster's GPUs (e.g. 0.333)",
    )
    p.add_argument(
        "--request-window-s", type=finite_float(gt=0, unit="seconds"), help="bin request CSVs into windows of this many seconds"
    )
    p.add_argument(
        "--no-repeat-inference", action="store_true", help="do not wrap a short inference trace around"
    )
    p.add_argument(
        "--rate-interpolation", choices=["linear", "step"], help="rate between windows (default linear)"
    )
    p.add_argument("--tick-s", type=finite_float(gt=0, unit="seconds"), help="periodic arbiter tick in simulated seconds (default 60)")
    p.add_argument(
        "--event-tick-delay-s", type=finite_float(ge=0, unit="seconds"), help="event-driven tick this soon after a registration/release"
    )
    p.add_argument(
        "--event-tick-min-gap-s", type=finite_float(ge=0, unit="seconds"), help="no event-driven tick sooner than this after the last tick (20)"
    )
    p.add_argument(
        "--job-types",
        type=_job_types,
        help="accepted types of jobs without gpu_type: SHARE:TYPE/TYPE,... drawn per job with the seed",
    )
    p.add_argument("--max-scale", type=finite_float(ge=1), help="max_workers = ceil(num_gpus * max_scale) (default 2)")
    p.add_argument(
        "--min-fraction", type=finite_float(gt=0, le=1, unit="a fraction"), help="min_workers = ceil(num_gpus * min_fraction) (default 0.5)"
    )
    p.add_argument("--node-failure-rate", type=finite_float(ge=0, unit="failures per node-day"), help="random node failures per node-day (default 0)")
    p.add_argument("--processes", type=bounded_int(ge=1), help="policies run in this many processes (default: cores)")
    p.add_argument("--no-plots", action="store_true", help="write summary.json only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO")


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``simulate`` to a ``tidal`` CLI's sub-parsers; its handler is ``args.func(args) -> int``."""
    p = subparsers.add_parser(
        "simulate",
        help="run policies on traces over a simulated cluster",
        description=(__doc__ or "").split("\n\n")[0],
    )
    add_arguments(p)
    p.set_defaults(func=simulate_command)
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "seed": args.seed,
        "days": args.days,
        "start_day": args.start_day,
        "drain_s": args.drain_s,
        "rate_multiplier": args.rate_multiplier,
        "training_load": args.training_load,
        "inference_peak_share": args.inference_peak_share,
        "request_window_s": args.request_window_s,
        "repeat_inference": False if args.no_repeat_inference else None,
        "node_failure_rate_per_day": args.node_failure_rate,
        "arbiter": {
            "tick_s": args.tick_s,
            "event_tick_delay_s": args.event_tick_delay_s,
            "event_tick_min_gap_s": args.event_tick_min_gap_s,
        },
        "service": {"rate_interpolation": args.rate_interpolation},
        "training": {
            "type_classes": args.job_types,
            "max_scale": args.max_scale,
            "min_fraction": args.min_fraction,
        },
    }


def simulate_command(args: argparse.Namespace) -> int:
    """Runs the simulation the flags describe. Returns the process exit code."""
    from tidal.cluster.policy_file import load_policy_file
    from tidal.cluster.sim.config import SimConfigError, load_sim_config
    from tidal.cluster.sim.report import format_table, summarize, write_plots, write_summary
    from tidal.cluster.sim.run import cluster_nodes, prepare_inputs, run_policies
    from tidal.cluster.sim.traces import TraceError
    from tidal.policies.base import known_policies
    from tidal.policies.config import PolicyConfigError

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        # One warning per forced stop would flood the terminal at datacenter scale; summary.json counts them.
        logging.getLogger("tidal.cluster.arbiter").setLevel(logging.ERROR)
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    valid = known_policies()
    for p in policies:
        if p not in valid and ":" not in p:
            print(f"error: --policy {p!r} is not a known policy; valid: {', '.join(valid)}", file=sys.stderr)
            return 2
    traces = [t for arg in args.inference_trace for t in arg.split(",") if t]
    if not args.training_trace and not traces:
        print("error: give --training-trace and/or --inference-trace", file=sys.stderr)
        return 2
    try:
        sim_cfg = load_sim_config(args.sim_config, _overrides(args))
        policy_cfg = load_policy_file(args.policy_config)
        inputs = prepare_inputs(
            nodes=cluster_nodes(args.cluster),
            training_trace=args.training_trace,
            inference_traces=traces,
            policy_config=policy_cfg,
            sim_config=sim_cfg,
            max_jobs=args.max_jobs,
        )
    except (SimConfigError, PolicyConfigError, TraceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    if args.quiet:
        results = run_policies(inputs, policies, processes=args.processes)
    else:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description:>10}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}% of simulated time"),
            TimeElapsedColumn(),
        ) as bar:
            tasks = {p: bar.add_task(p, total=1.0) for p in policies}
            results = run_policies(
                inputs,
                policies,
                processes=args.processes,
                progress=lambda p, f: bar.update(tasks[p], completed=min(1.0, f)),
            )
    wall = time.perf_counter() - t0
    out = Path(args.out)
    meta = {
        "command": " ".join(["tidal", "simulate", *sys.argv[2:]])
        if sys.argv[1:2] == ["simulate"]
        else " ".join(sys.argv),
        "wall_s": wall,
        "jobs": len(inputs.jobs),
        "days": inputs.horizon_s / 86_400.0,
        "gpus": sum(n.num_gpus for n in inputs.nodes),
        "inference_peak_rps": sum(s.peak_rps() for s in inputs.series),
        "sim_config": sim_cfg.model_dump(mode="json"),
    }
    summary = summarize(results, meta)
    path = write_summary(out, summary)
    if not args.no_plots:
        write_plots(out, results)
    print(format_table(summary))
    print(f"\nwrote {path} ({wall:.1f} s for {len(policies)} policies)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tidal.cluster.sim.cli", description=(__doc__ or "").split("\n\n")[0]
    )
    add_arguments(parser)
    return simulate_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
