"""The simulations of Philly and ServeGen on 2,048 GPUs, tidal vs static vs Ray alone, in two cases.

- ``headline``: 8 weeks of the traces at twice the Philly rate (``--training-load 2``).
- ``saturated``: the 14 busiest days (from day 28) at four times the rate: training wants more than the
  whole cluster for days, and priorities decide (the service's SLO against a long queue of jobs).

Runs ``tidal simulate`` (``tidal.cluster.sim.cli``) with the case's flags (extra flags are passed through and
override them), and writes ``bench/results/simulate.json`` (headline) or
``bench/results/simulate-saturated.json``: the summary of every policy (every key, and the oracle), the
wall-clock and CPU time of the run, each policy's CPU time and where it went (the policy's decide(), the
rest of the arbiter's tick, the simulator), the machine's load, and the exact command. Plots go to
``bench/results/simulate[-saturated]/``. Figures: ``docs/benchmarks.md``.

Run: ``python bench/simulate.py [--case headline|saturated] [...any tidal simulate flag]``, e.g.
``--start-day 28 --days 3`` for three busy days of the trace.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

from tidal.cluster.sim.cli import main as simulate_main

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT.parent / "shared" / "traces"
RESULTS = ROOT / "bench" / "results"

COMMON = [
    "--cluster",
    str(ROOT / "cluster" / "configs" / "sim-2048.yaml"),
    "--training-trace",
    str(TRACES / "philly_2017-09_10.csv"),
    "--inference-trace",
    str(TRACES / "servegen_m-large_days1-7.csv"),
    "--inference-peak-share",
    "0.333",
    "--max-scale",
    "4",
    # 20 s (the simulator's default): at 60 s tidal's short jobs wait a tick longer to grow from their
    # minimum, and its average JCT ends 11% above Ray alone's on the busy days (7% at 20 s), for half the CPU.
    "--event-tick-min-gap-s",
    "20",
    "--policy",
    "tidal,static,ray-alone",
    # One process per core (the default), not one per policy: on two cores the first two policies
    # start and the third follows the first to finish, so static (the longest, given second) keeps a
    # core to itself; three processes on two cores make every policy finish later.
    # (Flags given twice: the last one wins, so a case's flags and the caller's override these.)
]

CASES = {
    "headline": (COMMON + ["--days", "56", "--training-load", "2"], "simulate"),
    # Training at 4x the Philly rate over its busiest two weeks: at their minimums alone the jobs want more
    # than the cluster; the case where a waiting job's minimum must not outrank the service.
    "saturated": (COMMON + ["--start-day", "28", "--days", "14", "--training-load", "4"], "simulate-saturated"),
}
HEADLINE = CASES["headline"][0]


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str]) -> int:
    case = "headline"
    if "--case" in argv:
        i = argv.index("--case")
        if i + 1 >= len(argv) or argv[i + 1] not in CASES:
            print(f"--case: give one of {', '.join(CASES)}", file=sys.stderr)
            return 2
        case = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    flags, name = CASES[case]
    out_dir = RESULTS / name
    args = [*flags, *argv]
    if "--out" not in args:
        args += ["--out", str(out_dir)]
    else:
        out_dir = Path(args[args.index("--out") + 1])
    load_before = os.getloadavg()
    t0, c0 = time.perf_counter(), _cpu_s()
    rc = simulate_main(args)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    if rc != 0:
        return rc
    summary = json.loads((out_dir / "summary.json").read_text())
    policies = {k: v for k, v in summary.items() if not k.startswith("_") and k != "oracle"}
    cores = os.cpu_count() or 1
    result = {
        "case": case,
        "command": " ".join(["python bench/simulate.py", *(["--case", case] if case != "headline" else []), *argv]),
        "equivalent_cli": "tidal simulate " + " ".join(args),
        "wall_s": wall,
        "cpu_s": cpu,
        # On a niced, shared machine the wall time says more about the neighbours than about the
        # simulator: the fair figure is the CPU time, and CPU / cores is the wall time of a quiet run
        # whose policies share the cores evenly.
        "cpu_s_by_policy": {k: v.get("cpu_s") for k, v in policies.items()},
        "quiet_machine_wall_estimate_s": cpu / cores,
        "cpu_breakdown_s": {
            k: {
                "decide": v.get("decide_cpu_s"),
                "arbiter_tick_other": (v.get("tick_cpu_s") or 0.0) - (v.get("decide_cpu_s") or 0.0),
                "simulator": v.get("sim_cpu_s"),
            }
            for k, v in policies.items()
        },
        "cores": cores,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "simulated_days": summary.get("_run", {}).get("days"),
        "summary": {k: v for k, v in summary.items() if not k.startswith("_")},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wall {wall:.0f} s, CPU {cpu:.0f} s ({cpu / cores:.0f} s on {cores} quiet cores); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
