"""`tidal up` / `tidal status` / `tidal down` as a user runs them: real processes, nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tidal.cluster.local import LocalCluster
from tidal.cluster.processes import pid_alive

pytestmark = pytest.mark.integration

SMALL_SPEC = """
head: {num_cpus: 1, object_store_memory_mb: 100}
node_groups:
  - {gpu_type: RTX4090, count: 1, num_gpus: 1, num_cpus: 1, object_store_memory_mb: 100}
"""


def _tidal(*args: str, home, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["TIDAL_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "tidal.cluster.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_tidal_up_status_and_down_leave_no_ray_process_behind(tmp_path):
    home = tmp_path / "home"
    spec = tmp_path / "small.yaml"
    spec.write_text(SMALL_SPEC)
    up = _tidal("up", "--config", str(spec), home=home)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "export RAY_AUTH_MODE=token" in up.stdout and "Dashboard:" in up.stdout
        state_path = json.loads((home / "local-cluster.json").read_text())["state_path"]
        cluster = LocalCluster.attach(state_path)
        pids = cluster.pids()
        assert pids

        again = _tidal("up", "--config", str(spec), home=home)
        assert again.returncode == 1 and "already up" in again.stderr

        status = _tidal("status", "--json", home=home)
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["capacity"] == {"RTX4090": 1.0}
        assert data["arbiter"]["ticks"] >= 1
    finally:
        down = _tidal("down", home=home)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "Stopped the local cluster" in down.stdout
    assert not [p for p in pids if pid_alive(p)]
    assert not cluster.pids()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(cluster.root_dir) not in ps
    assert not cluster.root_dir.exists()
    nothing = _tidal("down", home=home)
    assert nothing.returncode == 0 and "Nothing is up" in nothing.stdout
