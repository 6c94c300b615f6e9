"""The checkpoint store end to end: commits on local disk, memory:// and S3 (moto and SeaweedFS over HTTP),
verification that catches damage, retention, and the conditional commit under a race."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from conftest import TINY, call_cli, copy_run, manifests, run_forked, run_torchrun
from dist_train.checkpoint import catalog
from dist_train.checkpoint.fencing import AttemptRegistry
from dist_train.checkpoint.serialization import tensor_file
from dist_train.checkpoint.storage import Storage
from dist_train.checkpoint.writer import CheckpointWriter, CommitConflict


@pytest.fixture
def store_run(trained_run) -> Path:
    return trained_run(*TINY, "--max-steps", "12", "--checkpoint-every", "4")


@pytest.mark.timeout(120)
def test_a_committed_run_dir_verifies_and_lists(store_run, capsys):
    steps = [m["step"] for m in manifests(store_run)]
    assert steps == [4, 8, 12]
    code, out, err = call_cli(["ckpt", "verify", str(store_run)], capsys)
    assert code == 0, out + err
    listed = json.loads(call_cli(["ckpt", "list", str(store_run), "--json"], capsys)[1])
    assert [row["step"] for row in listed] == [4, 8, 12] and all(row["valid"] for row in listed)
    assert set(listed[0]) >= {"url", "step", "epoch", "created_at", "size", "valid", "reason", "model_digest"}
    code, out, _ = call_cli(["ckpt", "latest", str(store_run)], capsys)
    assert code == 0 and out.strip().endswith("ckpt-g0001-s0000000012")
    code, table, _ = call_cli(["ckpt", "list", str(store_run)], capsys)
    assert code == 0 and table.count(" yes ") == 3
    manifest = manifests(store_run)[-1]
    for key in ("format_version", "step", "epoch", "world_size", "created_at", "files", "model_digest",
                "torch_version", "config_hash", "metrics", "writer_id", "sampler"):
        assert key in manifest, key
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors", "trainer.safetensors",
                                      "rng.safetensors"}


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage, reason", [
    (lambda d: _flip_byte(d / "optimizer.safetensors"), "does not match its sha256"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]), "bytes, manifest says"),
    (lambda d: (d / "trainer.safetensors").unlink(), "is missing"),
    (lambda d: (d / "manifest.json").write_text("{garbage"), "not valid JSON"),
    (lambda d: (d / "manifest.json").unlink(), "no manifest"),
])
def test_verify_catches_damage_with_its_reason(store_run, tmp_path, damage, reason, capsys):
    run_dir = copy_run(store_run, tmp_path)
    newest = sorted(run_dir.glob("ckpt-*"))[-1]
    damage(newest)
    code, out, _ = call_cli(["ckpt", "verify", str(newest)], capsys)
    assert code == 1 and reason in out, out
    code, out, _ = call_cli(["ckpt", "verify", str(run_dir)], capsys)
    assert code == 1 and out.count("INVALID") == 1
    code, out, _ = call_cli(["ckpt", "latest", str(run_dir)], capsys)
    assert out.strip().endswith("ckpt-g0001-s0000000008"), "the damaged one must never be chosen"


def _small_state(seed: int) -> dict:
    torch.manual_seed(seed)
    return {"w": torch.randn(64, 64), "b": torch.randn(64)}


def _commit(storage: Storage, writer_id: str, step: int, seed: int, generation: int = 1):
    writer = CheckpointWriter(storage, generation, writer_id, AttemptRegistry(storage))
    state = _small_state(seed)
    from dist_train.checkpoint.manifest import model_digest
    return writer.commit(step, {"model.safetensors": tensor_file(state)},
                         {"epoch": 0, "world_size": 1, "model_digest": model_digest(state)})


def test_memory_store_commits_and_verifies():
    storage = Storage(f"memory://dt-{id(object())}/run")
    committed = _commit(storage, "w1", 5, seed=0)
    verdict = catalog.newest_valid(storage)
    assert verdict is not None and verdict.url == committed.url and verdict.valid


def test_two_writers_racing_on_one_checkpoint_exactly_one_wins_locally(tmp_path):
    _race(str(tmp_path / "race"))


def test_two_writers_racing_on_one_checkpoint_exactly_one_wins_on_s3(s3_server, s3_bucket):
    _race(f"s3://{s3_bucket}/race")


def _race(url: str) -> None:
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def write(writer_id: str, seed: int) -> None:
        storage = Storage(url)
        barrier.wait()
        try:
            outcomes[writer_id] = _commit(storage, writer_id, 7, seed)
        except CommitConflict as exc:
            outcomes[writer_id] = exc
        except FileExistsError as exc:  # local: the second rename finds the folder taken
            outcomes[writer_id] = exc

    threads = [threading.Thread(target=write, args=(f"writer-{i}", i)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [w for w, o in outcomes.items() if not isinstance(o, Exception)]
    assert len(outcomes) == 2 and len(winners) == 1, outcomes
    storage = Storage(url)
    verdict = catalog.newest_valid(storage)
    assert verdict is not None and verdict.manifest["writer_id"] == winners[0]
    assert catalog.inspect(storage, verdict.ref).valid


def test_conditional_create_is_exclusive_on_s3(s3_server, s3_bucket):
    storage = Storage(f"s3://{s3_bucket}/cc")
    assert storage.create_exclusive("x/manifest.json", b"first") is True
    assert storage.create_exclusive("x/manifest.json", b"second") is False
    assert storage.read("x/manifest.json") == b"first"


@pytest.mark.timeout(120)
def test_retention_keeps_the_newest_n_on_local_disk(tmp_path):
    run_dir = tmp_path / "run"
    result = run_forked(["train", "--run-dir", str(run_dir), *TINY, "--max-steps", "30", "--checkpoint-every", "3",
                      "--keep-last", "3"])
    assert result.returncode == 0, result.stderr
    assert [m["step"] for m in manifests(run_dir)] == [24, 27, 30]
    assert not list(run_dir.glob(".staging-*"))


@pytest.mark.timeout(150)
def test_two_rank_training_to_s3_commits_verifiable_checkpoints_with_retention(s3_server, s3_env, s3_bucket,
                                                                              capsys):
    url = f"s3://{s3_bucket}/jobs/digits"
    result = run_torchrun(2, ["train", "--run-dir", url, *TINY, "--max-steps", "24", "--checkpoint-every", "4",
                              "--keep-last", "3", "--async-checkpoint"], env=s3_env)
    assert result.returncode == 0, result.stderr[-3000:]
    listed = json.loads(call_cli(["ckpt", "list", url, "--json"], capsys)[1])
    assert [row["step"] for row in listed] == [16, 20, 24] and all(row["valid"] for row in listed)
    code, out, err = call_cli(["ckpt", "verify", url], capsys)
    assert code == 0, out + err
    storage = Storage(url)
    assert storage.exists("metrics.jsonl") and storage.exists("config.yaml")
    manifest = json.loads(storage.read(f"{listed[-1]['url'].rsplit('/', 1)[-1]}/manifest.json"))
    assert manifest["world_size"] == 2


@pytest.mark.timeout(120)
def test_leftover_staging_folders_are_not_checkpoints_and_go_on_the_next_run(store_run, tmp_path, capsys):
    run_dir = copy_run(store_run, tmp_path)
    stale = run_dir / ".staging-ckpt-g0001-s0000000016-deadbeef"
    shutil.copytree(sorted(run_dir.glob("ckpt-*"))[-1], stale)
    listed = json.loads(call_cli(["ckpt", "list", str(run_dir), "--json"], capsys)[1])
    assert all(".staging" not in row["url"] for row in listed)
    result = run_forked(["train", "--run-dir", str(run_dir), *TINY, "--max-steps", "14", "--checkpoint-every", "4"])
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert "resuming from" in result.stderr and "s0000000012" in result.stderr
