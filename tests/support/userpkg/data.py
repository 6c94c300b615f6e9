"""The user's data: a map-style Dataset of (features, target) pairs, the same on every process.

`USERPKG_GATE=PATH` (with `USERPKG_GATE_AFTER=N`) lets a test hold training still: once this
process has served N training samples, `__getitem__` waits while PATH exists (and says so by
creating PATH.held-PID). It changes no value, only when values are served.
"""

from __future__ import annotations

import os
import time

import torch
from torch.utils.data import Dataset

SIZES = {"train": 512, "val": 128}


def target_function(x: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear function of the features (what the model has to learn)."""
    w = torch.linspace(-1.0, 1.0, x.shape[1])
    return torch.sin(1.5 * x[:, 0]) + x @ w


class Wave(Dataset):
    def __init__(self, split: str, features: int = 8, noise: float = 0.05, seed: int = 1234):
        if split not in SIZES:
            raise ValueError(f"no {split} split")
        g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
        self.x = torch.randn(SIZES[split], features, generator=g)
        self.y = target_function(self.x) + noise * torch.randn(SIZES[split], generator=g)
        self.in_channels = features
        self.split = split
        self._served = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        if self.split == "train":
            self._served += 1
            _hold(self._served)
        return self.x[index], self.y[index]


def _hold(served: int) -> None:
    gate = os.environ.get("USERPKG_GATE")
    if not gate or served <= int(os.environ.get("USERPKG_GATE_AFTER", "0")) or not os.path.exists(gate):
        return
    open(f"{gate}.held-{os.getpid()}", "w").close()
    deadline = time.monotonic() + 120
    while os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
