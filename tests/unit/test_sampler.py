"""The resumable distributed sampler: disjoint shards, exact-once epochs, exact continuation."""

from __future__ import annotations

import itertools

import pytest

from dist_train.data.sampler import ResumableDistributedSampler, is_padding, real_index


def samplers(n: int, batch: int, world: int, seed: int = 3) -> list[ResumableDistributedSampler]:
    return [ResumableDistributedSampler(n, batch, world, rank, seed) for rank in range(world)]


def consume(ranks: list[ResumableDistributedSampler], steps: int | None = None) -> list[list[int]]:
    """Per rank, the real indices of the next `steps` micro-batches (all of the epoch when None)."""
    iters = [iter(s) for s in ranks]
    taken: list[list[int]] = [[] for _ in ranks]
    for _ in (range(steps) if steps is not None else itertools.count()):
        batches = [next(it, None) for it in iters]
        if batches[0] is None:
            assert all(b is None for b in batches), "ranks disagree on the number of steps"
            break
        assert len({len(b) for b in batches}) == 1, "ranks must get equal batch sizes (DDP)"
        for rank, batch in enumerate(batches):
            taken[rank] += [i for i in batch if not is_padding(i)]
        for s in ranks:
            s.advance(1)
    return taken


@pytest.mark.parametrize("n, batch, world", [(100, 8, 2), (101, 8, 2), (7, 4, 3), (1, 4, 4), (1259, 32, 2),
                                             (33, 5, 4)])
def test_every_sample_of_an_epoch_is_on_exactly_one_rank(n, batch, world):
    taken = consume(samplers(n, batch, world))
    flat = [i for rank in taken for i in rank]
    assert sorted(flat) == list(range(n))
    for a, b in itertools.combinations(taken, 2):
        assert not set(a) & set(b)


def test_padding_repeats_a_real_sample_and_is_marked():
    ranks = samplers(5, 4, 4)  # one chunk of 5 over 4 ranks: per rank 2 entries, 3 of them padding
    batches = [next(iter(s)) for s in ranks]
    assert all(len(b) == 2 for b in batches)
    pads = [i for b in batches for i in b if is_padding(i)]
    assert len(pads) == 3 and all(0 <= real_index(i) < 5 for i in pads)


def test_order_is_seeded_per_epoch():
    a, b = samplers(50, 5, 1, seed=1)[0], samplers(50, 5, 1, seed=1)[0]
    assert a.order(0).tolist() == b.order(0).tolist()
    assert a.order(0).tolist() != a.order(1).tolist()
    assert a.order(0).tolist() != samplers(50, 5, 1, seed=2)[0].order(0).tolist()


@pytest.mark.parametrize("old_world, new_world", [(2, 2), (2, 1), (1, 2), (2, 3), (4, 2)])
def test_state_round_trip_continues_at_the_exact_next_sample(old_world, new_world):
    n, batch = 97, 4
    before = samplers(n, batch, old_world)
    for s in before:
        s.set_epoch(2)
    first = consume(before, steps=5)
    state = before[0].state_dict()
    assert state["epoch"] == 2 and state["position"] == 5 * batch * old_world

    after = samplers(n, batch, new_world)
    for s in after:
        s.load_state_dict(state)
    rest = consume(after)
    seen = [i for rank in first + rest for i in rank]
    assert sorted(seen) == list(range(n)), "a sample was skipped or seen twice across the resume"
    # The continuation follows the epoch's global order from the saved position.
    order = before[0].order(2).tolist()
    assert sorted(i for rank in rest for i in rank) == sorted(order[state["position"]:])


def test_same_world_size_resume_reproduces_the_batches():
    n, batch, world = 61, 3, 2
    uninterrupted = samplers(n, batch, world)
    reference = [list(b) for b in zip(*(iter(s) for s in uninterrupted))]
    resumed = samplers(n, batch, world)
    consume(resumed, steps=4)
    state = resumed[0].state_dict()
    fresh = samplers(n, batch, world)
    for s in fresh:
        s.load_state_dict(state)
    assert [list(b) for b in zip(*(iter(s) for s in fresh))] == reference[4:]


def test_loading_a_state_of_another_data_set_is_refused():
    from dist_train.errors import UserError

    s = samplers(10, 2, 1)[0]
    with pytest.raises(UserError, match="training split of 11"):
        s.load_state_dict(dict(samplers(11, 2, 1)[0].state_dict()))
