"""A Ray Train script as Ray's docs write one (own model, optimizer, DistributedSampler, prepare_model,
report with checkpoints, resume from get_checkpoint), plus the lines marked ``# Tidal``.

    python my_train.py --name NAME --storage DIR --steps 300 [--no-yield] [--no-tidal]
"""

import argparse
import json
import os
import tempfile
import time

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, RunConfig, ScalingConfig
from torch.utils.data import DataLoader, DistributedSampler
from training.model import TinyNet, make_dataset

import tidal.train  # Tidal


def train_func(config):
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.manual_seed(config["seed"])
    model = ray.train.torch.prepare_model(TinyNet())
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
        getattr(model, "module", model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    dataset = make_dataset()
    # The global batch stays the same at any size: each worker takes its share.
    loader = DataLoader(
        dataset,
        batch_size=config["global_batch"] // world,
        sampler=DistributedSampler(dataset, num_replicas=world, rank=rank, seed=config["seed"]),
    )
    loss_fn = torch.nn.MSELoss()

    def save(metrics):
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                torch.save(
                    {
                        "model": getattr(model, "module", model).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": step,
                    },
                    os.path.join(d, "state.pt"),
                )
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)

    while step < config["steps"]:
        loader.sampler.set_epoch(step)
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            step += 1
            metrics = {"step": step, "loss": loss.item(), "world_size": world}
            if rank == 0 and config.get("trace"):
                with open(config["trace"], "a") as f:
                    f.write(json.dumps({**metrics, "t": time.time()}) + "\n")
            if step % config["checkpoint_every"] == 0 or step == config["steps"]:
                save(metrics)
            elif step % config["report_every"] == 0:
                ray.train.report(metrics)
            if config["cooperative"] and tidal.train.should_yield():  # Tidal
                save(metrics)  # Tidal
                return  # Tidal
            if step == config["steps"]:
                return
            time.sleep(config["step_delay_s"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--storage", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--min-workers", type=int, default=1)
    p.add_argument("--max-workers", type=int, default=4)
    p.add_argument("--step-delay-s", type=float, default=0.05)
    p.add_argument("--no-yield", action="store_true", help="never call should_yield() (a forced stop)")
    p.add_argument("--spare-workers", type=int, default=0)
    p.add_argument("--yield-grace-s", type=float, default=20.0)
    p.add_argument("--trace", default=None, help="rank 0 appends one JSON line per step here")
    args = p.parse_args()
    config = {
        "seed": 0,
        "lr": 0.05,
        "global_batch": 64,
        "steps": args.steps,
        "checkpoint_every": 50,
        "report_every": 5,
        "step_delay_s": args.step_delay_s,
        "cooperative": not args.no_yield,
        "trace": args.trace,
    }
    trainer = tidal.train.TidalTrainer(  # Tidal (was: ray.train.torch.TorchTrainer)
        train_func,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=(args.min_workers, args.max_workers), use_gpu=True),
        run_config=RunConfig(name=args.name, storage_path=args.storage),
        tidal=tidal.train.TidalConfig(  # Tidal
            gpu_types=["H100"], yield_grace_s=args.yield_grace_s, resize_min_interval_s=0, spare_workers=args.spare_workers
        ),
    )
    result = trainer.fit()
    print("RESULT", json.dumps({"metrics": result.metrics, "checkpoint": result.checkpoint.path}))


if __name__ == "__main__":
    main()
