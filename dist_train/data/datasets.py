"""The built-in data sets, each split deterministically into train / val / test.

`digits` (the default) is scikit-learn's real 8x8 handwritten digits, which ship with
the package: no download, no data root. torchvision data sets are read from
`--data-root` and downloaded only with an explicit `--download`. A user's own data set
comes through `data/registry.py` and ends up in the same `DataBundle`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from dist_train.data.config import DataConfig
from dist_train.data.transforms import (IMAGENET_STATS, TORCHVISION_STATS, eval_transform, preprocessing_record,
                                        tensor_record, tensor_transform, train_image_transform)
from dist_train.errors import LocalUserError, UserError, printable
from dist_train.determinism import generator


@dataclass
class DataBundle:
    """The splits of a job's data and what the data set reports about its shape.

    `test` is None when the data set has no test split (evaluate refuses `--split test`
    rather than scoring another split under that name). Shape fields are None when a
    user's data set does not report them; the model factory then does not get them.
    """
    train: Dataset
    val: Dataset
    test: Dataset | None
    num_classes: int | None
    in_channels: int | None
    image_size: int | None
    class_names: list[str] | None
    eval_transform: Callable[[Any], torch.Tensor] | None = None  # for predict on user images
    info: dict[str, Any] = field(default_factory=dict)  # into every manifest (data_info); built-ins put their
    #                                                    preprocessing record under "preprocessing"

    def shape(self) -> dict[str, Any]:
        """What a model factory may be told: num_classes, in_channels, image_size (those known)."""
        values = {"num_classes": self.num_classes, "in_channels": self.in_channels, "image_size": self.image_size}
        return {k: v for k, v in values.items() if v is not None}


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[list[int], list[int], list[int]]:
    """A seeded permutation cut into (train, val, test): the same for every rank and run."""
    order = torch.randperm(n, generator=generator(seed, "split")).tolist()
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    return order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test]


class TensorImages(Dataset):
    """In-memory images (N, C, H, W) and labels, with an optional per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: Sequence[int],
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.images, self.labels = images, labels
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        image = self.images[j]
        return (self.transform(image) if self.transform else image), int(self.labels[j])


class Subset(Dataset):
    """A view of some indices of a data set, with its own transform (train and val differ)."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable | None = None):
        self.base, self.indices, self.transform = base, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.base[self.indices[i]]
        return (self.transform(image) if self.transform else image), int(label)


class SyntheticImages(Dataset):
    """Learnable random images of any shape: class prototypes plus per-sample noise, made on demand."""

    def __init__(self, size: int, shape: tuple[int, int, int], num_classes: int, seed: int, offset: int = 0):
        self.size, self.shape, self.num_classes, self.seed, self.offset = size, shape, num_classes, seed, offset
        self.prototypes = torch.randn((num_classes, *shape), generator=generator(seed, "prototypes"))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        gen = generator(self.seed, "synthetic", self.offset + i)
        label = int(torch.randint(self.num_classes, (1,), generator=gen))
        return self.prototypes[label] + 0.5 * torch.randn(self.shape, generator=gen), label


def _resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or size == images.shape[-1]:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def _load_digits() -> tuple[Any, Any]:
    """scikit-learn's 1,797 8x8 digits as (images float64 [N, 8, 8], labels int64 [N]).

    Read straight from the CSV scikit-learn ships, without importing scikit-learn: its import
    (SciPy and all) costs every rank about two seconds of CPU at each start, a large part of a
    restart. `sklearn.datasets.load_digits` reads the same file the same way (the fallback)."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    csv = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") if spec and spec.origin else ""
    if os.path.isfile(csv):
        table = np.loadtxt(csv, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    raw = load_digits()
    return raw.images, raw.target


def digits(cfg: DataConfig, seed: int) -> DataBundle:
    raw_images, raw_labels = _load_digits()
    images = torch.tensor(raw_images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(raw_labels, dtype=torch.int64)
    train_idx, val_idx, test_idx = split_indices(len(labels), cfg.val_fraction, cfg.test_fraction, seed)
    mean, std = images[train_idx].mean().item(), images[train_idx].std().item()
    images = _resize((images - mean) / std, cfg.image_size)
    augment = tensor_transform(images.shape[-1]) if cfg.augment else None
    size = images.shape[-1]
    record = digits_record(size, mean, std)
    return DataBundle(TensorImages(images, labels, train_idx, augment), TensorImages(images, labels, val_idx),
                      TensorImages(images, labels, test_idx), 10, 1, size, record["class_names"],
                      eval_transform=eval_transform(record),
                      info={"mean": mean, "std": std, "preprocessing": record})


def synthetic(cfg: DataConfig, seed: int) -> DataBundle:
    c, h, w = (int(p) for p in cfg.synthetic_shape.split(","))
    n = cfg.synthetic_size
    n_val = max(1, int(n * cfg.val_fraction))
    n_test = max(1, int(n * cfg.test_fraction))
    n_train = n - n_val - n_test
    if n_train <= 0:
        raise UserError("synthetic_size is too small for the val/test fractions")
    k = cfg.synthetic_classes
    names = [str(i) for i in range(k)]
    record = tensor_record((c, h, w), names, "random tensors made by the data set itself; no image files")
    return DataBundle(SyntheticImages(n_train, (c, h, w), k, seed, 0),
                      SyntheticImages(n_val, (c, h, w), k, seed, n_train),
                      SyntheticImages(n_test, (c, h, w), k, seed, n_train + n_val),
                      k, c, h, names, info={"preprocessing": record})


_TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}


def torchvision_dataset(cfg: DataConfig, seed: int) -> DataBundle:
    import torchvision

    cls = getattr(torchvision.datasets, _TORCHVISION[cfg.dataset])
    try:
        if cfg.download:
            os.makedirs(cfg.data_root, exist_ok=True)
        train_base = cls(cfg.data_root, train=True, download=cfg.download)
        test_base = cls(cfg.data_root, train=False, download=cfg.download)
    except RuntimeError as exc:
        raise UserError(f"data set {cfg.dataset} not found under {cfg.data_root} ({exc}); "
                        "pass --download to fetch it") from None
    mean, std = TORCHVISION_STATS[cfg.dataset]
    native = NATIVE_SIZES[cfg.dataset]
    size = cfg.image_size or native
    classes = [str(c) for c in train_base.classes]
    record = torchvision_record(cfg.dataset, size, classes)
    train_tf = train_image_transform(size, mean, std, cfg.augment, native=native, flip=cfg.dataset == "cifar10")
    eval_tf = eval_transform(record)
    n = len(train_base)
    train_idx, val_idx, _ = split_indices(n, cfg.val_fraction, 0.0, seed)
    return DataBundle(Subset(train_base, train_idx, train_tf), Subset(train_base, val_idx, eval_tf),
                      Subset(test_base, range(len(test_base)), eval_tf), len(classes), record["channels"], size,
                      classes, eval_transform=eval_tf, info={"preprocessing": record})


def image_folder(cfg: DataConfig, seed: int) -> DataBundle:
    """One sub-folder per class; `train/` + `val/` (+ `test/`) sub-folders are used when present."""
    root = cfg.data_root
    size = cfg.image_size or 224
    mean, std = IMAGENET_STATS
    train_tf = train_image_transform(size, mean, std, cfg.augment)
    try:
        if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
            train_base = _image_folder(os.path.join(root, "train"))
            val_base = _image_folder(os.path.join(root, "val"))
            test_dir = os.path.join(root, "test")
            test_base = _image_folder(test_dir) if os.path.isdir(test_dir) else None
            if val_base.classes != train_base.classes:
                raise UserError(f"image folder {root}: train/ and val/ have different class folders")
            classes = train_base.classes
            eval_tf = eval_transform(image_folder_record(size, classes))
            train = Subset(train_base, range(len(train_base)), train_tf)
            val = Subset(val_base, range(len(val_base)), eval_tf)
            test = Subset(test_base, range(len(test_base)), eval_tf) if test_base is not None else None
        else:
            base = _image_folder(root)
            classes = base.classes
            eval_tf = eval_transform(image_folder_record(size, classes))
            train_idx, val_idx, test_idx = split_indices(len(base), cfg.val_fraction, cfg.test_fraction, seed)
            train, val, test = Subset(base, train_idx, train_tf), Subset(base, val_idx, eval_tf), \
                Subset(base, test_idx, eval_tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"image folder {root}: {exc}") from None
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"image folder {root}: too few images for a train/val split")
    return DataBundle(train, val, test, len(classes), 3, size, list(classes), eval_transform=eval_tf,
                      info={"preprocessing": image_folder_record(size, classes)})


def _image_folder(path: str):
    from torchvision.datasets import ImageFolder

    return ImageFolder(path, loader=read_image)


# -- what each built-in data set records about its preprocessing ----------------------------

NATIVE_SIZES = {"mnist": 28, "fashion_mnist": 28, "cifar10": 32}
DIGITS_NOTE = ("8x8 images of bright ink on a dark background (scikit-learn's digits); "
               "invert a scan of dark ink on white paper first")


def digits_record(size: int, mean: float, std: float) -> dict[str, Any]:
    return preprocessing_record("L", size, [mean], [std], [size, size], None, [str(d) for d in range(10)],
                                note=DIGITS_NOTE)


def torchvision_record(dataset: str, size: int, class_names: Sequence[str] | None) -> dict[str, Any]:
    mean, std = TORCHVISION_STATS[dataset]
    return preprocessing_record("RGB" if dataset == "cifar10" else "L", size, mean, std, [size, size], None,
                                class_names)


def image_folder_record(size: int, class_names: Sequence[str] | None) -> dict[str, Any]:
    """ImageNet's evaluation recipe scaled to the image size: shorter side to 8/7 of it, centre crop."""
    mean, std = IMAGENET_STATS
    return preprocessing_record("RGB", size, mean, std, int(round(size * 8 / 7)), size, class_names)


def builtin_record(dataset: str, info: dict[str, Any], shape: dict[str, Any],
                   class_names: Sequence[str] | None) -> dict[str, Any] | None:
    """The preprocessing of a checkpoint written before records existed, from what its manifest holds."""
    size = shape.get("image_size")
    if not isinstance(size, int):
        return None
    if dataset == "digits" and isinstance(info.get("mean"), (int, float)) and isinstance(info.get("std"), (int, float)):
        return digits_record(size, info["mean"], info["std"])
    if dataset in TORCHVISION_STATS:
        return torchvision_record(dataset, size, class_names)
    if dataset == "image_folder":
        return image_folder_record(size, class_names)
    return None


# -- image files ---------------------------------------------------------------------------

class UnreadableImage(LocalUserError):
    """An image file that cannot be decoded: the same again on a retry, so bad input (exit 2).

    Raised inside a DataLoader worker, torch re-raises it in the training process as
    `UnreadableImage(text)` where the text is the worker's whole traceback; the
    constructor keeps the original one-line message of its last line.
    """

    def __init__(self, message: str):
        super().__init__(_worker_message(message, type(self).__name__))


def _worker_message(message: str, name: str) -> str:
    if "Original Traceback" not in message:
        return message
    for line in reversed(message.strip().splitlines()):
        head, sep, rest = line.partition(": ")
        if sep and head.rsplit(".", 1)[-1] == name:
            return rest
    return message.strip().splitlines()[-1]


def read_image(path: str, mode: str = "RGB"):
    """A PIL image in `mode`, fully decoded (a truncated file fails here, not later in a transform)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert(mode)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        if isinstance(exc, UnidentifiedImageError):
            reason = "not an image Pillow can decode"
        elif isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        else:
            reason = printable(" ".join(str(exc).split())) or type(exc).__name__
        raise UnreadableImage(f"cannot read image {printable(path, 300)}: {reason}") from None
