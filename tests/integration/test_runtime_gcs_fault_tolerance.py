"""A head whose GCS fails: with GCS fault tolerance on a real Redis, the cluster and its work outlive it.

A local cluster of its own (head + one A100 node that also takes job drivers) runs with its GCS tables in a
``redis-server`` started here, on a free port in a temp dir. Under it run: the arbiter actor (on the head), a
real Ray job (``ray job submit --entrypoint-resources``: its driver on the worker node) registered as a
training job that steps and heartbeats, and a Serve application whose replica is a registered service that
heartbeats and answers HTTP. The head's ``gcs_server`` is killed with SIGKILL and started again as Ray
starts it under fault tolerance (same command, same port, same Redis namespace: ``LocalCluster.kill_gcs``
and ``restart_gcs``). The test shows that while it is down the job keeps stepping and Serve keeps answering,
and that once it is back the same processes (arbiter, job driver, replica) run on with the grants they had,
the job is still RUNNING, and the cluster takes new work.

Drivers run in their own processes: this one may be connected to the session cluster (one per process).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tidal.cluster.cluster_spec import parse_cluster_spec
from tidal.cluster.local import LocalCluster
from tidal.cluster.processes import group_processes, pid_alive, terminate_processes
from tidal_testing import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("redis-server") is None,
        reason="redis-server is not on PATH (Debian: apt-get install redis-server): GCS fault tolerance needs a real Redis",
    ),
]

NAME, NAMESPACE = "tidal-arbiter-gcsft", "tidal-gcsft-test"
JOB, SERVICE, APP = "ft-job", "ft-svc", "ft-echo"
RAY = str(Path(sys.executable).parent / "ray")

# What a workload does in this test: one step every 0.2 s, a heartbeat to the arbiter with each step
# reporting it holds its grant, and its progress in a JSON file this process reads without Ray.
WORKLOAD = textwrap.dedent(
    """
    import json, os, threading, time
    from tidal.cluster.client import ArbiterClient

    def run_workload(spec, progress_path, arbiter_name, arbiter_namespace):
        client = ArbiterClient(arbiter_name, arbiter_namespace)
        client.register(spec)
        state = {"pid": os.getpid(), "steps": 0, "grant": {}, "registered": True, "last_ok_s": 0.0,
                 "errors": 0, "last_error": None}
        while True:
            state["steps"] += 1
            try:
                view = client.heartbeat(spec.name, held=state["grant"], timeout_s=2.0)
                state.update(grant=view.grant.as_dict(), registered=view.registered, last_ok_s=time.time())
            except Exception as e:  # the GCS may be down: the work goes on, the next heartbeat tries again
                state.update(errors=state["errors"] + 1, last_error=repr(e)[:300])
            tmp = progress_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(state, f)
            os.replace(tmp, progress_path)
            time.sleep(0.2)
    """
)

JOB_DRIVER = WORKLOAD + textwrap.dedent(
    """
    import sys, ray
    from tidal.cluster.model import TrainingJobSpec
    ray.init(log_to_driver=False, logging_level="ERROR")
    spec = TrainingJobSpec(sys.argv[1], 1.0, 1, 2, ("A100",), yield_grace_s=600)
    run_workload(spec, sys.argv[2], sys.argv[3], sys.argv[4])
    """
)

SETUP = WORKLOAD + textwrap.dedent(
    """
    import sys, ray
    from ray import serve
    from tidal.cluster.actor import get_or_create_arbiter
    from tidal.cluster.model import ServiceSpec

    name, namespace, metrics_port, http_port, progress_path, app, service = sys.argv[1:8]
    ray.init(log_to_driver=False, logging_level="ERROR")
    config = {
        "policy": "tidal",
        "guards": {"service_downscale_delay_s": 0, "job_resize_min_interval_s": 0},
        # A TTL well above the outage: heartbeats that fail while the GCS is down must not expire anyone.
        "arbiter": {"tick_interval_s": 0.5, "registration_ttl_s": 60},
    }
    arbiter = get_or_create_arbiter(config=config, name=name, namespace=namespace, metrics_port=int(metrics_port))

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Echo:
        def __init__(self):
            spec = ServiceSpec(service, 1.0, 1, 2, ("A100",))
            args = (spec, progress_path, name, namespace)
            threading.Thread(target=run_workload, args=args, daemon=True).start()

        def __call__(self, request):
            return {"pid": os.getpid()}

    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": int(http_port)})
    serve.run(Echo.bind(), name=app, route_prefix="/" + app)
    print("RESULT " + json.dumps({"arbiter": ray.get(arbiter.ping.remote(), timeout=30)}))
    """
)

CHECK = textwrap.dedent(
    """
    import json, sys, ray
    name, namespace = sys.argv[1:3]
    ray.init(log_to_driver=False, logging_level="ERROR")
    arbiter = ray.get_actor(name, namespace=namespace)

    @ray.remote(num_cpus=0, label_selector={"ray.io/accelerator-type": "A100"})
    def new_task():
        return ray.get_runtime_context().get_node_id()

    print("RESULT " + json.dumps({
        "arbiter": ray.get(arbiter.ping.remote(), timeout=30),
        "grants": ray.get(arbiter.dump_state.remote(), timeout=30)["grants"],
        "new_task_node": ray.get(new_task.remote(), timeout=120),
        "nodes": sorted((n["NodeManagerAddress"], n["Alive"]) for n in ray.nodes()),
    }))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A ``redis-server`` of this module's own: a free port, a temp dir, no snapshots; stopped at the end."""
    folder = tmp_path_factory.mktemp("redis")
    port = _free_port()
    with open(folder / "redis.log", "w") as log:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "",
             "--appendonly", "no"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: _redis_ping(port), 20, message=f"redis-server on port {port}")
        yield port
    finally:
        assert not terminate_processes({proc.pid}, timeout_s=5.0), "redis-server survived SIGKILL"
        proc.wait(timeout=5)


@pytest.fixture(scope="module")
def ft_cluster(redis_port: int) -> Iterator[LocalCluster]:
    spec = parse_cluster_spec(
        {
            "head": {"num_cpus": 1, "object_store_memory_mb": 100},
            # job_driver: where `ray job submit --entrypoint-resources '{"job_driver": 1}'` puts a job's driver.
            "node_groups": [
                {"gpu_type": "A100", "num_gpus": 4, "num_cpus": 2, "object_store_memory_mb": 100,
                 "resources": {"job_driver": 2}},
            ],  # fmt: skip
            "gcs_fault_tolerance": {"redis_address": f"127.0.0.1:{redis_port}", "reconnect_timeout_s": 60},
        }
    )
    cluster = LocalCluster(spec)
    pids: set[int] = set()
    try:
        cluster.start()  # a failed start stops what it started; its folder goes below
        yield cluster
    finally:
        pids = cluster.pids()
        cluster.stop()
        cluster.cleanup()
    assert not [p for p in pids if pid_alive(p)], "processes of the cluster outlived its stop()"


def _env(cluster: LocalCluster) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(cluster.env())
    return env


def _driver(cluster: LocalCluster, code: str, *args: str, cwd: Path) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-c", code, *args], env=_env(cluster), cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])


def _progress(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _holding(path: Path) -> dict[str, Any] | None:
    """The workload's progress once the arbiter has answered it with a non-empty grant (held from then on)."""
    p = _progress(path)
    return p if p and p["grant"] and p["registered"] and p["last_ok_s"] > 0 else None


def _http_ok(cluster: LocalCluster) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.serve_http_port}/{APP}", timeout=5) as resp:
        return json.loads(resp.read())


def test_killed_gcs_comes_back_from_redis_and_the_arbiter_grants_job_and_service_run_on(ft_cluster, tmp_path):
    cluster = ft_cluster
    cwd = tmp_path / "driver-cwd"
    cwd.mkdir()
    job_progress, svc_progress = tmp_path / "job.json", tmp_path / "svc.json"
    (tmp_path / "job_driver.py").write_text(JOB_DRIVER)

    # 1. Work: the arbiter, a Serve application that is a registered service, a Ray job off the head.
    setup = _driver(
        cluster, SETUP, NAME, NAMESPACE, str(cluster.spare_ports[0]), str(cluster.serve_http_port),
        str(svc_progress), APP, SERVICE, cwd=cwd,
    )  # fmt: skip
    submit = subprocess.run(
        [RAY, "job", "submit", "--no-wait", "--submission-id", "ft-job-1",
         "--entrypoint-resources", json.dumps({"job_driver": 1}), "--",
         sys.executable, str(tmp_path / "job_driver.py"), JOB, str(job_progress), NAME, NAMESPACE],
        env=_env(cluster), cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
    try:
        wait_for(lambda: _holding(job_progress), 300, message="the job to hold its grant")
    except TimeoutError:
        # The driver's log, read from its node's folder (`ray job logs` looks on the head: one IP for all nodes).
        log = cluster.root_dir / "a100-0" / "session_latest" / "logs" / "job-driver-ft-job-1.log"
        raise AssertionError(f"{_progress(job_progress)}\n{log.read_text()[-3000:] if log.exists() else '(no log)'}") from None
    wait_for(lambda: _holding(svc_progress), 300, message="the service to hold its grant")

    # 2. The head's GCS dies (what everyone holds just before: the grants that must come through).
    node_ids = {n: info["node_id"] for n, info in cluster.node_table().items()}
    job0, svc0 = _progress(job_progress), _progress(svc_progress)
    assert job0 and svc0
    replica_pid = _http_ok(cluster)["pid"]
    assert replica_pid == svc0["pid"]
    assert job0["grant"].get("A100", 0) + svc0["grant"].get("A100", 0) <= 4
    # The job's driver runs off the head: its process is on the node with job_driver (the local nodes share one
    # IP, so the driver's own node id names whichever raylet it attached to, not where it runs).
    assert job0["pid"] in group_processes(cluster.nodes["a100-0"].pgid)
    gcs_pid = cluster.kill_gcs()
    assert cluster.gcs_pid() is None and not pid_alive(gcs_pid)
    # While it is down, running work goes on: the job steps, Serve answers from the replica it knows.
    down_steps = job0["steps"]
    wait_for(
        lambda: (p := _progress(job_progress)) and p["steps"] >= down_steps + 10, 30,
        message="the job to keep stepping while the GCS is down",
    )
    assert _http_ok(cluster)["pid"] == replica_pid
    assert cluster.gcs_pid() is None

    # 3. The GCS comes back from Redis; the nodes are the same nodes.
    restarted_s = time.time()
    new_gcs = cluster.restart_gcs(timeout_s=90)
    assert new_gcs != gcs_pid and cluster.gcs_pid() == new_gcs
    table = cluster.node_table()
    assert {n: info["node_id"] for n, info in table.items() if info["alive"]} == node_ids

    # 4. The same processes hold the same grants and report to the arbiter again.
    for path, first in ((job_progress, job0), (svc_progress, svc0)):
        p = wait_for(
            lambda path=path: (q := _progress(path)) and q["last_ok_s"] > restarted_s and q, 60,
            message=f"{path.name}: a heartbeat answered after the restart",
        )
        assert p["pid"] == first["pid"] and p["registered"]
        assert p["grant"] == first["grant"], (path.name, first["grant"], p["grant"])
    assert _http_ok(cluster)["pid"] == replica_pid

    # 5. A new driver connects, finds the same arbiter with the same grants, and runs a new task on the node.
    check = _driver(cluster, CHECK, NAME, NAMESPACE, cwd=cwd)
    assert check["arbiter"]["pid"] == setup["arbiter"]["pid"]
    assert check["grants"][JOB] == job0["grant"] and check["grants"][SERVICE] == svc0["grant"]
    assert check["new_task_node"] == table["a100-0"]["node_id"]
    status = subprocess.run(
        [RAY, "job", "status", "ft-job-1"], env=_env(cluster), cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert "RUNNING" in status.stdout, status.stdout[-2000:] + status.stderr[-2000:]
