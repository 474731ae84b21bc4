"""Serving benchmarks on a real local cluster, driven by ``tidal.demo.loadgen``; JSON into ``bench/results/``.

Measures, in one run on this machine:

1. **One replica**: throughput and latency of a single replica of the default model (DigitsMLP) under
   open-loop Poisson load at increasing rates; the highest rate it keeps up with (no errors, throughput
   within 5 % of the offered rate) is its capacity.
2. **Hook latency**: the same deployment twice, side by side, one with Serve's default autoscaling policy
   and one with Tidal's (reporting to a running arbiter); the same load alternates between them (A, B,
   A, B, ...) so that the machine's background load hits both alike. Plus the Tidal policy's own cost per
   call, timed in-process with a context of the size it sees (it runs in the Serve controller, every
   0.1 s, off the request path).
3. **Cold start** (``min_replicas: 0``): from the first request to an idle service (zero replicas) to its
   reply, several times (the service scales back to zero in between).

Usage::

    .venv/bin/python bench/serving_bench.py --out bench/results/serving.json [--quick]
    .venv/bin/python bench/serving_bench.py --cold-start-only --cold-starts 5 --out bench/results/cold-start.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tidal.demo import loadgen

logger = logging.getLogger("serving_bench")

HERE = Path(__file__).parent

SPEC = {
    "head": {"num_cpus": 1},
    "node_groups": [
        {"gpu_type": "A100", "num_gpus": 2, "num_cpus": 3},
        {"gpu_type": "H100", "num_gpus": 2, "num_cpus": 3},
    ],
}


def app(
    name: str, checkpoint: Path, *, policy: str, min_r: int, max_r: int, arbiter: str, **auto: Any
) -> dict:
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "tidal.serving.app:build_app",
        "args": {
            "service": {
                "name": name,
                "gpu_types": ["A100", "H100"],
                "min_replicas": min_r,
                "max_replicas": max_r,
            },
            "model": {"checkpoint": str(checkpoint)},
            "num_cpus_per_replica": 1,
            "autoscaling": {"policy": policy, "arbiter_name": arbiter, **auto},
        },
    }


def run_load(url: str, rps: float, duration_s: float, seed: int) -> dict:
    arrivals = loadgen.constant_arrivals(rps, duration_s, max_requests=100_000, seed=seed)
    # Bounded: beyond capacity a backlog only measures the queue; refused sends count as errors instead.
    cfg = loadgen.LoadConfig(
        url,
        arrivals,
        loadgen.default_body(1, 64, seed),
        {"content-type": "application/json"},
        timeout_s=30.0,
        max_in_flight=200,
    )
    records, wall = asyncio.run(loadgen.run_load(cfg))
    return loadgen.summarize(records, wall)


def keeps_up(step: dict) -> bool:
    """Every request answered without error, and the backlog gone within 1 s of the last arrival."""
    return step["errors"] == 0 and step["wall_s"] <= step["duration_s"] + 1.0


def one_replica(base: str, rates: list[float], duration_s: float) -> dict:
    url = f"{base}/digits-one/v1/predict"
    run_load(url, 20, 3, seed=99)  # warm up
    steps = []
    for i, rps in enumerate(rates):
        s = run_load(url, rps, duration_s, seed=i)
        steps.append({**s, "target_rps": rps, "duration_s": duration_s})
        logger.info(
            "one replica @ %.0f rps: %.1f rps ok, p50 %.1f ms, p99 %.1f ms, %d errors",
            rps,
            s["throughput_rps"],
            s["latency_ms"]["p50"] or -1,
            s["latency_ms"]["p99"] or -1,
            s["errors"],
        )
        if not keeps_up(steps[-1]):
            break  # past capacity: higher rates only measure the queue
    kept_up = [s for s in steps if keeps_up(s)]
    best = max(kept_up, key=lambda s: s["target_rps"]) if kept_up else None
    return {
        "steps": steps,
        "capacity_rps": best["throughput_rps"] if best else None,
        "capacity_target_rps": best["target_rps"] if best else None,
        "p99_ms_at_capacity": best["latency_ms"]["p99"] if best else None,
        "p50_ms_at_capacity": best["latency_ms"]["p50"] if best else None,
    }


def hook_latency(base: str, rps: float, duration_s: float, rounds: int) -> dict:
    urls = {"default": f"{base}/digits-default/v1/predict", "tidal": f"{base}/digits-tidal/v1/predict"}
    for u in urls.values():
        run_load(u, 20, 3, seed=98)
    runs: dict[str, list[dict]] = {"default": [], "tidal": []}
    for r in range(rounds):
        order = ["default", "tidal"] if r % 2 == 0 else ["tidal", "default"]
        for k in order:
            runs[k].append(run_load(urls[k], rps, duration_s, seed=100 + r))
    out: dict[str, Any] = {"rps": rps, "duration_s": duration_s, "rounds": rounds, "runs": runs}
    for k, rs in runs.items():
        out[k] = {
            q: statistics.median(x["latency_ms"][q] for x in rs if x["latency_ms"][q] is not None)
            for q in ("p50", "p95", "p99")
        }
        out[k]["errors"] = sum(x["errors"] for x in rs)
    out["tidal_minus_default_ms"] = {q: out["tidal"][q] - out["default"][q] for q in ("p50", "p95", "p99")}
    return out


def policy_call_cost_us(n_calls: int = 20_000, n_replicas: int = 8) -> dict:
    """Time ``TidalAutoscalingPolicy.__call__`` in-process (no arbiter: the link is not started)."""
    from dataclasses import dataclass, field

    from tidal.serving.autoscale import TidalAutoscalingPolicy
    from tidal.serving.config import GPU_TYPE_METRIC_PREFIX

    @dataclass(frozen=True)
    class Rid:
        unique_id: str

    @dataclass
    class Cfg:  # the deployment's own autoscaling_config, as Serve's context carries it
        min_replicas: int = 1
        max_replicas: int = 16
        target_ongoing_requests: float = 2.0
        upscale_delay_s: float = 0.0
        downscale_delay_s: float = 1.0

    @dataclass
    class Ctx:
        total_num_requests: float
        current_num_replicas: int
        target_num_replicas: int
        running_replicas: list
        aggregated_metrics: dict = field(default_factory=dict)
        app_name: str = "bench"
        deployment_name: str = "x"
        config: Cfg = field(default_factory=Cfg)

    class Policy(TidalAutoscalingPolicy):
        run_link_thread = False

    p = Policy(gpu_types=["A100", "H100"])
    rids = [Rid(f"r{i}") for i in range(n_replicas)]
    ctx = Ctx(9.0, n_replicas, n_replicas, rids, {GPU_TYPE_METRIC_PREFIX + "A100": {r: 1.0 for r in rids}})
    t0 = time.perf_counter()
    for _ in range(n_calls):
        p(ctx)
    per_call = (time.perf_counter() - t0) / n_calls * 1e6
    return {"calls": n_calls, "replicas": n_replicas, "us_per_call": per_call}


def cold_starts(base: str, n: int, wait_for_zero) -> dict:
    import httpx

    url = f"{base}/digits-cold/v1/predict"
    samples = []
    for i in range(n):
        wait_for_zero()
        t0 = time.monotonic()
        r = httpx.post(url, json={"instances": [[0.0] * 64]}, timeout=300)
        dt = time.monotonic() - t0
        samples.append({"seconds": dt, "status": r.status_code})
        logger.info("cold start %d: %.2f s (HTTP %d)", i, dt, r.status_code)
    secs = [s["seconds"] for s in samples if s["status"] == 200]
    return {
        "samples": samples,
        "median_s": statistics.median(secs) if secs else None,
        "max_s": max(secs, default=None),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(description="Serving benchmarks (one replica, hook latency, cold start).")
    p.add_argument("--out", default=str(HERE / "results" / "serving.json"))
    p.add_argument("--quick", action="store_true", help="fewer, shorter steps")
    p.add_argument("--cold-start-only", action="store_true", help="only the cold start (3.), on its own app")
    p.add_argument(
        "--cold-starts", type=int, default=None, help="cold starts to measure (default 3; 1 --quick)"
    )
    args = p.parse_args(argv)
    if args.cold_starts is not None and args.cold_starts < 1:
        p.error(f"--cold-starts: expected a count >= 1, got {args.cold_starts}")
    n_cold = args.cold_starts or (3 if not args.quick else 1)
    rates = [10, 25, 50, 75, 100, 150, 200, 300, 400] if not args.quick else [25, 100]
    step_s = 10.0 if not args.quick else 4.0

    import ray
    from ray import serve
    from tidal.cluster.actor import get_or_create_arbiter, kill_arbiter
    from tidal.cluster.cluster_spec import parse_cluster_spec
    from tidal.cluster.local import LocalCluster, LocalClusterError
    from tidal.serving.rollout import deploy_config, serve_details
    from tidal.training.digits_checkpoint import train_digits_checkpoint

    # Short: Ray's unix socket paths under the cluster's temp dirs must stay under 108 bytes.
    work = Path(tempfile.mkdtemp(prefix="tidal-sv-", dir="/tmp"))
    ckpt = train_digits_checkpoint(work / "digits", epochs=3)
    for attempt in range(3):
        # On a shared two-core machine a node can miss its start-up deadline: try again, a few times.
        cluster = LocalCluster(parse_cluster_spec(SPEC), root_dir=work / f"c{attempt}")
        try:
            cluster.start()
            break
        except LocalClusterError as e:
            logger.warning("cluster start failed (attempt %d): %s", attempt + 1, str(e).splitlines()[0])
            if attempt == 2:
                raise
    cluster.activate()  # this process uses the cluster's auth token for ray.init
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "cluster": SPEC}
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
        arbiter = "tidal-arbiter-bench"
        get_or_create_arbiter(config={"policy": "tidal", "headroom_fraction": 0.0}, name=arbiter)
        base = f"http://127.0.0.1:{cluster.serve_http_port}"
        fixed = {"min_r": 1, "max_r": 1, "arbiter": arbiter}
        cfg = {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": cluster.serve_http_port},
            "applications": [
                *(
                    []
                    if args.cold_start_only
                    else [
                        app("digits-one", ckpt, policy="tidal", **fixed),
                        app("digits-default", ckpt, policy="default", **fixed),
                        app("digits-tidal", ckpt, policy="tidal", **fixed),
                    ]
                ),
                app(
                    "digits-cold",
                    ckpt,
                    policy="tidal",
                    min_r=0,
                    max_r=1,
                    arbiter=arbiter,
                    downscale_delay_s=1,
                    downscale_to_zero_delay_s=1,
                ),
            ],
        }
        t0 = time.monotonic()
        deploy_config(cfg, http_port=cluster.serve_http_port)
        result["deploy_s"] = time.monotonic() - t0

        if not args.cold_start_only:
            result["one_replica"] = one_replica(base, rates, step_s)
            cap = result["one_replica"]["capacity_rps"] or rates[0]
            result["hook_latency"] = hook_latency(
                base, rps=max(10.0, 0.5 * cap), duration_s=step_s, rounds=4 if not args.quick else 2
            )
            result["policy_call_cost"] = policy_call_cost_us()

        def wait_for_zero() -> None:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                dep = serve_details().applications["digits-cold"].deployments["TidalModel"]
                if not dep.replicas:
                    return
                time.sleep(0.5)
            raise TimeoutError("digits-cold did not scale to zero in 180 s")

        result["cold_start"] = cold_starts(base, n_cold, wait_for_zero)
        serve.shutdown()
        kill_arbiter(name=arbiter)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    summary = {"cold_start_median_s": result["cold_start"]["median_s"], "out": str(out)}
    if not args.cold_start_only:
        summary |= {
            "one_replica_capacity_rps": result["one_replica"]["capacity_rps"],
            "one_replica_p99_ms_at_capacity": result["one_replica"]["p99_ms_at_capacity"],
            "hook_latency_tidal_minus_default_ms": result["hook_latency"]["tidal_minus_default_ms"],
            "policy_us_per_call": result["policy_call_cost"]["us_per_call"],
        }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
