"""The processes of a local cluster: finding exactly them among everyone's, and ending them.

Each node of a local cluster starts in a session of its own, and every process it starts carries the
cluster's marker, ``TIDAL_LOCAL_CLUSTER=<cluster id>``, in its environment. A cluster's processes are its
nodes' sessions, their descendants, and whatever carries its marker: ``ray stop`` would end every cluster's
on the machine, these end only one. Processes are read with psutil (Linux's /proc underneath).
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
    """pid -> (ppid, session id) for every live (non-zombie) process."""
    out = {}
    for p in psutil.process_iter(["ppid", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            out[p.pid] = (p.info["ppid"], os.getsid(p.pid))
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


def find_cluster_processes(cluster_id: str, sids: list[int]) -> set[int]:
    """Every live process of a cluster: its sessions, their descendants, and anything carrying its marker.

    The marker catches processes that left the session and lost their parent, e.g. a job driver whose
    supervisor died first.
    """
    table = _proc_table()
    mine = {pid for pid, (_, sid) in table.items() if sid in set(sids)}
    me = os.getpid()
    mine |= {pid for pid in table if pid != me and pid not in mine and _has_marker(pid, cluster_id)}
    mine = _with_descendants(mine, table)
    mine.discard(me)
    return mine


def session_processes(sid: int) -> set[int]:
    """The live processes of one node: its session, and their descendants (found by parent links)."""
    table = _proc_table()
    pids = _with_descendants({pid for pid, (_, s) in table.items() if s == sid}, table)
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
