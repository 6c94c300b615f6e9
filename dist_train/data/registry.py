"""Data sets by name or import path, all ending up as one `DataBundle`.

A user's data set is `ATTR(split, **dataset_args)` for split `train`, `val` and `test`
(which may be unsupported: raise, or return None). Each must be a map-style Dataset
(`__len__`, `__getitem__`) of `(input, target)` pairs. Optional attributes tell the
model factory about the data: `classes` (names) or `num_classes`, `in_channels`,
`image_size`. Every problem is a one-line UserError naming the import path.
"""

from __future__ import annotations

from typing import Any, Callable

from torch.utils.data import Dataset

from dist_train.data import datasets as builtin
from dist_train.data.config import DataConfig
from dist_train.data.datasets import DataBundle
from dist_train.errors import UserError
from dist_train.plugins import Registry, brief, is_import_path

DATASETS: Registry[Callable[[DataConfig, int], DataBundle]] = Registry("dataset")
DATASETS.register("digits", builtin.digits)
DATASETS.register("synthetic", builtin.synthetic)
for _name in ("mnist", "fashion_mnist", "cifar10"):
    DATASETS.register(_name, builtin.torchvision_dataset)
DATASETS.register("image_folder", builtin.image_folder)


def build_datasets(cfg: DataConfig, seed: int, factory: Callable | None = None,
                   storage_options: dict[str, Any] | None = None) -> DataBundle:
    """The job's data: a built-in builder, a packed data set's URL, the user's import path, or their callable."""
    if "://" in cfg.dataset and factory is None:
        from dist_train.data.packed_bundle import packed_bundle
        return packed_bundle(cfg, storage_options)
    if factory is not None:
        from dist_train.plugins import qualified_name
        return bundle_from_factory(factory, qualified_name(factory), cfg.dataset_args)
    entry = DATASETS.resolve(cfg.dataset)
    if is_import_path(cfg.dataset):
        return bundle_from_factory(entry, cfg.dataset, cfg.dataset_args)
    return entry(cfg, seed)


def _split(factory: Callable, path: str, split: str, args: dict[str, Any], required: bool) -> Dataset | None:
    from dist_train.data import iterable
    try:
        extra = iterable.rank_kwargs(factory) if split == "train" else {}  # per-rank streams (data/iterable.py)
        dataset = factory(split, **args, **extra)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code: one line naming it
        if not required:
            return None  # an unsupported test split
        raise UserError(f"data set {path} (split {split!r}) raised {brief(exc)}") from None
    if dataset is None:
        if required:
            raise UserError(f"data set {path} returned None for split {split!r}")
        return None
    if iterable.is_iterable(dataset):  # the user's own stream: trained as it comes (data/iterable.py)
        if split == "train":
            iterable.check_train(dataset, path)
            return dataset
        dataset = iterable.Materialized(dataset, path, split)
    for method in ("__len__", "__getitem__"):
        if not hasattr(dataset, method):
            raise UserError(f"data set {path} (split {split!r}) is a {type(dataset).__name__} without {method}: "
                            "a map-style Dataset is needed")
    try:
        length = len(dataset)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"data set {path} (split {split!r}): len() raised {brief(exc)}") from None
    if required and length == 0:
        raise UserError(f"data set {path} (split {split!r}) is empty")
    if length:
        try:
            item = dataset[0]
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"data set {path} (split {split!r}): item 0 raised {brief(exc)}") from None
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise UserError(f"data set {path} (split {split!r}) must yield (input, target) pairs, "
                            f"item 0 is a {type(item).__name__}")
    return dataset


def bundle_from_factory(factory: Callable, path: str, args: dict[str, Any]) -> DataBundle:
    train = _split(factory, path, "train", args, required=True)
    val = _split(factory, path, "val", args, required=True)
    test = _split(factory, path, "test", args, required=False)
    classes = getattr(train, "classes", None) or getattr(train, "vocab", None)  # a vocab names token ids (predict)
    class_names = [str(c) for c in classes] if isinstance(classes, (list, tuple)) and classes else None
    num_classes = getattr(train, "num_classes", None) or (len(class_names) if class_names else None)
    return DataBundle(train, val, test, num_classes, getattr(train, "in_channels", None),
                      getattr(train, "image_size", None), class_names,
                      eval_transform=getattr(train, "eval_transform", None))


__all__ = ["DATASETS", "build_datasets", "bundle_from_factory"]
