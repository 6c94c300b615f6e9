"""The node-local checkpoint tier (`--local-cache`): fast restarts that never trust a stale copy.

- A 2-rank job on S3 (moto behind a counting proxy) with a local cache: a worker is killed,
  `dist-train launch --max-restarts 1` restarts both, and they resume from the cache with no
  GET of a checkpoint's data objects, ending with the uninterrupted run's model_digest.
- A stale cache, a corrupt cache file, a cache of another run dir: each ignored with one line,
  and the resume reads the run dir.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import (PYTHON, REPO, base_env, descendants, free_port, kill_group, manifests, run_forked,
                      run_torchrun, wait_for)
from support.fault_proxy import FaultProxy

JOB = ["train", "--epochs", "2", "--max-steps", "36", "--checkpoint-every", "6", "--batch-size", "32",
       "--deterministic", "--no-progress", "--log-every", "6"]


def _s3_manifests(client, bucket: str, prefix: str) -> list[str]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return sorted(o["Key"] for o in listed if o["Key"].endswith("/manifest.json"))


def _final_s3_digest(client, bucket: str, prefix: str) -> str:
    key = _s3_manifests(client, bucket, prefix)[-1]
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())["model_digest"]


@pytest.mark.timeout(420)
def test_worker_restart_resumes_from_the_local_cache_without_reading_the_store(tmp_path, s3_env, s3_bucket):
    import boto3

    reference = tmp_path / "reference"
    result = run_torchrun(2, [*JOB, "--run-dir", str(reference)])
    assert result.returncode == 0, result.stderr[-3000:]

    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    prefix = f"cached-{uuid.uuid4().hex[:6]}"
    cache = tmp_path / "cache"
    log_path = tmp_path / "job.log"
    with FaultProxy(s3_env["AWS_ENDPOINT_URL"]) as proxy:
        env = dict(s3_env, AWS_ENDPOINT_URL=proxy.url)
        proc = subprocess.Popen([PYTHON, "-m", "dist_train", "launch", "--standalone", "--nproc-per-node", "2",
                                 "--max-restarts", "1", "--", *JOB, "--run-dir", f"s3://{s3_bucket}/{prefix}",
                                 "--local-cache", str(cache)],
                                stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=base_env(env), cwd=REPO,
                                start_new_session=True)
        try:
            wait_for(lambda: len(_s3_manifests(client, s3_bucket, prefix)) >= 2 and list(cache.glob("ckpt-*"))
                     or proc.poll() is not None, timeout=240, what="two committed checkpoints and a cached one")
            assert proc.poll() is None, log_path.read_text()[-3000:]
            workers = [pid for pid in descendants(proc.pid) if "dist_train" in _cmdline(pid) and "train" in _cmdline(pid)
                       and "launch" not in _cmdline(pid)]
            assert workers, "no worker processes found"
            proxy.log.clear()
            os.kill(max(workers), signal.SIGKILL)  # one worker dies; the agent restarts both
            assert proc.wait(timeout=300) == 0, log_path.read_text()[-4000:]
        finally:
            kill_group(proc)
        after_restart = list(proxy.log)
    text = log_path.read_text()
    assert "resuming from the local cache" in text, text[-4000:]
    data_gets = [path for method, path, _ in after_restart
                 if method == "GET" and re.search(r"/ckpt-[^/]+/.*\.safetensors", path)]
    assert not data_gets, f"the restart read checkpoint data from the store: {data_gets[:5]}"
    assert _final_s3_digest(client, s3_bucket, prefix) == manifests(reference)[-1]["model_digest"]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("cache")
    run_dir, cache = base / "run", base / "cache"
    result = run_forked([*JOB, "--max-steps", "12", "--run-dir", str(run_dir), "--local-cache", str(cache)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in cache.glob("ckpt-*")] == ["ckpt-g0001-s0000000012"]
    return run_dir, cache


def _resume(run_dir: Path, cache: Path) -> str:
    result = run_forked([*JOB, "--max-steps", "18", "--run-dir", str(run_dir), "--local-cache", str(cache)])
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def _copy(cached_run, tmp_path) -> tuple[Path, Path]:
    import shutil

    run_dir, cache = cached_run
    shutil.copytree(run_dir, tmp_path / "run")
    shutil.copytree(cache, tmp_path / "cache")
    (tmp_path / "cache" / "run.json").write_text(json.dumps({"run_dir": str(tmp_path / "run")}))  # moved with it
    return tmp_path / "run", tmp_path / "cache"


@pytest.mark.timeout(240)
def test_a_good_cache_is_used(cached_run, tmp_path):
    run_dir, cache = _copy(cached_run, tmp_path)
    log = _resume(run_dir, cache)
    assert "resuming from the local cache" in log
    assert "local cache" not in log.split("resuming from the local cache")[0]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("spoil, says", [
    ("stale", "holds ckpt-g0001-s0000000006"),
    ("corrupt", "does not match its sha256"),
    ("foreign", "belongs to another run dir"),
])
def test_a_cache_that_is_not_the_newest_durable_checkpoint_is_ignored(cached_run, tmp_path, spoil, says):
    run_dir, cache = _copy(cached_run, tmp_path)
    newest = cache / "ckpt-g0001-s0000000012"
    if spoil == "stale":  # the cache holds an older checkpoint than the run dir's newest
        import shutil
        shutil.copytree(run_dir / "ckpt-g0001-s0000000006", cache / "ckpt-g0001-s0000000006")
        shutil.rmtree(newest)
    elif spoil == "corrupt":
        data = bytearray((newest / "model.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (newest / "model.safetensors").write_bytes(bytes(data))
    else:
        (cache / "run.json").write_text(json.dumps({"run_dir": "/somewhere/else"}))
    log = _resume(run_dir, cache)
    lines = [line for line in log.splitlines() if "local cache" in line and "WARNING" in line]
    assert len(lines) >= 1 and says in lines[0], log[-3000:]
    assert "resuming from the local cache" not in log
    assert f"resuming from {run_dir}/ckpt-g0001-s0000000012" in log


def _two_nodes(tmp_path: Path, phase: str, env: dict[str, str], args: list[str]) -> list[str]:
    """Both "nodes" of a 2-node job (c10d rendezvous on loopback, one rank each) to the end; their logs."""
    common = {"DIST_TRAIN": f"{PYTHON} -m dist_train", "RDZV_HOST": "127.0.0.1", "RDZV_PORT": str(free_port()),
              "RDZV_ID": uuid.uuid4().hex[:8], "NNODES": "2", "NPROC_PER_NODE": "1", "MAX_RESTARTS": "0",
              "LOCAL_ADDR": "127.0.0.1"}
    nodes, paths = [], [tmp_path / f"{phase}-node{index}.log" for index in (0, 1)]
    try:
        for index in (0, 1):
            node_args = [*args, "--local-cache", str(tmp_path / f"cache-node{index}")]
            with open(paths[index], "w") as log:
                nodes.append(subprocess.Popen(["bash", str(REPO / "launch" / "multi-node.sh"), *node_args],
                                              stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                              env=base_env(dict(env, **common, NODE_RANK=str(index)))))
        statuses = [node.wait(timeout=200) for node in nodes]
    finally:
        for node in nodes:
            kill_group(node)
    logs = [path.read_text() for path in paths]
    assert statuses == [0, 0], "\n".join(log[-3000:] for log in logs)
    return logs


# What each node's copy must hold after the first run: DDP, the whole checkpoint (from the node's own
# replica); FSDP (every rank writes its share), the node's rank's shards and the small whole entries.
NODE_COPIES = {
    "ddp": lambda index: ["model.safetensors", "optimizer.safetensors", "trainer.safetensors"],
    "fsdp": lambda index: [f"shards/rank{index:05d}/model.safetensors", f"shards/rank{index:05d}/optimizer.safetensors",
                           "trainer.safetensors"],
}


@pytest.mark.timeout(480)
@pytest.mark.parametrize("parallelism", sorted(NODE_COPIES))
def test_a_restart_of_two_nodes_reads_no_checkpoint_data_from_the_store(tmp_path, s3_env, s3_bucket, parallelism):
    """Every node keeps its own copy: node 1's from its own replica (DDP) or its own share (FSDP, sharded
    checkpoints), verified against the durable manifest."""
    prefix = f"nodes-{uuid.uuid4().hex[:6]}"
    job = ["--run-dir", f"s3://{s3_bucket}/{prefix}", "--checkpoint-every", "6", "--batch-size", "32",
           "--deterministic", "--no-progress", "--log-every", "6", "--epochs", "2", "--parallelism", parallelism]
    with FaultProxy(s3_env["AWS_ENDPOINT_URL"]) as proxy:
        env = dict(s3_env, AWS_ENDPOINT_URL=proxy.url)
        _two_nodes(tmp_path, "first", env, [*job, "--max-steps", "12"])
        for index in (0, 1):  # each node holds what its rank loads of the newest checkpoint
            copy = tmp_path / f"cache-node{index}" / "ckpt-g0001-s0000000012"
            for rel in NODE_COPIES[parallelism](index):
                assert (copy / rel).is_file(), (rel, sorted(str(p.relative_to(copy)) for p in copy.rglob("*")))
        proxy.log.clear()
        logs = _two_nodes(tmp_path, "restart", env, [*job, "--max-steps", "18"])
        after_restart = list(proxy.log)
    assert "local cache: every rank read its node's copy" in logs[0], logs[0][-3000:]
    for log in logs:
        assert not [line for line in log.splitlines() if "local cache" in line and "WARNING" in line], log[-3000:]
    data_gets = [path for method, path, _ in after_restart
                 if method == "GET" and re.search(r"/ckpt-[^/]+/.*\.safetensors", path)]
    assert not data_gets, f"the restart read checkpoint data from the store: {data_gets[:5]}"
    assert (tmp_path / "cache-node1" / "ckpt-g0002-s0000000018").is_dir()


FSDP_JOB = [*JOB, "--parallelism", "fsdp"]  # sharded checkpoints: every rank writes (and caches) its share


@pytest.mark.timeout(300)
def test_a_sharded_checkpoints_cached_shares_are_read_and_a_corrupt_one_sends_the_restore_to_the_run_dir(tmp_path):
    """FSDP on one node: each rank caches its own shards; a restart reads every share from the cache. A
    cached shard damaged in place (same size) fails its hash: that checkpoint is read again from the run
    dir, never skipped for an older one, and the damaged file leaves the cache."""
    import shutil

    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    first = run_torchrun(2, [*FSDP_JOB, "--max-steps", "12", "--run-dir", str(run_dir), "--local-cache", str(cache),
                             "--async-checkpoint"])  # the shares are cached from the writer thread
    assert first.returncode == 0, first.stderr[-3000:]
    newest = cache / "ckpt-g0001-s0000000012"
    shard = newest / "shards" / "rank00001" / "optimizer.safetensors"
    assert shard.is_file() and (newest / "shards" / "rank00000" / "model.safetensors").is_file()
    assert [p.name for p in cache.glob("ckpt-*")] == [newest.name]  # --local-cache-keep 1
    shutil.copytree(run_dir, tmp_path / "run-copy")
    shutil.copytree(cache, tmp_path / "cache-copy")

    good = run_torchrun(2, [*FSDP_JOB, "--max-steps", "18", "--run-dir", str(run_dir), "--local-cache", str(cache)])
    assert good.returncode == 0, good.stderr[-3000:]
    assert "local cache: every rank read its node's copy" in good.stderr, good.stderr[-3000:]

    run_dir, cache = tmp_path / "run-copy", tmp_path / "cache-copy"
    (cache / "run.json").write_text(json.dumps({"run_dir": str(run_dir)}))  # the copy belongs to the copied run dir
    shard = cache / newest.name / shard.relative_to(newest)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    spoilt = run_torchrun(2, [*FSDP_JOB, "--max-steps", "18", "--run-dir", str(run_dir), "--local-cache", str(cache)])
    assert spoilt.returncode == 0, spoilt.stderr[-3000:]
    log = spoilt.stderr
    assert "again from the run dir, without the local cache" in log, log[-3000:]
    assert f"resuming from {run_dir}/ckpt-g0001-s0000000012" in log, log[-3000:]
    assert "skipping" not in log.lower(), log[-3000:]
    assert "ckpt-g0002-s0000000018" in [p.name for p in cache.glob("ckpt-*")]
    assert json.loads((run_dir / "ckpt-g0002-s0000000018" / "manifest.json").read_text())["model_digest"] == \
        json.loads((tmp_path / "run" / "ckpt-g0002-s0000000018" / "manifest.json").read_text())["model_digest"]
