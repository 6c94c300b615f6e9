"""What goes into a training checkpoint, and reading it back with every byte verified.

Three files: `model.safetensors` (the unwrapped model's state_dict, loadable on its
own for deployment), `optimizer.safetensors` and `trainer.safetensors` (scheduler,
grad scaler, counters, sampler position, best metric and the RNG state of every
rank). All are safetensors with JSON skeletons: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.serialization import FormatError, TensorFile, load_tensors, load_tree, tensor_file, tree_file
from dist_train.checkpoint.storage import Storage

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer.safetensors"


@dataclass
class Snapshot:
    """CPU state taken at a step boundary; the writer serializes it (maybe in the background).

    `fill`, when set, holds copies into the snapshot's buffers that were deferred to the
    writer thread: it must run before the tensors are read, and the training thread must
    not change the state until it has (`Checkpointer.wait_snapshot`).
    """
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    trainer: dict[str, Any]
    fields: dict[str, Any] = field(default_factory=dict)
    fill: Callable[[], None] | None = None

    def files(self) -> dict[str, TensorFile]:
        return {MODEL_FILE: tensor_file(self.model, {"format": "pt"}),
                OPTIMIZER_FILE: tree_file(self.optimizer),
                TRAINER_FILE: tree_file(self.trainer)}

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files().values())


class SnapshotBuffers:
    """Reused CPU buffers, so a background save costs the training thread at most one memory copy.

    Buffers are pinned when the source is on a GPU (faster device-to-host copies).
    Only one save is in flight at a time, so one set of buffers is enough.

    Copies of CPU tensors that only the optimizer update changes (parameters, optimizer
    state) can be deferred: `copy_tree(..., defer=...)` queues them and `take_pending()`
    hands them to the writer thread, which copies while the next forward and backward
    pass run (they read those tensors but do not write them).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def copy_tree(self, tree: Any, prefix: str = "", defer: Callable[[torch.Tensor], bool] | None = None) -> Any:
        if isinstance(tree, torch.Tensor):
            return self._copy(prefix, tree, defer)
        if isinstance(tree, dict):
            return {k: self.copy_tree(v, f"{prefix}/{k}", defer) for k, v in tree.items()}
        if isinstance(tree, list):
            return [self.copy_tree(v, f"{prefix}/{i}", defer) for i, v in enumerate(tree)]
        if isinstance(tree, tuple):
            return tuple(self.copy_tree(v, f"{prefix}/{i}", defer) for i, v in enumerate(tree))
        return tree

    def _copy(self, key: str, tensor: torch.Tensor, defer: Callable[[torch.Tensor], bool] | None) -> torch.Tensor:
        tensor = tensor.detach()
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                                 pin_memory=tensor.device.type == "cuda")
            self._buffers[key] = buffer
        if defer is not None and tensor.device.type == "cpu" and defer(tensor):
            self._pending.append((buffer, tensor))
        else:
            buffer.copy_(tensor, non_blocking=tensor.device.type == "cuda")
        return buffer

    def take_pending(self) -> Callable[[], None] | None:
        """The deferred copies as one callable, or None when every copy was made already."""
        pending, self._pending = self._pending, []
        if not pending:
            return None

        def fill() -> None:
            for buffer, source in pending:
                buffer.copy_(source)
        return fill


def to_cpu_tree(tree: Any) -> Any:
    """Tensors moved to the CPU without copying what is already there (for synchronous saves)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: to_cpu_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_cpu_tree(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(to_cpu_tree(v) for v in tree)
    return tree


class CorruptCheckpoint(Exception):
    """A listed file is missing, of the wrong size, fails its sha256, or does not parse."""


@dataclass
class Payload:
    manifest: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    trainer: dict[str, Any] | None = None


def read_file(folder: Storage, manifest: dict[str, Any], name: str, verify_sha: bool) -> bytes:
    entry = manifest["files"].get(name)
    if entry is None:
        raise CorruptCheckpoint(f"manifest does not list {name}")
    try:
        data = folder.read(name)
    except FileNotFoundError:
        raise CorruptCheckpoint(f"file {name} is missing") from None
    if len(data) != entry["size"]:
        raise CorruptCheckpoint(f"file {name} is {len(data)} bytes, manifest says {entry['size']}")
    if verify_sha and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CorruptCheckpoint(f"file {name} does not match its sha256 (corrupted)")
    return data


def read_payload(folder: Storage, manifest: dict[str, Any], verify_sha: bool = True,
                 model_only: bool = False) -> Payload:
    """Read and check the checkpoint's files; CorruptCheckpoint names the first problem."""
    try:
        model = load_tensors(read_file(folder, manifest, MODEL_FILE, verify_sha))
        if model_only:
            return Payload(manifest, model)
        optimizer = load_tree(read_file(folder, manifest, OPTIMIZER_FILE, verify_sha))
        trainer = load_tree(read_file(folder, manifest, TRAINER_FILE, verify_sha))
    except FormatError as exc:
        raise CorruptCheckpoint(str(exc)) from None
    if not isinstance(trainer, dict) or not isinstance(optimizer, dict):
        raise CorruptCheckpoint("trainer or optimizer state has the wrong structure")
    return Payload(manifest, model, optimizer, trainer)


def open_checkpoint(url: str, storage_options: dict | None = None) -> tuple[Storage, dict[str, Any]]:
    """A checkpoint folder by URL and its parsed manifest (UserError when it is not one)."""
    from dist_train.checkpoint.catalog import read_manifest
    from dist_train.errors import UserError

    folder = Storage(url, storage_options)
    try:
        return folder, read_manifest(folder)
    except mf.ManifestError as exc:
        raise UserError(f"{folder.display_url} is not a valid checkpoint: {exc}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read checkpoint {folder.display_url}: {exc}") from None
