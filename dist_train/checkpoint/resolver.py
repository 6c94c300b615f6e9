"""The one resolver: "a checkpoint or a run dir" -> the newest valid checkpoint, and the skipped ones.

Used by resume, inference and `dist-train ckpt`. A URL naming a checkpoint folder
must be that checkpoint (no fallback to another one); a URL naming a run dir yields
its checkpoints newest first. Candidates are checked cheaply first (manifest, and
file sizes from one listing); the caller then reads the files, checking every sha256
while reading, and a candidate that fails there is skipped like one that failed the
listing. Each skipped checkpoint is reported once with its reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

from dist_train.checkpoint import catalog
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.catalog import CheckpointRef, Verdict
from dist_train.checkpoint.faults import describe_error
from dist_train.checkpoint.state import CorruptCheckpoint
from dist_train.checkpoint.storage import Storage
from dist_train.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")
Report = Callable[[Verdict], None]


def log_skip(verdict: Verdict) -> None:
    log.warning("skipping checkpoint %s: %s", verdict.url, verdict.reason)


@dataclass
class Located:
    """Where the candidates are: a run dir, or the parent of one named checkpoint folder."""
    storage: Storage
    refs: list[CheckpointRef]  # newest first
    explicit: bool             # a checkpoint folder was named: it is the only candidate
    marks: dict[str, str] | None = field(default=None)  # checkpoints marked corrupt (None: look each up)

    @property
    def display_url(self) -> str:
        return self.storage.url(self.refs[0].name) if self.explicit else self.storage.display_url


def is_checkpoint_url(target: Storage) -> bool:
    """A folder holding a manifest, or named like a checkpoint (then a missing manifest is its fault)."""
    name = catalog.folder_name(target.url())
    return catalog.parse_name(name) is not None or target.exists(mf.MANIFEST)


def locate(url: str, options: dict | None = None, what: str = "checkpoint") -> Located:
    """Resolve a URL to its candidates; UserError when there is nothing there to look at."""
    target = Storage(url, options)
    try:
        if is_checkpoint_url(target):
            parent_url, name = url.rstrip("/").rsplit("/", 1) if "/" in url.rstrip("/") else (".", url)
            parent = Storage(parent_url, options)
            ref = catalog.parse_name(name) or CheckpointRef(0, -1, name)
            return Located(parent, [ref], explicit=True)
        refs = catalog.newest_first(catalog.list_checkpoints(target))
        if not refs:
            if what.startswith("--"):  # a flag (--resume URL): say which flag's value is empty
                raise UserError(f"{what} {target.display_url}: no checkpoint there")
            if target.exists(""):
                raise UserError(f"no checkpoint in {target.display_url} "
                                "(neither a checkpoint folder nor a run dir holding checkpoints)")
            raise UserError(f"{what} not found: {target.display_url}")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreachable store, bad endpoint, no access
        raise UserError(f"cannot read {what} {target.display_url}: {describe_error(exc)}") from None
    try:
        marks = catalog.corrupt_marks(target)
    except Exception as exc:  # noqa: BLE001 - same store as the listing that just worked: report it the same way
        raise UserError(f"cannot read {what} {target.display_url}: {describe_error(exc)}") from None
    return Located(target, refs, explicit=False, marks=marks)


def check(located: Located, ref: CheckpointRef, level: str) -> Verdict:
    verdict = catalog.inspect(located.storage, ref, level, located.marks)
    if ref.step == -1 and verdict.reason and verdict.reason.startswith("manifest step"):
        verdict.valid, verdict.reason = True, None  # a renamed checkpoint folder is still a checkpoint
    return verdict


def candidates(located: Located, level: str = "size", on_skip: Report = log_skip) -> Iterator[Verdict]:
    """The valid-looking candidates, newest first; each one that is not is reported and passed over."""
    for ref in located.refs:
        verdict = check(located, ref, level)
        if verdict.valid:
            yield verdict
        else:
            on_skip(verdict)


def mark_corrupt(located: Located | None, url: str, reason: str) -> None:
    """Rank 0 at resume: a run-dir checkpoint whose bytes failed their digests is marked (catalog.py),
    so retention and `ckpt list/prune` know it is not history. Best effort: a failure is logged."""
    if located is None or located.explicit:
        return
    name = catalog.folder_name(url)
    if catalog.parse_name(name) is None:
        return
    try:
        catalog.mark_corrupt(located.storage, name, reason)
        if located.marks is not None:
            located.marks[name] = reason
    except Exception as exc:  # noqa: BLE001 - the mark only saves work later; never stops a resume
        log.warning("could not mark %s as corrupt: %s", url, describe_error(exc))


def newest_valid(url: str, options: dict | None, read: Callable[[Verdict], T], level: str = "size",
                 on_skip: Report = log_skip, what: str = "checkpoint") -> tuple[Verdict, T]:
    """The newest checkpoint that passes the listing checks and `read` (which verifies while reading).

    `read` raises CorruptCheckpoint for a checkpoint whose bytes do not match; that one is
    skipped. A named checkpoint folder that is not valid is a UserError, as is a run dir
    with no valid checkpoint.
    """
    located = locate(url, options, what)
    skipped: list[Verdict] = []

    def report(verdict: Verdict) -> None:
        skipped.append(verdict)
        if not located.explicit:
            on_skip(verdict)

    try:
        for verdict in candidates(located, level, report):
            try:
                return verdict, read(verdict)
            except CorruptCheckpoint as exc:
                verdict.valid, verdict.reason = False, str(exc)
                report(verdict)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage trouble while searching is the user's to fix
        raise UserError(f"cannot search {located.display_url} for checkpoints: {describe_error(exc)}") from None
    if located.explicit:
        raise UserError(f"{located.display_url} is not a valid checkpoint: {skipped[-1].reason}")
    raise UserError(f"no valid checkpoint in {located.display_url} ({len(skipped)} invalid; newest: "
                    f"{skipped[0].reason})")
