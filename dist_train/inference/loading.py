"""Opening a checkpoint for inference: the weights only, verified, and the data pipeline they were trained with.

`--checkpoint` names a checkpoint folder or a run dir (then its newest valid
checkpoint, found by the one resolver resume uses too). The model file's sha256 is
checked while it is read, the model is rebuilt from the manifest's `ModelSpec` (a
built-in name or the user's import path, with its args) and loaded strictly: a
checkpoint of another architecture is a one-line error, never a silent partial load.
The data set is rebuilt from the checkpoint's own config and seed, so the val/test
split and the normalisation are exactly the ones training used.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dist_train.checkpoint import resolver
from dist_train.checkpoint.index import read_full_model
from dist_train.checkpoint.sharded import is_sharded
from dist_train.checkpoint.state import read_payload
from dist_train.checkpoint.storage import Storage
from dist_train.data.config import DATASETS_NEEDING_ROOT, DataConfig
from dist_train.data.datasets import DataBundle
from dist_train.data.registry import build_datasets
from dist_train.errors import UserError
from dist_train.models.registry import ModelSpec, build_model, load_weights
from dist_train.training.tasks import Task, build_task

log = logging.getLogger(__name__)


@dataclass
class Weights:
    """A checkpoint's model state_dict (sha256-verified) and the manifest that describes it."""
    url: str
    manifest: dict[str, Any]
    state: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


@dataclass
class LoadedModel:
    """A model in eval mode with the checkpoint it came from."""
    url: str
    manifest: dict[str, Any]
    spec: ModelSpec
    model: nn.Module
    device: torch.device

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def class_names(self) -> list[str]:
        names = self.manifest.get("class_names")
        if isinstance(names, list) and names and (self.spec.num_classes in (None, len(names))):
            return [str(n) for n in names]
        return [str(i) for i in range(self.spec.num_classes or 0)]

    @property
    def task(self) -> Task:
        """The task the model was trained for (its inference follows it)."""
        config = self.manifest.get("config") if isinstance(self.manifest.get("config"), dict) else {}
        name = self.manifest.get("task") or (config.get("train") or {}).get("task") or "classification"
        return build_task(name)


def pick_device(name: str = "auto") -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but CUDA is not available on this machine")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def read_weights(url: str, options: dict | None = None) -> Weights:
    """The model weights of a checkpoint folder, or of a run dir's newest valid checkpoint."""
    def read(verdict) -> dict[str, torch.Tensor]:
        folder = Storage(verdict.url, options)
        if is_sharded(verdict.manifest):  # every rank's shards, consolidated one tensor at a time
            return read_full_model(folder, verdict.manifest, verify_sha=True)
        return read_payload(folder, verdict.manifest, verify_sha=True, model_only=True).model

    verdict, state = resolver.newest_valid(url, options, read)
    return Weights(verdict.url, verdict.manifest, state)


def model_spec(manifest: dict[str, Any], url: str, expect_model: str | None = None) -> ModelSpec:
    """The manifest's ModelSpec; `expect_model` (--model) must name the same architecture."""
    spec = ModelSpec.from_dict(manifest.get("model") or {})
    if expect_model is not None and expect_model != spec.name:
        if ":" in expect_model and not spec.is_builtin:
            # your factory under another import path (a moved script, `__main__:build` of an older run):
            # the recorded args and shape, and the strict weight load decides whether it fits
            import dataclasses
            return dataclasses.replace(spec, name=expect_model)
        raise UserError(f"checkpoint {url} holds a {spec.describe()}, not {expect_model}")
    return spec


def build_loaded(weights: Weights, expect_model: str | None = None,
                 device: torch.device | None = None) -> LoadedModel:
    """A fresh model of the manifest's architecture with the checkpoint's weights, in eval mode."""
    spec = model_spec(weights.manifest, weights.url, expect_model)
    model = build_model(spec)
    load_weights(model, weights.state, weights.url)
    device = device or torch.device("cpu")
    model.to(device).eval()
    return LoadedModel(weights.url, weights.manifest, spec, model, device)


def load_model(url: str, options: dict | None = None, expect_model: str | None = None,
               device: torch.device | None = None) -> LoadedModel:
    return build_loaded(read_weights(url, options), expect_model, device)


def data_config(manifest: dict[str, Any], url: str, data_root: str | None = None) -> tuple[DataConfig, int]:
    """The checkpoint's data config and train seed (which fixes the split and the normalisation)."""
    config = manifest.get("config")
    section = config.get("data") if isinstance(config, dict) else None
    seed = (config.get("train") or {}).get("seed") if isinstance(config, dict) else None
    if not isinstance(section, dict) or not isinstance(seed, int):
        raise UserError(f"checkpoint {url} does not record the data config it was trained with")
    known = {f.name for f in dataclasses.fields(DataConfig)}
    cfg = DataConfig(**{k: v for k, v in section.items() if k in known})
    cfg.download = False  # inference never fetches data behind the user's back
    if data_root is not None:
        cfg.data_root = data_root
    if cfg.dataset in DATASETS_NEEDING_ROOT and not (cfg.data_root and os.path.isdir(cfg.data_root)):
        raise UserError(f"data set {cfg.dataset} of checkpoint {url} needs its files: data root "
                        f"{cfg.data_root!r} not found (pass --data-root)")
    return cfg, seed


def rebuild_data(loaded: LoadedModel, data_root: str | None = None) -> DataBundle:
    """The checkpoint's data set with the same split and preprocessing as in training."""
    cfg, seed = data_config(loaded.manifest, loaded.url, data_root)
    bundle = build_datasets(cfg, seed)
    mismatched = {k: (v, bundle.shape().get(k)) for k, v in loaded.spec.shape.items() if bundle.shape().get(k) != v}
    if mismatched:
        raise UserError(f"data set {cfg.dataset} does not match the model of checkpoint {loaded.url}: "
                        + ", ".join(f"{k} {theirs} in the data, {ours} in the model"
                                    for k, (ours, theirs) in mismatched.items()))
    return bundle
