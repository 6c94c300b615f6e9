"""The storage seam in process: one class per backend, ranged reads, folders that hold nothing,
best-effort clean-up beside a still-writing zombie, the manifest checked on write, and what a store
without an atomic create-if-absent does to fencing."""

from __future__ import annotations

import logging
import os
import sys
import uuid

import pytest

from conftest import call_cli
from dist_train.checkpoint import catalog
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.storage import FsspecStorage, LocalStorage, S3Storage, Storage
from dist_train.checkpoint.writer import CheckpointWriter, clean_stale
from dist_train.errors import UserError

FIELDS = {"epoch": 0, "world_size": 1, "model_digest": "0" * 64}


def _memory_url() -> str:
    return f"memory://dt-{uuid.uuid4().hex[:12]}/run"


def _commit(storage: Storage, step: int, fields: dict | None = None):
    writer = CheckpointWriter(storage, 1, "writer-a", None)
    return writer.commit(step, {"model.safetensors": b"weights" * 50, "extra/notes.bin": b"n" * 7},
                         dict(FIELDS if fields is None else fields))


def test_storage_opens_the_backend_class_of_the_url(tmp_path):
    cases = {str(tmp_path / "run"): LocalStorage, f"file://{tmp_path}/run": LocalStorage,
             "s3://bucket/run": S3Storage, _memory_url(): FsspecStorage}
    for url, cls in cases.items():
        storage = Storage(url)
        assert type(storage) is cls, url
        assert type(storage.child("ckpt")) is cls and storage.child("ckpt").url("x").endswith("run/ckpt/x")
    assert LocalStorage.atomic_rename and not S3Storage.atomic_rename and not FsspecStorage.atomic_rename
    with pytest.raises(UserError, match="unknown URL scheme"):
        Storage("nosuchscheme://x/y")


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_read_range_reads_exactly_the_bytes_asked_for(backend, tmp_path):
    storage = Storage(str(tmp_path / "run") if backend == "local" else _memory_url())
    data = bytes(range(256)) * 40
    storage.makedirs("")
    storage.write_bytes("blob", data)
    assert storage.read_range("blob", 0, 10) == data[:10]
    assert storage.read_range("blob", 1000, 5000) == data[1000:5000]
    assert storage.read_range("blob", len(data) - 3, len(data) + 100) == data[-3:]
    assert b"".join(storage.iter_read("blob", 777)) == data
    with pytest.raises(FileNotFoundError):
        storage.read_range("missing", 0, 1)


def test_a_folder_holding_no_object_is_not_a_checkpoint(tmp_path, capsys):
    """Local disk: a deletion killed before it removed the emptied folder; memory://: a folder that
    is still listed after its objects are gone (SeaweedFS keeps such folders listed for minutes)."""
    run_dir = tmp_path / "run"
    local = Storage(str(run_dir))
    _commit(local, 5)
    (run_dir / "ckpt-g0001-s0000000003" / "empty-subfolder").mkdir(parents=True)
    assert [r.step for r in catalog.list_checkpoints(local)] == [5]
    code, out, err = call_cli(["ckpt", "verify", str(run_dir)], capsys)
    assert code == 0, out + err
    assert "s0000000003" not in call_cli(["ckpt", "list", str(run_dir), "--json"], capsys)[1]

    memory = Storage(_memory_url())
    _commit(memory, 5)
    memory.fs.mkdir(memory.path("ckpt-g0001-s0000000003"))  # listed, holds nothing
    assert "ckpt-g0001-s0000000003" in [e.name for e in memory.list("")]
    assert [r.step for r in catalog.list_checkpoints(memory)] == [5]
    assert [v.ref.step for v in catalog.scan(memory)] == [5]
    assert catalog.newest_valid(memory).ref.step == 5


_WRITE_AT_RMDIR: set[str] = set()  # folders where a "zombie" writes a file just before they are removed


def _zombie_writes_at_rmdir(event: str, args: tuple) -> None:
    if event == "os.rmdir" and args and str(args[0]) in _WRITE_AT_RMDIR:
        with open(os.path.join(str(args[0]), f"late-{uuid.uuid4().hex[:8]}"), "wb") as handle:
            handle.write(b"x")


sys.addaudithook(_zombie_writes_at_rmdir)  # inert unless a test names a folder


def test_clean_stale_survives_an_older_attempt_still_writing_into_its_staging_folder(tmp_path, caplog):
    """The older attempt's writer creates a file after the folder was emptied and before it is removed:
    the exact moment (an audit hook on rmdir) instead of a race a busy machine may never produce."""
    run_dir = tmp_path / "run"
    storage = Storage(str(run_dir))
    staging = run_dir / ".staging-ckpt-g0001-s0000000010-deadbeef"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"w" * 100)
    _WRITE_AT_RMDIR.add(str(staging))
    try:
        with caplog.at_level(logging.WARNING, logger="dist_train"):
            assert clean_stale(storage, 2) == []
    finally:
        _WRITE_AT_RMDIR.clear()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Directory not empty" in warnings[0] and staging.name in warnings[0], warnings
    assert staging.exists()
    assert clean_stale(storage, 2) == [staging.name]  # the writer is gone: now it goes
    assert not staging.exists()


@pytest.mark.parametrize("backend", ["local", "memory"])
@pytest.mark.parametrize("bad, reason", [
    ({"model_digest": "not a digest"}, "model_digest is not a sha256"),
    ({"epoch": -1}, "epoch is not a non-negative integer"),
    ({"world_size": None}, "world_size is not a non-negative integer"),
])
def test_a_manifest_the_reader_would_reject_is_never_committed(backend, bad, reason, tmp_path):
    storage = Storage(str(tmp_path / "run") if backend == "local" else _memory_url())
    with pytest.raises(ValueError, match=reason):
        _commit(storage, 5, {**FIELDS, **bad})
    assert catalog.list_checkpoints(storage) == []
    assert not [e.name for e in storage.list("") if "ckpt" in e.name], "nothing of the failed commit stays"
    committed = _commit(storage, 5)  # the same commit with a good manifest goes through
    assert catalog.inspect(storage, catalog.parse_name(committed.name)).valid


def test_a_store_without_atomic_create_warns_once_or_is_refused_when_strict(tmp_path, caplog):
    local = Storage(str(tmp_path / "run"))
    with caplog.at_level(logging.WARNING, logger="dist_train"):
        local.check_conditional_writes(strict=True)  # O_EXCL: nothing to say
        assert caplog.text == ""
        memory = Storage(_memory_url())
        memory.check_conditional_writes()
        memory.check_conditional_writes()
    assert caplog.text.count("best-effort") == 1
    with pytest.raises(UserError, match="--strict-fencing refuses"):
        Storage(_memory_url()).check_conditional_writes(strict=True)
    # the check-then-write fallback still refuses a second create from this process
    assert memory.create_exclusive("_attempts/000001.json", b"a") is True
    assert memory.create_exclusive("_attempts/000001.json", b"b") is False
    assert memory.read("_attempts/000001.json") == b"a"

