"""The training loop: epochs of optimizer steps, validation, and what happens at step boundaries.

One optimizer step consumes `grad_accum` global chunks of the epoch's order. The
task gives per-sample losses; the step's loss is their *sum* over real samples
divided by the global count of the step, times the world size (DDP averages
gradients over ranks), so the gradient is the exact mean over the global batch
however the samples fall on ranks; padding weighs zero.

At every step boundary the ranks vote (one all-reduce of a few flags, read at the
next boundary so it overlaps a step of compute) whether a preemption was requested,
a cloud preemption notice arrived, or the checkpointer must stop; checkpoints are
taken at the boundaries `--checkpoint-every` names, at each epoch end, and at the end.
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import dist_train
from dist_train.checkpoint.manager import CheckpointManager
from dist_train.config.job import JobConfig
from dist_train.data.datasets import DataBundle
from dist_train.data.loader import IndexedDataset, to_device, train_loader
from dist_train.data.sampler import ResumableDistributedSampler
from dist_train.determinism import seed_process
from dist_train.distributed.env import DistEnv
from dist_train.distributed.parallel import clip_grad_norm, grad_sync
from dist_train.distributed.vote import BoundaryVote
from dist_train.models.registry import ModelSpec
from dist_train.training.callbacks import CallbackList
from dist_train.training.evaluation import autocast, evaluate
from dist_train.training.metrics import MetricSums, MetricsLog
from dist_train.training.preemption import PreemptionWatcher
from dist_train.training.state import Progress, TrainerState, checkpoint_state
from dist_train.training.tasks import Task

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    FINISHED = "finished"
    PREEMPTED = "preempted"
    CHECKPOINT_FAILED = "checkpoint_failed"
    SUPERSEDED = "superseded"


@dataclass
class ModelParts:
    module: nn.Module  # what the step calls (DistributedDataParallel under torchrun)
    raw: nn.Module     # the unwrapped model: what checkpoints, validation and inference use
    spec: ModelSpec
    task: Task


@dataclass
class OptimParts:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler


@dataclass
class DataParts:
    bundle: DataBundle
    sampler: ResumableDistributedSampler
    train_set: IndexedDataset


@dataclass
class RunParts:
    """Everything around the math: checkpoints, logs, signals, the user's hooks and extra state."""
    checkpoints: CheckpointManager
    metrics: MetricsLog
    watcher: PreemptionWatcher
    progress: Progress
    generation: int
    callbacks: CallbackList = field(default_factory=CallbackList)
    extras: dict[str, Any] = field(default_factory=dict)
    tracker: Any = None   # TensorBoardTracker or None
    notice: Any = None    # NoticeWatcher or None
    goodput: Any = None   # GoodputHooks or None: step timings, save stalls, timed saves (dist_train/goodput)


class Trainer:
    def __init__(self, env: DistEnv, cfg: JobConfig, model: ModelParts, optim: OptimParts, data: DataParts,
                 run: RunParts):
        self.env, self.cfg = env, cfg
        self.model, self.optim, self.data, self.run = model, optim, data, run
        self.progress = run.progress
        self.amp = cfg.train.amp and env.device.type == "cuda"
        self.sums = MetricSums(env.device)
        self._window_start = time.perf_counter()
        self._window_samples = 0
        self._bar = None
        self._sample_log = self._open_sample_log()
        self._params = [p for p in model.raw.parameters() if p.requires_grad]
        self._param_ptrs = {p.data_ptr() for p in model.raw.parameters()} if run.checkpoints.writers == "rank0" else set()
        self.vote = BoundaryVote(env)
        self._noticed = False
        self._stop_reason = "preempted"  # the reason recorded by the checkpoint of a preemption
        self._timed_save = False  # the vote agreed on a timed save (--checkpoint-every DURATION|auto)
        if run.goodput is None:  # no record, but --checkpoint-every is still followed
            from dist_train.goodput.hooks import GoodputHooks
            from dist_train.goodput.interval import make_schedule
            run.goodput = GoodputHooks(make_schedule(cfg.checkpoint))
        run.callbacks.view = _view(self)

    def checkpoint_state(self) -> dict[str, Any]:
        return checkpoint_state(self.model.raw, self.optim.optimizer,
                                TrainerState(self.progress, self.data.sampler, self.optim.scheduler, self.optim.scaler),
                                self.run.extras)

    # -- the loop -------------------------------------------------------------------------

    def fit(self) -> Outcome:
        cfg, progress = self.cfg, self.progress
        log.info("training %s on %s (%s): %d ranks x batch %d, epochs %d, from step %d (epoch %d, sample %d)",
                 self.model.spec.name, cfg.data.dataset, self.model.task.name, self.env.world_size,
                 cfg.data.batch_size, cfg.train.epochs, progress.step, progress.epoch, self.data.sampler.position)
        self.model.module.train()
        self.run.callbacks.call("on_train_start")
        try:
            while progress.epoch < cfg.train.epochs and not self._steps_done():
                if self.data.sampler.position == 0:
                    seed_process(cfg.train.seed, "train", self.env.rank, progress.epoch)
                outcome = self._train_epoch()
                if outcome is not None:
                    return self._stop(outcome)
                if self.data.sampler.epoch_done:
                    self._validate()
                    progress.epoch += 1
                    self.data.sampler.set_epoch(progress.epoch)
                    self._save("epoch_end")
                    outcome = self._boundary_outcome()
                    if outcome is not None:
                        return self._stop(outcome)
            if self.data.sampler.position != 0 and not progress.last_val.get("step") == progress.step:
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
            self.run.callbacks.call("on_preemption")
            self._save(self._stop_reason)
        ok = self.run.checkpoints.close()
        self.run.metrics.close()
        if self.run.tracker is not None:
            from dist_train.goodput.hooks import publish
            publish(self.run.goodput, self.run.tracker, self.progress.step)
            self.run.tracker.close()
        flags = self.env.all_reduce_max([int(not ok), int(self.run.checkpoints.superseded is not None)])
        if flags[1]:
            outcome = Outcome.SUPERSEDED
        elif outcome is Outcome.FINISHED and flags[0]:
            outcome = Outcome.CHECKPOINT_FAILED
        self.run.callbacks.call("on_train_end", outcome.value)
        return outcome

    def _train_epoch(self) -> Outcome | None:
        """Train to the end of the epoch; an Outcome when the job must stop early."""
        sampler, progress = self.data.sampler, self.progress
        if hasattr(sampler, "batches"):  # the user's IterableDataset (data/iterable.py)
            batches = sampler.batches(self.env)
        else:
            batches = iter(train_loader(self.data.train_set, sampler, self.cfg.data.num_workers,
                                        self.env.device.type == "cuda", self.env.rank))
        self._open_bar(len(sampler))
        accumulate = self.cfg.optim.grad_accum
        try:
            while True:
                started = time.time()
                micro = list(itertools.islice(batches, accumulate))
                if not micro:
                    return None
                waited = time.time() - started
                count = sum(sampler.chunk_size_at(sampler.position + i * sampler.chunk) for i in range(len(micro)))
                step_loss = self._optimizer_step(micro, count)
                sampler.advance(len(micro))
                progress.step += 1
                if self.run.goodput is not None:
                    committed = self.run.checkpoints.last_committed
                    self.run.goodput.step(progress.step, started, time.time(), waited,
                                          committed.manifest.get("step") if committed is not None else None)
                progress.samples_seen += count
                self._window_samples += count
                self._record_samples(micro)
                if self._bar is not None:
                    self._bar.update(len(micro))
                if self.run.callbacks:
                    self.run.callbacks.call("on_train_batch_end", {"loss": step_loss})
                if progress.step % self.cfg.train.log_every == 0:
                    self._log_train()
                outcome = self._boundary_outcome()
                if outcome is not None:
                    return outcome
                if self._steps_done():
                    return None  # the end: validated, then saved once as "final" (never before validation)
                timed, self._timed_save = self._timed_save, False
                due = self.run.goodput.fixed_due(progress.step) if self.run.goodput is not None else False
                if (due or timed) and not sampler.epoch_done:
                    self._save("interval")
        finally:
            del batches

    def _optimizer_step(self, micro: list, global_count: int) -> float:
        """One optimizer step over the micro-batches; this rank's summed loss of the step (a float only
        when callbacks want it, else NaN: reading it would synchronise with the device)."""
        world = self.env.world_size
        device = self.env.device
        module, task, scaler = self.model.module, self.model.task, self.optim.scaler
        local_loss = torch.zeros((), device=device)
        for i, (inputs, targets, indices) in enumerate(micro):
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            weight = (indices >= 0).to(device=device, dtype=torch.float32)
            last = i == len(micro) - 1
            with grad_sync(module, enabled=last or not self.env.distributed):
                with autocast(device, self.amp):
                    outputs = module(inputs)
                losses, metrics = task.score(outputs, targets)
                weighted = (losses.float() * weight).sum()
                scaler.scale(weighted * (world / global_count)).backward()
            self.sums.add(losses, metrics, weight)
            local_loss += weighted.detach()
        self.run.checkpoints.wait_snapshot()  # an async save may still be copying the weights
        if self.cfg.optim.grad_clip is not None:
            scaler.unscale_(self.optim.optimizer)
            clip_grad_norm(self._params, self.cfg.optim.grad_clip)
        scaler.step(self.optim.optimizer)
        scaler.update()
        self.optim.optimizer.zero_grad(set_to_none=True)
        self.optim.scheduler.step()
        return float(local_loss) / max(1, global_count) * world if self.run.callbacks else math.nan

    def _boundary_outcome(self) -> Outcome | None:
        """The one collective of a step boundary: do all ranks go on? (decided one boundary later)"""
        notice = self.run.notice is not None and self.run.notice.seen
        timed = self.run.goodput.vote_flag(self.progress.step, self.env.is_rank0) if self.run.goodput else 0
        agreed = self.vote.cast([int(self.run.watcher.requested),
                                 int(self.env.is_rank0 and self.run.checkpoints.must_stop), int(notice), timed])
        if agreed is None:
            return None
        preempt, stop, noticed, self._timed_save = agreed[0], agreed[1], agreed[2], bool(agreed[3])
        if preempt:
            return Outcome.PREEMPTED
        if stop:
            return Outcome.SUPERSEDED if self.run.checkpoints.superseded else Outcome.CHECKPOINT_FAILED
        if noticed and not self._noticed:
            self._noticed = True
            if self.run.goodput is not None:
                self.run.goodput.notice()
            if self.env.is_rank0:
                log.warning("preemption notice%s: committing a checkpoint now",
                            f" ({self.run.notice.describe()})" if self.run.notice is not None else "")
            if self.cfg.train.exit_on_notice:
                self._stop_reason = "notice"
                return Outcome.PREEMPTED
            self._save("notice")
        return None

    # -- validation, metrics, checkpoints ----------------------------------------------------

    def _validate(self) -> None:
        bundle = self.data.bundle
        result = evaluate(self.env, self.model.raw, bundle.val, self.model.task, self.cfg.data.batch_size,
                          None, self.cfg.data.num_workers, self.amp)
        progress = self.progress
        progress.last_val = {"step": progress.step, "val_loss": result.loss,
                             **{f"val_{k}": v for k, v in result.metrics.items()}}
        if progress.best_val_loss is None or (math.isfinite(result.loss) and result.loss < progress.best_val_loss):
            progress.best_val_loss, progress.best_step = result.loss, progress.step
        self._emit({"split": "val", "loss": result.loss, **result.metrics, "count": result.count,
                    "best_val_loss": progress.best_val_loss, "best_step": progress.best_step})
        if self.run.tracker is not None:
            self.run.tracker.log(progress.step, result.as_dict(), "val")
        shown = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if isinstance(v, float))
        log.info("epoch %d step %d: val loss %.4f %s (%d samples)%s", progress.epoch, progress.step,
                 result.loss, shown, result.count, " (best)" if progress.best_step == progress.step else "")
        self.run.callbacks.call("on_validation_end", result.as_dict())

    def _log_train(self) -> None:
        means = self.sums.reduce(self.env)
        elapsed = time.perf_counter() - self._window_start
        rate = self._window_samples / elapsed if elapsed > 0 else 0.0
        self._window_start, self._window_samples = time.perf_counter(), 0
        count = means.pop("count")
        if count:
            summary = self.model.task.summarize(means)
            self._emit({"split": "train", **summary, "count": count, "samples_per_sec": rate})
            if self.run.tracker is not None:
                self.run.tracker.log(self.progress.step, {**summary, "lr": self._lr()}, "train")
            if self._bar is not None:
                self._bar.set_postfix({k: f"{v:.4f}" for k, v in summary.items()})

    def _lr(self) -> float:
        return self.optim.optimizer.param_groups[0]["lr"]

    def _emit(self, record: dict[str, Any]) -> None:
        if not self.env.is_rank0:
            return
        base = {"time": time.time(), "step": self.progress.step, "epoch": self.progress.epoch,
                "lr": self._lr(), "generation": self.run.generation}
        base.update(record)
        base.setdefault("samples_per_sec", None)
        self.run.metrics.write(base)

    def _save(self, reason: str) -> None:
        started = time.time()  # the training thread's stall, for goodput and --checkpoint-every auto
        self.run.metrics.flush()  # remote run dirs: the metrics so far go up with each checkpoint
        if self.run.tracker is not None:
            self.run.tracker.flush()
        progress = self.progress
        metrics = {"samples_seen": progress.samples_seen}
        if progress.last_val.get("step") == progress.step:
            metrics.update({k: v for k, v in progress.last_val.items() if k != "step"})
        bundle = self.data.bundle
        sampler = self.data.sampler
        if hasattr(sampler, "gather_states"):  # an IterableDataset: every rank's state (collective)
            sampler.gather_states(self.env)
        fields = {"sampler": sampler.summary() if hasattr(sampler, "summary") else sampler.state_dict(),
                  "best": {"val_loss": progress.best_val_loss, "step": progress.best_step},
                  "model": self.model.spec.as_dict(), "task": self.model.task.name,
                  "config": self.cfg.to_dict(), "config_hash": self.cfg.fingerprint(),
                  "class_names": bundle.class_names, "data_info": bundle.info,
                  "torch_version": torch.__version__, "dist_train_version": dist_train.__version__}
        # Parameters and optimizer state change only in the optimizer update, which waits for the
        # snapshot (`wait_snapshot`): their copies may run in the writer thread during the next forward
        # and backward pass. Buffers (BatchNorm statistics) change in the forward pass: copied now.
        defer = None
        if self.run.checkpoints.writers == "rank0":
            deferrable = set(self._param_ptrs)
            for per_param in self.optim.optimizer.state.values():
                deferrable.update(v.data_ptr() for v in per_param.values() if isinstance(v, torch.Tensor))
            defer = lambda t: t.data_ptr() in deferrable  # noqa: E731
        self.run.checkpoints.save(progress.step, self.checkpoint_state(), epoch=progress.epoch, reason=reason,
                                  metrics=_clean(metrics), fields=_clean(fields), defer=defer)
        if self.run.goodput is not None:
            committed = self.run.checkpoints.last_committed
            self.run.goodput.saved(progress.step, started, time.time(), reason, self.run.checkpoints.async_save,
                                   committed is not None and committed.manifest.get("step") == progress.step)

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
        return open(os.path.join(folder, f"rank{self.env.rank}-g{self.run.generation:04d}.jsonl"), "a",
                    encoding="utf-8")

    def _record_samples(self, micro: list) -> None:
        if self._sample_log is None:
            return
        indices = [int(i) for _, _, batch in micro for i in batch if int(i) >= 0]
        self._sample_log.write(json.dumps({"epoch": self.progress.epoch, "step": self.progress.step,
                                           "world_size": self.env.world_size, "indices": indices}) + "\n")
        self._sample_log.flush()


def _view(trainer: Trainer):
    from dist_train.training.callbacks import TrainingView
    return TrainingView(trainer)


def _clean(tree: Any) -> Any:
    """JSON-safe manifest fields: non-finite floats (a diverged loss) become null."""
    if isinstance(tree, float):
        return tree if math.isfinite(tree) else None
    if isinstance(tree, dict):
        return {k: _clean(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_clean(v) for v in tree]
    return tree
