"""The digests of checkpoint files and of model weights: one place that writes and checks them.

A manifest's file entry is `{"size", "sha256"}` (the contract) plus, since chunked
verification, `"chunk_size"` and `"chunk_sha256"`: the sha256 of each `chunk_size`-byte
range of the file in order (the last one shorter). sha256 is sequential, so the whole-file
digest verifies on one core (~1.1 GB/s on this project's 2-vCPU machine, slower than a
local read); chunk digests verify on every core (hashlib drops the GIL for large
buffers), can be checked while the file is still being read, and let a ranged read (or a
rank reading its share of a file) be checked on its own.

The writer computes both (the whole-file sha256 stays valid for outside tools and
`sha256sum`; the two passes run on two threads beside the write). A reader checks the
chunks when the entry has them, else the whole-file sha256 (manifests written before
chunking keep verifying): both cover every byte, and the chunk list is itself in the
manifest, so they are equally strong.

`model_digest` is the manifest's fingerprint of the weights (not of the file bytes); the
streamed form (`ModelDigest`) is what sharded and parallel models feed row blocks into.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import threading
from typing import Any, Iterable, Mapping

import torch

CHUNK_SIZE = 4 * 2**20  # small enough to split a file evenly across threads and ranks; ~1.5 ms of sha256
MAX_CHUNKS = 2**22


class CorruptCheckpoint(Exception):
    """A listed file is missing, of the wrong size, fails its sha256, or does not parse."""


# -- a shared pool for chunk hashing ---------------------------------------------------------------

_pool: cf.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def hash_threads() -> int:
    """Threads that hash chunks: one per core the process may run on (at least 2)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 2
    return max(2, cores)


def pool() -> cf.ThreadPoolExecutor:
    """The process-wide chunk-hashing pool (its tasks never wait on anything, so sharing cannot deadlock)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = cf.ThreadPoolExecutor(hash_threads(), thread_name_prefix="ckpt-digest")
        return _pool


def _sha(views: Iterable[Any]) -> str:
    digest = hashlib.sha256()
    for view in views:
        digest.update(view)
    return digest.hexdigest()


def _bytes_view(data: Any) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _rechunk(buffers: Iterable[Any], chunk_size: int) -> Iterable[list[memoryview]]:
    """The buffers' bytes cut at every `chunk_size` boundary of the stream: one list of views per chunk."""
    current: list[memoryview] = []
    filled = 0
    for buffer in buffers:
        view = _bytes_view(buffer)
        while len(view):
            take = min(len(view), chunk_size - filled)
            current.append(view[:take])
            view = view[take:]
            filled += take
            if filled == chunk_size:
                yield current
                current, filled = [], 0
    if current:
        yield current


# -- writer side -----------------------------------------------------------------------------------

def file_entry(buffers: Iterable[Any], chunk_size: int = CHUNK_SIZE) -> dict[str, Any]:
    """The manifest entry of a file given as its buffers in order: size, sha256, chunk digests.

    The whole-file sha256 runs on this thread while the chunks hash on the shared pool
    (two passes over the memory, on different cores). Every writer records entries made here.
    """
    buffers = list(buffers)
    chunks = list(_rechunk(buffers, chunk_size))
    futures = [pool().submit(_sha, views) for views in chunks]
    try:
        whole = hashlib.sha256()
        size = 0
        for views in chunks:
            for view in views:
                whole.update(view)
                size += len(view)
        return {"size": size, "sha256": whole.hexdigest(), "chunk_size": chunk_size,
                "chunk_sha256": [f.result() for f in futures]}
    finally:
        for future in futures:
            future.cancel()


def check_entry(name: str, entry: dict[str, Any]) -> str | None:
    """Why a manifest entry's chunk fields are malformed, or None (entries without chunks are fine)."""
    if "chunk_sha256" not in entry and "chunk_size" not in entry:
        return None
    size, chunk, digests = entry.get("size"), entry.get("chunk_size"), entry.get("chunk_sha256")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0:
        return f"manifest chunk_size of {name} is not a positive integer"
    if not isinstance(digests, list) or len(digests) > MAX_CHUNKS:
        return f"manifest chunk_sha256 of {name} is not a list"
    count = -(-size // chunk)
    if len(digests) != count and not (size == 0 and len(digests) == 1):
        return f"manifest chunk_sha256 of {name} has {len(digests)} digests for {size} bytes"
    if not all(isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d) for d in digests):
        return f"manifest chunk_sha256 of {name} holds a malformed digest"
    return None


# -- reader side -----------------------------------------------------------------------------------

def _has_chunks(entry: dict[str, Any]) -> bool:
    return bool(entry.get("chunk_size")) and isinstance(entry.get("chunk_sha256"), list)


def chunk_ranges(file_entry: dict[str, Any]) -> list[tuple[int, int]]:
    """(offset, length) ranges of the file that verify on their own (the whole file without chunk digests)."""
    size = int(file_entry["size"])
    if not _has_chunks(file_entry):
        return [(0, size)]
    step = int(file_entry["chunk_size"])
    return [(start, min(step, size - start)) for start in range(0, size, step)] or [(0, 0)]


def _corrupt(name: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"file {name} does not match its sha256 (corrupted)")


def verify_bytes(file_entry: dict[str, Any], data: Any, *, offset: int = 0, name: str | None = None) -> None:
    """Check `data` (the file's bytes from `offset` on) against the entry; CorruptCheckpoint if it differs.

    The whole file (offset 0, all `size` bytes) always verifies; with chunk digests any
    chunk-aligned range does too (chunks hashed on the shared pool, side by side).
    """
    name = name or file_entry.get("name") or "?"
    view = _bytes_view(data)
    size = int(file_entry["size"])
    end = offset + len(view)
    if offset < 0 or end > size:
        raise CorruptCheckpoint(f"file {name}: range {offset}..{end} is outside its {size} bytes")
    if not _has_chunks(file_entry):
        if offset != 0 or end != size:
            raise ValueError(f"file {name}: its manifest entry has no chunk digests, only the whole file verifies")
        if _sha([view]) != file_entry["sha256"]:
            raise _corrupt(name)
        return
    step = int(file_entry["chunk_size"])
    if offset % step or (end % step and end != size):
        raise ValueError(f"file {name}: range {offset}..{end} is not aligned to its {step}-byte chunks")
    expected = file_entry["chunk_sha256"][offset // step:-(-end // step)]
    pieces = [view[i:i + step] for i in range(0, len(view), step)] or [view]
    futures = [pool().submit(_sha, [piece]) for piece in pieces]
    if [f.result() for f in futures] != list(expected):
        raise _corrupt(name)


class Verifier:
    """A file's check fed its bytes in file order, like a hash object: `update(view)` then `check()`.

    With chunk digests each completed chunk is hashed on the shared pool (the views must
    stay valid until `check`: they point into the destination memory); without, the
    whole-file sha256 runs here, sequentially, as before.
    """

    def __init__(self, name: str, entry: dict[str, Any]):
        self.name, self.entry = name, entry
        self.chunked = _has_chunks(entry)
        self.step = int(entry["chunk_size"]) if self.chunked else 0
        self.whole = None if self.chunked else hashlib.sha256()
        self.current: list[memoryview] = []
        self.filled = 0
        self.futures: list[cf.Future] = []

    def update(self, data: Any) -> None:
        if self.whole is not None:
            self.whole.update(data)
            return
        view = _bytes_view(data)
        while len(view):
            take = min(len(view), self.step - self.filled)
            self.current.append(view[:take])
            view = view[take:]
            self.filled += take
            if self.filled == self.step:
                self._submit()

    def _submit(self) -> None:
        self.futures.append(pool().submit(_sha, self.current))
        self.current, self.filled = [], 0

    def check(self) -> None:
        """CorruptCheckpoint unless every byte fed matched."""
        if self.whole is not None:
            if self.whole.hexdigest() != self.entry["sha256"]:
                raise _corrupt(self.name)
            return
        if self.current or not self.futures:
            self._submit()
        got = [f.result() for f in self.futures]
        expected = list(self.entry["chunk_sha256"])
        if not expected and got == [hashlib.sha256().hexdigest()]:
            return
        if got != expected:
            raise _corrupt(self.name)

    def cancel(self) -> None:
        for future in self.futures:
            future.cancel()
        cf.wait(self.futures)


def verify_file(folder: Any, name: str, entry: dict[str, Any], range_size: int = 16 * 2**20) -> None:
    """Read one file of a checkpoint folder (a Storage) and check it (`ckpt verify`, the catalog)."""
    verifier = Verifier(name, entry)
    step = max(range_size, verifier.step or 0)
    if verifier.step:
        step -= step % verifier.step
    try:
        for start in range(0, int(entry["size"]), step):
            data = folder.read_range(name, start, min(int(entry["size"]), start + step))
            if not data:
                raise CorruptCheckpoint(f"file {name} is {start} bytes, manifest says {entry['size']}")
            verifier.update(data)
        verifier.check()
    except FileNotFoundError:
        raise CorruptCheckpoint(f"file {name} is missing") from None
    finally:
        verifier.cancel()


# -- the weights' fingerprint ----------------------------------------------------------------------

def digest_prefix(key: str, dtype: torch.dtype, shape: Iterable[int]) -> bytes:
    """What `model_digest` hashes before a tensor's bytes: `key \\0 dtype \\0 shape-as-json \\0`."""
    return key.encode() + b"\0" + str(dtype).encode() + b"\0" + json.dumps(list(shape)).encode() + b"\0"


class ModelDigest:
    """`model_digest` fed tensor by tensor in key order (or row block by row block), for streamed models."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def begin(self, key: str, dtype: torch.dtype, shape: Iterable[int]) -> None:
        self._digest.update(digest_prefix(key, dtype, shape))

    def update(self, data: Any) -> None:
        self._digest.update(data)

    def tensor(self, key: str, tensor: torch.Tensor) -> None:
        from dist_train.checkpoint.serialization import _raw_bytes

        tensor = tensor.detach()
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            tensor = tensor.to("cpu").contiguous()
        self.begin(key, tensor.dtype, tensor.shape)
        self.update(_raw_bytes(tensor))

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def model_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors sorted by key: key, dtype, shape and raw bytes of each (the contract).

    Each field is NUL-separated: `key \\0 dtype \\0 shape-as-json \\0 bytes`. The dtype is
    torch's name (`torch.float32`), the shape a JSON list, the bytes C-contiguous, little-endian.
    """
    digest = ModelDigest()
    for key in sorted(state_dict):
        digest.tensor(key, state_dict[key])
    return digest.hexdigest()
