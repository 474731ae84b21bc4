"""``tidal.cluster.warm_pool.WarmPool``: which nodes get new idle workers, how many, and when (fake raylets, manual clock)."""

from __future__ import annotations

import pytest
from tidal.cluster.warm_pool import PoolNode, WarmPool, nodes_from_ray


class FakeRaylets:
    def __init__(self, idle: dict[str, int], failing: set[str] = frozenset()) -> None:
        self.idle = dict(idle)
        self.failing = set(failing)
        self.prestarts: list[tuple[str, int, float]] = []

    def idle_workers(self, address: str) -> int:
        if address in self.failing:
            raise ConnectionError(f"{address} is gone")
        return self.idle[address]

    def prestart(self, address: str, num_workers: int, keep_alive_s: float) -> None:
        self.prestarts.append((address, num_workers, keep_alive_s))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


NODES = [
    PoolNode("h100", "10.0.0.1:1", 4),
    PoolNode("a100", "10.0.0.2:1", 2),
    PoolNode("head", "10.0.0.9:1", 0),
]


def test_the_node_with_fewest_idle_workers_is_topped_up_first_within_the_round_budget():
    raylets = FakeRaylets({"10.0.0.1:1": 1, "10.0.0.2:1": 0, "10.0.0.9:1": 0})
    pool = WarmPool(raylets, spare_workers_per_node=2, max_starts_per_round=2, clock=Clock())
    report = pool.run_once(NODES)
    # a100 misses 2, h100 misses 1: the budget of 2 goes to a100; the head (no GPUs) is never counted.
    assert report.idle == {"h100": 1, "a100": 0}
    assert report.started == {"a100": 2}
    assert raylets.prestarts == [("10.0.0.2:1", 2, 3600.0)]


def test_a_node_just_topped_up_waits_its_cooldown_while_its_workers_start():
    clock = Clock()
    raylets = FakeRaylets({"10.0.0.1:1": 2, "10.0.0.2:1": 0, "10.0.0.9:1": 0})
    pool = WarmPool(raylets, spare_workers_per_node=2, max_starts_per_round=4, node_cooldown_s=20, clock=clock)
    assert pool.run_once(NODES).started == {"a100": 2}
    clock.t += 19.0  # the two workers are still importing: not idle yet, and not asked for again
    assert pool.run_once(NODES).started == {}
    clock.t += 1.0
    raylets.idle["10.0.0.2:1"] = 1  # one came up, one died
    assert pool.run_once(NODES).started == {"a100": 1}
    assert [p[1] for p in raylets.prestarts] == [2, 1]


def test_full_nodes_get_nothing_and_a_spare_of_zero_asks_the_raylets_nothing():
    raylets = FakeRaylets({"10.0.0.1:1": 3, "10.0.0.2:1": 2, "10.0.0.9:1": 0})
    assert WarmPool(raylets, spare_workers_per_node=2, clock=Clock()).run_once(NODES).started == {}
    off = WarmPool(raylets, spare_workers_per_node=0, clock=Clock()).run_once(NODES)
    assert (off.idle, off.started) == ({}, {})
    assert raylets.prestarts == []


def test_a_node_that_does_not_answer_is_skipped_and_the_others_are_served():
    raylets = FakeRaylets({"10.0.0.1:1": 0, "10.0.0.2:1": 0}, failing={"10.0.0.1:1"})
    report = WarmPool(raylets, spare_workers_per_node=1, max_starts_per_round=5, clock=Clock()).run_once(NODES)
    assert set(report.errors) == {"h100"}
    assert report.started == {"a100": 1}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"spare_workers_per_node": -1}, "spare_workers_per_node=-1"),
        ({"spare_workers_per_node": 1, "max_starts_per_round": 0}, "max_starts_per_round=0"),
        ({"spare_workers_per_node": 1, "keep_alive_s": 0}, "keep_alive_s=0"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        WarmPool(FakeRaylets({}), **kwargs)


def test_nodes_from_ray_keeps_alive_nodes_with_their_raylet_address_and_gpus():
    nodes = nodes_from_ray(
        [
            {"NodeID": "a", "Alive": True, "NodeManagerAddress": "10.0.0.1", "NodeManagerPort": 7, "Resources": {"GPU": 4.0}},
            {"NodeID": "b", "Alive": False, "NodeManagerAddress": "10.0.0.2", "NodeManagerPort": 7, "Resources": {"GPU": 2.0}},
            {"NodeID": "c", "Alive": True, "NodeManagerAddress": "10.0.0.3", "NodeManagerPort": 8, "Resources": {}},
        ]
    )
    assert nodes == [PoolNode("a", "10.0.0.1:7", 4.0), PoolNode("c", "10.0.0.3:8", 0.0)]


def test_nothing_is_started_while_the_grants_have_moved_within_the_quiet_time():
    clock = Clock()
    raylets = FakeRaylets({"10.0.0.1:1": 0, "10.0.0.2:1": 0, "10.0.0.9:1": 0})
    pool = WarmPool(raylets, spare_workers_per_node=1, max_starts_per_round=4, quiet_s=15, clock=clock)
    moved = clock.t - 14.0  # a spike moved GPUs 14 s ago: the pool gives, it does not refill
    assert pool.run_once(NODES, last_move_s=moved).started == {}
    clock.t += 1.0
    assert pool.run_once(NODES, last_move_s=moved).started == {"h100": 1, "a100": 1}


def test_a_node_whose_idle_workers_were_just_taken_is_refilled_only_after_the_quiet_time():
    clock = Clock()
    raylets = FakeRaylets({"10.0.0.1:1": 2, "10.0.0.2:1": 2, "10.0.0.9:1": 0})
    pool = WarmPool(raylets, spare_workers_per_node=2, max_starts_per_round=4, node_cooldown_s=0, quiet_s=15, clock=clock)
    assert pool.run_once(NODES).started == {}
    raylets.idle["10.0.0.2:1"] = 0  # two replicas started on the A100 node (no arbiter grant moved: Serve alone)
    clock.t += 5.0
    assert pool.run_once(NODES).started == {}
    clock.t += 14.0
    assert pool.run_once(NODES).started == {}
    clock.t += 1.0  # 15 s after the round that saw them taken
    assert pool.run_once(NODES).started == {"a100": 2}
