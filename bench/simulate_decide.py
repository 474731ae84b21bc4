"""How long the production policies take to decide on simulator snapshots at datacenter scale.

Runs the simulator (tidal policy) on the 2,048-GPU cluster up to a busy moment, takes the arbiter's
snapshot there, and times ``decide()`` of each policy (wrapped in its guards, as the arbiter runs it) on
that same snapshot, with a cProfile of the slowest functions. This is the number that bounds the
simulator's speed: one decision per simulated minute, 80,640 minutes in 8 weeks.

Writes ``bench/results/simulate_decide.json``. Run::

    python bench/simulate_decide.py [--day 30.5] [--training-load 2] [--repeat 50]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from pathlib import Path

from tidal.cluster.policy_file import load_policy_file
from tidal.cluster.sim.config import load_sim_config
from tidal.cluster.sim.run import cluster_nodes, prepare_inputs
from tidal.cluster.sim.simulator import Simulator
from tidal.policies.base import PolicyState

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT.parent / "shared" / "traces"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster", default=str(ROOT / "cluster" / "configs" / "sim-2048.yaml"))
    ap.add_argument("--training-trace", default=str(TRACES / "philly_2017-09_10.csv"))
    ap.add_argument("--inference-trace", default=str(TRACES / "servegen_m-large_days1-7.csv"))
    ap.add_argument(
        "--day", type=float, default=30.6, help="trace day of the snapshot (30.6 = 14:24 on day 30)"
    )
    ap.add_argument("--training-load", type=float, default=2.0)
    ap.add_argument("--max-scale", type=float, default=None)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "simulate_decide.json"))
    args = ap.parse_args()

    start_day = float(int(args.day)) - 1.0  # one day of warm-up before the snapshot
    training = {"max_scale": args.max_scale} if args.max_scale else {}
    cfg = load_sim_config(
        None,
        {
            "start_day": start_day,
            "days": args.day - start_day,
            "inference_peak_share": 1 / 3,
            "training_load": args.training_load,
            "training": training,
        },
    )
    inputs = prepare_inputs(
        nodes=cluster_nodes(args.cluster),
        training_trace=args.training_trace,
        inference_traces=[args.inference_trace],
        policy_config=load_policy_file(None),
        sim_config=cfg,
    )
    sim = Simulator(inputs, "tidal")
    sim.run()
    sim.arbiter.tick()
    snapshot = sim.arbiter.snapshot()
    state = sim.arbiter._policy_state  # the state the next decision would start from
    rows = []
    for name in ("tidal", "static", "ray-alone"):
        policy = Simulator(inputs, name).policy
        times = []
        for _ in range(args.repeat):
            t0 = time.process_time()
            policy.decide(snapshot, state if name == "tidal" else PolicyState())
            times.append((time.process_time() - t0) * 1e3)
        prof = cProfile.Profile(time.process_time)  # CPU time: the machine may be shared
        prof.enable()
        for _ in range(5):
            policy.decide(snapshot, state if name == "tidal" else PolicyState())
        prof.disable()
        stats = pstats.Stats(prof)
        top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:12]  # type: ignore[attr-defined]
        rows.append(
            {
                "policy": name,
                "median_cpu_ms": statistics.median(times),
                "p90_cpu_ms": sorted(times)[int(0.9 * (len(times) - 1))],
                "top_tottime": [
                    {
                        "function": f"{Path(f).name}:{line}({fn})",
                        "tottime_ms_per_decide": tt / 5 * 1e3,
                        "cumtime_ms_per_decide": ct / 5 * 1e3,
                        "calls_per_decide": nc / 5,
                    }
                    for (f, line, fn), (_, nc, tt, ct, _) in top
                ],
            }
        )
        print(f"{name:>10}: median {rows[-1]['median_cpu_ms']:.1f} ms CPU per decide")
    out = {
        "snapshot": {
            "day": args.day,
            "workloads": len(snapshot.workloads),
            "jobs": sum(1 for w in snapshot.workloads if w.kind == "training"),
            "nodes": len(snapshot.nodes),
            "gpus": sum(n.num_gpus for n in snapshot.nodes),
            "training_load": args.training_load,
        },
        "policies": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{out['snapshot']}; wrote {args.out}")


if __name__ == "__main__":
    main()
