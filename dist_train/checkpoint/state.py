"""What goes into a checkpoint, and reading it back with every byte verified.

A checkpoint holds one file per *entry* of the saved state: `model.safetensors` (the
unwrapped model's state_dict, plain safetensors, loadable on its own for deployment),
and `<entry>.safetensors` for everything else (the optimizer, the trainer's counters,
scheduler and sampler, the user's extras, and `rng`: the RNG state of every rank) as
safetensors with a JSON skeleton. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.serialization import FormatError, TensorFile, load_tensors, load_tree, tensor_file, tree_file
from dist_train.checkpoint.storage import Storage
from dist_train.checkpoint.reader import CorruptCheckpoint, read_bytes, read_files  # noqa: F401 - re-exported

MODEL = "model"
SUFFIX = ".safetensors"
MODEL_FILE = MODEL + SUFFIX


def file_name(entry: str) -> str:
    return entry + SUFFIX


@dataclass
class Snapshot:
    """CPU state taken at a step boundary; the writer serializes it (maybe in the background).

    `entries` maps an entry name to its CPU state tree. `fill`, when set, holds copies into
    the snapshot's buffers that were deferred to the writer thread: it must run before the
    tensors are read, and the training thread must not change the state until it has
    (`Checkpointer.wait_snapshot`).
    """
    step: int
    entries: dict[str, Any]
    fields: dict[str, Any] = field(default_factory=dict)
    fill: Callable[[], None] | None = None
    shard: Any = None  # a sharded save: this rank's share of the model and optimizer (sharded.ShardSnapshot)

    @property
    def model(self) -> dict[str, torch.Tensor]:
        return self.entries.get(MODEL, {})

    def files(self) -> dict[str, TensorFile]:
        return {file_name(name): tensor_file(tree, {"format": "pt"}) if name == MODEL else tree_file(tree)
                for name, tree in self.entries.items()}

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


@dataclass
class Payload:
    """A checkpoint read back: its manifest and each entry's state tree."""
    manifest: dict[str, Any]
    entries: dict[str, Any]
    folder: Any = None  # where it was read from, for entries loaded later (resharded model and optimizer)

    @property
    def model(self) -> dict[str, torch.Tensor]:
        return self.entries[MODEL]


def entry_names(manifest: dict[str, Any]) -> list[str]:
    """The state entries a checkpoint holds: its top-level `<entry>.safetensors` files."""
    return sorted(name[:-len(SUFFIX)] for name in manifest["files"] if name.endswith(SUFFIX) and "/" not in name)


def read_file(folder: Storage, manifest: dict[str, Any], name: str, verify_sha: bool) -> bytes:
    """One file's bytes (a bytearray), checked against the manifest: size, and sha256 when asked."""
    return read_bytes(folder, manifest, name, verify_sha)


def read_payload(folder: Storage, manifest: dict[str, Any], verify_sha: bool = True,
                 model_only: bool = False, skip: tuple[str, ...] = ()) -> Payload:
    """Read and check the checkpoint's files (but the `skip` entries); CorruptCheckpoint names the first problem."""
    names = [MODEL] if model_only else [name for name in entry_names(manifest) if name not in skip]
    if MODEL not in entry_names(manifest) and model_only:
        raise CorruptCheckpoint(f"manifest does not list {MODEL_FILE}")
    # The files are read, hashed and parsed side by side, straight into their tensors (reader.py).
    files = read_files(folder, manifest, [file_name(name) for name in names], verify_sha,
                       trees={file_name(name) for name in names if name != MODEL})
    loaded = {name: files[file_name(name)] for name in names}
    return Payload(manifest, {name: f.tensors if name == MODEL else f.tree for name, f in loaded.items()})


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
