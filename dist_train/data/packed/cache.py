"""The node-local shard cache: whole verified shards as files, shared by every process of a node.

Layout: `DIR/<sha256>.tar` (content-addressed, so two data sets sharing a shard share the file
and a name can never hold other bytes than its own), `DIR/.lock-<sha256>` (one downloader per
shard: the others wait on its `flock` and then read the file it made), `DIR/.tmp-*` (a download
in progress: never read; renamed into place only when complete and verified).

On use a cached file is re-checked against the manifest (size, then sha256 while it is read),
so a truncated or damaged file is dropped and fetched again, never used. Least recently used
files (by mtime, touched on each use) are evicted until the total is within the limit; shards
this process holds are never evicted by it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import uuid
from typing import Callable

log = logging.getLogger(__name__)
SUFFIX = ".tar"


class NodeCache:
    def __init__(self, folder: str, limit: int | None = None):
        self.folder = os.path.abspath(folder)
        self.limit = limit
        self.in_use: set[str] = set()  # sha256s this process holds in memory: never evicted by it

    def _path(self, sha256: str) -> str:
        return os.path.join(self.folder, sha256 + SUFFIX)

    def _read_verified(self, sha256: str, size: int) -> bytes | None:
        path = self._path(sha256)
        try:
            if os.path.getsize(path) != size:
                raise ValueError("size differs")
            with open(path, "rb") as handle:
                data = handle.read()
            if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
                raise ValueError("sha256 differs")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("data cache %s: dropped %s (%s)", self.folder, os.path.basename(path), exc)
            try:
                os.unlink(path)
            except OSError:
                pass
            return None
        try:
            os.utime(path)  # most recently used
        except OSError:
            pass
        return data

    def get(self, sha256: str, size: int, fetch: Callable[[], bytes]) -> bytes:
        """The shard's bytes from the cache, or from `fetch()` (verified bytes) stored for the node."""
        data = self._read_verified(sha256, size)
        if data is not None:
            return data
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f".lock-{sha256}"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process of the node may be downloading it
            try:
                data = self._read_verified(sha256, size)
                if data is not None:
                    return data
                data = fetch()
                self._store(sha256, data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self.evict(keep=sha256)
        return data

    def _store(self, sha256: str, data: bytes) -> None:
        tmp = os.path.join(self.folder, f".tmp-{sha256[:16]}-{uuid.uuid4().hex[:8]}")
        try:
            # No fsync: every use re-checks the file's size and sha256, so a file a power loss tore
            # is found and fetched again; syncing each shard only made a cold epoch wait for the disk.
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.rename(tmp, self._path(sha256))
        except OSError as exc:  # a full disk: the cache is an optimisation, the bytes are still good
            log.warning("data cache %s: could not keep a shard (%s)", self.folder, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def evict(self, keep: str | None = None) -> None:
        """Remove least recently used shards until the cache holds at most `limit` bytes."""
        if self.limit is None:
            return
        entries = []
        for name in os.listdir(self.folder):
            if not name.endswith(SUFFIX) or name.startswith("."):
                continue
            try:
                stat = os.stat(os.path.join(self.folder, name))
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime, name, stat.st_size))
        total = sum(size for _, _, size in entries)
        for _, name, size in sorted(entries):
            if total <= self.limit:
                break
            sha = name[:-len(SUFFIX)]
            if sha == keep or sha in self.in_use:
                continue
            try:
                os.unlink(os.path.join(self.folder, name))
            except FileNotFoundError:
                pass
            total -= size
