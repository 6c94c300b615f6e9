"""Assembling a training job from its config: storage, data, model, resume, then the loop.

The order matters for the promises of the CLI: everything that can be the user's
fault (storage, data, a checkpoint that does not fit) is checked on every rank
before anything is written to the run dir.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.nn.parallel import DistributedDataParallel

from dist_train.checkpoint.fencing import AttemptRegistry, new_writer_id
from dist_train.checkpoint.manager import Checkpointer
from dist_train.checkpoint.retention import RetentionPolicy
from dist_train.checkpoint.state import Payload
from dist_train.checkpoint.storage import Storage
from dist_train.checkpoint.writer import CheckpointWriter, clean_stale
from dist_train.config.job import JobConfig, dump_yaml
from dist_train.data.datasets import build_datasets
from dist_train.data.loader import IndexedDataset
from dist_train.data.sampler import ResumableDistributedSampler
from dist_train.distributed.env import DistEnv
from dist_train.errors import EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED, EXIT_SUPERSEDED
from dist_train.models.registry import ModelSpec, build_model
from dist_train.resume.coordinator import choose_and_load
from dist_train.resume.restore import restore_training_state
from dist_train.training.determinism import enable_deterministic_algorithms, seed_process
from dist_train.training.loop import Outcome, Progress, Trainer
from dist_train.training.metrics import MetricsLog
from dist_train.training.optim import build_optimizer, build_scheduler
from dist_train.training.preemption import PreemptionWatcher

log = logging.getLogger(__name__)

EXIT_CODES = {Outcome.FINISHED: EXIT_OK, Outcome.PREEMPTED: EXIT_PREEMPTED,
              Outcome.CHECKPOINT_FAILED: EXIT_FAILURE, Outcome.SUPERSEDED: EXIT_SUPERSEDED}


def total_steps(cfg: JobConfig, train_len: int, world_size: int) -> int:
    micro_per_epoch = math.ceil(train_len / (world_size * cfg.data.batch_size))
    steps = cfg.train.epochs * math.ceil(micro_per_epoch / cfg.optim.grad_accum)
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def run_training(cfg: JobConfig, env: DistEnv) -> int:
    """The whole job on this rank; returns the process exit status."""
    if cfg.train.deterministic:
        enable_deterministic_algorithms()
    storage = Storage(cfg.checkpoint.run_dir, cfg.checkpoint.storage_options)
    env.on_every_rank(lambda: storage.check_reachable() if env.is_rank0 else None)
    data = env.on_every_rank(lambda: build_datasets(cfg.data, cfg.train.seed))
    spec = ModelSpec(cfg.model.model, data.num_classes, data.in_channels, data.image_size, cfg.model.dropout,
                     cfg.model.freeze_backbone, cfg.model.width)
    seed_process(cfg.train.seed, "init")  # identical initial weights for every rank and world size
    model = env.on_every_rank(lambda: build_model(spec, cfg.model.pretrained_weights)).to(env.device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps(cfg, len(data.train), env.world_size))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp and env.device.type == "cuda")
    sampler = ResumableDistributedSampler(len(data.train), cfg.data.batch_size, env.world_size, env.rank,
                                          cfg.train.seed)
    progress = Progress()

    payload: Payload | None = choose_and_load(env, storage, cfg.checkpoint.resume, cfg.checkpoint.verify, spec,
                                              cfg.checkpoint.storage_options)
    if payload is not None:
        progress = env.on_every_rank(lambda: restore_training_state(payload, model, optimizer, scheduler, scaler,
                                                                sampler))

    # Nothing was written before this point; from here on the run dir is ours.
    writer_id = new_writer_id()
    generation = 0
    if env.is_rank0:
        storage.makedirs("")
        registry = AttemptRegistry(storage)
        resumed_from = payload.manifest.get("generation") if payload else None
        generation = registry.register(writer_id, str(resumed_from) if resumed_from is not None else None)
        removed = clean_stale(storage, generation)
        if removed:
            log.info("removed %d leftover staging or partial folder(s) of earlier attempts", len(removed))
        storage.write_bytes("config.yaml", dump_yaml(cfg).encode())
        log.info("attempt %d on run dir %s", generation, storage.display_url)
    generation = env.broadcast_object(generation)
    registry = AttemptRegistry(storage) if env.is_rank0 else None
    writer = CheckpointWriter(storage, generation, writer_id, registry) if env.is_rank0 else None
    checkpointer = Checkpointer(env, storage, writer,
                                RetentionPolicy(cfg.checkpoint.keep_last, cfg.checkpoint.keep_best,
                                                cfg.checkpoint.keep_every),
                                cfg.checkpoint.async_checkpoint)
    if payload is not None and cfg.checkpoint.resume == "auto":
        checkpointer.mark_committed(progress.step)
    metrics = MetricsLog(storage if env.is_rank0 else None)
    if env.is_rank0 and payload is not None:
        metrics.write({"event": "resume", "step": progress.step, "epoch": progress.epoch,
                       "generation": generation, "from": payload.manifest.get("generation")})

    ddp = model
    if env.distributed:
        ddp = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    train_set = IndexedDataset(data.train, cfg.train.seed, reseed_per_sample=cfg.data.augment)
    watcher = PreemptionWatcher(cfg.train.preempt_deadline).install()
    try:
        if payload is not None:
            from dist_train.resume.restore import restore_rng
            restore_rng(payload, env, cfg.train.seed, progress.epoch)
        trainer = Trainer(env, cfg, ddp, model, optimizer, scheduler, scaler, data, sampler, train_set, spec,
                          checkpointer, metrics, watcher, progress, generation)
        outcome = trainer.fit()
    finally:
        watcher.finished()
        watcher.uninstall()
    if outcome is Outcome.PREEMPTED:
        log.warning("preempted at step %d: checkpoint committed, exit status %d means resume me",
                    progress.step, EXIT_PREEMPTED)
    elif outcome is Outcome.SUPERSEDED:
        log.error("a newer attempt owns %s; this attempt stopped (exit status %d)", storage.display_url,
                  EXIT_SUPERSEDED)
    elif outcome is Outcome.CHECKPOINT_FAILED:
        log.error("stopping: checkpoints could not be committed (exit status %d)", EXIT_FAILURE)
    else:
        log.info("finished at step %d (epoch %d); best val loss %s at step %s", progress.step, progress.epoch,
                 f"{progress.best_val_loss:.4f}" if progress.best_val_loss is not None else "n/a",
                 progress.best_step)
    return EXIT_CODES[outcome]


__all__ = ["run_training"]
