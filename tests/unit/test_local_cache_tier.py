"""The node-local tier's bookkeeping: what a node keeps, and when a cached copy is not even read."""

from __future__ import annotations

import hashlib

from dist_train.checkpoint.local_cache import LocalCache

FILES = {"model.safetensors": b"m" * 100, "trainer.safetensors": b"t" * 10}


def _manifest(files: dict[str, bytes]) -> dict:
    return {"files": {rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                      for rel, data in files.items()}}


def test_a_node_keeps_its_newest_copies_and_one_spare_when_the_commit_is_not_known(tmp_path):
    cache = LocalCache(str(tmp_path / "cache"), "s3://bucket/run", keep=1)
    for step in (1, 2, 3):
        cache.store(f"ckpt-g0001-s{step:010d}", FILES, spare=1)
    assert sorted(p.name for p in (tmp_path / "cache").glob("ckpt-*")) == ["ckpt-g0001-s0000000002",
                                                                          "ckpt-g0001-s0000000003"]
    cache.store("ckpt-g0001-s0000000004", FILES)  # rank 0, after the durable commit: no spare
    assert [p.name for p in (tmp_path / "cache").glob("ckpt-*")] == ["ckpt-g0001-s0000000004"]
    assert not list((tmp_path / "cache").glob(".staging-*"))


def test_a_copy_is_used_only_when_every_file_has_the_durable_size(tmp_path, caplog):
    cache = LocalCache(str(tmp_path / "cache"), "s3://bucket/run")
    cache.store("ckpt-g0001-s0000000005", FILES)
    folder = cache.lookup("ckpt-g0001-s0000000005", _manifest(FILES))
    assert folder is not None and folder.read("model.safetensors") == FILES["model.safetensors"]

    longer = dict(FILES, **{"model.safetensors": b"m" * 101})  # the run dir's checkpoint is another one
    assert cache.lookup("ckpt-g0001-s0000000005", _manifest(longer)) is None
    assert "differs in size" in caplog.text
    assert not (tmp_path / "cache" / "ckpt-g0001-s0000000005").exists()  # and it is gone

    cache.store("ckpt-g0001-s0000000006", {"model.safetensors": FILES["model.safetensors"]})
    assert cache.lookup("ckpt-g0001-s0000000006", _manifest(FILES)) is None
    assert "trainer.safetensors is missing" in caplog.text


def test_a_cache_of_another_run_dir_is_not_read_and_is_cleared_by_the_next_store(tmp_path, caplog):
    LocalCache(str(tmp_path / "cache"), "s3://bucket/other").store("ckpt-g0001-s0000000005", FILES)
    ours = LocalCache(str(tmp_path / "cache"), "s3://bucket/run")
    assert ours.lookup("ckpt-g0001-s0000000005", _manifest(FILES)) is None
    assert "belongs to another run dir" in caplog.text
    ours.store("ckpt-g0001-s0000000007", FILES)
    assert [p.name for p in (tmp_path / "cache").glob("ckpt-*")] == ["ckpt-g0001-s0000000007"]


SHARES = {0: {"shards/rank00000/model.safetensors": b"a" * 64, "trainer.safetensors": b"t" * 10},
          1: {"shards/rank00001/model.safetensors": b"b" * 64}}


def test_the_ranks_of_a_node_add_their_shares_to_one_copy_and_its_leader_prunes(tmp_path, caplog):
    cache = LocalCache(str(tmp_path / "cache"), "s3://bucket/run", keep=1)
    cache.store_share("ckpt-g0001-s0000000001", SHARES[1], prune=False)  # before the node's leader claimed it
    assert "not claimed" in caplog.text and not (tmp_path / "cache" / "ckpt-g0001-s0000000001").exists()
    cache.claim()
    for step in (1, 2):
        for rank in (1, 0):  # a rank's share never removes another's
            cache.store_share(f"ckpt-g0001-s{step:010d}", SHARES[rank], prune=rank == 0)
    copy = tmp_path / "cache" / "ckpt-g0001-s0000000002"
    assert [p.name for p in (tmp_path / "cache").glob("ckpt-*")] == [copy.name]
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()) == sorted(
        [*SHARES[0], *SHARES[1]])  # whole files only: nothing staged is left


def test_a_ranks_overlay_serves_only_its_files_held_at_the_durable_size(tmp_path):
    from dist_train.checkpoint.storage import Storage

    run = Storage(str(tmp_path / "run"))
    for rel, data in {**SHARES[0], **SHARES[1]}.items():
        run.write_bytes(f"ckpt-g0001-s0000000003/{rel}", data.upper())  # the run dir's bytes, told apart
    cache = LocalCache(str(tmp_path / "cache"), "s3://bucket/run")
    cache.claim()
    cache.store_share("ckpt-g0001-s0000000003", {**SHARES[0], "shards/rank00001/model.safetensors": b"b" * 63},
                      prune=True)
    manifest = _manifest({**SHARES[0], **SHARES[1]})
    mine = ["shards/rank00000/model.safetensors", "shards/rank00001/model.safetensors"]
    overlay = cache.overlay("ckpt-g0001-s0000000003", manifest, run.child("ckpt-g0001-s0000000003"), mine)
    assert overlay is not None and not overlay.is_local  # every rank verifies what it reads, whatever the stores
    assert overlay.served == {"shards/rank00000/model.safetensors"}  # the short one is not served
    assert overlay.read("shards/rank00000/model.safetensors") == b"a" * 64
    assert overlay.read_range("shards/rank00001/model.safetensors", 0, 2) == b"BB"
    assert overlay.read("trainer.safetensors") == b"T" * 10  # not one of this rank's files: the run dir
    assert cache.overlay("ckpt-g0001-s0000000009", manifest, run, mine) is None
