"""Sharded saves with 2 ranks: every rank writing its share against rank 0 writing it all, DCP's own
save beside them, and the FSDP step against the DDP step.

One torchrun job of 2 ranks per store (local disk, then S3 on a moto server), timing inside the
job with barriers around each save (rank 0's clock), sides alternated per repetition:

- `rank0`: today's path. A DDP-replicated state (weights of big Linear layers + Adam moments);
  rank 0 writes `model.safetensors` and `optimizer.safetensors`, hashing both and the model
  digest, then commits (`CheckpointWriter.commit`).
- `all`: the same DDP state through `ShardedSaver` (`--checkpoint-writers all`): each rank writes
  and hashes about half, rank 0 commits one manifest.
- `fsdp`: the same weights sharded by FSDP2, `ShardedSaver` (each rank its shards).
- `dcp`: `torch.distributed.checkpoint.save` of the same FSDP state (no hashes, no manifest, no
  atomic commit; a pickled `.metadata`), local disk only (DCP has no S3 writer of its own).

Figures: `sharded_save_speedup` = rank0 / all on local disk (target >= 1.5: hashing and writing
split in two), `sharded_save_speedup_s3` the same on S3, `sharded_vs_dcp_save` = dcp / fsdp
(ours with hashes and a manifest against theirs without; report), `fsdp_overhead` = FSDP step
time / DDP step time of the same model and batch (report; 2 vCPUs say little about it).

Each save is also timed in CPU seconds (every thread of every rank): the rank-0 path hashes on
threads beside its writes, so on a machine with few cores it already keeps most of them busy, and
`raw.bound_on_this_machine` (rank0 wall x cores / all-ranks CPU seconds) is the most the split can
show there (local disk only; on S3 the server's CPU is not counted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any

from dist_train.bench.jobs import launch, torchrun
from dist_train.bench.measure import Figure, log

WIDTH = 512
LAYER_PARAMS = WIDTH * WIDTH + WIDTH


def run(work_dir: str, state_bytes: int, s3_bytes: int, repeats: int, steps: int) -> list[Figure]:
    """The parent side: launch the jobs, turn their timings into figures."""
    from dist_train.bench.s3 import moto_server

    local = _job(["--run-dir", os.path.join(work_dir, f"sharded-{uuid.uuid4().hex[:6]}"),
                  "--bytes", str(state_bytes), "--repeats", str(repeats), "--dcp", "--steps", str(steps)])
    figures = [_ratio("sharded_save_speedup", "rank-0-only save time / all-ranks save time, 2 ranks, local disk",
                      ">= 1.5", local, "rank0", "all", cpu_bound=True),
               _ratio("sharded_vs_dcp_save", "DCP save time / dist_train all-ranks FSDP save time, local disk",
                      "", local, "dcp", "fsdp"),
               _ratio("fsdp_overhead", "FSDP step time / DDP step time, same model and batch, 2 ranks",
                      "", local, "fsdp_step", "ddp_step")]
    with moto_server() as endpoint:
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        remote = _job(["--run-dir", f"s3://{bucket}/sharded", "--bytes", str(s3_bytes), "--repeats", str(repeats)])
    figures.insert(1, _ratio("sharded_save_speedup_s3", "rank-0-only save time / all-ranks save time, 2 ranks, "
                             "S3 (moto)", "", remote, "rank0", "all"))
    return figures


def _job(args: list[str]) -> dict[str, Any]:
    _, result = launch(torchrun(2, ["-m", "dist_train.bench.sharded", *args]))
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"sharded benchmark job printed no result:\n{result.stderr[-2000:]}")
    return json.loads(lines[-1])


def _ratio(key: str, what: str, target: str, timings: dict[str, Any], numerator: str, denominator: str,
           cpu_bound: bool = False) -> Figure:
    """numerator / denominator per repetition. `cpu_bound`: also the most this machine can show from the
    sides' CPU seconds (local disk only: on S3 the server's CPU, another process, is not counted)."""
    figure = Figure(key, what, target)
    a, b = timings.get(numerator) or [], timings.get(denominator) or []
    figure.ratios = [x / y if y > 0 else float("nan") for x, y in zip(a, b)]
    figure.raw = {f"{numerator}_s": a, f"{denominator}_s": b, "bytes": timings.get("bytes")}
    cpu_a, cpu_b = timings.get(f"{numerator}_cpu") or [], timings.get(f"{denominator}_cpu") or []
    if cpu_bound and cpu_a and cpu_b:
        cores = os.cpu_count() or 1
        figure.raw.update({f"{numerator}_cpu_s": cpu_a, f"{denominator}_cpu_s": cpu_b, "cores": cores})
        # Both sides do the same work, so with every core busy `denominator` can take no less than
        # its CPU seconds / cores: numerator / that is the most this machine can show.
        bounds = [wall * cores / cpu for wall, cpu in zip(a, cpu_b) if cpu > 0]
        if bounds:
            figure.raw["bound_on_this_machine"] = bounds
            busy = statistics.median(x / w for x, w in zip(cpu_a, a) if w > 0)
            figure.notes.append(f"{numerator} keeps {busy:.2f} of {cores} cores busy; with {denominator}'s CPU "
                                f"seconds this machine can show at most {statistics.median(bounds):.2f}")
    return figure


# -- the torchrun job -------------------------------------------------------------------------------

def _model(layers: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])


def _step(wrapped, optimizer, batch: int = 64) -> None:
    import torch

    x = torch.randn(batch, WIDTH)
    wrapped(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _timed(env, action, cpu: list[float] | None = None) -> float:
    """Wall seconds of `action` on every rank (rank 0's clock); with `cpu`, appends the CPU seconds
    all ranks spent in it (every thread, summed over the ranks)."""
    env.barrier()
    started, used = time.perf_counter(), time.process_time()
    action()
    env.barrier()
    seconds, used = time.perf_counter() - started, time.process_time() - used
    if cpu is not None:
        cpu.append(env.all_reduce_sum([used])[0])
    return seconds


def main(argv: list[str] | None = None) -> None:
    import torch

    from dist_train.checkpoint.fencing import new_writer_id
    from dist_train.checkpoint.manifest import model_digest
    from dist_train.checkpoint.serialization import tensor_file, tree_file
    from dist_train.checkpoint.sharded import ShardedSaver, collect_state
    from dist_train.checkpoint.storage import Storage
    from dist_train.checkpoint.writer import CheckpointWriter
    from dist_train.distributed.env import init_distributed, teardown
    from dist_train.distributed.parallel import apply_parallelism

    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dcp", action="store_true")
    parser.add_argument("--steps", type=int, default=0, help="also time FSDP against DDP steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    try:
        layers = max(1, round(args.bytes / (3 * 4 * LAYER_PARAMS)))  # weights + two Adam moments
        ddp_model = _model(layers)
        ddp = apply_parallelism(ddp_model, env, "ddp")
        ddp_opt = torch.optim.Adam(ddp_model.parameters(), lr=1e-3)
        fsdp_model = apply_parallelism(_model(layers), env, "fsdp")
        fsdp_opt = torch.optim.Adam(fsdp_model.parameters(), lr=1e-3)
        _step(ddp, ddp_opt)
        _step(fsdp_model, fsdp_opt)

        storage = Storage(args.run_dir)
        if env.is_rank0:
            storage.makedirs("")
        env.barrier()
        writer = CheckpointWriter(storage, 1, new_writer_id(), None)
        saver = ShardedSaver(env, writer)
        step = [0]
        results: dict[str, list[float]] = {"rank0": [], "all": [], "fsdp": [], "dcp": [], "bytes": 0}

        def rank0() -> None:
            step[0] += 1
            if env.is_rank0:
                raw = ddp_model.state_dict()
                files = {"model.safetensors": tensor_file(raw, {"format": "pt"}),
                         "optimizer.safetensors": tree_file(ddp_opt.state_dict())}
                committed = writer.commit(step[0], files, {"epoch": 0, "world_size": env.world_size},
                                          deferred={"model_digest": lambda: model_digest(raw)})
                results["bytes"] = sum(e["size"] for e in committed.manifest["files"].values())

        def sharded(model, optimizer):
            def save() -> None:
                step[0] += 1
                state, pinned = collect_state(model, optimizer)
                saver.commit(saver.snapshot(step[0], state, pinned), {"epoch": 0, "world_size": env.world_size})
            return save

        def dcp_save() -> None:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            step[0] += 1
            model_state, optim_state = get_state_dict(fsdp_model, fsdp_opt)
            dcp.save({"model": model_state, "optimizer": optim_state},
                     checkpoint_id=storage.local_path(f"dcp-{step[0]}"))

        sides = {"rank0": rank0, "all": sharded(ddp_model, ddp_opt), "fsdp": sharded(fsdp_model, fsdp_opt)}
        if args.dcp and storage.is_local:  # torch's DCP writes to a local path
            sides["dcp"] = dcp_save
        names = list(sides)
        for side in names:  # warm-up
            _timed(env, sides[side])
            _clean_all(env, storage)
        for rep in range(args.repeats):
            for side in (names if rep % 2 == 0 else names[::-1]):
                results[side].append(_timed(env, sides[side], results.setdefault(f"{side}_cpu", [])))
                _clean_all(env, storage)
            if env.is_rank0:
                log.info("sharded saves: repetition %d/%d done", rep + 1, args.repeats)
        if args.steps:
            results["ddp_step"], results["fsdp_step"] = [], []
            for rep in range(args.repeats):
                for name, wrapped, optimizer in ([("ddp_step", ddp, ddp_opt), ("fsdp_step", fsdp_model, fsdp_opt)]
                                                 if rep % 2 == 0 else
                                                 [("fsdp_step", fsdp_model, fsdp_opt), ("ddp_step", ddp, ddp_opt)]):
                    seconds = _timed(env, lambda: [_step(wrapped, optimizer) for _ in range(args.steps)])
                    results[name].append(seconds / args.steps)
        if env.is_rank0:
            print(json.dumps(results), flush=True)
    finally:
        teardown(env)


def _clean_all(env, storage) -> None:
    """Delete what a timed save left (outside the timed region), so the disk does not fill."""
    env.barrier()
    if env.is_rank0:
        for entry in storage.list(""):
            with contextlib.suppress(Exception):
                storage.delete_tree(entry.name)
    env.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
