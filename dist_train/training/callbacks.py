"""Callbacks: the user's hooks into the training loop, named as Lightning users know them.

Subclass `Callback` and override what you need; pass instances to `dist_train.train(...,
callbacks=[...])`. Every hook gets a `TrainingView` (step, epoch, rank, world size, the
unwrapped model, the optimizer, the last validation metrics). Hooks run on every rank
except `on_save_checkpoint`, which runs on rank 0 once a checkpoint is committed
(from the background writer thread with `--async-checkpoint`). An exception in a hook
is the user's: it stops the job like any other error in their code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from dist_train.training.loop import Trainer


class TrainingView:
    """What a callback may look at (read-only by convention; the model and optimizer are live)."""

    def __init__(self, trainer: "Trainer"):
        self._trainer = trainer

    @property
    def step(self) -> int:
        return self._trainer.progress.step

    @property
    def epoch(self) -> int:
        return self._trainer.progress.epoch

    @property
    def rank(self) -> int:
        return self._trainer.env.rank

    @property
    def world_size(self) -> int:
        return self._trainer.env.world_size

    @property
    def model(self) -> Any:
        return self._trainer.model.raw

    @property
    def optimizer(self) -> Any:
        return self._trainer.optim.optimizer

    @property
    def last_validation(self) -> dict[str, Any]:
        return dict(self._trainer.progress.last_val)


class Callback:
    def on_train_start(self, view: TrainingView) -> None:
        """Before the first step of this attempt (after a resume: with the restored state)."""

    def on_train_batch_end(self, view: TrainingView, metrics: dict[str, float]) -> None:
        """After each optimizer step; `metrics` holds this rank's loss of the step (no collective)."""

    def on_validation_end(self, view: TrainingView, metrics: dict[str, float]) -> None:
        """After each validation pass, with the global metrics (loss, accuracy, ...)."""

    def on_save_checkpoint(self, view: TrainingView, url: str) -> None:
        """Rank 0, once the checkpoint at `url` is committed."""

    def on_preemption(self, view: TrainingView) -> None:
        """All ranks agreed to stop for a preemption; the final checkpoint comes next."""

    def on_train_end(self, view: TrainingView, outcome: str) -> None:
        """The loop ended: outcome is finished, preempted, checkpoint_failed or superseded."""


class CallbackList:
    """Calls a hook on every callback, in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)
        self.view: TrainingView | None = None

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self.view, *args)
