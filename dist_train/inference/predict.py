"""Top-k predictions for the user's image files, or for samples of the run's own validation split.

Files go through the preprocessing recorded in the checkpoint (`data_info.preprocessing`:
colour mode, resize, crop, mean/std), the same that built validation's transform, so
predicting needs the checkpoint alone, not the training data. Checkpoints written before
the record existed get it rebuilt from their config (built-in data sets) or, for a user's
data set, from its `eval_transform` (which needs the data set importable).

A file named twice (by name and through its folder) is predicted once. An image that
cannot be decoded is reported and the others are still predicted (`Failure`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils.data import Dataset

from dist_train.data.datasets import UnreadableImage, builtin_record, read_image
from dist_train.data.transforms import eval_transform
from dist_train.errors import UserError
from dist_train.inference.loading import LoadedModel

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


@dataclass
class Prediction:
    source: str
    top: list[tuple[int, float]] | None = None  # classification: (class, probability), most probable first
    label: Any = None                           # the true target, for samples of the data set
    values: list[float] | None = None           # other tasks: the model's outputs (regression values)
    loss: float | None = None                   # other tasks, samples: the task's loss of the sample

    def as_dict(self, class_names: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"input": self.source}
        if self.top is not None:
            out["top_k"] = [{"class": c, "name": _name(class_names, c), "probability": p} for c, p in self.top]
            if self.label is not None:
                out.update({"label": self.label, "label_name": _name(class_names, self.label),
                            "correct": self.top[0][0] == self.label})
            return out
        out.update({"values": self.values, "target": self.label, "loss": self.loss})
        return out


def _name(class_names: Sequence[str], index: int) -> str:
    return class_names[index] if 0 <= index < len(class_names) else str(index)


@torch.no_grad()
def top_k(model: torch.nn.Module, inputs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Softmax probabilities of the k most likely classes per input, sorted, highest first."""
    logits = model(inputs)
    probabilities = torch.softmax(logits.double(), dim=1)
    values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1, sorted=True)
    return [[(int(c), float(p)) for c, p in zip(row_i, row_v)] for row_i, row_v in zip(indices, values)]


def find_images(paths: Iterable[str]) -> list[str]:
    """Files as given (any extension), folders walked recursively for image files, in sorted order;
    each file once, however often it is named (by name, through its folder, through a link)."""
    found: list[str] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            found.append(path)

    for path in paths:
        if os.path.isdir(path):
            inside = []
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                inside += [os.path.join(root, f) for f in sorted(files)
                           if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
            if not inside:
                raise UserError(f"no image files in folder {path}")
            for file in inside:
                add(file)
        elif os.path.isfile(path):
            add(path)
        else:
            raise UserError(f"input not found: {path}")
    return found


@dataclass
class Failure:
    source: str
    reason: str  # one line: "cannot read image PATH: why"


def preprocessing_of(loaded: LoadedModel) -> dict[str, Any] | None:
    """The checkpoint's preprocessing record (or one rebuilt for an older checkpoint of a built-in data set)."""
    manifest = loaded.manifest
    info = manifest.get("data_info") if isinstance(manifest.get("data_info"), dict) else {}
    record = info.get("preprocessing")
    if isinstance(record, dict) and record.get("input") in ("image", "tensor"):
        return record
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    dataset = (config.get("data") or {}).get("dataset") if isinstance(config.get("data"), dict) else None
    return builtin_record(dataset, info, loaded.spec.shape, loaded.class_names) if isinstance(dataset, str) else None


@dataclass
class FileInputs:
    """How an image file becomes the model's input: Pillow's colour mode, then the transform."""
    mode: str
    transform: Callable[[Any], torch.Tensor]


def file_inputs(loaded: LoadedModel, rebuild: Callable[[], Any]) -> FileInputs:
    """From the recorded preprocessing; `rebuild()` (the data set, for its eval_transform) only without one."""
    record = preprocessing_of(loaded)
    if record is not None and record.get("input") == "image":
        return FileInputs(record["image_mode"], eval_transform(record))
    transform = rebuild().eval_transform if record is None else None
    if transform is None:
        raise UserError(f"the data set of checkpoint {loaded.url} has no image preprocessing; "
                        "run predict without inputs to see validation samples")
    return FileInputs("L" if loaded.spec.in_channels == 1 else "RGB", transform)


def load_image(path: str, inputs: FileInputs) -> torch.Tensor:
    """One image file as the model's input tensor; an undecodable file raises UnreadableImage."""
    return inputs.transform(read_image(path, inputs.mode))


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def predict_files(loaded: LoadedModel, files: Sequence[str], inputs: FileInputs, k: int,
                  batch_size: int = 64) -> tuple[list[Prediction], list[Failure]]:
    """Predictions of the readable files (in order) and the files that could not be read."""
    out: list[Prediction] = []
    failures: list[Failure] = []
    for chunk in _batches(files, batch_size):
        tensors, readable = [], []
        for path in chunk:
            try:
                tensors.append(load_image(path, inputs))
                readable.append(path)
            except UnreadableImage as exc:
                failures.append(Failure(path, str(exc)))
        if not tensors:
            continue
        for path, top in zip(readable, top_k(loaded.model, torch.stack(tensors).to(loaded.device), k)):
            out.append(Prediction(path, top))
    return out, failures


@torch.no_grad()
def predict_tensors(loaded: LoadedModel, sources: Sequence[str], batches: Sequence[torch.Tensor],
                    k: int) -> list[Prediction]:
    """Predictions of ready-made input batches (tensor files): classes for a task with them, else values."""
    out: list[Prediction] = []
    for source, batch in zip(sources, batches):
        inputs = batch.to(loaded.device)
        if inputs.is_floating_point():
            inputs = inputs.float()
        names = [source] if len(batch) == 1 else [f"{source}[{i}]" for i in range(len(batch))]
        try:
            if loaded.task.has_classes:
                out += [Prediction(name, top) for name, top in zip(names, top_k(loaded.model, inputs, k))]
                continue
            outputs = loaded.model(inputs)
        except RuntimeError as exc:  # a tensor of another shape than the model takes
            raise UserError(f"input {source} of shape {list(batch.shape)} does not fit model {loaded.spec.name}: "
                            f"{' '.join(str(exc).split())[:200]}") from None
        out += [Prediction(name, values=_flat(outputs[row])) for row, name in enumerate(names)]
    return out


def describe_task(loaded: LoadedModel) -> str:
    """What the header line says the model predicts: its classes, values, or next tokens."""
    task = loaded.task
    if task.name == "language_model":
        return f"language model, vocabulary of {loaded.spec.num_classes or '?'} tokens"
    if task.has_classes:
        return f"{len(loaded.class_names)} classes"
    return task.name


def predict_samples(loaded: LoadedModel, dataset: Dataset, count: int, k: int, split: str = "val",
                    batch_size: int = 64) -> list[Prediction]:
    """The first `count` samples of a split, with their true targets (the task decides what is shown)."""
    from torch.utils.data import default_collate

    indices = list(range(min(count, len(dataset))))
    task = loaded.task
    out: list[Prediction] = []
    for chunk in _batches(indices, batch_size):
        samples = [dataset[i] for i in chunk]
        inputs, targets = default_collate(samples)
        inputs = inputs.to(loaded.device)
        if task.has_classes:
            for i, (_, label), top in zip(chunk, samples, top_k(loaded.model, inputs, k)):
                out.append(Prediction(f"{split}[{i}]", top, int(label)))
            continue
        with torch.no_grad():
            outputs = loaded.model(inputs)
            losses, _ = task.score(outputs, torch.as_tensor(targets).to(loaded.device))
        for row, (i, (_, target)) in enumerate(zip(chunk, samples)):
            out.append(Prediction(f"{split}[{i}]", values=_flat(outputs[row]), label=_plain(target),
                                  loss=float(losses[row])))
    return out


def _flat(tensor: torch.Tensor, limit: int = 8) -> list[float]:
    values = tensor.detach().float().reshape(-1).tolist()
    return values[:limit]


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _flat(value) if value.numel() > 1 else float(value)
    return value


def format_predictions(predictions: Sequence[Prediction], class_names: Sequence[str]) -> list[str]:
    """One line per input: `source  ->  name: probability ...` (with the true label for samples)."""
    lines = []
    for pred in predictions:
        if pred.top is None:
            shown = ", ".join(f"{v:.4g}" for v in pred.values or [])
            target = (", ".join(f"{v:.4g}" for v in pred.label) if isinstance(pred.label, list)
                      else f"{pred.label:.4g}" if isinstance(pred.label, float) else pred.label)
            lines.append(f"{pred.source}  ->  {shown}" + (f"   (target {target}, loss {pred.loss:.4g})"
                                                         if pred.loss is not None else ""))
            continue
        source = pred.source
        if pred.label is not None:
            verdict = "ok" if pred.top[0][0] == pred.label else "WRONG"
            source += f" (true {_name(class_names, pred.label)}, {verdict})"
        ranked = "   ".join(f"{_name(class_names, c)}: {p:.4f}" for c, p in pred.top)
        lines.append(f"{source}  ->  {ranked}")
    return lines
