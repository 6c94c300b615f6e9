"""The user's network: a small MLP regressor with dropout (so RNG state matters for exact resume)."""

from __future__ import annotations

import torch
from torch import nn


class WaveNet(nn.Module):
    def __init__(self, in_features: int, hidden: int = 32, dropout: float = 0.1):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Dropout(dropout),
                                  nn.Linear(hidden, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build(in_channels: int, hidden: int = 32, dropout: float = 0.1) -> nn.Module:
    """`in_channels` comes from the data set (its `in_channels` attribute); the rest from --model-args."""
    return WaveNet(in_channels, hidden, dropout)
