"""Putting a checkpoint's state back into a freshly built job (model, optimizer, sampler, RNG)."""

from __future__ import annotations

import logging

import torch

from dist_train.checkpoint.state import Payload
from dist_train.data.sampler import ResumableDistributedSampler
from dist_train.distributed.env import DistEnv
from dist_train.errors import UserError
from dist_train.training.determinism import restore_rng_state, seed_process
from dist_train.training.loop import Progress
from dist_train.training.optim import load_scheduler_state

log = logging.getLogger(__name__)


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load; a checkpoint of another architecture or class count is the user's error."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UserError(f"checkpoint {source} does not fit the model: {detail[:300]}") from None


def restore_training_state(payload: Payload, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler, scaler: torch.amp.GradScaler,
                           sampler: ResumableDistributedSampler) -> Progress:
    source = payload.manifest.get("step")
    load_model_weights(model, payload.model, f"at step {source}")
    trainer = payload.trainer or {}
    try:
        optimizer.load_state_dict(payload.optimizer)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"checkpoint optimizer state does not fit this run's optimizer: {exc}") from None
    load_scheduler_state(scheduler, trainer["scheduler"])
    if trainer.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(trainer["scaler"])
    sampler.load_state_dict(trainer["sampler"])
    fields = Progress.__dataclass_fields__
    return Progress(**{k: v for k, v in trainer["progress"].items() if k in fields})


def restore_rng(payload: Payload, env: DistEnv, seed: int, epoch: int) -> None:
    """This rank's saved RNG state; ranks new to an elastic resume get a fresh derived stream."""
    states = (payload.trainer or {}).get("rng") or []
    if env.rank < len(states) and len(states) == env.world_size:
        restore_rng_state(states[env.rank])
    else:
        seed_process(seed, "elastic", env.world_size, env.rank, epoch)
        if env.is_rank0:
            log.info("world size changed (%d -> %d): RNG streams re-derived; data order stays exact",
                     len(states), env.world_size)
