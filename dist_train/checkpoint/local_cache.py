"""The node-local tier: a copy of the newest checkpoints on every node's fast local storage.

`--local-cache DIR` (a path on `/dev/shm` or a local NVMe disk) keeps, beside the durable
run dir, a copy of the newest checkpoint(s) on every node, so a restart of a multi-node
job reads nothing from the run dir on any node:

- global rank 0 writes its node's copy from the buffers it just committed, right after
  the durable commit (no second serialization);
- the local rank 0 of every other node writes the same files from the replica it holds
  (DDP: every rank holds the same model and optimizer; the RNG states of every rank are
  gathered to the node leaders too) when the checkpoint is taken; whether rank 0's commit
  succeeded is not known there yet, so those nodes keep one copy more (`spare`);
- a sharded checkpoint (`--checkpoint-writers all`: every rank writes its own share) is
  cached share by share (`store_share`): after the collective commit every rank writes the
  shard files it wrote into its node's copy, and the node's local rank 0 adds the small
  whole entries (trainer state, RNG) from its replica. A node holds what its ranks load at
  the same world size: their own shards; the rest of a same-size sharded load (headers,
  replicated tensors, small entries) crosses the network from the rank that verified it.

No cached copy is trusted for what it claims: the durable run dir stays the only commit
point and its manifest the only authority. On resume a copy is used only when it belongs
to this run dir, holds the checkpoint the run dir's resolver chose, every file has the
size that manifest records, and every byte verifies against that manifest while being
read; otherwise it is ignored with one line and removed. Every rank of a node reads from
that node's cache; the ranks still agree on one checkpoint as always.

Layout: `DIR/run.json` (the run dir it belongs to), `DIR/<checkpoint name>/<files>`.

A sharded restore reads through a `CacheOverlay`: the files this rank verifies come from
the node's copy when it holds them at the manifest's size, everything else from the run
dir. Each rank hashes what it reads (per source: a file verified on one node's copy says
nothing about another's), and a cached file that fails its hash makes the restore read
that checkpoint again from the run dir, never skip it (restore.py).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any

from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.faults import describe_error
from dist_train.checkpoint.storage import STAGING_PREFIX, Storage

log = logging.getLogger(__name__)
OWNER = "run.json"


class LocalCache:
    def __init__(self, folder: str, run_url: str, keep: int = 1):
        self.folder = os.path.abspath(folder)
        self.run_url = run_url
        self.keep = max(1, keep)
        self.storage = Storage(self.folder)

    # -- writing (rank 0, after the durable commit) --------------------------------------------

    def store(self, name: str, files: dict[str, Any], spare: int = 0) -> None:
        """Write `files` under `name` and keep the newest `keep + spare` copies; never fails the job.

        The storage's publish protocol (staged beside, renamed into place), so a crash mid-write
        leaves a staging folder the next store removes, never a half copy under `name`.
        """
        staged = None
        try:
            self.claim()
            staged = self.storage.stage(name, uuid.uuid4().hex[:8], owner=b"cache")
            for rel, content in files.items():
                self.storage.write(f"{staged}/{rel}", _chunks(content), _size(content))
            self.storage.delete_tree(name)  # an older copy of the same name (publish will not replace it)
            self.storage.publish(staged, name)
            self._prune(keep_newest=name, keep=self.keep + spare)
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: never stop training for it
            if staged is not None:
                self.storage.discard_staged(staged)
            log.warning("local cache %s: could not keep %s (%s)", self.folder, name, describe_error(exc))

    def claim(self) -> None:
        """Make the cache this run dir's (a cache of another run dir is cleared first)."""
        self.storage.makedirs("")
        owner = self._owner()
        if owner != self.run_url:
            if owner is not None:
                log.warning("local cache %s held checkpoints of another run dir (%s): cleared", self.folder, owner)
            self.clear()
            self.storage.makedirs("")
            self.storage.write_bytes(OWNER, json.dumps({"run_dir": self.run_url}).encode())

    def store_share(self, name: str, files: dict[str, Any], prune: bool) -> None:
        """Add one rank's files of a sharded checkpoint to the node's copy of `name`; never fails the job.

        Several ranks of a node write into one copy at once, so each file is written beside
        and renamed into place (a reader sees a whole file or none; its hash is checked on
        use anyway). `prune` (the node's local rank 0 only): keep the newest `keep` copies.
        The cache must have been claimed (`claim`) before any rank of the node stores.
        """
        try:
            if self._owner() != self.run_url:
                log.warning("local cache %s: not claimed for this run dir; no copy of %s", self.folder, name)
                return
            tag = uuid.uuid4().hex[:8]
            for rel, content in files.items():
                partial = f"{name}/{rel}.{STAGING_PREFIX}{tag}"
                self.storage.write(partial, _chunks(content), _size(content))
                os.replace(self.storage.path(partial), self.storage.path(f"{name}/{rel}"))
            if prune:
                self._prune(keep_newest=name, keep=self.keep)
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: never stop training for it
            log.warning("local cache %s: could not keep this rank's share of %s (%s)", self.folder, name,
                        describe_error(exc))

    def _prune(self, keep_newest: str, keep: int) -> None:
        entries = [entry.name for entry in self.storage.list("")]
        names = sorted(n for n in entries if n.startswith("ckpt-"))
        doomed = [n for n in names if n != keep_newest][: max(0, len(names) - keep)]
        for stale in doomed + [n for n in entries if n.startswith(STAGING_PREFIX)]:
            self.storage.delete_tree(stale)

    # -- reading (every rank of the node, on resume) ---------------------------------------------

    def lookup(self, name: str, manifest: dict[str, Any], files: list[str] | None = None) -> Storage | None:
        """The cached copy of checkpoint `name` holding `files` (default: all) at the durable manifest's sizes.

        None (with one line; a copy that cannot be the durable one is removed) otherwise. The
        caller verifies every byte it reads against `manifest`.
        """
        path = os.path.join(self.folder, name)
        held = sorted(n for n in os.listdir(self.folder) if n.startswith("ckpt-")) if os.path.isdir(self.folder) else []
        if not held:
            return None
        owner = self._owner()
        if owner != self.run_url:
            log.warning("local cache %s: ignored, it belongs to another run dir (%s)", self.folder, owner)
            return None
        if not os.path.isdir(path):
            log.warning("local cache %s: ignored, it holds %s but the run dir's newest valid checkpoint is %s",
                        self.folder, held[-1], name)
            return None
        entries = manifest.get("files") or {}
        for rel in files if files is not None else sorted(entries):
            size = _held_size(path, rel)
            if rel not in entries or size != int(entries[rel]["size"]):
                log.warning("local cache %s: ignored %s, its %s %s", self.folder, name, rel,
                            "is missing" if size is None else "differs in size from the run dir's")
                self.discard(name)
                return None
        return Storage(path)

    def overlay(self, name: str, manifest: dict[str, Any], run_dir: Storage, files: list[str]) -> "CacheOverlay | None":
        """The run dir with `files` served from this node's copy of `name` where it holds them at the
        manifest's size (a sharded restore: the files this rank verifies); None when it holds none."""
        entries = manifest.get("files") or {}
        path = os.path.join(self.folder, name)
        if not os.path.isdir(path) or self._owner() != self.run_url:
            return None
        served = set()
        for rel in files:
            size = _held_size(path, rel)
            if rel in entries and size == int(entries[rel]["size"]):
                served.add(rel)
        if len(served) < len(files):
            log.info("local cache %s: holds %d of the %d files this rank reads of %s; the rest from the run dir",
                     self.folder, len(served), len(files), name)
        return CacheOverlay(run_dir, Storage(path), served) if served else None

    def discard(self, name: str) -> None:
        self.storage.delete_tree(name)

    def discard_files(self, name: str, files: set[str]) -> None:
        """Remove some files of a copy (a rank's share that failed its hash); never fails."""
        for rel in files:
            try:
                self.storage.delete(f"{name}/{rel}")
            except Exception as exc:  # noqa: BLE001 - the cache is an optimisation
                log.warning("local cache %s: could not remove %s/%s (%s)", self.folder, name, rel, describe_error(exc))

    def clear(self) -> None:
        if os.path.isdir(self.folder):
            for entry in self.storage.list(""):
                self.storage.delete_tree(entry.name)

    def _owner(self) -> str | None:
        try:
            with open(os.path.join(self.folder, OWNER), encoding="utf-8") as handle:
                return json.load(handle).get("run_dir")
        except (OSError, ValueError, AttributeError):
            return None


class CacheOverlay:
    """A checkpoint folder read partly from a node's cached copy: `served` files from `cached`,
    everything else (and every other operation) from `run_dir`.

    Not local (`is_local` False) whatever the two are: each rank must read and verify only its
    own files and receive the rest from their verifiers, since the copies differ between nodes.
    """

    def __init__(self, run_dir: Storage, cached: Storage, served: set[str]):
        self.run_dir = run_dir
        self.cached = cached
        self.served = served

    @property
    def is_local(self) -> bool:
        return False

    def _source(self, rel: str) -> Storage:
        return self.cached if rel in self.served else self.run_dir

    def read(self, rel: str, size: int | None = None) -> bytes:
        return self._source(rel).read(rel, size)

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        return self._source(rel).read_range(rel, start, end)

    def iter_read(self, rel: str, block_size: int):
        return self._source(rel).iter_read(rel, block_size)

    def size(self, rel: str) -> int | None:
        return self._source(rel).size(rel)

    def exists(self, rel: str) -> bool:
        return self._source(rel).exists(rel)

    def __getattr__(self, name: str) -> Any:  # url, display_url, listing: the run dir's
        return getattr(self.run_dir, name)


def _held_size(path: str, rel: str) -> int | None:
    """The size of a copy's file, None when it is missing or its name could leave the copy."""
    if not mf.safe_relative_name(rel):
        return None
    try:
        return os.path.getsize(os.path.join(path, rel))
    except OSError:
        return None


def _size(content: Any) -> int:
    return content.size if hasattr(content, "size") and not isinstance(content, (bytes, bytearray)) else len(content)


def _chunks(content: Any):
    return content.chunks() if hasattr(content, "chunks") else [content]
