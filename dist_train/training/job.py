"""A training job in four stages: build it, claim the run dir, run it, report how it ended.

The order matters for the promises of the CLI: everything that can be the user's
fault (their module, storage, data, a checkpoint that does not fit) is checked on
every rank while building, before anything is written to the run dir; the run dir is
claimed (attempt generation, config.yaml) only then.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from dist_train.checkpoint.manager import CheckpointManager
from dist_train.config.job import JobConfig, dump_yaml
from dist_train.data.loader import IndexedDataset
from dist_train.data.packed_bundle import data_changed
from dist_train.data.registry import build_datasets
from dist_train.data.sampler import ResumableDistributedSampler
from dist_train.determinism import enable_deterministic_algorithms, seed_process
from dist_train.distributed.env import DistEnv
from dist_train.distributed.parallel import apply_parallelism
from dist_train.errors import EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED, EXIT_SUPERSEDED, UserError
from dist_train.models.registry import ModelSpec, build_model, make_spec
from dist_train.plugins import call_user, qualified_name
from dist_train.training.callbacks import Callback, CallbackList
from dist_train.training.loop import DataParts, ModelParts, OptimParts, Outcome, RunParts, Trainer
from dist_train.training.metrics import MetricsLog
from dist_train.training.optim import build_optimizer, build_scheduler
from dist_train.training.preemption import PreemptionWatcher
from dist_train.training.state import Progress, TrainerState, checkpoint_state
from dist_train.training.tasks import Task, build_task

log = logging.getLogger(__name__)

EXIT_CODES = {Outcome.FINISHED: EXIT_OK, Outcome.PREEMPTED: EXIT_PREEMPTED,
              Outcome.CHECKPOINT_FAILED: EXIT_FAILURE, Outcome.SUPERSEDED: EXIT_SUPERSEDED}


@dataclass
class UserCode:
    """What a user's own script hands over through the Python API (None: use the config's names)."""
    model: Callable[..., nn.Module] | None = None
    dataset: Callable[..., Any] | None = None
    task: str | Task | Callable | None = None
    extras: Callable[[nn.Module], dict[str, Any]] | dict[str, Any] | None = None
    callbacks: Iterable[Callback] = field(default_factory=list)


@dataclass
class Job:
    cfg: JobConfig
    env: DistEnv
    model: ModelParts
    optim: OptimParts
    data: DataParts
    checkpoints: CheckpointManager
    progress: Progress
    extras: dict[str, Any]
    callbacks: CallbackList
    resumed: bool
    timings: dict[str, Any] = field(default_factory=dict)  # restore begin/end, for the goodput record


def total_steps(cfg: JobConfig, train_len: int, world_size: int) -> int:
    micro_per_epoch = math.ceil(train_len / (world_size * cfg.data.batch_size))
    steps = cfg.train.epochs * math.ceil(micro_per_epoch / cfg.optim.grad_accum)
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def run_training(cfg: JobConfig, env: DistEnv, code: UserCode | None = None) -> int:
    """The whole job on this rank; returns the process exit status."""
    job = build(cfg, env, code or UserCode())
    generation = claim(job)
    outcome = run(job, generation)
    return report(job, outcome)


# -- build: nothing is written ----------------------------------------------------------------

def _model_spec(cfg: JobConfig, code: UserCode, shape: dict[str, Any]) -> tuple[ModelSpec, Callable | None]:
    from dist_train.plugins import is_import_path
    from dist_train.training.preflight import refuse_builtin_only_flags
    if code.model is not None or is_import_path(cfg.model.model):
        refuse_builtin_only_flags(cfg, qualified_name(code.model) if code.model is not None else cfg.model.model)
    if code.model is not None:
        from dist_train.plugins import accepted_kwargs
        return ModelSpec(qualified_name(code.model), dict(cfg.model.model_args),
                         accepted_kwargs(code.model, shape)), code.model
    builtin = {"dropout": cfg.model.dropout, "width": cfg.model.width}
    if cfg.model.freeze_backbone:
        builtin["freeze_backbone"] = True
    spec = make_spec(cfg.model.model, cfg.model.model_args, builtin, shape)
    if cfg.model.freeze_backbone and not spec.args.get("freeze_backbone"):
        raise UserError(f"--freeze-backbone needs a model that has a backbone to freeze (a torchvision backbone "
                        f"such as resnet18, or a factory taking freeze_backbone); {cfg.model.model} does not")
    return spec, None


def _instantiate(spec: ModelSpec, factory: Callable | None, pretrained: str | None,
                 storage_options: dict | None = None) -> nn.Module:
    if factory is None:
        return build_model(spec, pretrained, storage_options)
    model = call_user(factory, spec.name, "model", **spec.args, **spec.shape)
    if not isinstance(model, nn.Module):
        raise UserError(f"model {spec.name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _extras(code: UserCode, model: nn.Module) -> dict[str, Any]:
    extras = code.extras(model) if callable(code.extras) else dict(code.extras or {})
    if not isinstance(extras, dict):
        raise UserError(f"extras must be a dict of name -> object with state_dict/load_state_dict, "
                        f"got {type(extras).__name__}")
    for name in extras:
        if name in ("model", "optimizer", "trainer"):
            raise UserError(f"extra state name {name!r} is taken by dist_train's own checkpoint entries")
    return extras


def build(cfg: JobConfig, env: DistEnv, code: UserCode) -> Job:
    """Everything the job needs, checked on every rank, then restored from the newest valid checkpoint."""
    if cfg.train.deterministic:
        enable_deterministic_algorithms()
    writers = cfg.checkpoint.checkpoint_writers or ("all" if cfg.train.parallelism == "fsdp" else "rank0")
    if cfg.train.parallelism == "fsdp" and writers == "rank0":
        raise UserError("--parallelism fsdp needs --checkpoint-writers all: no rank holds the whole state "
                        "to write it alone")
    checkpoints = CheckpointManager.from_config(cfg.checkpoint, env, writers=writers)
    task = env.on_every_rank(lambda: build_task(code.task if code.task is not None else cfg.train.task))
    bundle = env.on_every_rank(lambda: build_datasets(cfg.data, cfg.train.seed, code.dataset,
                                                              cfg.checkpoint.storage_options))
    spec, factory = env.on_every_rank(lambda: _model_spec(cfg, code, bundle.shape()))
    if cfg.model.freeze_backbone and not cfg.model.pretrained_weights and env.is_rank0:
        log.warning("--freeze-backbone without --pretrained-weights: the frozen base keeps its random "
                    "initialisation and will not learn; only the new head trains")
    seed_process(cfg.train.seed, "init")  # identical initial weights for every rank and world size
    model = env.on_every_rank(lambda: _instantiate(spec, factory, cfg.model.pretrained_weights,
                                                   cfg.checkpoint.storage_options)).to(env.device)
    # FSDP shards the parameters in place (they become DTensors): before the optimizer is built on them.
    module = apply_parallelism(model, env, cfg.train.parallelism, cfg.train.amp)
    extras = env.on_every_rank(lambda: _extras(code, model))
    optimizer = build_optimizer(model, cfg.optim)
    from dist_train.data.iterable import streamed as iterable_order
    stream = env.on_every_rank(lambda: iterable_order(cfg, env, bundle))  # an IterableDataset: data/iterable.py
    scheduler = build_scheduler(optimizer, cfg.optim, stream.steps if stream else
                                total_steps(cfg, len(bundle.train), env.world_size))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp and env.device.type == "cuda")
    sampler = stream.order if stream else ResumableDistributedSampler(
        len(bundle.train), cfg.data.batch_size, env.world_size, env.rank, cfg.train.seed,
        shard_sizes=getattr(bundle.train, "shard_sizes", None), window=cfg.data.shuffle_window,
        allow_data_change=cfg.data.allow_data_change)
    progress = Progress()
    parts = ModelParts(module, model, spec, task)
    optim = OptimParts(optimizer, scheduler, scaler)
    data = DataParts(bundle, sampler, stream.dataset if stream else
                     IndexedDataset(bundle.train, cfg.train.seed, reseed_per_sample=cfg.data.augment))
    job = Job(cfg, env, parts, optim, data, checkpoints, progress, extras, CallbackList(code.callbacks), False)
    state = checkpoint_state(model, optimizer, TrainerState(progress, sampler, scheduler, scaler), extras)
    restore_began = time.time()
    step = checkpoints.restore(state, source=cfg.checkpoint.resume,
                               check=lambda manifest: _model_mismatch(manifest, spec)
                               or data_changed(manifest, bundle, cfg.data.allow_data_change))
    job.timings["restore"] = (restore_began, time.time(), step)
    job.resumed = step is not None
    if job.resumed and not checkpoints.restored_rng:
        seed_process(cfg.train.seed, "elastic", env.world_size, env.rank, progress.epoch)
        if env.is_rank0:
            log.info("world size changed (%d -> %d): RNG streams re-derived; data order stays exact",
                     (checkpoints.resumed_from or {}).get("world_size", 0), env.world_size)
    if job.resumed:  # flags changed since the checkpoint: applied, the checkpoint's, or refused (one line)
        from dist_train.training.resume_flags import reconcile
        env.on_every_rank(lambda: reconcile(cfg, checkpoints.resumed_from, optimizer, scheduler, env.is_rank0))
    env.on_every_rank(lambda: _dry_batch(job))  # the user's data, model and task meet once before the claim
    return job


def _dry_batch(job: Job) -> None:
    from dist_train.training.evaluation import autocast
    from dist_train.training.preflight import dry_batch

    bundle, cfg = job.data.bundle, job.cfg
    dataset = bundle.val if bundle.val is not None and len(bundle.val) else bundle.train
    dry_batch(job.model.raw, job.model.task, dataset, cfg.data.batch_size, job.env.device, job.model.spec.name,
              cfg.data.dataset, autocast(job.env.device, cfg.train.amp and job.env.device.type == "cuda"))


def _model_mismatch(manifest: dict[str, Any], spec: ModelSpec) -> str | None:
    """A readable reason why the checkpoint's model cannot be this run's model, or None."""
    theirs = manifest.get("model") or {}
    try:
        saved = ModelSpec.from_dict(theirs)
    except UserError:
        return None  # no description: the strict state_dict load decides
    common = set(saved.shape) & set(spec.shape)
    if saved.name != spec.name or any(saved.shape[k] != spec.shape[k] for k in common):
        return (f"checkpoint holds a {saved.describe()} (shape {saved.shape}), "
                f"this run builds a {spec.describe()} (shape {spec.shape})")
    return None


# -- claim: from here on the run dir is ours --------------------------------------------------

def claim(job: Job) -> int:
    generation = job.checkpoints.claim(dump_yaml(job.cfg))
    return generation


# -- run -------------------------------------------------------------------------------------

def run(job: Job, generation: int) -> Outcome:
    cfg, env = job.cfg, job.env
    storage = job.checkpoints.storage
    resumed_step = job.progress.step if job.resumed else None
    metrics = MetricsLog(storage if env.is_rank0 else None, resumed_step)  # drops the lines of redone steps
    if env.is_rank0 and job.resumed:
        metrics.write({"event": "resume", "step": job.progress.step, "epoch": job.progress.epoch,
                       "generation": generation, "from": (job.checkpoints.resumed_from or {}).get("generation"),
                       "dropped": metrics.dropped})
    tracker = None
    if env.is_rank0 and cfg.train.tensorboard:
        from dist_train.training.trackers import TensorBoardTracker
        tracker = TensorBoardTracker(storage, resumed_step)
    notice = _notice_watcher(cfg, env)
    watcher = PreemptionWatcher(cfg.train.preempt_deadline).install()
    run_parts = RunParts(job.checkpoints, metrics, watcher, job.progress, generation, job.callbacks, job.extras,
                         tracker, notice)
    run_parts.goodput = _goodput_hooks(job, generation, metrics)
    trainer = Trainer(env, cfg, job.model, job.optim, job.data, run_parts)
    if job.callbacks:
        job.checkpoints.add_commit_listener(lambda committed: job.callbacks.call("on_save_checkpoint", committed.url))
    ended = "failed"
    try:
        if notice is not None:
            notice.start()
        outcome = trainer.fit()
        ended = "failed" if outcome is Outcome.CHECKPOINT_FAILED else outcome.value
        return outcome
    finally:
        run_parts.goodput.exit(ended)
        if notice is not None:
            notice.stop()
        watcher.finished()
        watcher.uninstall()


def _goodput_hooks(job: Job, generation: int, metrics: MetricsLog):
    """The attempt's goodput record (rank 0) and checkpoint schedule (every rank); see dist_train/goodput."""
    from dist_train.goodput.events import GoodputRecorder
    from dist_train.goodput.hooks import GoodputHooks
    from dist_train.goodput.interval import make_schedule

    cfg, env = job.cfg.checkpoint, job.env
    recorder = None
    if env.is_rank0:
        recorder = GoodputRecorder(job.checkpoints.storage, generation, world_size=env.world_size)
        began, ended, step = job.timings.get("restore", (None, None, None))
        if began is not None:
            recorder.event("restore", t0=began, t1=ended, step=step,
                           **{"from": (job.checkpoints.resumed_from or {}).get("generation")})
    schedule = make_schedule(cfg, job.checkpoints.storage if env.is_rank0 else None, generation)
    hooks = GoodputHooks(schedule, recorder, metrics if env.is_rank0 else None)
    if env.is_rank0:
        job.checkpoints.add_commit_listener(lambda committed: hooks.committed(int(committed.manifest["step"])))
    return hooks


def _notice_watcher(cfg: JobConfig, env: DistEnv):
    """One poller per node (local rank 0): the step-boundary vote tells every rank."""
    if not cfg.train.preemption_notice:
        return None
    from dist_train.training.notice import NoticeWatcher
    return NoticeWatcher.from_config(cfg.train, local_rank=env.local_rank)


# -- report ----------------------------------------------------------------------------------

def report(job: Job, outcome: Outcome) -> int:
    progress, storage = job.progress, job.checkpoints.storage
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


__all__ = ["UserCode", "run_training"]
