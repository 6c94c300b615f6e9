"""Saving from a job: async saves, failure then retry, retention policies, prune, multipart uploads."""

from __future__ import annotations

import pytest
import torch

from conftest import call_cli
from dist_train.checkpoint import catalog, s3 as s3_module
from dist_train.checkpoint.catalog import CheckpointRef
from dist_train.checkpoint.fencing import AttemptRegistry
from dist_train.checkpoint.saver import Checkpointer
from dist_train.checkpoint.retention import RetentionPolicy, plan
from dist_train.checkpoint.serialization import tensor_file
from dist_train.checkpoint.state import Snapshot
from dist_train.checkpoint.storage import Storage
from dist_train.checkpoint.writer import CheckpointWriter
from dist_train.distributed.env import DistEnv

ENV = DistEnv(0, 1, 0, torch.device("cpu"), None)


def checkpointer(storage: Storage, async_mode: bool, policy: RetentionPolicy = RetentionPolicy()) -> Checkpointer:
    writer = CheckpointWriter(storage, 1, "writer-a", AttemptRegistry(storage))
    return Checkpointer(ENV, storage, writer, policy, async_mode)


def make_snapshot(model: torch.nn.Module, val_loss: float | None = None):
    def snapshot(rng_states, copy):
        from dist_train.checkpoint.state import SnapshotBuffers, to_cpu_tree
        grab = SnapshotBuffers().copy_tree if copy else to_cpu_tree
        metrics = {} if val_loss is None else {"val_loss": val_loss}
        return Snapshot(0, {"model": grab(model.state_dict()), "optimizer": {"state": {}, "param_groups": []},
                            "trainer": {"rng": rng_states}}, {"epoch": 0, "world_size": 1, "metrics": metrics})
    return snapshot


def save(ckpt: Checkpointer, step: int, model: torch.nn.Module, val_loss: float | None = None) -> None:
    fn = make_snapshot(model, val_loss)

    def at_step(rng, copy):
        snap = fn(rng, copy)
        snap.step = step
        return snap
    ckpt.save(step, at_step, "interval")


def test_async_save_snapshots_then_trains_on_while_writing(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    storage.makedirs("")
    model = torch.nn.Linear(256, 256)
    ckpt = checkpointer(storage, async_mode=True)
    save(ckpt, 1, model)
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on: the snapshot taken at step 1 must not change
    assert ckpt.finish()
    verdict = catalog.newest_valid(storage)
    from dist_train.checkpoint.state import read_payload
    saved = read_payload(storage.child(verdict.ref.name), verdict.manifest, model_only=True).model
    assert torch.equal(saved["weight"] + 1.0, model.weight.detach())


@pytest.mark.parametrize("async_mode", [False, True])
def test_a_failed_save_is_reported_and_the_next_one_retried(tmp_path, caplog, async_mode):
    storage = Storage(str(tmp_path / "run"))
    storage.makedirs("")
    failures = {"left": 1}

    def disk_full(operation: str, rel: str) -> None:
        if operation == "write" and failures["left"]:
            failures["left"] -= 1
            raise OSError(28, "No space left on device")

    Storage.hooks.append(disk_full)
    try:
        ckpt = checkpointer(storage, async_mode)
        model = torch.nn.Linear(4, 4)
        save(ckpt, 1, model)
        ckpt.finish() if not async_mode else ckpt._wait_in_flight()
        assert ckpt.consecutive_failures == 1 and not ckpt.must_stop
        assert "No space left on device" in caplog.text
        save(ckpt, 2, model)
        assert ckpt.finish()
    finally:
        Storage.hooks.remove(disk_full)
    assert [r.step for r in catalog.list_checkpoints(storage)] == [2]
    assert not list((tmp_path / "run").glob(".staging-*")), "the failed save left its staging folder"


def test_retention_plan_keeps_last_best_and_every():
    refs = [CheckpointRef(1, s, f"ckpt-g0001-s{s:010d}") for s in (10, 20, 30, 40, 50, 60)]
    losses = {10: 0.9, 20: 0.2, 30: 0.5, 40: 0.3, 50: 0.8, 60: 0.7}
    doomed = plan(refs, RetentionPolicy(keep_last=2, keep_best=1, keep_every=30), lambda r: losses[r.step])
    assert [r.step for r in doomed] == [10, 40]  # kept: 50, 60 (last), 20 (best), 30 and 60 (every 30)
    assert plan(refs, RetentionPolicy(), lambda r: None) == []
    newer_attempt = refs + [CheckpointRef(2, 15, "ckpt-g0002-s0000000015")]
    assert CheckpointRef(2, 15, "x") not in plan(newer_attempt, RetentionPolicy(keep_last=1), lambda r: None)


def test_each_retention_rule_works_on_its_own():
    refs = [CheckpointRef(1, s, f"ckpt-g0001-s{s:010d}") for s in (10, 20, 30, 40, 50, 60, 65)]
    losses = {10: 0.9, 20: 0.2, 30: 0.5, 40: 0.3, 50: 0.8, 60: 0.7, 65: None}  # 65: mid-epoch, no validation

    def kept(policy: RetentionPolicy) -> list[int]:
        doomed = plan(refs, policy, lambda r: losses[r.step])
        return [r.step for r in refs if r not in doomed]

    assert kept(RetentionPolicy(keep_best=2)) == [20, 40, 65]  # the K best plus the newest
    assert kept(RetentionPolicy(keep_every=20)) == [20, 40, 60, 65]  # multiples of M plus the newest
    assert kept(RetentionPolicy(keep_last=1)) == [65]
    assert kept(RetentionPolicy()) == [10, 20, 30, 40, 50, 60, 65]  # no rule: keep everything


def test_keep_best_alone_prunes_during_training(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    storage.makedirs("")
    ckpt = checkpointer(storage, False, RetentionPolicy(keep_best=1))
    model = torch.nn.Linear(4, 4)
    for step, loss in ((1, 0.5), (2, 0.1), (3, None), (4, 0.4)):
        save(ckpt, step, model, loss)
    assert [r.step for r in catalog.list_checkpoints(storage)] == [2, 4]


def test_retention_during_training_keeps_the_newest(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    storage.makedirs("")
    ckpt = checkpointer(storage, False, RetentionPolicy(keep_last=2, keep_best=1))
    model = torch.nn.Linear(4, 4)
    for step, loss in ((1, 0.1), (2, 0.5), (3, 0.4), (4, 0.6)):
        save(ckpt, step, model, loss)
    assert [r.step for r in catalog.list_checkpoints(storage)] == [1, 3, 4]


def test_prune_cli_never_removes_the_newest_valid_checkpoint(tmp_path, capsys):
    storage = Storage(str(tmp_path / "run"))
    storage.makedirs("")
    ckpt = checkpointer(storage, False)
    model = torch.nn.Linear(4, 4)
    for step in range(1, 6):
        save(ckpt, step, model)
    newest = tmp_path / "run" / "ckpt-g0001-s0000000005" / "model.safetensors"
    newest.write_bytes(b"\0" * newest.stat().st_size)  # corrupt the newest: step 4 is the newest valid
    code, out, _ = call_cli(["ckpt", "prune", str(tmp_path / "run"), "--keep-last", "1", "--dry-run"], capsys)
    assert code == 0 and "would delete" in out
    assert len(catalog.list_checkpoints(storage)) == 5
    code, out, _ = call_cli(["ckpt", "prune", str(tmp_path / "run"), "--keep-last", "1"], capsys)
    assert code == 0
    left = [r.step for r in catalog.list_checkpoints(storage)]
    assert 4 in left and 1 not in left and 2 not in left and 3 not in left
    assert catalog.newest_valid(storage).ref.step == 4


def test_large_files_go_up_as_multipart_and_a_failed_upload_is_aborted(s3_server, s3_bucket, monkeypatch):
    import boto3
    monkeypatch.setattr(s3_module, "MULTIPART_THRESHOLD", 6 * 2**20)
    monkeypatch.setattr(s3_module, "PART_SIZE", 5 * 2**20)
    storage = Storage(f"s3://{s3_bucket}/mp")
    big = {"w": torch.randn(4 * 2**20)}  # 16 MiB: four parts
    writer = CheckpointWriter(storage, 1, "w", AttemptRegistry(storage))
    from dist_train.checkpoint.manifest import model_digest
    committed = writer.commit(1, {"model.safetensors": tensor_file(big)},
                              {"epoch": 0, "world_size": 1, "model_digest": model_digest(big)})
    assert catalog.inspect(storage, catalog.parse_name(committed.name)).valid
    client = boto3.client("s3")
    head = client.head_object(Bucket=s3_bucket, Key=f"mp/{committed.name}/model.safetensors")
    assert "-" in head["ETag"], "expected a multipart ETag"

    class Broken:
        size = 16 * 2**20 + 8

        def chunks(self):
            yield bytes(12 * 2**20)
            raise OSError(5, "source went away mid-upload")

    with pytest.raises(OSError):
        storage.write("broken/model.safetensors", Broken().chunks(), Broken.size)
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"), "the failed upload was not aborted"
    assert not storage.exists("broken/model.safetensors")
