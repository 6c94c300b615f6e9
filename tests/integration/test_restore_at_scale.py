"""Restore at scale: a multi-rank restore reads each checkpoint byte once from an object store.

The ranks split the checkpoint's files (dist_train/checkpoint/restore.py), each reads and
verifies its share, and the bytes reach every rank through broadcasts. Counted here at
the wire: a counting proxy (tests/support/fault_proxy.py) between the job and moto sums
the GET bodies per object. Manifest and listing reads are counted separately (the
catalog's manifest.json reads on rank 0; listings are not GETs of objects).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from conftest import TINY, run_torchrun
from dist_train.checkpoint.restore import plan
from support.fault_proxy import FaultProxy

DATA_FILES = (".safetensors",)


def _objects(client, bucket: str, prefix: str) -> dict[str, int]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def _manifest(client, bucket: str, folder: str) -> dict:
    return json.loads(client.get_object(Bucket=bucket, Key=f"{folder}/manifest.json")["Body"].read())


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_two_rank_restore_reads_each_byte_once_and_skips_a_checkpoint_corrupt_on_one_rank(s3_env, s3_bucket,
                                                                                          moto_endpoint):
    client, train = _client_and_job(s3_bucket, moto_endpoint)
    # The reference: an uninterrupted 2-rank run of 12 steps (commits 4, 8, 12); then, as if the job
    # died after the commit of step 8, the newest checkpoint goes ...
    folders, reference = _three_commits_without_the_newest(client, s3_bucket, train, s3_env)
    step4, step8, _ = folders
    # ... and step 8 has a damaged file that rank 1 reads (rank 0's share of it is intact).
    manifest8 = _manifest(client, s3_bucket, f"run/{step8}")
    sizes8 = {name: entry["size"] for name, entry in manifest8["files"].items()}
    owners = plan(sizes8, 2)
    victim = max((n for n in sizes8 if owners[n] == 1), key=sizes8.get)
    _flip_a_byte(client, s3_bucket, f"run/{step8}/{victim}")
    output, got = _resume_behind_a_counting_proxy(train, s3_env, moto_endpoint)
    skips = [line for line in output.splitlines() if "skipping checkpoint" in line and step8 in line]
    assert skips and victim in skips[0], output[-3000:]  # found by rank 1 alone, skipped by both
    assert "step 4," in output and "resuming from" in output, output[-3000:]
    # Bit-identical to the uninterrupted run, on every rank (DDP's final model is rank-wide).
    _assert_the_run_ends_like_the_reference(client, s3_bucket, folders, reference)

    def read_of(folder: str) -> dict[str, int]:
        return {name: got.get(f"/{s3_bucket}/run/{folder}/{name}", 0) for name in _objects_in(folder)}

    def _objects_in(folder: str) -> list[str]:
        return list(_manifest(client, s3_bucket, f"run/{folder}")["files"])

    sizes4 = {n: e["size"] for n, e in _manifest(client, s3_bucket, f"run/{step4}")["files"].items()}
    read4 = read_of(step4)
    # The checkpoint resumed from: each data byte crossed the wire once, for both ranks together.
    assert read4 == sizes4, (read4, sizes4)
    assert sum(read4.values()) == sum(sizes4.values())
    # The corrupt one: never more than once (each rank read its own share, then both skipped it).
    read8 = read_of(step8)
    assert all(read8[n] <= sizes8[n] for n in sizes8), (read8, sizes8)
    assert read8[victim] == sizes8[victim]
    # Manifest reads are separate: small, from the catalog (rank 0) and the resolver.
    manifest_reads = {path: n for path, n in got.items() if path.endswith("/manifest.json")}
    assert all(n <= 4 * len(json.dumps(manifest8)) for n in manifest_reads.values()), manifest_reads


# -- the same under --parallelism fsdp (issue 20: "same results with --parallelism fsdp") -------------
#
# FSDP checkpoints are written by every rank (`--checkpoint-writers all` is FSDP's default; rank 0 alone
# cannot write a model no rank holds whole): each rank's shards plus the small replicated entries rank 0
# writes (trainer, RNG). A same-size restore reads each object once in all: every rank reads and verifies
# the shards it loads, once; the small entries are split as under DDP.

@pytest.mark.integration
@pytest.mark.timeout(300)
def test_fsdp_two_rank_restore_reads_each_byte_once_and_skips_a_checkpoint_corrupt_on_one_rank(s3_env, s3_bucket,
                                                                                               moto_endpoint):
    client, train = _client_and_job(s3_bucket, moto_endpoint, "--parallelism", "fsdp")
    folders, reference = _three_commits_without_the_newest(client, s3_bucket, train, s3_env)
    step4, step8, _ = folders
    # step 8: rank 1's model shard is damaged (rank 1 reads and verifies it; rank 0 never touches it)
    manifest8 = _manifest(client, s3_bucket, f"run/{step8}")
    assert manifest8["sharded"]["world_size"] == 2, manifest8.get("sharded")
    sizes8 = {name: entry["size"] for name, entry in manifest8["files"].items()}
    victim = "shards/rank00001/model.safetensors"
    _flip_a_byte(client, s3_bucket, f"run/{step8}/{victim}")
    output, got = _resume_behind_a_counting_proxy(train, s3_env, moto_endpoint)
    skips = [line for line in output.splitlines() if "skipping checkpoint" in line and step8 in line]
    assert skips and victim in skips[0], output[-3000:]
    assert "resuming from" in output and f"{step4}" in output.split("resuming from", 1)[1][:300], output[-3000:]
    _assert_the_run_ends_like_the_reference(client, s3_bucket, folders, reference)

    def read_of(folder: str, names) -> dict[str, int]:
        return {name: got.get(f"/{s3_bucket}/run/{folder}/{name}", 0) for name in names}

    sizes4 = {n: e["size"] for n, e in _manifest(client, s3_bucket, f"run/{step4}")["files"].items()}
    read4 = read_of(step4, sizes4)
    assert read4 == sizes4, ({n: (read4[n], sizes4[n]) for n in sizes4 if read4[n] != sizes4[n]},
                             sum(read4.values()) / sum(sizes4.values()))
    read8 = read_of(step8, sizes8)
    assert all(read8[n] <= sizes8[n] for n in sizes8), (read8, sizes8)
    assert read8[victim] == sizes8[victim]


def _client_and_job(bucket: str, endpoint: str, *extra: str) -> tuple[Any, list[str]]:
    """A boto3 client of the moto server and the 2-rank job (commits every 4 steps) into s3://bucket/run."""
    import boto3

    train = ["train", "--run-dir", f"s3://{bucket}/run", *TINY, *extra, "--checkpoint-every", "4", "--deterministic"]
    return boto3.client("s3", endpoint_url=endpoint), train


def _assert_the_run_ends_like_the_reference(client, bucket: str, folders: list[str], reference: str) -> None:
    """The resumed run's newest checkpoint is step 12's, with the uninterrupted run's model digest
    (bit-identical on every rank: the digest covers the whole model)."""
    after = sorted({key.split("/")[1] for key in _objects(client, bucket, "run/ckpt-")} - set(folders),
                   key=lambda name: int(name.rsplit("-s", 1)[-1]))
    assert after and after[-1].endswith("s0000000012"), after
    assert _manifest(client, bucket, f"run/{after[-1]}")["model_digest"] == reference


def _three_commits_without_the_newest(client, bucket: str, train: list[str], s3_env) -> tuple[list[str], str]:
    """A 2-rank run of 12 steps (commits 4, 8, 12), then step 12 deleted: the folders and step 12's digest."""
    ref = run_torchrun(2, [*train, "--max-steps", "12"], env=s3_env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    folders = sorted({key.split("/")[1] for key in _objects(client, bucket, "run/ckpt-")})
    assert len(folders) == 3, folders
    reference = _manifest(client, bucket, f"run/{folders[2]}")["model_digest"]
    for key in _objects(client, bucket, f"run/{folders[2]}/"):
        client.delete_object(Bucket=bucket, Key=key)
    return folders, reference


def _flip_a_byte(client, bucket: str, key: str) -> None:
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))


def _resume_behind_a_counting_proxy(train: list[str], s3_env, moto_endpoint: str) -> tuple[str, dict[str, int]]:
    """The 2-rank resume to step 12 through the proxy: its output and the bytes GET per object path."""
    with FaultProxy(moto_endpoint) as proxy:
        resumed = run_torchrun(2, [*train, "--max-steps", "12"], env=dict(s3_env, AWS_ENDPOINT_URL=proxy.url))
        got = dict(proxy.get_bytes)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    return output, got
