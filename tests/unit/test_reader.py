"""The verified checkpoint reader: round trips, damaged and hostile files, every dtype, S3 ranges.

Files are written by the real writer side (`tensor_file` / `tree_file`) through a real
`Storage` (a tmp_path folder, or a bucket on the moto server) and read back by
`dist_train.checkpoint.reader`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct

import pytest
import torch

from dist_train.checkpoint import reader
from dist_train.checkpoint.reader import CorruptCheckpoint, read_bytes, read_files
from dist_train.checkpoint.serialization import FormatError, load_tensors, load_tree, tensor_file, tree_file
from dist_train.checkpoint.storage import Storage

MODEL, OPTIMIZER, TRAINER = "model.safetensors", "optimizer.safetensors", "trainer.safetensors"
TREES = {OPTIMIZER, TRAINER}


def blob(tf) -> bytes:
    return b"".join(bytes(c) for c in tf.chunks())


def put(storage: Storage, files: dict[str, bytes]) -> dict:
    """Write raw files and return a manifest that lists them truthfully."""
    manifest: dict = {"files": {}}
    for name, data in files.items():
        storage.write(name, [data], len(data))
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return manifest


def trained(steps: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def checkpoint_files(model, opt) -> dict[str, bytes]:
    trainer = {"progress": {"step": 7, "epoch": 1}, "rng": [{"torch": torch.get_rng_state(), "python": [1, 2]}],
               "best": None, "tuple": (1.5, "x")}
    return {MODEL: blob(tensor_file(model.state_dict(), {"format": "pt"})), OPTIMIZER: blob(tree_file(opt.state_dict())),
            TRAINER: blob(tree_file(trainer))}


@pytest.fixture
def folder(tmp_path) -> Storage:
    storage = Storage(str(tmp_path / "ckpt"))
    storage.makedirs("")
    return storage


def test_round_trip_of_model_optimizer_and_trainer_state(folder):
    model, opt = trained()
    manifest = put(folder, checkpoint_files(model, opt))
    files = read_files(folder, manifest, [MODEL, OPTIMIZER, TRAINER], trees=TREES)
    for key, value in model.state_dict().items():
        assert torch.equal(files[MODEL].tensors[key], value) and files[MODEL].tensors[key].dtype == value.dtype
    assert files[MODEL].metadata == {"format": "pt"} and files[MODEL].tree is None
    state = files[OPTIMIZER].tree
    assert state["param_groups"][0]["lr"] == 0.01
    for index, moments in opt.state_dict()["state"].items():
        for key, value in moments.items():
            assert torch.equal(state["state"][index][key], value)
    trainer = files[TRAINER].tree
    assert trainer["progress"] == {"step": 7, "epoch": 1} and trainer["tuple"] == (1.5, "x")
    assert torch.equal(trainer["rng"][0]["torch"], torch.get_rng_state())
    assert read_bytes(folder, manifest, OPTIMIZER) == folder.read(OPTIMIZER)


def test_state_read_file_and_read_payload_delegate_to_the_reader(folder):
    from dist_train.checkpoint import state

    model, opt = trained()
    manifest = put(folder, checkpoint_files(model, opt))
    assert bytes(state.read_file(folder, manifest, MODEL, True)) == folder.read(MODEL)
    payload = state.read_payload(folder, manifest, model_only=True)
    assert all(torch.equal(payload.model[k], v) for k, v in model.state_dict().items())
    assert state.CorruptCheckpoint is CorruptCheckpoint


@pytest.mark.parametrize("range_size, concurrency", [(7, 3), (64, 1), (1000, 8)])
def test_ranges_that_cut_through_tensors_and_the_header(folder, monkeypatch, range_size, concurrency):
    monkeypatch.setattr(reader, "HEADER_PROBE", 16)  # the header needs a second read
    model, opt = trained()
    manifest = put(folder, checkpoint_files(model, opt))
    files = read_files(folder, manifest, [MODEL, OPTIMIZER], trees={OPTIMIZER}, range_size=range_size,
                       concurrency=concurrency)
    assert all(torch.equal(files[MODEL].tensors[k], v) for k, v in model.state_dict().items())
    assert torch.equal(files[OPTIMIZER].tree["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_every_dtype_scalars_empty_and_unaligned_tensors(folder):
    tensors = {"a_bf16_odd": torch.randn(3).to(torch.bfloat16),  # 6 bytes: what follows is unaligned in the file
               "b_f64": torch.randn(2, 3, dtype=torch.float64), "c_f32": torch.randn(5), "d_f16": torch.randn(3).half(),
               "e_i64": torch.arange(-3, 4), "f_i32": torch.arange(5, dtype=torch.int32),
               "g_i16": torch.arange(3, dtype=torch.int16), "h_i8": torch.tensor([-1, 2], dtype=torch.int8),
               "i_u8": torch.tensor([255, 0, 7], dtype=torch.uint8), "j_bool": torch.tensor([True, False, True]),
               "k_scalar": torch.tensor(2.5, dtype=torch.float64), "l_empty": torch.zeros(0, 4),
               "m_empty_i64": torch.zeros(3, 0, dtype=torch.int64), "n_noncontig": torch.randn(4, 3).t()}
    for name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
        if hasattr(torch, name):
            tensors[f"o_{name}"] = torch.ones(3).to(getattr(torch, name))
    data = blob(tensor_file(tensors))
    assert json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])["b_f64"]["data_offsets"][0] % 8 != 0
    manifest = put(folder, {MODEL: data})
    for back in (read_files(folder, manifest, [MODEL])[MODEL].tensors, load_tensors(data)):
        assert set(back) == set(tensors)
        for key, value in tensors.items():
            got = back[key]
            assert got.dtype == value.dtype and got.shape == value.shape, key
            assert torch.equal(got.reshape(-1).view(torch.uint8), value.contiguous().reshape(-1).view(torch.uint8)), key
            assert got.data_ptr() % max(1, got.element_size()) == 0, key
    back = read_files(folder, manifest, [MODEL])[MODEL].tensors
    assert back["b_f64"].is_contiguous()


def test_tensors_are_writable_and_independent(folder):
    model, opt = trained()
    manifest = put(folder, checkpoint_files(model, opt))
    state = read_files(folder, manifest, [OPTIMIZER], trees=TREES)[OPTIMIZER].tree["state"]
    moments = [t for s in state.values() for t in s.values()]
    storages = {t.untyped_storage().data_ptr() for t in moments}
    assert len(storages) == len(moments)  # one allocation each: nothing aliases anything
    before = [t.clone() for t in moments]
    moments[0].add_(1.0)
    assert all(torch.equal(t, b) for t, b in zip(moments[1:], before[1:]))


def test_training_after_resume_matches_training_on(folder):
    """Optimizer.load_state_dict keeps state tensors it does not need to cast: they must be safe to update."""
    model, opt = trained(steps=3)
    manifest = put(folder, checkpoint_files(model, opt))
    reference_model, reference_opt = copy.deepcopy(model), None
    reference_opt = torch.optim.Adam(reference_model.parameters(), lr=0.01)
    reference_opt.load_state_dict(copy.deepcopy(opt.state_dict()))

    files = read_files(folder, manifest, [MODEL, OPTIMIZER], trees=TREES)
    resumed = trained(steps=0, seed=1)[0]
    resumed.load_state_dict(files[MODEL].tensors)
    resumed_opt = torch.optim.Adam(resumed.parameters(), lr=0.5)
    resumed_opt.load_state_dict(files[OPTIMIZER].tree)
    kept = resumed_opt.state[resumed_opt.param_groups[0]["params"][0]]["exp_avg"]
    assert kept.data_ptr() == files[OPTIMIZER].tree["state"][0]["exp_avg"].data_ptr()  # not copied: ours
    generator = torch.Generator().manual_seed(5)
    for _ in range(4):
        batch = torch.randn(4, 6, generator=generator)
        for m, o in ((reference_model, reference_opt), (resumed, resumed_opt)):
            m(batch).pow(2).sum().backward()
            o.step()
            o.zero_grad()
    for (key, a), b in zip(reference_model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    for index, moments in reference_opt.state_dict()["state"].items():
        for key, value in moments.items():
            assert torch.equal(resumed_opt.state_dict()["state"][index][key], value), (index, key)


def test_damaged_files_are_reported_like_before(folder):
    model, opt = trained()
    files = checkpoint_files(model, opt)
    manifest = put(folder, files)
    names = [MODEL, OPTIMIZER, TRAINER]

    data = bytearray(files[OPTIMIZER])
    data[-5] ^= 0xFF  # a flipped byte in a tensor
    folder.write(OPTIMIZER, [bytes(data)], len(data))
    with pytest.raises(CorruptCheckpoint, match=f"^file {OPTIMIZER} does not match its sha256 \\(corrupted\\)$"):
        read_files(folder, manifest, names, trees=TREES)
    read_files(folder, manifest, names, verify_sha=False, trees=TREES)  # size-only verification loads it

    header = bytearray(files[MODEL])
    header[12] ^= 0x20  # a flipped byte in the JSON header: damaged, not "malformed"
    folder.write(MODEL, [bytes(header)], len(header))
    with pytest.raises(CorruptCheckpoint, match=f"^file {MODEL} does not match its sha256"):
        read_files(folder, manifest, names, trees=TREES)  # and the model's problem is named first
    folder.write(MODEL, [files[MODEL]], len(files[MODEL]))

    folder.write(TRAINER, [files[TRAINER][:50]], 50)
    size = len(files[TRAINER])
    with pytest.raises(CorruptCheckpoint, match=f"^file {TRAINER} is 50 bytes, manifest says {size}$"):
        read_files(folder, manifest, [MODEL, TRAINER], trees=TREES)
    folder.delete(TRAINER)
    with pytest.raises(CorruptCheckpoint, match=f"^file {TRAINER} is missing$"):
        read_files(folder, manifest, [TRAINER], trees=TREES)
    with pytest.raises(CorruptCheckpoint, match="manifest does not list extra.safetensors"):
        read_files(folder, manifest, [MODEL, "extra.safetensors"])


def _file(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


def _t(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE = {
    "offsets past the end": _file({"w": _t(shape=[4], offsets=[0, 16])}, b"\0" * 8),
    "end before start": _file({"w": _t(shape=[0], offsets=[8, 0])}, b"\0" * 8),
    "overlapping": _file({"a": _t(), "b": _t(offsets=[4, 12])}, b"\0" * 12),
    "gap": _file({"a": _t(), "b": _t(offsets=[12, 20])}, b"\0" * 20),
    "trailing bytes": _file({"a": _t()}, b"\0" * 12),
    "huge header length": _file({"a": _t()}, b"\0" * 8, length=2**63),
    "header longer than file": _file({"a": _t()}, b"\0" * 8, length=10_000),
    "zero header length": struct.pack("<Q", 0) + b"\0" * 8,
    "negative shape": _file({"w": _t(shape=[-2, -1], offsets=[0, 8])}, b"\0" * 8),
    "odd shape": _file({"w": _t(shape=[3], offsets=[0, 8])}, b"\0" * 8),
    "huge shape": _file({"w": _t(shape=[2**40, 2**40], offsets=[0, 8])}, b"\0" * 8),
    "float shape": _file({"w": _t(shape=[2.0], offsets=[0, 8])}, b"\0" * 8),
    "bool shape": _file({"w": _t(shape=[True, True], offsets=[0, 8])}, b"\0" * 8),
    "too many dims": _file({"w": _t(shape=[1] * 65 + [2], offsets=[0, 8])}, b"\0" * 8),
    "unknown dtype": _file({"w": _t(dtype="F128")}, b"\0" * 8),
    "dtype not a string": _file({"w": _t(dtype=["F32"])}, b"\0" * 8),
    "missing offsets": _file({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
    "entry not an object": _file({"w": [1, 2]}, b"\0" * 8),
    "metadata not strings": _file({"__metadata__": {"dist_train.skeleton": [1]}, "w": _t()}, b"\0" * 8),
    "not utf-8": _file(b'{"\xff": 1}'),
    "utf-16 json": _file('{"w": 1}'.encode("utf-16")),
    "deep nesting": _file(b"[" * 100_000 + b"]" * 100_000),
    "bool byte 2": _file({"w": _t(dtype="BOOL", shape=[2], offsets=[0, 2])}, b"\x01\x02"),
    "a pickle": b"PK\x03\x04" + b"\0" * 60,
    "empty": b"",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_headers_are_format_errors(folder, name):
    data = HOSTILE[name]
    with pytest.raises(FormatError):
        load_tensors(data)
    manifest = put(folder, {MODEL: data})  # the manifest vouches for the bytes: only the parser stands
    with pytest.raises(CorruptCheckpoint) as caught:
        read_files(folder, manifest, [MODEL])
    assert "sha256" not in str(caught.value) and "bytes, manifest says" not in str(caught.value)


def test_hostile_skeletons_are_format_errors(folder):
    deep = "[" * 50_000 + "]" * 50_000
    for skeleton in (deep, '{"__tensor__": "t9"}', '{"__dict__": [[[1], 2]]}', '{"__dict__": 5}', '{"x": 1}', "nope"):
        data = blob(tensor_file({"t0": torch.ones(2)}, {"dist_train.skeleton": skeleton}))
        with pytest.raises(FormatError):
            load_tree(data)
        manifest = put(folder, {OPTIMIZER: data})
        with pytest.raises(CorruptCheckpoint):
            read_files(folder, manifest, [OPTIMIZER], trees=TREES)


def test_s3_ranged_reads_of_a_file_larger_than_the_range(s3_bucket, monkeypatch):
    folder = Storage(f"s3://{s3_bucket}/run/ckpt")
    model = {"w": torch.randn(64, 1024), "b": torch.arange(1000), "flag": torch.tensor([True, False])}
    opt = {"state": {0: {"exp_avg": torch.randn(300, 100), "step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]}
    files = {MODEL: blob(tensor_file(model, {"format": "pt"})), OPTIMIZER: blob(tree_file(opt))}
    manifest = put(folder, files)
    ranges: list[tuple[str, int, int]] = []
    real = folder.read_range

    def counted(rel, start, end):
        ranges.append((rel, start, end))
        return real(rel, start, end)
    monkeypatch.setattr(folder, "read_range", counted)

    got = read_files(folder, manifest, [MODEL, OPTIMIZER], trees=TREES, range_size=32 * 1024, concurrency=4)
    assert all(torch.equal(got[MODEL].tensors[k], v) for k, v in model.items())
    assert torch.equal(got[OPTIMIZER].tree["state"][0]["exp_avg"], opt["state"][0]["exp_avg"])
    model_ranges = sorted((s, e) for rel, s, e in ranges if rel == MODEL)
    assert len(model_ranges) >= len(files[MODEL]) // (32 * 1024)
    assert all(e - s <= max(32 * 1024, reader.HEADER_PROBE) for s, e in model_ranges)
    assert read_bytes(folder, manifest, MODEL, range_size=50_000) == files[MODEL]

    damaged = bytearray(files[MODEL])
    damaged[len(damaged) // 2] ^= 1
    folder.write(MODEL, [bytes(damaged)], len(damaged))
    with pytest.raises(CorruptCheckpoint, match=f"^file {MODEL} does not match its sha256"):
        read_files(folder, manifest, [MODEL], range_size=32 * 1024)
    folder.write(MODEL, [bytes(damaged[:1000])], 1000)
    with pytest.raises(CorruptCheckpoint, match=f"is 1000 bytes, manifest says {len(files[MODEL])}"):
        read_files(folder, manifest, [MODEL])
    folder.delete(MODEL)
    with pytest.raises(CorruptCheckpoint, match=f"^file {MODEL} is missing$"):
        read_files(folder, manifest, [MODEL, OPTIMIZER], trees=TREES)
