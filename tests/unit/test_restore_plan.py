"""The split of a restore's reads between ranks: every file read by exactly one rank, evenly."""

from __future__ import annotations

import random

import pytest

from dist_train.checkpoint.restore import plan


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_plan_is_disjoint_covering_and_even(world_size):
    rng = random.Random(world_size)
    sizes = {f"f{i}.safetensors": rng.randrange(1, 10_000) for i in range(23)}
    owners = plan(sizes, world_size)
    assert set(owners) == set(sizes)  # covering; a dict: each file has exactly one reader (disjoint)
    assert set(owners.values()) <= set(range(world_size))
    loads = [sum(sizes[n] for n, r in owners.items() if r == rank) for rank in range(world_size)]
    # largest-first greedy: no rank carries more than the average plus the largest file
    assert max(loads) <= sum(sizes.values()) / world_size + max(sizes.values())
    assert plan(dict(reversed(list(sizes.items()))), world_size) == owners  # same on every rank, any order


def test_plan_gives_each_of_two_ranks_one_of_two_big_files():
    owners = plan({"model.safetensors": 1000, "optimizer.safetensors": 2000, "rng.safetensors": 10,
                   "trainer.safetensors": 5}, 2)
    assert owners["optimizer.safetensors"] != owners["model.safetensors"]
    assert owners["optimizer.safetensors"] == 0 and owners["rng.safetensors"] == 1


def test_plan_with_more_ranks_than_files_leaves_ranks_idle():
    assert sorted(plan({"a": 5, "b": 3}, 4).values()) == [0, 1]
