"""Checkpoints every rank writes a share of, committed under the one manifest as before.

Layout: beside the whole entries rank 0 writes (`trainer.safetensors`, ...; see state.py),
each rank writes its pieces of the large entries (model, optimizer) into

    shards/rank00000/model.safetensors
    shards/rank00000/optimizer.safetensors
    shards/rank00001/model.safetensors ...

Each is a plain safetensors file (no pickle). Tensor names are the entry's DCP keys (the
dot-joined path `torch.distributed.checkpoint` gives a nested state: `fc.weight`,
`state.fc.weight.exp_avg`); a piece of a larger tensor carries its global offsets and
shape in the header metadata (`dist_train.chunks`); the non-tensor leaves (learning rates,
param-group settings) are JSON skeletons in rank 0's file (`dist_train.objects`). The
manifest's `sharded` field names the layout; `files` lists every rank's files, so
`ckpt verify` checks every shard of every rank.

Who writes what (no two ranks write the same bytes; each about 1/N, rank 0 less under DDP):

- a DTensor (FSDP2): each rank its local shard, as it is (`to_local()`);
- a plain tensor: exactly one owner. Model buffers (BatchNorm statistics) belong to rank 0:
  neither DDP nor FSDP keeps them equal across ranks between forward passes, and rank 0's
  are the ones today's checkpoints hold. Everything else plain is an exact replica (DDP
  parameters and optimizer state, optimizer step counters) and is spread over the ranks:
  largest first to the least-loaded rank, ties to the lower rank, so every rank computes
  the same assignment without talking. Rank 0 starts with the model digest it hashes
  (whole replicated model tensors), so it writes less than the others.

The commit (`ShardedSaver.commit`, collective): rank 0 opens the folder (writer.begin) and
broadcasts it; every rank writes and hashes its files in parallel while the model digest
streams to rank 0 one tensor at a time (each rank sends its pieces); rank 0 gathers every
rank's file table; if any rank failed, rank 0 removes the folder with every rank's partial
files (writer.abort) and every rank raises; otherwise rank 0 commits the manifest
(writer.finish: fence check, then rename or conditional PUT). The collectives run on a gloo
group of their own, so a commit can run in a background thread on every rank while training
goes on (the training thread must not change the snapshot's tensors meanwhile: take it with
`copy=True` for that).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.distributed as dist

from dist_train.checkpoint.faults import describe_error
from dist_train.checkpoint.digest import ModelDigest
from dist_train.checkpoint.serialization import TensorFile, _raw_bytes, flatten, tensor_file
from dist_train.checkpoint.writer import CheckpointWriter, Committed
from dist_train.distributed.env import DistEnv
from dist_train.errors import StorageError

log = logging.getLogger(__name__)

SHARDS = "shards"
SHARDED_FIELD = "sharded"  # manifest field: {"version", "world_size", "entries"}
LAYOUT_VERSION = 1
CHUNKS_KEY = "dist_train.chunks"
OBJECTS_KEY = "dist_train.objects"
SHARDED_ENTRIES = ("model", "optimizer")


def shard_file(rank: int, entry: str) -> str:
    return f"{SHARDS}/rank{rank:05d}/{entry}.safetensors"


def is_sharded(manifest: dict[str, Any]) -> bool:
    """The checkpoint was written by every rank (its model is in `shards/`, not `model.safetensors`)."""
    return isinstance(manifest.get(SHARDED_FIELD), dict)


class ShardedSaveError(StorageError):
    """Another rank (or this one) failed its part of a sharded save; nothing was committed."""


@dataclass(frozen=True)
class Piece:
    """This rank's piece of one tensor of the state: where it sits in the full (logical) tensor."""
    key: str                      # the entry's DCP key, e.g. "fc.weight" or "state.fc.weight.exp_avg"
    tensor: torch.Tensor          # CPU, contiguous
    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]
    sharded: bool = False         # a DTensor shard (else a whole replicated tensor)

    @property
    def whole(self) -> bool:
        return tuple(self.tensor.shape) == self.global_shape


@dataclass
class ShardSnapshot:
    """This rank's share of the state at a step, ready to write (CPU tensors)."""
    step: int
    rank: int
    world_size: int
    pieces: dict[str, list[Piece]]                                      # entry -> pieces, sorted by key
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)    # entry -> key -> JSON skeleton
    # rank 0: the model's whole (replicated) tensors, for the digest without sending them
    model_replicas: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this rank holds for the save (the bounded-memory claim)."""
        held = {id(p.tensor): p.tensor for pieces in self.pieces.values() for p in pieces}
        held.update({id(t): t for t in self.model_replicas.values()})
        return sum(t.numel() * t.element_size() for t in held.values())

    def files(self) -> dict[str, TensorFile]:
        out = {}
        for entry in sorted(set(self.pieces) | set(self.objects)):
            pieces = self.pieces.get(entry, [])
            objects = self.objects.get(entry, {})
            if not pieces and not objects:
                continue
            chunks = {p.key: [list(p.offsets), list(p.global_shape)] for p in pieces if not p.whole}
            metadata = {"format": "pt", CHUNKS_KEY: json.dumps(chunks, separators=(",", ":"))}
            if objects:
                metadata[OBJECTS_KEY] = json.dumps(objects, separators=(",", ":"))
            out[shard_file(self.rank, entry)] = tensor_file({p.key: p.tensor for p in pieces}, metadata)
        return out

    def model_layout(self) -> list[tuple[str, tuple[int, ...], tuple[int, ...], str, tuple[int, ...]]]:
        """(key, offsets, sizes, dtype, global shape) of this rank's model shards, in send order
        (whole replicated tensors are digested from rank 0's own copy, never sent)."""
        return [(p.key, p.offsets, tuple(p.tensor.shape), str(p.tensor.dtype), p.global_shape)
                for p in self.sent_pieces()]

    def sent_pieces(self) -> list[Piece]:
        return [p for p in self.pieces.get("model", []) if p.sharded]


# -- splitting a state into this rank's share ----------------------------------------------------

def flat_state(state: dict[str, Any]) -> dict[str, Any]:
    """The state's leaves under DCP's own flat keys (`model.fc.weight`), so a DCP program finds them."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _ = flatten_state_dict(state)
    return flat


# Rank 0 also streams the model digest: a digested byte costs about this fraction of a byte written
# and hashed (one sha256 pass against a sha256 pass plus the write; measured on local disk, where
# writing costs ~0.6 of hashing). Counting it keeps rank 0 from being the one every save waits for.
DIGEST_COST = 0.6


def assign_owners(sizes: dict[str, int], world_size: int, pinned: Iterable[str] = (),
                  rank0_load: int = 0) -> dict[str, int]:
    """Owner rank of each replicated tensor: `pinned` keys to rank 0, the rest balanced (see module doc).
    `rank0_load`: work rank 0 has besides its files (the digest), in written bytes."""
    load = [0] * world_size
    load[0] = rank0_load
    owners: dict[str, int] = {}
    for key in sorted(set(pinned) & set(sizes)):
        owners[key] = 0
        load[0] += sizes[key]
    for key in sorted((k for k in sizes if k not in owners), key=lambda k: (-sizes[k], k)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[key] = rank
        load[rank] += sizes[key]
    return owners


def _split_key(flat_key: str) -> tuple[str, str]:
    entry, _, key = flat_key.partition(".")
    return entry, key


def model_buffer_keys(model: torch.nn.Module) -> set[str]:
    """Flat keys of the model's buffers: plain tensors that only rank 0's copy of is saved."""
    from dist_train.distributed.parallel import unwrap

    return {f"model.{name}" for name, _ in unwrap(model).named_buffers()}


def collect_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Any], set[str]]:
    """`{"model": ..., "optimizer": ...}` as DCP sees it (FQN keys; DTensor shards under FSDP), and
    the keys pinned to rank 0. Works on DDP, FSDP2 and plain modules alike."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {"model": get_model_state_dict(model)}, model_buffer_keys(model)
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}, model_buffer_keys(model)


class _Buffers:
    """Reused CPU buffers for copies the training thread must not wait on (pinned for GPU sources)."""

    def __init__(self) -> None:
        self._by_key: dict[str, torch.Tensor] = {}

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self._by_key.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.device.type == "cuda")
            self._by_key[key] = buffer
        buffer.copy_(tensor.detach(), non_blocking=tensor.device.type == "cuda")
        return buffer


def take_share(state: dict[str, Any], rank: int, world_size: int, step: int, pinned: Iterable[str] = (),
               buffers: _Buffers | None = None) -> ShardSnapshot:
    """This rank's pieces of `state` (no collectives). With `buffers`, copies; else CPU views."""
    from torch.distributed.tensor import DTensor

    flat = flat_state(state)
    replicated: dict[str, torch.Tensor] = {}
    pieces: dict[str, list[Piece]] = {}
    objects: dict[str, dict[str, Any]] = {}

    def cpu(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if buffers is not None:
            return buffers.copy(key, tensor)
        return tensor.detach().to("cpu").contiguous()

    for flat_key, value in flat.items():
        entry, key = _split_key(flat_key)
        if isinstance(value, DTensor):
            if all(p.is_replicate() for p in value.placements):
                replicated[flat_key] = value.to_local()
                continue
            if value.device_mesh.ndim != 1:
                raise NotImplementedError(f"{flat_key}: sharded saves support 1-D device meshes (FSDP) only")
            local = value.to_local()
            if local.numel() == 0:
                continue
            chunk = value.__create_chunk_list__()[0]
            pieces.setdefault(entry, []).append(
                Piece(key, cpu(flat_key, local), tuple(chunk.offsets), tuple(value.shape), sharded=True))
        elif isinstance(value, torch.Tensor):
            replicated[flat_key] = value
        elif rank == 0:
            skeleton, tensors = flatten(value)
            assert not tensors
            objects.setdefault(entry, {})[key] = skeleton
    sizes = {k: t.numel() * t.element_size() for k, t in replicated.items()}
    digested = sum(size for key, size in sizes.items() if _split_key(key)[0] == "model")  # by rank 0
    owners = assign_owners(sizes, world_size, pinned, rank0_load=int(DIGEST_COST * digested))
    replicas: dict[str, torch.Tensor] = {}
    for flat_key, tensor in replicated.items():
        entry, key = _split_key(flat_key)
        if owners[flat_key] == rank or (rank == 0 and entry == "model"):
            tensor = cpu(flat_key, tensor)
        if owners[flat_key] == rank:
            shape = tuple(tensor.shape)
            pieces.setdefault(entry, []).append(Piece(key, tensor, (0,) * len(shape), shape))
        if rank == 0 and entry == "model":
            replicas[key] = tensor
    for entry_pieces in pieces.values():
        entry_pieces.sort(key=lambda p: (p.key, p.offsets))
    return ShardSnapshot(step, rank, world_size, pieces, objects, replicas)


# -- the collective commit ------------------------------------------------------------------------

def _tiles_rows(chunks: list[tuple[tuple[int, ...], tuple[int, ...], int]], shape: tuple[int, ...]) -> bool:
    """The pieces, in offset order, are whole row blocks one after the other: their bytes concatenate
    to the full tensor's C-order bytes, so the digest can be fed without assembling it."""
    if not shape:
        return len(chunks) == 1
    row = 0
    for offsets, sizes, _ in chunks:
        if offsets[0] != row or any(offsets[1:]) or tuple(sizes[1:]) != tuple(shape[1:]):
            return False
        row += sizes[0]
    return row == shape[0]


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _digest_plan(layouts: list[list[tuple]] | None, replicas: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Rank 0: every model tensor's dtype, shape and pieces (offsets, sizes, rank), checked to cover it."""
    tensors: dict[str, dict[str, Any]] = {}
    for key, tensor in replicas.items():
        shape = tuple(tensor.shape)
        tensors[key] = {"dtype": tensor.dtype, "shape": shape, "chunks": [((0,) * len(shape), shape, 0)]}
    for rank, layout in enumerate(layouts or []):
        for key, offsets, sizes, dtype, shape in layout:
            info = tensors.setdefault(key, {"dtype": _dtype(dtype), "shape": tuple(shape), "chunks": []})
            info["chunks"].append((tuple(offsets), tuple(sizes), rank))
    for key, info in tensors.items():
        info["chunks"].sort()
        covered = sum(_numel(sizes) for _, sizes, _ in info["chunks"])
        if covered != _numel(info["shape"]):
            raise ShardedSaveError(f"model tensor {key}: the ranks' pieces cover {covered} of "
                                   f"{_numel(info['shape'])} elements")
    return tensors


class ShardedSaver:
    """Every rank's side of a sharded save. Build it on every rank at the same time (it makes a group).

        saver = ShardedSaver(env, writer)        # writer: a CheckpointWriter on every rank
                                                 # (its fencing registry on rank 0 only)
        snap = saver.snapshot(step, state, pinned, copy=async_mode)   # training thread, no collectives
        committed = saver.commit(snap, fields, rank0_files)           # collective; may run in a thread
    """

    def __init__(self, env: DistEnv, writer: CheckpointWriter, group: Any = None):
        self.env = env
        self.writer = writer
        if group is None and env.distributed:
            group = dist.new_group(backend="gloo")
        self.group = group
        self._buffers = _Buffers()

    def snapshot(self, step: int, state: dict[str, Any], pinned: Iterable[str] = (),
                 copy: bool = False) -> ShardSnapshot:
        """This rank's share of `state` (from `collect_state`). `copy`: into reused CPU buffers, so the
        training thread may change the state while the commit runs; otherwise CPU views of the live tensors."""
        snap = take_share(state, self.env.rank, self.env.world_size, step, pinned,
                          self._buffers if copy else None)
        if copy and torch.cuda.is_available():
            torch.cuda.synchronize()  # the non_blocking copies to pinned memory have landed
        return snap

    # collectives on our own group
    def _broadcast(self, obj: Any) -> Any:
        if self.group is None:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0, group=self.group)
        return holder[0]

    def _gather(self, obj: Any) -> list[Any] | None:
        if self.group is None:
            return [obj]
        out = [None] * self.env.world_size if self.env.is_rank0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def commit(self, snap: ShardSnapshot, fields: dict[str, Any],
               rank0_files: dict[str, TensorFile | bytes] | None = None) -> Committed:
        """Write this rank's share and commit the checkpoint (collective over every rank).

        `fields`: the manifest fields (epoch, world_size, ...; `model_digest` is computed here).
        `rank0_files`: whole entries rank 0 writes beside the shards (trainer state, RNG).
        Raises on every rank when the checkpoint was not committed.
        """
        env = self.env
        layouts = self._gather(snap.model_layout())
        folder, error, tensors = None, None, None
        if env.is_rank0:
            try:
                tensors = _digest_plan(layouts, snap.model_replicas)
                folder = self.writer.begin(snap.step)
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it
                error = exc
        folder, begin_error = self._broadcast((folder, None if error is None else str(error)))
        if begin_error is not None:
            raise error if error is not None else ShardedSaveError(f"rank 0 could not start the save: {begin_error}")

        # The digest streams to rank 0 (on our group) while every rank writes and hashes its files.
        digest: list[Any] = [None, None]

        def stream() -> None:
            try:
                digest[0] = self._stream_digest(snap, tensors)
            except BaseException as exc:  # noqa: BLE001 - re-raised after the join
                digest[1] = exc
        streamer = threading.Thread(target=stream, name="ckpt-digest", daemon=True)
        streamer.start()
        own_error: BaseException | None = None
        table: dict[str, Any] = {}
        try:
            files = snap.files()
            if env.is_rank0:
                files.update(rank0_files or {})
            if not env.is_rank0 and self.writer.storage.is_local and not self.writer.storage.exists(folder):
                raise ShardedSaveError(f"{self.writer.storage.url(folder)} does not exist on rank {env.rank}: "
                                       "every rank must see the run dir (shared filesystem or object store)")
            table = self.writer.write_part(folder, files)
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, raised below
            own_error = exc
            log.error("rank %d could not write its checkpoint share: %s", env.rank, exc)
        streamer.join()
        if digest[1] is not None and own_error is None:
            own_error = digest[1]
        reports = self._gather((table, None if own_error is None else f"rank {env.rank}: {own_error}"))

        decision = None
        if env.is_rank0:
            problems = [report[1] for report in reports if report[1]]
            if problems:
                self.writer.abort(folder)
                decision = problems[0]
        decision = self._broadcast(decision)
        if decision is not None:
            raise own_error if own_error is not None else ShardedSaveError(f"checkpoint not committed: {decision}")

        outcome: Any = None
        finish_error: BaseException | None = None
        if env.is_rank0:
            merged: dict[str, Any] = {}
            for report in reports:
                merged.update(report[0])
            manifest_fields = dict(fields)
            entries = sorted({rel.rsplit("/", 1)[1].removesuffix(".safetensors")
                              for rel in merged if rel.startswith(f"{SHARDS}/")})
            manifest_fields.update({"model_digest": digest[0], SHARDED_FIELD: {
                "version": LAYOUT_VERSION, "world_size": env.world_size, "entries": entries}})
            try:
                outcome = self.writer.finish(snap.step, folder, merged, manifest_fields)
            except Exception as exc:  # noqa: BLE001 - raised on rank 0 below, reported to the others
                finish_error = exc
                outcome = str(exc)
        if env.is_rank0 and isinstance(outcome, Committed):
            # The manifest is written: the checkpoint is committed whatever happens next. A peer that
            # died right after the commit must not turn it into a logged failure on rank 0.
            try:
                self._broadcast(outcome)
            except Exception as exc:  # noqa: BLE001 - the peers' side of the collective is gone
                log.warning("committed step %d, but could not tell every rank (%s): a peer has stopped",
                            snap.step, describe_error(exc))
            return outcome
        outcome = self._broadcast(outcome)
        if finish_error is not None:
            raise finish_error
        if not isinstance(outcome, Committed):
            raise ShardedSaveError(f"checkpoint not committed: {outcome}")
        return outcome

    def _stream_digest(self, snap: ShardSnapshot, tensors: dict[str, dict[str, Any]] | None) -> str | None:
        """The model digest on rank 0, fed one tensor at a time: every other rank sends its pieces of
        the model in key order; rank 0 feeds row blocks straight into sha256 and assembles (one
        tensor at a time) only pieces that are not whole row blocks."""
        if not self.env.is_rank0:
            for piece in snap.sent_pieces():
                if piece.tensor.numel():
                    dist.send(_as_bytes(piece.tensor), dst=0, group=self.group)
            return None
        own = {(p.key, p.offsets): p.tensor for p in snap.sent_pieces()}
        own.update({(key, (0,) * tensor.dim()): tensor for key, tensor in snap.model_replicas.items()})
        digest = ModelDigest()  # the one definition of model_digest (digest.py), streamed
        failure: Exception | None = None  # after a failure, keep receiving: the senders must not hang
        for key in sorted(tensors or {}):
            info = tensors[key]
            dtype, shape, chunks = info["dtype"], info["shape"], info["chunks"]
            rows = _tiles_rows(chunks, shape)
            full = None if rows else torch.empty(shape, dtype=dtype)
            if failure is None:
                digest.begin(key, dtype, shape)
            for offsets, sizes, rank in chunks:
                piece = self._piece(own, key, offsets, sizes, dtype, rank)
                if failure is not None:
                    continue
                try:
                    if rows:
                        digest.update(_raw_bytes(piece))
                        continue
                    region = full
                    for dim, (start, length) in enumerate(zip(offsets, sizes)):
                        region = region.narrow(dim, start, length)
                    region.copy_(piece)
                except Exception as exc:  # noqa: BLE001 - raised once every piece was received
                    failure = exc
            if full is not None and failure is None:
                digest.update(_raw_bytes(full))
        if failure is not None:
            raise failure
        return digest.hexdigest()

    def _piece(self, own: dict, key: str, offsets: tuple, sizes: tuple, dtype: torch.dtype, rank: int) -> torch.Tensor:
        if rank == 0:
            return own[(key, offsets)]
        if not _numel(sizes):
            return torch.empty(sizes, dtype=dtype)
        buffer = torch.empty(_numel(sizes) * torch.empty((), dtype=dtype).element_size(), dtype=torch.uint8)
        dist.recv(buffer, src=rank, group=self.group)
        return buffer.view(dtype).reshape(sizes)


def _numel(shape: Iterable[int]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)
