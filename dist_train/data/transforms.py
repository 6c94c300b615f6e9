"""Image preprocessing, recorded once and rebuilt from the record.

Every built-in image data set describes its evaluation preprocessing as a plain JSON
record (`preprocessing_record`): colour mode, resize, centre crop, mean/std, image size,
channels and class names. The data set's own validation transform is built from that
record (`eval_transform`), the record goes into every manifest (`data_info.preprocessing`)
and every export's sidecar, and `predict` rebuilds the transform from it. So what a
deployment reproduces is, by construction, what validation did, and predicting needs
the checkpoint alone, not the training data.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TORCHVISION_STATS = {"mnist": ((0.1307,), (0.3081,)), "fashion_mnist": ((0.2860,), (0.3530,)),
                     "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}
RECORD_VERSION = 1


def preprocessing_record(mode: str, image_size: int, mean: Sequence[float], std: Sequence[float],
                         resize: int | Sequence[int] | None, center_crop: int | None,
                         class_names: Sequence[str] | None, note: str | None = None) -> dict[str, Any]:
    """What turns an image file into the model's input, in order: convert to `image_mode`, resize
    (an int: the shorter side, aspect kept; [h, w]: exactly), centre crop, scale to [0, 1], normalise."""
    record: dict[str, Any] = {
        "version": RECORD_VERSION, "input": "image", "image_mode": mode, "channels": 1 if mode == "L" else 3,
        "image_size": int(image_size),
        "resize": list(resize) if isinstance(resize, (list, tuple)) else resize,
        "center_crop": center_crop, "interpolation": "bilinear", "scale": "1/255",
        "mean": [float(v) for v in mean], "std": [float(v) for v in std],
        "class_names": list(class_names) if class_names is not None else None,
    }
    record["torchvision"] = describe(record)
    if note:
        record["note"] = note
    return record


def tensor_record(shape: Sequence[int], class_names: Sequence[str] | None, note: str) -> dict[str, Any]:
    """Data sets of ready-made tensors: nothing to reproduce from image files."""
    return {"version": RECORD_VERSION, "input": "tensor", "shape": [int(v) for v in shape],
            "channels": int(shape[0]), "class_names": list(class_names) if class_names is not None else None,
            "note": note}


def describe(record: dict[str, Any]) -> str:
    """The record as the torchvision code a tutorial user would write."""
    steps = []
    if record.get("resize") is not None:
        resize = record["resize"]
        steps.append(f"Resize({tuple(resize) if isinstance(resize, list) else resize})")
    if record.get("center_crop") is not None:
        steps.append(f"CenterCrop({record['center_crop']})")
    steps += ["ToTensor()", f"Normalize({tuple(record['mean'])}, {tuple(record['std'])})"]
    return f"image.convert({record['image_mode']!r}) -> Compose([{', '.join(steps)}])"


class ConvertMode:
    """PIL image -> the colour mode the model was trained on (a class, so DataLoader workers can pickle it)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image):
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


class EvalTransform:
    """The evaluation transform a record describes: PIL image (any mode and size) -> normalised tensor.

    Built on first use: every built-in data set carries one (for predict on user images), and
    building it imports torchvision (and with it torch._dynamo), seconds of CPU a training rank
    that never sees a PIL image should not pay at each start. Picklable (DataLoader workers)."""

    def __init__(self, record: dict[str, Any]):
        if record.get("input") != "image":
            raise ValueError("not an image preprocessing record")
        self.record = record
        self._transform: Callable[[Any], torch.Tensor] | None = None

    def __call__(self, image) -> torch.Tensor:
        if self._transform is None:
            self._transform = _compose_eval(self.record)
        return self._transform(image)

    def __repr__(self) -> str:
        return repr(self._transform if self._transform is not None else _compose_eval(self.record))


def eval_transform(record: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    """The evaluation transform a record describes (see `EvalTransform`)."""
    return EvalTransform(record)


def _compose_eval(record: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms as T

    steps: list = [ConvertMode(record["image_mode"])]
    resize = record.get("resize")
    if resize is not None:
        steps.append(T.Resize(tuple(resize) if isinstance(resize, list) else int(resize)))
    if record.get("center_crop") is not None:
        steps.append(T.CenterCrop(int(record["center_crop"])))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(record["mean"], record["std"])])


def train_image_transform(size: int, mean, std, augment: bool, native: int | None = None,
                          flip: bool = True) -> Callable:
    """PIL image -> normalised tensor; random resized crop and flip when augmenting."""
    from torchvision import transforms as T

    steps: list = []
    if augment:
        if native is not None and native == size:
            steps.append(T.RandomCrop(size, padding=max(2, size // 8)))
        else:
            steps.append(T.RandomResizedCrop(size, scale=(0.5, 1.0)))
        if flip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps += _resize_center(size, native)
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def _resize_center(size: int, native: int | None) -> list:
    from torchvision import transforms as T

    if native is not None and native == size:
        return []
    if native is not None:
        return [T.Resize((size, size))]
    return [T.Resize(int(round(size * 8 / 7))), T.CenterCrop(size)]


def tensor_transform(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Light augmentation for small in-memory images: a random shift of up to size/8 pixels."""
    pad = max(1, size // 8)

    def shift(image: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
        dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
        return padded[:, dy:dy + size, dx:dx + size]
    return shift
