"""The training loop every Ray Train worker runs (torch + ``ray.train``), one trainer attempt at a time.

The loop is written for elasticity:

- **Same optimisation at any size.** Data order, shares, micro-batches and loss scale come from
  ``tidal.training.batching``; the model is built from the job's seed on every worker.
- **Exact resume.** A checkpoint holds the model, optimiser, LR schedule, step (= data position, see
  ``tidal.training.batching``), loss history, and every worker's RNG states; ``ray.train.get_checkpoint()`` gives
  the latest one when the runner starts a new attempt under the same run name.
- **Yield at a step boundary.** Rank 0 asks the job's signal actor (``tidal.training.signal.JobSignal``) without
  blocking (a held call answered when a yield is requested, read at the next step boundary); one all-reduce per step
  shares its answer, the loss and the checkpoint-now flag, so every worker yields, checkpoints and
  reports at the same step. A yield checkpoints, then rank 0 acknowledges to the signal actor with the
  worker group's placement group, which the signal actor removes (the GPUs are free at once).
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
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
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


def checkpoint_dir_name(step: int, attempt: int) -> str:
    return f"checkpoint-step{step:08d}-a{attempt}"


def checkpoint_step_of(path: str) -> int | None:
    """The step in a checkpoint directory's name (``checkpoint_dir_name``), or None for other names."""
    m = re.fullmatch(r"checkpoint-step(\d+)-a\d+", path.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def resume_checkpoint(registered: ray.train.Checkpoint | None, hint: dict[str, Any] | None, ctx: Any) -> ray.train.Checkpoint | None:
    """The checkpoint an attempt resumes from: the newer of Ray Train's latest registered one and the
    runner's ``hint`` (``{"step", "dir"}``: the last checkpoint the loop told the runner was whole).

    They differ after a forced stop: the loop reported a checkpoint, every rank persisted it, and the stop
    came before Ray Train's controller polled the report and registered it. Ray Train would resume from the
    one before and lose the steps in between; the files are in the run's storage, so the attempt takes them.
    """
    if not hint or not hint.get("dir"):
        return registered
    registered_step = checkpoint_step_of(registered.path) if registered is not None else None
    if registered is not None and (registered_step is None or registered_step >= int(hint["step"])):
        return registered
    storage = ctx.get_storage()
    path = f"{storage.experiment_fs_path.rstrip('/')}/{hint['dir']}"
    info = storage.storage_filesystem.get_file_info(f"{path}/{STATE_FILE}")
    if info.type == pyarrow.fs.FileType.NotFound:
        logger.warning("the runner's checkpoint %s is not in storage; resuming from %s", path, registered and registered.path)
        return registered
    return ray.train.Checkpoint(path=path, filesystem=storage.storage_filesystem)


# ------------------------------------------------------------------------------------------ pieces


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample: ``[b, C]`` vs ``[b]`` (classes) or ``[b, T, V]`` vs ``[b, T]`` (tokens,
    averaged over the sequence)."""
    c = logits.shape[-1]
    losses = nn.functional.cross_entropy(logits.reshape(-1, c).float(), targets.reshape(-1), reduction="none")
    return losses.view(targets.shape[0], -1).mean(dim=1)


def build_model(spec: JobSpec) -> nn.Module:
    # The same seed on every worker and every attempt: DDP broadcasts rank 0's weights anyway, but a run
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


class _Poller:
    """Rank 0's non-blocking view of the signal actor: never waits for it.

    Two calls at most in flight: a ``poll`` (progress in, "yield?" out, sent once a step) and a
    ``wait_yield`` the actor answers the moment a yield is requested (renewed when it times out), so that a
    yield is seen at the first step boundary after the request, not one step later.
    """

    WAIT_S = 5.0

    def __init__(self, handle: Any, attempt: int) -> None:
        self.handle = handle
        self.attempt = attempt
        self.ref: Any = None
        self.wait_ref: Any = None
        self.yield_requested = False

    def yield_flag(self) -> bool:
        if self.wait_ref is None and not self.yield_requested:
            self.wait_ref = self.handle.wait_yield.remote(self.attempt, self.WAIT_S)
        refs = [r for r in (self.ref, self.wait_ref) if r is not None]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for r in ready:
            is_poll = r is self.ref
            try:
                answer = ray.get(r)
                self.yield_requested |= bool(answer["yield"] if is_poll else answer)
            except ray.exceptions.RayError as e:  # the runner is gone; keep training
                logger.warning("poll of the job's signal actor failed: %s", e)
            if is_poll:
                self.ref = None
            else:
                self.wait_ref = None
        return self.yield_requested

    def send(self, progress: dict[str, Any]) -> None:
        if self.ref is None:
            self.ref = self.handle.poll.remote(self.attempt, progress)


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
    """Ray Train's per-worker function. ``config`` comes from ``tidal.training.runner`` (see ``_loop_config``)."""
    spec = JobSpec.model_validate(config["spec"])
    attempt: int = config["attempt"]
    if spec.cpu_niceness:
        # Ray Train reuses no worker process across attempts, so this raises each process's niceness once.
        os.nice(spec.cpu_niceness)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
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
    checkpoint = resume_checkpoint(ray.train.get_checkpoint(), config.get("resume"), ctx)
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
        logger.info("attempt %d rank %d/%d resumed at step %d", attempt, rank, world, step)
    else:
        seed_rng(spec.seed, 0, rank)

    ddp = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    comm_device = device if use_cuda else torch.device("cpu")
    poller = None
    if rank == 0:
        poller = _Poller(ray.get_actor(config["signal_name"], namespace=config["namespace"]), attempt)
    B = spec.global_batch_size
    step_times: deque[float] = deque(maxlen=20)
    last_ckpt_mono = time.monotonic()
    last_ckpt_step = step
    base_metrics = {
        "num_workers": world,
        "gpu_type": config["gpu_type"],
        "attempt": attempt,
        "restarts": config["restarts"],
        "steps_lost": config["steps_lost"],
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

        # One all-reduce per step: [sum of losses, yield?, checkpoint now?] (flags from rank 0 only).
        flags = torch.zeros(3, dtype=torch.float64, device=comm_device)
        flags[0] = loss_sum.to(comm_device)
        if poller is not None:
            asked = poller.yield_flag()
            flags[1] = float(asked and not spec.fault_injection.ignore_yield)
            flags[2] = float(time.monotonic() - last_ckpt_mono >= spec.checkpoint_period_s)
        dist.all_reduce(flags)
        loss = flags[0].item() / B
        step += 1
        history.append([step, loss])
        step_times.append(time.monotonic() - t0)

        done = step >= total_steps
        yield_now = flags[1].item() > 0 and not done
        every = spec.checkpoint_every_steps
        save_now = done or yield_now or flags[2].item() > 0 or bool(every and step % every == 0)
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
            ckpt_dir = _save_and_report(metrics, rank, model, optimizer, scheduler, step, history, data, attempt)
            # Every rank has persisted its files once this returns (each uploads before its next collective):
            # only then may rank 0 tell the runner that the checkpoint is whole.
            dist.all_reduce(torch.zeros(1, device=comm_device))
            last_ckpt_mono, last_ckpt_step = time.monotonic(), step
        elif step % spec.report_every_steps == 0:
            ray.train.report(metrics)
        if poller is not None:
            poller.send({**metrics, "last_checkpoint_step": last_ckpt_step, "checkpoint_age_s": time.monotonic() - last_ckpt_mono})
            if yield_now:
                # The checkpoint is whole on every rank: the signal actor removes this worker group's
                # placement group at once (the GPUs are free in ~0.1 s, not after Ray Train's next health
                # check and graceful teardown), which ends this process too.
                ray.get(poller.handle.ack_yield.remote(attempt, step, ckpt_dir, ray.util.get_current_placement_group()))
            elif save_now:
                poller.handle.checkpointed.remote(attempt, step, ckpt_dir)
        if yield_now:
            logger.info("attempt %d rank %d yielded at step %d", attempt, rank, step)
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
    attempt: int,
) -> str:
    """Every worker writes its RNG state; rank 0 adds model, optimiser, schedule, step and history.
    Ray Train merges the workers' files into one checkpoint directory under the run's storage path, whose
    name (under the run's directory) this returns."""
    dir_name = checkpoint_dir_name(step, attempt)
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
                "attempt": attempt,
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
