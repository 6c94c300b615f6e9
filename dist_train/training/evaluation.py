"""Loss, accuracy and a confusion matrix over a whole split, exact across ranks.

Each rank evaluates its shard with the unwrapped model (no DDP collectives per
batch, so uneven shards are fine); the sums and the confusion matrix are then
all-reduced, so the numbers are the true global ones, not rank 0's shard.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dist_train.data.loader import eval_loader
from dist_train.distributed.env import DistEnv


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    count: int
    confusion: torch.Tensor  # [true class, predicted class] counts

    @property
    def per_class_accuracy(self) -> list[float | None]:
        totals = self.confusion.sum(dim=1)
        return [float(self.confusion[i, i] / totals[i]) if totals[i] > 0 else None for i in range(len(totals))]


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(env: DistEnv, model: nn.Module, dataset: Dataset, num_classes: int, batch_size: int,
             num_workers: int = 0, amp: bool = False) -> EvalResult:
    was_training = model.training
    model.eval()
    device = env.device
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    loader = eval_loader(dataset, batch_size, env.world_size, env.rank, num_workers, device.type == "cuda")
    for inputs, labels in loader:
        inputs = inputs.to(device, non_blocking=True)
        labels = torch.as_tensor(labels).to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(inputs)
        sums[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        sums[1] += labels.numel()
        confusion += torch.bincount(labels * num_classes + logits.argmax(dim=1),
                                    minlength=num_classes * num_classes).double()
    model.train(was_training)
    reduced = torch.cat([sums, confusion]).to(env.collective_device)
    if env.distributed:
        torch.distributed.all_reduce(reduced)
    loss_sum, count = reduced[0].item(), int(reduced[1].item())
    matrix = reduced[2:].view(num_classes, num_classes).cpu().long()
    correct = int(matrix.diag().sum())
    if count == 0:
        return EvalResult(float("nan"), float("nan"), 0, matrix)
    return EvalResult(loss_sum / count, correct / count, count, matrix)
