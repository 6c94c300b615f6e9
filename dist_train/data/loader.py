"""DataLoaders over the resumable sampler, with sample indices carried through to the loss.

Each item is (input, label, index); padding entries keep their negative index so the
training step gives them zero weight. With `--augment`, each sample's random
transform is seeded by (seed, epoch, index): augmentation does not depend on which
rank or worker loads the sample, nor on where a resumed run started.
"""

from __future__ import annotations

import random
import signal
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dist_train.data.sampler import ResumableDistributedSampler, real_index
from dist_train.determinism import derive_seed, generator


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples, lists and dicts) moved to `device`; anything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch


class IndexedDataset(Dataset):
    def __init__(self, base: Dataset, seed: int, reseed_per_sample: bool):
        self.base = base
        self.seed = seed
        self.epoch = 0
        self.reseed_per_sample = reseed_per_sample

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        real = real_index(index)
        if not self.reseed_per_sample:
            x, y = self.base[real]
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, "augment", self.epoch, real))
                x, y = self.base[real]
        return x, y, index

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, Any, int]]:
        """A micro-batch at once: a streamed data set first fetches the shards it needs in parallel."""
        prefetch = getattr(self.base, "prefetch", None)
        if prefetch is not None:
            prefetch([real_index(i) for i in indices])
        return [self[i] for i in indices]


def _worker_init(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1 to the main process (it checkpoints); seed numpy and random."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def train_loader(dataset: IndexedDataset, sampler: ResumableDistributedSampler, num_workers: int,
                 pin_memory: bool, rank: int) -> DataLoader:
    """A loader for the rest of the sampler's current epoch (build a new one per epoch or resume)."""
    dataset.epoch = sampler.epoch
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      worker_init_fn=_worker_init if num_workers else None,
                      generator=generator(sampler.seed, "loader", rank, sampler.epoch, sampler.position),
                      prefetch_factor=2 if num_workers else None)


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r takes indices r, r+W, ...; uneven is fine."""

    def __init__(self, length: int, world_size: int, rank: int):
        self.indices = list(range(rank, length, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def eval_loader(dataset: Dataset, batch_size: int, world_size: int, rank: int, num_workers: int,
                pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), world_size, rank),
                      num_workers=num_workers, pin_memory=pin_memory,
                      worker_init_fn=_worker_init if num_workers else None, generator=generator(0, "eval"))
