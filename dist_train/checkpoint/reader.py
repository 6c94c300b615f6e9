"""Reading checkpoint files back fast, with every byte checked against the manifest.

Every byte is hashed against the manifest: the file's chunk digests, verified on several
threads as the ranges land (digest.py), or, for a manifest written before chunking, the
whole-file sha256 on the file's own thread. What this module also saves is everything around it. Per file: the safetensors header is read and
parsed first (strictly, `serialization.parse_layout`), each tensor is allocated once,
and the rest of the file is read in ranges straight into the tensors' memory (pread on
local disk, ranged GETs through `Storage.read_range` elsewhere), several ranges in
flight, while the file's own thread hashes them in file order as they arrive (sha256 is
sequential: one cursor per file). The files are read side by side; file reads and
hashlib release the GIL. The largest file's hash is then the floor of a load.

Nothing in a file is used before its hash matches: a file whose header does not parse is
still hashed, so a damaged file is reported as damaged (sha256), a well-hashed but
malformed one as malformed. The messages are the ones resume and `ckpt verify` report.

The tensors returned are ordinary CPU tensors, one allocation each: writable,
independent of each other and aligned, so an optimizer may keep them
(`Optimizer.load_state_dict` keeps state tensors that already have the parameter's
dtype and device instead of copying them).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Collection, Sequence

import torch

from dist_train.checkpoint.digest import CorruptCheckpoint, Verifier
from dist_train.checkpoint.serialization import FormatError, Layout, TensorSink, header_size, parse_layout, tree_from
from dist_train.checkpoint.storage import Storage

LOCAL_RANGE = 4 * 2**20  # a pread; also the granularity of the hash cursor (ranges stay in L3 until hashed)
REMOTE_RANGE = 16 * 2**20  # a ranged GET
LOCAL_CONCURRENCY = 2  # ranges in flight per file: the one being hashed and one read ahead
REMOTE_CONCURRENCY = 8  # like the multipart upload's parts in flight
HEADER_PROBE = 256 * 2**10  # first read of a file: the whole header, usually
OWN_COPY_BELOW = 2**20  # parse_in_place: smaller tensors get their own allocation
_IOV_MAX = 1024


@dataclass
class LoadedFile:
    """One checkpoint file, verified and parsed: its tensors and, for state files, the tree over them."""
    name: str
    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor]
    tree: Any = None


# -- sources: one file, local or remote ---------------------------------------------------------

class _Source:
    name: str
    size: int
    range_size: int

    def read(self, start: int, end: int) -> bytes:
        raise NotImplementedError

    def read_into(self, start: int, views: list[memoryview]) -> None:
        """Fill `views` (in order) with the file's bytes from `start` on."""
        data = self.read(start, start + sum(len(v) for v in views))
        position = 0
        for view in views:
            view[:] = data[position:position + len(view)]
            position += len(view)

    def short(self, got_until: int) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"file {self.name} is {got_until} bytes, manifest says {self.size}")

    def close(self) -> None:
        pass


class _LocalSource(_Source):
    """pread straight into the destination memory."""

    range_size = LOCAL_RANGE

    def __init__(self, path: str, name: str):
        self.name = name
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise CorruptCheckpoint(f"file {name} is missing") from None
        self.size = os.fstat(self.fd).st_size

    def read(self, start: int, end: int) -> bytes:
        out = bytearray(end - start)
        self.read_into(start, [memoryview(out)])
        return bytes(out)

    def read_into(self, start: int, views: list[memoryview]) -> None:
        views = [v for v in views if len(v)]
        while views:
            batch = views[:_IOV_MAX]
            got = os.preadv(self.fd, batch, start)
            if got == 0:
                raise self.short(start)
            start += got
            while got and views:  # drop what was filled; a partly filled view continues
                if got >= len(views[0]):
                    got -= len(views.pop(0))
                else:
                    views[0] = views[0][got:]
                    got = 0

    def close(self) -> None:
        os.close(self.fd)


class _RemoteSource(_Source):
    """Ranged reads through the storage seam (one GET each on an object store)."""

    range_size = REMOTE_RANGE

    def __init__(self, folder: Storage, name: str):
        self.folder, self.name = folder, name
        size = folder.size(name)
        if size is None:
            raise CorruptCheckpoint(f"file {name} is missing")
        self.size = size

    def read(self, start: int, end: int) -> bytes:
        try:
            data = self.folder.read_range(self.name, start, end)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"file {self.name} is missing") from None
        if len(data) != end - start:
            raise self.short(start + len(data))
        return data


class _BytesSource(_Source):
    """A file already in memory (received from the rank that read and verified it)."""

    range_size = 64 * 2**20

    def __init__(self, name: str, data: Any):
        self.name, self.data = name, memoryview(data).cast("B")
        self.size = len(self.data)

    def read(self, start: int, end: int) -> bytes:
        return bytes(self.data[start:end])

    def read_into(self, start: int, views: list[memoryview]) -> None:
        for view in views:
            view[:] = self.data[start:start + len(view)]
            start += len(view)


def _open(folder: Storage, name: str) -> _Source:
    if not folder.is_local:
        return _RemoteSource(folder, name)
    return _LocalSource(folder.local_path(name), name)


# -- reading one file ------------------------------------------------------------------------------

class _Reader:
    """Reads files into destination memory with `concurrency` ranges in flight per file."""

    def __init__(self, pool: cf.Executor, concurrency: int, range_size: int | None):
        self.pool, self.concurrency, self.range_size = pool, concurrency, range_size

    def fill(self, source: _Source, start: int, views_of: Callable[[int, int], list[memoryview]],
             digest: Any | None, progress: Callable[[int], None] | None = None) -> None:
        """Read [start, size) of the file into `views_of(range)`; hash each range in order as it lands.

        Up to `concurrency` ranges are read ahead on the pool. A range whose read has not
        started when the hash cursor reaches it is read right here instead (a busy machine
        may not have run the pool's thread yet): the cursor never waits for a queue.
        `progress(end)`, on this thread, each time the bytes up to `end` have landed (in order).
        """
        step = self.range_size or source.range_size
        ranges = iter(range(start, source.size, step))
        pending: deque[tuple[int, list[memoryview], cf.Future | None]] = deque()

        def submit() -> None:
            begin = next(ranges, None)
            if begin is not None:
                views = views_of(begin, min(source.size, begin + step))
                ahead = self.concurrency > 1 and len(pending) > 0
                pending.append((begin, views, self.pool.submit(source.read_into, begin, views) if ahead else None))

        try:
            for _ in range(max(1, self.concurrency)):
                submit()
            while pending:
                begin, views, future = pending[0]
                if future is None or future.cancel():
                    source.read_into(begin, views)
                else:
                    future.result()
                pending.popleft()
                submit()
                if digest is not None:
                    for view in views:
                        digest.update(view)
                if progress is not None:
                    progress(min(source.size, begin + step))
        finally:
            for _, _, future in pending:  # on failure: nothing may still write into memory we drop
                if future is not None:
                    future.cancel()
            cf.wait([f for _, _, f in pending if f is not None])

    def load(self, folder: Storage | None, entry: dict[str, Any] | None, name: str, verify_sha: bool,
             tree: bool, source: _Source | None = None) -> LoadedFile:
        if entry is None:
            raise CorruptCheckpoint(f"manifest does not list {name}")
        source = source or _open(folder, name)
        digest: Verifier | None = None
        try:
            if source.size != entry["size"]:
                raise CorruptCheckpoint(f"file {name} is {source.size} bytes, manifest says {entry['size']}")
            digest = Verifier(name, entry) if verify_sha else None
            try:
                probe = max(8, min(HEADER_PROBE, self.range_size or source.range_size))
                prefix = source.read(0, min(source.size, probe))
                size = header_size(prefix, source.size)
                if size > len(prefix):
                    prefix += source.read(len(prefix), size)
                layout = parse_layout(prefix, source.size)
            except FormatError as exc:
                raise self._malformed(source, entry, digest, exc) from None
            sink = TensorSink(layout)
            _scatter(prefix, layout, sink)
            if digest is not None:
                digest.update(prefix)
            self.fill(source, len(prefix), sink.views, digest)
            _check_sha(source, entry, digest)
            try:
                tensors = sink.finish()
                return LoadedFile(name, layout.metadata, tensors, tree_from(layout.metadata, tensors) if tree else None)
            except FormatError as exc:
                raise CorruptCheckpoint(str(exc)) from None
        finally:
            if digest is not None:
                digest.cancel()
            source.close()

    def _malformed(self, source: _Source, entry: dict[str, Any], digest: Any | None,
                   error: FormatError) -> CorruptCheckpoint:
        """A header that does not parse: damaged (sha256 says so) or malformed as written."""
        if digest is not None:
            step = max(1, min(source.size, self.range_size or source.range_size))
            for begin in range(0, source.size, step):  # rare path: one range at a time
                view = memoryview(bytearray(min(step, source.size - begin)))  # its own: chunks hash later
                source.read_into(begin, [view])
                digest.update(view)
            _check_sha(source, entry, digest)
        return CorruptCheckpoint(str(error))


def _scatter(prefix: bytes, layout: Layout, sink: TensorSink) -> None:
    """The tensor bytes that came with the header read go to their tensors."""
    position = layout.header_size
    for view in sink.views(layout.header_size, len(prefix)):
        view[:] = prefix[position:position + len(view)]
        position += len(view)


def _check_sha(source: _Source, entry: dict[str, Any], digest: Verifier | None) -> None:
    """Every chunk digest (several threads) or the whole-file sha256 of an older manifest; see digest.py."""
    if digest is not None:
        digest.check()


# -- the entry points ------------------------------------------------------------------------------

def _concurrency(folder: Storage, concurrency: int | None) -> int:
    if concurrency is not None:
        return max(1, concurrency)
    return LOCAL_CONCURRENCY if folder.is_local else REMOTE_CONCURRENCY


def parse_file(entry: dict[str, Any] | None, name: str, data: Any, tree: bool) -> LoadedFile:
    """A file whose bytes were read and verified elsewhere, parsed exactly as `read_files` parses it."""
    return _Reader(None, 1, None).load(None, entry, name, False, tree,  # type: ignore[arg-type]
                                       source=_BytesSource(name, data))


def parse_in_place(entry: dict[str, Any] | None, name: str, buffer: torch.Tensor, tree: bool) -> LoadedFile:
    """A file whose bytes were verified elsewhere, parsed as `parse_file` does, with the tensors as views
    of `buffer` (a uint8 CPU tensor nobody else writes) instead of copies.

    For a file received whole from the rank that read it (restore.py): the receive buffer is
    already this rank's own fresh memory, so copying it into one allocation per tensor would
    only double the memory touched. Small tensors (under `OWN_COPY_BELOW`: RNG states, step
    counters) and any whose bytes are not aligned for their dtype still get their own copy:
    some consumers (`torch.set_rng_state`) read a tensor's storage from its start, not from
    the view's offset. The large ones share `buffer`'s memory, which lives as long as any of
    them (an optimizer keeping its state keeps the file's buffer).
    """
    if entry is None:
        raise CorruptCheckpoint(f"manifest does not list {name}")
    size = buffer.numel()
    if size != entry["size"]:
        raise CorruptCheckpoint(f"file {name} is {size} bytes, manifest says {entry['size']}")
    try:
        layout = parse_layout(memoryview(buffer.numpy()), size)
        tensors: dict[str, torch.Tensor] = {}
        base = buffer.data_ptr()
        for item in layout.entries:
            if item.end == item.start:
                tensors[item.name] = torch.empty(item.shape, dtype=item.dtype)
                continue
            raw = buffer[item.start:item.end]
            if item.end - item.start < OWN_COPY_BELOW or (base + item.start) % item.dtype.itemsize:
                raw = raw.clone()
            if item.dtype == torch.bool and bool(raw.gt(1).any()):
                raise FormatError("safetensors bool tensor holds a value other than 0 or 1")
            tensors[item.name] = raw.view(item.dtype).view(item.shape)
        return LoadedFile(name, layout.metadata, tensors, tree_from(layout.metadata, tensors) if tree else None)
    except FormatError as exc:
        raise CorruptCheckpoint(str(exc)) from None


def read_files(folder: Storage, manifest: dict[str, Any], names: Sequence[str], verify_sha: bool = True,
               trees: Collection[str] = (), *, range_size: int | None = None,
               concurrency: int | None = None) -> dict[str, LoadedFile]:
    """Read, verify and parse the named files of a checkpoint folder, side by side.

    `trees` names the files that hold a nested state (a JSON skeleton); the others are
    plain tensor files. CorruptCheckpoint names the first problem in `names` order.
    """
    per_file = _concurrency(folder, concurrency)
    files = manifest.get("files") or {}
    # The largest file (the critical path: its hash is sequential) is read in this thread, the
    # others beside it; a thread that waited idle would only add a hand-off on a busy machine.
    here = max(names, key=lambda n: (files.get(n) or {}).get("size", 0), default=None)
    outcome: dict[str, cf.Future] = {}
    with cf.ThreadPoolExecutor(max(1, (per_file - 1) * len(names)), thread_name_prefix="ckpt-read") as pool, \
            cf.ThreadPoolExecutor(max(1, len(names) - 1), thread_name_prefix="ckpt-file") as beside:
        reader = _Reader(pool, per_file, range_size)
        for name in names:
            if name != here:
                outcome[name] = beside.submit(reader.load, folder, files.get(name), name, verify_sha, name in trees)
        if here is not None:
            outcome[here] = cf.Future()
            try:
                outcome[here].set_result(reader.load(folder, files.get(here), here, verify_sha, here in trees))
            except BaseException as exc:  # noqa: BLE001 - reported below, in `names` order
                outcome[here].set_exception(exc)
        cf.wait(outcome.values())
    for name in names:
        if outcome[name].exception() is not None:
            raise outcome[name].exception()  # type: ignore[misc]
    return {name: outcome[name].result() for name in names}


def read_bytes(folder: Storage, manifest: dict[str, Any], name: str, verify_sha: bool = True, *,
               range_size: int | None = None, concurrency: int | None = None, into: Any = None,
               progress: Callable[[int], None] | None = None) -> Any:
    """One file's bytes, checked against the manifest (size, and sha256 when asked), not parsed.

    `into`: writable memory of the file's size to read into (else a new bytearray); `progress(end)`
    whenever the bytes up to `end` have landed, in order, before they are verified (a caller that
    passes them on must not let them be used before `read_bytes` returns)."""
    entry = (manifest.get("files") or {}).get(name)
    if entry is None:
        raise CorruptCheckpoint(f"manifest does not list {name}")
    source = _open(folder, name)
    digest: Verifier | None = None
    try:
        if source.size != entry["size"]:
            raise CorruptCheckpoint(f"file {name} is {source.size} bytes, manifest says {entry['size']}")
        data = bytearray(source.size) if into is None else into
        whole = memoryview(data).cast("B")
        if len(whole) != source.size:
            raise ValueError(f"read_bytes: {name} is {source.size} bytes, the destination {len(whole)}")
        digest = Verifier(name, entry) if verify_sha else None
        per_file = _concurrency(folder, concurrency)
        with cf.ThreadPoolExecutor(per_file, thread_name_prefix="ckpt-read") as pool:
            _Reader(pool, per_file, range_size).fill(source, 0, lambda begin, end: [whole[begin:end]], digest,
                                                     progress)
        _check_sha(source, entry, digest)
        return data
    finally:
        if digest is not None:
            digest.cancel()
        source.close()
