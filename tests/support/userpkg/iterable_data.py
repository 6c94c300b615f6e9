"""User iterable data sets (torch IterableDataset) for tests/integration/test_iterable_data.py.

`Stream` is stateful (state_dict/load_state_dict, the torchdata protocol): rank r of W yields
the items with ids r, r+W, r+2W, ... of a fixed pool; its state is how far its stream got.
With `USERPKG_YIELD_LOG=DIR` each process appends every id it yields to
`DIR/rank{r}-{pid}.txt` (one line per id, written before the item is handed over), so a test
sees where a resumed stream started. `USERPKG_GATE` (data.py's Wave serves the items) holds the stream after
`USERPKG_GATE_AFTER` items, so a test can kill a job mid-epoch at a known point.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import IterableDataset

from userpkg.data import Wave

POOL = 512


class Stream(IterableDataset):
    def __init__(self, split: str, rank: int = 0, world_size: int = 1, features: int = 8):
        self.wave = Wave(split if split in ("train", "val") else "val", features=features)
        self.rank, self.world_size = rank, world_size
        self.in_channels = features
        self.split = split
        self.epoch = 0
        self.next = 0      # items of this epoch's stream handed over
        self._start = 0    # where the next iter() starts (set by load_state_dict)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(range(self.rank, len(self.wave), self.world_size))

    def __iter__(self):
        start, self._start = self._start, 0
        ids = range(self.rank, len(self.wave), self.world_size)
        log = os.environ.get("USERPKG_YIELD_LOG") if self.split == "train" else None
        out = open(os.path.join(log, f"rank{self.rank}-{os.getpid()}.txt"), "a") if log else None
        try:
            for k in range(start, len(ids)):
                self.next = k + 1
                if out is not None:
                    out.write(f"{self.epoch} {ids[k]}\n")
                    out.flush()
                x, y = self.wave[ids[k]]
                yield x, y
        finally:
            if out is not None:
                out.close()

    def state_dict(self) -> dict:
        return {"next": self.next, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self._start = int(state["next"])


class Stateless(Stream):
    """The same stream without state_dict/load_state_dict: a mid-epoch resume restarts the epoch."""
    state_dict = None  # type: ignore[assignment]
    load_state_dict = None  # type: ignore[assignment]
