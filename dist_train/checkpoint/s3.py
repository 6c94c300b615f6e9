"""S3 specifics behind the storage seam, as helpers over an s3fs filesystem.

Client settings (bounded retries, timeouts, `AWS_ENDPOINT_URL`), the conditional
create (`If-None-Match: *`), and concurrent multipart uploads: large files go up
with `UPLOAD_CONCURRENCY` parts of `PART_SIZE` in flight, assembled from the
tensors' memory as they are needed; a failed upload is aborted so no half-made
object or orphaned parts stay behind. `storage.S3Storage` is the backend class that
uses them; this module knows nothing of it (no import cycle).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Iterable

from dist_train.checkpoint.faults import RetryPolicy, describe_error, is_transient, precondition_failed

log = logging.getLogger(__name__)

# botocore tries each request up to this many times in all (standard mode: jittered backoff of up to
# 1 s, then 2 s; a retry quota); `Storage._call` retries the whole operation on top, so one operation
# makes at most RetryPolicy.attempts * BOTOCORE_ATTEMPTS requests (aiohttp may resend a request once
# when a kept-alive connection turns out closed) and starts none after RetryPolicy.deadline. s3fs's
# own retry loop is switched off so the layers do not multiply further.
BOTOCORE_ATTEMPTS = 3
MULTIPART_THRESHOLD = 64 * 2**20
PART_SIZE = 32 * 2**20
UPLOAD_CONCURRENCY = 8


def s3_options(kwargs: dict[str, Any]) -> dict[str, Any]:
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


def put_if_absent(fs: Any, path: str, data: bytes) -> bool:
    """One PUT with `If-None-Match: *`: True when it created the object, False on 412 (it exists).

    412 also answers a retry of our own create whose first answer was lost: callers that care
    read the object back and compare (writer.py, fencing.py).
    """
    try:
        fs.pipe_file(path, data, mode="create")
    except OSError as exc:
        if precondition_failed(exc):
            return False
        raise
    return True


def head_bucket(fs: Any, root: str) -> None:
    fs.call_s3("head_bucket", Bucket=root.split("/", 1)[0])


def multipart_upload(fs: Any, path: str, chunks: Iterable[Any], retry: RetryPolicy, slots: dict[str, Any],
                     label: str) -> None:
    """Concurrent multipart upload of the chunks; a failed upload is aborted, never left half-made.

    `slots` holds the semaphore of part slots shared by the uploads of one storage;
    `label` names the file in messages.
    """
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)
    part_size = PART_SIZE

    def parts() -> Iterable[bytes]:
        buffer = bytearray()
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            while view:
                take = min(len(view), part_size - len(buffer))
                buffer += view[:take]
                view = view[take:]
                if len(buffer) == part_size:
                    yield bytes(buffer)
                    buffer.clear()
        if buffer:
            yield bytes(buffer)

    async def upload() -> None:
        call = fs._call_s3
        mpu = await call("create_multipart_upload", Bucket=bucket, Key=key)
        upload_id = mpu["UploadId"]
        # One pool of part slots per storage, shared by the files a commit uploads side by side:
        # at most UPLOAD_CONCURRENCY parts (of PART_SIZE bytes) are in memory and in flight at once.
        semaphore = slots.get("semaphore")
        if semaphore is None:
            semaphore = slots["semaphore"] = asyncio.Semaphore(UPLOAD_CONCURRENCY)
        tasks: list[asyncio.Task] = []

        async def put_part(number: int, body: bytes) -> dict:
            try:
                for attempt in range(retry.attempts):
                    try:
                        out = await call("upload_part", Bucket=bucket, Key=key, UploadId=upload_id,
                                         PartNumber=number, Body=body)
                        return {"PartNumber": number, "ETag": out["ETag"]}
                    except Exception as exc:  # noqa: BLE001
                        if attempt + 1 >= retry.attempts or not is_transient(exc):
                            raise
                        await asyncio.sleep(retry.delay(attempt))
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
                log.warning("could not abort multipart upload of %s: %s", label, describe_error(exc))
            raise
        fs.invalidate_cache(path)

    sync(fs.loop, upload)
