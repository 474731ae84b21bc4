"""Batch arithmetic: the data order and the averaged gradient do not depend on the number of workers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tidal.training.batching import (
    epoch_permutation,
    global_batch_indices,
    loss_scale,
    lr_multiplier,
    micro_batches,
    plan_worker_step,
    shard_bounds,
)


@given(batch=st.integers(1, 512), world=st.integers(1, 64))
def test_worker_shares_partition_the_global_batch_and_differ_by_at_most_one(batch, world):
    if batch < world:
        with pytest.raises(ValueError, match="below world_size"):
            shard_bounds(batch, 0, world)
        return
    bounds = [shard_bounds(batch, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == batch
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@given(
    step=st.integers(0, 200),
    batch=st.integers(4, 96),
    samples=st.integers(5, 300),
    seed=st.integers(0, 2**31),
    worlds=st.lists(st.integers(1, 4), min_size=2, max_size=3),
    micro=st.one_of(st.none(), st.integers(1, 40)),
)
def test_the_samples_of_a_step_are_the_same_at_every_world_size(step, batch, samples, seed, worlds, micro):
    expected = global_batch_indices(step, batch, samples, seed)
    for world in worlds:
        plans = [
            plan_worker_step(step, r, world, global_batch_size=batch, num_samples=samples, seed=seed, max_micro_batch_size=micro)
            for r in range(world)
        ]
        got = np.concatenate([p.indices for p in plans])
        np.testing.assert_array_equal(got, expected)
        for p in plans:
            covered = [i for a, b in p.micro_batches for i in range(a, b)]
            assert covered == list(range(len(p.indices)))


def test_every_epoch_visits_every_sample_once_in_a_seeded_order():
    samples, batch = 10, 4
    stream = np.concatenate([global_batch_indices(s, batch, samples, seed=7) for s in range(5)])  # 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    # Step 2 straddles the epochs: the last 2 of epoch 0, then the first 2 of epoch 1.
    np.testing.assert_array_equal(
        global_batch_indices(2, batch, samples, seed=7),
        np.concatenate([epoch_permutation(samples, 7, 0)[8:], epoch_permutation(samples, 7, 1)[:2]]),
    )
    assert not np.array_equal(epoch_permutation(samples, 7, 0), epoch_permutation(samples, 8, 0))


@given(
    losses=st.lists(st.floats(0, 10, allow_nan=False), min_size=8, max_size=64),
    world=st.integers(1, 8),
)
def test_the_loss_scale_makes_ddps_average_the_mean_over_the_global_batch(losses, world):
    batch = len(losses)
    # What DDP computes: the mean over workers of each worker's scaled sum (gradients are linear in it).
    shares = [losses[a:b] for a, b in (shard_bounds(batch, r, world) for r in range(world))]
    ddp = sum(sum(s) * loss_scale(world, batch) for s in shares) / world
    assert ddp == pytest.approx(sum(losses) / batch, rel=1e-9, abs=1e-12)


def test_micro_batches_cover_a_share_in_bounded_pieces():
    assert micro_batches(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert micro_batches(3, 5, None) == [(3, 5)]
    with pytest.raises(ValueError, match="empty share"):
        micro_batches(5, 5, 2)


def test_loss_scale_examples_from_the_docstring():
    assert loss_scale(4, 64) == 1 / 16
    assert loss_scale(2, 64) == 1 / 32


def test_learning_rate_warms_up_then_decays():
    f = lambda s: lr_multiplier(s, schedule="cosine", warmup_steps=10, total_steps=110)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(4) == pytest.approx(0.5)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(50, schedule="linear", warmup_steps=0, total_steps=100) == pytest.approx(0.5)
    assert lr_multiplier(99, schedule="constant", warmup_steps=0, total_steps=100) == 1.0
    with pytest.raises(ValueError, match="valid: constant, linear, cosine"):
        lr_multiplier(20, schedule="step", warmup_steps=0, total_steps=100)
