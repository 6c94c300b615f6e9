"""The split of a restore's reads between ranks: every file read by exactly one rank, evenly."""

from __future__ import annotations

import random

import pytest

from dist_train.checkpoint.restore import exchange_order, pieces, plan


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


@pytest.mark.parametrize("world_size", [2, 3])
def test_exchange_order_sends_every_piece_once_in_each_readers_reading_order(world_size):
    rng = random.Random(world_size)
    sizes = {f"f{i}.safetensors": rng.randrange(0, 100_000) for i in range(9)}
    names = sorted(sizes)
    owners = plan(sizes, world_size)
    order = exchange_order(sizes, owners, names, piece=10_000)
    expected = [(name, begin, end) for name in names for begin, end in pieces(sizes[name], 10_000)]
    assert sorted(order) == sorted(expected)  # every piece of every file, once
    for rank in range(world_size):  # a reader posts its pieces as they land: its reading order
        assert [p for p in order if owners[p[0]] == rank] == [p for p in expected if owners[p[0]] == rank]
    assert exchange_order(dict(reversed(list(sizes.items()))), owners, names, piece=10_000) == order


def test_exchange_order_interleaves_the_readers_so_no_file_waits_for_another_ranks_whole_file():
    sizes = {"model.safetensors": 100, "optimizer.safetensors": 200, "rng.safetensors": 1}
    owners = plan(sizes, 2)  # optimizer on rank 0, model and rng on rank 1
    order = exchange_order(sizes, owners, list(sizes), piece=50)
    # by the bytes each reader has read when the piece lands: the optimizer's first half goes out
    # before the model's end, not after the whole model (which would idle rank 0's sends meanwhile)
    assert order.index(("optimizer.safetensors", 0, 50)) < order.index(("model.safetensors", 50, 100))
    assert order[-1] == ("optimizer.safetensors", 150, 200)
