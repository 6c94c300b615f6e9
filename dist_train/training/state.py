"""The trainer's own checkpoint entry: counters, LR schedule, grad scaler and the sampler's position.

`TrainerState` is a Stateful like any other entry of a checkpoint (`trainer.safetensors`),
so the trainer saves and restores through the same `CheckpointManager` a hand-written
loop uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from dist_train.data.sampler import ResumableDistributedSampler
from dist_train.errors import UserError
from dist_train.training.optim import load_scheduler_state, scheduler_state


@dataclass
class Progress:
    """Counters that travel in checkpoints."""
    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    last_val: dict[str, Any] = field(default_factory=dict)


class TrainerState:
    def __init__(self, progress: Progress, sampler: ResumableDistributedSampler,
                 scheduler: torch.optim.lr_scheduler.LambdaLR, scaler: torch.amp.GradScaler):
        self.progress, self.sampler, self.scheduler, self.scaler = progress, sampler, scheduler, scaler

    def state_dict(self) -> dict[str, Any]:
        return {"progress": asdict(self.progress), "sampler": self.sampler.state_dict(),
                "scheduler": scheduler_state(self.scheduler), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            load_scheduler_state(self.scheduler, state["scheduler"])
            if state.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(state["scaler"])
            self.sampler.load_state_dict(state["sampler"])
            known = {f.name for f in fields(Progress)}
            for key, value in state["progress"].items():
                if key in known:
                    setattr(self.progress, key, value)
        except (KeyError, TypeError) as exc:
            raise UserError(f"checkpoint trainer state is incomplete ({exc})") from None


def checkpoint_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer: TrainerState,
                     extras: dict[str, Any]) -> dict[str, Any]:
    """The entries of every training checkpoint: model, optimizer, the trainer's counters, the user's extras."""
    return {"model": model, "optimizer": optimizer, "trainer": trainer, **extras}
