"""Training from a packed data set in S3: learns, resumes bit-exactly, exact-once across kills and sizes.

Real `dist-train data pack` into each real S3 server (moto, SeaweedFS), real 2-rank torchrun jobs
reading the shards over HTTP, real SIGKILLs. One killed run carries three claims: after a
SIGKILL mid-epoch and a resume on 2 ranks its checkpoints match an uninterrupted run's digest
for digest (bit-identical); after a second SIGKILL it finishes on 1 rank, and the sample logs
of its three attempts cover every sample of every epoch exactly once.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import kill_group, manifests, run_cli, run_forked, run_torchrun, start_torchrun, wait_for
from dist_train.errors import EXIT_BAD_INPUT
from support.fault_proxy import FaultProxy

pytestmark = pytest.mark.integration

# 1257 training samples in 27 shards of 48 KiB: 20 steps an epoch on 2 ranks of 32.
FLAGS = ["--epochs", "3", "--batch-size", "32", "--checkpoint-every", "8", "--keep-last", "20", "--lr", "0.003",
         "--deterministic", "--no-progress", "--log-every", "5"]


def pack(url: str, env: dict[str, str] | None = None) -> None:
    result = run_cli(["data", "pack", "digits", "--out", url, "--shard-size", "48KiB"], env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def train_args(run_dir: Path, url: str, *extra: str) -> list[str]:
    return ["train", "--run-dir", str(run_dir), "--dataset", url, *FLAGS, *extra]


def val_accuracy(run_dir: Path) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line.get("split") == "val"][-1]["accuracy"]


def digests(run_dir: Path) -> dict[int, str]:
    return {m["step"]: m["model_digest"] for m in manifests(run_dir)}


def committed_steps_of_each_attempt(run_dir: Path) -> dict[int, int]:
    """generation -> the step the next attempt resumed from (its later steps were redone)."""
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumes = [e for e in events if e.get("event") == "resume"]
    return {e["generation"] - 1: e["step"] for e in resumes}


def assert_exactly_once(samples: Path, run_dir: Path, n_train: int, epochs: int) -> None:
    """Sample logs of every attempt and rank, less what a SIGKILLed attempt trained after its last commit."""
    kept_before = committed_steps_of_each_attempt(run_dir)
    counts: Counter = Counter()
    for path in samples.glob("rank*-g*.jsonl"):
        generation = int(path.stem.split("-g")[1])
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if generation in kept_before and record["step"] > kept_before[generation]:
                continue  # trained, then lost with the attempt: redone by the next one
            counts.update((record["epoch"], i) for i in record["indices"])
    for epoch in range(epochs):
        seen = {i: c for (e, i), c in counts.items() if e == epoch}
        assert set(seen) == set(range(n_train)), f"epoch {epoch}: {n_train - len(seen)} samples skipped"
        assert set(seen.values()) == {1}, f"epoch {epoch}: samples trained twice"


@pytest.mark.timeout(600)
def test_packed_s3_data_learns_resumes_bit_exactly_and_exactly_once_across_kills_and_sizes(
        s3_server, s3_env, s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/digits"
    pack(url, s3_env)

    # Uninterrupted, reading through a counting proxy with a node cache the ranks share.
    reference = tmp_path / "reference"
    with FaultProxy(s3_env["AWS_ENDPOINT_URL"]) as proxy:
        result = run_torchrun(2, train_args(reference, url, "--data-cache", str(tmp_path / "cache")),
                              env=dict(s3_env, AWS_ENDPOINT_URL=proxy.url), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert val_accuracy(reference) >= 0.95
    shard_gets = Counter(path for method, path, _ in proxy.log if method == "GET" and "/shards/" in path
                         and path.endswith(".tar"))
    assert shard_gets and max(shard_gets.values()) == 1, "a shard was downloaded twice by one node"
    expected = digests(reference)

    # Killed mid-epoch 0, resumed on 2 ranks (bit-identical), killed mid-epoch 1, finished on 1 rank.
    run_dir, samples = tmp_path / "run", tmp_path / "samples"
    log = tmp_path / "job.log"
    for stop_after in (8, 24):
        proc = start_torchrun(2, train_args(run_dir, url, "--sample-log", str(samples)), env=s3_env, log_path=log)
        try:
            wait_for(lambda: any(m["step"] >= stop_after for m in manifests(run_dir)), 240,
                     what=f"a commit at step {stop_after} in {log.read_text()[-2000:] if log.exists() else ''}")
        finally:
            kill_group(proc)
            proc.wait(30)
    for step, digest in digests(run_dir).items():
        assert digest == expected[step], f"step {step}: the resumed run diverged from the uninterrupted one"
    result = run_forked(train_args(run_dir, url, "--sample-log", str(samples)), env=s3_env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size changed" in result.stderr
    assert_exactly_once(samples, run_dir, 1257, 3)
    last = manifests(run_dir)[-1]
    assert last["data_info"]["packed"]["url"] == url
    assert len(last["data_info"]["packed"]["manifest_sha256"]) == 64


@pytest.mark.timeout(300)
def test_corrupt_shard_mid_run_and_changed_data_set_on_resume(tmp_path):
    data = tmp_path / "digits"
    url = data.as_uri()
    pack(url)
    run_dir = tmp_path / "run"
    one_rank = ["--batch-size", "64", "--max-steps", "10"]
    result = run_forked(train_args(run_dir, url, *one_rank), timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in run_dir.glob("ckpt-*/manifest.json")}

    # The same URL now holds another data set (packed again with other shards): refused, unless allowed.
    pack_again = run_cli(["data", "pack", "digits", "--out", url, "--shard-size", "32KiB", "--overwrite"])
    assert pack_again.returncode == 0, pack_again.stderr[-2000:]
    result = run_forked(train_args(run_dir, url, "--batch-size", "64", "--max-steps", "12"), timeout=200)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-3000:]
    assert "data set changed" in result.stderr and "--allow-data-change" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in run_dir.glob("ckpt-*/manifest.json")} == before

    # A shard that rots in the store: the run stops with one line naming it, on no corrupt bytes.
    manifest = json.loads((data / "manifest.json").read_text())
    victim = data / manifest["splits"]["train"]["shards"][-1]["name"]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    result = run_forked(train_args(run_dir, url, "--batch-size", "64", "--max-steps", "40",
                                   "--allow-data-change"), timeout=200)
    assert result.returncode != 0
    assert victim.name in result.stderr and "corrupt" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for path in run_dir.glob("ckpt-*"):
        verify = run_cli(["ckpt", "verify", str(path)])
        assert verify.returncode == 0, verify.stdout + verify.stderr
