"""``tidal.training.spares.SpareWorkers``: which nodes get a job's spare workers, how many, with what (fake raylets)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from tidal.cluster.warm_pool import PoolNode, nodes_from_ray
from tidal.training.spares import SpareWorkers, process_started_s

JOB = bytes.fromhex("03000000")
ENV = '{"env_vars":{"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S":"1.0"}}'


class FakeRaylets:
    def __init__(self, idle: dict[str, int], failing: frozenset[str] = frozenset()) -> None:
        self.idle = dict(idle)
        self.failing = failing
        self.asked: list[tuple[str, bytes | None]] = []
        self.prestarts: list[tuple[str, int, bytes | None, str | None]] = []

    def idle_workers(self, address: str, job_id: bytes | None = None) -> int:
        self.asked.append((address, job_id))
        if address in self.failing:
            raise ConnectionError(f"{address} is gone")
        return self.idle.get(address, 0)

    def prestart(
        self,
        address: str,
        num_workers: int,
        keep_alive_s: float,
        job_id: bytes | None = None,
        serialized_runtime_env: str | None = None,
    ) -> None:
        self.prestarts.append((address, num_workers, job_id, serialized_runtime_env))


NODES = [
    PoolNode("h100-b", "10.0.0.2:1", 4, "H100"),
    PoolNode("h100-a", "10.0.0.1:1", 4, "H100"),
    PoolNode("a100", "10.0.0.3:1", 2, "A100"),
]


def spares(raylets: FakeRaylets, count: int, gpus_per_worker: float = 1, clock: list[float] | None = None) -> SpareWorkers:
    """``clock``: a one-item list holding the manual clock's time (100 s if not given)."""
    now = clock if clock is not None else [100.0]
    s = SpareWorkers(raylets, job_id=JOB, count=count, gpus_per_worker=gpus_per_worker, clock=lambda: now[0])
    s.runtime_env = ENV
    return s


def test_the_missing_spares_are_started_bound_to_the_job_with_its_workers_runtime_env():
    raylets = FakeRaylets({"10.0.0.3:1": 1})
    started = spares(raylets, count=2).top_up("A100", NODES)
    assert started == {"a100": 1}
    assert raylets.prestarts == [("10.0.0.3:1", 1, JOB, ENV)]
    # Idle workers are counted among the job's own, not the cluster's unbound warm pool.
    assert raylets.asked == [("10.0.0.3:1", JOB)]


def test_spares_fill_the_nodes_of_the_type_in_order_up_to_what_each_can_place():
    # 6 spares of 1-GPU workers over two 4-GPU H100 nodes: 4 on the first (by node id), 2 on the second.
    raylets = FakeRaylets({})
    started = spares(raylets, count=6).top_up("H100", NODES)
    assert started == {"h100-a": 4, "h100-b": 2}
    # 2-GPU workers: a 4-GPU node places at most 2 of them.
    raylets = FakeRaylets({})
    assert spares(raylets, count=3, gpus_per_worker=2).top_up("H100", NODES) == {"h100-a": 2, "h100-b": 1}


def test_nothing_is_started_before_the_runtime_env_is_known_or_when_off():
    raylets = FakeRaylets({})
    s = SpareWorkers(raylets, job_id=JOB, count=2, gpus_per_worker=1)
    assert s.top_up("A100", NODES) == {}
    assert spares(raylets, count=0).top_up("A100", NODES) == {}
    assert raylets.prestarts == [] and raylets.asked == []


def test_a_node_just_topped_up_waits_its_cooldown_and_a_full_node_gets_none():
    clock = [100.0]
    raylets = FakeRaylets({})
    s = spares(raylets, count=2, clock=clock)
    assert s.top_up("A100", NODES) == {"a100": 2}
    assert (s.idle, s.wanted) == (0, 2)
    # Its new workers are still importing (not idle yet): within the cooldown none is started again.
    clock[0] += s.node_cooldown_s - 1
    assert s.top_up("A100", NODES) == {}
    assert (s.idle, s.wanted) == (0, 2)
    clock[0] += 2
    raylets.idle["10.0.0.3:1"] = 2
    assert s.top_up("A100", NODES) == {}
    assert (s.idle, s.wanted) == (2, 2)
    assert len(raylets.prestarts) == 1


def test_a_batch_up_lets_the_next_one_start_before_the_cooldown_ends():
    # The raylet started 2 of the 4 asked for; once they are idle the other 2 are asked for at once.
    clock = [100.0]
    raylets = FakeRaylets({})
    s = spares(raylets, count=4, clock=clock)
    assert s.top_up("H100", NODES) == {"h100-a": 4}
    clock[0] += 10
    assert s.top_up("H100", NODES) == {}  # nothing up yet: the cooldown holds
    raylets.idle["10.0.0.1:1"] = 2
    assert s.top_up("H100", NODES) == {"h100-a": 2}
    assert [p[1] for p in raylets.prestarts] == [4, 2]
    # The second batch is not up yet: the idle count has not grown since it was asked for.
    clock[0] += 10
    assert s.top_up("H100", NODES) == {}
    raylets.idle["10.0.0.1:1"] = 4
    assert s.top_up("H100", NODES) == {}
    assert (s.idle, s.wanted) == (4, 4)


def test_a_failing_raylet_is_skipped_and_the_others_are_still_topped_up():
    raylets = FakeRaylets({}, failing=frozenset({"10.0.0.1:1"}))
    assert spares(raylets, count=6).top_up("H100", NODES) == {"h100-b": 2}


def test_bad_bounds_are_refused_with_the_values():
    with pytest.raises(ValueError, match="count=-1"):
        SpareWorkers(FakeRaylets({}), job_id=JOB, count=-1, gpus_per_worker=1)
    with pytest.raises(ValueError, match="gpus_per_worker=0"):
        SpareWorkers(FakeRaylets({}), job_id=JOB, count=1, gpus_per_worker=0)


def test_the_nodes_spares_go_to_carry_their_gpu_type_label():
    ray_nodes = [
        {"NodeID": "n1", "Alive": True, "NodeManagerAddress": "10.0.0.1", "NodeManagerPort": 7,
         "Labels": {"ray.io/accelerator-type": "H100"}, "Resources": {"GPU": 4.0}},
        {"NodeID": "n2", "Alive": False, "NodeManagerAddress": "10.0.0.2", "NodeManagerPort": 7,
         "Labels": {"ray.io/accelerator-type": "H100"}, "Resources": {"GPU": 4.0}},
        {"NodeID": "head", "Alive": True, "NodeManagerAddress": "10.0.0.9", "NodeManagerPort": 7,
         "Labels": {}, "Resources": {"CPU": 2.0}},
    ]  # fmt: skip
    nodes = nodes_from_ray(ray_nodes)
    assert nodes == [PoolNode("n1", "10.0.0.1:7", 4.0, "H100"), PoolNode("head", "10.0.0.9:7", 0.0, None)]
    # The head has no type: no spare ever goes there.
    raylets = FakeRaylets({})
    assert spares(raylets, count=4).top_up("H100", nodes) == {"n1": 4}


@pytest.mark.skipif(process_started_s() is None, reason="no /proc: process start times are unknown here")
def test_process_started_s_is_when_the_process_started():
    # A child started between two readings of the clock says it started between them (1 s slack: the
    # kernel counts process start in clock ticks, and the two clocks are read apart).
    before = time.time()
    out = subprocess.run(
        [sys.executable, "-c", "import time; time.sleep(1.5); from tidal.training.spares import process_started_s;"
         " print(process_started_s())"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    after = time.time()
    started = float(out.stdout)
    assert before - 1.0 <= started <= after - 1.5 + 1.0
