"""What `dist-train data pack` can read, each turned into the same `Source`: splits of encoded samples.

- a built-in data set name (`digits`, ...): the same splits as training from it (`--val-fraction`,
  `--test-fraction`, `--seed`), inputs as the tensors the data set yields, stored as .npy;
- an image folder (class sub-folders, or train/ val/ test/ with class folders): split by the image
  folder data set's own code; each image keeps its original encoded bytes;
- a text file: a character vocabulary (sorted characters, as examples/char_transformer.py) and
  fixed-length windows of `seq_len` tokens (input) and the same shifted by one (target);
  train, val, test are consecutive parts of the text, so no window crosses two splits;
- `MODULE:ATTR`: a map-style data set factory called as `--dataset` calls it.

Everything is checked (the folder exists, the data set is not empty) before anything is written.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from dist_train.data.packed import shards as sh
from dist_train.errors import UserError, printable


@dataclass
class SplitSamples:
    """A split as `count` samples; `members(i)` is sample i's tar members (ext -> bytes)."""
    count: int
    members: Callable[[int], dict[str, bytes]]


@dataclass
class Source:
    splits: dict[str, SplitSamples]
    classes: list[str] | None
    preprocessing: dict[str, Any]
    description: dict[str, Any] = field(default_factory=dict)


@dataclass
class PackOptions:
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    dataset_args: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = "char"
    seq_len: int = 64
    data_root: str | None = None


def open_source(spec: str, options: PackOptions) -> Source:
    from dist_train.plugins import is_import_path

    if is_import_path(spec):
        return _from_factory(spec, options)
    if os.path.isdir(spec):
        return _from_image_folder(spec, options)
    if os.path.isfile(spec):
        return _from_text(spec, options)
    from dist_train.data.registry import DATASETS
    if spec in DATASETS and spec != "image_folder":
        return _from_builtin(spec, options)
    raise UserError(f"data pack: {spec!r} is not a folder, a file, a built-in data set "
                    f"({', '.join(n for n in DATASETS.names() if n != 'image_folder')}) or MODULE:ATTR")


def _data_config(options: PackOptions, **extra: Any):
    from dist_train.data.config import DataConfig

    return DataConfig(val_fraction=options.val_fraction, test_fraction=options.test_fraction,
                      dataset_args=dict(options.dataset_args), **extra)


def _tensor_input(value: Any) -> bytes:
    import torch

    if isinstance(value, torch.Tensor):
        return sh.npy_bytes(value.detach().cpu().numpy())
    return sh.npy_bytes(np.asarray(value))


def _input_members(value: Any) -> dict[str, bytes]:
    try:
        from PIL import Image
        if isinstance(value, Image.Image):
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            return {"png": buffer.getvalue()}
    except ImportError:
        pass
    return {"input.npy": _tensor_input(value)}


def _pairs(dataset: Any) -> Callable[[int], dict[str, bytes]]:
    def members(i: int) -> dict[str, bytes]:
        value, target = dataset[i]
        out = _input_members(value)
        ext, data = sh.encode_target(target)
        out[ext] = data
        return out
    return members


def _bundle_source(bundle: Any, description: dict[str, Any]) -> Source:
    splits = {name: SplitSamples(len(ds), _pairs(ds)) for name, ds in
              (("train", bundle.train), ("val", bundle.val), ("test", bundle.test)) if ds is not None and len(ds)}
    if "train" not in splits:
        raise UserError(f"data pack: {description.get('name')}: the train split is empty")
    first = bundle.train[0][0]
    shape = list(getattr(first, "shape", ()) or ())
    preprocessing: dict[str, Any] = {"input": "tensor", "shape": shape or None,
                                     "in_channels": bundle.in_channels, "image_size": bundle.image_size,
                                     "num_classes": bundle.num_classes}
    record = (bundle.info or {}).get("preprocessing")
    if record:
        preprocessing["record"] = record  # how the tensors were made (for predict on raw images)
    return Source(splits, bundle.class_names, preprocessing, description)


def _from_builtin(name: str, options: PackOptions) -> Source:
    from dist_train.data.registry import build_datasets

    cfg = _data_config(options, dataset=name, data_root=options.data_root)
    bundle = build_datasets(cfg, options.seed)
    return _bundle_source(bundle, {"type": "builtin", "name": name, "val_fraction": options.val_fraction,
                                   "test_fraction": options.test_fraction, "seed": options.seed})


def _from_factory(path: str, options: PackOptions) -> Source:
    from dist_train.data.registry import DATASETS, bundle_from_factory

    bundle = bundle_from_factory(DATASETS.resolve(path), path, dict(options.dataset_args))
    return _bundle_source(bundle, {"type": "import_path", "name": path, "dataset_args": options.dataset_args})


def _from_image_folder(root: str, options: PackOptions) -> Source:
    from dist_train.data.datasets import image_folder, image_folder_record

    bundle = image_folder(_data_config(options, dataset="image_folder", data_root=root), options.seed)
    sizes: set[tuple[int, int]] = set()

    def split(subset: Any) -> SplitSamples:
        def members(i: int) -> dict[str, bytes]:
            path, label = subset.base.samples[subset.indices[i]]
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            if ext not in sh.IMAGE_EXTS:
                raise UserError(f"data pack: {path}: not an image type a shard can hold ({', '.join(sh.IMAGE_EXTS)})")
            with open(path, "rb") as handle:
                data = handle.read()
            from PIL import Image
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.load()  # a truncated file fails now, not in the middle of training
                    sizes.add(image.size)
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
                raise UserError(f"data pack: cannot read image {printable(path, 300)}: "
                                f"{printable(' '.join(str(exc).split())) or type(exc).__name__}") from None
            return {ext: data, "cls": str(int(label)).encode()}
        return SplitSamples(len(subset), members)

    splits = {name: split(ds) for name, ds in (("train", bundle.train), ("val", bundle.val), ("test", bundle.test))
              if ds is not None and len(ds)}
    preprocessing = _ImagePreprocessing({"input": "image", "image_mode": "RGB", "in_channels": 3,
                                         "image_size": None, "num_classes": len(bundle.class_names),
                                         "record": image_folder_record(bundle.image_size, bundle.class_names)},
                                        sizes)
    return Source(splits, list(bundle.class_names), preprocessing,
                  {"type": "image_folder", "name": os.path.basename(os.path.abspath(root)),
                   "val_fraction": options.val_fraction, "test_fraction": options.test_fraction,
                   "seed": options.seed})


class _ImagePreprocessing(dict):
    """The image record; `image_size` is filled in once every image was seen (when they are all one square size)."""

    def __init__(self, record: dict[str, Any], sizes: set[tuple[int, int]]):
        super().__init__(record)
        self.sizes = sizes

    def finish(self) -> dict[str, Any]:
        out = dict(self)
        if len(self.sizes) == 1:
            (w, h), = self.sizes
            out["image_size"] = w if w == h else None
            out["image_shape"] = [h, w]
        return out


def _from_text(path: str, options: PackOptions) -> Source:
    if options.tokenizer != "char":
        raise UserError(f"data pack: unknown --tokenizer {options.tokenizer!r} (char is the one there is)")
    if options.seq_len < 1:
        raise UserError("data pack: --seq-len must be a positive whole number")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError:
        raise UserError(f"data pack: {path} is not UTF-8 text (a text source is tokenised by character)") from None
    vocab = sorted(set(text))
    lookup = {ch: i for i, ch in enumerate(vocab)}
    ids = np.fromiter((lookup[ch] for ch in text), dtype=np.int64, count=len(text))
    n = len(ids)
    n_test, n_val = int(n * options.test_fraction), int(n * options.val_fraction)
    parts = {"train": ids[:n - n_val - n_test], "val": ids[n - n_val - n_test:n - n_test], "test": ids[n - n_test:]}
    T = options.seq_len

    def split(part: np.ndarray) -> SplitSamples:
        def members(i: int) -> dict[str, bytes]:
            window = part[i * T:i * T + T + 1]
            return {"input.npy": sh.npy_bytes(window[:-1]), "target.npy": sh.npy_bytes(window[1:])}
        return SplitSamples(max(0, (len(part) - 1) // T), members)

    splits = {name: split(part) for name, part in parts.items()}
    splits = {name: s for name, s in splits.items() if s.count}
    if "train" not in splits:
        raise UserError(f"data pack: {path}: too short for one training window of --seq-len {T} characters")
    return Source(splits, None, {"input": "tokens", "tokenizer": "char", "vocab": vocab, "seq_len": T,
                                 "num_classes": len(vocab)},
                  {"type": "text", "name": os.path.basename(path), "val_fraction": options.val_fraction,
                   "test_fraction": options.test_fraction})
