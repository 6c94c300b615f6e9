"""A distributed batch sampler whose position in the epoch can be saved and continued exactly.

The epoch's *global order* is a permutation of the data set seeded by (seed, epoch),
the same on every rank and for every world size. It is consumed in global chunks of
`world_size * batch_size` consecutive positions; rank r takes `chunk[r::world_size]`.
So after k steps exactly the first `k * world_size * batch_size` positions are done,
and the state (epoch, position) lets a later run, with the same or another world
size, continue at the exact next sample: the remainder is re-sharded the same way.

Packed (streamed) data sets use the same sampler with another order, a *shard-window
shuffle* (`shard_window_order`): the shards are permuted by (seed, epoch) and taken W at a
time; the samples of each window are permuted by (seed, epoch, window). It is still one
permutation of the global indices, a function of (seed, epoch, shard sizes, W) alone, so
everything below holds unchanged, and a rank never needs more than about one window of
shards at a time (docs/data.md: what W costs in cache and memory).

Padding: the last chunk of an epoch may not divide evenly. Ranks that come up short
get *padding entries* (encoded as `-1 - index`, a repeat of a real sample) so every
rank runs the same number of equally sized steps, which DDP needs. Padding has zero
weight in the loss and is not counted, so every sample of an epoch is trained on
exactly once, on exactly one rank.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Sampler

from dist_train.errors import UserError
from dist_train.determinism import generator

log = logging.getLogger(__name__)


def is_padding(index: int) -> bool:
    return index < 0


def real_index(index: int) -> int:
    return -1 - index if index < 0 else index


def shard_window_order(shard_sizes: Sequence[int], window: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's global order over a sharded data set: shards permuted, samples permuted per window.

    A sample's global index is its position in the shards concatenated in manifest order.
    Computed in O(samples) tensor work from the sizes alone: a resumed run jumps to its
    position without reading or iterating anything.
    """
    sizes = torch.as_tensor(list(shard_sizes), dtype=torch.long)
    starts = torch.cumsum(sizes, 0) - sizes
    shards = torch.randperm(len(sizes), generator=generator(seed, "shards", epoch))
    parts = []
    for w, first in enumerate(range(0, len(shards), window)):
        members = shards[first:first + window]
        indices = torch.cat([torch.arange(int(starts[s]), int(starts[s] + sizes[s])) for s in members.tolist()])
        parts.append(indices[torch.randperm(len(indices), generator=generator(seed, "window", epoch, w))])
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


class ResumableDistributedSampler(Sampler[list[int]]):
    def __init__(self, dataset_len: int, batch_size: int, world_size: int, rank: int, seed: int,
                 shuffle: bool = True, shard_sizes: Sequence[int] | None = None, window: int = 8,
                 allow_data_change: bool = False):
        if dataset_len <= 0:
            raise UserError("the training split is empty")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.shard_sizes = list(shard_sizes) if shard_sizes is not None else None
        if self.shard_sizes is not None and sum(self.shard_sizes) != dataset_len:
            raise ValueError("shard sizes do not add up to the data set's length")
        self.window = window
        self.allow_data_change = allow_data_change
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
        if self.shard_sizes is not None:
            return shard_window_order(self.shard_sizes, self.window, self.seed, epoch)
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
        state = {"epoch": self.epoch, "position": self.position, "dataset_len": self.dataset_len,
                 "seed": self.seed, "shuffle": self.shuffle, "world_size": self.world_size,
                 "batch_size": self.batch_size}
        if self.shard_sizes is not None:
            state["shuffle_window"] = self.window
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["dataset_len"] != self.dataset_len and self.allow_data_change:
            log.warning("--allow-data-change: the training split has %d samples, the checkpoint's had %d; "
                        "epoch %d starts again from its first sample", self.dataset_len, state["dataset_len"],
                        int(state["epoch"]))
            self.epoch, self.position = int(state["epoch"]), 0
            return
        if state.get("shuffle_window", self.window) != self.window and int(state["position"]) != 0:
            raise UserError(f"--shuffle-window {self.window} changed on resume mid-epoch (the checkpoint's is "
                            f"{state['shuffle_window']}): the data order would change; pass "
                            f"--shuffle-window {state['shuffle_window']}")
        if state["dataset_len"] != self.dataset_len:
            raise UserError(f"checkpoint was taken on a training split of {state['dataset_len']} samples, "
                            f"this run has {self.dataset_len} (another data set or split)")
        if state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise UserError("checkpoint sampler used another --seed; resuming would change the data order")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
