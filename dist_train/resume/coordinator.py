"""Finding the newest valid checkpoint after an interruption; rank 0 decides, every rank loads.

Discovery costs one listing of the run dir, then per candidate (newest first) one
listing and one manifest read to check the sizes. Every rank then reads the files
and checks their sha256 while loading (no second read); if any rank finds a
mismatch, all move on to the next candidate together. Each skipped checkpoint is
reported on one line with its reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from dist_train.checkpoint import catalog
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.state import CorruptCheckpoint, Payload, read_payload
from dist_train.checkpoint.faults import describe_error
from dist_train.checkpoint.storage import Storage
from dist_train.distributed.env import DistEnv
from dist_train.errors import UserError
from dist_train.models.registry import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    url: str
    manifest: dict[str, Any]


def _model_mismatch(manifest: dict[str, Any], spec: ModelSpec) -> str | None:
    """A readable reason why the checkpoint's model cannot be this run's model, or None."""
    theirs = manifest.get("model") or {}
    for key, label in (("name", "model"), ("num_classes", "classes"), ("in_channels", "input channels"),
                       ("image_size", "image size"), ("width", "width")):
        if key in theirs and theirs[key] != getattr(spec, key):
            return (f"checkpoint holds a {theirs.get('name')} model with {theirs.get('num_classes')} classes "
                    f"({label} {theirs[key]}), this run builds {spec.name} with {spec.num_classes} classes "
                    f"({label} {getattr(spec, key)})")
    return None


def _skip(url: str, reason: str) -> None:
    log.warning("skipping checkpoint %s: %s", url, reason)


def _next_candidate(storage: Storage, pending: list[catalog.CheckpointRef]) -> Candidate | None:
    """Rank 0: the newest remaining checkpoint whose manifest and file sizes check out."""
    while pending:
        ref = pending.pop(0)
        verdict = catalog.inspect(storage, ref, level="size")
        if verdict.valid:
            return Candidate(verdict.url, verdict.manifest)
        _skip(verdict.url, verdict.reason or "invalid")
    return None


def _explicit_candidates(url: str, options: dict) -> tuple[Storage, list[Candidate] | None, list]:
    """--resume URL: a checkpoint folder (must be valid) or a run dir (its newest valid checkpoint)."""
    target = Storage(url, options)
    try:
        has_manifest = target.exists(mf.MANIFEST)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"--resume {target.display_url}: cannot read it ({describe_error(exc)})") from None
    if has_manifest:
        parent_url, name = url.rstrip("/").rsplit("/", 1)
        parent = Storage(parent_url, options)
        ref = catalog.parse_name(name) or catalog.CheckpointRef(0, -1, name)
        verdict = catalog.inspect(parent, ref, level="size")
        if ref.step == -1 and verdict.reason and verdict.reason.startswith("manifest step"):
            verdict.valid, verdict.reason = True, None  # a renamed checkpoint folder is still a checkpoint
        if not verdict.valid:
            raise UserError(f"--resume {target.display_url} is not a valid checkpoint: {verdict.reason}")
        return parent, [Candidate(verdict.url, verdict.manifest)], []
    refs = catalog.newest_first(catalog.list_checkpoints(target))
    if not refs:
        raise UserError(f"--resume {target.display_url}: no checkpoint there")
    return target, None, refs


def choose_and_load(env: DistEnv, storage: Storage, resume: str, verify: str, spec: ModelSpec,
                    options: dict) -> Payload | None:
    """The payload every rank continues from, or None for a fresh start (collective)."""
    error: str | None = None
    explicit = resume not in ("auto", "never")
    pending: list[catalog.CheckpointRef] = []
    queue: list[Candidate] | None = None
    source = storage
    if env.is_rank0:
        try:
            if explicit:
                source, queue, pending = _explicit_candidates(resume, options)
            else:
                pending = catalog.newest_first(catalog.list_checkpoints(storage))
                if resume == "never":
                    committed = [r for r in pending if _has_manifest(storage, r)]
                    if committed:
                        raise UserError(
                            f"run dir {storage.display_url} already holds {len(committed)} checkpoint(s) "
                            f"(newest {committed[0].name}); --resume never would start over beside them. "
                            "Use --resume auto to continue, or a new --run-dir")
                    pending = []
        except UserError as exc:
            error = str(exc)
    env.agree(error)

    while True:
        candidate = None
        error = None
        if env.is_rank0:
            try:
                candidate = queue.pop(0) if queue else (_next_candidate(source, pending) if queue is None else None)
                if candidate is not None:
                    error = _model_mismatch(candidate.manifest, spec)
                    if error:
                        error = f"cannot resume from {candidate.url}: {error}"
            except Exception as exc:  # noqa: BLE001 - storage trouble during discovery is the user's to fix
                error = f"cannot search {source.display_url} for checkpoints: {describe_error(exc)}"
        env.agree(error)
        candidate = env.broadcast_object(candidate)
        if candidate is None:
            if explicit:
                raise UserError(f"--resume {resume}: no valid checkpoint there")
            return None
        problem, payload = None, None
        try:
            folder = Storage(candidate.url, options)
            payload = read_payload(folder, candidate.manifest, verify_sha=verify == "sha256")
        except CorruptCheckpoint as exc:
            problem = str(exc)
        except Exception as exc:  # noqa: BLE001 - unreadable: treat as invalid, try the next
            problem = f"unreadable ({describe_error(exc)})"
        problems = [p for p in env.all_gather_objects(problem) if p]
        if not problems:
            log.info("resuming from %s (step %d, epoch %d)", candidate.url, candidate.manifest["step"],
                     candidate.manifest["epoch"])
            return payload
        if explicit:  # the one error line says it all; no "skipping" warning before it
            env.agree(f"--resume {candidate.url} is not a valid checkpoint: {problems[0]}")
        if env.is_rank0:
            _skip(candidate.url, problems[0])


def _has_manifest(storage: Storage, ref: catalog.CheckpointRef) -> bool:
    return storage.exists(f"{ref.name}/{mf.MANIFEST}")
