"""The one global order: map-style unchanged, packed data's shard-window shuffle world-size independent."""

from __future__ import annotations

import torch

from dist_train.data.sampler import ResumableDistributedSampler, real_index, shard_window_order
from dist_train.determinism import generator

SIZES = [7, 9, 3, 12, 5, 8, 8, 1, 10, 6]


def consumed(sampler: ResumableDistributedSampler, steps: int | None = None) -> list[list[int]]:
    """The global chunks a sampler hands out, rank by rank merged back into chunk order."""
    out = []
    for i, batch in enumerate(sampler):
        if steps is not None and i >= steps:
            break
        out.append(batch)
        sampler.advance(1)
    return out


def test_map_style_order_is_still_the_seeded_randperm():
    sampler = ResumableDistributedSampler(100, 4, 2, 0, seed=3)
    sampler.set_epoch(2)
    assert torch.equal(sampler.order(), torch.randperm(100, generator=generator(3, "sampler", 2)))


def test_shard_window_order_is_a_permutation_that_keeps_windows_together():
    order = shard_window_order(SIZES, 3, seed=1, epoch=0).tolist()
    assert sorted(order) == list(range(sum(SIZES)))
    starts = [sum(SIZES[:i]) for i in range(len(SIZES))]
    shard_of = {i: s for s, start in enumerate(starts) for i in range(start, start + SIZES[s])}
    windows, position = [], 0
    shards = torch.randperm(len(SIZES), generator=generator(1, "shards", 0)).tolist()
    for first in range(0, len(shards), 3):
        members = shards[first:first + 3]
        span = sum(SIZES[s] for s in members)
        windows.append({shard_of[i] for i in order[position:position + span]} == set(members))
        position += span
    assert all(windows), "a window's samples came from other shards than the window's"
    assert order != shard_window_order(SIZES, 3, seed=1, epoch=1).tolist()
    assert order == shard_window_order(SIZES, 3, seed=1, epoch=0).tolist()


def test_packed_order_is_the_same_for_every_world_size_and_resume_point():
    n = sum(SIZES)

    def global_sequence(world: int, resume_at: int | None = None) -> list[int]:
        per_rank = [ResumableDistributedSampler(n, 4, world, r, seed=5, shard_sizes=SIZES, window=2)
                    for r in range(world)]
        chunks = []
        for sampler in per_rank:
            sampler.set_epoch(1)
        if resume_at is not None:
            for sampler in per_rank:
                sampler.advance(resume_at)
                state = sampler.state_dict()
                sampler.load_state_dict(state)
        batches = [list(iter(s)) for s in per_rank]
        for step in range(len(batches[0])):
            merged: list[int] = []
            for k in range(max(len(b[step]) for b in batches)):
                merged += [b[step][k] for b in batches if k < len(b[step])]
            chunks.append([real_index(i) for i in merged if i >= 0])
        return [i for chunk in chunks for i in chunk]

    one = global_sequence(1)
    assert sorted(one) == list(range(n))
    assert global_sequence(2) == one and global_sequence(3) == one
    sampler = ResumableDistributedSampler(n, 4, 2, 0, seed=5, shard_sizes=SIZES, window=2)
    assert global_sequence(2, resume_at=3) == one[3 * sampler.chunk:]


def test_a_resume_with_another_window_mid_epoch_is_refused_and_a_changed_data_set_may_restart_the_epoch():
    import pytest

    from dist_train.errors import UserError

    saved = ResumableDistributedSampler(sum(SIZES), 4, 2, 0, seed=5, shard_sizes=SIZES, window=2)
    saved.advance(2)
    other = ResumableDistributedSampler(sum(SIZES), 4, 2, 0, seed=5, shard_sizes=SIZES, window=4)
    with pytest.raises(UserError, match="shuffle-window"):
        other.load_state_dict(saved.state_dict())
    changed = ResumableDistributedSampler(50, 4, 2, 0, seed=5, shard_sizes=[25, 25], window=2,
                                          allow_data_change=True)
    changed.load_state_dict(saved.state_dict())
    assert (changed.epoch, changed.position) == (saved.epoch, 0)
