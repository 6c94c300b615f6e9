"""A training state of a chosen size, saved through the real Checkpointer (no torchrun needed).

The state is what a job of big Linear layers trained with Adam would checkpoint:
the model's weights, Adam's two moments per weight (so about three times the
model's bytes) and the trainer's small state, laid out exactly as `Trainer._snapshot`
lays it out. The I/O benchmarks use it, single-process (world size 1).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dist_train.checkpoint.saver import Checkpointer
from dist_train.checkpoint.retention import RetentionPolicy
from dist_train.checkpoint.state import Snapshot, SnapshotBuffers, to_cpu_tree
from dist_train.checkpoint.storage import Storage
from dist_train.checkpoint.writer import CheckpointWriter
from dist_train.distributed.env import DistEnv

WIDTH = 1024  # one Linear(WIDTH, WIDTH) is 4 MiB of float32 weights
LAYER_BYTES = WIDTH * WIDTH * 4 + WIDTH * 4


def single_process_env() -> DistEnv:
    return DistEnv(0, 1, 0, torch.device("cpu"), None)


@dataclass
class TrainingState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors a checkpoint holds (weights + Adam moments)."""
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        for state in self.optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
        return total

    def snapshot_fn(self, buffers: SnapshotBuffers | None = None):
        """The callable `Checkpointer.save` takes, built like `Trainer._snapshot` (same deferred copies)."""
        def snapshot(rng_states: list[dict[str, Any]], copy: bool) -> Snapshot:
            fill = None
            if copy:
                held = buffers or SnapshotBuffers()
                params = {p.data_ptr() for p in self.model.parameters()}
                model = held.copy_tree(self.model.state_dict(), defer=lambda t: t.data_ptr() in params)
                optimizer = held.copy_tree(self.optimizer.state_dict(), defer=lambda t: True)
                fill = held.take_pending()
            else:
                model, optimizer = to_cpu_tree(self.model.state_dict()), to_cpu_tree(self.optimizer.state_dict())
            trainer = {"progress": {"step": self.step, "epoch": 0}, "sampler": {"epoch": 0, "position": 0},
                       "rng": rng_states}
            fields = {"epoch": 0, "world_size": 1, "model": {"name": "bench-linear", "num_classes": WIDTH,
                                                             "in_channels": 1, "image_size": WIDTH}}
            return Snapshot(self.step, {"model": model, "optimizer": optimizer, "trainer": trainer}, fields, fill)
        return snapshot


def build_state(target_bytes: int) -> TrainingState:
    """Linear layers + Adam state of at least `target_bytes` in all (Adam triples the weights)."""
    layers = max(1, math.ceil(target_bytes / (3 * LAYER_BYTES)))
    with torch.no_grad():
        model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for param in model.parameters():
        param.grad = torch.full_like(param, 1e-3)
    optimizer.step()  # creates exp_avg / exp_avg_sq: the optimizer state is real
    optimizer.zero_grad(set_to_none=True)
    return TrainingState(model, optimizer, 0)


def make_checkpointer(run_dir: str, async_mode: bool) -> Checkpointer:
    storage = Storage(run_dir)
    storage.makedirs("")
    writer = CheckpointWriter(storage, 1, f"bench-{os.getpid()}", None)
    return Checkpointer(single_process_env(), storage, writer, RetentionPolicy(), async_mode)


def clear_dir(path: str) -> None:
    """Remove everything under `path` (between repetitions: every save goes to fresh files)."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)
