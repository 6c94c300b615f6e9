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
from dist_train.training.metrics import MetricSums
from dist_train.training.tasks import Task


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
    loader = eval_loader(dataset, batch_size, env.world_size, env.rank, num_workers, device.type == "cuda")
    for inputs, targets in loader:
        inputs, targets = to_device(inputs, device), to_device(targets, device)
        with autocast(device, amp):
            outputs = model(inputs)
        losses, metrics = task.score(outputs, targets)
        sums.add(losses, metrics, torch.ones_like(losses, dtype=torch.float32))
        if classes:
            labels = torch.as_tensor(targets, device=device)
            confusion += torch.bincount(labels * classes + task.predicted_class(outputs),
                                        minlength=classes * classes).double()
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
