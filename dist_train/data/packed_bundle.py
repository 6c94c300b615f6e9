"""A packed data set (`--dataset URL`) as the job's `DataBundle`: the same splits, shapes and transforms.

Images in shards get the image-folder treatment (`--image-size`, `--augment`, ImageNet
normalisation, the evaluation recipe recorded for `predict`); tensor samples are used as
packed. The bundle's `info` names the data set and its manifest's sha256: every checkpoint
records them, so a resume notices a data set that changed under the same URL.
"""

from __future__ import annotations

from typing import Any

from dist_train.data.config import DataConfig
from dist_train.data.datasets import DataBundle, image_folder_record
from dist_train.data.transforms import IMAGENET_STATS, eval_transform, train_image_transform
from dist_train.errors import UserError


def packed_bundle(cfg: DataConfig, storage_options: dict[str, Any] | None = None) -> DataBundle:
    from dist_train.data.packed import open_packed
    from dist_train.data.packed.pack import parse_size

    limit = parse_size(cfg.data_cache_limit, "--data-cache-limit") if cfg.data_cache_limit else None
    packed = open_packed(cfg.dataset, storage_options=storage_options, cache_dir=cfg.data_cache, cache_limit=limit)
    for needed in ("train", "val"):
        if needed not in packed.splits:
            raise UserError(f"packed data set {packed.url} has no {needed!r} split (it has {', '.join(packed.splits)})")
    pre = packed.preprocessing
    classes = packed.classes
    eval_tf, record = None, pre.get("record")
    if pre.get("input") == "image":
        size = cfg.image_size or pre.get("image_size") or 224
        mean, std = IMAGENET_STATS
        record = image_folder_record(size, classes)
        eval_tf = eval_transform(record)
        train_tf, split_tf = train_image_transform(size, mean, std, cfg.augment), eval_tf
        in_channels, image_size = 3, size
    else:
        if cfg.image_size is not None or cfg.augment:
            raise UserError(f"--image-size/--augment apply to images; packed data set {packed.url} holds tensors")
        train_tf = split_tf = None
        in_channels, image_size = pre.get("in_channels"), pre.get("image_size")
        eval_tf = eval_transform(record) if record else None
    test = packed.split("test", split_tf) if "test" in packed.splits else None
    num_classes = pre.get("num_classes") or (len(classes) if classes else None)
    info: dict[str, Any] = {"packed": {"url": packed.url, "manifest_sha256": packed.manifest_sha256}}
    if record:
        info["preprocessing"] = record
    return DataBundle(packed.split("train", train_tf), packed.split("val", split_tf), test, num_classes, in_channels,
                      image_size, list(classes) if classes else None, eval_transform=eval_tf, info=info)


def data_changed(manifest: dict[str, Any], bundle: DataBundle, allow: bool) -> str | None:
    """Why a checkpoint trained on another version of this packed data set cannot be resumed, or None."""
    ours = (bundle.info or {}).get("packed")
    theirs = ((manifest.get("data_info") or {}).get("packed")) if isinstance(manifest, dict) else None
    if not ours or not theirs or allow:
        return None
    if theirs.get("manifest_sha256") != ours["manifest_sha256"]:
        return (f"the packed data set changed since this checkpoint (data manifest sha256 "
                f"{str(theirs.get('manifest_sha256'))[:12]}..., now {ours['manifest_sha256'][:12]}...): "
                "pass --allow-data-change to continue on the new data")
    return None
