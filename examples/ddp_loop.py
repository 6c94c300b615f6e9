"""A hand-written DDP training loop with a real DataLoader, checkpointed by `dist_train.CheckpointManager`.

The loop is yours; dist_train stores and restores its state: atomic, verified checkpoints
(local disk, S3, any fsspec URL), retention, the RNG state of every rank, and the data
order. A loop killed at any moment (even SIGKILL) and started again with the same command
ends bit-identical to one never interrupted (same world size), because it does what a
resumable loop needs:

- deterministic kernels and identical initial weights on every rank;
- `dist_train.ResumableSampler` as the DataLoader's `batch_sampler`, saved as a state entry:
  after a restore the loader continues at the exact next sample of the epoch (torch's
  `DistributedSampler` would start the epoch over);
- the DataLoader's own `generator`: its workers' seeds never come from the global RNG, which
  the checkpoint restores to the moment of the save;
- `sampler.advance()` after each optimizer step, before the save that counts it.

    # one process
    python examples/ddp_loop.py --run-dir runs/loop --steps 200 --save-every 20

    # two processes (gloo on CPU); kill it (even with SIGKILL) and run the same command again
    torchrun --standalone --nproc-per-node 2 examples/ddp_loop.py --run-dir runs/loop --steps 200 --save-every 20

    # on S3 (the standard AWS_* variables; AWS_ENDPOINT_URL for an S3-compatible store)
    torchrun --standalone --nproc-per-node 2 examples/ddp_loop.py --run-dir s3://bucket/loop --steps 200

    dist-train ckpt list runs/loop          # its run dir is an ordinary run dir

Under torchrun a worker whose agent dies (SIGKILL, OOM) stops instead of training on: the
`CheckpointManager` watches the agent as `dist-train train` does.
"""

import argparse
import logging
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from dist_train import CheckpointManager, ResumableSampler


class NoisyPoints(Dataset):
    """A fixed synthetic data set; each read adds noise from a generator seeded by the sample index
    (augmentation that is the same whichever worker, rank or run reads the sample)."""

    def __init__(self, size: int = 960, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 20, generator=gen)
        self.y = (self.x[:, :5].sum(dim=1) > 0).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(20, generator=torch.Generator().manual_seed(index))
        return self.x[index] + 0.1 * noise, self.y[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="a local path, s3://bucket/prefix or any fsspec URL")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps in all (epochs follow one another)")
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.use_deterministic_algorithms(True)
    distributed = "RANK" in os.environ  # launched by torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")

    dataset = NoisyPoints(seed=args.seed)
    sampler = ResumableSampler(len(dataset), args.batch_size, seed=args.seed)  # rank and world from dist
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                        generator=torch.Generator().manual_seed(args.seed))

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(args.seed + 1 + rank)  # each rank's own dropout masks (restored with every checkpoint)

    mgr = CheckpointManager(args.run_dir, keep_last=args.keep_last)
    state = {"model": model, "optimizer": optimizer, "sampler": sampler}
    step = mgr.restore(state) or 0  # the newest valid checkpoint, in place; corrupt ones are skipped
    ddp = DistributedDataParallel(model) if distributed else model
    while step < args.steps:
        for x, y in loader:  # the rest of this epoch, from the exact next sample
            loss = F.cross_entropy(ddp(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sampler.advance()
            step += 1
            if step % args.save_every == 0 or step == args.steps:
                mgr.save(step, state, epoch=sampler.epoch)  # every rank, same step; rank 0 writes
            if rank == 0 and step % 20 == 0:
                logging.info("epoch %d step %d loss %.4f", sampler.epoch, step, loss.item())
            if step == args.steps:
                break
        if sampler.epoch_done:
            sampler.set_epoch(sampler.epoch + 1)
    mgr.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
