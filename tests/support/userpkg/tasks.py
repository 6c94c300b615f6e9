"""The user's task: a Huber loss per sample, with two metrics of their own."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def huber(outputs: torch.Tensor, targets: torch.Tensor):
    predictions = outputs.reshape(-1).float()
    targets = targets.reshape(-1).float()
    losses = F.huber_loss(predictions, targets, reduction="none", delta=0.5)
    error = (predictions - targets).abs()
    return losses, {"abs_error": error, "within_quarter": (error < 0.25).float()}
