"""The small models trained from scratch: the classic tutorial CNN and an MLP."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv-ReLU-pool blocks and a linear head, sized for the input image (8x8 digits up to 32x32)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, dropout: float = 0.0,
                 width: int = 128):
        super().__init__()
        blocks = 2 if image_size >= 8 else 1
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for out_channels in (32, 64)[:blocks]:
            layers += [nn.Conv2d(channels, out_channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels, size = out_channels, size // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, width), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
