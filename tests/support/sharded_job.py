"""A tiny sharded-checkpoint job for tests/integration/test_sharded_checkpoints.py, run under torchrun
(or as one plain process). Each mode prints one JSON line `RESULT {...}` on rank 0.

    save      --parallelism ddp|fsdp --run-dir URL --out DIR [--writers all|rank0] [--fault-rank R]
              train 2 steps, save; with --fault-rank the first save fails on rank R (a storage hook),
              then a second save must succeed. Writes the full state (reference) to DIR/reference.safetensors.
    load      --parallelism ddp|fsdp --ckpt URL --out DIR
              build a fresh model, load the checkpoint, compare with DIR/reference.safetensors.
    dcp-load  --ckpt URL --out DIR     a torchtitan-style program: plain `dcp.load` with DistTrainReader.
    memory    --run-dir URL            peak memory of an FSDP save (copies + commit) against the state size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from dist_train.checkpoint.fencing import AttemptRegistry, new_writer_id  # noqa: E402
from dist_train.checkpoint.serialization import tensor_file, tree_file  # noqa: E402
from dist_train.checkpoint.storage import Storage  # noqa: E402
from dist_train.checkpoint.writer import CheckpointWriter  # noqa: E402
from dist_train.distributed import parallel  # noqa: E402
from dist_train.distributed.env import init_distributed, teardown  # noqa: E402


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim + 1)
        self.down = nn.Linear(2 * dim + 1, dim)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Tiny(nn.Module):
    """A transformer-ish stack: a ModuleList of blocks, a BatchNorm (buffers), odd sizes (uneven shards)."""

    def __init__(self, dim: int = 12, depth: int = 3, classes: int = 5):
        super().__init__()
        self.embed = nn.Linear(7, dim)
        self.blocks = nn.ModuleList([Block(dim) for _ in range(depth)])
        self.bn = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.bn(x))


def build(env, parallelism: str, seed: int, dim: int = 12, depth: int = 3):
    torch.manual_seed(seed)
    model = Tiny(dim, depth)
    wrapped = parallel.apply_parallelism(model, env, parallelism)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    return model, wrapped, optimizer


def train(env, wrapped, optimizer, steps: int = 2) -> None:
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 * step + env.rank)
        x = torch.randn(8, 7, generator=gen)
        y = torch.randint(0, 5, (8,), generator=gen)
        for micro in range(2):
            with parallel.grad_sync(wrapped, enabled=micro == 1):
                loss = nn.functional.cross_entropy(wrapped(x[micro * 4:(micro + 1) * 4]), y[micro * 4:(micro + 1) * 4])
                loss.backward()
        parallel.clip_grad_norm(wrapped.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def full_state(model, optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of model and optimizer, whole, under DCP flat keys (collective; on every rank)."""
    from torch.distributed.tensor import DTensor

    from dist_train.checkpoint.sharded import collect_state, flat_state

    state, _ = collect_state(model, optimizer)
    out = {}
    for key, value in sorted(flat_state(state).items()):
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if isinstance(value, torch.Tensor):
            out[key] = value.detach().cpu().clone()
    return out


def make_writer(env, run_dir: str) -> CheckpointWriter:
    storage = Storage(run_dir)
    registry = None
    generation = 0
    if env.is_rank0:
        storage.makedirs("")
        registry = AttemptRegistry(storage)
        generation = registry.register(new_writer_id(), None)
    generation = env.broadcast_object(generation)
    return CheckpointWriter(storage, generation, new_writer_id(), registry)


def fields(env, model) -> dict:
    return {"epoch": 0, "world_size": env.world_size}


def report(env, **values) -> None:
    if env.is_rank0:
        print("RESULT " + json.dumps(values), flush=True)


def mode_save(env, args) -> None:
    from safetensors.torch import save_file

    from dist_train.checkpoint.manifest import model_digest
    from dist_train.checkpoint.sharded import ShardedSaver, collect_state

    model, wrapped, optimizer = build(env, args.parallelism, seed=0)
    train(env, wrapped, optimizer)
    digest = parallel.model_digest(model)
    reference = full_state(model, optimizer)
    if env.is_rank0:
        os.makedirs(args.out, exist_ok=True)
        save_file(reference, os.path.join(args.out, "reference.safetensors"))
    writer = make_writer(env, args.run_dir)
    trainer_state = {"progress": {"step": 2}, "rng": [1, 2]}
    if args.writers == "rank0":  # today's layout: rank 0 writes whole files (DDP only)
        committed = None
        if env.is_rank0:
            raw = parallel.unwrap(model).state_dict()
            files = {"model.safetensors": tensor_file(raw, {"format": "pt"}),
                     "optimizer.safetensors": tree_file(optimizer.state_dict()),
                     "trainer.safetensors": tree_file(trainer_state)}
            committed = writer.commit(2, files, dict(fields(env, model), model_digest=model_digest(raw)))
        committed = env.broadcast_object(committed)
        report(env, url=committed.url, digest=digest, manifest_digest=committed.manifest["model_digest"])
        return
    saver = ShardedSaver(env, writer)
    outcomes = []
    steps = [1, 2] if args.fault_rank is not None else [2]
    for step in steps:
        hook = None
        if args.fault_rank is not None and step == 1 and env.rank == args.fault_rank:
            def hook(operation: str, rel: str) -> None:
                if operation == "write" and "/shards/" in f"/{rel}":
                    raise OSError(28, "No space left on device (injected)")
            Storage.hooks.append(hook)
        state, pinned = collect_state(model, optimizer)
        snap = saver.snapshot(step, state, pinned, copy=args.copy)
        rank0_files = {"trainer.safetensors": tree_file(trainer_state)} if env.is_rank0 else None
        try:
            committed = saver.commit(snap, fields(env, model), rank0_files)
            outcomes.append({"step": step, "url": committed.url, "manifest_digest": committed.manifest["model_digest"]})
        except Exception as exc:  # noqa: BLE001 - reported
            outcomes.append({"step": step, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            if hook is not None:
                Storage.hooks.remove(hook)
        leftovers = sorted(e.name for e in writer.storage.list("") if e.name.startswith((".staging", "ckpt-")))
        outcomes[-1]["run_dir_after"] = leftovers
    committed_url = outcomes[-1].get("url")
    report(env, url=committed_url, digest=digest, outcomes=outcomes,
           manifest_digest=outcomes[-1].get("manifest_digest"))


def compare(env, model, optimizer, out: str) -> dict:
    from safetensors.torch import load_file

    reference = load_file(os.path.join(out, "reference.safetensors"))
    loaded = full_state(model, optimizer)
    differing = sorted(k for k in reference if k not in loaded or not torch.equal(reference[k], loaded[k]))
    extra = sorted(set(loaded) - set(reference))
    return {"differing": differing, "extra": extra, "digest": parallel.model_digest(model)}


def mode_load(env, args) -> None:
    from dist_train.checkpoint import catalog
    from dist_train.checkpoint.dcp import load_state

    model, wrapped, optimizer = build(env, args.parallelism, seed=123)
    folder = Storage(args.ckpt)
    manifest = catalog.read_manifest(folder)
    load_state(env, folder, manifest, model, optimizer)
    result = compare(env, model, optimizer, args.out)
    train(env, wrapped, optimizer, steps=1)  # the loaded state trains on
    report(env, **result, world_size=env.world_size)


def mode_dcp_load(env, args) -> None:
    """What a torchtitan-style program does: its own FSDP model, plain DCP calls, dist_train's reader."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from dist_train.checkpoint.dcp import DistTrainReader

    model, wrapped, _ = build(env, "fsdp", seed=7)
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, storage_reader=DistTrainReader(args.ckpt))
    set_model_state_dict(model, state["model"])
    report(env, digest=parallel.model_digest(model))


def _rss_peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def mode_memory(env, args) -> None:
    from dist_train.checkpoint.sharded import ShardedSaver, collect_state

    model, wrapped, optimizer = build(env, "fsdp", seed=0, dim=512, depth=6)
    train(env, wrapped, optimizer, steps=1)
    writer = make_writer(env, args.run_dir)
    saver = ShardedSaver(env, writer)
    total = sum(t.numel() * t.element_size() for t in full_state_sizes(model, optimizer))
    local = parallel.local_state_bytes(model, optimizer)
    env.barrier()
    exact = _rss_peak_reset()
    before = _status_kb("VmRSS") * 1024
    state, pinned = collect_state(model, optimizer)
    snap = saver.snapshot(1, state, pinned, copy=True)
    committed = saver.commit(snap, {"epoch": 0, "world_size": env.world_size})
    snap_bytes = snap.nbytes
    peak = _status_kb("VmHWM") * 1024
    growth = peak - before if exact else None
    del snap, state
    # Control: what gathering the full state to rank 0 costs, measured the same way (shows the
    # measurement sees allocations of that size at all).
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    env.barrier()
    _rss_peak_reset()
    before = _status_kb("VmRSS") * 1024
    full = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    control = _status_kb("VmHWM") * 1024 - before if exact else None
    del full
    reports = env.all_gather_objects({"rank": env.rank, "snapshot_bytes": snap_bytes, "local_bytes": local,
                                      "rss_growth": growth, "full_gather_growth": control})
    report(env, total_bytes=total, ranks=reports, url=committed.url)


def full_state_sizes(model, optimizer):
    """The full (logical) tensors' sizes, without materializing them: shapes and dtypes only."""
    from dist_train.checkpoint.sharded import collect_state, flat_state

    state, _ = collect_state(model, optimizer)
    return [torch.empty(v.shape, dtype=v.dtype, device="meta") for v in flat_state(state).values()
            if isinstance(v, torch.Tensor)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["save", "load", "dcp-load", "memory"])
    parser.add_argument("--parallelism", default="fsdp")
    parser.add_argument("--writers", default="all")
    parser.add_argument("--run-dir")
    parser.add_argument("--ckpt")
    parser.add_argument("--out")
    parser.add_argument("--fault-rank", type=int)
    parser.add_argument("--copy", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    try:
        {"save": mode_save, "load": mode_load, "dcp-load": mode_dcp_load, "memory": mode_memory}[args.mode](env, args)
    finally:
        teardown(env)


if __name__ == "__main__":
    main()
