"""A Hugging Face Transformers ``Trainer`` inside a Ray Train function, as Ray's docs write one (a model built
from a config, ``RayTrainReportCallback``, resume from ``ray.train.get_checkpoint()``), plus the lines marked
``# Tidal``.

    python hf_train.py --name NAME --storage DIR --steps 60
"""

import argparse
import json
import os
import time

import ray.train
import torch
import transformers
from ray.train import RunConfig, ScalingConfig
from ray.train.huggingface.transformers import RayTrainReportCallback

import tidal.train  # Tidal

VOCAB, SEQ = 64, 16


class Sequences(torch.utils.data.Dataset):
    """Token sequences that count up modulo the vocabulary from a random start: a tiny model learns them."""

    def __init__(self, n: int = 512, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.ids = (starts + torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class SlowSteps(transformers.TrainerCallback):
    """A pause per step, standing in for a real model's step time (so that the test can act while it trains)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.delay_s)


def train_func(config):
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2)
    )
    args = transformers.TrainingArguments(
        output_dir=config["output_dir"],
        max_steps=config["steps"],
        per_device_train_batch_size=config["global_batch"] // ray.train.get_context().get_world_size(),
        learning_rate=3e-3,
        logging_steps=5,
        save_strategy="steps",
        save_steps=20,
        report_to=[],
        seed=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Sequences(),
        callbacks=[
            RayTrainReportCallback(),
            tidal.train.TransformersCallback(),  # Tidal
            SlowSteps(config["step_delay_s"]),
        ],
    )
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            trainer.train(resume_from_checkpoint=os.path.join(d, RayTrainReportCallback.CHECKPOINT_NAME))
    else:
        trainer.train()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--storage", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--step-delay-s", type=float, default=0.3)
    args = p.parse_args()
    config = {
        "steps": args.steps,
        "global_batch": 16,
        "step_delay_s": args.step_delay_s,
        "output_dir": os.path.join(args.storage, "hf-output"),
    }
    trainer = tidal.train.TidalTrainer(  # Tidal (was: ray.train.torch.TorchTrainer)
        train_func,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=(1, 2), use_gpu=True),
        run_config=RunConfig(name=args.name, storage_path=args.storage),
        tidal=tidal.train.TidalConfig(gpu_types=["RTX4090"], yield_grace_s=60, resize_min_interval_s=0),  # Tidal
    )
    result = trainer.fit()
    print("RESULT", json.dumps({"metrics": result.metrics, "checkpoint": result.checkpoint.path}))


if __name__ == "__main__":
    main()
