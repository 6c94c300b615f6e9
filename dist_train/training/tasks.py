"""Tasks: what a model's outputs are scored against, as per-sample losses and metrics.

The training step and evaluation only ever ask a task for *per-sample* values; they
weight them (padding weighs zero), sum them, all-reduce the sums and divide by the
global sample count. So the loss of a step is the exact mean over the global batch
for every task, built-in or the user's.

A custom task is an import path to `fn(outputs, targets)` returning per-sample losses
(shape `[batch]`) or `(losses, {"metric": per-sample tensor, ...})`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dist_train.errors import UserError
from dist_train.plugins import Registry, call_user, is_import_path

Scores = tuple[torch.Tensor, dict[str, torch.Tensor]]


class Task:
    """Base class (and the interface) of a task."""

    name = "task"
    #: the metric shown next to the loss in logs (None: loss only)
    headline: str | None = None

    def score(self, outputs: Any, targets: Any) -> Scores:
        """Per-sample losses `[batch]` and per-sample metrics `{name: [batch]}` (float)."""
        raise NotImplementedError

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        """Metrics derived from the global means (perplexity from the mean token loss)."""
        return means

    def predicted_class(self, outputs: Any) -> torch.Tensor | None:
        """Class indices for a confusion matrix, for tasks that have classes."""
        return None

    @property
    def has_classes(self) -> bool:
        return type(self).predicted_class is not Task.predicted_class


class Classification(Task):
    name = "classification"
    headline = "accuracy"

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> Scores:
        targets = torch.as_tensor(targets, device=outputs.device)
        losses = F.cross_entropy(outputs.float(), targets, reduction="none")
        correct = (outputs.argmax(dim=1) == targets).float()
        return losses, {"accuracy": correct}

    def predicted_class(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(dim=1)


class Regression(Task):
    """Mean squared error per sample (over all non-batch dimensions); reports MSE and MAE."""
    name = "regression"
    headline = "mae"

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> Scores:
        targets = torch.as_tensor(targets, device=outputs.device, dtype=torch.float32)
        outputs = outputs.float()
        if outputs.shape != targets.shape:
            if outputs.numel() != targets.numel():
                raise UserError(f"regression: the model's outputs {tuple(outputs.shape)} do not match the "
                                f"targets {tuple(targets.shape)}")
            targets = targets.reshape(outputs.shape)
        error = (outputs - targets).reshape(outputs.shape[0], -1)
        return error.pow(2).mean(dim=1), {"mse": error.pow(2).mean(dim=1), "mae": error.abs().mean(dim=1)}


class LanguageModel(Task):
    """Next-token cross-entropy over sequences: outputs `[B, T, V]`, targets `[B, T]` token ids.

    The per-sample loss is the mean over the sequence's tokens (`ignore_index` -100 skips a
    token); perplexity is exp of the global mean loss.
    """
    name = "language_model"
    headline = "perplexity"

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> Scores:
        targets = torch.as_tensor(targets, device=outputs.device)
        vocab = outputs.shape[-1]
        tokens = F.cross_entropy(outputs.float().reshape(-1, vocab), targets.reshape(-1), reduction="none",
                                 ignore_index=-100).view(targets.shape[0], -1)
        counted = (targets.reshape(targets.shape[0], -1) != -100).float()
        losses = tokens.sum(dim=1) / counted.sum(dim=1).clamp(min=1)
        correct = ((outputs.argmax(dim=-1) == targets).float().reshape(targets.shape[0], -1) * counted).sum(dim=1) \
            / counted.sum(dim=1).clamp(min=1)
        return losses, {"token_accuracy": correct}

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        out = dict(means)
        loss = means.get("loss")
        if loss is not None and math.isfinite(loss):
            out["perplexity"] = math.exp(min(loss, 700.0))
        return out


@dataclass
class CustomTask(Task):
    """A user's `fn(outputs, targets) -> losses | (losses, metrics)`."""
    fn: Callable[..., Any]
    path: str

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.path

    def score(self, outputs: Any, targets: Any) -> Scores:
        result = call_user(self.fn, self.path, "task", outputs, targets)
        losses, metrics = (result if isinstance(result, tuple) else (result, {}))
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise UserError(f"task {self.path} must return per-sample losses of shape [batch], got {shape}")
        if not isinstance(metrics, dict) or not all(isinstance(v, torch.Tensor) and v.shape == losses.shape
                                                    for v in metrics.values()):
            raise UserError(f"task {self.path}: metrics must be a dict of per-sample tensors shaped like the losses")
        return losses, {str(k): v.float() for k, v in metrics.items()}


TASKS: Registry[type[Task]] = Registry("task")
for _task in (Classification, Regression, LanguageModel):
    TASKS.register(_task.name, _task)


def build_task(name: str | Task | Callable) -> Task:
    """A task from a registry name, an import path, a Task instance or a plain callable (Python API)."""
    if isinstance(name, Task):
        return name
    if callable(name) and not isinstance(name, str):
        from dist_train.plugins import qualified_name
        return CustomTask(name, qualified_name(name))
    entry = TASKS.resolve(name)
    if isinstance(entry, type) and issubclass(entry, Task):
        return entry()
    if is_import_path(name) and callable(entry):
        return CustomTask(entry, name)
    raise UserError(f"task {name} is not a callable")
