"""A user's own training script: dist_train's Python API with callables instead of import paths.

    torchrun --standalone --nproc-per-node 2 train_script.py --run-dir RUN_DIR --epochs 3 ...

It takes the same flags as `dist-train train`. Its EMA of the weights is both a callback
(updated after each optimizer step) and a Stateful extra (saved in every checkpoint, restored on
resume). `Recorder` appends one JSON line per hook call to `$USERPKG_HOOKS/rank<R>.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import torch

import dist_train
from userpkg.data import Wave
from userpkg.models import build
from userpkg.tasks import huber


class EMA(dist_train.Callback):
    """An exponential moving average of the weights."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        self.updates = 0

    def attach(self, model: torch.nn.Module) -> "EMA":
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return self

    @torch.no_grad()
    def on_train_batch_end(self, view, metrics) -> None:
        for key, value in view.model.state_dict().items():
            self.shadow[key].mul_(self.decay).add_(value, alpha=1 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"shadow": dict(self.shadow), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)
        self.updates = int(state["updates"])

    def digest(self) -> str:
        h = hashlib.sha256()
        for key in sorted(self.shadow):
            h.update(key.encode())
            h.update(self.shadow[key].contiguous().numpy().tobytes())
        return h.hexdigest()


class Recorder(dist_train.Callback):
    """One JSON line per hook call, per rank: what a test checks the hooks against."""

    def __init__(self, folder: str, ema: EMA):
        self.folder, self.ema = folder, ema

    def _write(self, view, hook: str, **fields) -> None:
        record = {"hook": hook, "step": view.step, "epoch": view.epoch, "rank": view.rank,
                  "world_size": view.world_size, "ema_updates": self.ema.updates, **fields}
        if hook != "on_train_batch_end":
            record["ema_digest"] = self.ema.digest()
        with open(os.path.join(self.folder, f"rank{view.rank}.jsonl"), "a") as out:
            out.write(json.dumps(record) + "\n")

    def on_train_start(self, view) -> None:
        self._write(view, "on_train_start")

    def on_train_batch_end(self, view, metrics) -> None:
        self._write(view, "on_train_batch_end", loss=metrics["loss"] if math.isfinite(metrics["loss"]) else None)

    def on_validation_end(self, view, metrics) -> None:
        self._write(view, "on_validation_end", metrics=metrics)

    def on_save_checkpoint(self, view, url) -> None:
        self._write(view, "on_save_checkpoint", url=url)

    def on_preemption(self, view) -> None:
        self._write(view, "on_preemption")

    def on_train_end(self, view, outcome) -> None:
        self._write(view, "on_train_end", outcome=outcome)


if __name__ == "__main__":
    folder = os.environ["USERPKG_HOOKS"]
    os.makedirs(folder, exist_ok=True)
    ema = EMA()
    dist_train.main(model=build, dataset=Wave, task=huber,
                    extras=lambda model: {"ema": ema.attach(model)},
                    callbacks=[ema, Recorder(folder, ema)])
