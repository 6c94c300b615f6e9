"""Measuring a checkpoint on its run's validation or test split, on one process or under torchrun.

The numbers come from `training.evaluation.evaluate`, which all-reduces sums and
the confusion matrix: under torchrun every rank scores its shard and the result
is the global one, identical to a single-process evaluation.
"""

from __future__ import annotations

from typing import Any, Sequence

from dist_train.distributed.env import DistEnv
from dist_train.errors import UserError
from dist_train.inference.loading import LoadedModel
from dist_train.training.evaluation import EvalResult, evaluate

MAX_PRINTED_CLASSES = 20


def evaluate_split(env: DistEnv, loaded: LoadedModel, bundle, split: str, batch_size: int,
                   num_workers: int = 0) -> EvalResult:
    dataset = bundle.val if split == "val" else bundle.test
    if len(dataset) == 0:
        raise UserError(f"the {split} split of checkpoint {loaded.url}'s data set is empty")
    return evaluate(env, loaded.model, dataset, loaded.spec.num_classes, batch_size, num_workers)


def result_dict(loaded: LoadedModel, split: str, result: EvalResult) -> dict[str, Any]:
    names = loaded.class_names
    return {"checkpoint": loaded.url, "step": loaded.step, "model": loaded.spec.name, "split": split,
            "count": result.count, "loss": result.loss, "accuracy": result.accuracy,
            "class_names": names,
            "per_class_accuracy": dict(zip(names, result.per_class_accuracy)),
            "per_class_count": dict(zip(names, result.confusion.sum(dim=1).tolist())),
            "confusion": result.confusion.tolist()}


def format_result(report: dict[str, Any]) -> list[str]:
    names: Sequence[str] = report["class_names"]
    lines = [f"checkpoint {report['checkpoint']} (step {report['step']}, {report['model']})",
             f"{report['split']}: {report['count']} samples  loss {report['loss']:.4f}  "
             f"accuracy {report['accuracy']:.4f}", "", "per-class accuracy:"]
    width = max(5, *(len(n) for n in names))
    for name in names:
        acc = report["per_class_accuracy"][name]
        shown = "   n/a" if acc is None else f"{acc:6.4f}"
        lines.append(f"  {name:>{width}}  {shown}  ({report['per_class_count'][name]} samples)")
    lines.append("")
    if len(names) > MAX_PRINTED_CLASSES:
        lines.append(f"confusion matrix: {len(names)} classes, too many to print (use --json)")
        return lines
    matrix = report["confusion"]
    cell = max(4, max(len(str(v)) for row in matrix for v in row) + 1, *(len(n) + 1 for n in names))
    lines.append("confusion matrix (rows: true class, columns: predicted):")
    lines.append(" " * (width + 2) + "".join(f"{n:>{cell}}" for n in names))
    for name, row in zip(names, matrix):
        lines.append(f"  {name:>{width}}" + "".join(f"{v:>{cell}}" for v in row))
    return lines
