"""The user's own `IterableDataset` as training data: per-rank streams, batched here, saved per rank.

A map-style data set has a global order the trainer owns (data/sampler.py). An iterable
owns its order itself, so the trainer can only keep what the iterable tells it. The
protocol (the one of torchdata's StatefulDataLoader and torchtitan's data loaders):

- **One stream per rank.** The factory is called as `ATTR("train", **dataset_args)`, plus
  `rank=` and `world_size=` when its signature names them; otherwise the
  data set reads `torch.distributed` itself. Each rank iterates its own object.
- **Batching.** The trainer takes `--batch-size` items at a time from the rank's iterator
  in the main process (`default_collate`). `--num-workers` does not apply: with workers,
  items would be read ahead of what was trained and the saved state would be ahead too
  (torchdata solves this by replaying worker states; one process is exact and simple).
- **End of epoch.** Before each micro-batch the ranks agree (one all-reduce of a flag) that
  every rank has a full batch; as soon as one rank's iterator is exhausted (or short),
  the epoch ends for all (the leftover items of the other ranks are not trained, as with
  `drop_last`). DDP needs every rank to run the same number of steps. An endless iterable
  needs `--max-steps`. At each epoch start `set_epoch(epoch)` is called if the data set has it.
- **State.** A data set with `state_dict()`/`load_state_dict()` is *stateful*: at every
  checkpoint each rank's `state_dict()` (taken right after its last trained batch: nothing
  is read ahead) is gathered into the trainer's checkpoint entry, one per rank. On resume
  at the same world size, rank r gets `load_state_dict(state_r)` before its iterator is
  made again (`set_epoch` first). A checkpoint at an epoch boundary holds no per-rank
  state: the next epoch starts with a fresh `iter()`.
- **World-size change.** Refused with one line, unless the data set class declares
  `reshardable = True`: then every new rank gets
  `load_state_dict({"world_size": OLD, "rank_states": [state_0, ..., state_OLD-1]})`
  and reshards itself.
- **Without state.** A mid-epoch resume restarts the epoch from its beginning with a
  warning (samples of that epoch before the checkpoint are trained again).
- **Sample log.** `--sample-log` records *stream positions*: item k of rank r's epoch
  stream is `k * world_size + r` (an iterable has no data set indices).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate

from dist_train.errors import UserError

log = logging.getLogger(__name__)


def is_iterable(dataset: Any) -> bool:
    return isinstance(dataset, IterableDataset)


def is_stateful(dataset: Any) -> bool:
    return callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))


def rank_kwargs(factory: Callable) -> dict[str, int]:
    """`rank` and `world_size` for a factory whose signature names them (not through **kwargs)."""
    import torch.distributed as dist

    grouped = dist.is_available() and dist.is_initialized()
    values = {"rank": dist.get_rank() if grouped else 0, "world_size": dist.get_world_size() if grouped else 1}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in values.items() if k in params}


class Materialized(Dataset):
    """An iterable validation or test split read whole into memory (they are small), map-style."""

    def __init__(self, dataset: IterableDataset, path: str, split: str):
        try:
            self.items = list(dataset)
        except Exception as exc:  # noqa: BLE001 - the user's code: one line naming it
            from dist_train.plugins import brief
            raise UserError(f"data set {path} (split {split!r}): iterating raised {brief(exc)}") from None
        for name in ("classes", "num_classes", "in_channels", "image_size", "vocab", "eval_transform"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def check_train(dataset: IterableDataset, path: str) -> None:
    """Cheap checks before anything trains (the first item is checked at the first batch)."""
    reshardable = getattr(type(dataset), "reshardable", False)
    if reshardable and not is_stateful(dataset):
        raise UserError(f"data set {path} declares reshardable = True but has no state_dict/load_state_dict")


def planned_steps(dataset: IterableDataset, batch_size: int, epochs: int, grad_accum: int,
                  max_steps: int | None, path: str) -> int:
    """Optimizer steps for the LR schedule: --max-steps, or len() (items per rank) times epochs."""
    if max_steps:
        return max_steps
    try:
        per_rank = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise UserError(f"data set {path} is an IterableDataset without __len__: give --max-steps "
                        "(the number of steps cannot be known in advance)") from None
    return max(1, epochs * math.ceil((per_rank // batch_size) / grad_accum))


class IterableOrder:
    """The loop's view of an iterable's epoch, in place of `ResumableDistributedSampler`.

    `position` counts the global samples of this epoch trained (all ranks); `advance`,
    `chunk_size_at`, `epoch_done`, `set_epoch` mean what they mean for the sampler.
    `batches(env)` yields this rank's (inputs, targets, stream positions) micro-batches.
    """

    def __init__(self, dataset: IterableDataset, batch_size: int, world_size: int, rank: int, path: str):
        self.dataset, self.batch_size, self.path = dataset, batch_size, path
        self.world_size, self.rank = world_size, rank
        self.epoch = 0
        self.position = 0
        self._done = False
        self._pending: dict[str, Any] | None = None  # this rank's state to load before the next iter()
        self._gathered: list[Any] | None = None       # every rank's state at the last save
        self.reshardable = bool(getattr(type(dataset), "reshardable", False))
        self.stateful = is_stateful(dataset)

    @property
    def chunk(self) -> int:
        return self.world_size * self.batch_size

    def chunk_size_at(self, position: int) -> int:
        return self.chunk  # every micro-batch is full on every rank (the epoch ends otherwise)

    def __len__(self) -> int:
        """Micro-batches left in the epoch when the data set says its length (per rank), else 0."""
        try:
            per_rank = len(self.dataset)  # type: ignore[arg-type]
        except TypeError:
            return 0
        return max(0, per_rank // self.batch_size - self.position // self.chunk)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position, self._done = epoch, 0, False

    def advance(self, micro_batches: int) -> None:
        self.position += micro_batches * self.chunk

    @property
    def epoch_done(self) -> bool:
        return self._done

    def batches(self, env) -> Iterator[tuple[Any, Any, torch.Tensor]]:
        """This rank's micro-batches for the rest of the epoch; ends on every rank at once."""
        if callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(self.epoch)
        if self._pending is not None:
            self.dataset.load_state_dict(self._pending)
            self._pending = None
        items = iter(self.dataset)
        ordinal = self.position // self.world_size  # items of this rank's stream trained this epoch
        while True:
            batch = list(itertools.islice(items, self.batch_size))
            if env.all_reduce_max([int(len(batch) < self.batch_size)])[0]:
                self._done = True
                return
            try:
                inputs, targets = default_collate(batch) if _pairs(batch) else _bad(batch, self.path)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001
                from dist_train.plugins import brief
                raise UserError(f"data set {self.path}: batching its items raised {brief(exc)}") from None
            positions = (torch.arange(ordinal, ordinal + len(batch)) * self.world_size + self.rank)
            ordinal += len(batch)
            yield inputs, targets, positions

    # -- checkpoint ------------------------------------------------------------------------

    def gather_states(self, env) -> None:
        """Every rank's data set state, gathered to all (collective: every rank, before each save)."""
        if self.position == 0 or not self.stateful:
            self._gathered = None  # an epoch boundary (or no state): the next iter() starts afresh
            return
        self._gathered = env.all_gather_objects(self.dataset.state_dict())

    def summary(self) -> dict[str, Any]:
        """The manifest's `sampler` field (JSON): where the epoch is, not the data set's own state."""
        return {"epoch": self.epoch, "position": self.position, "world_size": self.world_size,
                "batch_size": self.batch_size, "iterable": True, "stateful": self.stateful}

    def state_dict(self) -> dict[str, Any]:
        return {**self.summary(), "rank_states": self._gathered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("iterable"):
            raise UserError(f"checkpoint was taken on a map-style training set; {self.path} is an IterableDataset")
        epoch, position, states = int(state["epoch"]), int(state["position"]), state.get("rank_states")
        saved_world = int(state["world_size"])
        self.epoch, self.position, self._done = epoch, position, False
        if position == 0:
            return
        if not states:
            log.warning("data set %s has no state_dict/load_state_dict: the checkpoint is mid-epoch (epoch %d), "
                        "so epoch %d restarts from its beginning", self.path, epoch, epoch)
            self.position = 0
            return
        if saved_world != self.world_size:
            if not self.reshardable:
                raise UserError(f"checkpoint was taken with {saved_world} ranks reading the iterable data set "
                                f"{self.path}; it cannot resume on {self.world_size}: its per-rank states do not "
                                f"reshard (resume on {saved_world} ranks, or declare reshardable = True)")
            self._pending = {"world_size": saved_world, "rank_states": list(states)}
            return
        self._pending = states[self.rank]


def _pairs(batch: list) -> bool:
    return all(isinstance(item, (tuple, list)) and len(item) == 2 for item in batch)


def _bad(batch: list, path: str):
    item = next(i for i in batch if not (isinstance(i, (tuple, list)) and len(i) == 2))
    raise UserError(f"data set {path} must yield (input, target) pairs, it yielded a {type(item).__name__}")


__all__ = ["IterableOrder", "Materialized", "check_train", "is_iterable", "is_stateful", "planned_steps",
           "rank_kwargs"]


class Streamed:
    """What the trainer builds for an iterable training split: its epoch order and planned steps."""

    def __init__(self, order: IterableOrder, steps: int):
        self.order, self.steps, self.dataset = order, steps, order.dataset


def streamed(cfg, env, bundle) -> Streamed | None:
    """For a job whose training split is an IterableDataset: its order; None for map-style data."""
    if not is_iterable(bundle.train):
        return None
    path = cfg.data.dataset
    steps = planned_steps(bundle.train, cfg.data.batch_size, cfg.train.epochs, cfg.optim.grad_accum,
                          cfg.train.max_steps, path)
    if cfg.data.num_workers and env.is_rank0:
        log.warning("--num-workers %d does not apply to the iterable data set %s: it is read in the training "
                    "process, so its saved state is exactly what was trained", cfg.data.num_workers, path)
    return Streamed(IterableOrder(bundle.train, cfg.data.batch_size, env.world_size, env.rank, path), steps)
