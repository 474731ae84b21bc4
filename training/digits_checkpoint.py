"""A default model checkpoint for serving's tests, benchmarks and the demo (torch + scikit-learn, no Ray).

The real checkpoints come from the training jobs (``python -m tidal.training.run``); this trains the same
``DigitsMLP`` on scikit-learn's 8x8 digits for a few epochs on the CPU (about a second) and writes it with
the checkpoint writer serving reads (``tidal.serving.manifest``), so serving can be exercised without
running a training job first.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from tidal.serving.manifest import write_model_checkpoint
from tidal.training.models import DigitsMLP
from torch import nn

logger = logging.getLogger(__name__)

DIGITS_MODEL_CLASS = "tidal.training.models:DigitsMLP"
DIGITS_LABELS = [str(i) for i in range(10)]


def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits: 1797 instances of 64 pixel values in [0, 16], and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def train_digits_checkpoint(
    path: str | os.PathLike,
    *,
    version: str = "digits-v1",
    epochs: int = 5,
    hidden: int = 128,
    seed: int = 0,
) -> Path:
    """Train a ``DigitsMLP`` for ``epochs`` and write it to ``path``; returns the checkpoint directory.

    Inputs are the raw pixel values (0..16), as a client would send them; the model learns the scale.
    """
    torch.manual_seed(seed)
    x, y = digits_data()
    model = DigitsMLP(hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    logger.info("trained DigitsMLP: %d epochs, train accuracy %.3f", epochs, accuracy)
    return write_model_checkpoint(
        model,
        path,
        model_class=DIGITS_MODEL_CLASS,
        model_kwargs={"hidden": hidden},
        version=version,
        input_shape=[64],
        labels=DIGITS_LABELS,
        metrics={"train_accuracy": accuracy, "epochs": epochs, "final_loss": float(loss.detach())},
    )
