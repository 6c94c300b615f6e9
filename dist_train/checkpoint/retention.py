"""Retention: which committed checkpoints to keep, and deleting the rest safely.

Each rule keeps a set and the sets add up; the newest committed checkpoint is always
kept, so any rule works on its own: `keep_best` alone keeps the K lowest validation
losses plus the newest, `keep_every` alone thins the history to the steps that are
multiples of M plus the newest. No rule at all keeps everything.

Old checkpoints go only after a newer one is committed; the newest valid one is
never deleted; a deletion removes the manifest first, so a half-deleted folder is
never mistaken for a checkpoint.

A checkpoint marked corrupt (its bytes failed their digests at a resume: catalog.py) is
not history: it is never counted among the kept, and it is deleted first, as soon as
any valid checkpoint is committed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint import catalog
from dist_train.checkpoint.catalog import CheckpointRef
from dist_train.checkpoint.storage import Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int | None = None
    keep_best: int | None = None
    keep_every: int | None = None

    @property
    def active(self) -> bool:
        return any(rule is not None for rule in (self.keep_last, self.keep_best, self.keep_every))


def plan(committed: list[CheckpointRef], policy: RetentionPolicy,
         val_loss: Callable[[CheckpointRef], float | None],
         corrupt: Iterable[CheckpointRef] = ()) -> list[CheckpointRef]:
    """The checkpoints to delete: the `corrupt` ones first, then the committed ones the policy drops
    (oldest first). `committed` (oldest first) must not include the corrupt ones."""
    corrupt = sorted(set(corrupt) - set(committed))
    if not policy.active or not committed:
        return []
    return corrupt + _plan(committed, policy, val_loss)


def _plan(committed: list[CheckpointRef], policy: RetentionPolicy,
          val_loss: Callable[[CheckpointRef], float | None]) -> list[CheckpointRef]:
    ordered = sorted(committed)
    keep = {ordered[-1]}
    if policy.keep_last:
        keep.update(ordered[-policy.keep_last:])
    if policy.keep_every:
        keep.update(ref for ref in ordered if ref.step % policy.keep_every == 0)
    if policy.keep_best:
        scored = [(loss, ref) for ref in ordered if (loss := val_loss(ref)) is not None]
        keep.update(ref for _, ref in sorted(scored, key=lambda pair: (pair[0], pair[1]))[:policy.keep_best])
    return [ref for ref in ordered if ref not in keep]


def delete_checkpoint(storage: Storage, ref: CheckpointRef) -> None:
    """Manifest first (the checkpoint stops being valid), then its files, then the folder."""
    folder = storage.child(ref.name)
    folder.delete(mf.MANIFEST)
    storage.sync_dir(ref.name)
    for entry in folder.list(""):
        if entry.is_dir:
            folder.delete_tree(entry.name)
        else:
            folder.delete(entry.name)
    storage.delete_tree(ref.name)
    catalog.unmark(storage, ref.name)


def val_loss_of(manifest: dict[str, Any] | None) -> float | None:
    if not manifest:
        return None
    value = (manifest.get("metrics") or {}).get("val_loss")
    return float(value) if isinstance(value, (int, float)) else None
