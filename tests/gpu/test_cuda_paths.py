"""The CUDA paths of Tidal's training, on a real GPU (marked ``gpu``: they skip where torch sees no CUDA).

``bench/gpu_check.py`` runs them, then a short resize of a ``TidalTrainer`` job on the GPU; on a machine without
CUDA (this project's CI) they are reported as skipped, never as passed.

- The built-in loop's step under bf16 autocast on the device (``tidal.training.loop.train_step``): the forward
  runs in bfloat16, the loss and the gradients come back finite, the weights stay float32.
- ``AutoTorchConfig`` picks NCCL for workers that see CUDA, and a one-rank NCCL process group answers
  ``should_yield``'s all-reduce on the device.
- A script written for GPUs uses the GPU: ``_cpu_where_no_cuda`` leaves Ray's CUDA device manager alone.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_the_built_in_step_runs_in_bf16_autocast_on_the_gpu_with_float32_weights():
    from tidal.training.batching import plan_worker_step
    from tidal.training.loop import build_dataset, build_model, train_step
    from tidal.training.spec import parse_spec

    spec = parse_spec({
        "name": "gpu-step", "model": {"class": "tidal.training.models:DigitsMLP", "kwargs": {"hidden": 64}},
        "data": {"factory": "tidal.training.data:digits"}, "gpu_types": ["H100"], "global_batch_size": 64,
        "steps": 3, "storage_path": "/tmp/tidal-gpu-check",
    })  # fmt: skip
    device = torch.device("cuda")
    model = build_model(spec).to(device)
    dtypes = []
    model.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    data = build_dataset(spec)
    plan = plan_worker_step(0, 0, 1, global_batch_size=64, num_samples=data.num_samples, seed=0)
    loss_sum = train_step(model, data, plan, device, use_cuda=True)
    assert dtypes and all(d == torch.bfloat16 for d in dtypes), dtypes
    assert torch.isfinite(loss_sum).item() and loss_sum.device.type == "cuda"
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_auto_torch_config_picks_nccl_and_a_one_rank_nccl_group_answers_the_yield_all_reduce(monkeypatch):
    import torch.distributed as dist
    from tidal.training import trainer

    assert trainer._cuda_available()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        monkeypatch.setattr("ray.train.torch.get_device", lambda: torch.device("cuda", 0))
        assert trainer._agree(True, 2) is True  # (world size 2 asks the group; the group has one rank)
        assert trainer._agree(False, 2) is False
    finally:
        dist.destroy_process_group()


def test_a_worker_that_sees_cuda_keeps_rays_cuda_device_manager():
    from ray.air._internal import device_manager
    from tidal.training.trainer import _cpu_where_no_cuda

    before = device_manager._torch_device_manager
    _cpu_where_no_cuda()
    assert device_manager._torch_device_manager is before
