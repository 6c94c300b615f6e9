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

import asyncio
import errno
import logging
import os
import posixpath
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dist_train.errors import StorageError, UserError

log = logging.getLogger(__name__)

Hook = Callable[[str, str], None]
MULTIPART_THRESHOLD = 64 * 2**20
PART_SIZE = 32 * 2**20
UPLOAD_CONCURRENCY = 8
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestTimeTooSkewed", "ConditionalRequestConflict",
                    "500", "502", "503", "504"}
# botocore tries each request up to this many times in all (standard mode: jittered backoff of up to
# 1 s, then 2 s; a retry quota); `Storage._call` retries the whole operation on top, so one operation
# makes at most RetryPolicy.attempts * BOTOCORE_ATTEMPTS requests (aiohttp may resend a request once
# when a kept-alive connection turns out closed) and starts none after RetryPolicy.deadline. s3fs's
# own retry loop is switched off so the layers do not multiply further.
BOTOCORE_ATTEMPTS = 3


@dataclass(frozen=True)
class Entry:
    name: str
    is_dir: bool
    size: int


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; at most `attempts` tries per operation, none after `deadline` seconds."""
    attempts: int = 6
    base_delay: float = 0.1
    max_delay: float = 4.0
    deadline: float = 120.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2 ** attempt) * (0.5 + random.random() / 2)


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


def _error_chain(exc: BaseException) -> Iterable[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    """Worth another try: throttling, 5xx, resets and timeouts; never 4xx or local disk errors."""
    if isinstance(exc, FileExistsError):
        return False  # a conditional create that lost: an answer, not a fault
    for err in _error_chain(exc):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500)
        name = type(err).__name__
        if name in ("ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError",
                    "ServerDisconnectedError", "ClientOSError", "ClientPayloadError", "IncompleteRead",
                    "ResponseParserError", "FSTimeoutError"):
            return True
        if isinstance(err, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, TimeoutError,
                            asyncio.TimeoutError)):
            return True
    return False


def describe_error(exc: BaseException) -> str:
    """A one-line reason without credentials (botocore messages never carry secrets)."""
    tries = getattr(exc, "storage_attempts", None)
    suffix = f" (gave up after {tries} tries)" if tries and tries > 1 else ""
    for err in _error_chain(exc):
        response = getattr(err, "response", None)
        if isinstance(response, dict) and response.get("Error"):
            error = response["Error"]
            return " ".join(f"{error.get('Code', 'error')}: {error.get('Message', '')}".split()) + suffix
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if isinstance(exc.filename, str) else ""
        return f"{exc.strerror}{where}{suffix}"
    return " ".join(f"{type(exc).__name__}: {exc}".split()) + suffix


def _precondition_failed(exc: BaseException) -> bool:
    """S3 answered 412 to a conditional PUT: the object exists (stores differ in how they say it)."""
    if isinstance(exc, FileExistsError):
        return True
    for err in _error_chain(exc):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code == "PreconditionFailed" or status == 412
    return False


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
            kwargs = _s3_defaults(kwargs)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **kwargs)
        except (TypeError, ValueError) as exc:
            raise UserError(f"storage options do not fit {protocol}://: {exc}") from None
        self.root = self.root.rstrip("/") if self.root not in ("/", "") else self.root
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.is_s3 = protocol in ("s3", "s3a")
        if self.is_s3:
            self.fs.retries = 1  # see BOTOCORE_ATTEMPTS
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
        elif self.is_s3 and size >= MULTIPART_THRESHOLD:
            self._call("write", rel, lambda: self._write_s3_multipart(rel, chunks), mutating=True, retry=False)
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

    def _write_s3_multipart(self, rel: str, chunks: Iterable[Any]) -> None:
        """Concurrent multipart upload of the chunks; a failed upload is aborted, never left half-made."""
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self.path(rel))

        def parts() -> Iterable[bytes]:
            buffer = bytearray()
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                while view:
                    take = min(len(view), PART_SIZE - len(buffer))
                    buffer += view[:take]
                    view = view[take:]
                    if len(buffer) == PART_SIZE:
                        yield bytes(buffer)
                        buffer.clear()
            if buffer:
                yield bytes(buffer)

        async def upload() -> None:
            call = self.fs._call_s3
            mpu = await call("create_multipart_upload", Bucket=bucket, Key=key)
            upload_id = mpu["UploadId"]
            # One pool of part slots per Storage, shared by the files a commit uploads side by side:
            # at most UPLOAD_CONCURRENCY parts (of PART_SIZE bytes) are in memory and in flight at once.
            semaphore = self.__dict__.get("_upload_slots")
            if semaphore is None:
                semaphore = self._upload_slots = asyncio.Semaphore(UPLOAD_CONCURRENCY)
            tasks: list[asyncio.Task] = []

            async def put_part(number: int, body: bytes) -> dict:
                try:
                    for attempt in range(self.retry.attempts):
                        try:
                            out = await call("upload_part", Bucket=bucket, Key=key, UploadId=upload_id,
                                             PartNumber=number, Body=body)
                            return {"PartNumber": number, "ETag": out["ETag"]}
                        except Exception as exc:  # noqa: BLE001
                            if attempt + 1 >= self.retry.attempts or not is_transient(exc):
                                raise
                            await asyncio.sleep(self.retry.delay(attempt))
                    raise AssertionError("unreachable")
                finally:
                    semaphore.release()

            try:
                for number, body in enumerate(parts(), 1):
                    await semaphore.acquire()
                    tasks.append(asyncio.ensure_future(put_part(number, body)))
                    if any(t.done() and t.exception() for t in tasks):
                        break
                done = await asyncio.gather(*tasks)
                await call("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                           MultipartUpload={"Parts": list(done)})
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                try:
                    await call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
                except Exception as exc:  # noqa: BLE001 - the original error matters more
                    log.warning("could not abort multipart upload of %s: %s", self.url(rel), describe_error(exc))
                raise
            self.fs.invalidate_cache(self.path(rel))

        sync(self.fs.loop, upload)

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
                    if _precondition_failed(exc):
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


def _s3_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Bounded botocore retries and timeouts, and AWS_ENDPOINT_URL for S3-compatible stores."""
    kwargs = dict(kwargs)
    config = dict(kwargs.pop("config_kwargs", {}) or {})
    config.setdefault("retries", {"total_max_attempts": BOTOCORE_ATTEMPTS, "mode": "standard"})
    config.setdefault("connect_timeout", 10)
    config.setdefault("read_timeout", 60)
    kwargs["config_kwargs"] = config
    # Several processes share a run dir (ranks, a replaced pod): a cached listing could hide a manifest
    # another process just committed, so every exists/info asks the store.
    kwargs.setdefault("use_listings_cache", False)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in kwargs and "endpoint_url" not in kwargs.get("client_kwargs", {}):
        kwargs["endpoint_url"] = endpoint
    kwargs.setdefault("skip_instance_cache", False)
    return kwargs


def wrap_storage_errors(action: str, exc: BaseException) -> StorageError:
    return StorageError(f"{action}: {describe_error(exc)}")
