"""The model the demo serves: the digits classifier, plus the device time a GPU model would take.

On this machine there is no GPU: a forward pass of the tiny ``DigitsMLP`` costs microseconds of CPU, so a
single replica would absorb any spike and Serve's autoscaler would never ask for more replicas, while a
real model on a real GPU takes tens of milliseconds per batch. ``DeviceTimedMLP`` is ``DigitsMLP`` (same
weights, same outputs) whose forward, when it runs on the CPU, also waits ``device_ms_per_batch``
milliseconds, as a GPU kernel would: the replica's thread sleeps, so the CPU stays free, like the host of
a busy GPU. On CUDA it waits nothing: the real device takes its real time.

It is an ordinary torch model named in a checkpoint's manifest (``tidal.demo.model:DeviceTimedMLP``),
served by ``tidal.serving.app`` like any other. The training jobs do the same with ``step_delay_s``.
"""

from __future__ import annotations

import time

import torch
from tidal.training.models import DigitsMLP


class DeviceTimedMLP(DigitsMLP):
    """``DigitsMLP`` whose forward on the CPU also takes ``device_ms_per_batch`` ms (see the module docstring).

    Example: with ``device_ms_per_batch=80`` and Serve batching up to 8 requests, one replica answers up to
    about 100 requests/s at about 80-160 ms each.
    """

    def __init__(self, in_features: int = 64, hidden: int = 128, num_classes: int = 10, device_ms_per_batch: float = 0.0) -> None:
        if device_ms_per_batch < 0:
            raise ValueError(f"device_ms_per_batch must be >= 0, got {device_ms_per_batch}")
        super().__init__(in_features, hidden, num_classes)
        self.device_ms_per_batch = float(device_ms_per_batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.device_ms_per_batch and not x.is_cuda:
            time.sleep(self.device_ms_per_batch / 1000.0)
        return y


def train_demo_checkpoint(path: str, *, device_ms_per_batch: float, hidden: int = 128, version: str = "digits-v1") -> str:
    """Trains the digits classifier (``tidal.training.digits_checkpoint``) and writes it as a ``DeviceTimedMLP`` checkpoint."""
    from tidal.serving.manifest import load_model, write_model_checkpoint
    from tidal.training.digits_checkpoint import DIGITS_LABELS, train_digits_checkpoint

    plain = train_digits_checkpoint(f"{path}-plain", version=version, hidden=hidden)
    model = load_model(str(plain), "cpu")
    out = write_model_checkpoint(
        model,
        path,
        model_class="tidal.demo.model:DeviceTimedMLP",
        model_kwargs={"hidden": hidden, "device_ms_per_batch": device_ms_per_batch},
        version=version,
        input_shape=[64],
        labels=DIGITS_LABELS,
    )
    return str(out)
