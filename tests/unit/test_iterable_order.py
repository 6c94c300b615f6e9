"""The trainer's view of a user IterableDataset (data/iterable.py), in one process.

What the integration test cannot reach cheaply: a stateless data set restarts its epoch on a
mid-epoch resume, a reshardable one gets every old rank's state, an endless one needs
--max-steps, and the registry hands the train split through (val read into memory).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dist_train.data.iterable import IterableOrder, planned_steps
from dist_train.distributed.env import DistEnv
from dist_train.errors import UserError

SUPPORT = Path(__file__).resolve().parents[1] / "support"
ENV = DistEnv(0, 1, 0, torch.device("cpu"), None)


@pytest.fixture
def userpkg(monkeypatch):
    monkeypatch.setattr(sys, "path", [str(SUPPORT), *sys.path])
    for name in [m for m in sys.modules if m == "userpkg" or m.startswith("userpkg.")]:
        monkeypatch.delitem(sys.modules, name)
    from userpkg import iterable_data
    return iterable_data


def take(order: IterableOrder, n: int) -> list[list[int]]:
    batches = order.batches(ENV)
    out = []
    for _ in range(n):
        _, _, positions = next(batches)
        out.append(positions.tolist())
    order.advance(n)
    return out


def test_stateful_stream_continues_after_the_last_trained_batch(userpkg):
    order = IterableOrder(userpkg.Stream("train"), 16, 1, 0, "userpkg.iterable_data:Stream")
    assert take(order, 3)[-1][0] == 32
    order.gather_states(ENV)
    saved = order.state_dict()
    assert saved["rank_states"] == [{"next": 48, "epoch": 0}] and saved["position"] == 48

    again = IterableOrder(userpkg.Stream("train"), 16, 1, 0, "userpkg.iterable_data:Stream")
    again.load_state_dict(saved)
    inputs, _, positions = next(again.batches(ENV))
    assert positions.tolist()[0] == 48
    assert torch.equal(inputs[0], userpkg.Stream("train").wave[48][0])  # the data set itself resumed


def test_world_size_change_is_refused_unless_the_data_set_reshards(userpkg):
    saved = {"epoch": 0, "position": 64, "world_size": 2, "batch_size": 16, "iterable": True, "stateful": True,
             "rank_states": [{"next": 2, "epoch": 0}, {"next": 2, "epoch": 0}]}
    order = IterableOrder(userpkg.Stream("train"), 16, 1, 0, "user:Stream")
    with pytest.raises(UserError, match="taken with 2 ranks .* cannot resume on 1"):
        order.load_state_dict(saved)

    class Reshards(userpkg.Stream):
        reshardable = True

        def load_state_dict(self, state):
            self.got = state

    dataset = Reshards("train")
    order = IterableOrder(dataset, 16, 1, 0, "user:Reshards")
    order.load_state_dict(saved)
    next(order.batches(ENV))
    assert dataset.got == {"world_size": 2, "rank_states": saved["rank_states"]}


def test_stateless_stream_restarts_its_epoch_with_a_warning(userpkg, caplog):
    order = IterableOrder(userpkg.Stateless("train"), 16, 1, 0, "user:Stateless")
    take(order, 2)
    order.gather_states(ENV)
    saved = order.state_dict()
    assert saved["rank_states"] is None and not saved["stateful"]
    again = IterableOrder(userpkg.Stateless("train"), 16, 1, 0, "user:Stateless")
    with caplog.at_level("WARNING"):
        again.load_state_dict(saved)
    assert "restarts from its beginning" in caplog.text and again.position == 0
    assert next(again.batches(ENV))[2].tolist()[0] == 0


def test_epoch_ends_when_the_stream_runs_short_and_endless_streams_need_max_steps(userpkg):
    order = IterableOrder(userpkg.Stream("val"), 100, 1, 0, "user:Stream")  # 128 items: one full batch
    assert len(list(order.batches(ENV))) == 1 and order.epoch_done

    class Endless(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield torch.zeros(2), 0.0
    with pytest.raises(UserError, match="--max-steps"):
        planned_steps(Endless(), 16, 1, 1, None, "user:Endless")
    assert planned_steps(Endless(), 16, 1, 1, 7, "user:Endless") == 7


def test_registry_hands_the_train_stream_through_and_reads_val_into_memory(userpkg):
    from dist_train.data.registry import bundle_from_factory

    bundle = bundle_from_factory(userpkg.Stream, "userpkg.iterable_data:Stream", {})
    assert isinstance(bundle.train, userpkg.Stream)
    assert len(bundle.val) == 128 and len(bundle.val[0]) == 2 and bundle.in_channels == 8
