"""Packed data sets in process: the round trip of every source kind (bytes and labels equal the source),
the tar layout other tools read, verification (a corrupt or missing shard is named, never served), the
manifest checks, and the node cache (hits without fetching, partial files ignored, LRU within its limit)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, call_cli
from dist_train.data.packed import ShardError, is_packed_url, open_packed
from dist_train.data.packed import dataset as packed_dataset
from dist_train.data.packed import format as fmt
from dist_train.data.packed.pack import pack, parse_size
from dist_train.data.packed.sources import PackOptions, open_source
from dist_train.errors import UserError


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch):
    monkeypatch.setattr(packed_dataset, "SHARD_RETRY",
                        packed_dataset.RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.01))


@pytest.fixture(scope="module")
def digits_pack(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "digits"
    pack(open_source("digits", PackOptions(seed=3)), str(out), parse_size("16KiB"))
    return out


def _image_folder(root: Path) -> Path:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(9):
            pixels = (torch.rand(10 + i % 3, 12, 3, generator=gen) * 255).to(torch.uint8).numpy()
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(root / name / f"{i}.{ext}")
    return root


def _shard_files(out: Path) -> list[Path]:
    return sorted((out / "shards").glob("*.tar"))


def test_digits_round_trip_keeps_every_sample_and_the_split(digits_pack):
    from dist_train.data.config import DataConfig
    from dist_train.data.datasets import digits

    source = digits(DataConfig(val_fraction=0.15, test_fraction=0.15), seed=3)
    ds = open_packed(str(digits_pack))
    assert ds.manifest["kind"] == "dist_train.data" and ds.manifest["format_version"] == fmt.FORMAT_VERSION
    assert ds.manifest_sha256 == hashlib.sha256((digits_pack / "manifest.json").read_bytes()).hexdigest()
    assert ds.classes == [str(d) for d in range(10)]
    assert ds.preprocessing["in_channels"] == 1 and ds.preprocessing["image_size"] == 8
    assert ds.splits == ["train", "val", "test"]
    for name in ("train", "val", "test"):
        split, original = ds.split(name), getattr(source, name)
        assert len(split) == len(original) and sum(split.shard_sizes) == len(split)
        assert len(split.shard_sizes) > 1
        for i in range(len(split)):
            x, y = split[i]
            want_x, want_y = original[i]
            assert y == want_y and isinstance(y, int)
            assert torch.equal(x, want_x), (name, i)
    with pytest.raises(UserError, match="no 'nope' split"):
        ds.split("nope")


def test_shards_are_plain_tar_in_webdataset_layout(digits_pack):
    manifest = json.loads((digits_pack / "manifest.json").read_bytes())
    listed = [s for split in manifest["splits"].values() for s in split["shards"]]
    assert sorted(digits_pack / s["name"] for s in listed) == _shard_files(digits_pack)
    for entry in listed:
        data = (digits_pack / entry["name"]).read_bytes()
        assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
        with tarfile.open(digits_pack / entry["name"]) as tar:
            names = tar.getnames()
        keys = sorted({n.split(".", 1)[0] for n in names})
        assert len(keys) == entry["num_samples"]
        assert names == [f"{k}.{ext}" for k in keys for ext in ("input.npy", "cls")]
        index = json.loads((digits_pack / entry["index"]).read_bytes())
        assert index["keys"] == keys and len(index["offsets"]) == len(keys)
        start, end = index["offsets"][1]
        with tarfile.open(fileobj=io.BytesIO(data[start:end])) as one:  # a sample's range is a tar of its own
            assert one.getnames() == [f"{keys[1]}.input.npy", f"{keys[1]}.cls"]
    import webdataset as wds

    first = manifest["splits"]["train"]["shards"][0]
    samples = list(wds.WebDataset(str(digits_pack / first["name"]), shardshuffle=False))
    assert len(samples) == first["num_samples"]
    x, y = open_packed(str(digits_pack)).split("train")[0]
    assert int(samples[0]["cls"]) == y
    assert np.array_equal(np.load(io.BytesIO(samples[0]["input.npy"]), allow_pickle=False), x.numpy())


def test_image_folder_keeps_the_original_bytes(tmp_path):
    from dist_train.data.config import DataConfig
    from dist_train.data.datasets import image_folder, read_image

    root = _image_folder(tmp_path / "pets")
    out = tmp_path / "packed"
    pack(open_source(str(root), PackOptions(val_fraction=0.2, test_fraction=0.2, seed=1)), str(out), 4096)
    source = image_folder(DataConfig(dataset="image_folder", data_root=str(root), val_fraction=0.2,
                                     test_fraction=0.2), seed=1)
    ds = open_packed(str(out))
    assert ds.classes == ["cat", "dog"] and ds.preprocessing["input"] == "image"
    assert ds.preprocessing["image_size"] is None  # three heights: not one size
    seen = 0
    for name in ("train", "val", "test"):
        split, original = ds.split(name), getattr(source, name)
        assert len(split) == len(original)
        for i in range(len(split)):
            path, label = original.base.samples[original.indices[i]]
            shard = split._shard(split.shard_of(i))
            members = shard.members[i - split._starts[split.shard_of(i)]]
            ext = path.rsplit(".", 1)[1]
            start, size = members[ext]
            assert shard.data[start:start + size] == Path(path).read_bytes()
            x, y = split[i]
            assert y == label
            want = torch.from_numpy(np.asarray(read_image(path), dtype="float32") / 255.0)
            assert torch.equal(x, want.permute(2, 0, 1))
            seen += 1
    assert seen == 18
    marker = []
    split = ds.split("train", transform=lambda image: marker.append(image.size) or "made")
    assert split[0][0] == "made" and marker


def test_text_and_import_path_sources(tmp_path, monkeypatch):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(60))
    (tmp_path / "book.txt").write_text(text)
    pack(open_source(str(tmp_path / "book.txt"), PackOptions(val_fraction=0.1, test_fraction=0.0, seq_len=16)),
         str(tmp_path / "text"), 8192)
    ds = open_packed(str(tmp_path / "text"))
    vocab = ds.preprocessing["vocab"]
    assert vocab == sorted(set(text)) and ds.preprocessing["seq_len"] == 16 and "test" not in ds.splits
    train = ds.split("train")
    assert len(train) == (int(len(text) * 0.9) - 1) // 16
    for i in (0, len(train) - 1):
        x, y = train[i]
        assert "".join(vocab[t] for t in x.tolist()) == text[16 * i:16 * i + 16]
        assert torch.equal(x[1:], y[:-1]) and y.dtype == torch.int64

    monkeypatch.syspath_prepend(str(REPO / "tests" / "support"))
    pack(open_source("userpkg.data:Wave", PackOptions(dataset_args={"features": 4})), str(tmp_path / "wave"), 8192)
    from userpkg.data import Wave

    wave = open_packed(str(tmp_path / "wave"))
    assert wave.splits == ["train", "val"] and wave.manifest["source"]["dataset_args"] == {"features": 4}
    for name in ("train", "val"):
        original, split = Wave(name, features=4), wave.split(name)
        for i in range(0, len(original), 37):
            assert all(torch.equal(a, b) for a, b in zip(split[i], original[i]))


def _corrupt(path: Path, offset: int = 700) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_or_missing_shard_is_named_and_never_served(tmp_path, digits_pack):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(digits_pack, out)
    ds = open_packed(str(out))
    train = ds.split("train")
    entry = ds.manifest["splits"]["train"]["shards"][1]
    _corrupt(out / entry["name"])
    assert train[0][1] is not None  # shard 0 is fine
    with pytest.raises(ShardError, match=rf"{entry['name']}: corrupt: sha256 mismatch") as caught:
        train[train.shard_sizes[0]]
    assert "\n" not in str(caught.value) and isinstance(caught.value, UserError)
    # in a DataLoader worker: the same one line reaches the training process
    later = torch.utils.data.Subset(ds.split("train"), range(train.shard_sizes[0], len(train)))
    with pytest.raises(ShardError) as caught:
        next(iter(torch.utils.data.DataLoader(later, batch_size=4, num_workers=1)))
    assert str(caught.value).startswith(f"shard {out / entry['name']}: corrupt") and "\n" not in str(caught.value)
    os.unlink(out / entry["name"])
    with pytest.raises(ShardError, match=rf"{entry['name']}: missing"):
        ds.split("train")[train.shard_sizes[0] + 1]


def test_manifests_that_are_not_a_readable_data_set(tmp_path, digits_pack):
    with pytest.raises(UserError, match="not a packed data set: no manifest at"):
        open_packed(str(tmp_path))
    raw = json.loads((digits_pack / "manifest.json").read_bytes())
    for change, message in (({"format_version": fmt.FORMAT_VERSION + 1}, "newer than this dist_train reads"),
                            ({"kind": None}, "not 'dist_train.data'"),
                            ({"splits": {"train": {"num_samples": 1, "shards": [{"name": "../x.tar"}]}}},
                             "unsafe shard name")):
        bad = tmp_path / f"bad{len(message)}"
        bad.mkdir()
        (bad / "manifest.json").write_bytes(fmt.encode({**raw, **change}))
        with pytest.raises(UserError, match=message):
            open_packed(f"file://{bad}")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable data manifest"):
        open_packed(str(tmp_path))


def test_prefetch_ranged_reads_and_pickling_to_workers(digits_pack, monkeypatch):
    whole = open_packed(str(digits_pack)).split("val")
    want = [whole[i] for i in range(len(whole))]
    monkeypatch.setattr(packed_dataset, "RANGE_PART", 4096)  # shards of ~16 KiB arrive as 4 ranged reads
    split = open_packed(str(digits_pack)).split("val")
    split.prefetch(list(range(len(split))))
    assert split._pending or split._lru
    shipped = pickle.loads(pickle.dumps(split))  # threads and sessions stay behind
    assert shipped._pool is None and shipped._storage is None and not shipped._lru
    assert [shipped[i][1] for i in range(len(split))] == [split[i][1] for i in range(len(split))]
    assert split.gets == len(split.shard_sizes)  # each shard fetched once, prefetched or not
    assert all(torch.equal(split[i][0], want[i][0]) and split[i][1] == want[i][1] for i in range(len(split)))
    # workers forked while this process has fetch threads and a session: they start afresh
    fresh = open_packed(str(digits_pack)).split("train")
    fresh.prefetch(list(range(0, len(fresh), 40)))
    loader = torch.utils.data.DataLoader(fresh, batch_size=64, num_workers=2, multiprocessing_context="fork")
    assert sum(len(y) for _, y in loader) == len(fresh)


def test_node_cache_hits_ignores_partial_files_and_evicts_lru(tmp_path, digits_pack):
    cache = tmp_path / "cache"
    ds = open_packed(str(digits_pack), cache_dir=str(cache))
    val = ds.split("val")
    want = [val[i][1] for i in range(len(val))]
    assert val.gets == len(val.shard_sizes)
    again = pickle.loads(pickle.dumps(val))  # another process of the node
    assert [again[i][1] for i in range(len(val))] == want and again.gets == 0
    # a download killed mid-way (temp file) and a truncated shard file: neither is used
    entry = ds.manifest["splits"]["val"]["shards"][0]
    (cache / f".tmp-{entry['sha256'][:16]}-dead").write_bytes(b"partial")
    path = cache / f"{entry['sha256']}.tar"
    path.write_bytes(path.read_bytes()[:100])
    third = pickle.loads(pickle.dumps(val))
    assert third[0][1] == want[0] and third.gets == 1
    assert path.stat().st_size == entry["size"]
    # LRU: a limit of two and a half shards keeps the newest within the limit
    sizes = [s["size"] for s in ds.manifest["splits"]["train"]["shards"]]
    limit = int(2.5 * max(sizes))
    lru_dir = tmp_path / "lru"
    train = open_packed(str(digits_pack), cache_dir=str(lru_dir), cache_limit=limit).split("train")
    train.memory_limit = 1  # one shard in memory at a time
    for shard in range(5):
        train[sum(train.shard_sizes[:shard])]
    held = {p.name for p in lru_dir.glob("*.tar")}
    assert sum(p.stat().st_size for p in lru_dir.glob("*.tar")) <= limit
    newest = [ds.manifest["splits"]["train"]["shards"][i]["sha256"] + ".tar" for i in (3, 4)]
    assert set(newest) <= held and len(held) == 2


def test_one_download_per_node_while_others_wait(tmp_path, digits_pack):
    from dist_train.data.packed.cache import NodeCache

    entry = json.loads((digits_pack / "manifest.json").read_bytes())["splits"]["val"]["shards"][0]
    data = (digits_pack / entry["name"]).read_bytes()
    calls = []

    def fetch():
        calls.append(1)
        return data
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        NodeCache(str(tmp_path)).get(entry["sha256"], entry["size"], fetch))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [data] * 4 and len(calls) == 1


def test_sizes_urls_and_bad_input(tmp_path, capsys, digits_pack):
    assert parse_size("64MiB") == 64 * 2**20 and parse_size("1000") == 1000 and parse_size("2KiB") == 2048
    for bad in ("0", "-1", "12XB", "", "1.5MiB"):
        with pytest.raises(UserError, match="--shard-size"):
            parse_size(bad)
    assert all(map(is_packed_url, ("s3://b/ds", "file:///data/ds", "gs://b/x", "memory://x")))
    assert not any(map(is_packed_url, ("digits", "pkg.mod:attr", "/data/ds", "C:\\x")))
    broken = tmp_path / "broken" / "cls"
    broken.mkdir(parents=True)
    _image_folder(tmp_path / "pics")
    for i, image in enumerate(sorted((tmp_path / "pics" / "cat").iterdir())):
        data = image.read_bytes()
        (broken / f"{i}{image.suffix}").write_bytes(data[:len(data) // 2] if i == 4 else data)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    cases = [(["data", "pack", str(tmp_path / "missing"), "--out", str(tmp_path / "o1")], "is not a folder"),
             (["data", "pack", "digits", "--out", str(tmp_path / "o2"), "--shard-size", "lots"], "--shard-size"),
             (["data", "pack", "digits", "--out", str(digits_pack)], "already holds a packed data set"),
             (["data", "pack", "digits", "--out", str(tmp_path / "other")], "not empty and not a packed data set"),
             (["data", "pack", "digits", "--out", str(tmp_path / "o3"), "--val-fraction", "1.5"], "--val-fraction"),
             (["data", "pack", str(tmp_path / "broken"), "--out", str(tmp_path / "o4"), "--shard-size", "1KiB"],
              "cannot read image")]
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, message in cases:
        code, out, err = call_cli(argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]


def test_the_header_walk_finds_what_tarfile_finds_and_falls_back_for_pax():
    import io
    import tarfile

    from dist_train.data.packed import shards as sh

    builder = sh.ShardBuilder()
    for i in range(50):
        builder.add(f"{i:09d}", {"png": bytes([i]) * (i * 37 + 1), "cls": str(i % 10).encode()})
    data = builder.finish()
    assert sh.read_members(data) == sh._read_members_tarfile(data)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(3):  # a name over 100 characters needs a pax header
            info = tarfile.TarInfo("d" * 120 + f"/{i:05d}.cls")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"7"))
    data = buffer.getvalue()
    members = sh.read_members(data)
    assert len(members) == 3 and all(data[o:o + n] == b"7" for m in members for o, n in m.values())


def test_a_cold_s3_read_makes_only_the_gets_it_needs(digits_pack, s3_env, s3_bucket, monkeypatch):
    """Size and sha256 come from the manifest: per shard one GET (or its ranged GETs), no HEAD first."""
    import sys
    from collections import Counter

    sys.path.insert(0, str(REPO / "tests"))
    from support.fault_proxy import FaultProxy

    url = f"s3://{s3_bucket}/digits"
    pack(open_source("digits", PackOptions(seed=3)), url, parse_size("256KiB"))  # a few shards
    with FaultProxy(s3_env["AWS_ENDPOINT_URL"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        whole = open_packed(url).split("val")
        assert [whole[i][1] for i in range(len(whole))]  # every shard of the split, whole GETs
        monkeypatch.setattr(packed_dataset, "RANGE_PART", 65536)  # the same shards as ranged GETs
        ranged = open_packed(url).split("val")
        assert [ranged[i][1] for i in range(len(ranged))] == [whole[i][1] for i in range(len(whole))]
    shards = [path for method, path, _ in proxy.log if "/shards/" in path]
    per_shard = Counter((method, path.split("?")[0]) for method, path, _ in proxy.log if "/shards/" in path)
    sizes = [int(entry["size"]) for entry in whole.shards]
    assert shards and not [key for key in per_shard if key[0] != "GET"], f"not only GETs: {per_shard}"
    parts = sum(-(-size // 65536) for size in sizes)
    assert len(shards) == len(sizes) + parts, per_shard  # one GET per shard, then one per 4 KiB part
