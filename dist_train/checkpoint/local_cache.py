"""The node-local tier: a copy of the newest committed checkpoint on fast local storage.

`--local-cache DIR` (a path on `/dev/shm` or a local NVMe disk) keeps, beside the durable
run dir, the newest committed checkpoint(s) under the same manifest, written from the
same in-memory buffers right after the durable commit (no second serialization). The
durable run dir stays the only commit point: on resume a cached copy is used only when
its manifest is byte-identical to the checkpoint the run dir's resolver chose, it
belongs to this run dir, and its files verify while being read; otherwise it is ignored
with one line and removed. Every rank of a node reads from that node's cache; the
ranks still agree on one checkpoint as always.

Layout: `DIR/run.json` (the run dir it belongs to), `DIR/<checkpoint name>/...`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from typing import Any

from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.faults import describe_error
from dist_train.checkpoint.storage import Storage

log = logging.getLogger(__name__)
OWNER = "run.json"


class LocalCache:
    def __init__(self, folder: str, run_url: str, keep: int = 1):
        self.folder = os.path.abspath(folder)
        self.run_url = run_url
        self.keep = max(1, keep)

    # -- writing (rank 0, after the durable commit) --------------------------------------------

    def store(self, name: str, manifest: dict[str, Any], files: dict[str, Any]) -> None:
        """Write `files` and the committed manifest under `name`; never fails the job."""
        staging = os.path.join(self.folder, f".staging-{name}-{uuid.uuid4().hex[:8]}")
        try:
            self._claim()
            storage = Storage(staging)
            storage.makedirs("")
            for rel, content in files.items():
                storage.write(rel, _chunks(content), _size(content))
            storage.write_bytes(mf.MANIFEST, mf.encode(manifest))
            target = os.path.join(self.folder, name)
            if os.path.exists(target):
                shutil.rmtree(target, ignore_errors=True)
            os.rename(staging, target)
            self._prune(keep_newest=name)
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: never stop training for it
            shutil.rmtree(staging, ignore_errors=True)
            log.warning("local cache %s: could not keep %s (%s)", self.folder, name, describe_error(exc))

    def _claim(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        owner = self._owner()
        if owner != self.run_url:
            if owner is not None:
                log.warning("local cache %s held checkpoints of another run dir (%s): cleared", self.folder, owner)
            self.clear()
            os.makedirs(self.folder, exist_ok=True)
            with open(os.path.join(self.folder, OWNER), "w", encoding="utf-8") as handle:
                json.dump({"run_dir": self.run_url}, handle)

    def _prune(self, keep_newest: str) -> None:
        names = sorted(n for n in os.listdir(self.folder) if n.startswith("ckpt-"))
        doomed = [n for n in names if n != keep_newest][: max(0, len(names) - self.keep)]
        for stale in doomed + [n for n in os.listdir(self.folder) if n.startswith(".staging-")]:
            shutil.rmtree(os.path.join(self.folder, stale), ignore_errors=True)

    # -- reading (every rank of the node, on resume) ---------------------------------------------

    def lookup(self, name: str, manifest: dict[str, Any]) -> Storage | None:
        """The cached copy of checkpoint `name` when it is exactly the durable one, else None (and gone)."""
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
        try:
            with open(os.path.join(path, mf.MANIFEST), "rb") as handle:
                cached = handle.read()
        except OSError:
            cached = b""
        if cached != mf.encode(manifest):
            log.warning("local cache %s: ignored %s, its manifest differs from the run dir's", self.folder, name)
            self.discard(name)
            return None
        return Storage(path)

    def discard(self, name: str) -> None:
        shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)

    def clear(self) -> None:
        if os.path.isdir(self.folder):
            for entry in os.listdir(self.folder):
                target = os.path.join(self.folder, entry)
                shutil.rmtree(target, ignore_errors=True) if os.path.isdir(target) else os.unlink(target)

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
