"""The baseline of `resume_ratio`: start a process group and read a checkpoint's bytes, nothing else.

    torchrun --standalone --nproc-per-node 2 read_checkpoint.py CHECKPOINT_FOLDER

Each rank imports torch, joins the gloo process group, reads every file of the
folder into memory (plain `open().read()`, no verification, no parsing), and waits at a
barrier; rank 0 then prints {"time": wall-clock seconds, "bytes": N}.
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
        print(json.dumps({"time": time.time(), "bytes": total}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
