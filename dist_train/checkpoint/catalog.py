"""Finding checkpoints in a run dir and deciding which are valid, with a reason for each that is not.

Folder names carry (generation, step): `ckpt-g0003-s0000001200`. The generation is
the run attempt that wrote it, so "newest" means the newest attempt's newest step,
and a zombie attempt can never write into a folder of a newer one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.faults import describe_error
from dist_train.checkpoint.storage import Storage

_NAME = re.compile(r"^ckpt-g(\d{4,9})-s(\d{10,12})$")
STAGING_PREFIX = ".staging-"
READ_BLOCK = 16 * 2**20


@dataclass(frozen=True, order=True)
class CheckpointRef:
    generation: int
    step: int
    name: str = field(compare=False)


def checkpoint_name(generation: int, step: int) -> str:
    return f"ckpt-g{generation:04d}-s{step:010d}"


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


def inspect(storage: Storage, ref: CheckpointRef, level: str = "sha256") -> Verdict:
    """Check one checkpoint: manifest, then sizes from one listing, then (level sha256) every hash."""
    folder = storage.child(ref.name)
    verdict = Verdict(ref, folder.url(), valid=False)
    try:
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
            if sha256_of(folder, name) != entry["sha256"]:
                return f"file {name} does not match its sha256 (corrupted)"
    return None


def newest_first(refs: Iterable[CheckpointRef]) -> list[CheckpointRef]:
    return sorted(refs, reverse=True)


def scan(storage: Storage, level: str = "sha256") -> list[Verdict]:
    """Every checkpoint folder with its verdict, oldest first."""
    return [inspect(storage, ref, level) for ref in list_checkpoints(storage)]


def newest_valid(storage: Storage, level: str = "sha256", on_skip=None) -> Verdict | None:
    """The newest valid checkpoint; `on_skip(verdict)` hears about each newer invalid one."""
    for ref in newest_first(list_checkpoints(storage)):
        verdict = inspect(storage, ref, level)
        if verdict.valid:
            return verdict
        if on_skip:
            on_skip(verdict)
    return None
