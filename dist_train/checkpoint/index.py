"""Where every tensor piece of a checkpoint lives: the map that loading on any number of ranks reads by.

Built from the manifest and the safetensors headers alone (two small ranged reads per
file; no tensor data, no pickle), for both layouts:

- written by rank 0: `model.safetensors` holds whole tensors; `optimizer.safetensors` is
  torch's optimizer state_dict as a JSON skeleton over tensors `t0..tN`, keyed by integer
  parameter ids (mapped to parameter names when `param_names` is given, so it loads into
  the FQN-keyed state `get_state_dict` gives, e.g. under FSDP);
- written by every rank (sharded.py): `shards/rank*/<entry>.safetensors`, pieces with
  their global offsets.

Keys are DCP's flat keys (`model.fc.weight`, `optimizer.state.fc.weight.exp_avg`,
`optimizer.param_groups.0.lr`): the names `torch.distributed.checkpoint` gives the leaves
of `{"model": ..., "optimizer": ...}`.

Integrity: `verify_share` hashes the listed files split over the ranks (each file once in
all), so a sharded load checks every byte once before any of it is used, and every rank
learns of a problem any rank found (it is collective) before the ranks go their ways.
Reads after that are ranged and trust the check (a file replaced in between is caught by
its size at best, as with any read-after-verify).

One read per job on object stores (issue 20): each file is verified by the rank that will
load it (a same-size sharded load: rank r its own `shards/rank r` files), which keeps the
verified bytes for that load instead of fetching them again, and the ranks exchange the
files' safetensors headers (every rank's index needs all of them) instead of each fetching
them. On local disk nothing is kept: the load re-reads from the page cache at memory speed.
"""

from __future__ import annotations

import json
import struct
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from dist_train.checkpoint import digest
from dist_train.checkpoint.serialization import MAX_HEADER, SKELETON_KEY, _DTYPES, FormatError, unflatten
from dist_train.checkpoint.restore import plan  # one split of whole files between readers
from dist_train.checkpoint.sharded import CHUNKS_KEY, OBJECTS_KEY, SHARDED_FIELD, SHARDS, is_sharded
from dist_train.checkpoint.storage import Storage

DTYPES = {code: dtype for dtype, code in _DTYPES.items()}
ENTRIES = ("model", "optimizer")


@dataclass(frozen=True)
class Chunk:
    """One stored piece: its bytes `[start, end)` in `file`, its place in the full tensor."""
    file: str
    start: int
    end: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: list[Chunk] = field(default_factory=list)


@dataclass
class CheckpointIndex:
    folder: Storage
    manifest: dict[str, Any]
    tensors: dict[str, TensorInfo]
    objects: dict[str, Any]

    def keys(self, entry: str) -> list[str]:
        prefix = f"{entry}."
        return sorted(k for k in self.tensors if k.startswith(prefix))

    @property
    def files(self) -> list[str]:
        return sorted({c.file for info in self.tensors.values() for c in info.chunks})


# -- raw reads ------------------------------------------------------------------------------------

# Bytes already fetched and verified (whole files) or exchanged (header prefixes), per folder object:
# the load that follows `verify_share` reads them from here. Weak: gone with the folder (see `release`).
# Each file's held segments: (offset in the file, bytes).
_HELD: "weakref.WeakKeyDictionary[Storage, dict[str, list[tuple[int, Any]]]]" = weakref.WeakKeyDictionary()


def release(folder: Storage) -> None:
    """Drop the bytes `verify_share` kept for `folder` (the load is done)."""
    _HELD.pop(folder, None)


def read_range(folder: Storage, rel: str, start: int, end: int) -> bytes:
    """Bytes `[start, end)` of a file; a short read is a damaged file."""
    if end <= start:
        return b""
    for offset, held in _HELD.get(folder, {}).get(rel, ()):
        if offset <= start and end <= offset + len(held):
            return held[start - offset:end - offset]
    data = folder.read_range(rel, start, end)
    if len(data) != end - start:
        raise FormatError(f"{rel}: short read ({len(data)} of {end - start} bytes at {start})")
    return data


def read_header(folder: Storage, rel: str, size: int) -> tuple[dict[str, Any], int]:
    """A safetensors file's header and where its data starts."""
    if size < 8:
        raise FormatError(f"{rel} is too short to be safetensors")
    (length,) = struct.unpack("<Q", read_range(folder, rel, 0, 8))
    if length > min(MAX_HEADER, size - 8):
        raise FormatError(f"{rel}: safetensors header length is out of range")
    try:
        header = json.loads(read_range(folder, rel, 8, 8 + length))
    except ValueError:
        raise FormatError(f"{rel}: safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise FormatError(f"{rel}: safetensors header is not an object")
    return header, 8 + length


def _entries_of(header: dict[str, Any], rel: str, data_start: int,
                size: int) -> dict[str, tuple[torch.dtype, tuple, int, int]]:
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{rel}: malformed header entry {name!r}") from None
        nbytes = torch.empty((), dtype=dtype).element_size()
        for dim in shape:
            nbytes *= dim
        if begin < 0 or end - begin != nbytes or data_start + end > size:
            raise FormatError(f"{rel}: tensor {name!r} lies outside the file or has the wrong length")
        out[name] = (dtype, shape, data_start + begin, data_start + end)
    return out


# -- building the index ---------------------------------------------------------------------------

def _add(index: dict[str, TensorInfo], key: str, dtype: torch.dtype, shape: tuple, chunk: Chunk) -> None:
    info = index.get(key)
    if info is None:
        info = index[key] = TensorInfo(dtype, shape)
    elif info.dtype != dtype or info.shape != shape:
        raise FormatError(f"tensor {key}: pieces disagree on dtype or shape")
    info.chunks.append(chunk)


def _metadata_json(header: dict[str, Any], key: str, rel: str) -> Any:
    raw = (header.get("__metadata__") or {}).get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise FormatError(f"{rel}: {key} metadata is not JSON") from None


def _index_sharded(folder: Storage, manifest: dict[str, Any], entries: tuple[str, ...],
                   tensors: dict[str, TensorInfo], objects: dict[str, Any]) -> None:
    for rel, entry_info in sorted(manifest["files"].items()):
        parts = rel.split("/")
        if len(parts) != 3 or parts[0] != SHARDS or not parts[2].endswith(".safetensors"):
            continue
        entry = parts[2][: -len(".safetensors")]
        if entry not in entries:
            continue
        header, data_start = read_header(folder, rel, entry_info["size"])
        chunks = _metadata_json(header, CHUNKS_KEY, rel) or {}
        for name, (dtype, shape, begin, end) in _entries_of(header, rel, data_start, entry_info["size"]).items():
            offsets, global_shape = chunks.get(name, [[0] * len(shape), list(shape)])
            _add(tensors, f"{entry}.{name}", dtype, tuple(global_shape),
                 Chunk(rel, begin, end, tuple(offsets), shape))
        for name, skeleton in (_metadata_json(header, OBJECTS_KEY, rel) or {}).items():
            objects[f"{entry}.{name}"] = unflatten(skeleton, {})


def _index_whole(folder: Storage, manifest: dict[str, Any], entries: tuple[str, ...], param_names: list[str] | None,
                 tensors: dict[str, TensorInfo], objects: dict[str, Any]) -> None:
    files = manifest["files"]
    if "model" in entries and "model.safetensors" in files:
        rel = "model.safetensors"
        header, data_start = read_header(folder, rel, files[rel]["size"])
        for name, (dtype, shape, begin, end) in _entries_of(header, rel, data_start, files[rel]["size"]).items():
            _add(tensors, f"model.{name}", dtype, shape, Chunk(rel, begin, end, (0,) * len(shape), shape))
    if "optimizer" in entries and "optimizer.safetensors" in files:
        rel = "optimizer.safetensors"
        header, data_start = read_header(folder, rel, files[rel]["size"])
        stored = _entries_of(header, rel, data_start, files[rel]["size"])
        skeleton = _metadata_json(header, SKELETON_KEY, rel)
        if skeleton is None:
            raise FormatError(f"{rel} carries no state skeleton")
        placeholders = {name: torch.empty(shape, dtype=dtype, device="meta")
                        for name, (dtype, shape, _, _) in stored.items()}
        where = {id(t): name for name, t in placeholders.items()}
        tree = unflatten(skeleton, placeholders)
        if param_names is not None:
            tree = _name_params(tree, param_names)
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict

        flat, _ = flatten_state_dict({"optimizer": tree})
        for key, value in flat.items():
            if isinstance(value, torch.Tensor) and id(value) in where:
                dtype, shape, begin, end = stored[where[id(value)]]
                _add(tensors, key, dtype, shape, Chunk(rel, begin, end, (0,) * len(shape), shape))
            else:
                objects[key] = value


def _name_params(tree: Any, names: list[str]) -> Any:
    """torch's optimizer state_dict (integer ids) keyed by parameter names instead, as get_state_dict has it."""
    if not isinstance(tree, dict) or "state" not in tree or "param_groups" not in tree:
        raise FormatError("optimizer state has the wrong structure")

    def name(pid: Any) -> str:
        if not isinstance(pid, int) or not 0 <= pid < len(names):
            raise FormatError(f"optimizer state refers to parameter {pid!r}, the model has {len(names)}")
        return names[pid]

    groups = [dict(group, params=[name(p) for p in group.get("params", [])]) for group in tree["param_groups"]]
    return {"state": {name(pid): value for pid, value in tree["state"].items()}, "param_groups": groups}


def build_index(folder: Storage, manifest: dict[str, Any], entries: tuple[str, ...] = ENTRIES,
                param_names: list[str] | None = None) -> CheckpointIndex:
    """The index of `entries` of a checkpoint (either layout). FormatError when a header is damaged."""
    tensors: dict[str, TensorInfo] = {}
    objects: dict[str, Any] = {}
    if is_sharded(manifest):
        _index_sharded(folder, manifest, entries, tensors, objects)
    else:
        _index_whole(folder, manifest, entries, param_names, tensors, objects)
    for key, info in tensors.items():
        info.chunks.sort(key=lambda c: c.offsets)
        covered = sum(_numel(c.sizes) for c in info.chunks)
        if covered != _numel(info.shape):
            raise FormatError(f"tensor {key}: stored pieces cover {covered} of {_numel(info.shape)} elements")
    return CheckpointIndex(folder, manifest, tensors, objects)


def _numel(shape) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


# -- reading tensors ------------------------------------------------------------------------------

def read_region(index: CheckpointIndex, key: str, chunk: Chunk, offsets: tuple[int, ...] | None = None,
                lengths: tuple[int, ...] | None = None) -> torch.Tensor:
    """The part `offsets`/`lengths` (relative to the piece) of a stored piece, as a CPU tensor.

    A block of whole rows is read as one byte range; anything else reads the piece and narrows it.
    """
    dtype = index.tensors[key].dtype
    sizes = chunk.sizes
    if offsets is None or lengths is None:
        offsets, lengths = (0,) * len(sizes), tuple(sizes)
    item = torch.empty((), dtype=dtype).element_size()
    if sizes and all(o == 0 for o in offsets[1:]) and tuple(lengths[1:]) == tuple(sizes[1:]):
        row = item * _numel(sizes[1:])
        start = chunk.start + offsets[0] * row
        data = read_range(index.folder, chunk.file, start, start + lengths[0] * row)
        return _tensor(data, dtype, lengths)
    whole = _tensor(read_range(index.folder, chunk.file, chunk.start, chunk.end), dtype, sizes)
    for dim, (start, length) in enumerate(zip(offsets, lengths)):
        whole = whole.narrow(dim, start, length)
    return whole


def _tensor(data: bytes, dtype: torch.dtype, shape) -> torch.Tensor:
    if not data:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(tuple(shape))


def full_tensor(index: CheckpointIndex, key: str) -> torch.Tensor:
    """One tensor, whole, assembled from its pieces (memory: the tensor plus one piece)."""
    info = index.tensors[key]
    if len(info.chunks) == 1 and info.chunks[0].sizes == info.shape:
        return read_region(index, key, info.chunks[0])
    full = torch.empty(info.shape, dtype=info.dtype)
    for chunk in info.chunks:
        region = full
        for dim, (start, length) in enumerate(zip(chunk.offsets, chunk.sizes)):
            region = region.narrow(dim, start, length)
        region.copy_(read_region(index, key, chunk))
    return full


def iter_full(index: CheckpointIndex, entry: str = "model") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of an entry in key order, one at a time."""
    prefix = len(entry) + 1
    for key in index.keys(entry):
        yield key[prefix:], full_tensor(index, key)


def read_full_model(folder: Storage, manifest: dict[str, Any], verify_sha: bool = True) -> dict[str, torch.Tensor]:
    """The model's whole state_dict from a checkpoint of either layout, in one process (inference,
    export). `verify_sha` checks the model files first; FormatError/ValueError name a damaged file."""
    index = build_index(folder, manifest, entries=("model",))
    try:
        if verify_sha:
            problem = verify_share(folder, manifest, names=index.files)
            if problem:
                raise FormatError(problem)
        return dict(iter_full(index))
    finally:
        release(folder)


# -- integrity ------------------------------------------------------------------------------------

def verifiers(manifest: dict[str, Any], names: list[str], world_size: int) -> dict[str, int]:
    """The rank that verifies each file: a same-size sharded load's shards go to the rank that loads them
    (`shards/rank r` to rank r); the rest, largest first, to the least-loaded rank (ties: lowest rank).
    Computed alike on every rank from the manifest alone."""
    files = manifest.get("files") or {}
    sizes = {name: int((files.get(name) or {}).get("size") or 0) for name in names}
    saved = (manifest.get(SHARDED_FIELD) or {}).get("world_size") if is_sharded(manifest) else None
    load = [0] * max(1, world_size)
    owners: dict[str, int] = {}
    for name in names:
        parts = name.split("/")
        if saved == world_size and len(parts) == 3 and parts[0] == SHARDS and parts[1].startswith("rank"):
            try:
                rank = int(parts[1][4:])
            except ValueError:
                continue
            if 0 <= rank < world_size:
                owners[name] = rank
                load[rank] += sizes[name]
    owners.update(plan({n: sizes[n] for n in names if n not in owners}, world_size, load))
    return owners


def verify_share(folder: Storage, manifest: dict[str, Any], rank: int = 0, world_size: int = 1,
                 names: list[str] | None = None) -> str | None:
    """Check size and sha256 of this rank's share of the listed files (`verifiers`): the first problem
    any rank found, or None. With `world_size` > 1 it is collective (every rank calls it with the same
    names, in a process group): together the ranks read each file once, and all of them return the
    same answer. On an object store the verified bytes are kept for the load (see module doc)."""
    names = sorted(names if names is not None else manifest["files"])
    owners = verifiers(manifest, names, world_size)
    keep = not folder.is_local
    held: dict[str, bytearray] = {}
    problem = None
    for name in names:
        if owners[name] != rank:
            continue
        problem = _verify_one(folder, manifest, name, held if keep else None)
        if problem:
            break
    headers = {}
    if keep:
        headers = {name: bytes(_header_prefix(data)) for name, data in held.items() if name.endswith(".safetensors")}
    if world_size > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, (problem, headers))
        problem = next((p for p, _ in gathered if p), None)
        for _, theirs in gathered:
            for name, prefix in theirs.items():
                headers.setdefault(name, prefix)
    if problem is None and keep:
        segments: dict[str, list[tuple[int, Any]]] = {name: [(0, data)] for name, data in held.items()}
        for name, prefix in headers.items():
            segments.setdefault(name, [(0, prefix)])
        if world_size > 1 and _same_size(manifest, world_size):
            _share_whole_tensors(manifest, names, owners, rank, held, headers, segments)
        _HELD.setdefault(folder, {}).update(segments)
    return problem


def _same_size(manifest: dict[str, Any], world_size: int) -> bool:
    return is_sharded(manifest) and (manifest.get(SHARDED_FIELD) or {}).get("world_size") == world_size


def _share_whole_tensors(manifest: dict[str, Any], names: list[str], owners: dict[str, int], rank: int,
                         held: dict[str, bytearray], headers: dict[str, bytes],
                         segments: dict[str, list[tuple[int, Any]]]) -> None:
    """The whole (replicated) tensors of a same-size sharded load, from their verifier to every rank
    (collective). Every rank loads them (optimizer step counters, model buffers; all of DDP's state),
    so each would otherwise fetch them from the store itself; DTensor shards stay with their rank."""
    import torch.distributed as dist

    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    for name in names:
        prefix = headers.get(name)
        if not prefix:
            continue
        header = json.loads(bytes(prefix[8:]))
        chunks = _metadata_json(header, CHUNKS_KEY, name) or {}
        size = int(manifest["files"][name]["size"])
        ranges = sorted((begin, end) for key, (_, _, begin, end) in _entries_of(header, name, len(prefix), size).items()
                        if key not in chunks and end > begin)
        total = sum(end - begin for begin, end in ranges)
        if not total:
            continue
        if owners[name] == rank:
            data = held[name]
            buffer = torch.frombuffer(bytearray(b"".join(data[begin:end] for begin, end in ranges)), dtype=torch.uint8)
        else:
            buffer = torch.empty(total, dtype=torch.uint8)
        buffer = buffer.to(device)
        dist.broadcast(buffer, src=owners[name])
        if owners[name] == rank:
            continue
        received = buffer.cpu().numpy().tobytes()
        position = 0
        for begin, end in ranges:
            segments.setdefault(name, []).append((begin, received[position:position + end - begin]))
            position += end - begin


def _verify_one(folder: Storage, manifest: dict[str, Any], name: str,
                held: dict[str, bytearray] | None) -> str | None:
    entry = manifest["files"].get(name)
    if entry is None:
        return f"manifest does not list {name}"
    size = folder.size(name)
    if size is None:
        return f"file {name} is missing"
    if size != entry["size"]:
        return f"file {name} is {size} bytes, manifest says {entry['size']}"
    try:
        if held is None:
            digest.verify_file(folder, name, entry)  # the chunk digests on several threads when listed
        else:
            from dist_train.checkpoint.reader import read_bytes

            held[name] = read_bytes(folder, manifest, name, verify_sha=True)
    except FileNotFoundError:
        return f"file {name} is missing"
    except digest.CorruptCheckpoint as exc:
        return str(exc)
    return None


def _header_prefix(data: bytearray) -> bytes | bytearray:
    """A safetensors file's first bytes up to its tensor data (what `read_header` reads)."""
    if len(data) < 8:
        return b""
    (length,) = struct.unpack("<Q", data[:8])
    return data[: 8 + length] if 8 + length <= len(data) else b""


__all__ = ["CheckpointIndex", "Chunk", "TensorInfo", "build_index", "full_tensor", "iter_full", "read_full_model",
           "read_region", "verify_share", "verifiers", "release", "read_range", "read_header"]
