"""Loading dist_train checkpoints through `torch.distributed.checkpoint` (DCP): resharding for free.

`DistTrainReader` is a DCP `StorageReader` over a committed dist_train checkpoint (written
by rank 0 or by every rank, on any store `Storage` reaches). Its metadata comes from the
manifest and the safetensors headers, never from a pickled `.metadata`; DCP's planner then
maps the stored pieces onto whatever the loading ranks hold: N ranks -> M ranks, whole
tensors (DDP, one process) <-> DTensor shards (FSDP2).

A DCP-based program (torchtitan-style) loads a dist_train checkpoint in three lines:

    from dist_train.checkpoint.dcp import DistTrainReader
    state = {"model": get_model_state_dict(model)}      # torch.distributed.checkpoint.state_dict
    dcp.load(state, storage_reader=DistTrainReader("s3://bucket/run/ckpt-g0001-s0000000100"))
    # then set_model_state_dict(model, state["model"]) as usual (in place for DTensors already)

Keys are DCP's flat names of `{"model": ..., "optimizer": ...}`. Non-tensor leaves (learning
rates and other param-group settings) are stored as JSON; DCP's default planner only takes
them as `torch.save` bytes, so the reader hands it bytes it made itself from the JSON values:
nothing read from storage is ever unpickled. dist_train's own loading (`load_state`) does
not route those leaves through DCP at all.

Integrity: with `verify=True` (the default for outside programs) each rank checks the sha256
of every file it reads from before copying anything out of it. `load_state` instead checks
every file once, split over the ranks (`index.verify_share`), and all ranks agree before DCP
reads a byte; its reader then skips the second check.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from typing import Any

import torch
from torch.distributed.checkpoint import StorageReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from dist_train.checkpoint import catalog
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.index import CheckpointIndex, build_index, read_region, release, verify_share
from dist_train.checkpoint.sharded import SHARDS, collect_state, is_sharded
from dist_train.checkpoint.storage import Storage
from dist_train.distributed.env import DistEnv
from dist_train.errors import UserError

log = logging.getLogger(__name__)


class CheckpointCorrupt(Exception):
    """A file the load needs is missing, of the wrong size or fails its sha256."""


class DistTrainReader(StorageReader):
    """DCP reader over one dist_train checkpoint folder (URL of the folder holding `manifest.json`).

    `param_names` (parameter names in the optimizer's order) lets a checkpoint written by rank 0,
    whose optimizer state is keyed by integer ids, load into FQN-keyed optimizer state.
    """

    def __init__(self, url: str | os.PathLike | None = None, storage_options: dict | None = None,
                 verify: bool = True, param_names: list[str] | None = None, *,
                 folder: Storage | None = None, manifest: dict[str, Any] | None = None):
        super().__init__()
        self.url = str(url) if url is not None else None
        self.storage_options = storage_options
        self.verify = verify
        self.param_names = param_names
        self._folder = folder
        self._manifest = manifest
        self.index: CheckpointIndex | None = None
        self._verified: set[str] = set()
        self.load_id: str | None = None

    # -- DCP protocol -------------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None and str(checkpoint_id) != self.url:
            self.url, self._folder, self._manifest, self.index = str(checkpoint_id), None, None, None
        self._verified = set()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        try:
            return Storage(str(checkpoint_id)).exists(mf.MANIFEST)
        except Exception:  # noqa: BLE001 - not ours to read
            return False

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        index = self._open()
        state_md: dict[str, Any] = {}
        storage_data: dict[MetadataIndex, Any] = {}
        for key, info in index.tensors.items():
            state_md[key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=info.dtype), size=torch.Size(info.shape),
                chunks=[ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes))
                        for c in info.chunks])
            for chunk in info.chunks:
                storage_data[MetadataIndex(key, chunk.offsets)] = chunk
        for key in index.objects:
            state_md[key] = BytesStorageMetadata()
            storage_data[MetadataIndex(key)] = key
        return Metadata(state_dict_metadata=state_md, storage_data=storage_data,
                        storage_meta=StorageMeta(checkpoint_id=self.url, load_id=self.load_id))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        index = self._open()
        if self.verify:
            needed = {self._storage_data[item.storage_index].file for item in plan.items
                      if item.type != LoadItemType.BYTE_IO}
            for rel in sorted(needed - self._verified):
                problem = verify_share(index.folder, index.manifest, names=[rel])
                if problem:
                    raise CheckpointCorrupt(f"{index.folder.url()}: {problem}")
                self._verified.add(rel)
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                buffer = io.BytesIO()
                torch.save(index.objects[item.storage_index.fqn], buffer)  # plain JSON values, made here
                buffer.seek(0)
                planner.load_bytes(item, buffer)
                continue
            chunk = self._storage_data[item.storage_index]
            source = read_region(index, item.storage_index.fqn, chunk, tuple(item.storage_offsets),
                                 tuple(item.lengths))
            target = planner.resolve_tensor(item).detach()
            if target.size() != source.size():
                raise RuntimeError(f"{item.storage_index.fqn}: read {tuple(source.size())}, "
                                   f"expected {tuple(target.size())}")
            target.copy_(source)
            planner.commit_tensor(item, target)
        if self.verify:
            release(index.folder)  # the verified bytes kept for these reads (object stores)
        future: Future = Future()
        future.set_result(None)
        return future

    # -- ours ------------------------------------------------------------------------------------

    def _open(self) -> CheckpointIndex:
        if self.index is None:
            if self._folder is None:
                if self.url is None:
                    raise ValueError("DistTrainReader needs the checkpoint's URL")
                self._folder = Storage(self.url, self.storage_options)
            if self._manifest is None:
                self._manifest = catalog.read_manifest(self._folder)
            self.index = build_index(self._folder, self._manifest, param_names=self.param_names)
        return self.index

    @property
    def objects(self) -> dict[str, Any]:
        return self._open().objects


def optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order torch numbers them in `optimizer.state_dict()` (ids 0, 1, ...)."""
    from dist_train.distributed.parallel import unwrap

    names = {id(p): name for name, p in unwrap(model).named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def files_to_load(manifest: dict[str, Any]) -> list[str]:
    """The files a model + optimizer load reads (shards, or the rank-0 layout's two files)."""
    if is_sharded(manifest):
        return sorted(name for name in manifest["files"] if name.startswith(f"{SHARDS}/"))
    return sorted(name for name in ("model.safetensors", "optimizer.safetensors") if name in manifest["files"])


def load_state(env: DistEnv, folder: Storage, manifest: dict[str, Any], model: torch.nn.Module,
               optimizer: torch.optim.Optimizer | None, verify_sha: bool = True) -> None:
    """Load a checkpoint's model (and optimizer) state into this job, resharded (collective).

    Works for either layout, any saved world size and parallelism, into a plain, DDP or FSDP2
    model. Raises `CheckpointCorrupt` on every rank when any rank found a damaged file (nothing
    has been loaded then), and `UserError` when the checkpoint does not fit the model.
    """
    if verify_sha:
        problem = verify_share(folder, manifest, env.rank, env.world_size, files_to_load(manifest))  # collective
        if problem:
            raise CheckpointCorrupt(problem)
    try:
        _load(env, folder, manifest, model, optimizer)
    finally:
        release(folder)  # the bytes verify_share kept for this load (object stores)


def _load(env: DistEnv, folder: Storage, manifest: dict[str, Any], model: torch.nn.Module,
          optimizer: torch.optim.Optimizer | None) -> None:
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state, _ = collect_state(model, optimizer)
    flat, mappings = flatten_state_dict(state)
    reader = DistTrainReader(folder.url(), verify=False, folder=folder, manifest=manifest,
                             param_names=optimizer_param_names(model, optimizer) if optimizer is not None else None)
    index = reader._open()
    _check_fits(index, flat, optimizer is not None)
    tensors = {key: value for key, value in flat.items() if isinstance(value, torch.Tensor)}
    try:
        with warnings.catch_warnings():  # one process: DCP warns that it runs without a process group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_load(tensors, storage_reader=reader, no_dist=not env.distributed)
    except CheckpointException as exc:  # a BaseException holding every failed rank's error
        raise _unwrap(exc, folder) from None
    for key, value in flat.items():
        if not isinstance(value, torch.Tensor) and key in index.objects:
            set_element(state, mappings[key], index.objects[key])
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state["model"])
        return
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _check_fits(index: CheckpointIndex, flat: dict[str, Any], with_optimizer: bool) -> None:
    """Refuse, with one line, a checkpoint whose model keys or shapes differ from this model's."""
    ours = {key for key, value in flat.items() if key.startswith("model.") and isinstance(value, torch.Tensor)}
    theirs = set(index.keys("model"))
    missing, unexpected = sorted(ours - theirs), sorted(theirs - ours)
    if missing or unexpected:
        detail = (f"missing {', '.join(k[6:] for k in missing[:3])}" if missing else
                  f"unexpected {', '.join(k[6:] for k in unexpected[:3])}")
        raise UserError(f"checkpoint {index.folder.url()} does not fit the model: {detail}")
    for key in sorted(ours):
        value = flat[key]
        if tuple(value.shape) != index.tensors[key].shape:
            raise UserError(f"checkpoint {index.folder.url()} does not fit the model: {key[6:]} is "
                            f"{list(index.tensors[key].shape)} there, {list(value.shape)} here")
    if with_optimizer:
        absent = sorted(key for key, value in flat.items() if key.startswith("optimizer.")
                        and isinstance(value, torch.Tensor) and key not in index.tensors)
        if absent:
            raise UserError(f"checkpoint {index.folder.url()}: its optimizer state does not fit this run's "
                            f"optimizer (no {absent[0][len('optimizer.'):]})")


def _unwrap(exc: CheckpointException, folder: Storage) -> Exception:
    """DCP's every-rank exception as the one a caller handles: a damaged file, a misfit, or the first error."""
    errors = [failure[0] for _, failure in sorted(exc.failures.items())]
    for error in errors:
        if isinstance(error, (CheckpointCorrupt, UserError)):
            return error
    for error in errors:
        if isinstance(error, ValueError) and "Size mismatch" in str(error):
            return UserError(f"checkpoint {folder.url()} does not fit the model: {str(error)[:300]}")
    first = errors[0] if errors else exc
    return RuntimeError(f"loading {folder.url()} failed: {type(first).__name__}: {first}")
