"""Batch arithmetic that keeps the optimisation independent of the number of workers.

Pure: numpy only. The data order is a function of ``(seed, step)`` alone, never of the number of workers,
so a job that resizes from 4 workers to 2 and back sees exactly the samples, in the same optimiser
steps, that a job that never resized sees.

The sample stream: epoch ``e`` is a permutation of ``range(num_samples)`` drawn from ``(seed, e)``; the
epochs are laid end to end, and optimiser step ``s`` takes stream positions
``[s * B, (s + 1) * B)`` for the global batch size ``B`` (a step may straddle two epochs). The data
position to checkpoint is therefore just the step.

Within a step, worker ``r`` of ``W`` takes a contiguous share of the global batch (shares differ by at
most one sample) and may split it into micro-batches (gradient accumulation). To make the averaged
gradient equal the gradient of the mean loss over the whole global batch, whatever ``W`` and the shares:
each worker sums its per-sample losses and multiplies by ``W / B`` (:func:`loss_scale`); DDP then
averages over the ``W`` workers, giving ``sum(all losses) / B``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch, a function of ``(seed, epoch)`` only."""
    if num_samples <= 0:
        raise ValueError(f"num_samples must be > 0, got {num_samples}")
    rng = np.random.Generator(np.random.PCG64([seed & 0xFFFFFFFF, epoch]))
    return rng.permutation(num_samples)


def global_batch_indices(step: int, global_batch_size: int, num_samples: int, seed: int) -> np.ndarray:
    """Sample indices of optimiser step ``step`` (``global_batch_size`` of them, in order).

    Example: 10 samples, batch 4: step 0 takes stream positions 0..3 (epoch 0), step 2 takes positions
    8..11, i.e. the last 2 of epoch 0 and the first 2 of epoch 1.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be > 0, got {global_batch_size}")
    start = step * global_batch_size
    stop = start + global_batch_size
    out: list[np.ndarray] = []
    pos = start
    while pos < stop:
        epoch, offset = divmod(pos, num_samples)
        take = min(stop - pos, num_samples - offset)
        out.append(epoch_permutation(num_samples, seed, epoch)[offset : offset + take])
        pos += take
    return np.concatenate(out)


def shard_bounds(global_batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """The slice ``[start, stop)`` of the global batch that worker ``rank`` of ``world_size`` takes.

    Contiguous shares differing by at most one sample, the larger ones first.
    Example: batch 10 over 3 workers -> [0, 4), [4, 7), [7, 10).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if global_batch_size < world_size:
        raise ValueError(
            f"global_batch_size={global_batch_size} is below world_size={world_size}: every worker needs a sample"
        )
    base, extra = divmod(global_batch_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def micro_batches(start: int, stop: int, max_micro_batch_size: int | None) -> list[tuple[int, int]]:
    """Splits ``[start, stop)`` into consecutive micro-batches of at most ``max_micro_batch_size``.

    Example: [0, 10) with at most 4 -> [(0, 4), (4, 8), (8, 10)]; ``None`` -> one micro-batch.
    """
    if stop <= start:
        raise ValueError(f"empty share [{start}, {stop})")
    if max_micro_batch_size is None:
        return [(start, stop)]
    if max_micro_batch_size <= 0:
        raise ValueError(f"max_micro_batch_size must be > 0, got {max_micro_batch_size}")
    return [(a, min(a + max_micro_batch_size, stop)) for a in range(start, stop, max_micro_batch_size)]


def loss_scale(world_size: int, global_batch_size: int) -> float:
    """Factor on a worker's *summed* per-sample loss so that DDP's mean over workers is the global mean.

    DDP averages gradients over ``W`` workers; the global mean loss is ``sum / B``. A worker that
    back-propagates ``sum_r * W / B`` therefore yields ``(1/W) * sum_r(sum_r * W / B) = sum / B``.
    Example: W=4, B=64 -> 0.0625 (1/16), W=2 -> 0.03125.
    """
    return world_size / global_batch_size


@dataclass(frozen=True, slots=True)
class WorkerStepPlan:
    """What one worker computes in one optimiser step.

    Attributes:
        indices: the worker's sample indices, in order.
        micro_batches: slices of ``indices`` to forward/backward one at a time.
        loss_scale: multiply the summed per-sample loss of each micro-batch by this.
    """

    indices: np.ndarray
    micro_batches: tuple[tuple[int, int], ...]
    loss_scale: float


def plan_worker_step(
    step: int,
    rank: int,
    world_size: int,
    *,
    global_batch_size: int,
    num_samples: int,
    seed: int,
    max_micro_batch_size: int | None = None,
) -> WorkerStepPlan:
    """The indices, micro-batches and loss scale of worker ``rank`` in optimiser step ``step``."""
    batch = global_batch_indices(step, global_batch_size, num_samples, seed)
    start, stop = shard_bounds(global_batch_size, rank, world_size)
    mine = batch[start:stop]
    return WorkerStepPlan(
        indices=mine,
        micro_batches=tuple((a - start, b - start) for a, b in micro_batches(start, stop, max_micro_batch_size)),
        loss_scale=loss_scale(world_size, global_batch_size),
    )


def epoch_of_step(step: int, global_batch_size: int, num_samples: int) -> float:
    """Epochs completed after ``step`` steps: 45 steps of 64 over 1437 samples -> 2.004."""
    return step * global_batch_size / num_samples


def lr_multiplier(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate factor for optimiser step ``step`` (0-based). A function of the step only, so it
    survives a resize and a resume unchanged.

    Linear warm-up ``(step + 1) / warmup_steps`` over the first ``warmup_steps`` steps, then ``constant``,
    or ``linear`` / ``cosine`` decay from 1 to 0 over the remaining steps.
    Example: cosine, warmup 10, total 110: step 4 -> 0.5, step 10 -> 1.0, step 60 -> 0.5.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; valid: constant, linear, cosine")
