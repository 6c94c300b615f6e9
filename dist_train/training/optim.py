"""Optimizers and the learning-rate schedule, both restorable from a checkpoint."""

from __future__ import annotations

import math

import torch
from torch import nn

from dist_train.training.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Only trainable parameters go in: a frozen backbone gets no optimizer state at all."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class ScheduleFactor:
    """lr(step) / peak lr: linear warmup, then constant, step decay or cosine to zero over `total_steps`."""

    def __init__(self, cfg: OptimConfig, total_steps: int):
        self.kind = cfg.lr_schedule
        self.warmup = cfg.warmup_steps
        self.step_size = cfg.lr_step_size
        self.gamma = cfg.lr_gamma
        self.total = max(1, total_steps)

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        after = step - self.warmup
        if self.kind == "step":
            return self.gamma ** (after // self.step_size)
        if self.kind == "cosine":
            span = max(1, self.total - self.warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, after / span)))
        return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, ScheduleFactor(cfg, total_steps))


def scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict:
    """LambdaLR's state without the schedule callable (it is rebuilt from the config)."""
    state = scheduler.state_dict()
    state.pop("lr_lambdas", None)
    return state


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict) -> None:
    state = dict(state)
    state["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(state)
