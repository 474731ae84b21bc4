"""The local heterogeneous cluster on real Ray: nodes, labels, auth for Ray's own CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tidal.cluster.cluster_spec import load_cluster_spec

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).parent / "ray")


def test_inventory_matches_the_spec_by_gpu_type(local_cluster):
    table = local_cluster.node_table()
    alive = {name: info for name, info in table.items() if info["alive"]}
    by_type: dict[str, float] = {}
    for info in alive.values():
        if info["gpu_type"]:
            by_type[info["gpu_type"]] = by_type.get(info["gpu_type"], 0) + info["num_gpus"]
    assert by_type == {t: float(n) for t, n in load_cluster_spec().gpus_by_type().items()}
    assert alive["head"]["num_gpus"] == 0 and alive["head"]["gpu_type"] is None


def test_a_task_with_a_label_selector_runs_on_the_node_of_that_gpu_type(ray_driver, local_cluster):
    ray = ray_driver

    @ray.remote(num_gpus=1, label_selector={"ray.io/accelerator-type": "A100"})
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    node_id = ray.get(where.remote(), timeout=60)
    assert node_id == local_cluster.node_table()["a100-0"]["node_id"]


def test_ray_job_submit_works_with_token_auth_from_the_printed_env(local_cluster):
    env = {**os.environ, **local_cluster.env()}
    code = "import ray; ray.init(); print('GPUS', int(ray.cluster_resources()['GPU']))"
    r = subprocess.run(
        [RAY, "job", "submit", "--", "python", "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "GPUS 8" in r.stdout


def test_every_node_names_its_own_cluster_for_a_job_driver_started_there(local_cluster):
    # A job's supervisor gives its driver the address it reads from its node's temp dir; without the file there
    # Ray greps `ps` for any GCS on the machine, and finds another cluster's when two run side by side.
    named = {
        name: (Path(node.temp_dir) / "ray_current_cluster").read_text().strip()
        for name, node in {"head": local_cluster.head, **local_cluster.nodes}.items()
    }
    assert all(address.endswith(f":{local_cluster.gcs_port}") for address in named.values()), named
    assert len(set(named.values())) == 1, named


def test_ray_cli_with_a_wrong_token_is_refused(local_cluster):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_ADDRESS=local_cluster.address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    r = subprocess.run([RAY, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Authentication token is missing or incorrect" in r.stdout + r.stderr


def test_every_cluster_process_listens_only_on_leased_ports(local_cluster):
    import psutil

    lease = local_cluster.lease
    ports = set()
    for pid in local_cluster.pids():
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        ports |= {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}
    assert ports, "no listening ports found"
    outside = sorted(p for p in ports if not lease.start <= p < lease.end)
    assert not outside, f"ports outside the lease {lease.start}-{lease.end}: {outside}"
