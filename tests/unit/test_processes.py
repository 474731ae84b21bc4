"""A local cluster's processes: found by process group, parent links and marker; ended with SIGTERM, then SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from tidal.cluster.processes import (
    CLUSTER_MARKER_ENV,
    find_cluster_processes,
    group_processes,
    pid_alive,
    terminate_processes,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and markers as on Linux")

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def _spawn(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(args, env={**os.environ, **env}, process_group=0)  # as LocalCluster starts a node


def _wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def spawned():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def test_a_process_carrying_the_marker_is_found_outside_every_process_group_given(spawned):
    marked = _spawn(SLEEP, **{CLUSTER_MARKER_ENV: "c-1"})
    other = _spawn(SLEEP, **{CLUSTER_MARKER_ENV: "c-2"})
    spawned += [marked, other]
    _wait_for(lambda: marked.pid in find_cluster_processes("c-1", []))
    found = find_cluster_processes("c-1", [])
    assert marked.pid in found and other.pid not in found and os.getpid() not in found


def test_a_child_that_left_its_nodes_process_group_is_still_found_by_its_parent_link(spawned):
    code = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen({SLEEP!r}, start_new_session=True)\n"  # as Ray starts a job's driver
        "time.sleep(60)\n"
    )
    node = _spawn([sys.executable, "-c", code])
    spawned.append(node)
    _wait_for(lambda: len(group_processes(node.pid)) == 2)
    pids = group_processes(node.pid)
    child = (pids - {node.pid}).pop()
    try:
        assert os.getpgid(child) != node.pid
        assert find_cluster_processes("no-marker", [node.pid]) == pids
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_zombie_is_not_alive():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert pid_alive(os.getpid())
        # Not yet reaped by its parent (this process): a zombie.
        _wait_for(lambda: not pid_alive(proc.pid))
        assert os.path.exists(f"/proc/{proc.pid}")
    finally:
        proc.wait()
    assert not pid_alive(proc.pid)


def test_a_process_that_ignores_sigterm_is_killed_after_the_timeout(spawned):
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    spawned.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    assert terminate_processes({proc.pid}, timeout_s=0.3) == set()
    assert time.monotonic() - t0 >= 0.3
    assert proc.wait(timeout=5) == -9


def test_a_node_stays_in_the_callers_session_so_that_niceness_counts_across_nodes(spawned):
    node = _spawn(SLEEP)
    spawned.append(node)
    # Its own group (how stop() finds it), the caller's session (one scheduler autogroup for the whole cluster).
    assert os.getpgid(node.pid) == node.pid and os.getsid(node.pid) == os.getsid(0)
