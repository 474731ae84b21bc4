"""Tidal's built-in training loop: the ``train_loop_per_worker`` that ``python -m tidal.training.run JOB.yaml``
hands to a ``TidalTrainer`` (torch + ``ray.train``), written as any user's loop under Tidal is.

The loop is written for elasticity:

- **Same optimisation at any size.** Data order, shares, micro-batches and loss scale come from
  ``tidal.training.batching``; the model is built from the job's seed on every worker.
- **Exact resume.** A checkpoint holds the model, optimiser, LR schedule, step (= data position, see
  ``tidal.training.batching``), loss history, and every worker's RNG states; ``ray.train.get_checkpoint()`` gives
  the latest one when the trainer starts a worker group at a new size.
- **Yield at a step boundary.** Every rank asks ``tidal.train.should_yield()`` after each step (the same
  answer on every rank); on True it checkpoints, reports and returns, and the run goes on at its new size.
  A spec with ``fault_injection.ignore_yield`` never asks: the trainer stops it by force after its grace.
- **Mixed precision** (bf16 autocast) on CUDA only; the device comes from ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from tidal.cluster.model import GPU_TYPE_LABEL
from tidal.cluster.preload import lower_priority_to
from tidal.training import trainer as tidal_trainer
from tidal.training.batching import WorkerStepPlan, epoch_of_step, lr_multiplier, plan_worker_step
from tidal.training.data import Dataset
from tidal.training.spares import process_started_s
from tidal.training.spec import JobSpec, import_entrypoint
from torch import nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
META_FILE = "meta.json"
EVAL_BATCH = 256


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def checkpoint_dir_name(step: int, group: int) -> str:
    """``checkpoint-step00000120-g2``: step 120, saved by the run's worker group 2 (its third)."""
    return f"checkpoint-step{step:08d}-g{group}"


# ------------------------------------------------------------------------------------------ pieces


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample: ``[b, C]`` vs ``[b]`` (classes) or ``[b, T, V]`` vs ``[b, T]`` (tokens,
    averaged over the sequence)."""
    c = logits.shape[-1]
    losses = nn.functional.cross_entropy(logits.reshape(-1, c).float(), targets.reshape(-1), reduction="none")
    return losses.view(targets.shape[0], -1).mean(dim=1)


def build_model(spec: JobSpec) -> nn.Module:
    # The same seed on every worker and every worker group: DDP broadcasts rank 0's weights anyway, but a run
    # that starts fresh at any size must start from the same weights.
    torch.manual_seed(spec.seed)
    return import_entrypoint(spec.model.class_path)(**spec.model.kwargs)


def build_optimizer(spec: JobSpec, model: nn.Module) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)


def build_dataset(spec: JobSpec) -> Dataset:
    return import_entrypoint(spec.data.factory)(seed=spec.seed, **spec.data.kwargs)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, device: torch.device) -> dict[str, float]:
    """Mean test loss and accuracy (per sample for classes, per token for language models)."""
    model.eval()
    total_loss, correct, count, n = 0.0, 0, 0, 0
    for x, y in data.test_batches(EVAL_BATCH):
        xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        logits = model(xt).float()
        total_loss += per_sample_loss(logits, yt).sum().item()
        n += len(y)
        correct += (logits.argmax(-1) == yt).sum().item()
        count += yt.numel()
    model.train()
    return {"test_loss": total_loss / max(1, n), "test_accuracy": correct / max(1, count)}


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rng(seed: int, step: int, rank: int) -> None:
    # A worker with no saved RNG state (first start, or more workers than the checkpoint had) derives one.
    s = (seed * 1_000_003 + step * 7919 + rank) & 0xFFFFFFFF
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def train_step(
    module: nn.Module,
    data: Dataset,
    plan: WorkerStepPlan,
    device: torch.device,
    use_cuda: bool,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Forward and backward of one worker's share of a step; returns the sum of its per-sample losses.

    Gradients are accumulated over the micro-batches and all-reduced (by DDP) on the last one only: the
    others run under ``no_sync``. The caller zeroes the gradients before and steps the optimiser after.
    """
    x, y = data.batch(plan.indices)
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, (a, b) in enumerate(plan.micro_batches):
        last = i == len(plan.micro_batches) - 1
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_cuda):
                logits = module(xt[a:b])
            losses = per_sample_loss(logits, yt[a:b])
            (losses.sum() * plan.loss_scale).backward()
        loss_sum += losses.detach().sum().double()
    return loss_sum


def reference_history(spec: JobSpec, num_steps: int | None = None) -> list[list[float]]:
    """The loss curve of the job trained in this process, one worker, no Ray: the run that never resized.

    The elastic loop follows the same curve at any number of workers, up to floating-point summation order.
    """
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    data = build_dataset(spec)
    total_steps = spec.total_steps(data.num_samples)
    model = build_model(spec).to(device)
    optimizer = build_optimizer(spec, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_multiplier(s, schedule=spec.lr_schedule, warmup_steps=spec.warmup_steps, total_steps=total_steps),
    )
    history = []
    for step in range(min(total_steps, num_steps or total_steps)):
        plan = plan_worker_step(
            step, 0, 1, global_batch_size=spec.global_batch_size, num_samples=data.num_samples, seed=spec.seed,
            max_micro_batch_size=spec.max_micro_batch_size,
        )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss_sum = train_step(model, data, plan, device, use_cuda)
        optimizer.step()
        scheduler.step()
        history.append([step + 1, loss_sum.item() / spec.global_batch_size])
    return history


# ----------------------------------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function. ``config``: ``{"spec": <the JobSpec as JSON>}``, and optionally
    ``"progress_board"`` (a ``tidal.training.signal.ProgressBoard`` actor's name, namespace ``tidal``) that
    rank 0 tells its progress about once a second (for a run without an arbiter to report to)."""
    spec = JobSpec.model_validate(config["spec"])
    lower_priority_to(spec.cpu_niceness)  # (raised to it, never past it: a process may serve several groups)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    link = tidal_trainer._link
    generation = link.generation if link is not None else 0
    for orphan in sweep_orphaned_staging():
        logger.info("removed %s: a checkpoint staged by a worker that was stopped before it finished", orphan)
    use_cuda = torch.cuda.is_available()
    device = ray.train.torch.get_device() if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    data = build_dataset(spec)
    total_steps = spec.total_steps(data.num_samples)
    model = build_model(spec).to(device)
    optimizer = build_optimizer(spec, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_multiplier(s, schedule=spec.lr_schedule, warmup_steps=spec.warmup_steps, total_steps=total_steps),
    )
    step = 0
    history: list[list[float]] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step = int(state["step"])
            history = [list(h) for h in state["history"]]
            rng_path = Path(d) / rng_file(rank)
            if rng_path.exists():
                restore_rng(torch.load(rng_path, weights_only=False))
            else:
                seed_rng(spec.seed, step, rank)
        logger.info("group %d rank %d/%d resumed at step %d", generation, rank, world, step)
    else:
        seed_rng(spec.seed, 0, rank)

    ddp = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    comm_device = device if use_cuda else torch.device("cpu")
    board = None
    if rank == 0 and config.get("progress_board"):
        board = ray.get_actor(config["progress_board"], namespace=config.get("namespace", "tidal"))
    B = spec.global_batch_size
    step_times: deque[float] = deque(maxlen=20)
    last_ckpt_mono = time.monotonic()
    posted_mono = float("-inf")
    base_metrics = {
        "num_workers": world,
        "gpu_type": ray.get_runtime_context().get_node_labels().get(GPU_TYPE_LABEL),
        "device": str(device),
        "group": generation,
        "total_steps": total_steps,
        "resumed_from": step,
        "process_started_s": process_started_s(),
    }

    while step < total_steps:
        t0 = time.monotonic()
        plan = plan_worker_step(
            step, rank, world, global_batch_size=B, num_samples=data.num_samples, seed=spec.seed,
            max_micro_batch_size=spec.max_micro_batch_size,
        )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss_sum = train_step(ddp, data, plan, device, use_cuda, no_sync=ddp.no_sync)
        optimizer.step()
        scheduler.step()
        if spec.fault_injection.step_delay_s:
            time.sleep(spec.fault_injection.step_delay_s)

        # One all-reduce per step for [sum of losses, checkpoint now?] (the flag from rank 0 only).
        flags = torch.zeros(2, dtype=torch.float64, device=comm_device)
        flags[0] = loss_sum.to(comm_device)
        if rank == 0:
            flags[1] = float(time.monotonic() - last_ckpt_mono >= spec.checkpoint_period_s)
        dist.all_reduce(flags)
        loss = flags[0].item() / B
        step += 1
        history.append([step, loss])
        step_times.append(time.monotonic() - t0)

        done = step >= total_steps
        # A collective too: every rank asks at the same step. A loop that never asks is stopped by force.
        yield_now = not done and not spec.fault_injection.ignore_yield and tidal_trainer.should_yield()
        every = spec.checkpoint_every_steps
        save_now = done or yield_now or flags[1].item() > 0 or bool(every and step % every == 0)
        metrics = {
            **base_metrics,
            "step": step,
            "loss": loss,
            "epoch": epoch_of_step(step, B, data.num_samples),
            "lr": scheduler.get_last_lr()[0],
            "samples_per_s": B * len(step_times) / sum(step_times),
            "done": done,
        }
        if done and rank == 0:
            metrics.update(evaluate(model, data, device))
        if save_now:
            _save_and_report(metrics, rank, model, optimizer, scheduler, step, history, data, generation)
            last_ckpt_mono = time.monotonic()
        elif step % spec.report_every_steps == 0:
            ray.train.report(metrics)
        if board is not None and (time.monotonic() - posted_mono >= 1.0 or save_now):
            board.post.remote({**metrics, "reported_s": time.time()})
            posted_mono = time.monotonic()
        if yield_now:
            logger.info("group %d rank %d yielded at step %d", generation, rank, step)
            return


# A checkpoint is staged in the node's temp dir before Ray Train copies it to the run's storage. A worker killed
# while it stages one (a forced stop, a lost node) never runs TemporaryDirectory's clean-up, so the folder names
# its writer's pid: the next worker on the node removes those whose writer is gone.
STAGING_PREFIX = "tidal-ckpt-"
_STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"(\d+)-[^-]+")


def staging_prefix(pid: int | None = None) -> str:
    return f"{STAGING_PREFIX}{os.getpid() if pid is None else pid}-"


def sweep_orphaned_staging(
    tmp_dir: str | Path | None = None, alive: Callable[[int], bool] | None = None, min_age_s: float = 600.0
) -> list[Path]:
    """Removes the checkpoint staging folders in ``tmp_dir`` (the node's temp dir) whose writer process is gone
    and that nothing has touched for ``min_age_s`` (a temp dir shared by processes of another pid namespace
    shows their live writers as gone); returns them. Never raises: what it cannot remove stays."""
    if alive is None:
        from tidal.cluster.processes import pid_alive as alive
    removed = []
    try:
        candidates = list(Path(tmp_dir or tempfile.gettempdir()).glob(STAGING_PREFIX + "*"))
    except OSError:
        return removed
    now = time.time()
    for path in candidates:
        m = _STAGING_NAME.fullmatch(path.name)
        try:
            if m is None or not path.is_dir() or now - path.stat().st_mtime < min_age_s or alive(int(m.group(1))):
                continue
        except OSError:  # gone meanwhile
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


def _save_and_report(
    metrics: dict[str, Any],
    rank: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    history: list[list[float]],
    data: Dataset,
    group: int,
) -> str:
    """Every worker writes its RNG state; rank 0 adds model, optimiser, schedule, step and history.
    Ray Train merges the workers' files into one checkpoint directory under the run's storage path, whose
    name (under the run's directory) this returns."""
    dir_name = checkpoint_dir_name(step, group)
    with tempfile.TemporaryDirectory(prefix=staging_prefix()) as tmp:
        torch.save(capture_rng(), os.path.join(tmp, rng_file(rank)))
        if rank == 0:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "history": history,
                },
                os.path.join(tmp, STATE_FILE),
            )
            meta = {
                "step": step,
                "group": group,
                "world_size": metrics["num_workers"],
                "input_shape": list(data.input_shape),
                "labels": data.labels,
                "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)},
            }
            Path(tmp, META_FILE).write_text(json.dumps(meta))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=dir_name,
        )
    return dir_name
