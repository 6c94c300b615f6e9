"""Chunk digests of checkpoint files and the one model digest.

Files are written by the real writer (`CheckpointWriter`, through a tmp_path `Storage`) and read
back by the real reader; an old-format manifest (no chunk digests, as earlier versions wrote) must
keep loading and verifying, and `model_digest` must keep the contract's value.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from dist_train.checkpoint import catalog, digest
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.fencing import AttemptRegistry
from dist_train.checkpoint.reader import CorruptCheckpoint, read_bytes, read_files
from dist_train.checkpoint.serialization import _raw_bytes, tensor_file
from dist_train.checkpoint.storage import Storage
from dist_train.checkpoint.writer import CheckpointWriter

CHUNK = digest.CHUNK_SIZE


def contract_digest(state: dict[str, torch.Tensor]) -> str:
    """The contract's definition written out independently: key, dtype, shape-as-JSON, raw bytes, sorted."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        h.update(key.encode() + b"\0" + str(t.dtype).encode() + b"\0" + json.dumps(list(t.shape)).encode() + b"\0")
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def test_model_digest_keeps_the_contract_value_everywhere():
    from dist_train.distributed.parallel import model_digest as parallel_digest

    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.BatchNorm1d(5))
    state = model.state_dict()
    assert mf.model_digest(state) == digest.model_digest(state) == contract_digest(state) == parallel_digest(model)
    streamed = digest.ModelDigest()
    for key in sorted(state):
        streamed.begin(key, state[key].dtype, state[key].shape)
        raw = _raw_bytes(state[key])
        streamed.update(raw[:3])
        streamed.update(raw[3:])  # row blocks fed separately (the sharded writer's way)
    assert streamed.hexdigest() == contract_digest(state)


def commit(storage: Storage, tensors: dict[str, torch.Tensor]):
    writer = CheckpointWriter(storage, 1, "w", AttemptRegistry(storage))
    fields = {"epoch": 0, "world_size": 1, "model_digest": digest.model_digest(tensors)}
    return writer.commit(1, {"model.safetensors": tensor_file(tensors)}, fields)


def test_writer_records_chunk_digests_and_ranges_verify_on_their_own(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    storage.makedirs("")
    tensors = {"w": torch.randn(CHUNK // 2 + 123)}  # float32: 3 chunks, the last one short
    done = commit(storage, tensors)
    entry = done.manifest["files"]["model.safetensors"]
    folder = storage.child(done.name)
    data = folder.read("model.safetensors")
    assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()  # contract kept
    ranges = digest.chunk_ranges(entry)
    assert len(ranges) == 3 and sum(length for _, length in ranges) == len(data)
    assert entry["chunk_sha256"] == [hashlib.sha256(data[o:o + n]).hexdigest() for o, n in ranges]
    digest.verify_bytes(entry, data)
    offset, length = ranges[1]
    digest.verify_bytes(entry, memoryview(data)[offset:], offset=offset)  # a rank's tail share on its own
    digest.verify_bytes(entry, data[offset:offset + length], offset=offset)
    damaged = bytearray(data[offset:offset + length])
    damaged[7] ^= 1
    with pytest.raises(CorruptCheckpoint, match="model.safetensors"):
        digest.verify_bytes(entry, damaged, offset=offset, name="model.safetensors")
    with pytest.raises(ValueError, match="aligned"):
        digest.verify_bytes(entry, data[1:], offset=1)

    loaded = read_files(folder, done.manifest, ["model.safetensors"])["model.safetensors"]
    assert torch.equal(loaded.tensors["w"], tensors["w"])
    assert catalog.newest_valid(storage).ref.name == done.name

    # one flipped byte in the middle chunk of the file on disk: the reader, read_bytes and ckpt's check see it
    path = tmp_path / "run" / done.name / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[offset + 100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match="does not match its sha256"):
        read_files(folder, done.manifest, ["model.safetensors"])
    with pytest.raises(CorruptCheckpoint):
        read_bytes(folder, done.manifest, "model.safetensors")
    verdict = catalog.inspect(storage, catalog.parse_name(done.name), "sha256")
    assert not verdict.valid and "model.safetensors does not match its sha256" in verdict.reason


def test_an_old_manifest_without_chunk_digests_still_loads_and_verifies(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    storage.makedirs("")
    tensors = {"w": torch.randn(CHUNK // 8)}
    done = commit(storage, tensors)
    old = json.loads(json.dumps(done.manifest))
    for entry in old["files"].values():  # as versions before chunk digests wrote it
        del entry["chunk_size"], entry["chunk_sha256"]
    folder = storage.child(done.name)
    folder.write_bytes(mf.MANIFEST, mf.encode(old))
    manifest = catalog.read_manifest(folder)
    entry = manifest["files"]["model.safetensors"]
    assert digest.chunk_ranges(entry) == [(0, entry["size"])]
    assert torch.equal(read_files(folder, manifest, ["model.safetensors"])["model.safetensors"].tensors["w"],
                       tensors["w"])
    assert catalog.inspect(storage, catalog.parse_name(done.name), "sha256").valid
    data = folder.read("model.safetensors")
    digest.verify_bytes(entry, data)
    path = tmp_path / "run" / done.name / "model.safetensors"
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CorruptCheckpoint):
        read_files(folder, manifest, ["model.safetensors"])
    assert not catalog.inspect(storage, catalog.parse_name(done.name), "sha256").valid


def test_malformed_chunk_fields_are_refused_by_the_manifest_parser(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    storage.makedirs("")
    done = commit(storage, {"w": torch.randn(1000)})
    bad = json.loads(json.dumps(done.manifest))
    bad["files"]["model.safetensors"]["chunk_sha256"].append("0" * 64)
    with pytest.raises(mf.ManifestError, match="chunk_sha256"):
        mf.parse(mf.encode(bad))
