"""Measuring a checkpoint on its run's validation or test split, on one process or under torchrun.

The numbers come from `training.evaluation.evaluate` with the task the model was
trained for: under torchrun every rank scores its shard and the sums are all-reduced,
so the result is the global one, identical to a single-process evaluation. Tasks with
classes also get per-class accuracy and a confusion matrix.
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
    if dataset is None:
        raise UserError(f"the data set of checkpoint {loaded.url} has no {split} split "
                        f"({(loaded.manifest.get('config') or {}).get('data', {}).get('dataset')}); "
                        "use --split val")
    if len(dataset) == 0:
        raise UserError(f"the {split} split of checkpoint {loaded.url}'s data set is empty")
    return evaluate(env, loaded.model, dataset, loaded.task, batch_size, loaded.spec.num_classes, num_workers)


def result_dict(loaded: LoadedModel, split: str, result: EvalResult) -> dict[str, Any]:
    out: dict[str, Any] = {"checkpoint": loaded.url, "step": loaded.step, "model": loaded.spec.name,
                           "task": loaded.task.name, "split": split, "count": result.count, "loss": result.loss,
                           **result.metrics}
    if result.confusion is not None:
        names = loaded.class_names
        out.update({"class_names": names,
                    "per_class_accuracy": dict(zip(names, result.per_class_accuracy)),
                    "per_class_count": dict(zip(names, result.confusion.sum(dim=1).tolist())),
                    "confusion": result.confusion.tolist()})
    return out


def format_result(report: dict[str, Any]) -> list[str]:
    skip = {"checkpoint", "step", "model", "task", "split", "count", "loss", "class_names", "per_class_accuracy",
            "per_class_count", "confusion"}
    metrics = "".join(f"  {k} {v:.4f}" for k, v in report.items() if k not in skip and isinstance(v, float))
    lines = [f"checkpoint {report['checkpoint']} (step {report['step']}, {report['model']}, {report['task']})",
             f"{report['split']}: {report['count']} samples  loss {report['loss']:.4f}{metrics}"]
    if "confusion" not in report:
        return lines
    names: Sequence[str] = report["class_names"]
    lines += ["", "per-class accuracy:"]
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
