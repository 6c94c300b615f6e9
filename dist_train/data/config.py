"""Configuration of the data pipeline: which data set, how it is split and batched."""

from __future__ import annotations

from dataclasses import dataclass

from dist_train.config.fields import fraction, non_negative, option, positive

BUILTIN_DATASETS = ("digits", "synthetic", "mnist", "fashion_mnist", "cifar10", "image_folder")
DATASETS_NEEDING_ROOT = ("mnist", "fashion_mnist", "cifar10", "image_folder")


def _dataset(value: str) -> str | None:
    if "://" in value:
        return None  # a packed data set's URL: opened (and checked) when the job builds its data
    from dist_train.data.registry import DATASETS  # torch is imported only once a job is configured

    return DATASETS.check_name(value)


def _size(value: str) -> str | None:
    from dist_train.data.packed.pack import parse_size
    from dist_train.errors import UserError

    try:
        parse_size(value, "--data-cache-limit")
    except UserError as exc:
        return str(exc).split(": ", 1)[-1]
    return None


def _shape(value: str) -> str | None:
    parts = value.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return "must be C,H,W with three positive whole numbers, e.g. 3,32,32"
    return None


@dataclass
class DataConfig:
    dataset: str = option("digits", "a built-in data set (" + ", ".join(BUILTIN_DATASETS) + "; digits is "
                          "embedded: no download, no data root), a packed data set's URL (s3://..., file://...: "
                          "dist-train data pack) or your own as MODULE:ATTR, called as "
                          "ATTR(split, **dataset_args) for split train, val and test", kind=str, check=_dataset)
    dataset_args: dict = option({}, "JSON object of keyword arguments for your data set factory", kind="json")
    data_root: str | None = option(None, "folder holding mnist/fashion_mnist/cifar10 files or an image folder",
                                   kind=str, nullable=True)
    download: bool = option(False, "allow torchvision to download mnist/fashion_mnist/cifar10 into --data-root",
                            kind=bool)
    data_cache: str | None = option(None, "node-local folder keeping verified shards of a packed data set "
                                     "(--dataset URL), shared by the ranks of a node", kind=str, nullable=True)
    data_cache_limit: str | None = option(None, "most bytes the data cache may hold (bytes or KiB/MiB/GiB); "
                                          "least recently used shards are evicted", kind=str, nullable=True,
                                          check=_size)
    shuffle_window: int = option(8, "packed data sets: shards whose samples are shuffled together (the "
                                 "order's window; a node holds about this many shards)", kind=int, check=positive)
    allow_data_change: bool = option(False, "resume although the packed data set's manifest changed since "
                                     "the checkpoint", kind=bool)
    batch_size: int = option(32, "samples per rank per micro-batch", kind=int, check=positive)
    num_workers: int = option(0, "DataLoader worker processes per rank", kind=int, check=non_negative)
    val_fraction: float = option(0.15, "share of the data held out for validation (split by --seed)",
                                 kind=float, check=fraction)
    test_fraction: float = option(0.15, "share held out for test, for data sets without a test split",
                                  kind=float, check=fraction)
    image_size: int | None = option(None, "resize images to this square size (default: native size)",
                                    kind=int, nullable=True, check=positive)
    augment: bool = option(False, "random crop/flip augmentation for training images", kind=bool)
    synthetic_size: int = option(2048, "number of samples of the synthetic data set", kind=int, check=positive)
    synthetic_shape: str = option("3,32,32", "C,H,W of each synthetic sample", kind=str, check=_shape)
    synthetic_classes: int = option(10, "number of classes of the synthetic data set", kind=int, check=positive)
