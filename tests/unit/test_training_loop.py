"""The training step's arithmetic with real torch, in one process: shares, loss scale and gradient
accumulation give the gradient of the global batch, so the loss curve does not depend on the worker count."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow.fs
import pytest
import ray.train
import torch
from tidal.training.batching import plan_worker_step
from tidal.training.loop import (
    STATE_FILE,
    build_dataset,
    build_model,
    checkpoint_dir_name,
    checkpoint_step_of,
    per_sample_loss,
    reference_history,
    resume_checkpoint,
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


def test_checkpoint_directory_names_carry_their_step():
    assert checkpoint_step_of(checkpoint_dir_name(40, 3)) == 40
    assert checkpoint_step_of("/store/job/" + checkpoint_dir_name(1234, 0) + "/") == 1234
    assert checkpoint_step_of("/store/job/checkpoint_2026-11-22_06-00-00.000000") is None


def test_an_attempt_resumes_from_the_newer_of_ray_trains_checkpoint_and_the_runners(tmp_path):
    for step in (30, 40):
        d = tmp_path / checkpoint_dir_name(step, 0)
        d.mkdir()
        (d / STATE_FILE).write_bytes(b"state")
    ctx = SimpleNamespace(get_storage=lambda: SimpleNamespace(experiment_fs_path=str(tmp_path), storage_filesystem=pyarrow.fs.LocalFileSystem()))
    registered = ray.train.Checkpoint(path=str(tmp_path / checkpoint_dir_name(30, 0)))
    hint = {"step": 40, "dir": checkpoint_dir_name(40, 0)}

    # A forced stop before Ray Train registered step 40: the runner's checkpoint is newer, and whole.
    chosen = resume_checkpoint(registered, hint, ctx)
    assert checkpoint_step_of(chosen.path) == 40
    assert checkpoint_step_of(resume_checkpoint(None, hint, ctx).path) == 40
    # Ray Train's is as new or newer, or the runner has none: Ray Train's.
    assert resume_checkpoint(registered, {"step": 30, "dir": checkpoint_dir_name(30, 0)}, ctx) is registered
    assert resume_checkpoint(registered, None, ctx) is registered
    # The runner's is not in storage (never whole, or deleted): Ray Train's, not a crash.
    assert resume_checkpoint(registered, {"step": 50, "dir": checkpoint_dir_name(50, 0)}, ctx) is registered
    assert resume_checkpoint(None, {"step": 50, "dir": checkpoint_dir_name(50, 0)}, ctx) is None


class _Call:
    """A fake ObjectRef: ``answer`` once ``ready``."""

    def __init__(self, name: str, answer) -> None:
        self.name, self.answer, self.ready = name, answer, False


class _FakeSignal:
    """The JobSignal methods rank 0's poller calls; every call is recorded, none answers until told."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        signal = self

        class _Method:
            def __init__(self, name: str, answer) -> None:
                self.name, self.answer = name, answer

            def remote(self, *args):
                call = _Call(self.name, self.answer)
                signal.calls.append(call)
                return call

        self.poll = _Method("poll", {"yield": False})
        self.wait_yield = _Method("wait_yield", False)


@pytest.fixture
def fake_ray(monkeypatch):
    import tidal.training.loop as loop

    def wait(refs, num_returns, timeout):
        return [r for r in refs if r.ready], [r for r in refs if not r.ready]

    monkeypatch.setattr(loop.ray, "wait", wait)
    monkeypatch.setattr(loop.ray, "get", lambda ref: ref.answer)
    return loop


def test_rank_0_sees_a_yield_at_its_next_step_boundary_through_the_held_wait_not_a_poll_later(fake_ray):
    signal = _FakeSignal()
    poller = fake_ray._Poller(signal, attempt=0)
    assert poller.yield_flag() is False  # a wait_yield is now held at the actor
    poller.send({"step": 1})
    wait, poll = signal.calls
    assert (wait.name, poll.name) == ("wait_yield", "poll")
    poll.ready = True  # the step's poll: no yield yet
    assert poller.yield_flag() is False and len(signal.calls) == 2  # the held wait is not renewed
    wait.answer, wait.ready = True, True  # the runner asked for a yield: the actor answers the held call
    assert poller.yield_flag() is True


def test_a_held_wait_that_timed_out_is_renewed(fake_ray):
    signal = _FakeSignal()
    poller = fake_ray._Poller(signal, attempt=0)
    poller.yield_flag()
    signal.calls[0].ready = True  # answered False after its timeout
    assert poller.yield_flag() is False
    assert poller.yield_flag() is False
    assert [c.name for c in signal.calls] == ["wait_yield", "wait_yield"]
