"""The one storage seam: every run-dir read and write goes through `Storage`, over fsspec.

Local disk, `file://`, `s3://`, `memory://` and any other fsspec URL look the same
to the rest of the code. Two things differ by backend and are decided here:
durability (local files are fsynced, folders renamed into place) and the
conditional create that commits a manifest only if absent (O_EXCL locally,
`If-None-Match: *` on S3). Transient remote faults are retried with backoff within
a bounded budget. Tests inject faults through `Storage.hooks`, which every mutating
operation calls first.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dist_train.checkpoint.faults import RetryPolicy, describe_error, is_transient, precondition_failed
from dist_train.checkpoint import s3
from dist_train.errors import UserError

log = logging.getLogger(__name__)

Hook = Callable[[str, str], None]


@dataclass(frozen=True)
class Entry:
    name: str
    is_dir: bool
    size: int


def redact_url(url: str) -> str:
    """The URL without any user:password part, for messages and manifests."""
    parts = urlsplit(url)
    if parts.password or parts.username:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


def check_url_scheme(url: str) -> None:
    """Refuse a run-dir URL whose scheme fsspec does not know (or cannot import) up front."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
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


class Storage:
    """A run dir (or any folder) behind one small interface; paths are relative to it."""

    hooks: list[Hook] = []  # fault injection for tests: called as hook(operation, relative path)

    def __init__(self, url: str, options: dict[str, Any] | None = None, retry: RetryPolicy | None = None):
        check_url_scheme(url)
        self.display_url = redact_url(url.rstrip("/") or url)
        self.options = dict(options or {})
        self.retry = retry or RetryPolicy()
        protocol = fsspec.core.split_protocol(url)[0] or "file"
        kwargs = dict(self.options)
        if protocol in ("s3", "s3a"):
            kwargs = s3.s3_options(kwargs)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **kwargs)
        except (TypeError, ValueError) as exc:
            raise UserError(f"storage options do not fit {protocol}://: {exc}") from None
        self.root = self.root.rstrip("/") if self.root not in ("/", "") else self.root
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.is_s3 = protocol in ("s3", "s3a")
        if self.is_s3:
            self.fs.retries = 1  # see s3.BOTOCORE_ATTEMPTS
        self._lock = threading.Lock()

    # -- naming -------------------------------------------------------------------------

    def path(self, rel: str = "") -> str:
        rel = rel.strip("/")
        if not rel:
            return self.root
        return os.path.join(self.root, rel) if self.is_local else posixpath.join(self.root, rel)

    def url(self, rel: str = "") -> str:
        """The user-facing URL of `rel` (a plain path for local disk)."""
        rel = rel.strip("/")
        if self.is_local:
            return self.path(rel)
        base = self.display_url
        return f"{base}/{rel}" if rel else base

    def child(self, rel: str) -> "Storage":
        """The same filesystem rooted at a sub-folder (no new connection)."""
        sub = object.__new__(Storage)
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
        attempts = self.retry.attempts if (retry and not self.is_local) else 1
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

    def list(self, rel: str = "") -> list[Entry]:
        """Immediate children of `rel` in one listing call; [] when it does not exist."""
        def run() -> list[Entry]:
            try:
                entries = self.fs.ls(self.path(rel), detail=True, refresh=True) if not self.is_local else \
                    self.fs.ls(self.path(rel), detail=True)
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

    def read(self, rel: str) -> bytes:
        return self._call("read", rel, lambda: self.fs.cat_file(self.path(rel)), mutating=False)

    def iter_read(self, rel: str, block_size: int) -> Iterable[bytes]:
        """The file's bytes in blocks, so a large file is hashed without holding it whole."""
        if self.is_local:
            with open(self.path(rel), "rb") as handle:
                while block := handle.read(block_size):
                    yield block
            return
        size = self.size(rel)
        if size is None:
            raise FileNotFoundError(self.url(rel))
        for start in range(0, size, block_size):
            end = min(size, start + block_size)
            yield self._call("read", rel, lambda s=start, e=end: self.fs.cat_file(self.path(rel), start=s, end=e),
                             mutating=False)

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
        assert self.is_local, "local_path on a remote run dir"
        return self.path(rel)

    # -- writing ------------------------------------------------------------------------

    def makedirs(self, rel: str = "") -> None:
        if self.is_local:
            self._call("makedirs", rel, lambda: os.makedirs(self.path(rel), exist_ok=True), mutating=True)

    def write(self, rel: str, chunks: Iterable[Any], size: int) -> None:
        """Write a file from byte chunks; durable (fsynced) on local disk, multipart when large remotely."""
        if self.is_local:
            self._call("write", rel, lambda: self._write_local(rel, chunks), mutating=True)
        elif self.is_s3 and size >= s3.MULTIPART_THRESHOLD:
            self._call("write", rel, lambda: s3.multipart_upload(self, rel, chunks), mutating=True, retry=False)
        else:
            data = b"".join(bytes(c) for c in chunks) if not isinstance(chunks, (bytes, bytearray)) else chunks
            self._call("write", rel, lambda: self.fs.pipe_file(self.path(rel), bytes(data)), mutating=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.write(rel, [data], len(data))

    def _write_local(self, rel: str, chunks: Iterable[Any]) -> None:
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

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create `rel` holding `data` only if it does not exist; False when it already did.

        Local disk: O_CREAT|O_EXCL, then fsync. S3: a PUT with `If-None-Match: *`.
        Other fsspec backends have no atomic primitive; an exists-check is the best they offer.
        """
        def run() -> bool:
            path = self.path(rel)
            if self.is_local:
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
            if self.is_s3:
                try:
                    self.fs.pipe_file(path, data, mode="create")
                except OSError as exc:
                    # 412 also when a retry of our own create (whose answer was lost) finds it made:
                    # callers that care read the object back and compare (writer.py, fencing.py).
                    if precondition_failed(exc):
                        return False
                    raise
                return True
            with self._lock:
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
                return True
        return self._call("create", rel, run, mutating=True)

    def rename(self, src: str, dst: str) -> None:
        """Atomic rename of a local folder; refuses to replace an existing target."""
        assert self.is_local, "rename is only atomic on local disk"

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
        """fsync a local folder so a rename or create inside it survives power loss."""
        if not self.is_local:
            return

        def run() -> None:
            fd = os.open(self.path(rel), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._call("sync_dir", rel, run, mutating=True)

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

    # -- checks -------------------------------------------------------------------------

    def check_reachable(self) -> None:
        """Fail with a clear line when the store cannot be used: missing bucket, bad endpoint, no access."""
        try:
            if self.is_s3:
                # No operation-level retries here: a wrong endpoint or bucket must fail in seconds, and
                # quietly; botocore still retries a transient fault of the single request.
                bucket = self.root.split("/", 1)[0]
                self._call("check", "", lambda: self.fs.call_s3("head_bucket", Bucket=bucket), mutating=False,
                           retry=False)
            elif self.is_local:
                parent = self.root
                while not os.path.exists(parent):
                    parent = os.path.dirname(parent) or "/"
                if not os.path.isdir(parent):
                    raise UserError(f"run dir {self.display_url}: {parent} is not a folder")
                if not os.access(parent, os.W_OK | os.X_OK):
                    raise UserError(f"run dir {self.display_url}: permission denied on {parent}")
            else:
                self.list("")
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


