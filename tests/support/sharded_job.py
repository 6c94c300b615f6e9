"""A tiny sharded-checkpoint job for tests/integration/test_sharded_checkpoints.py, under torchrun or as
one plain process. Rank 0 prints one line `RESULT {json}`.

    save --parallelism ddp|fsdp --run-dir URL --out DIR [--fault-rank R] [--reload]
         [--legacy-run-dir URL] [--memory-run-dir URL]
        train 2 steps, write the full state to DIR/reference.safetensors, save sharded. --fault-rank: a
        first save fails on rank R (storage hook), then the next must succeed. --reload: load the
        checkpoint back into a fresh model and compare. --legacy-run-dir: also save today's rank-0 layout.
        --memory-run-dir: measure a larger FSDP save's peak memory (against gathering the full state).
        --async-step: one more save, committed in a thread on every rank while a training step runs.
    load --parallelism ddp|fsdp --ckpt URL [--ckpt URL ...] --out DIR [--dcp]
        a fresh model loads each checkpoint; compared with DIR/reference.safetensors. --dcp: also load
        it as a torchtitan-style program does (plain `dcp.load` with dist_train's reader).
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


def fields(env) -> dict:
    return {"epoch": 0, "world_size": env.world_size}


def report(env, **values) -> None:
    if env.is_rank0:
        print("RESULT " + json.dumps(values), flush=True)


def save_rank0_layout(env, writer, model, optimizer, trainer_state) -> dict:
    """Today's layout (rank 0 writes whole files), for loading it resharded."""
    from dist_train.checkpoint.manifest import model_digest

    committed = None
    if env.is_rank0:
        raw = parallel.unwrap(model).state_dict()
        files = {"model.safetensors": tensor_file(raw, {"format": "pt"}),
                 "optimizer.safetensors": tree_file(optimizer.state_dict()),
                 "trainer.safetensors": tree_file(trainer_state)}
        committed = writer.commit(2, files, dict(fields(env), model_digest=model_digest(raw)))
    committed = env.broadcast_object(committed)
    return {"step": 2, "url": committed.url, "manifest_digest": committed.manifest["model_digest"]}


def mode_save(env, args) -> None:
    from safetensors.torch import save_file

    from dist_train.checkpoint.sharded import ShardedSaver, collect_state

    model, wrapped, optimizer = build(env, args.parallelism, seed=0)
    train(env, wrapped, optimizer)
    digest = parallel.model_digest(model)
    reference = full_state(model, optimizer)
    if env.is_rank0:
        os.makedirs(args.out, exist_ok=True)
        save_file(reference, os.path.join(args.out, "reference.safetensors"))
    trainer_state = {"progress": {"step": 2}, "rng": [1, 2]}
    result: dict = {"digest": digest}
    if args.legacy_run_dir:
        result["legacy"] = save_rank0_layout(env, make_writer(env, args.legacy_run_dir), model, optimizer,
                                             trainer_state)
    writer = make_writer(env, args.run_dir)
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
            committed = saver.commit(snap, fields(env), rank0_files)
            outcomes.append({"step": step, "url": committed.url, "manifest_digest": committed.manifest["model_digest"]})
        except Exception as exc:  # noqa: BLE001 - reported
            outcomes.append({"step": step, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            if hook is not None:
                Storage.hooks.remove(hook)
        env.barrier()
        names = set(writer.storage.folders("")) | {e.name for e in writer.storage.list("")}
        outcomes[-1]["run_dir_after"] = sorted(n for n in names if n.startswith(("ckpt-", ".staging")))
    result["outcomes"] = outcomes
    if args.async_step:
        result["async"] = save_while_training(env, saver, model, wrapped, optimizer, trainer_state)
    if args.reload and "url" in outcomes[-1]:
        fresh, _, fresh_optimizer = build(env, args.parallelism, seed=321)
        load(env, outcomes[-1]["url"], fresh, fresh_optimizer)
        result["reload"] = compare(env, fresh, fresh_optimizer, args.out)
    if args.memory_run_dir:
        result["memory"] = measure_memory(env, args.memory_run_dir)
    report(env, **result)


def save_while_training(env, saver, model, wrapped, optimizer, trainer_state) -> dict:
    """An async save: copies taken at the boundary, the commit (its own gloo group) in a thread on every
    rank while the next training step runs its collectives on the default group."""
    import threading

    from dist_train.checkpoint.sharded import collect_state

    state, pinned = collect_state(model, optimizer)
    snap = saver.snapshot(3, state, pinned, copy=True)
    expected = parallel.model_digest(model)
    box: dict = {}

    def commit() -> None:
        try:
            box["committed"] = saver.commit(snap, fields(env),
                                            {"trainer.safetensors": tree_file(trainer_state)} if env.is_rank0 else None)
        except BaseException as exc:  # noqa: BLE001 - reported
            box["error"] = repr(exc)
    thread = threading.Thread(target=commit)
    thread.start()
    train(env, wrapped, optimizer, steps=1)  # changes the live weights while the commit runs
    thread.join()
    if "error" in box:
        return {"error": box["error"]}
    return {"url": box["committed"].url, "manifest_digest": box["committed"].manifest["model_digest"],
            "expected": expected, "after_step": parallel.model_digest(model)}


def load(env, url: str, model, optimizer) -> None:
    from dist_train.checkpoint import catalog
    from dist_train.checkpoint.dcp import load_state

    folder = Storage(url)
    load_state(env, folder, catalog.read_manifest(folder), model, optimizer)


def compare(env, model, optimizer, out: str) -> dict:
    from safetensors.torch import load_file

    reference = load_file(os.path.join(out, "reference.safetensors"))
    loaded = full_state(model, optimizer)
    differing = sorted(k for k in reference if k not in loaded or not torch.equal(reference[k], loaded[k]))
    extra = sorted(set(loaded) - set(reference))
    return {"differing": differing, "extra": extra, "digest": parallel.model_digest(model)}


def mode_load(env, args) -> None:
    results = []
    for url in args.ckpt:
        model, wrapped, optimizer = build(env, args.parallelism, seed=123)
        load(env, url, model, optimizer)
        result = compare(env, model, optimizer, args.out)
        train(env, wrapped, optimizer, steps=1)  # the loaded state trains on
        if args.dcp:
            result["dcp_digest"] = dcp_program(env, url)
        results.append(result)
    report(env, results=results, world_size=env.world_size)


def dcp_program(env, url: str) -> str:
    """What a torchtitan-style program does: its own FSDP model, plain DCP calls, dist_train's reader."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from dist_train.checkpoint.dcp import DistTrainReader

    model, _, _ = build(env, "fsdp", seed=7)
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, storage_reader=DistTrainReader(url))
    set_model_state_dict(model, state["model"])
    return parallel.model_digest(model)


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


def measure_memory(env, run_dir: str) -> dict:
    """Peak RSS growth of an FSDP save with copies (what an async save holds), and of gathering the
    full state to rank 0 measured the same way (the control). Run with MALLOC_MMAP_THRESHOLD_ low, so
    freed memory goes back to the OS and RSS follows what is live."""
    from dist_train.checkpoint.sharded import ShardedSaver, collect_state

    model, wrapped, optimizer = build(env, "fsdp", seed=0, dim=512, depth=6)
    train(env, wrapped, optimizer, steps=1)
    writer = make_writer(env, run_dir)
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
    return {"total_bytes": total, "ranks": reports, "url": committed.url}


def full_state_sizes(model, optimizer):
    """The full (logical) tensors' sizes, without materializing them: shapes and dtypes only."""
    from dist_train.checkpoint.sharded import collect_state, flat_state

    state, _ = collect_state(model, optimizer)
    return [torch.empty(v.shape, dtype=v.dtype, device="meta") for v in flat_state(state).values()
            if isinstance(v, torch.Tensor)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["save", "load"])
    parser.add_argument("--parallelism", default="fsdp")
    parser.add_argument("--run-dir")
    parser.add_argument("--legacy-run-dir", help="also save today's rank-0 layout there")
    parser.add_argument("--memory-run-dir", help="also measure a save's peak memory there")
    parser.add_argument("--ckpt", action="append", default=[])
    parser.add_argument("--out")
    parser.add_argument("--fault-rank", type=int)
    parser.add_argument("--copy", action="store_true")
    parser.add_argument("--reload", action="store_true")
    parser.add_argument("--async-step", action="store_true", help="also save in a thread during a step")
    parser.add_argument("--dcp", action="store_true", help="also load each checkpoint as a DCP program would")
    args = parser.parse_args()
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    try:
        {"save": mode_save, "load": mode_load}[args.mode](env, args)
    finally:
        teardown(env)


if __name__ == "__main__":
    main()
