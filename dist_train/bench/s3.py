"""Saving to S3 (a local moto server) against boto3's own multipart upload of the same bytes.

A: `Checkpointer.save` (sync) to `s3://BUCKET/...`: folder claim, model digest, sha256 of
   every file, multipart upload of the large files, the conditional PUT of the manifest.
B: `boto3` `upload_fileobj` of the same number of bytes from memory, with the same part
   size, concurrency and multipart threshold as `dist_train.checkpoint.storage`.

The moto server runs in its own process on a free 127.0.0.1 port, so its work does not
share a GIL with either client; credentials are random strings made for this run.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from typing import Iterator

import torch

from dist_train.bench.measure import Figure, Stopwatch, alternate, log
from dist_train.bench.workload import build_state, single_process_env

_SERVER = ("import sys, time\n"
           "from moto.server import ThreadedMotoServer\n"
           "server = ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False)\n"
           "server.start()\n"
           "print('ready', flush=True)\n"
           "sys.stdin.read()\n"  # runs until the benchmark closes our stdin (or dies)
           "server.stop()\n")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
             "AWS_ENDPOINT_URL_S3")


@contextlib.contextmanager
def s3_environment(endpoint: str, access: str, secret: str) -> Iterator[None]:
    """This process (and the jobs it starts) pointed at a local S3 server; the caller's AWS variables
    come back afterwards, so a benchmark never leaks its throwaway server into what runs next."""
    saved = {k: os.environ.get(k) for k in _AWS_KEYS}
    try:
        os.environ.update({"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret,
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server in a child process; yields its endpoint URL and sets throwaway credentials."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("moto server did not start (is moto[server] installed?)")
        endpoint = f"http://127.0.0.1:{port}"
        with s3_environment(endpoint, "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)):
            yield endpoint
    finally:
        with contextlib.suppress(Exception):
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(state_bytes: int, repeats: int) -> list[Figure]:
    import boto3
    from boto3.s3.transfer import TransferConfig

    from dist_train.checkpoint import s3 as storage_module
    from dist_train.checkpoint.saver import Checkpointer
    from dist_train.checkpoint.retention import RetentionPolicy
    from dist_train.checkpoint.storage import Storage
    from dist_train.checkpoint.writer import CheckpointWriter

    figure = Figure("s3_efficiency", "boto3 upload_fileobj time / S3 save time (moto)", ">= 0.85")
    with moto_server() as endpoint:
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=bucket)
        config = TransferConfig(multipart_threshold=storage_module.MULTIPART_THRESHOLD,
                                multipart_chunksize=storage_module.PART_SIZE,
                                max_concurrency=storage_module.UPLOAD_CONCURRENCY)
        log.info("S3: building a %.0f MB training state", state_bytes / 2**20)
        state = build_state(state_bytes)
        storage = Storage(f"s3://{bucket}/run")
        writer = CheckpointWriter(storage, 1, f"bench-{os.getpid()}", None)
        checkpointer = Checkpointer(single_process_env(), storage, writer, RetentionPolicy(), False)
        sizes: dict[str, int] = {}

        def ours() -> float:
            before = checkpointer.stall_seconds
            state.step += 1
            checkpointer.save(state.step, state.snapshot_fn(), "bench")
            seconds = checkpointer.stall_seconds - before
            if checkpointer.consecutive_failures or checkpointer.last_committed is None:
                raise RuntimeError("the benchmark's S3 save failed (see the log above)")
            files = checkpointer.last_committed.manifest["files"]
            sizes.update({name: entry["size"] for name, entry in files.items()})
            storage.delete_tree(checkpointer.last_committed.name)
            return seconds

        source: list[memoryview] = []

        def baseline() -> float:
            nbytes = sum(sizes.values())
            if not source or len(source[0]) != nbytes:
                data = torch.empty(nbytes, dtype=torch.uint8)
                data.random_(0, 256, generator=torch.Generator().manual_seed(2))
                source[:] = [memoryview(data.numpy())]
            body = io.BytesIO(source[0])  # copied into the BytesIO before the clock starts
            key = f"baseline/{time.monotonic_ns()}.bin"
            with Stopwatch() as watch:
                client.upload_fileobj(body, bucket, key, Config=config)
            client.delete_object(Bucket=bucket, Key=key)
            return watch.seconds

        log.info("S3: warm-up, then %d repetitions of dist_train save / boto3 upload_fileobj", repeats)
        ours()
        baseline()
        results = alternate(repeats, {"dist_train": ours, "boto3": baseline})
        nbytes = sum(sizes.values())
        figure.ratios = [b / a for a, b in zip(results["dist_train"], results["boto3"])]
        figure.raw = {"bytes": nbytes, "files": sizes, "dist_train_save_s": results["dist_train"],
                      "boto3_upload_s": results["boto3"],
                      "dist_train_MBps": [nbytes / s / 1e6 for s in results["dist_train"]],
                      "boto3_MBps": [nbytes / s / 1e6 for s in results["boto3"]],
                      "part_size": storage_module.PART_SIZE, "concurrency": storage_module.UPLOAD_CONCURRENCY,
                      "multipart_threshold": storage_module.MULTIPART_THRESHOLD}
        with contextlib.suppress(Exception):
            import s3fs
            s3fs.S3FileSystem.clear_instance_cache()
    return [figure]
