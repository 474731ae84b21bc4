"""The warm pool on the session's real cluster: the arbiter keeps idle, preloaded workers on the GPU nodes, and
a new GPU actor starts in one of them (a process that was up, with ``torch`` imported, before it was created).

Uses its own arbiter (distinct name and namespace), killed at the end: its idle workers stay behind until Ray's
idle-worker reaper takes them, which harms no other test.
"""

from __future__ import annotations

import os
import sys
import time

import pytest
from tidal.cluster.actor import get_or_create_arbiter, kill_arbiter
from tidal_testing import wait_for

pytestmark = pytest.mark.integration

NAME, NAMESPACE = "tidal-arbiter-pool", "tidal-pool-test"


def _process_start_s(pid: int) -> float:
    """When ``pid`` started (epoch seconds), from /proc (Linux; this test's cluster runs on this machine)."""
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process start times from /proc")
def test_a_new_gpu_actor_starts_in_a_worker_the_pool_started_with_torch_already_imported(ray_driver, local_cluster):
    ray = ray_driver
    assert "torch" in local_cluster.spec.preload_python_modules  # cluster/configs/local.yaml
    handle = get_or_create_arbiter(
        config={
            "policy": "tidal",
            "warm_pool": {"spare_workers_per_node": 1, "interval_s": 0.5, "node_cooldown_s": 30, "max_starts_per_round": 4},
        },
        name=NAME,
        namespace=NAMESPACE,
    )
    try:
        gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0}
        rtx = next(
            n["NodeID"] for n in ray.nodes()
            if n["Alive"] and n.get("Labels", {}).get("ray.io/accelerator-type") == "RTX4090"
        )  # fmt: skip

        def rtx_has_an_idle_worker():
            last = ray.get(handle.stats.remote(), timeout=10)["warm_pool"]["last"]
            return last if last.get("idle", {}).get(rtx, 0) >= 1 else None

        last = wait_for(rtx_has_an_idle_worker, timeout_s=180, interval_s=1.0, message="an idle worker on the RTX4090 node")
        assert set(last["idle"]) <= gpu_nodes  # only GPU nodes are counted (the head is not)
        assert ray.get(handle.stats.remote(), timeout=10)["warm_pool"]["spare_workers_per_node"] == 1

        @ray.remote(num_gpus=1, num_cpus=0, label_selector={"ray.io/accelerator-type": "RTX4090"})
        class Probe:
            def __init__(self) -> None:
                # Nothing in this test imported them in the actor's process.
                self.preloaded = ("torch" in sys.modules, "tidal.serving.app" in sys.modules)

            def facts(self) -> tuple[tuple[bool, bool], int]:
                return self.preloaded, os.getpid()

        created = time.time()
        probe = Probe.remote()
        preloaded, pid = ray.get(probe.facts.remote(), timeout=120)
        ray.kill(probe)
        assert preloaded == (True, True), "a pool worker has torch and the model server (not bound to a job)"
        assert _process_start_s(pid) < created - 0.5, "the actor's process started after the actor was created"

        # An actor with a runtime env of its own gets a process the raylet starts for this job (as Ray Train's
        # workers do): torch, not the model server (cluster/preload.py).
        bound = Probe.options(runtime_env={"env_vars": {"TIDAL_TEST_PROBE": "1"}}).remote()
        preloaded, _ = ray.get(bound.facts.remote(), timeout=120)
        ray.kill(bound)
        assert preloaded == (True, False)
    finally:
        kill_arbiter(NAME, NAMESPACE)
