"""Sharded checkpoints in one process: block choice, ownership, the index of either layout, the DCP
reader, loading through DCP, `convert`, the streamed digest. (Two-rank jobs: integration tier.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dist_train.checkpoint import catalog
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.convert import convert
from dist_train.checkpoint.dcp import CheckpointCorrupt, DistTrainReader, load_state
from dist_train.checkpoint.index import build_index, iter_full
from dist_train.checkpoint.serialization import tensor_file, tree_file
from dist_train.checkpoint.sharded import ShardedSaver, assign_owners, collect_state, take_share
from dist_train.checkpoint.storage import Storage
from dist_train.checkpoint.writer import CheckpointWriter
from dist_train.distributed import parallel
from dist_train.distributed.env import DistEnv
from dist_train.errors import UserError

ONE = DistEnv(0, 1, 0, torch.device("cpu"), None)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 10)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(10, 10), nn.ReLU()) for _ in range(2)])
        self.bn = nn.BatchNorm1d(10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.bn(x))


def trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(2):
        model(torch.randn(8, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def full(model, optimizer) -> dict[str, torch.Tensor]:
    from dist_train.checkpoint.sharded import flat_state

    state, _ = collect_state(model, optimizer)
    return {k: v.detach().clone() for k, v in flat_state(state).items() if isinstance(v, torch.Tensor)}


# -- which modules FSDP shards as blocks ------------------------------------------------------------

def test_blocks_of_the_tutorial_cnn_resnet_and_a_transformer():
    from torchvision.models import resnet18

    from dist_train.models.small import SmallCNN

    meta = torch.device("meta")  # structure only: no time spent initializing weights
    with meta:
        cnn = SmallCNN(1, 10, 8)
        resnet = resnet18(weights=None)
    assert [type(b).__name__ for b in parallel.shard_blocks(cnn)] == ["Conv2d", "Conv2d", "Linear", "Linear"]
    assert [type(b).__name__ for b in parallel.shard_blocks(resnet)] == ["BasicBlock"] * 8  # downsample stays inside

    class Transformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(4096, 256)  # 1M parameters: a block of its own
            self.layers = nn.ModuleList([nn.TransformerEncoderLayer(256, 4, 512) for _ in range(3)])
            self.norm = nn.LayerNorm(256)

    with meta:
        transformer = Transformer()
    blocks = parallel.shard_blocks(transformer)
    assert [type(b).__name__ for b in blocks] == ["Embedding"] + ["TransformerEncoderLayer"] * 3
    root = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    assert parallel.shard_blocks(root) == [root[0], root[2]]


def test_apply_parallelism_is_the_model_itself_in_one_process():
    model = Net()
    assert parallel.apply_parallelism(model, ONE, "fsdp") is model
    with pytest.raises(ValueError):
        parallel.apply_parallelism(model, ONE, "tp")


def test_digest_and_clip_match_their_plain_definitions():
    model, _ = trained()
    assert parallel.model_digest(model) == mf.model_digest(model.state_dict())
    model(torch.randn(4, 6)).sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    params = list(model.parameters())
    norm = parallel.clip_grad_norm(params, 0.1)
    expected = torch.nn.utils.get_total_norm(reference)
    assert norm == pytest.approx(float(expected))
    torch.nn.utils.clip_grads_with_norm_([nn.Parameter(torch.empty(0))], 0.1, expected)  # API present
    assert all(torch.allclose(p.grad, g * min(1.0, 0.1 / (float(expected) + 1e-6))) for p, g in zip(params, reference))


# -- who writes what -------------------------------------------------------------------------------

def test_owners_are_balanced_deterministic_and_buffers_stay_on_rank0():
    sizes = {f"t{i}": s for i, s in enumerate([100, 90, 50, 40, 30, 10, 10])}
    sizes["model.bn.running_mean"] = 5
    owners = assign_owners(sizes, 2, pinned={"model.bn.running_mean"})
    assert owners == assign_owners(dict(reversed(sizes.items())), 2, pinned={"model.bn.running_mean"})
    assert owners["model.bn.running_mean"] == 0
    load = [sum(sizes[k] for k, r in owners.items() if r == rank) for rank in (0, 1)]
    assert abs(load[0] - load[1]) <= 10


def test_rank0_writes_less_by_the_model_digest_it_hashes():
    sizes = {f"t{i}": 10 for i in range(20)}
    owners = assign_owners(sizes, 2, rank0_load=60)
    load = [sum(sizes[k] for k, r in owners.items() if r == rank) for rank in (0, 1)]
    assert load == [70, 130]  # 60 + 70 against 130
    model, optimizer = trained()
    state, pinned = collect_state(model, optimizer)
    written = [sum(p.tensor.nbytes for ps in take_share(state, rank, 2, 1, pinned).pieces.values() for p in ps)
               for rank in (0, 1)]
    assert written[0] < written[1]


def test_the_ranks_shares_of_a_replicated_state_are_disjoint_and_complete():
    model, optimizer = trained()
    state, pinned = collect_state(model, optimizer)
    shares = [take_share(state, rank, 2, 1, pinned) for rank in (0, 1)]
    held = [{(e, p.key) for e, ps in s.pieces.items() for p in ps} for s in shares]
    assert not held[0] & held[1]
    assert {f"{e}.{k}" for e, k in held[0] | held[1]} == set(full(model, optimizer))
    assert ("model", "bn.running_mean") in held[0] and ("model", "bn.num_batches_tracked") in held[0]
    assert min(s.nbytes for s in shares) > 0
    assert shares[0].objects and not shares[1].objects  # param-group settings: rank 0's file only


# -- saving and loading in one process -------------------------------------------------------------

def writer_for(path) -> CheckpointWriter:
    storage = Storage(str(path))
    storage.makedirs("")
    return CheckpointWriter(storage, 1, "test-writer", None)


def test_sharded_save_commits_a_valid_checkpoint_that_loads_back(tmp_path):
    model, optimizer = trained()
    saver = ShardedSaver(ONE, writer_for(tmp_path))
    state, pinned = collect_state(model, optimizer)
    committed = saver.commit(saver.snapshot(3, state, pinned, copy=True), {"epoch": 0, "world_size": 1},
                             {"trainer.safetensors": tree_file({"progress": {"step": 3}})})
    assert committed.manifest["model_digest"] == mf.model_digest(model.state_dict())
    assert committed.manifest["sharded"]["entries"] == ["model", "optimizer"]
    from dist_train.checkpoint.index import read_full_model

    whole = read_full_model(Storage(committed.url), committed.manifest)
    assert mf.model_digest(whole) == committed.manifest["model_digest"]
    assert catalog.inspect(Storage(str(tmp_path)), catalog.parse_name(committed.name)).valid
    fresh, fresh_optimizer = trained(seed=5)
    folder = Storage(committed.url)
    load_state(ONE, folder, committed.manifest, fresh, fresh_optimizer)
    assert full(fresh, fresh_optimizer).keys() == full(model, optimizer).keys()
    got, expected = full(fresh, fresh_optimizer), full(model, optimizer)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert fresh_optimizer.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"]


@pytest.fixture
def rank0_checkpoint(tmp_path):
    """Today's layout: rank 0's whole files, optimizer keyed by parameter ids."""
    model, optimizer = trained()
    writer = writer_for(tmp_path / "run")
    committed = writer.commit(4, {"model.safetensors": tensor_file(model.state_dict(), {"format": "pt"}),
                                  "optimizer.safetensors": tree_file(optimizer.state_dict())},
                              {"epoch": 0, "world_size": 1, "model_digest": mf.model_digest(model.state_dict())})
    return committed, model, optimizer


def test_index_and_reader_of_a_rank0_checkpoint(rank0_checkpoint):
    committed, model, optimizer = rank0_checkpoint
    folder = Storage(committed.url)
    names = [n for n, _ in model.named_parameters()]
    index = build_index(folder, committed.manifest, param_names=names)
    assert dict(iter_full(index)).keys() == model.state_dict().keys()
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in iter_full(index))
    assert f"optimizer.state.{names[0]}.exp_avg" in index.tensors
    assert index.objects["optimizer.param_groups.0.params"] == names

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    other, _ = trained(seed=9)
    state = {"model": get_model_state_dict(other)}
    with pytest.warns(UserWarning):  # one process, no process group
        dcp.load(state, storage_reader=DistTrainReader(committed.url))
    assert mf.model_digest(other.state_dict()) == committed.manifest["model_digest"]


def test_load_state_maps_a_rank0_optimizer_by_parameter_names(rank0_checkpoint):
    committed, model, optimizer = rank0_checkpoint
    fresh, fresh_optimizer = trained(seed=3)
    load_state(ONE, Storage(committed.url), committed.manifest, fresh, fresh_optimizer)
    expected, got = full(model, optimizer), full(fresh, fresh_optimizer)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_checkpoint_of_another_model_is_refused_in_one_line(rank0_checkpoint):
    committed, _, _ = rank0_checkpoint
    other = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(UserError, match="does not fit the model"):
        load_state(ONE, Storage(committed.url), committed.manifest, other, None)


def test_convert_streams_the_full_model_and_checks_the_digest(rank0_checkpoint, tmp_path):
    committed, model, _ = rank0_checkpoint
    out = tmp_path / "out" / "model.safetensors"
    done = convert(committed.url, str(out))
    assert done.model_digest == committed.manifest["model_digest"]
    back = load_file(str(out))
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no partial file left


def test_a_corrupt_file_is_found_before_anything_loads(rank0_checkpoint, tmp_path):
    committed, model, optimizer = rank0_checkpoint
    path = f"{committed.url}/optimizer.safetensors"
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))
    fresh, fresh_optimizer = trained(seed=3)
    before = full(fresh, fresh_optimizer)
    with pytest.raises(CheckpointCorrupt, match="optimizer.safetensors does not match its sha256"):
        load_state(ONE, Storage(committed.url), committed.manifest, fresh, fresh_optimizer)
    assert all(torch.equal(before[k], v) for k, v in full(fresh, fresh_optimizer).items())
    reader = DistTrainReader(committed.url)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.warns(UserWarning), pytest.raises(CheckpointException, match="sha256"):
        dcp.load({"optimizer": {"state": {"0": {"exp_avg": torch.zeros(10, 6)}}}}, storage_reader=reader)
    json.loads(open(f"{committed.url}/manifest.json").read())  # untouched


@pytest.mark.parametrize("dim", [0, 1])
def test_the_streamed_digest_of_pieces_equals_the_digest_of_the_whole(dim, tmp_path):
    from dist_train.checkpoint.sharded import Piece, ShardSnapshot, _digest_plan

    whole = {"w": torch.randn(5, 4), "b": torch.randn(3)}
    pieces = [Piece("b", whole["b"], (0,), (3,), sharded=True)]
    for start, length in ((0, 2), (2, whole["w"].shape[dim] - 2)):  # rows (streamed) or columns (assembled)
        offsets = (start, 0) if dim == 0 else (0, start)
        part = whole["w"].narrow(dim, start, length).contiguous()
        pieces.append(Piece("w", part, offsets, (5, 4), sharded=True))
    snap = ShardSnapshot(1, 0, 1, {"model": pieces})
    saver = ShardedSaver(ONE, writer_for(tmp_path))
    plan = _digest_plan([snap.model_layout()], snap.model_replicas)
    assert saver._stream_digest(snap, plan) == mf.model_digest(whole)
