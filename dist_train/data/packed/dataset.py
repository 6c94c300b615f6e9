"""Reading a packed data set: `open_packed(url)` -> `PackedDataset` -> `PackedSplit` (a map-style Dataset).

Opening reads one object, the data manifest. A split's samples are numbered by their
position in its shards concatenated in manifest order (the GLOBAL INDEX the sampler and
`--sample-log` use). Verification is per shard: a shard is fetched whole (a large one as
parallel ranged GETs through the storage seam), its size and sha256 checked against the
manifest, and only then is any sample of it decoded. A bad or missing shard is fetched
again a few times, then `ShardError` names it; no sample of it is ever returned.

Each process keeps an LRU of verified shards bounded in bytes; `prefetch(indices)` starts
background fetches of the shards those indices need, so DataLoader workers overlap I/O
with compute. With `cache_dir` the node keeps verified shards as files (`cache.py`).
A split pickles as its description only: sessions, threads and shards are rebuilt lazily
in each DataLoader worker.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import hashlib
import os
import re
import threading
import time
from typing import Any, Callable

from torch.utils.data import Dataset

from dist_train.checkpoint.faults import RetryPolicy, describe_error
from dist_train.checkpoint.storage import Storage, redact_url
from dist_train.data.datasets import UnreadableImage, _worker_message
from dist_train.data.packed import format as fmt
from dist_train.data.packed import shards as sh
from dist_train.data.packed.cache import NodeCache
from dist_train.errors import LocalUserError, UserError

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
RANGE_PART = 8 * 2**20  # shards larger than this are fetched as parallel ranged GETs of this size
FETCH_THREADS = 4
MEMORY_LIMIT = 512 * 2**20  # verified shard bytes one process keeps (at least one shard)
SHARD_RETRY = RetryPolicy(attempts=3, base_delay=0.1, max_delay=1.0, deadline=30.0)


class ShardError(LocalUserError):
    """A shard that stayed missing or corrupt after retries: one line naming it.

    Found by one rank alone (its own shards), so that rank reports it (`LocalUserError`). Raised in
    a DataLoader worker, torch re-raises it as `ShardError(worker traceback)`: the constructor keeps
    the original line.
    """

    def __init__(self, message: str):
        super().__init__(_worker_message(message, type(self).__name__))


def is_packed_url(value: str) -> bool:
    """A packed data set is named by a URL with a scheme (`s3://`, `file://`, ...); never `MODULE:ATTR`
    or a built-in name."""
    return isinstance(value, str) and bool(_SCHEME.match(value))


def open_packed(url: str, *, storage_options: dict[str, Any] | None = None, cache_dir: str | None = None,
                cache_limit: int | None = None) -> "PackedDataset":
    """The data set at `url`, from its manifest alone (one GET); UserError when it is not one."""
    storage = Storage(url, storage_options)
    shown = storage.display_url
    try:
        raw = storage.read(fmt.MANIFEST)
    except FileNotFoundError:
        if not storage.is_local:  # a store: a missing bucket says so, not "no manifest"
            _check_reachable(storage)
        raise UserError(f"not a packed data set: no manifest at {storage.url(fmt.MANIFEST)} "
                        "(make one with `dist-train data pack`)") from None
    except IsADirectoryError:
        raise UserError(f"not a packed data set: {storage.url(fmt.MANIFEST)} is a folder") from None
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the store: unreachable, no bucket, no access
        _check_reachable(storage)
        raise UserError(f"packed data set {shown}: cannot read its manifest ({describe_error(exc)})") from None
    try:
        manifest = fmt.parse(raw)
    except fmt.FormatError as exc:
        raise UserError(f"packed data set {shown}: unreadable data manifest: {exc}") from None
    return PackedDataset(url, manifest, hashlib.sha256(raw).hexdigest(), storage_options, cache_dir, cache_limit)


def _check_reachable(storage: Storage, what: str = "packed data set") -> None:
    """`Storage.check_reachable`, its line naming the data set rather than a run dir."""
    try:
        storage.check_reachable()
    except UserError as exc:
        raise UserError(str(exc).replace("run dir ", f"{what} ", 1)) from None


class PackedDataset:
    """A packed data set's manifest and its splits."""

    def __init__(self, url: str, manifest: dict[str, Any], manifest_sha256: str,
                 storage_options: dict[str, Any] | None = None, cache_dir: str | None = None,
                 cache_limit: int | None = None):
        self.url = redact_url(url)
        self._open_url = url
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.storage_options = dict(storage_options or {})
        self.cache_dir, self.cache_limit = cache_dir, cache_limit

    @property
    def classes(self) -> list[str] | None:
        return self.manifest.get("classes")

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.manifest.get("preprocessing") or {}

    @property
    def splits(self) -> list[str]:
        """Split names: train, val, test first (those present), then any others by name."""
        order = {"train": 0, "val": 1, "test": 2}
        return sorted(self.manifest["splits"], key=lambda name: (order.get(name, 3), name))

    def split(self, name: str, transform: Callable | None = None) -> "PackedSplit":
        if name not in self.manifest["splits"]:
            raise UserError(f"packed data set {self.url} has no {name!r} split (it has {', '.join(self.splits)})")
        return PackedSplit(self._open_url, name, self.manifest["splits"][name]["shards"], self.preprocessing,
                           self.classes, transform, self.storage_options, self.cache_dir, self.cache_limit)


class _Shard:
    """A verified shard in memory and where each of its samples' members lie in it."""
    __slots__ = ("data", "members")

    def __init__(self, data: bytes):
        self.data = data
        self.members = sh.read_members(data)


class PackedSplit(Dataset):
    """One split of a packed data set as a map-style Dataset of (input, target)."""

    def __init__(self, url: str, name: str, shards: list[dict[str, Any]], preprocessing: dict[str, Any],
                 classes: list[str] | None, transform: Callable | None = None,
                 storage_options: dict[str, Any] | None = None, cache_dir: str | None = None,
                 cache_limit: int | None = None, memory_limit: int = MEMORY_LIMIT):
        self.url, self.name = url, name
        self.shards = [dict(s) for s in shards]
        self.shard_sizes = [int(s["num_samples"]) for s in shards]
        self._starts = [0]
        for count in self.shard_sizes:
            self._starts.append(self._starts[-1] + count)
        self.preprocessing, self.classes, self.transform = preprocessing, classes, transform
        self.storage_options = dict(storage_options or {})
        self.cache_dir, self.cache_limit, self.memory_limit = cache_dir, cache_limit, memory_limit
        self._reset()

    # -- lazily made per process: never pickled ----------------------------------------------

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._storage: Storage | None = None
        self._cache: NodeCache | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lru: collections.OrderedDict[int, _Shard] = collections.OrderedDict()
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self.gets = 0  # shard fetches from the store by this process (tests, bench)

    def _check_process(self) -> None:
        """A DataLoader worker made by fork inherits this object as it was, pool threads dead and
        locks perhaps held, and fsspec sessions that refuse a forked process: start afresh there."""
        if self._pid != os.getpid():
            self._reset()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_pid", "_storage", "_cache", "_pool", "_lru", "_pending", "_lock", "gets"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def _store(self) -> Storage:
        if self._storage is None:
            self._storage = Storage(self.url, self.storage_options, retry=None)
            if self.cache_dir:
                self._cache = NodeCache(self.cache_dir, self.cache_limit)
        return self._storage

    def _threads(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="packed-fetch")
        return self._pool

    # -- indexing ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._starts[-1]

    def shard_of(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return bisect.bisect_right(self._starts, index) - 1

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        self._check_process()
        index = int(index)
        if index < 0:
            index += len(self)
        shard_index = self.shard_of(index)
        shard = self._shard(shard_index)
        members = shard.members[index - self._starts[shard_index]]
        data = {ext: shard.data[start:start + size] for ext, (start, size) in members.items()}
        where = f"sample {index} of {self.name} (shard {self.shards[shard_index]['name']})"
        try:
            target = sh.decode_target(data)
        except ValueError as exc:
            raise UnreadableImage(f"packed data set {redact_url(self.url)}: {where}: bad target ({exc})") from None
        return self._decode_input(data, where), target

    def _decode_input(self, members: dict[str, bytes], where: str) -> Any:
        ext = sh.image_ext(members)
        if ext is not None:
            import io

            from PIL import Image

            try:
                image = Image.open(io.BytesIO(members[ext]))
                image = image.convert(self.preprocessing.get("image_mode") or "RGB")
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
                raise UnreadableImage(f"packed data set {redact_url(self.url)}: {where}: the .{ext} is not an "
                                      f"image Pillow can decode ({type(exc).__name__})") from None
            if self.transform is not None:
                return self.transform(image)
            import numpy as np
            import torch
            array = np.asarray(image, dtype=np.float32) / 255.0
            array = array[:, :, None] if array.ndim == 2 else array
            return torch.from_numpy(array.transpose(2, 0, 1).copy())
        if "input.npy" in members:
            import torch
            tensor = torch.from_numpy(sh.npy_array(members["input.npy"]).copy())
            return self.transform(tensor) if self.transform is not None else tensor
        raise UnreadableImage(f"packed data set {redact_url(self.url)}: {where} has no input member "
                              f"(an image or input.npy) among {sorted(members)}")

    # -- fetching ----------------------------------------------------------------------------

    def prefetch(self, indices: list[int]) -> None:
        """Start background fetches of the shards these indices need (at most FETCH_THREADS ahead)."""
        self._check_process()
        wanted = list(dict.fromkeys(self.shard_of(int(i)) for i in indices))
        with self._lock:
            self._harvest()
            for shard_index in wanted:
                if shard_index in self._lru or shard_index in self._pending:
                    continue
                if len(self._pending) >= FETCH_THREADS:
                    break
                self._pending[shard_index] = self._threads().submit(self._load, shard_index)

    def _harvest(self) -> None:
        """Move finished prefetches into the LRU (a failed one is fetched again, and reported, on use)."""
        for shard_index, future in list(self._pending.items()):
            if future.done():
                del self._pending[shard_index]
                if future.exception() is None:
                    self._remember(shard_index, future.result())

    def _shard(self, shard_index: int) -> _Shard:
        with self._lock:
            shard = self._lru.get(shard_index)
            if shard is not None:
                self._lru.move_to_end(shard_index)
                return shard
            future = self._pending.get(shard_index)
        if future is not None:
            try:
                shard = future.result()
            finally:
                with self._lock:
                    self._pending.pop(shard_index, None)
        else:
            shard = self._load(shard_index)
        with self._lock:
            self._remember(shard_index, shard)
        return shard

    def _remember(self, shard_index: int, shard: _Shard) -> None:
        self._lru[shard_index] = shard
        self._lru.move_to_end(shard_index)
        total = sum(len(s.data) for s in self._lru.values())
        while total > self.memory_limit and len(self._lru) > 1:
            old, dropped = self._lru.popitem(last=False)
            total -= len(dropped.data)
        if self._cache is not None:
            self._cache.in_use = {self.shards[i]["sha256"] for i in self._lru}

    def _load(self, shard_index: int) -> _Shard:
        entry = self.shards[shard_index]
        self._store()
        if self._cache is not None:
            data = self._cache.get(entry["sha256"], entry["size"], lambda: self._fetch_verified(entry))
        else:
            data = self._fetch_verified(entry)
        return _Shard(data)

    def _fetch_verified(self, entry: dict[str, Any]) -> bytes:
        """The shard's bytes once they match the manifest; retried, then ShardError."""
        storage = self._store()
        rel = entry["name"]
        reason = ""
        for attempt in range(SHARD_RETRY.attempts):
            if attempt:
                time.sleep(SHARD_RETRY.delay(attempt - 1))
            try:
                data = self._download(storage, rel, entry["size"])
            except FileNotFoundError:
                reason = "missing"
                continue
            except Exception as exc:  # noqa: BLE001 - the store's retries are spent: name the shard
                reason = describe_error(exc)
                continue
            if len(data) != entry["size"]:
                reason = f"corrupt: size {len(data)} bytes, the manifest says {entry['size']}"
                continue
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                reason = "corrupt: sha256 mismatch"
                continue
            return data
        raise ShardError(f"shard {storage.url(rel)}: {reason} (after {SHARD_RETRY.attempts} tries)")

    def _download(self, storage: Storage, rel: str, size: int) -> bytes:
        self.gets += 1
        if size <= RANGE_PART:
            return storage.read(rel, size=size)  # the manifest's size: one GET, no HEAD first
        starts = range(0, size, RANGE_PART)
        # One connection pool, parts side by side: a cold shard arrives at the store's bandwidth.
        with concurrent.futures.ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="packed-range") as pool:
            parts = list(pool.map(lambda s: storage.read_range(rel, s, min(size, s + RANGE_PART)), starts))
        return b"".join(parts)
