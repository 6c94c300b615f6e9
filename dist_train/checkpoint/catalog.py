"""Finding checkpoints in a run dir and deciding which are valid, with a reason for each that is not.

A checkpoint whose bytes were found corrupt when a resume read them is marked so
(`_invalid/<checkpoint>.json` in the run dir, written through the storage seam by rank 0):
from then on it is invalid with that reason without reading it again, retention does
not count it among the checkpoints it keeps and deletes it first, and `ckpt prune`
removes it first. The listing checks alone would call it valid (its manifest and sizes
are fine), so without the mark it would stand in for history it cannot restore.

Folder names carry (generation, step): `ckpt-g0003-s0000001200`. The generation is
the run attempt that wrote it, so "newest" means the newest attempt's newest step,
and a zombie attempt can never write into a folder of a newer one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from dist_train.checkpoint import digest
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.faults import describe_error
from dist_train.checkpoint.storage import STAGING_PREFIX, Storage

_NAME = re.compile(r"^ckpt-g(\d{4,9})-s(\d{10,12})$")
READ_BLOCK = 16 * 2**20
MARKS = "_invalid"  # run-dir folder of the marks of checkpoints found corrupt at resume


@dataclass(frozen=True, order=True)
class CheckpointRef:
    generation: int
    step: int
    name: str = field(compare=False)


def checkpoint_name(generation: int, step: int) -> str:
    return f"ckpt-g{generation:04d}-s{step:010d}"


def folder_name(url: str) -> str:
    """The last part of a checkpoint folder's URL (its name in the run dir and in a node's cache)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def parse_name(name: str) -> CheckpointRef | None:
    match = _NAME.match(name)
    return CheckpointRef(int(match.group(1)), int(match.group(2)), name) if match else None


def list_checkpoints(storage: Storage) -> list[CheckpointRef]:
    """Checkpoint folders of the run dir, oldest first, from one (recursive) listing call.

    A folder that holds no object is not a checkpoint, nor a broken one: object stores may
    list a folder for minutes after its last object was deleted (SeaweedFS does), and a
    deletion killed before it removed the (empty) folder leaves one on disk.
    """
    refs = [parse_name(name) for name in storage.folders("")]
    return sorted(r for r in refs if r is not None)


@dataclass
class Verdict:
    ref: CheckpointRef
    url: str
    valid: bool
    reason: str | None = None
    manifest: dict[str, Any] | None = None
    size: int = 0

    def as_dict(self) -> dict[str, Any]:
        m = self.manifest or {}
        return {"url": self.url, "step": m.get("step", self.ref.step), "epoch": m.get("epoch"),
                "created_at": m.get("created_at"), "size": self.size, "valid": self.valid,
                "reason": self.reason, "model_digest": m.get("model_digest"),
                "generation": self.ref.generation}


def read_manifest(folder: Storage) -> dict[str, Any]:
    """The folder's parsed manifest; ManifestError (with the reason) when it is not usable."""
    try:
        data = folder.read(mf.MANIFEST)
    except FileNotFoundError:
        raise mf.ManifestError("no manifest (incomplete or interrupted write)") from None
    return mf.parse(data)


def sha256_of(folder: Storage, name: str) -> str:
    digest = hashlib.sha256()
    for block in folder.iter_read(name, READ_BLOCK):
        digest.update(block)
    return digest.hexdigest()


def _mark_name(name: str) -> str:
    return f"{MARKS}/{name}.json"


def mark_corrupt(storage: Storage, name: str, reason: str) -> None:
    """Record that checkpoint `name` of the run dir failed its digests when read (rank 0, at resume)."""
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    body = {"checkpoint": name, "reason": reason, "found_at": when}
    storage.write_bytes(_mark_name(name), (json.dumps(body, sort_keys=True) + "\n").encode())


def corrupt_marks(storage: Storage) -> dict[str, str]:
    """{checkpoint name: reason} of the checkpoints marked corrupt, from one listing (plus one read each)."""
    marks: dict[str, str] = {}
    for entry in storage.list(MARKS):
        if entry.is_dir or not entry.name.endswith(".json"):
            continue
        name = entry.name[:-len(".json")]
        try:
            reason = json.loads(storage.read(f"{MARKS}/{entry.name}").decode()).get("reason")
        except (FileNotFoundError, ValueError, UnicodeDecodeError, AttributeError):
            reason = None  # deleted meanwhile or unreadable: still a mark
        marks[name] = str(reason or "found corrupt when read")
    return marks


def unmark(storage: Storage, name: str) -> None:
    try:
        storage.delete(_mark_name(name))
    except FileNotFoundError:
        pass


def _marked(storage: Storage, name: str) -> str | None:
    try:
        data = storage.read(_mark_name(name))
    except FileNotFoundError:
        return None
    try:
        return str(json.loads(data.decode()).get("reason") or "found corrupt when read")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return "found corrupt when read"


def inspect(storage: Storage, ref: CheckpointRef, level: str = "sha256",
            marks: dict[str, str] | None = None) -> Verdict:
    """Check one checkpoint: its corrupt mark, manifest, then sizes from one listing, then (level sha256)
    every digest. `marks` (from `corrupt_marks`) saves a read per checkpoint when several are checked."""
    folder = storage.child(ref.name)
    verdict = Verdict(ref, folder.url(), valid=False)
    try:
        mark = marks.get(ref.name) if marks is not None else _marked(storage, ref.name)
        listing = {e.name: e for e in folder.list("") if not e.is_dir}
        if mf.MANIFEST not in listing:
            verdict.size = sum(e.size for e in listing.values())
            verdict.reason = "no manifest (incomplete or interrupted write)"
            return verdict
        manifest = read_manifest(folder)
        verdict.manifest = manifest
        verdict.size = sum(e["size"] for e in manifest["files"].values()) + listing[mf.MANIFEST].size
        if manifest["step"] != ref.step:
            verdict.reason = f"manifest step {manifest['step']} does not match folder name {ref.name}"
            return verdict
        if mark is not None:
            verdict.reason = f"found corrupt when read: {mark}"
            return verdict
        verdict.reason = check_files(folder, manifest, listing, level)
    except mf.ManifestError as exc:
        verdict.reason = str(exc)
    except FileNotFoundError as exc:
        verdict.reason = f"file vanished while checking ({exc.filename or exc})"
    except OSError as exc:
        verdict.reason = f"unreadable: {describe_error(exc)}"
    verdict.valid = verdict.reason is None
    return verdict


def check_files(folder: Storage, manifest: dict[str, Any], listing: dict[str, Any] | None,
                level: str) -> str | None:
    """The first problem with the listed files, or None when they all match."""
    for name, entry in sorted(manifest["files"].items()):
        if listing is not None and "/" not in name:
            size = listing[name].size if name in listing else None
        else:
            size = folder.size(name)
        if size is None:
            return f"file {name} is missing"
        if size != entry["size"]:
            return f"file {name} is {size} bytes, manifest says {entry['size']} (truncated or replaced)"
    if level == "sha256":
        for name, entry in sorted(manifest["files"].items()):
            try:
                digest.verify_file(folder, name, entry, READ_BLOCK)  # chunks on several threads when listed
            except digest.CorruptCheckpoint as exc:
                return str(exc)
    return None


def newest_first(refs: Iterable[CheckpointRef]) -> list[CheckpointRef]:
    return sorted(refs, reverse=True)


def scan(storage: Storage, level: str = "sha256") -> list[Verdict]:
    """Every checkpoint folder with its verdict, oldest first."""
    marks = corrupt_marks(storage)
    return [inspect(storage, ref, level, marks) for ref in list_checkpoints(storage)]


def newest_valid(storage: Storage, level: str = "sha256", on_skip=None) -> Verdict | None:
    """The newest valid checkpoint of a run dir (the one resolver's candidates); `on_skip(verdict)`
    hears about each newer invalid one."""
    from dist_train.checkpoint import resolver

    located = resolver.Located(storage, newest_first(list_checkpoints(storage)), explicit=False)
    return next(resolver.candidates(located, level, on_skip or (lambda verdict: None)), None)
