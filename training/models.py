"""Model classes that Tidal's example jobs train and its serving deployments load.

A checkpoint's manifest names its model class as ``module:attr`` plus constructor kwargs, so any torch
``nn.Module`` importable on the cluster can be trained and served the same way.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsMLP(nn.Module):
    """A small classifier for scikit-learn's 8x8 digits (64 features in [0, 16], 10 classes)."""

    def __init__(self, in_features: int = 64, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
