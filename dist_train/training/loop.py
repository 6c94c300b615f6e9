"""The training loop: epochs of optimizer steps, validation, and what happens at step boundaries.

One optimizer step consumes `grad_accum` global chunks of the epoch's order. The
loss is the *sum* over real samples divided by the global count of the step, times
the world size (DDP averages gradients over ranks), so the gradient is the exact
mean over the global batch however the samples fall on ranks; padding weighs zero.

At every step boundary the ranks vote (one all-reduce of two flags, read at the next
boundary so it overlaps a step of compute) whether a preemption was requested or the
checkpointer must stop; checkpoints are taken at
the boundaries `--checkpoint-every` names, at each epoch end, and at the end.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import dist_train
from dist_train.checkpoint.manager import Checkpointer
from dist_train.checkpoint.state import Snapshot, SnapshotBuffers, to_cpu_tree
from dist_train.config.job import JobConfig
from dist_train.data.datasets import DataBundle
from dist_train.data.loader import IndexedDataset, train_loader
from dist_train.data.sampler import ResumableDistributedSampler
from dist_train.distributed.env import DistEnv
from dist_train.distributed.vote import BoundaryVote
from dist_train.models.registry import ModelSpec
from dist_train.training.determinism import seed_process
from dist_train.training.evaluation import autocast, evaluate
from dist_train.training.metrics import MetricsLog
from dist_train.training.optim import scheduler_state
from dist_train.training.preemption import PreemptionWatcher

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    FINISHED = "finished"
    PREEMPTED = "preempted"
    CHECKPOINT_FAILED = "checkpoint_failed"
    SUPERSEDED = "superseded"


@dataclass
class Progress:
    """Counters that travel in checkpoints."""
    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    last_val: dict[str, Any] = field(default_factory=dict)


class Trainer:
    def __init__(self, env: DistEnv, cfg: JobConfig, model: nn.Module, raw_model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                 scaler: torch.amp.GradScaler, data: DataBundle, sampler: ResumableDistributedSampler,
                 train_set: IndexedDataset, spec: ModelSpec, checkpointer: Checkpointer, metrics: MetricsLog,
                 watcher: PreemptionWatcher, progress: Progress, generation: int):
        self.env, self.cfg = env, cfg
        self.model, self.raw_model = model, raw_model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.data, self.sampler, self.train_set, self.spec = data, sampler, train_set, spec
        self.checkpointer, self.metrics, self.watcher = checkpointer, metrics, watcher
        self.progress = progress
        self.generation = generation
        self.amp = cfg.train.amp and env.device.type == "cuda"
        self.buffers = SnapshotBuffers()
        self._tally = torch.zeros(3, dtype=torch.float64, device=env.device)
        self._window_start = time.perf_counter()
        self._window_samples = 0
        self._bar = None
        self._sample_log = self._open_sample_log()
        self._params = [p for p in raw_model.parameters() if p.requires_grad]
        self.vote = BoundaryVote(env)

    # -- the loop -------------------------------------------------------------------------

    def fit(self) -> Outcome:
        cfg, progress = self.cfg, self.progress
        log.info("training %s on %s: %d ranks x batch %d, epochs %d, from step %d (epoch %d, sample %d)",
                 self.spec.name, cfg.data.dataset, self.env.world_size, cfg.data.batch_size, cfg.train.epochs,
                 progress.step, progress.epoch, self.sampler.position)
        try:
            while progress.epoch < cfg.train.epochs and not self._steps_done():
                if self.sampler.position == 0:
                    seed_process(cfg.train.seed, "train", self.env.rank, progress.epoch)
                outcome = self._train_epoch()
                if outcome is not None:
                    return self._stop(outcome)
                if self.sampler.epoch_done:
                    self._validate()
                    progress.epoch += 1
                    self.sampler.set_epoch(progress.epoch)
                    self._save("epoch_end")
                    outcome = self._boundary_outcome()
                    if outcome is not None:
                        return self._stop(outcome)
            if self.sampler.position != 0 and not progress.last_val.get("step") == progress.step:
                self._validate()
            self._save("final")
            return self._stop(Outcome.FINISHED)
        finally:
            self._close_bar()
            if self._sample_log:
                self._sample_log.close()

    def _steps_done(self) -> bool:
        return self.cfg.train.max_steps is not None and self.progress.step >= self.cfg.train.max_steps

    def _stop(self, outcome: Outcome) -> Outcome:
        self.vote.settle()
        if outcome is Outcome.PREEMPTED:
            self._save("preempted")
        ok = self.checkpointer.finish()
        self.metrics.close()
        flags = self.env.all_reduce_max([int(not ok), int(self.checkpointer.superseded is not None)])
        if flags[1]:
            return Outcome.SUPERSEDED
        if outcome is Outcome.FINISHED and flags[0]:
            return Outcome.CHECKPOINT_FAILED
        return outcome

    def _train_epoch(self) -> Outcome | None:
        """Train to the end of the epoch; an Outcome when the job must stop early."""
        sampler, progress = self.sampler, self.progress
        loader = train_loader(self.train_set, sampler, self.cfg.data.num_workers,
                              self.env.device.type == "cuda", self.env.rank)
        batches = iter(loader)
        self._open_bar(len(sampler))
        accumulate = self.cfg.optim.grad_accum
        try:
            while True:
                micro = list(itertools.islice(batches, accumulate))
                if not micro:
                    return None
                count = sum(sampler.chunk_size_at(sampler.position + i * sampler.chunk) for i in range(len(micro)))
                self._optimizer_step(micro, count)
                sampler.advance(len(micro))
                progress.step += 1
                progress.samples_seen += count
                self._window_samples += count
                self._record_samples(micro)
                if self._bar is not None:
                    self._bar.update(len(micro))
                if progress.step % self.cfg.train.log_every == 0:
                    self._log_train()
                outcome = self._boundary_outcome()
                if outcome is not None:
                    return outcome
                every = self.cfg.checkpoint.checkpoint_every
                if every and progress.step % every == 0 and not sampler.epoch_done:
                    self._save("interval")
                if self._steps_done():
                    return None
        finally:
            del batches

    def _optimizer_step(self, micro: list, global_count: int) -> None:
        world = self.env.world_size
        device = self.env.device
        for i, (inputs, labels, indices) in enumerate(micro):
            inputs = inputs.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            weight = (indices >= 0).to(device=device, dtype=torch.float32)
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if (last or not self.env.distributed) else self.model.no_sync()
            with sync:
                with autocast(device, self.amp):
                    logits = self.model(inputs)
                losses = F.cross_entropy(logits.float(), labels, reduction="none") * weight
                self.scaler.scale(losses.sum() * (world / global_count)).backward()
            with torch.no_grad():
                correct = ((logits.argmax(dim=1) == labels).float() * weight).sum()
                self._tally += torch.stack([losses.sum().double(), correct.double(), weight.sum().double()])
        self.checkpointer.wait_snapshot()  # an async save may still be copying the weights
        if self.cfg.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._params, self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def _boundary_outcome(self) -> Outcome | None:
        """The one collective of a step boundary: do all ranks go on? (decided one boundary later)"""
        agreed = self.vote.cast([int(self.watcher.requested), int(self.env.is_rank0 and self.checkpointer.must_stop)])
        return self._decide(agreed)

    def _decide(self, agreed: list[int] | None) -> Outcome | None:
        if agreed is None:
            return None
        preempt, stop = agreed
        if preempt:
            return Outcome.PREEMPTED
        if stop:
            return Outcome.SUPERSEDED if self.checkpointer.superseded else Outcome.CHECKPOINT_FAILED
        return None

    # -- validation, metrics, checkpoints ----------------------------------------------------

    def _validate(self) -> None:
        result = evaluate(self.env, self.raw_model, self.data.val, self.data.num_classes,
                          self.cfg.data.batch_size, self.cfg.data.num_workers, self.amp)
        progress = self.progress
        progress.last_val = {"step": progress.step, "val_loss": result.loss, "val_accuracy": result.accuracy}
        if progress.best_val_loss is None or result.loss < progress.best_val_loss:
            progress.best_val_loss, progress.best_step = result.loss, progress.step
        self._emit({"split": "val", "loss": result.loss, "accuracy": result.accuracy, "count": result.count,
                    "best_val_loss": progress.best_val_loss, "best_step": progress.best_step})
        log.info("epoch %d step %d: val loss %.4f accuracy %.4f (%d samples)%s", progress.epoch, progress.step,
                 result.loss, result.accuracy, result.count,
                 " (best)" if progress.best_step == progress.step else "")

    def _log_train(self) -> None:
        tally = self._tally.to(self.env.collective_device)
        if self.env.distributed:
            torch.distributed.all_reduce(tally)
        loss_sum, correct, count = tally.tolist()
        self._tally.zero_()
        elapsed = time.perf_counter() - self._window_start
        rate = self._window_samples / elapsed if elapsed > 0 else 0.0
        self._window_start, self._window_samples = time.perf_counter(), 0
        if count:
            self._emit({"split": "train", "loss": loss_sum / count, "accuracy": correct / count,
                        "count": int(count), "samples_per_sec": rate})
            if self._bar is not None:
                self._bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{correct / count:.3f}")

    def _emit(self, record: dict[str, Any]) -> None:
        if not self.env.is_rank0:
            return
        base = {"time": time.time(), "step": self.progress.step, "epoch": self.progress.epoch,
                "lr": self.optimizer.param_groups[0]["lr"], "generation": self.generation}
        base.update(record)
        base.setdefault("samples_per_sec", None)
        self.metrics.write(base)

    def _save(self, reason: str) -> None:
        self.metrics.flush()  # remote run dirs: the metrics so far go up with each checkpoint
        self.checkpointer.save(self.progress.step, self._snapshot, reason)

    def _snapshot(self, rng_states: list[dict[str, Any]], copy: bool) -> Snapshot:
        if copy:
            # Parameters and optimizer state change only in the optimizer update, which waits for the
            # snapshot (`wait_snapshot`): their copies run in the writer thread, during the next forward
            # and backward pass. Buffers (BatchNorm statistics) change in the forward pass: copied now.
            params = {p.data_ptr() for p in self.raw_model.parameters()}
            model = self.buffers.copy_tree(self.raw_model.state_dict(), defer=lambda t: t.data_ptr() in params)
            optimizer = self.buffers.copy_tree(self.optimizer.state_dict(), defer=lambda t: True)
            fill = self.buffers.take_pending()
        else:
            model, optimizer, fill = to_cpu_tree(self.raw_model.state_dict()), \
                to_cpu_tree(self.optimizer.state_dict()), None
        progress = self.progress
        sampler_state = self.sampler.state_dict()
        trainer = {"scheduler": scheduler_state(self.scheduler), "scaler": self.scaler.state_dict(),
                   "progress": asdict(progress), "sampler": sampler_state, "rng": rng_states}
        metrics = {"samples_seen": progress.samples_seen}
        if progress.last_val.get("step") == progress.step:
            metrics.update({k: v for k, v in progress.last_val.items() if k != "step"})
        fields = {"epoch": progress.epoch, "world_size": self.env.world_size, "sampler": sampler_state,
                  "metrics": metrics, "best": {"val_loss": progress.best_val_loss, "step": progress.best_step},
                  "model": self.spec.as_dict(), "config": self.cfg.to_dict(), "config_hash": self.cfg.fingerprint(),
                  "class_names": self.data.class_names, "data_info": self.data.info,
                  "torch_version": torch.__version__, "dist_train_version": dist_train.__version__}
        fields = _clean(fields)
        return Snapshot(progress.step, model, optimizer, trainer, fields, fill)

    # -- progress bar and sample log ----------------------------------------------------------

    def _open_bar(self, total: int) -> None:
        self._close_bar()
        if self.env.is_rank0 and self.cfg.train.progress and sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=f"epoch {self.progress.epoch}", unit="batch", leave=False)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _open_sample_log(self):
        folder = self.cfg.train.sample_log
        if not folder:
            return None
        os.makedirs(folder, exist_ok=True)
        return open(os.path.join(folder, f"rank{self.env.rank}-g{self.generation:04d}.jsonl"), "a",
                    encoding="utf-8")

    def _record_samples(self, micro: list) -> None:
        if self._sample_log is None:
            return
        indices = [int(i) for _, _, batch in micro for i in batch if int(i) >= 0]
        self._sample_log.write(json.dumps({"epoch": self.progress.epoch, "step": self.progress.step,
                                           "world_size": self.env.world_size, "indices": indices}) + "\n")
        self._sample_log.flush()


def _clean(tree: Any) -> Any:
    """JSON-safe manifest fields: non-finite floats (a diverged loss) become null."""
    if isinstance(tree, float):
        return tree if math.isfinite(tree) else None
    if isinstance(tree, dict):
        return {k: _clean(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_clean(v) for v in tree]
    return tree
