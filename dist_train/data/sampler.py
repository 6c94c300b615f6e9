"""A distributed batch sampler whose position in the epoch can be saved and continued exactly.

The epoch's *global order* is a permutation of the data set seeded by (seed, epoch),
the same on every rank and for every world size. It is consumed in global chunks of
`world_size * batch_size` consecutive positions; rank r takes `chunk[r::world_size]`.
So after k steps exactly the first `k * world_size * batch_size` positions are done,
and the state (epoch, position) lets a later run, with the same or another world
size, continue at the exact next sample: the remainder is re-sharded the same way.

Padding: the last chunk of an epoch may not divide evenly. Ranks that come up short
get *padding entries* (encoded as `-1 - index`, a repeat of a real sample) so every
rank runs the same number of equally sized steps, which DDP needs. Padding has zero
weight in the loss and is not counted, so every sample of an epoch is trained on
exactly once, on exactly one rank.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch.utils.data import Sampler

from dist_train.errors import UserError
from dist_train.determinism import generator


def is_padding(index: int) -> bool:
    return index < 0


def real_index(index: int) -> int:
    return -1 - index if index < 0 else index


class ResumableDistributedSampler(Sampler[list[int]]):
    def __init__(self, dataset_len: int, batch_size: int, world_size: int, rank: int, seed: int,
                 shuffle: bool = True):
        if dataset_len <= 0:
            raise UserError("the training split is empty")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # global samples of this epoch already trained on

    @property
    def chunk(self) -> int:
        return self.world_size * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0

    def order(self, epoch: int | None = None) -> torch.Tensor:
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        return torch.randperm(self.dataset_len, generator=generator(self.seed, "sampler", epoch))

    def chunk_size_at(self, position: int) -> int:
        """Real (non-padding) samples in the global chunk that starts at `position`."""
        return max(0, min(self.chunk, self.dataset_len - position))

    def __len__(self) -> int:
        """Micro-batches left in this epoch from the current position."""
        return math.ceil((self.dataset_len - self.position) / self.chunk)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order().tolist()
        for start in range(self.position, self.dataset_len, self.chunk):
            chunk = order[start:start + self.chunk]
            mine = chunk[self.rank::self.world_size]
            per_rank = math.ceil(len(chunk) / self.world_size)
            pad = chunk[0]
            yield mine + [-1 - pad] * (per_rank - len(mine))

    def advance(self, micro_batches: int) -> None:
        """Mark `micro_batches` global chunks as trained (called at optimizer-step boundaries)."""
        self.position = min(self.dataset_len, self.position + micro_batches * self.chunk)

    @property
    def epoch_done(self) -> bool:
        return self.position >= self.dataset_len

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "dataset_len": self.dataset_len,
                "seed": self.seed, "shuffle": self.shuffle, "world_size": self.world_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["dataset_len"] != self.dataset_len:
            raise UserError(f"checkpoint was taken on a training split of {state['dataset_len']} samples, "
                            f"this run has {self.dataset_len} (another data set or split)")
        if state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise UserError("checkpoint sampler used another --seed; resuming would change the data order")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
