"""One dry batch before the run dir is claimed: the user's data, model and task checked together.

Errors in the user's code that only show when data meets model meets task (a data set of
strings, float targets scored as classes, class ids beyond the model's outputs, a task
returning 31 losses for 32 samples) would otherwise surface inside the training loop, after
`config.yaml`, `_attempts/` and `metrics.jsonl` were written. So before the claim every rank
runs the model and the task on the same first batch of the validation split (the training
split when there is none): the model in eval mode under `no_grad`, no optimizer step, and
every RNG state captured before and restored after, so neither determinism nor a bit-exact
resume can tell the check happened. Any problem is a one-line `UserError` naming the task,
the model or the data set, and what was expected.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from dist_train.determinism import capture_rng_state, restore_rng_state
from dist_train.errors import UserError
from dist_train.plugins import brief
from dist_train.training.tasks import Classification, LanguageModel, Regression, Task

IGNORE_INDEX = -100  # cross_entropy's default: a target that is not scored


def dry_batch(model: nn.Module, task: Task, dataset: Dataset, batch_size: int, device: torch.device,
              model_name: str, data_name: str, autocast=None) -> None:
    """Run `model` and `task` on the dataset's first batch; a UserError when they do not fit."""
    if dataset is None or len(dataset) == 0:
        return
    rng = capture_rng_state()
    was_training = model.training
    try:
        samples = [dataset[i] for i in range(min(batch_size, len(dataset)))]
        inputs, targets = _collate(samples, data_name)
        model.eval()
        with torch.no_grad():
            inputs_d = _to(inputs, device)
            try:
                with (autocast if autocast is not None else _null()):
                    outputs = model(inputs_d)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - the user's model failed on a real batch
                raise UserError(f"model {model_name} failed on a batch of inputs {describe(inputs)} from data set "
                                f"{data_name}: {brief(exc)}") from None
            check_targets(task, outputs, _to(targets, device), len(samples))
    finally:
        model.train(was_training)
        restore_rng_state(rng)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _to(value: Any, device: torch.device) -> Any:
    from dist_train.data.loader import to_device
    return to_device(value, device)


def describe(value: Any) -> str:
    """A short type description: `Tensor[32, 8] float32`, `str`, `tuple(Tensor[3] int64, float)`."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe(v) for v in value[:3]) + (", ..." if len(value) > 3 else "")
        return f"{type(value).__name__}({inner})"
    if isinstance(value, dict):
        return "dict(" + ", ".join(f"{k}: {describe(v)}" for k, v in list(value.items())[:3]) + ")"
    return type(value).__name__


def _tensor_leaves(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return len(value) > 0 and all(_tensor_leaves(v) for v in value)
    if isinstance(value, dict):
        return len(value) > 0 and all(_tensor_leaves(v) for v in value.values())
    return False


def _collate(samples: list, data_name: str) -> tuple[Any, Any]:
    """The batch as the training loader builds it; a UserError saying what a sample held otherwise."""
    first = samples[0]
    if not isinstance(first, (tuple, list)) or len(first) != 2:
        raise UserError(f"data set {data_name} must yield (input, target) pairs, sample 0 is {describe(first)}")
    shown = f"input {describe(first[0])}, target {describe(first[1])}"
    expected = ("expected an input Tensor (or numpy array; tuples/dicts of them for several inputs) and a target "
                "Tensor, int or float")
    try:
        inputs, targets = default_collate([(x, y) for x, y in samples])
    except Exception as exc:  # noqa: BLE001 - samples of mixed shapes or types
        raise UserError(f"data set {data_name}: samples cannot be batched ({shown}; {expected}): "
                        f"{brief(exc)}") from None
    if not _tensor_leaves(inputs) or not isinstance(targets, torch.Tensor):
        raise UserError(f"data set {data_name} yields samples of {shown}: {expected}")
    return inputs, targets


def check_targets(task: Task, outputs: Any, targets: torch.Tensor, batch: int) -> None:
    """The checks of the built-in tasks on one batch, then the task itself must score it."""
    if isinstance(task, Classification):
        _check_classes(task, outputs, targets, batch, sequence=False)
    elif isinstance(task, LanguageModel):
        _check_classes(task, outputs, targets, batch, sequence=True)
    elif isinstance(task, Regression):
        if targets.dtype == torch.bool or targets.is_complex():
            raise UserError(f"task regression needs numeric targets, the data set's are {describe(targets)}")
    try:
        scored = task.score(outputs, targets)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the task cannot score this batch: say what met what
        raise UserError(f"task {task.name} cannot score the model's outputs {describe(outputs)} against the "
                        f"targets {describe(targets)}: {brief(exc)}") from None
    losses, metrics = scored
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (batch,):
        got = list(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise UserError(f"task {task.name} returned losses of shape {got} for a batch of {batch}: "
                        f"one loss per sample (shape [{batch}]) is needed")
    for name, value in metrics.items():
        if tuple(value.shape) != (batch,):
            raise UserError(f"task {task.name}: metric {name!r} has shape {list(value.shape)} for a batch of "
                            f"{batch}: one value per sample is needed")


def _check_classes(task: Task, outputs: Any, targets: torch.Tensor, batch: int, sequence: bool) -> None:
    name = task.name
    if targets.is_floating_point() or targets.dtype == torch.bool:
        hint = "; for real-valued targets use --task regression" if not sequence else ""
        raise UserError(f"task {name} needs integer class ids as targets, the data set's are "
                        f"{describe(targets)} (e.g. {targets.flatten()[0].item():g}){hint}")
    if not isinstance(outputs, torch.Tensor):
        raise UserError(f"task {name} needs the model to return a Tensor of scores, it returned {describe(outputs)}")
    want = 3 if sequence else 2
    if outputs.dim() != want:
        shape = "[batch, time, vocab]" if sequence else "[batch, classes]"
        raise UserError(f"task {name} needs model outputs shaped {shape}, the model returned {describe(outputs)}")
    expected = tuple(outputs.shape[:-1])
    if tuple(targets.shape) != expected:
        raise UserError(f"task {name}: targets {describe(targets)} do not match the model's outputs "
                        f"{describe(outputs)} (targets of shape {list(expected)} expected)")
    classes = outputs.shape[-1]
    scored = targets[targets != IGNORE_INDEX]
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= classes):
        bad = int(scored.max()) if int(scored.max()) >= classes else int(scored.min())
        what = "token id" if sequence else "class id"
        raise UserError(f"task {name}: {what} {bad} in the targets is out of range for a model with {classes} "
                        f"outputs (ids 0..{classes - 1})")


def refuse_builtin_only_flags(cfg, model_name: str) -> None:
    """`--width`/`--dropout` shape the built-in cnn/mlp only: given with the user's model they would be
    ignored silently, so they are refused (the user's factory takes its own `--model-args`)."""
    from dist_train.models.config import ModelConfig

    defaults = ModelConfig()
    for key in ("width", "dropout"):
        value = getattr(cfg.model, key)
        if value != getattr(defaults, key):
            raise UserError(f"--{key} {value} applies to the built-in cnn and mlp only, not to your model "
                            f"{model_name}: pass it to your factory in --model-args (e.g. '{{\"{key}\": {value}}}')")
