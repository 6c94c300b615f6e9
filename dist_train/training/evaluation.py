"""Loss and metrics over a whole split, exact across ranks; a confusion matrix for classes.

Each rank evaluates its shard with the unwrapped model (no DDP collectives per
batch, so uneven shards are fine); the sums (and the confusion matrix, for tasks
with classes) are then all-reduced, so the numbers are the true global ones, not
rank 0's shard.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from dist_train.data.loader import eval_loader, to_device
from dist_train.distributed.env import DistEnv
from dist_train.distributed.parallel import is_fsdp
from dist_train.training.metrics import MetricSums
from dist_train.training.tasks import Task


class PaddedShard(Dataset):
    """Rank r's share of an evaluation split (r, r+W, ...), padded with weight-0 repeats to the same
    length on every rank: `(input, target, weight)`."""

    def __init__(self, dataset: Dataset, world_size: int, rank: int):
        self.dataset = dataset
        self.indices = list(range(rank, len(dataset), world_size))
        self.length = -(-len(dataset) // world_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        real = i < len(self.indices)
        x, y = self.dataset[self.indices[i] if real else 0]
        return x, y, float(real)


@dataclass
class EvalResult:
    loss: float
    count: int
    metrics: dict[str, float] = field(default_factory=dict)  # task metrics (summarized), without loss/count
    confusion: torch.Tensor | None = None  # [true class, predicted class] counts, for tasks with classes

    @property
    def accuracy(self) -> float | None:
        return self.metrics.get("accuracy")

    @property
    def per_class_accuracy(self) -> list[float | None]:
        if self.confusion is None:
            return []
        totals = self.confusion.sum(dim=1)
        return [float(self.confusion[i, i] / totals[i]) if totals[i] > 0 else None for i in range(len(totals))]

    def as_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, **self.metrics}


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(env: DistEnv, model: nn.Module, dataset: Dataset, task: Task, batch_size: int,
             num_classes: int | None = None, num_workers: int = 0, amp: bool = False) -> EvalResult:
    was_training = model.training
    model.eval()
    device = env.device
    sums = MetricSums(device)
    classes = num_classes if num_classes and task.has_classes else None
    confusion = torch.zeros((classes or 0) ** 2, dtype=torch.float64, device=device)
    padded = is_fsdp(model)  # FSDP's forward is collective: every rank must run the same number of batches
    source = PaddedShard(dataset, env.world_size, env.rank) if padded else dataset
    loader = eval_loader(source, batch_size, 1 if padded else env.world_size, 0 if padded else env.rank,
                         num_workers, device.type == "cuda")
    for batch in loader:
        inputs, targets = to_device(batch[0], device), to_device(batch[1], device)
        with autocast(device, amp):
            outputs = model(inputs)
        losses, metrics = task.score(outputs, targets)
        weight = batch[2].to(device=device, dtype=torch.float32) if padded \
            else torch.ones_like(losses, dtype=torch.float32)
        sums.add(losses, metrics, weight)
        if classes:
            labels = torch.as_tensor(targets, device=device)
            confusion += (torch.bincount(labels * classes + task.predicted_class(outputs), weights=weight.double(),
                                         minlength=classes * classes))
    model.train(was_training)
    means = sums.reduce(env, agree_names=True)
    matrix = None
    if classes:
        reduced = confusion.to(env.collective_device)
        if env.distributed:
            torch.distributed.all_reduce(reduced)
        matrix = reduced.view(classes, classes).cpu().long()
    loss, count = means.pop("loss"), int(means.pop("count"))
    metrics = task.summarize({"loss": loss, **means}) if count else {}
    metrics.pop("loss", None)
    return EvalResult(loss if count else math.nan, count, metrics, matrix)
