"""Runtime latencies on a real local Ray cluster: start-up, arbiter ticks, heartbeats, release -> grant.

    .venv/bin/python bench/runtime_latency.py [--rounds 10] [--out bench/results/runtime_latency.json]

Measures, on the default local cluster (cluster/configs/local.yaml):

- ``cluster_start_s``: ``LocalCluster.start()`` until every node is registered;
- ``arbiter_start_s``: ``get_or_create_arbiter`` until the actor answers;
- ``tick_s``: the arbiter's own tick durations (observe + decide + plan + persist), p50/p99;
- ``wake_to_tick_s``: from a call that needs a tick (a release) to the tick starting, p50/p99;
- ``heartbeat_rtt_s``: a blocking ``heartbeat`` round trip from this driver, p50/p99;
- ``heartbeat_nowait_call_s``: the time one ``heartbeat_nowait`` call takes in the caller, p50/p99;
- ``release_to_grant_s``: a training job holding 4 H100 is shrunk for a service; from the job's heartbeat that
  releases the GPUs to the moment the service's own heartbeat shows the grant (the service polls with
  blocking heartbeats), per round, and the same inside the arbiter (``released`` event -> ``grow`` event).

The numbers depend on the machine's load (recorded as ``load_avg``); no test asserts on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

import ray
from tidal.cluster.actor import get_or_create_arbiter, kill_arbiter
from tidal.cluster.client import ArbiterClient
from tidal.cluster.cluster_spec import load_cluster_spec
from tidal.cluster.local import LocalCluster
from tidal.cluster.model import ServiceSpec, TrainingJobSpec

logger = logging.getLogger("bench.runtime_latency")
NAME, NAMESPACE = "tidal-arbiter-bench", "tidal-bench"


def _pcts(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    s = sorted(xs)
    return {
        "p50": statistics.median(s),
        "p99": s[min(len(s) - 1, int(0.99 * len(s)))],
        "max": s[-1],
        "n": len(s),
    }


def _wait(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.002)
    raise TimeoutError(what)


def run(rounds: int) -> dict:
    load_before = os.getloadavg()
    t0 = time.monotonic()
    cluster = LocalCluster(load_cluster_spec())
    cluster.start()
    cluster_start_s = time.monotonic() - t0
    try:
        cluster.activate()
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
        t0 = time.monotonic()
        cfg = {"guards": {"service_downscale_delay_s": 0, "job_resize_min_interval_s": 0}}
        handle = get_or_create_arbiter(config=cfg, name=NAME, namespace=NAMESPACE)
        arbiter_start_s = time.monotonic() - t0
        client = ArbiterClient(NAME, NAMESPACE)

        job = TrainingJobSpec("bench-job", 1.0, 1, 4, ("H100",), yield_grace_s=600)
        svc = ServiceSpec("bench-svc", 1.0, 1, 2, ("H100",))
        client.register(job)
        _wait(lambda: client.heartbeat(job.name, held={}).grant.get("H100") == 4, 30, "job grant")
        client.heartbeat(job.name, held={"H100": 4})

        rtts = []
        for _ in range(200):
            t = time.perf_counter()
            client.heartbeat(job.name, held={"H100": 4})
            rtts.append(time.perf_counter() - t)
        nowait = []
        for _ in range(2000):
            t = time.perf_counter()
            client.heartbeat_nowait(job.name, held={"H100": 4})
            nowait.append(time.perf_counter() - t)
        time.sleep(0.5)

        release_to_grant, inside = [], []
        for _ in range(rounds):
            client.register(svc)
            shrunk = _wait(
                lambda: (v := client.heartbeat(job.name, held={"H100": 4})).grant.get("H100") < 4 and v, 30, "shrink"
            )
            since = ray.get(handle.status.remote())["now_s"]
            t_release = time.perf_counter()
            client.heartbeat(job.name, held=shrunk.grant.as_dict())
            _wait(lambda: client.heartbeat(svc.name).grant.get("H100") == 2, 30, "service grant")
            release_to_grant.append(time.perf_counter() - t_release)
            events = ray.get(handle.events.remote(since))
            rel = next(e["t_s"] for e in events if e["kind"] == "released" and e["workload"] == job.name)
            grow = next(e["t_s"] for e in events if e["kind"] == "grow" and e["workload"] == svc.name and e["t_s"] >= rel)
            inside.append(grow - rel)
            # Back to the start: the service goes, the job grows back and holds 4.
            client.unregister(svc.name)
            held_now = shrunk.grant.as_dict()
            _wait(lambda h=held_now: client.heartbeat(job.name, held=h).grant.get("H100") == 4, 30, "regrow")
            client.heartbeat(job.name, held={"H100": 4})

        time.sleep(3)  # a few periodic ticks for the tick statistics
        stats = ray.get(handle.stats.remote())
        ticks = ray.get(handle.status.remote())["arbiter"]
        return {
            "machine": {"cpus": os.cpu_count(), "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
            "cluster_start_s": cluster_start_s,
            "cluster_nodes": 1 + len(cluster.nodes),
            "arbiter_start_s": arbiter_start_s,
            "tick_s": {"p50": stats["tick_p50_s"], "p99": stats["tick_p99_s"], "n": stats["ticks"]},
            "tick_interval_s": stats["tick_interval_s"],
            "early_ticks": stats["early_ticks"],
            "wake_to_tick_s": {"p50": stats["wake_to_tick_p50_s"], "p99": stats["wake_to_tick_p99_s"]},
            "heartbeat_rtt_s": _pcts(rtts),
            "heartbeat_nowait_call_s": _pcts(nowait),
            "release_to_grant_s": _pcts(release_to_grant),
            "release_to_grant_inside_arbiter_s": _pcts(inside),
            "tick_errors": ticks["tick_errors"],
        }
    finally:
        try:
            if ray.is_initialized():
                kill_arbiter(NAME, NAMESPACE)
                ray.shutdown()
        finally:
            cluster.stop()
            cluster.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "runtime_latency.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(args.rounds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    logger.info("wrote %s", out)
    print(json.dumps(result, indent=2))  # the script's own output


if __name__ == "__main__":
    main()
