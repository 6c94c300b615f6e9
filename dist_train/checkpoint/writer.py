"""The commit protocol: data first, manifest last; a crash at any point leaves nothing that looks valid.

One protocol, whatever the backend: `Storage.stage` the folder, write every file into it,
`Storage.publish` it with the manifest as its marker (the fence checked just before the
commit point), `Storage.discard_staged` it when anything failed. What differs lives in the
storage classes (checkpoint/storage.py):

Local disk: stage in `.staging-<name>-<id>` beside the checkpoints (a name no
listing takes for a checkpoint), write and fsync every file, the manifest last,
rename the folder into place and fsync the run dir.

Object stores (no rename): claim the folder with a conditional create, upload the
data objects, then create the manifest with one conditional PUT. If a retried create finds a manifest already there, it is
ours only when its writer id is ours; anything else is a conflict.
"""

from __future__ import annotations

import concurrent.futures
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.catalog import checkpoint_name
from dist_train.checkpoint.digest import file_entry
from dist_train.checkpoint.faults import describe_error
from dist_train.checkpoint.fencing import AttemptRegistry
from dist_train.checkpoint.serialization import TensorFile
from dist_train.checkpoint.storage import CLAIM, STAGING_PREFIX, Storage
from dist_train.errors import StorageError

log = logging.getLogger(__name__)


# On object stores a writer first claims the folder (`Storage.stage`: a conditional create of CLAIM),
# so two writers can never interleave data objects under one name; only the claimant uploads, and
# the manifest commits.
__all__ = ["CLAIM", "CheckpointWriter", "Committed", "CommitConflict", "clean_stale"]


class CommitConflict(StorageError):
    """Another writer committed a different manifest at the same name."""


class _LateFields(dict):
    """Manifest fields, some still being computed: `resolve()` waits for them."""

    def __init__(self, fields: dict[str, Any], futures: dict[str, concurrent.futures.Future]):
        super().__init__(fields)
        self.futures = futures

    def resolve(self) -> dict[str, Any]:
        out = dict(self)
        out.update({key: future.result() for key, future in self.futures.items()})
        return out


@dataclass(frozen=True)
class Committed:
    name: str
    url: str
    manifest: dict[str, Any]


def _payload(content: TensorFile | bytes) -> tuple[int, Iterable[Any]]:
    if isinstance(content, TensorFile):
        return content.size, content.chunks()
    return len(content), [content]


# Hashing runs beside the writes, one thread per file plus the deferred manifest fields (the model
# digest): sha256 is the most expensive part of a save, and hashlib drops the GIL on large blocks.
HASH_THREADS = 4
UPLOAD_FILES = 3  # files uploaded side by side to an object store (their parts share one concurrency limit)


def _file_entry(content: TensorFile | bytes) -> dict[str, Any]:
    """The file's manifest entry (size, sha256, chunk digests: digest.py), hashed straight from the
    memory the writer writes from (no second copy)."""
    return file_entry(_payload(content)[1])


class CheckpointWriter:
    def __init__(self, storage: Storage, generation: int, writer_id: str, registry: AttemptRegistry | None):
        self.storage = storage
        self.generation = generation
        self.writer_id = writer_id
        self.registry = registry
        self._hash_pool = concurrent.futures.ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="ckpt-hash")
        self._upload_pool = concurrent.futures.ThreadPoolExecutor(UPLOAD_FILES, thread_name_prefix="ckpt-upload")

    def _write_files(self, folder: str, files: dict[str, TensorFile | bytes]) -> dict[str, Any]:
        """Write the files (as the backend writes best: in turn on disk, side by side to a store)
        while their sha256s are computed beside them."""
        hashes = {rel: self._hash_pool.submit(_file_entry, content) for rel, content in files.items()}
        try:
            self.storage.write_many({f"{folder}/{rel}": _payload(content) for rel, content in files.items()},
                                    self._upload_pool)
            return {rel: hashes[rel].result() for rel in files}
        finally:
            for future in hashes.values():
                future.cancel()

    def commit(self, step: int, files: dict[str, TensorFile | bytes], fields: dict[str, Any],
               deferred: dict[str, Callable[[], Any]] | None = None) -> Committed:
        """Write `files` and commit them under a manifest holding `fields` plus the file table.

        `deferred` manifest fields (the model digest) are computed on the hashing threads
        while the files are written, and waited for before the manifest.
        """
        for rel in files:
            if not mf.safe_relative_name(rel):
                raise ValueError(f"unsafe checkpoint file name {rel!r}")
        if deferred:
            futures = {key: self._hash_pool.submit(compute) for key, compute in deferred.items()}
            fields = _LateFields(fields, futures)
        folder = self.begin(step)
        try:
            table = self._write_files(folder, files)
        except BaseException:
            self.abort(folder)
            raise
        return self.finish(step, folder, table, fields)

    def _manifest(self, step: int, table: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        manifest = fields.resolve() if isinstance(fields, _LateFields) else dict(fields)
        manifest.update({"format_version": mf.FORMAT_VERSION, "step": step, "files": table,
                         "writer_id": self.writer_id, "generation": self.generation,
                         "created_at": mf.utc_now()})
        try:  # one schema, checked on write: never commit what the reader would reject
            mf.parse(mf.encode(manifest))
        except ValueError as exc:
            raise ValueError(f"refusing to commit checkpoint step {step}: its manifest would not be readable "
                             f"({exc})") from None
        return manifest

    def _read_existing(self, rel: str) -> dict[str, Any] | None:
        try:
            return mf.parse(self.storage.read(rel))
        except (FileNotFoundError, mf.ManifestError):
            return None

    def _discard(self, folder: str) -> None:
        """Best-effort removal of an uncommitted folder (never a committed one); what is left,
        the next attempt cleans."""
        try:
            self.storage.discard_staged(folder, mf.MANIFEST)
        except Exception as exc:  # noqa: BLE001 - cleanup must not hide the original error
            log.warning("could not clean up %s: %s", self.storage.url(folder), exc)

    # -- the protocol in steps: `commit` is begin + write + finish; a sharded checkpoint
    # (dist_train/checkpoint/sharded.py) runs them across ranks: rank 0 `begin`s, every rank
    # `write_part`s into the folder, rank 0 `finish`es with all ranks' file tables, or `abort`s.

    def begin(self, step: int) -> str:
        """Rank 0: the folder (relative to the run dir) every rank writes its files into.

        Local disk: a fresh staging folder. Object stores: the checkpoint's own folder, claimed.
        """
        name = checkpoint_name(self.generation, step)
        try:
            return self.storage.stage(name, uuid.uuid4().hex[:8], owner=self.writer_id.encode())
        except FileExistsError:
            raise CommitConflict(f"{self.storage.url(name)} is being written by another writer") from None

    def write_part(self, folder: str, files: dict[str, TensorFile | bytes]) -> dict[str, Any]:
        """Any rank: write and hash `files` into `folder`; their manifest entries (size, sha256)."""
        for rel in files:
            if not mf.safe_relative_name(rel):
                raise ValueError(f"unsafe checkpoint file name {rel!r}")
        return self._write_files(folder, files)

    def finish(self, step: int, folder: str, table: dict[str, Any], fields: dict[str, Any]) -> Committed:
        """Rank 0, once every rank's files are written: check the fence, then commit the manifest.

        On failure the folder is discarded (unless the manifest is someone's committed one).
        """
        name = checkpoint_name(self.generation, step)
        try:
            manifest = self._manifest(step, table, fields)
        except BaseException:
            self._discard(folder)
            raise
        fence = (lambda: self.registry.check_current(self.generation)) if self.registry else None
        # publish cleans up its own failures: what may have been committed is never touched
        if not self.storage.publish(folder, name, mf.MANIFEST, mf.encode(manifest), before=fence):
            existing = self._read_existing(f"{name}/{mf.MANIFEST}")
            if existing is None or existing.get("writer_id") != self.writer_id or existing.get("files") != table:
                self._discard(folder)
                raise CommitConflict(f"{self.storage.url(name)} was committed by another writer")
            log.info("manifest create was retried after it had succeeded; %s is ours", name)
            manifest = existing
        return Committed(name, self.storage.url(name), manifest)

    def abort(self, folder: str) -> None:
        """Rank 0, when any rank failed: best-effort removal of every rank's files (never a committed one)."""
        self._discard(folder)


def clean_stale(storage: Storage, generation: int) -> list[str]:
    """Remove staging folders and manifest-less checkpoint folders left by older attempts.

    Best effort, never fatal: an older attempt's workers may still be writing into their
    folder while this one cleans up. A folder that cannot be removed gets one log line, and
    a later attempt removes what is left.
    """
    from dist_train.checkpoint.catalog import parse_name

    removed = []
    try:
        entries = storage.list("")
        holding = set(storage.folders(""))  # a store may list emptied folders: nothing to remove there
    except Exception as exc:  # noqa: BLE001 - clean-up must not fail the attempt
        log.warning("could not list %s for leftovers of earlier attempts: %s", storage.display_url,
                    describe_error(exc))
        return removed
    for entry in entries:
        if not entry.is_dir:
            continue
        try:
            stale = False
            if entry.name.startswith(STAGING_PREFIX):
                ref = parse_name(entry.name[len(STAGING_PREFIX):].rsplit("-", 1)[0])
                stale = ref is None or ref.generation < generation
            else:
                ref = parse_name(entry.name)
                if ref is not None and ref.generation < generation:
                    stale = not storage.exists(f"{entry.name}/{mf.MANIFEST}")
            if stale:
                storage.delete_tree(entry.name)
                if entry.name in holding:  # else an empty folder, or only a lagging listing's ghost
                    removed.append(entry.name)
        except Exception as exc:  # noqa: BLE001 - e.g. ENOTEMPTY: a zombie worker still writes there
            log.warning("could not remove leftover %s (%s); a later attempt will", storage.url(entry.name),
                        describe_error(exc))
    return removed
