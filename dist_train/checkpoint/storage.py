"""The one storage seam: every run-dir read and write goes through `Storage`, over fsspec.

`Storage(url)` opens the backend class that fits the URL: `LocalStorage` (a path,
`file://`), `S3Storage` (`s3://`) or `FsspecStorage` (any other fsspec URL, e.g.
`memory://`, `gs://`). The rest of the code sees one interface; what differs by
backend is a method of its class, not a branch:

- durability: local files and folders are fsynced; stores are durable once they answer;
- the commit primitive (`stage` / `publish` / `discard_staged`): local folders and files are
  written under a hidden staging name and renamed into place (`atomic_rename`); stores write in
  place, claim a folder with a conditional create, and commit it with a conditional create of its
  marker (the manifest). Callers run one protocol; only these methods know which it is;
- the conditional create: O_EXCL locally, `If-None-Match: *` on S3 (probed once per run
  by `check_conditional_writes`, since some servers ignore it), check-then-write elsewhere;
- large writes: streamed to disk, multipart uploads on S3; listing refresh and retries.

Transient remote faults are retried with backoff within a bounded budget. Tests inject
faults through `Storage.hooks`, which every mutating operation calls first.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import posixpath
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dist_train.checkpoint import s3
from dist_train.checkpoint.faults import RetryPolicy, describe_error, is_transient
from dist_train.errors import UserError

log = logging.getLogger(__name__)

Hook = Callable[[str, str], None]
PROBE_DIR = "_attempts"  # where the conditional-write probe goes: fencing's folder, claimed anyway
STAGING_PREFIX = ".staging-"  # staged names: `.staging-<name>-<tag>`, never taken for a checkpoint or a manifest
CLAIM = ".writer"  # a folder written in place is claimed with this file, holding its owner


@dataclass(frozen=True)
class Entry:
    name: str
    is_dir: bool
    size: int


@dataclass
class _Shared:
    """State shared by a storage and its `child()` views: one lock, one probe verdict, one upload pool."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    creates_checked: bool = False
    creates_best_effort: bool = False  # the store ignores conditional writes: check, then write
    upload_slots: dict[str, Any] = field(default_factory=dict)


def redact_url(url: str) -> str:
    """The URL without any user:password part, for messages and manifests."""
    parts = urlsplit(url)
    if parts.password or parts.username:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


def _protocol(url: str) -> str:
    return fsspec.core.split_protocol(url)[0] or "file"


def check_url_scheme(url: str) -> None:
    """Refuse a run-dir URL whose scheme fsspec does not know (or cannot import) up front."""
    protocol = _protocol(url)
    if not re.fullmatch(r"[a-z][a-z0-9+.\-]*", protocol):
        raise UserError(f"run dir {redact_url(url)!r}: malformed URL scheme")
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise UserError(f"run dir {redact_url(url)}: unknown URL scheme '{protocol}://' "
                        "(use a local path, file://, s3:// or another fsspec protocol)") from None
    except ImportError as exc:
        raise UserError(f"run dir {redact_url(url)}: scheme '{protocol}://' needs a package that is not "
                        f"installed ({exc})") from None


def _backend(url: str) -> type["Storage"]:
    protocol = _protocol(url)
    if protocol in S3Storage.protocols:
        return S3Storage
    try:
        if issubclass(fsspec.get_filesystem_class(protocol), LocalFileSystem):
            return LocalStorage
    except (ValueError, ImportError):
        pass  # FsspecStorage's check_url_scheme says what is wrong
    return FsspecStorage


def _join(chunks: Iterable[Any]) -> bytes:
    if isinstance(chunks, (bytes, bytearray)):
        return bytes(chunks)
    return b"".join(bytes(c) for c in chunks)


class Storage:
    """A run dir (or any folder) behind one small interface; paths are relative to it.

    `Storage(url, options)` returns the backend subclass for the URL's protocol.
    """

    hooks: list[Hook] = []  # fault injection for tests: called as hook(operation, relative path)
    atomic_rename = False  # `publish` renames into place (else writes in place); callers use stage/publish
    appendable = False  # `local_path` files can be opened for appending
    retries = True  # transient faults are retried (never on local disk: they are not transient)

    def __new__(cls, *args: Any, **kwargs: Any) -> "Storage":
        if cls is Storage and args:
            cls = _backend(args[0])
        return super().__new__(cls)

    def __init__(self, url: str, options: dict[str, Any] | None = None, retry: RetryPolicy | None = None):
        check_url_scheme(url)
        self.display_url = redact_url(url.rstrip("/") or url)
        self.options = dict(options or {})
        self.retry = retry or RetryPolicy()
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **self._fs_kwargs(self.options))
        except (TypeError, ValueError) as exc:
            raise UserError(f"storage options do not fit {_protocol(url)}://: {exc}") from None
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self._shared = _Shared()

    def _fs_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        return dict(options)

    # -- naming -------------------------------------------------------------------------

    def path(self, rel: str = "") -> str:
        rel = rel.strip("/")
        return posixpath.join(self.root, rel) if rel else self.root

    def url(self, rel: str = "") -> str:
        """The user-facing URL of `rel` (a plain path for local disk)."""
        rel = rel.strip("/")
        return f"{self.display_url}/{rel}" if rel else self.display_url

    def child(self, rel: str) -> "Storage":
        """The same filesystem rooted at a sub-folder (no new connection)."""
        sub = object.__new__(type(self))
        sub.__dict__.update(self.__dict__)
        sub.root = self.path(rel)
        sub.display_url = self.url(rel)
        return sub

    # -- plumbing -----------------------------------------------------------------------

    def _call(self, operation: str, rel: str, func: Callable[[], Any], *, mutating: bool,
              retry: bool = True) -> Any:
        if mutating:
            for hook in list(Storage.hooks):
                hook(operation, rel)
        attempts = self.retry.attempts if (retry and self.retries) else 1
        started = time.monotonic()
        for attempt in range(attempts):
            try:
                return func()
            except FileNotFoundError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if not is_transient(exc):
                    raise
                delay = self.retry.delay(attempt)
                if attempt + 1 >= attempts or time.monotonic() + delay - started > self.retry.deadline:
                    exc.storage_attempts = attempt + 1  # type: ignore[attr-defined] - for describe_error
                    raise
                log.warning("storage %s %s failed (%s); retry %d/%d in %.1fs", operation, self.url(rel),
                            describe_error(exc), attempt + 1, attempts - 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # -- reading ------------------------------------------------------------------------

    def _ls(self, path: str) -> list[dict[str, Any]]:
        return self.fs.ls(path, detail=True, refresh=True)  # another process may just have written

    def list(self, rel: str = "") -> list[Entry]:
        """Immediate children of `rel` in one listing call; [] when it does not exist."""
        def run() -> list[Entry]:
            try:
                entries = self._ls(self.path(rel))
            except FileNotFoundError:
                return []
            out = []
            base = self.path(rel).rstrip("/")
            for info in entries:
                full = info["name"].rstrip("/")
                if full == base:
                    continue
                out.append(Entry(full.rsplit("/", 1)[-1], info.get("type") == "directory", int(info.get("size") or 0)))
            return out
        return self._call("list", rel, run, mutating=False)

    def folders(self, rel: str = "") -> list[str]:
        """Sub-folders of `rel` that hold at least one object, in one recursive listing.

        Object stores may go on listing a folder for minutes after its last object is gone
        (SeaweedFS does); such a folder holds nothing and is not reported.
        """
        def run() -> list[str]:
            base = self.path(rel).rstrip("/") + "/"
            try:
                found = self.fs.find(self.path(rel), withdirs=False)
            except FileNotFoundError:
                return []
            names = set()
            for key in found:
                inner = key[len(base):] if key.startswith(base) else ""
                if "/" in inner.strip("/") and not key.endswith("/"):
                    names.add(inner.split("/", 1)[0])
            return sorted(names)
        return self._call("list", rel, run, mutating=False)

    def read(self, rel: str, size: int | None = None) -> bytes:
        """The whole file; `size`, when the caller knows it (a manifest says it), spares a store a lookup."""
        return self._call("read", rel, lambda: self.fs.cat_file(self.path(rel)), mutating=False)

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file (fewer at its end): one ranged GET on a store, pread on disk."""
        return self._call("read", rel, lambda: self.fs.cat_file(self.path(rel), start=start, end=end),
                          mutating=False)

    def iter_read(self, rel: str, block_size: int) -> Iterable[bytes]:
        """The file's bytes in blocks, so a large file is hashed without holding it whole."""
        size = self.size(rel)
        if size is None:
            raise FileNotFoundError(self.url(rel))
        for start in range(0, size, block_size):
            yield self.read_range(rel, start, min(size, start + block_size))

    def size(self, rel: str) -> int | None:
        def run() -> int | None:
            try:
                return int(self.fs.info(self.path(rel))["size"])
            except FileNotFoundError:
                return None
        return self._call("size", rel, run, mutating=False)

    def exists(self, rel: str) -> bool:
        return self._call("exists", rel, lambda: self.fs.exists(self.path(rel)), mutating=False)

    def local_path(self, rel: str = "") -> str:
        raise NotImplementedError(f"{self.display_url} is not on local disk")

    @property
    def is_local(self) -> bool:
        """Files on this machine's disk (pread, page cache); False for object stores and remote filesystems.

        A capability the readers ask instead of catching `local_path`'s NotImplementedError: a
        restore splits its reads between ranks only where every byte costs a network fetch.
        """
        return False

    # -- writing ------------------------------------------------------------------------

    def makedirs(self, rel: str = "") -> None:
        """Make the folder where folders exist (local disk); stores have none."""

    def _streams(self, size: int) -> bool:
        """Write this file straight from its chunks (never retried whole) rather than as one PUT."""
        return False

    def _write_stream(self, rel: str, chunks: Iterable[Any]) -> None:
        raise NotImplementedError

    def write(self, rel: str, chunks: Iterable[Any], size: int) -> None:
        """Write a file from byte chunks; durable (fsynced) on local disk, multipart when large on S3."""
        if self._streams(size):
            self._call("write", rel, lambda: self._write_stream(rel, chunks), mutating=True, retry=False)
        else:
            data = _join(chunks)
            self._call("write", rel, lambda: self.fs.pipe_file(self.path(rel), data), mutating=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.write(rel, [data], len(data))

    def write_many(self, files: dict[str, tuple[int, Iterable[Any]]],
                   pool: concurrent.futures.Executor) -> None:
        """Write several files ({rel: (size, chunks)}); on a store side by side on `pool`, so one
        upload's round trips overlap another's transfer. Returns once every write has stopped."""
        writes = [pool.submit(self.write, rel, chunks, size) for rel, (size, chunks) in files.items()]
        try:
            for future in writes:
                future.result()
        finally:
            for future in writes:
                future.cancel()
            concurrent.futures.wait(writes)  # a failed commit is cleaned up only once every upload stopped

    def _create(self, path: str, data: bytes) -> bool:
        """No atomic primitive: an exists-check is the best such a store offers."""
        with self._shared.lock:
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
            return True

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create `rel` holding `data` only if it does not exist; False when it already did."""
        return self._call("create", rel, lambda: self._create(self.path(rel), data), mutating=True)

    def rename(self, src: str, dst: str) -> None:
        raise NotImplementedError(f"{self.display_url}: rename is only atomic on local disk")

    def sync_dir(self, rel: str = "") -> None:
        """Make a rename or create inside `rel` durable (local disk; stores are durable once they answer)."""

    def delete(self, rel: str) -> None:
        """Delete one file; already gone is fine."""
        def run() -> None:
            try:
                self.fs.rm_file(self.path(rel))
            except FileNotFoundError:
                pass
        self._call("delete", rel, run, mutating=True)

    def delete_tree(self, rel: str) -> None:
        def run() -> None:
            try:
                self.fs.rm(self.path(rel), recursive=True)
            except FileNotFoundError:
                pass
        self._call("delete_tree", rel, run, mutating=True)

    def remove_empty_folder(self, rel: str) -> None:
        """Remove the folder `rel` if it is empty (local disk); stores have no folders to leave behind."""

    # -- publishing: one protocol, renamed into place or written in place -----------------
    #
    # `stage` says where to write what is to appear as `name`; `publish` makes it appear (the
    # commit point); `discard_staged` removes what was staged and never published. A crash at any
    # point leaves either nothing that looks like `name`, or `name` whole: locally the staged
    # name is hidden until one rename; on a store, a folder's commit is its marker (the manifest),
    # created last and only if absent, and a file is one PUT.

    def staging_name(self, name: str, tag: str) -> str:
        """The hidden sibling `name` is staged under: `.staging-<name>-<tag>` in the same folder."""
        parent, _, base = name.strip("/").rpartition("/")
        staged = f"{STAGING_PREFIX}{base}-{tag}"
        return f"{parent}/{staged}" if parent else staged

    def stage(self, name: str, tag: str, owner: bytes | None = None) -> str:
        """Where to write what is to appear as `name` once `publish`ed (a file; a folder with `owner`).

        A store writes in place: `name` itself. With `owner`, `name` is a folder that only this
        owner writes into: it is claimed first by creating `name/.writer` (holding `owner`) only if
        absent, so two writers never interleave objects under one name; FileExistsError when
        another owner holds it (a retried create that finds its own claim is fine).
        """
        if owner is not None:
            claim = f"{name}/{CLAIM}"
            if not self.create_exclusive(claim, owner):
                try:
                    held = self.read(claim)
                except FileNotFoundError:
                    held = None
                if held != owner:
                    raise FileExistsError(errno.EEXIST, "being written by another writer", self.url(name))
        return name

    def publish(self, staged: str, name: str, marker: str | None = None, data: bytes = b"",
                before: Callable[[], None] | None = None) -> bool:
        """Make what was written at `staged` appear as `name`: the commit point.

        With `marker` (a folder's manifest), `name/marker` holding `data` is written last and is
        what makes the folder count. `before` runs just before the commit point (the fence
        check): when it raises, nothing is published. Returns False when the marker exists
        already (someone committed `name`, or a retried create whose first answer was lost: the
        caller reads it to tell which). On failure, what is certainly unpublished is discarded;
        after the marker's create was sent nothing is removed (it may have landed): the next
        attempt's clean-up removes a folder that has no marker.
        """
        try:
            if before is not None:
                before()
        except BaseException:
            self._discard_quietly(staged, marker)
            raise
        if marker is None:
            return True  # a file written in place: its PUT was the commit
        return self.create_exclusive(f"{name}/{marker}", data)

    def discard_staged(self, staged: str, marker: str | None = None) -> None:
        """Remove what was staged and never published; a folder holding `marker` is someone's
        committed one and stays. A file staged in place is removed whole."""
        if marker is None:
            self.delete(staged)
            return
        if self.exists(f"{staged}/{marker}"):
            return
        self.delete_tree(staged)

    def _discard_quietly(self, staged: str, marker: str | None) -> None:
        try:
            self.discard_staged(staged, marker)
        except Exception as exc:  # noqa: BLE001 - clean-up must not hide the original error
            log.warning("could not clean up %s: %s", self.url(staged), describe_error(exc))

    def create_whole(self, rel: str, data: bytes, tag: str) -> bool:
        """Create `rel` holding `data` only if it does not exist, never visible half-written;
        False when it existed. A store: one conditional create (a PUT is whole)."""
        return self.create_exclusive(rel, data)

    # -- checks -------------------------------------------------------------------------

    def _check_access(self) -> None:
        self.list("")

    def check_reachable(self) -> None:
        """Fail with a clear line when the store cannot be used: missing bucket, bad endpoint, no access."""
        try:
            self._check_access()
        except UserError:
            raise
        except FileNotFoundError:
            raise UserError(f"run dir {self.display_url}: bucket or container does not exist") from None
        except PermissionError:
            raise UserError(f"run dir {self.display_url}: access denied (check the credentials)") from None
        except TypeError as exc:  # s3fs builds its session on first use: an unknown option shows up here
            raise UserError(f"run dir {self.display_url}: storage options do not fit ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - any failure here means the store is unusable
            raise UserError(f"run dir {self.display_url}: storage not reachable ({describe_error(exc)})") from None

    def _creates_are_atomic(self, probe_dir: str) -> bool:
        return False

    def check_conditional_writes(self, strict: bool = False, probe_dir: str = PROBE_DIR) -> None:
        """Once per run, when the run dir is claimed: is `create_exclusive` atomic on this store?

        When it is not, creates fall back to check-then-write, and one warning says that fencing
        and manifest exclusivity are best-effort here; with `strict` that is a UserError instead.
        """
        shared = self._shared
        if shared.creates_checked:
            return
        if not self._creates_are_atomic(probe_dir):
            what = self._no_atomic_create_reason()
            if strict:
                raise UserError(f"run dir {self.display_url}: {what}, so fencing and manifest exclusivity "
                                "would only be best-effort; --strict-fencing refuses such a store")
            log.warning("run dir %s: %s; falling back to check-then-write: fencing and manifest exclusivity "
                        "are best-effort on this server", self.display_url, what)
            shared.creates_best_effort = True
        shared.creates_checked = True

    def _no_atomic_create_reason(self) -> str:
        return f"{_protocol(self.display_url)}:// has no atomic create-if-absent"


class LocalStorage(Storage):
    """Local disk: fsynced files, O_EXCL creates, folders renamed into place."""

    atomic_rename = True
    appendable = True
    retries = False

    def path(self, rel: str = "") -> str:
        rel = rel.strip("/")
        return os.path.join(self.root, rel) if rel else self.root

    def url(self, rel: str = "") -> str:
        return self.path(rel)

    def _ls(self, path: str) -> list[dict[str, Any]]:
        return self.fs.ls(path, detail=True)

    def folders(self, rel: str = "") -> list[str]:
        def holds_a_file(path: str) -> bool:
            return any(files for _, _, files in os.walk(path))
        return [e.name for e in self.list(rel) if e.is_dir and holds_a_file(self.path(f"{rel}/{e.name}"))]

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        def run() -> bytes:
            fd = os.open(self.path(rel), os.O_RDONLY)
            try:
                parts, offset = [], start
                while offset < end:
                    block = os.pread(fd, end - offset, offset)
                    if not block:
                        break
                    parts.append(block)
                    offset += len(block)
                return b"".join(parts)
            finally:
                os.close(fd)
        return self._call("read", rel, run, mutating=False)

    def iter_read(self, rel: str, block_size: int) -> Iterable[bytes]:
        with open(self.path(rel), "rb") as handle:
            while block := handle.read(block_size):
                yield block

    def local_path(self, rel: str = "") -> str:
        return self.path(rel)

    @property
    def is_local(self) -> bool:
        return True

    def makedirs(self, rel: str = "") -> None:
        self._call("makedirs", rel, lambda: os.makedirs(self.path(rel), exist_ok=True), mutating=True)

    def _streams(self, size: int) -> bool:
        return True

    def _write_stream(self, rel: str, chunks: Iterable[Any]) -> None:
        path = self.path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            offset = 0
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                start = offset
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                    offset += written
                _start_writeback(fd, start, offset - start)
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_many(self, files: dict[str, tuple[int, Iterable[Any]]],
                   pool: concurrent.futures.Executor) -> None:
        """One file after the other (side by side measured no faster on disk)."""
        for rel, (size, chunks) in files.items():
            self.write(rel, chunks, size)

    def _create(self, path: str, data: bytes) -> bool:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def rename(self, src: str, dst: str) -> None:
        """Atomic rename of a local folder; refuses to replace an existing target."""
        def run() -> None:
            target = self.path(dst)
            if os.path.exists(target):
                raise FileExistsError(errno.EEXIST, "checkpoint folder exists", target)
            try:
                os.rename(self.path(src), target)
            except OSError as exc:
                # Two writers past the check at once: the kernel lets one rename onto the (then
                # non-empty) folder fail; that is the same "already taken" answer.
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise FileExistsError(errno.EEXIST, "checkpoint folder exists", target) from None
                raise
        self._call("rename", dst, run, mutating=True)

    def sync_dir(self, rel: str = "") -> None:
        def run() -> None:
            fd = os.open(self.path(rel), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._call("sync_dir", rel, run, mutating=True)

    def remove_empty_folder(self, rel: str) -> None:
        def run() -> None:
            try:
                os.rmdir(self.path(rel))
            except OSError:
                pass  # not empty (someone else's files), or gone
        self._call("rmdir", rel, run, mutating=True)

    def stage(self, name: str, tag: str, owner: bytes | None = None) -> str:
        """A hidden sibling of `name` (made, for a folder), private to this writer: no claim needed."""
        staged = self.staging_name(name, tag)
        if owner is not None:
            self.makedirs(staged)
        return staged

    def publish(self, staged: str, name: str, marker: str | None = None, data: bytes = b"",
                before: Callable[[], None] | None = None) -> bool:
        """Marker written, every folder of the staged tree fsynced (deepest first), `before`, then
        one rename into place (FileExistsError when `name` is taken) and the parent fsynced.
        On any failure before the rename the staged copy is removed; files were fsynced as written."""
        try:
            if marker is not None:
                self.write_bytes(f"{staged}/{marker}", data)
            if os.path.isdir(self.path(staged)):
                for sub in self._subfolders(staged):
                    self.sync_dir(f"{staged}/{sub}")
                self.sync_dir(staged)
            if before is not None:
                before()
            self.rename(staged, name)
        except BaseException:
            self._discard_quietly(staged, marker)
            raise
        self.sync_dir(posixpath.dirname(name.strip("/")))
        return True

    def _subfolders(self, staged: str) -> list[str]:
        """Folders under `staged` (relative), deepest first: each one's entries are fsynced before its parent's."""
        root = self.path(staged)
        found = [os.path.relpath(os.path.join(top, d), root).replace(os.sep, "/")
                 for top, dirs, _ in os.walk(root) for d in dirs]
        return sorted(found, key=lambda s: (-s.count("/"), s))

    def discard_staged(self, staged: str, marker: str | None = None) -> None:
        """A staging name is never a published one (publish renames it away): removed whole, marker
        or not. Any other name is treated as on a store: a folder holding `marker` stays."""
        if not posixpath.basename(staged.strip("/")).startswith(STAGING_PREFIX):
            super().discard_staged(staged, marker)
        elif os.path.isdir(self.path(staged)):
            self.delete_tree(staged)
        else:
            self.delete(staged)

    def create_whole(self, rel: str, data: bytes, tag: str) -> bool:
        """Written and fsynced under a staging name, then renamed into place (O_EXCL alone could
        leave a half-written file behind a crash)."""
        staged = self.stage(rel, tag)
        self.write_bytes(staged, data)
        try:
            return self.publish(staged, rel)
        except FileExistsError:
            return False

    def _check_access(self) -> None:
        parent = self.root
        while not os.path.exists(parent):
            parent = os.path.dirname(parent) or "/"
        if not os.path.isdir(parent):
            raise UserError(f"run dir {self.display_url}: {parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"run dir {self.display_url}: permission denied on {parent}")

    def _creates_are_atomic(self, probe_dir: str) -> bool:
        return True  # O_EXCL


class S3Storage(Storage):
    """S3 and S3-compatible stores: conditional PUTs, multipart uploads, bounded retries."""

    protocols = ("s3", "s3a")

    def __init__(self, url: str, options: dict[str, Any] | None = None, retry: RetryPolicy | None = None):
        super().__init__(url, options, retry)
        self.fs.retries = 1  # see s3.BOTOCORE_ATTEMPTS

    def _fs_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        return s3.s3_options(options)

    def read(self, rel: str, size: int | None = None) -> bytes:
        """One GET when the size is known and small: s3fs's `cat_file` otherwise HEADs the object
        first (to split a large one into concurrent ranged GETs), a round trip per object."""
        if size is None or size > self.fs.default_block_size:
            return super().read(rel)
        return self._call("read", rel, lambda: self.fs.cat_file(self.path(rel), max_concurrency=1), mutating=False)

    def _streams(self, size: int) -> bool:
        return size >= s3.MULTIPART_THRESHOLD

    def _write_stream(self, rel: str, chunks: Iterable[Any]) -> None:
        s3.multipart_upload(self.fs, self.path(rel), chunks, self.retry, self._shared.upload_slots, self.url(rel))

    def _create(self, path: str, data: bytes) -> bool:
        if self._shared.creates_best_effort:
            with self._shared.lock:  # If-None-Match is ignored here: check first, still send it
                return not self.fs.exists(path) and s3.put_if_absent(self.fs, path, data)
        return s3.put_if_absent(self.fs, path, data)

    def _check_access(self) -> None:
        # No operation-level retries here: a wrong endpoint or bucket must fail in seconds, and
        # quietly; botocore still retries a transient fault of the single request.
        self._call("check", "", lambda: s3.head_bucket(self.fs, self.root), mutating=False, retry=False)

    def _creates_are_atomic(self, probe_dir: str) -> bool:
        """Create one probe object twice: a server that honours `If-None-Match: *` refuses the second."""
        rel = f"{probe_dir}/.probe-{uuid.uuid4().hex[:16]}"
        try:
            self.create_exclusive(rel, b"probe")  # False only when a lost answer was retried: still ours
            return not self.create_exclusive(rel, b"probe again")
        finally:
            try:
                self.delete(rel)
            except Exception as exc:  # noqa: BLE001 - a leftover probe is harmless (no attempt number)
                log.warning("could not delete the probe %s: %s", self.url(rel), describe_error(exc))

    def _no_atomic_create_reason(self) -> str:
        return "the server ignores conditional writes (If-None-Match: *)"


class FsspecStorage(Storage):
    """Any other fsspec filesystem (memory://, gs://, az://, ...): no rename, check-then-write creates."""


_WRITEBACK_MIN = 4 * 2**20


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        import ctypes

        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None  # not Linux: the final fsync does all the flushing
    func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    func.restype = ctypes.c_int
    return func


_sync_file_range = _load_sync_file_range()


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start flushing a just-written range to disk now, so it overlaps the rest of the save and the
    closing fsync (which still guarantees durability) has little left to wait for. Linux only."""
    if _sync_file_range is not None and length >= _WRITEBACK_MIN:
        _sync_file_range(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE: asynchronous, never fails a save
