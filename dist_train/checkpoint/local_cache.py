"""The node-local tier: a copy of the newest checkpoints on every node's fast local storage.

`--local-cache DIR` (a path on `/dev/shm` or a local NVMe disk) keeps, beside the durable
run dir, a copy of the newest checkpoint(s) on every node, so a restart of a multi-node
job reads nothing from the run dir on any node:

- global rank 0 writes its node's copy from the buffers it just committed, right after
  the durable commit (no second serialization);
- the local rank 0 of every other node writes the same files from the replica it holds
  (DDP: every rank holds the same model and optimizer; the RNG states of every rank are
  gathered to the node leaders too) when the checkpoint is taken; whether rank 0's commit
  succeeded is not known there yet, so those nodes keep one copy more (`spare`).

No cached copy is trusted for what it claims: the durable run dir stays the only commit
point and its manifest the only authority. On resume a copy is used only when it belongs
to this run dir, holds the checkpoint the run dir's resolver chose, every file has the
size that manifest records, and every byte verifies against that manifest while being
read; otherwise it is ignored with one line and removed. Every rank of a node reads from
that node's cache; the ranks still agree on one checkpoint as always.

Layout: `DIR/run.json` (the run dir it belongs to), `DIR/<checkpoint name>/<files>`.
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
            self._claim()
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

    def _claim(self) -> None:
        self.storage.makedirs("")
        owner = self._owner()
        if owner != self.run_url:
            if owner is not None:
                log.warning("local cache %s held checkpoints of another run dir (%s): cleared", self.folder, owner)
            self.clear()
            self.storage.makedirs("")
            self.storage.write_bytes(OWNER, json.dumps({"run_dir": self.run_url}).encode())

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
            try:
                size = os.path.getsize(os.path.join(path, rel)) if mf.safe_relative_name(rel) else None
            except OSError:
                size = None
            if rel not in entries or size != int(entries[rel]["size"]):
                log.warning("local cache %s: ignored %s, its %s %s", self.folder, name, rel,
                            "is missing" if size is None else "differs in size from the run dir's")
                self.discard(name)
                return None
        return Storage(path)

    def discard(self, name: str) -> None:
        self.storage.delete_tree(name)

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


def _size(content: Any) -> int:
    return content.size if hasattr(content, "size") and not isinstance(content, (bytes, bytearray)) else len(content)


def _chunks(content: Any):
    return content.chunks() if hasattr(content, "chunks") else [content]
