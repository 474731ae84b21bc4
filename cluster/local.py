"""The local heterogeneous Ray cluster: a Ray head plus one real raylet per node of a cluster spec.

Every node is a real raylet on this machine with *logical* GPUs and the node label
``ray.io/accelerator-type=<gpu_type>``, exactly as Ray labels real GPUs. It is how ``tidal up``, the demo and
the integration tests get a heterogeneous cluster without GPUs. The head is started with ``ray start --head``;
each worker node by ``start_worker_node`` (what ``ray start --address`` does, from a process that imports
only what it needs: Ray's CLI costs about 2 s of CPU per node, a lot on two cores). Nodes start one at a
time: Ray gives a starting raylet's dashboard agent 30 s, and on a busy machine nodes starting side by side
push each other past it.

Several clusters may run on one machine at once (other test sessions, other users), so a cluster:

- takes every port Ray opens from a *lease* of a contiguous port range (``tidal.cluster.port_lease``);
- gives each raylet its own temp dir and its own ``--min-worker-port``/``--max-worker-port`` range;
- has its own auth token file (Ray 2.60 token auth), passed to its processes by ``RAY_AUTH_TOKEN_PATH``;
- starts each node in a process group of its own (in the caller's session, so that niceness counts across
  nodes: ``tidal.cluster.processes`` says why) and marks its processes with ``TIDAL_LOCAL_CLUSTER``, so that
  ``stop()`` and ``kill_node()`` end exactly its own processes (``ray stop`` would end everyone's).

With ``gcs_fault_tolerance`` in its spec, the head's GCS keeps its tables in an external Redis, and
``kill_gcs``/``restart_gcs`` kill it and start it again as Ray does (docs/architecture.md, "When the head fails").

The spec it starts is a ``LocalClusterSpec`` (``tidal.cluster.cluster_spec``). Ray is imported lazily
(``activate``, ``start_worker_node``); the node table is read over the dashboard's HTTP API.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml
from tidal.cluster.cluster_spec import LocalClusterSpec, NodeGroupSpec, load_cluster_spec
from tidal.cluster.model import GPU_TYPE_LABEL
from tidal.cluster.port_lease import PortLease
from tidal.cluster.processes import (
    CLUSTER_MARKER_ENV,
    find_cluster_processes,
    group_processes,
    kill_processes,
    pid_alive,
    process_name,
    terminate_processes,
)

logger = logging.getLogger(__name__)

STATE_FILE_NAME = "cluster.json"
SPARE_NODES = 2  # nodes add_node() can start beyond the spec's
_HEAD_NOT_READY = "No node info found for head node"
# Serve's controller runs on the head and inherits its raylet's environment. Tidal has it place replicas
# itself ("pack" scheduling: the first node, in the deployment's label_selector-then-fallback_strategy order,
# that its view of free resources says fits, then a soft node affinity to that node) instead of handing Ray's
# GCS a label selector with fallbacks: when the preferred type is full, the GCS's actor scheduler keeps leasing
# on the full node (~1,100 refused leases a second, gcs_server.out) before it tries the next type, and a
# replica on free GPUs waits 4-6 s for its place (bench/spike.py, Serve on free GPUs: time to capacity
# 6.5-8.0 s with the GCS placing, 2.5-3.0 s with Serve placing). Serve's node compaction,
# which comes with it (moving replicas off a node to free it), is turned off: where a replica runs is the
# arbiter's grant, not a bin-packing choice.
SERVE_CONTROLLER_ENV = {
    "RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY": "1",
    "RAY_SERVE_NODE_COMPACTION_DELAY_S": "1e12",
}


@dataclass
class NodeRecord:
    """A started node, as written to the state file."""

    name: str
    gpu_type: str | None
    num_gpus: int
    temp_dir: str
    pgid: int  # the process group of its `ray start` (or launcher): its raylet, agents and their children
    node_manager_port: int
    min_worker_port: int
    max_worker_port: int
    killed: bool = False


class LocalClusterError(RuntimeError):
    """The local cluster could not start (the message carries the tail of the failing node's log).

    ``retryable``: a start from scratch may succeed (a crash under load, not a configuration error).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class LocalCluster:
    """A Ray head plus one raylet per node of a ``LocalClusterSpec``, all on this machine.

    Usage::

        with LocalCluster(load_cluster_spec()) as c:
            ray.init(address=c.address)   # after os.environ.update(c.auth_env()), see ``auth_env``
            ...

    Attributes (after ``start``):
        address: the GCS address, ``"127.0.0.1:PORT"`` (for ``ray.init`` and ``RAY_ADDRESS``).
        dashboard_url: ``"http://127.0.0.1:PORT"`` (for ``ray job submit`` and ``serve deploy``).
        serve_http_port: a port reserved for Serve's HTTP proxy (``http_options.port``).
        metrics_port: a port reserved for the arbiter's Prometheus exporter.
        state_path: the JSON state file recording what was started.
    """

    def __init__(
        self,
        spec: LocalClusterSpec | None = None,
        *,
        root_dir: str | os.PathLike | None = None,
        startup_timeout_s: float = 180.0,
        autoscaling_config: Mapping[str, Any] | None = None,
        start_concurrency: int | None = None,
    ) -> None:
        self.spec = spec or load_cluster_spec()
        # Worker nodes starting at once; 1 unless TIDAL_LOCAL_START_CONCURRENCY says otherwise (see start()).
        self.start_concurrency = max(1, start_concurrency or int(os.environ.get("TIDAL_LOCAL_START_CONCURRENCY", "1")))
        self.autoscaling_config = dict(autoscaling_config) if autoscaling_config is not None else None
        self.startup_timeout_s = startup_timeout_s
        self._root_arg = Path(root_dir) if root_dir is not None else None
        self.root_dir: Path | None = None
        self.cluster_id = ""
        self.lease: PortLease | None = None
        self.extra_leases: list[PortLease] = []  # add_node() past SPARE_NODES: one lease per extra node
        self.gcs_port = 0
        self.dashboard_port = 0
        self.client_server_port = 0
        self.serve_http_port = 0
        self.metrics_port = 0
        self.spare_ports: list[int] = []
        self.token_path: Path | None = None
        self.head: NodeRecord | None = None
        self.nodes: dict[str, NodeRecord] = {}
        self.started_s = 0.0
        self.startup_s = 0.0
        self._owns_root = False
        self._commands: dict[str, tuple[list[str], dict[str, str]]] = {}
        self._relaunches: dict[str, int] = {}
        self._gcs_command: tuple[list[str], dict[str, str], str] | None = None  # kept by kill_gcs
        self._gcs_procs: list[subprocess.Popen] = []  # GCSs started by restart_gcs

    # ------------------------------------------------------------------------------- properties

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def state_path(self) -> Path:
        assert self.root_dir is not None, "the cluster has not started"
        return self.root_dir / STATE_FILE_NAME

    @property
    def session_dir(self) -> Path | None:
        """The head's Ray session dir (``<temp>/session_latest``), where the arbiter persists its state."""
        if self.head is None:
            return None
        p = Path(self.head.temp_dir) / "session_latest"
        return p.resolve() if p.exists() else None

    def auth_env(self) -> dict[str, str]:
        """The variables that turn Ray 2.60 token auth on and point at this cluster's token.

        A process that talks to the cluster (a driver, ``ray.init(address=...)``) needs them in its
        environment *before* Ray reads its config; ``activate()`` puts them into this process.
        """
        assert self.token_path is not None, "the cluster has not started"
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def env(self) -> dict[str, str]:
        """The environment for Ray's CLIs against this cluster (only the variables to add).

        ``ray status``/``serve run``/``ray.init()`` read ``RAY_ADDRESS``; ``ray job submit`` reads
        ``RAY_API_SERVER_ADDRESS``; ``serve deploy``/``serve status`` read ``RAY_DASHBOARD_ADDRESS``; all of
        them need ``RAY_AUTH_MODE=token`` and the token (``RAY_AUTH_TOKEN_PATH``). ``TIDAL_SERVE_HTTP_PORT``
        is the port reserved for Serve's HTTP proxy (``tidal serve deploy`` reads it).
        """
        return {
            "RAY_ADDRESS": self.address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_DASHBOARD_ADDRESS": self.dashboard_url,
            **self.auth_env(),
            "TIDAL_SERVE_HTTP_PORT": str(self.serve_http_port),
        }

    def activate(self) -> None:
        """Puts ``auth_env()`` into this process's environment and reloads Ray's auth settings.

        Call before ``ray.init(address=self.address)`` in this process. Ray caches its auth mode and token
        in C++; both are refreshed here (only safe while this process is not connected to another cluster).
        """
        os.environ.update(self.auth_env())
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    # ------------------------------------------------------------------------------- start / stop

    def start(self, attempts: int = 2) -> LocalCluster:
        """Starts the head and every node, and waits until all are registered and alive.

        It leaves this process's Ray settings alone: call ``activate()`` before ``ray.init(address=
        self.address)`` from this process. On a machine so loaded that the head's raylet dies during
        start-up (Ray gives its dashboard agent 30 s, hard-coded), everything is stopped and started again,
        up to ``attempts`` times; a worker node whose raylet dies is started again on its own.

        Raises:
            LocalClusterError: a node did not start (with its log), or not all registered in time.
        """
        t0 = time.monotonic()
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
                break
            except LocalClusterError as e:
                if not e.retryable or attempt == attempts:
                    raise
                logger.warning("local cluster start failed (%s); starting again (attempt %d)", e, attempt + 1)
                self._reset()
        self.startup_s = time.monotonic() - t0
        logger.info(
            "local cluster up in %.1f s: %s, dashboard %s, nodes %s",
            self.startup_s, self.address, self.dashboard_url, ", ".join(self.nodes),
        )
        return self

    def _reset(self) -> None:
        """Forgets a failed start (already stopped), so that _start_once can begin afresh."""
        if self._owns_root and self.root_dir is not None:
            shutil.rmtree(self.root_dir, ignore_errors=True)
        self.root_dir = None
        self.head = None
        self.nodes = {}
        self._commands = {}
        self._relaunches = {}
        self.lease = None
        self.extra_leases = []

    def _start_once(self) -> None:
        plans = self.spec.nodes()
        if self._root_arg is not None:
            self._root_arg.mkdir(parents=True, exist_ok=True)
            self.root_dir = self._root_arg
        else:
            # Short: Ray's unix socket paths must stay under 108 bytes.
            self.root_dir = Path(tempfile.mkdtemp(prefix="tidal-rt-", dir="/tmp"))
            self._owns_root = True
        self.cluster_id = f"{self.root_dir.name}-{secrets.token_hex(4)}"
        per_raylet = self._ports_per_raylet
        # Room for SPARE_NODES more raylets, for add_node() (fault tests add a node they can kill).
        self.lease = PortLease.acquire(
            10 + per_raylet * (1 + len(plans) + SPARE_NODES), owner=str(self.root_dir)
        )
        self.gcs_port, self.dashboard_port, self.client_server_port = (self.lease.take() for _ in range(3))
        self.serve_http_port, self.metrics_port = self.lease.take(), self.lease.take()
        autoscaler_metrics_port, dashboard_metrics_port = self.lease.take(), self.lease.take()
        self.spare_ports = [self.lease.take() for _ in range(3)]
        self.token_path = self.root_dir / "auth_token"
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        self.started_s = time.time()
        try:
            head_args = [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={self.client_server_port}",
                "--num-gpus=0",
                f"--num-cpus={self.spec.head.num_cpus}",
                "--system-config="
                + json.dumps(
                    {
                        "health_check_period_ms": self.spec.health_check_period_ms,
                        "health_check_failure_threshold": self.spec.health_check_failure_threshold,
                        # Patience on a loaded machine (several clusters on two cores): agents and
                        # worker processes that are slow to start are waited for, not failed.
                        "agent_register_timeout_ms": 180_000,
                        "worker_register_timeout_seconds": 180,
                        **self._gcs_ft_system_config(),
                    }
                ),
            ]
            head_env = {
                # Ray's fixed defaults (44217, 44227) would collide between clusters.
                "AUTOSCALER_METRIC_PORT": str(autoscaler_metrics_port),
                "DASHBOARD_METRIC_PORT": str(dashboard_metrics_port),
                **SERVE_CONTROLLER_ENV,
                **self._gcs_ft_env(),
            }
            if self.autoscaling_config is not None:
                head_args.append(f"--autoscaling-config={self._write_autoscaling_config()}")
                head_env["AUTOSCALER_UPDATE_INTERVAL_S"] = "1"
                # Autoscaler v2: v1 ignores label selectors and would start any node type with GPUs.
                head_env["RAY_enable_autoscaler_v2"] = "1"
                if _is_fake_provider(self.autoscaling_config.get("provider", {})):
                    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

                    head_env.update(
                        RAY_FAKE_CLUSTER="1",
                        RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,
                        RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID,
                    )
            self.head, head_proc = self._launch(
                "head", None, 0, self.spec.head.num_cpus, self.spec.head.object_store_memory_mb,
                self.spec.head.resources, self.spec.head.labels, head_args, head_env,
            )
            self.write_state()
            # Nodes start one after the other (start_concurrency at a time), the head first. Ray gives a
            # starting raylet's dashboard agent 30 s (hard-coded) and the raylet dies past that: on a busy
            # two-core machine, nodes starting side by side slow each other past it, and gain nothing.
            self._wait_exit({"head": head_proc})
            batch: dict[str, subprocess.Popen] = {}
            for plan in plans:
                rec, proc = self._launch(
                    plan.name, plan.gpu_type, plan.num_gpus, plan.num_cpus, plan.object_store_memory_mb,
                    plan.resources, plan.labels, [f"--address={self.address}", f"--num-gpus={plan.num_gpus}"], {},
                )
                self.nodes[plan.name] = rec
                self.write_state()
                batch[plan.name] = proc
                if len(batch) >= self.start_concurrency:
                    self._wait_exit(batch)
                    batch = {}
            self._wait_exit(batch)
            self._wait_registered(deadline=time.monotonic() + self.startup_timeout_s)
        except BaseException:
            logger.exception("local cluster %s failed to start; stopping what was started", self.root_dir)
            self.stop()
            raise
        self.lease.keep_alive_with(sorted(self.pids()))
        self.write_state()

    def _write_autoscaling_config(self) -> Path:
        """Writes the autoscaler config for the head, pointed at this cluster's GCS.

        Ray's fake multi-node provider assumes the GCS on port 6379 unless ``provider.gcs_address`` is set,
        and the head node type must declare the head's own resources.
        """
        assert self.root_dir is not None and self.autoscaling_config is not None
        cfg = json.loads(json.dumps(self.autoscaling_config))
        provider = cfg.setdefault("provider", {})
        provider["gcs_address"] = self.address
        if _is_fake_provider(provider):
            from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

            # What autoscaler v2 needs from the fake provider (as ray.cluster_utils.AutoscalingCluster sets).
            provider.setdefault("launch_multiple", True)
            provider.setdefault("head_node_id", FAKE_HEAD_NODE_ID)
        head_type = cfg.get("head_node_type")
        if head_type and head_type in cfg.get("available_node_types", {}):
            cfg["available_node_types"][head_type]["resources"] = {"CPU": self.spec.head.num_cpus, "GPU": 0}
        path = self.root_dir / "autoscaling.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    # ------------------------------------------------------------------------------- GCS fault tolerance

    def _gcs_ft_env(self) -> dict[str, str]:
        """The head's environment for GCS fault tolerance (none without it): Ray's external Redis settings."""
        ft = self.spec.gcs_fault_tolerance
        if ft is None:
            return {}
        return {"RAY_REDIS_ADDRESS": ft.redis_address, "RAY_external_storage_namespace": self.storage_namespace}

    def _gcs_ft_system_config(self) -> dict[str, Any]:
        ft = self.spec.gcs_fault_tolerance
        return {} if ft is None else {"gcs_rpc_server_reconnect_timeout_s": ft.reconnect_timeout_s}

    @property
    def storage_namespace(self) -> str:
        """The key prefix of this cluster's GCS tables in Redis: the spec's, or the cluster's own id."""
        ft = self.spec.gcs_fault_tolerance
        return (ft.external_storage_namespace if ft else None) or self.cluster_id

    def gcs_pid(self) -> int | None:
        """The pid of the head's ``gcs_server``, or None while none runs."""
        return next((pid for pid in sorted(self.pids()) if process_name(pid) == "gcs_server"), None)

    def kill_gcs(self) -> int:
        """Kills the head's ``gcs_server`` with SIGKILL, as a crash would, and returns its pid.

        Its command line, environment and working directory are kept for ``restart_gcs``. Raylets, workers,
        actors and the dashboard keep running; without GCS fault tolerance the raylets exit once
        ``gcs_rpc_server_reconnect_timeout_s`` has passed.
        """
        pid = self.gcs_pid()
        if pid is None:
            raise LocalClusterError("no gcs_server runs in this cluster")
        p = psutil.Process(pid)
        self._gcs_command = (p.cmdline(), p.environ(), p.cwd())
        kill_processes({pid})
        deadline = time.monotonic() + 10.0
        while pid_alive(pid):
            if time.monotonic() > deadline:
                raise LocalClusterError(f"gcs_server {pid} survived SIGKILL")
            time.sleep(0.05)
        logger.info("killed the head's gcs_server (pid %d)", pid)
        return pid

    def restart_gcs(self, timeout_s: float = 60.0) -> int:
        """Starts the GCS killed by ``kill_gcs`` again, as Ray's ``Node.start_gcs_server`` does, and waits for it.

        The same command (port, session, Redis address and namespace): it reloads the cluster's tables from
        Redis, and the raylets, which wait for it on the same address, reconnect. Returns when every node that
        was alive reads alive again in the dashboard's node table.

        Raises:
            LocalClusterError: no GCS fault tolerance in the spec (a GCS without Redis comes back empty and the
                nodes that knew the old one cannot rejoin), no GCS was killed, or the nodes are not back in time.
        """
        if self.spec.gcs_fault_tolerance is None:
            raise LocalClusterError(
                "restart_gcs needs gcs_fault_tolerance in the cluster spec: without Redis the GCS restarts empty"
            )
        if self._gcs_command is None:
            raise LocalClusterError("restart_gcs: no GCS was killed by kill_gcs")
        if self.gcs_pid() is not None:
            raise LocalClusterError(f"restart_gcs: a gcs_server already runs (pid {self.gcs_pid()})")
        args, env, cwd = self._gcs_command
        # Its own process group, like the head's; the cluster marker in its environment is how stop() finds it.
        proc = subprocess.Popen(
            args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            process_group=0,
        )
        self._gcs_command = None
        self._gcs_procs.append(proc)  # reaped in stop(): this process is its parent
        self._wait_registered(deadline=time.monotonic() + timeout_s)
        logger.info("restarted the head's gcs_server (pid %d)", proc.pid)
        return proc.pid

    def _clean_redis_storage(self) -> None:
        """Deletes this cluster's GCS tables from Redis (a stopped cluster is not restored by a later head)."""
        ft = self.spec.gcs_fault_tolerance
        if ft is None or not self.cluster_id:
            return
        try:
            from ray._private.gcs_utils import cleanup_redis_storage
            from ray._private.services import get_address

            host, port, ssl = get_address(ft.redis_address)
            cleanup_redis_storage(host, int(port), "", ssl, self.storage_namespace)
        except Exception as e:  # a Redis that is gone already holds nothing of ours
            logger.warning("could not delete namespace %s from Redis %s: %s", self.storage_namespace, ft.redis_address, e)

    def _leases(self) -> list[PortLease]:
        return [x for x in (self.lease, *self.extra_leases) if x is not None]

    @property
    def _ports_per_raylet(self) -> int:
        return 6 + self.spec.worker_ports_per_node

    def _launch(
        self,
        name: str,
        gpu_type: str | None,
        num_gpus: int,
        num_cpus: int,
        object_store_mb: int,
        resources: Mapping[str, float],
        labels: Mapping[str, str],
        extra_args: list[str],
        extra_env: Mapping[str, str],
    ) -> tuple[NodeRecord, subprocess.Popen]:
        assert self.lease is not None and self.root_dir is not None
        temp_dir = self.root_dir / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        lease = self.lease
        if lease.remaining < self._ports_per_raylet:
            # More nodes added than the main lease has room for: one more lease, for this node alone.
            lease = PortLease.acquire(self._ports_per_raylet, owner=f"{self.root_dir}/{name}")
            self.extra_leases.append(lease)
        nm, om, mx, al, ag, re_ = (lease.take() for _ in range(6))
        wmin = lease.take(self.spec.worker_ports_per_node)
        wmax = wmin + self.spec.worker_ports_per_node - 1
        node_args = {
            "node_name": name,
            "temp_dir": str(temp_dir),
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "object_store_memory": object_store_mb * 1024 * 1024,
            "node_manager_port": nm,
            "object_manager_port": om,
            "metrics_export_port": mx,
            "dashboard_agent_listen_port": al,
            "metrics_agent_port": ag,
            "runtime_env_agent_port": re_,
            "min_worker_port": wmin,
            "max_worker_port": wmax,
            "resources": dict(resources),
            "labels": dict(labels),
        }
        if name == "head" or not LEAN_WORKER_START:
            args = [_ray_cli(), "start", *extra_args, *_ray_start_flags(node_args)]
        else:
            # `ray start` imports Ray's whole CLI (about 2 s of CPU per node, a lot on two cores): a worker
            # node is started by the same Node() call, from a process that imports only what it needs.
            args = [sys.executable, "-m", "tidal.cluster.local", "start-worker-node", json.dumps({**node_args, "address": self.address})]
        env = _clean_env()
        env.update(self.auth_env())
        env[CLUSTER_MARKER_ENV] = self.cluster_id
        # Job entrypoints (`ray job submit -- python ...`) resolve `python` on the raylet's PATH: make it
        # this environment's interpreter, with Ray and Tidal installed.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env.setdefault("RAY_worker_niceness", str(self.spec.worker_niceness))
        env.update(self.spec.raylet_preload_env(head=gpu_type is None))  # (only the head has no GPU type)
        env.update(extra_env)
        self._commands[name] = (args, env)
        proc = self._spawn(name)
        rec = NodeRecord(
            name=name, gpu_type=gpu_type, num_gpus=num_gpus, temp_dir=str(temp_dir), pgid=proc.pid,
            node_manager_port=nm, min_worker_port=wmin, max_worker_port=wmax,
        )
        return rec, proc

    def _spawn(self, name: str) -> subprocess.Popen:
        assert self.root_dir is not None
        args, env = self._commands[name]
        log = open(self.root_dir / name / "ray-start.log", "a")  # noqa: SIM115 - closed right after Popen
        # A process group per node: its processes (raylet, agents, workers' parents) keep that group id, which is
        # how stop() and kill_node() find exactly them. Not a session: that would make the node an equal share of
        # the CPU whatever its processes' niceness (Linux's autogroup; tidal.cluster.processes). No terminal input:
        # a background group that reads it is stopped.
        # In the node's own folder, not the caller's: Ray puts the working directory of the driver that starts
        # Serve's controller (the dashboard, for `serve deploy`) at the front of sys.path in every replica,
        # ahead of the application's working_dir; a cluster started from a folder with `training/` or
        # `serving/` packages (a Tidal checkout, a user's repository) would shadow the applications' own.
        proc = subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, process_group=0,
            cwd=self.root_dir / name,
        )
        log.close()
        return proc

    def _wait_exit(self, procs: Mapping[str, subprocess.Popen], *, retries: int = 2) -> None:
        """Waits for each `ray start` to return (the head first); relaunches a node that came too early."""
        deadline = time.monotonic() + self.startup_timeout_s
        pending = dict(procs)
        attempts: dict[str, int] = {}
        while pending:
            name, proc = next(iter(pending.items()))
            try:
                rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as e:
                raise LocalClusterError(f"`ray start` for node {name} did not return in time:\n{self._log_tail(name)}") from e
            del pending[name]
            tail = self._log_tail(name)
            if rc != 0 and "timed out during startup" in tail:
                # `ray start` gives a raylet 30 s (hard-coded) to register; on a loaded machine it can take
                # longer. The raylet keeps running and registers later: _wait_registered decides.
                logger.warning("`ray start` for node %s gave up waiting for its raylet; still waiting", name)
                continue
            if rc != 0 and name != "head" and _HEAD_NOT_READY in tail and attempts.get(name, 0) < retries:
                # The worker started before the head had registered (they start together to save time), and
                # gave up before starting anything. The head has returned by now (it is waited for first).
                attempts[name] = attempts.get(name, 0) + 1
                logger.info("node %s started before the head was ready; starting it again", name)
                if name in self.nodes:
                    kill_processes(group_processes(self.nodes[name].pgid))
                proc = self._spawn(name)
                if name in self.nodes:
                    self.nodes[name].pgid = proc.pid
                pending[name] = proc
                continue
            if rc != 0:
                raise LocalClusterError(f"`ray start` for node {name} failed (exit {rc}):\n{tail}")

    def _log_tail(self, name: str, lines: int = 30) -> str:
        """The end of a node's start log, and the raylet's fatal error if it crashed."""
        assert self.root_dir is not None
        try:
            out = "\n".join((self.root_dir / name / "ray-start.log").read_text().splitlines()[-lines:])
        except OSError:
            out = "(no start log)"
        raylet_log = self.root_dir / name / "session_latest" / "logs" / "raylet.out"
        try:
            fatal = [ln for ln in raylet_log.read_text(errors="replace").splitlines() if "Check failed" in ln]
        except OSError:
            fatal = []
        if fatal:
            out += "\nraylet: " + fatal[-1][-400:]
        return out

    def _wait_registered(self, deadline: float) -> None:
        expected = {"head", *(n for n, r in self.nodes.items() if not r.killed)}
        last: dict[str, Any] = {}
        while True:
            try:
                last = self.node_table()
            except Exception as e:  # the GCS may still be coming up
                logger.debug("node table not readable yet: %s", e)
            alive = {n for n, info in last.items() if info["alive"]}
            if expected <= alive:
                return
            for name in sorted(expected - alive):
                if self._raylet_died(name):
                    self._recover_node(name)
            if time.monotonic() > deadline:
                raise LocalClusterError(
                    f"nodes not registered after {self.startup_timeout_s:.0f} s: missing {sorted(expected - alive)}"
                )
            time.sleep(0.1)

    def _raylet_died(self, name: str) -> bool:
        """True when a node's start has finished and no raylet runs in its process group (it crashed)."""
        rec = self.head if name == "head" else self.nodes.get(name)
        if rec is None or pid_alive(rec.pgid):
            return False  # its `ray start` (or launcher) still runs: not decided yet
        return not any(process_name(pid) == "raylet" for pid in group_processes(rec.pgid))

    def _recover_node(self, name: str, max_relaunches: int = 2) -> None:
        """A worker node whose raylet died during start-up is started again."""
        log_tail = self._log_tail(name)
        if name == "head":
            raise LocalClusterError(f"the head's raylet died during start-up:\n{log_tail}", retryable=True)
        n = self._relaunches.get(name, 0)
        if n >= max_relaunches:
            raise LocalClusterError(f"node {name}'s raylet died {n + 1} times during start-up:\n{log_tail}")
        self._relaunches[name] = n + 1
        logger.warning("node %s's raylet died during start-up; starting it again", name)
        kill_processes(group_processes(self.nodes[name].pgid))
        # Same command, same ports: what listened on them died with the raylet.
        proc = self._spawn(name)
        self.nodes[name].pgid = proc.pid
        self.write_state()
        self._wait_exit({name: proc})

    def node_table(self, timeout_s: float = 10.0) -> dict[str, dict[str, Any]]:
        """Node name -> {alive, node_id, gpu_type, num_gpus, labels}, from the dashboard's state API.

        Read over HTTP with this cluster's token, so it works from any process, whatever cluster that
        process is connected to (Ray caches one auth token per process).
        """
        assert self.token_path is not None, "the cluster has not started"
        req = urllib.request.Request(
            f"{self.dashboard_url}/api/v0/nodes?limit=10000&detail=true",
            headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"},
        )
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = json.loads(resp.read())
        rows = body["data"]["result"]["result"]
        out: dict[str, dict[str, Any]] = {}
        for row in sorted(rows, key=lambda r: r.get("start_time_ms") or 0):
            # A restarted node reuses its name: the newest entry wins.
            labels = dict(row.get("labels") or {})
            out[row["node_name"]] = {
                "alive": row["state"] == "ALIVE",
                "node_id": row["node_id"],
                "gpu_type": labels.get(GPU_TYPE_LABEL),
                "num_gpus": float((row.get("resources_total") or {}).get("GPU", 0.0)),
                "labels": labels,
            }
        return out

    def pids(self) -> set[int]:
        """Every live process of this cluster (see ``find_cluster_processes``)."""
        recs = ([self.head] if self.head else []) + list(self.nodes.values())
        return find_cluster_processes(self.cluster_id, [r.pgid for r in recs])

    def add_node(
        self,
        name: str,
        gpu_type: str,
        num_gpus: int,
        num_cpus: int | None = None,
        object_store_memory_mb: int = 100,
    ) -> NodeRecord:
        """Starts one more worker node (beyond the spec) and waits until it is registered.

        For fault tests on a shared cluster: add a node, kill it, and the spec's nodes stay untouched. At
        most ``SPARE_NODES`` nodes can be added (their ports are part of the cluster's lease).
        """
        if name in self.nodes or name == "head":
            raise ValueError(f"node name {name!r} is taken; taken: head, {', '.join(self.nodes)}")
        group = NodeGroupSpec(gpu_type=gpu_type, num_gpus=num_gpus, num_cpus=num_cpus)  # validates
        labels = {GPU_TYPE_LABEL: group.gpu_type}
        rec, proc = self._launch(
            name, group.gpu_type, group.num_gpus, group.cpus_per_node, object_store_memory_mb, {}, labels,
            [f"--address={self.address}", f"--num-gpus={group.num_gpus}"], {},
        )
        self.nodes[name] = rec
        self.write_state()
        self._wait_exit({name: proc})
        self._wait_registered(deadline=time.monotonic() + self.startup_timeout_s)
        pids = sorted(self.pids())
        for lease in self._leases():
            lease.keep_alive_with(pids)
        return rec

    def kill_node(self, name: str) -> set[int]:
        """Kills a worker node's raylet and everything on it with SIGKILL, as a machine failure would.

        The GCS declares the node dead once its health checks fail (about ``health_check_period_ms *
        health_check_failure_threshold``). Returns the pids killed.
        """
        rec = self.nodes.get(name)
        if rec is None:
            raise ValueError(f"no worker node named {name!r}; valid: {', '.join(self.nodes) or '(none)'}")
        pids = group_processes(rec.pgid)
        kill_processes(pids)
        rec.killed = True
        self.write_state()
        logger.info("killed node %s (%d processes)", name, len(pids))
        return pids

    def stop(self, timeout_s: float = 3.0) -> set[int]:
        """Stops exactly the processes of this cluster: worker nodes first, then the head.

        Returns the pids that were stopped. Raises ``LocalClusterError`` if any survived SIGKILL.
        """
        stopped: set[int] = set()
        if self.head is None and not self.nodes:
            return stopped
        recs = list(self.nodes.values())
        worker_pids = find_cluster_processes(self.cluster_id, [r.pgid for r in recs]) if recs else set()
        head_pgids = [self.head.pgid] if self.head else []
        # Worker-node processes first, so that the raylets do not spend their grace reconnecting to a dead GCS.
        survivors = terminate_processes(worker_pids, timeout_s)
        stopped |= worker_pids
        rest = find_cluster_processes(self.cluster_id, head_pgids + [r.pgid for r in recs])
        # The GCS and the autoscaler monitor may linger on SIGTERM; they hold nothing worth a longer wait.
        survivors |= terminate_processes(rest, min(timeout_s, 1.5))
        stopped |= rest
        for lease in self._leases():
            lease.release()
        for proc in self._gcs_procs:
            proc.poll()
        self._clean_redis_storage()
        if self.root_dir is not None and self.state_path.exists():
            state = _read_json(self.state_path) or {}
            state["stopped_s"] = time.time()
            self.state_path.write_text(json.dumps(state, indent=2))
        if survivors:
            raise LocalClusterError(f"processes survived SIGKILL: {sorted(survivors)}")
        logger.info("local cluster %s stopped (%d processes)", self.root_dir, len(stopped))
        return stopped

    def cleanup(self) -> None:
        """Removes the temp dir (logs included) if this object created it. Call after ``stop``."""
        if self._owns_root and self.root_dir is not None:
            shutil.rmtree(self.root_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------- state file

    def state(self) -> dict[str, Any]:
        return {
            "version": 1,
            "cluster_id": self.cluster_id,
            "root_dir": str(self.root_dir),
            "owns_root": self._owns_root,
            "address": self.address,
            "dashboard_url": self.dashboard_url,
            "gcs_port": self.gcs_port,
            "dashboard_port": self.dashboard_port,
            "client_server_port": self.client_server_port,
            "serve_http_port": self.serve_http_port,
            "metrics_port": self.metrics_port,
            "spare_ports": self.spare_ports,
            "port_lease": [self.lease.start, self.lease.end, self.lease._next] if self.lease else None,
            "extra_port_leases": [[x.start, x.end] for x in self.extra_leases],
            "token_path": str(self.token_path) if self.token_path else None,
            "started_s": self.started_s,
            "startup_s": self.startup_s,
            "spec": self.spec.model_dump(),
            "head": asdict(self.head) if self.head else None,
            "nodes": [asdict(r) for r in self.nodes.values()],
        }

    def write_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2))
        tmp.replace(self.state_path)

    @classmethod
    def attach(cls, state_path: str | os.PathLike) -> LocalCluster:
        """A handle on a cluster started by another process, from its state file (for ``tidal down``)."""
        p = Path(state_path)
        s = _read_json(p)
        if s is None or s.get("version") != 1:
            raise ValueError(f"{p} is not a Tidal local cluster state file (version 1)")
        c = cls(LocalClusterSpec.model_validate(s["spec"]), root_dir=s["root_dir"])
        c.root_dir = Path(s["root_dir"])
        c._owns_root = bool(s.get("owns_root"))
        c.cluster_id = s["cluster_id"]
        for k in ("gcs_port", "dashboard_port", "client_server_port", "serve_http_port", "metrics_port", "startup_s", "started_s"):
            setattr(c, k, s[k])
        c.spare_ports = list(s.get("spare_ports") or [])
        if s.get("port_lease"):
            start, end, *rest = s["port_lease"]
            c.lease = PortLease.from_range(start, end, rest[0] if rest else None)
        c.extra_leases = [PortLease.from_range(a, b) for a, b in s.get("extra_port_leases") or []]
        c.token_path = Path(s["token_path"]) if s.get("token_path") else None
        c.head = NodeRecord(**s["head"]) if s.get("head") else None
        c.nodes = {r["name"]: NodeRecord(**r) for r in s.get("nodes", [])}
        return c


# Worker nodes start through start_worker_node() (False: through `ray start`, like the head).
LEAN_WORKER_START = os.environ.get("TIDAL_LOCAL_LEAN_START", "1") != "0"


def _ray_start_flags(a: Mapping[str, Any]) -> list[str]:
    """The `ray start` flags for a node's arguments (see ``LocalCluster._launch``)."""
    flags = [
        "--node-ip-address=127.0.0.1",
        f"--node-name={a['node_name']}",
        f"--temp-dir={a['temp_dir']}",
        f"--num-cpus={a['num_cpus']}",
        f"--object-store-memory={a['object_store_memory']}",
        f"--node-manager-port={a['node_manager_port']}",
        f"--object-manager-port={a['object_manager_port']}",
        f"--metrics-export-port={a['metrics_export_port']}",
        f"--dashboard-agent-listen-port={a['dashboard_agent_listen_port']}",
        f"--dashboard-agent-grpc-port={a['metrics_agent_port']}",
        f"--runtime-env-agent-port={a['runtime_env_agent_port']}",
        f"--min-worker-port={a['min_worker_port']}",
        f"--max-worker-port={a['max_worker_port']}",
        "--disable-usage-stats",
    ]
    if a["resources"]:
        flags.append(f"--resources={json.dumps(a['resources'])}")
    if a["labels"]:
        flags.append("--labels=" + ",".join(f"{k}={v}" for k, v in a["labels"].items()))
    return flags


def start_worker_node(a: Mapping[str, Any]) -> None:
    """Starts a worker node as ``ray start --address=...`` does (Ray 2.60 ``scripts.start``), and returns.

    Runs in its own process (``python -m tidal.cluster.local start-worker-node '<json>'``); the raylet and its agents
    outlive it, as they outlive ``ray start``.
    """
    import ray._private.node
    import ray._private.utils
    from ray._private import services
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
    from ray._private.parameter import RayParams
    from ray._private.resource_isolation_config import ResourceIsolationConfig

    params = RayParams(
        node_ip_address=services.resolve_ip_for_localhost("127.0.0.1"),
        node_name=a["node_name"],
        temp_dir=a["temp_dir"],
        num_cpus=a["num_cpus"],
        num_gpus=a["num_gpus"],
        resources=a["resources"] or None,
        labels=a["labels"] or None,
        object_store_memory=a["object_store_memory"],
        node_manager_port=a["node_manager_port"],
        object_manager_port=a["object_manager_port"],
        metrics_export_port=a["metrics_export_port"],
        dashboard_agent_listen_port=a["dashboard_agent_listen_port"],
        metrics_agent_port=a["metrics_agent_port"],
        runtime_env_agent_port=a["runtime_env_agent_port"],
        min_worker_port=a["min_worker_port"],
        max_worker_port=a["max_worker_port"],
        resource_isolation_config=ResourceIsolationConfig(enable_resource_isolation=False),
    )
    params.gcs_address = services.canonicalize_bootstrap_address(a["address"], temp_dir=a["temp_dir"])
    ensure_token_if_auth_enabled(None, create_token_if_missing=False)
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False, connect_only=False)
    # As `ray start` does: the node's temp dir names its cluster. A job's supervisor on this node finds the GCS
    # address for the driver there ("auto"); without it Ray falls back to grepping `ps` for any GCS on the
    # machine, which finds another cluster's when two run side by side (and the driver fails on its token).
    ray._private.utils.write_ray_address(params.gcs_address, node.get_temp_dir_path())
    logger.info("worker node %s started", a["node_name"])


FAKE_PROVIDER_MODULE = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


def _is_fake_provider(provider: Mapping[str, Any]) -> bool:
    """Ray's fake multi-node provider, named by type or loaded as an external provider module."""
    return provider.get("type") == "fake_multinode" or (
        provider.get("type") == "external" and provider.get("module") == FAKE_PROVIDER_MODULE
    )


def _ray_cli() -> str:
    """The ``ray`` script of this interpreter's environment (not whatever ``ray`` is first on PATH)."""
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def _read_json(path: Path) -> dict | None:
    """A state file's contents, or None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _clean_env() -> dict[str, str]:
    """This process's environment without variables that would point a node at another cluster."""
    drop = {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_AUTH_TOKEN", CLUSTER_MARKER_ENV}
    return {k: v for k, v in os.environ.items() if k not in drop}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "start-worker-node":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        start_worker_node(json.loads(sys.argv[2]))
    else:
        sys.exit(f"usage: python -m tidal.cluster.local start-worker-node '<json>' (got {sys.argv[1:]})")
