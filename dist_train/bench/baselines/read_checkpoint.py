"""The baseline of `resume_ratio`: start a process group and read a checkpoint's bytes, nothing else.

    torchrun --standalone --nproc-per-node 2 read_checkpoint.py CHECKPOINT_FOLDER

Each rank imports torch, joins the gloo process group, reads every file of the
folder into memory (plain `open().read()`, no verification, no parsing), and waits at a
barrier; rank 0 then prints {"time": wall-clock seconds, "bytes": N}. After that stamp it
also times `import torch._dynamo` (which `torch.optim` triggers in any training process),
so the report can say how much of the difference that import is.
"""

import json
import os
import sys
import time

import torch.distributed as dist


def main() -> None:
    folder = sys.argv[1]
    dist.init_process_group("gloo")
    total = 0
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as handle:
            total += len(handle.read())
    dist.barrier()
    if dist.get_rank() == 0:
        stamp = time.time()
        # Not part of the baseline: what a training process pays on top when it builds its first
        # optimizer (torch.optim imports torch._dynamo then), reported to explain the ratio.
        started = time.perf_counter()
        import torch._dynamo  # noqa: F401
        print(json.dumps({"time": stamp, "bytes": total, "dynamo_import_s": time.perf_counter() - started}),
              flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
