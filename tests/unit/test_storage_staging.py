"""The commit primitive as storage methods (`stage` / `publish` / `discard_staged` / `create_whole`),
on local disk and on a real S3 server (moto): callers run one protocol, the classes differ.

What must hold on both: nothing looks published before `publish`; a failed fence check
publishes nothing and leaves nothing behind; a name is committed once (a second writer is
refused, the first one's commit untouched); a committed folder is never discarded.
"""

from __future__ import annotations

import pytest

from dist_train.checkpoint.storage import CLAIM, STAGING_PREFIX, LocalStorage, S3Storage, Storage

NAME = "ckpt-g0001-s0000000010"
MARKER = "manifest.json"


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "run"))
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(f"s3://{bucket}/run")


def _names(storage: Storage, rel: str = "") -> set[str]:
    return {entry.name for entry in storage.list(rel)}


def _stage_folder(storage: Storage, owner: bytes, tag: str = "aaaa") -> str:
    staged = storage.stage(NAME, tag, owner=owner)
    storage.write_bytes(f"{staged}/model.safetensors", b"w" * 100)
    storage.write_bytes(f"{staged}/shards/rank1/part.bin", b"p" * 10)
    return staged


def test_a_folder_appears_only_when_published_with_its_marker_last(storage):
    staged = _stage_folder(storage, b"writer-a")
    assert not storage.exists(f"{NAME}/{MARKER}")
    if isinstance(storage, LocalStorage):  # hidden under a staging name until one rename
        assert staged.startswith(STAGING_PREFIX) and NAME not in _names(storage)
    else:  # written in place, claimed by its owner
        assert staged == NAME and storage.read(f"{NAME}/{CLAIM}") == b"writer-a"

    assert storage.publish(staged, NAME, MARKER, b'{"step": 10}') is True
    assert storage.read(f"{NAME}/{MARKER}") == b'{"step": 10}'
    assert storage.read(f"{NAME}/shards/rank1/part.bin") == b"p" * 10
    assert not [n for n in _names(storage) if n.startswith(STAGING_PREFIX)]
    storage.discard_staged(NAME, MARKER)  # an abort that comes too late never removes a committed folder
    assert storage.read(f"{NAME}/model.safetensors") == b"w" * 100


def test_a_failed_fence_check_publishes_nothing_and_leaves_nothing(storage):
    staged = _stage_folder(storage, b"writer-a")

    def fenced_off() -> None:
        raise RuntimeError("a newer attempt took over")

    with pytest.raises(RuntimeError, match="newer attempt"):
        storage.publish(staged, NAME, MARKER, b"{}", before=fenced_off)
    assert not storage.exists(f"{NAME}/{MARKER}")
    assert storage.folders("") == []  # neither the staged copy nor a half-claimed folder is left


def test_a_name_is_committed_once(storage):
    first = _stage_folder(storage, b"writer-a")
    assert storage.publish(first, NAME, MARKER, b"first")
    if isinstance(storage, S3Storage):
        assert storage.stage(NAME, "bbbb", owner=b"writer-a") == NAME  # a retried claim finds its own
        with pytest.raises(FileExistsError):
            storage.stage(NAME, "cccc", owner=b"writer-b")
        # a writer past its claim that publishes anyway: the conditional create refuses, the caller decides
        assert storage.publish(NAME, NAME, MARKER, b"second") is False
    else:
        second = _stage_folder(storage, b"writer-b", tag="bbbb")
        with pytest.raises(FileExistsError):
            storage.publish(second, NAME, MARKER, b"second")
        assert not storage.exists(second)  # the loser's staged copy is removed
    assert storage.read(f"{NAME}/{MARKER}") == b"first"


def test_a_file_is_created_whole_and_once(storage):
    assert storage.create_whole("data/manifest.json", b"one", "t1") is True
    assert storage.create_whole("data/manifest.json", b"two", "t2") is False
    assert storage.read("data/manifest.json") == b"one"
    assert _names(storage, "data") == {"manifest.json"}  # no staging file left, won or lost


def test_a_staged_file_is_published_or_discarded(storage):
    kept = storage.stage("model.safetensors", "t1")
    storage.write_bytes(kept, b"weights")
    if isinstance(storage, LocalStorage):
        assert kept.startswith(STAGING_PREFIX) and not storage.exists("model.safetensors")
    storage.publish(kept, "model.safetensors")
    dropped = storage.stage("other.safetensors", "t2")
    storage.write_bytes(dropped, b"bad digest")
    storage.discard_staged(dropped)
    assert _names(storage) == {"model.safetensors"}
    assert storage.read("model.safetensors") == b"weights"


def test_remove_empty_folder_keeps_a_folder_that_holds_something(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    storage.makedirs("empty")
    storage.write_bytes("full/x", b"x")
    storage.remove_empty_folder("empty")
    storage.remove_empty_folder("full")
    storage.remove_empty_folder("never-made")
    assert _names(storage) == {"full"}
