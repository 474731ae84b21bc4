"""The processes of a local cluster: finding exactly them among everyone's, and ending them.

Each node of a local cluster starts in a process group of its own, and every process it starts carries the
cluster's marker, ``TIDAL_LOCAL_CLUSTER=<cluster id>``, in its environment. A cluster's processes are its
nodes' process groups, their descendants, and whatever carries its marker: ``ray stop`` would end every
cluster's on the machine, these end only one. Processes are read with psutil (Linux's /proc underneath).

Process groups, not sessions: Linux's scheduler (``sched_autogroup``, on by default on desktop and many server
kernels) shares the CPU equally between *sessions* first, and a niceness counts only inside its own session.
A node per session made every node's processes one equal share: the niced trainers on the H100 node weighed as
much as the Serve proxy and the replicas on the others, and a spike on two cores missed its SLO (0.12-0.22 in
`make demo`) while the trainers trained. In the caller's session, the cluster's processes compete by niceness
as configured (``LocalClusterSpec.train_worker_niceness``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil

CLUSTER_MARKER_ENV = "TIDAL_LOCAL_CLUSTER"


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie is dead for our purposes (its parent has not reaped it yet)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def process_name(pid: int) -> str | None:
    """The name of a live process (``raylet``, ``gcs_server``, ...), or None once it is gone."""
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return None


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, process group id) for every live (non-zombie) process."""
    out = {}
    for p in psutil.process_iter(["ppid", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            out[p.pid] = (p.info["ppid"], os.getpgid(p.pid))
        except OSError:
            continue
    return out


def _has_marker(pid: int, cluster_id: str) -> bool:
    try:
        return psutil.Process(pid).environ().get(CLUSTER_MARKER_ENV) == cluster_id
    except psutil.Error:
        return False


def _with_descendants(pids: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    """``pids`` and every process below them, by the parent links of ``table``."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out = set(pids)
    stack = list(pids)
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def find_cluster_processes(cluster_id: str, pgids: list[int]) -> set[int]:
    """Every live process of a cluster: its process groups, their descendants, and anything carrying its marker.

    The marker catches processes that left their group and lost their parent, e.g. a job driver (Ray starts
    each in a session of its own) whose supervisor died first.
    """
    table = _proc_table()
    groups = set(pgids)
    mine = {pid for pid, (_, pgid) in table.items() if pgid in groups}
    me = os.getpid()
    mine |= {pid for pid in table if pid != me and pid not in mine and _has_marker(pid, cluster_id)}
    mine = _with_descendants(mine, table)
    mine.discard(me)
    return mine


def group_processes(pgid: int) -> set[int]:
    """The live processes of one node: its process group, and their descendants (found by parent links: Ray
    may give a worker a process group of its own)."""
    table = _proc_table()
    pids = _with_descendants({pid for pid, (_, g) in table.items() if g == pgid}, table)
    pids.discard(os.getpid())
    return pids


def terminate_processes(pids: set[int], timeout_s: float) -> set[int]:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL; returns the pids that are still alive (none, normally)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if pid_alive(p)}
        if alive:
            time.sleep(0.1)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if pid_alive(p)}
        if alive:
            time.sleep(0.05)
    return alive


def kill_processes(pids: set[int]) -> None:
    """SIGKILL to each of ``pids``, as a machine failure would end them; gone ones are skipped."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
