"""Checkpoint bytes: safetensors + JSON skeletons round-trip, the model digest, manifest checks."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.serialization import FormatError, load_tensors, load_tree, tensor_file, tree_file
from dist_train.determinism import capture_rng_state


def file_bytes(tf) -> bytes:
    return b"".join(bytes(c) for c in tf.chunks(chunk_size=7))


def test_tensor_file_streams_valid_safetensors_of_every_dtype():
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).to(torch.bfloat16), "i64": torch.arange(6),
               "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
               "noncontig": torch.randn(4, 4).t()}
    tf = tensor_file(tensors, {"format": "pt"})
    data = file_bytes(tf)
    assert len(data) == tf.size
    back = load_tensors(data)
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value)
    import safetensors.torch
    assert torch.equal(safetensors.torch.load(data)["f32"], tensors["f32"])  # the standard reader agrees


def test_optimizer_and_rng_state_round_trip_without_pickle():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": [capture_rng_state()], "tuple": (1, "a", None), "inf": 1e300}
    back = load_tree(file_bytes(tree_file(state)))
    fresh = torch.optim.Adam(torch.nn.Linear(4, 3).parameters(), lr=0.5)
    fresh.load_state_dict(back["optimizer"])  # int keys of 'state' survive
    assert fresh.param_groups[0]["lr"] == 0.1
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert back["tuple"] == (1, "a", None)
    assert torch.equal(back["rng"][0]["torch"], state["rng"][0]["torch"])
    assert back["rng"][0]["python"]["state"] == state["rng"][0]["python"]["state"]


def test_a_pickle_is_not_a_checkpoint_file(tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"w": Boom()}, tmp_path / "evil.pt")
    with pytest.raises(FormatError):
        load_tensors((tmp_path / "evil.pt").read_bytes())
    with pytest.raises(FormatError):
        load_tree((tmp_path / "evil.pt").read_bytes())
    assert not (tmp_path / "pwned").exists()


def test_model_digest_is_equal_for_equal_weights_and_changes_with_one_element():
    a = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    b = copy.deepcopy(a)
    assert mf.model_digest(a.state_dict()) == mf.model_digest(b.state_dict())
    with torch.no_grad():
        b[0].weight[2, 3] += 1e-6
    assert mf.model_digest(a.state_dict()) != mf.model_digest(b.state_dict())
    # dtype and shape are part of it, not just bytes
    assert mf.model_digest({"x": torch.zeros(4)}) != mf.model_digest({"x": torch.zeros(2, 2)})
    assert mf.model_digest({"x": torch.zeros(2, dtype=torch.int32)}) != mf.model_digest({"x": torch.zeros(1, dtype=torch.int64)})


def _manifest(**over):
    m = {"format_version": 1, "step": 3, "epoch": 0, "world_size": 2, "created_at": mf.utc_now(),
         "model_digest": "a" * 64, "files": {"model.safetensors": {"size": 10, "sha256": "b" * 64}}}
    m.update(over)
    return json.dumps(m).encode()


@pytest.mark.parametrize("data, reason", [
    (b"{not json", "not valid JSON"),
    (b"[]", "not a JSON object"),
    (json.dumps({"step": 1}).encode(), "lacks"),
    (_manifest(files={"../escape": {"size": 1, "sha256": "b" * 64}}), "unsafe file name"),
    (_manifest(files={"/etc/passwd": {"size": 1, "sha256": "b" * 64}}), "unsafe file name"),
    (_manifest(files={"a/../../x": {"size": 1, "sha256": "b" * 64}}), "unsafe file name"),
    (_manifest(files={"model.safetensors": {"size": 2**60, "sha256": "b" * 64}}), "absurd"),
    (_manifest(files={"model.safetensors": {"size": -1, "sha256": "b" * 64}}), "absurd"),
    (_manifest(files={"model.safetensors": {"size": 1, "sha256": "xyz"}}), "sha256"),
    (_manifest(step=-4), "step"),
    (_manifest(format_version=99), "format_version"),
])
def test_manifests_that_are_not_trustworthy_are_refused(data, reason):
    with pytest.raises(mf.ManifestError, match=reason):
        mf.parse(data)
    assert mf.parse(_manifest())["step"] == 3
