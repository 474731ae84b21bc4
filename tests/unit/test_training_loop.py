"""The training step's arithmetic with real torch, in one process: shares, loss scale and gradient
accumulation give the gradient of the global batch, so the loss curve does not depend on the worker count."""

from __future__ import annotations

import pytest
import torch
from tidal.training.batching import plan_worker_step
from tidal.training.loop import (
    build_dataset,
    build_model,
    per_sample_loss,
    reference_history,
    train_step,
)
from tidal.training.spec import parse_spec


def make_spec(**overrides):
    spec = {
        "name": "loop-test",
        "model": {"class": "tidal.training.models:DigitsMLP", "kwargs": {"hidden": 32}},
        "data": {"factory": "tidal.training.data:digits"},
        "gpu_types": ["H100"],
        "max_workers": 4,
        "global_batch_size": 30,
        "steps": 12,
        "lr": 0.01,
        "seed": 3,
        "storage_path": "/tmp/tidal-tr-unit",
    }
    spec.update(overrides)
    return parse_spec(spec)


def grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_scaled_shares_averaged_over_workers_give_the_global_batch_gradient(world):
    spec = make_spec()
    data = build_dataset(spec)
    cpu = torch.device("cpu")
    one = build_model(spec)
    one.zero_grad()
    train_step(one, data, plan_worker_step(5, 0, 1, global_batch_size=30, num_samples=data.num_samples, seed=3), cpu, False)
    # What DDP does with `world` workers: each back-propagates its scaled share, the gradients are averaged.
    summed = None
    for rank in range(world):
        m = build_model(spec)
        m.zero_grad()
        plan = plan_worker_step(5, rank, world, global_batch_size=30, num_samples=data.num_samples, seed=3)
        train_step(m, data, plan, cpu, False)
        summed = grads(m) if summed is None else summed + grads(m)
    torch.testing.assert_close(summed / world, grads(one), rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_follows_the_same_loss_curve():
    whole = reference_history(make_spec())
    accumulated = reference_history(make_spec(max_micro_batch_size=7))
    assert [s for s, _ in whole] == list(range(1, 13))
    for (_, a), (_, b) in zip(whole, accumulated, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_the_loss_of_a_token_sequence_is_its_mean_over_tokens():
    logits = torch.zeros(2, 3, 4)
    targets = torch.tensor([[0, 1, 2], [3, 3, 3]])
    # Uniform logits: every token costs log(4).
    torch.testing.assert_close(per_sample_loss(logits, targets), torch.full((2,), float(torch.log(torch.tensor(4.0)))))
    assert per_sample_loss(torch.zeros(5, 10), torch.zeros(5, dtype=torch.long)).shape == (5,)
