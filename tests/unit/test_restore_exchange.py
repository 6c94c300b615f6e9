"""The exchange of a split restore: the pieces files cross the network in (their order: test_restore_plan.py),
and the in-place parse of what was received (the same tensors as the direct read, shared memory only where safe)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from dist_train.checkpoint.digest import CorruptCheckpoint
from dist_train.checkpoint.reader import OWN_COPY_BELOW, parse_file, parse_in_place, read_bytes
from dist_train.checkpoint.restore import PIECE, pieces
from dist_train.checkpoint.serialization import tensor_file
from dist_train.checkpoint.storage import Storage


@pytest.mark.parametrize("size", [0, 1, PIECE, PIECE + 1, 5 * PIECE + 3])
def test_pieces_cover_a_file_once_in_order(size):
    ranges = pieces(size)
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(end - begin <= PIECE for begin, end in ranges)


def _file(tensors: dict[str, torch.Tensor]) -> tuple[bytes, dict]:
    data = b"".join(bytes(chunk) for chunk in tensor_file(tensors, {"format": "pt"}).chunks())
    return data, {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_received_file_parses_in_place_to_the_direct_reads_tensors():
    big = torch.arange(OWN_COPY_BELOW // 4 + 7, dtype=torch.float32)
    tensors = {"big": big, "odd": torch.arange(3, dtype=torch.float32), "step": torch.tensor(5, dtype=torch.int64),
               "rng": torch.randint(0, 255, (5056,), dtype=torch.uint8), "flag": torch.tensor([True, False])}
    data, entry = _file(tensors)
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    loaded = parse_in_place(entry, "x.safetensors", buffer, tree=False).tensors
    direct = parse_file(entry, "x.safetensors", memoryview(data), tree=False).tensors
    assert set(loaded) == set(direct) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype, name
    shares = {name: loaded[name].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
              for name in loaded}
    # the large tensor is a view of the received buffer; the small ones (an RNG state, a step
    # counter) have their own memory, as torch.set_rng_state reads a storage from its start
    assert shares == {"big": True, "odd": False, "step": False, "rng": False, "flag": False}


def test_a_received_file_that_is_malformed_or_of_another_size_is_refused():
    data, entry = _file({"w": torch.ones(4)})
    with pytest.raises(CorruptCheckpoint, match="manifest says"):
        parse_in_place(entry, "x.safetensors", torch.frombuffer(bytearray(data + b"x"), dtype=torch.uint8), False)
    bad = bytearray(data)
    bad[8:9] = b"["  # the JSON header no longer parses
    with pytest.raises(CorruptCheckpoint, match="header"):
        parse_in_place(entry, "x.safetensors", torch.frombuffer(bad, dtype=torch.uint8), False)


def test_read_bytes_fills_the_given_memory_and_reports_progress_in_order(tmp_path):
    data, entry = _file({"w": torch.arange(3 * 2**20, dtype=torch.float32)})
    folder = Storage(str(tmp_path))
    folder.write_bytes("x.safetensors", data)
    into = torch.empty(len(data), dtype=torch.uint8)
    seen: list[int] = []
    read_bytes(folder, {"files": {"x.safetensors": entry}}, "x.safetensors", True, range_size=2**20,
               into=into.numpy(), progress=seen.append)
    assert bytes(into.numpy()) == data
    assert seen == sorted(seen) and seen[-1] == len(data) and len(seen) > 1
