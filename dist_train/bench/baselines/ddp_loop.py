"""A minimal hand-written DDP training loop: the baseline of `trainer_overhead`.

    torchrun --standalone --nproc-per-node 2 ddp_loop.py --model cnn --batch-size 64 \
        --shape 3,32,32 --size 20000 --steps 60 --log-every 10

Same model (dist_train's registry, same initial weights), same data (dist_train's
synthetic data set, same seed), same per-rank batch size, optimizer (Adam, lr 1e-3) and
DataLoader settings (no workers) as
`dist-train train`; nothing else: no sampler state, no loss weighting, no metrics, no
step-boundary agreement, no checkpoints. Rank 0 prints one JSON line every
`--log-every` steps: {"step": N, "time": wall-clock seconds}.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shape", default="3,32,32")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repo", default=None, help="folder holding the dist_train package")
    args = parser.parse_args()
    if args.repo:
        sys.path.insert(0, args.repo)
    from dist_train.data.datasets import SyntheticImages
    from dist_train.config.job import JobConfig
    from dist_train.models.registry import build_model, make_spec
    from dist_train.determinism import seed_process

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    shape = tuple(int(p) for p in args.shape.split(","))
    data = SyntheticImages(args.size, shape, args.classes, args.seed)
    seed_process(args.seed, "init")  # the same initial weights as `dist-train train --seed`
    defaults = JobConfig().model  # the built-in options `dist-train train` passes when not given
    spec = make_spec(args.model, {}, {"dropout": defaults.dropout, "width": defaults.width},
                     {"num_classes": args.classes, "in_channels": shape[0], "image_size": shape[1]})
    model = DistributedDataParallel(build_model(spec))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler = DistributedSampler(data, seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, num_workers=0)
    model.train()
    step = 0
    for inputs, labels in loader:
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if rank == 0 and step % args.log_every == 0:
            print(json.dumps({"step": step, "time": time.time()}), flush=True)
        if step >= args.steps:
            break
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
