"""`dist_train.ResumableSampler`: the trainer's resumable data order, for a hand-written loop's DataLoader.

A `DataLoader` with torch's `DistributedSampler` cannot resume mid-epoch: the sampler starts
every epoch from its beginning, and the loader draws its workers' base seed from the global
RNG, which the checkpoint restores to the state of the save, not of the epoch's start. This
sampler is the one the trainer uses (`data/sampler.py`: a global order seeded by (seed,
epoch), sharded by rank, any world size), handed to the loader as its `batch_sampler`. Its
position moves only when the loop says a step is done (`advance()`), so prefetching workers
never count as progress; its `state_dict()` goes into the checkpoint as a state entry.
The short last batch of an epoch is padded with repeats (every rank runs the same number
of steps, as DDP needs), as `DistributedSampler` does.

```python
sampler = ResumableSampler(len(dataset), batch_size=16, seed=0)          # rank, world: from torch.distributed
loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2,
                    generator=torch.Generator().manual_seed(0))           # never the global RNG
state = {"model": model, "optimizer": optimizer, "sampler": sampler}
step = mgr.restore(state) or 0
while step < total:
    for x, y in loader:                       # the rest of this epoch, from the exact next sample
        ...; optimizer.step(); sampler.advance(); step += 1
    sampler.set_epoch(sampler.epoch + 1)      # only once the epoch is done
```
"""

from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import Sampler

from dist_train.data.sampler import ResumableDistributedSampler, real_index
from dist_train.errors import UserError


class ResumableSampler(Sampler[list[int]]):
    """Batches of this rank's sample indices; the epoch and position are saved and continued exactly."""

    def __init__(self, dataset_len: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 world_size: int | None = None, rank: int | None = None):
        import torch.distributed as dist

        grouped = dist.is_available() and dist.is_initialized()
        world_size = world_size if world_size is not None else (dist.get_world_size() if grouped else 1)
        rank = rank if rank is not None else (dist.get_rank() if grouped else 0)
        if batch_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"ResumableSampler: batch_size must be >= 1 and 0 <= rank < world_size, got "
                            f"batch_size {batch_size}, rank {rank}, world_size {world_size}")
        self._order = ResumableDistributedSampler(dataset_len, batch_size, world_size, rank, seed, shuffle)

    @property
    def epoch(self) -> int:
        return self._order.epoch

    @property
    def position(self) -> int:
        """Samples of this epoch (all ranks together) trained on."""
        return self._order.position

    @property
    def epoch_done(self) -> bool:
        return self._order.epoch_done

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning."""
        self._order.set_epoch(epoch)

    def advance(self, steps: int = 1) -> None:
        """Count `steps` batches as trained: call it after each optimizer step, before a save."""
        self._order.advance(steps)

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._order:
            yield [real_index(i) for i in batch]

    def state_dict(self) -> dict[str, Any]:
        return self._order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._order.load_state_dict(state)


__all__ = ["ResumableSampler"]
