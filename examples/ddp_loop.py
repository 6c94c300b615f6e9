"""A hand-written DDP training loop that keeps its checkpoints with `dist_train.CheckpointManager`.

The loop is yours; dist_train only stores and restores its state: atomic, verified
checkpoints (local disk, S3, any fsspec URL), retention, and the RNG state of every rank,
so a loop that is killed at any moment and started again with the same command ends
bit-identical to one that was never interrupted (same world size). That needs what this
loop does: deterministic kernels, identical initial weights on every rank, and a data
order that depends only on (seed, step), so a restart redoes exactly the same batches.

    # one process
    python examples/ddp_loop.py --run-dir runs/loop --steps 200 --save-every 20

    # two processes (gloo on CPU); kill it (even with SIGKILL) and run the same command again
    torchrun --standalone --nproc-per-node 2 examples/ddp_loop.py --run-dir runs/loop --steps 200 --save-every 20

    # on S3 (the standard AWS_* variables; AWS_ENDPOINT_URL for an S3-compatible store)
    torchrun --standalone --nproc-per-node 2 examples/ddp_loop.py --run-dir s3://bucket/loop --steps 200

    dist-train ckpt list runs/loop          # its run dir is an ordinary run dir
"""

import argparse
import logging
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_train import CheckpointManager


def batch(seed: int, step: int, rank: int, world: int, per_rank: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch of `step`: a function of (seed, step) only."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(per_rank * world, 20, generator=gen)
    y = (x[:, :5].sum(dim=1) > 0).long()
    return x.chunk(world)[rank], y.chunk(world)[rank]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="a local path, s3://bucket/prefix or any fsspec URL")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.use_deterministic_algorithms(True)
    distributed = "RANK" in os.environ  # launched by torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(args.seed + 1 + rank)  # each rank's own dropout masks (restored with every checkpoint)

    mgr = CheckpointManager(args.run_dir, keep_last=args.keep_last)
    state = {"model": model, "optimizer": optimizer}
    start = mgr.restore(state) or 0  # the newest valid checkpoint, in place; corrupt ones are skipped
    ddp = DistributedDataParallel(model) if distributed else model
    for step in range(start, args.steps):
        x, y = batch(args.seed, step, rank, world)
        loss = F.cross_entropy(ddp(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            mgr.save(step + 1, state)  # every rank, same step; rank 0 writes
        if rank == 0 and (step + 1) % 20 == 0:
            logging.info("step %d loss %.4f", step + 1, loss.item())
    mgr.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
