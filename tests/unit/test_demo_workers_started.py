"""The demo starts its load once no Ray worker process is still starting (tidal.demo.runtime)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tidal.demo.runtime import idle_worker_cpu_s, starting_cpu_s


def test_a_new_process_counts_all_its_cpu_and_a_gone_one_none():
    before = {1: 5.0, 2: 3.0}
    assert starting_cpu_s(before, {1: 5.1, 2: 3.0}) == pytest.approx(0.1)
    assert starting_cpu_s(before, {1: 5.0, 3: 0.7}) == pytest.approx(0.7)  # 2 took an actor; 3 is new
    assert starting_cpu_s(before, {}) == 0.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_only_processes_titled_like_an_idle_ray_worker_are_read():
    # A child whose command line reads as Ray titles a worker with no work (argv[0]), burning >= 0.3 s of CPU
    # (its imports), then waiting.
    code = (
        "import sys, time\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 0.3: pass\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(["ray::IDLE", "-c", code], executable=sys.executable, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        cpu = idle_worker_cpu_s([child.pid, os.getpid()])
        assert set(cpu) == {child.pid}  # this test's own process is not titled ray::IDLE
        assert cpu[child.pid] >= 0.25
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    assert idle_worker_cpu_s([child.pid]) == {}  # gone
