"""cluster.yaml's node types under Ray's own autoscaler, on this machine (fake multi-node provider)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from tidal.cluster.cluster_spec import HeadSpec, LocalClusterSpec
from tidal.cluster.local import LocalCluster

pytestmark = pytest.mark.integration

FAKE_CONFIG = Path(__file__).resolve().parents[2] / "cluster" / "configs" / "fake-multinode.yaml"

DRIVER = textwrap.dedent(
    """
    import json, ray
    ray.init(log_to_driver=False, logging_level="ERROR")

    @ray.remote(num_gpus=1, label_selector={"ray.io/accelerator-type": "A100"})
    def where():
        return ray.get_runtime_context().get_node_id()

    node_id = ray.get(where.remote(), timeout=240)
    nodes = [
        {"id": n["NodeID"], "alive": n["Alive"], "labels": n.get("Labels") or {}, "gpus": n["Resources"].get("GPU", 0)}
        for n in ray.nodes()
    ]
    print("RESULT " + json.dumps({"node_id": node_id, "nodes": nodes}))
    """
)


@pytest.fixture(scope="module")
def autoscaling_cluster():
    cfg = yaml.safe_load(FAKE_CONFIG.read_text())
    cluster = LocalCluster(
        LocalClusterSpec(head=HeadSpec(num_cpus=1, object_store_memory_mb=100)), autoscaling_config=cfg
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        cluster.cleanup()


def test_pending_a100_task_makes_the_autoscaler_start_an_a100_node_and_no_other(autoscaling_cluster):
    # The driver runs in its own process: this one may be connected to the session cluster (one per process).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(autoscaling_cluster.env())
    r = subprocess.run([sys.executable, "-c", DRIVER], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    workers = [n for n in result["nodes"] if n["alive"] and n["labels"].get("ray.io/accelerator-type")]
    assert [n["labels"]["ray.io/accelerator-type"] for n in workers] == ["A100"]
    assert workers[0]["id"] == result["node_id"] and workers[0]["gpus"] == 8
    # The node the autoscaler started is one of this cluster's processes, and stops with it.
    assert len(autoscaling_cluster.pids()) > 0
