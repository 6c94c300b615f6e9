"""`dist-train data pack` as real processes: into S3 (moto) and read back through a counting proxy with a
node cache (no shard fetched twice; a second reader of the node fetches none), a corrupt object on the
store named and never served, `--overwrite` leaving no orphans, and a pack SIGKILLed mid-way that is no
data set until a re-run completes it."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess

import pytest
import torch

from conftest import PYTHON, REPO, base_env, run_forked, wait_for
from support.fault_proxy import FaultProxy

pytestmark = pytest.mark.integration


def _shard_gets(proxy: FaultProxy) -> list[str]:
    return [path for method, path, _ in proxy.log if method == "GET" and "/shards/" in path]


@pytest.mark.timeout(180)
def test_pack_into_s3_then_read_verified_with_a_node_cache(s3_env, s3_bucket, moto_endpoint, tmp_path, monkeypatch):
    import boto3

    from dist_train.data.config import DataConfig
    from dist_train.data.datasets import digits
    from dist_train.data.packed import ShardError, open_packed
    from dist_train.data.packed import dataset as packed_dataset
    from dist_train.errors import UserError

    url = f"s3://{s3_bucket}/data/digits"
    done = run_forked(["data", "pack", "digits", "--out", url, "--shard-size", "48KiB", "--seed", "5"], env=s3_env)
    assert done.returncode == 0, done.stderr
    assert "train 1257 samples" in done.stdout
    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    raw = client.get_object(Bucket=s3_bucket, Key="data/digits/manifest.json")["Body"].read()
    assert s3_env["AWS_SECRET_ACCESS_KEY"].encode() not in raw and s3_env["AWS_ACCESS_KEY_ID"].encode() not in raw
    manifest = json.loads(raw)
    assert manifest["source"] == {"type": "builtin", "name": "digits", "val_fraction": 0.15, "test_fraction": 0.15,
                                  "seed": 5}

    with FaultProxy(moto_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        cache = tmp_path / "node-cache"
        ds = open_packed(url, cache_dir=str(cache))
        assert [m for m, p, _ in proxy.log if m == "GET"] == ["GET"]  # opening reads the manifest alone
        val = ds.split("val")
        original = digits(DataConfig(), seed=5).val
        val.prefetch(list(range(len(val))))
        for i in range(len(val)):
            x, y = val[i]
            assert y == original[i][1] and torch.equal(x, original[i][0])
        fetched = _shard_gets(proxy)
        assert len(fetched) == len(set(fetched)) == len(val.shard_sizes)  # each shard once
        other_rank = pickle.loads(pickle.dumps(val))  # another process of the node: served by the cache
        assert [other_rank[i][1] for i in range(len(val))] == [original[i][1] for i in range(len(val))]
        assert _shard_gets(proxy) == fetched

        # A shard changed on the store: retried, then named; no sample of it is returned.
        monkeypatch.setattr(packed_dataset, "SHARD_RETRY",
                            packed_dataset.RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.01))
        entry = manifest["splits"]["train"]["shards"][0]
        key = f"data/digits/{entry['name']}"
        body = bytearray(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
        body[600] ^= 0xFF
        client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(body))
        before = len(_shard_gets(proxy))
        with pytest.raises(ShardError, match=rf"^shard s3://{s3_bucket}/data/digits/{entry['name']}: corrupt"):
            open_packed(url).split("train")[0]
        assert len(_shard_gets(proxy)) - before == 2  # retried once

    with pytest.raises(UserError, match="bucket or container does not exist"):
        open_packed(f"s3://{s3_bucket}-none/data")

    again = run_forked(["data", "pack", "digits", "--out", url, "--shard-size", "256KiB", "--overwrite"], env=s3_env)
    assert again.returncode == 0, again.stderr
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="data/digits/")["Contents"]}
    fresh = json.loads(client.get_object(Bucket=s3_bucket, Key="data/digits/manifest.json")["Body"].read())
    listed = {f"data/digits/{s[k]}" for split in fresh["splits"].values() for s in split["shards"]
              for k in ("name", "index")}
    assert keys == listed | {"data/digits/manifest.json"}  # the replaced data set's shards are gone


@pytest.mark.timeout(180)
def test_a_killed_pack_is_no_data_set_and_a_rerun_completes(tmp_path):
    from dist_train.data.packed import open_packed
    from dist_train.errors import UserError

    out = tmp_path / "ds"
    # One sample a shard: thousands of fsynced files, so the pack is surely still running when killed.
    proc = subprocess.Popen([PYTHON, "-m", "dist_train", "data", "pack", "digits", "--out", str(out),
                             "--shard-size", "1KiB"], env=base_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: (out / "shards").is_dir() and len(list((out / "shards").glob("*.tar"))) >= 3, 120,
                 what="the first shards")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert not (out / "manifest.json").exists()
    leftovers = {p.name for p in (out / "shards").iterdir()}
    with pytest.raises(UserError, match="not a packed data set: no manifest"):
        open_packed(str(out))

    done = run_forked(["data", "pack", "digits", "--out", str(out), "--shard-size", "64KiB"])
    assert done.returncode == 0, done.stderr
    ds = open_packed(str(out))
    assert len(ds.split("train")) == 1257
    held = {p.name for p in (out / "shards").iterdir()}
    assert not held & leftovers  # the killed pack's orphans are removed
    assert held == {s[k].rsplit("/", 1)[1] for split in ds.manifest["splits"].values() for s in split["shards"]
                    for k in ("name", "index")}
