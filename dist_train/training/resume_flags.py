"""Flags changed on resume: each is applied, won by the checkpoint, or refused, and the run says which.

A resumed run restores the optimizer's param groups and the scheduler's base lrs from the
checkpoint, so a new `--lr` would be silently ignored while `config.yaml` claimed it. Here
every config field the checkpoint's config disagrees with gets one of three treatments (the
table in docs/configuration.md is generated from `POLICY`):

- APPLIED: the new value takes effect from the resumed step (the optimizer hyper-parameters
  are written into the restored param groups and the scheduler's base lrs; everything read
  from the config each step, such as --epochs or --checkpoint-every, simply is the new value);
- CHECKPOINT: the checkpoint's state decides; the run warns and puts the checkpoint's value
  back into the config, so config.yaml and the manifests never name a value that was not used;
- REFUSED: the checkpoint cannot continue as that run (another model, data, task, optimizer,
  or a different meaning of a step); one line, exit status 2, before anything is written.

Fields not named are APPLIED (where the run dir is, logging, retention, storage options).
"""

from __future__ import annotations

import logging
from typing import Any

from dist_train.config.job import FIELDS, JobConfig, flag_name
from dist_train.errors import UserError

log = logging.getLogger(__name__)

APPLIED, CHECKPOINT, REFUSED = "applied", "checkpoint", "refused"

#: field -> (treatment, why); the source of the table in docs/configuration.md
POLICY: dict[str, tuple[str, str]] = {
    "dataset": (REFUSED, "another data set"),
    "dataset_args": (REFUSED, "another data set"),
    "val_fraction": (REFUSED, "another training split: the sampler's position would point elsewhere"),
    "test_fraction": (REFUSED, "another training split: the sampler's position would point elsewhere"),
    "image_size": (REFUSED, "other inputs for the same weights"),
    "synthetic_size": (REFUSED, "another data set"),
    "synthetic_shape": (REFUSED, "another data set"),
    "synthetic_classes": (REFUSED, "another data set"),
    "model": (REFUSED, "another model"),
    "model_args": (REFUSED, "another model"),
    "width": (REFUSED, "another model"),
    "dropout": (REFUSED, "another model"),
    "freeze_backbone": (REFUSED, "another set of trained parameters (the optimizer state would not fit)"),
    "optimizer": (REFUSED, "the optimizer state belongs to another optimizer"),
    "task": (REFUSED, "another loss"),
    "grad_accum": (REFUSED, "another meaning of a step (schedule, step counts, checkpoint steps)"),
    "seed": (REFUSED, "another data order (the sampler's state is for its seed)"),
    "parallelism": (APPLIED, "the checkpoint is resharded as it loads (ddp <-> fsdp, any world size)"),
    "pretrained_weights": (CHECKPOINT, "the weights come from the checkpoint"),
    "lr": (APPLIED, "the scheduler's base lr and the param groups are set to it"),
    "weight_decay": (APPLIED, "written into the restored param groups"),
    "momentum": (APPLIED, "written into the restored param groups (SGD)"),
    "lr_schedule": (APPLIED, "the schedule is rebuilt from the config at the restored step"),
    "warmup_steps": (APPLIED, "the schedule is rebuilt from the config at the restored step"),
    "lr_step_size": (APPLIED, "the schedule is rebuilt from the config at the restored step"),
    "lr_gamma": (APPLIED, "the schedule is rebuilt from the config at the restored step"),
    "epochs": (APPLIED, "the end of training (and a cosine schedule's length) move"),
    "max_steps": (APPLIED, "the end of training (and a cosine schedule's length) move"),
    "batch_size": (APPLIED, "the sampler's position counts samples, so the data order stays exact; "
                            "steps get another size"),
    "checkpoint_every": (APPLIED, "the next checkpoints follow it"),
    "keep_last": (APPLIED, "retention follows it from the next commit"),
    "keep_best": (APPLIED, "retention follows it from the next commit"),
    "keep_every": (APPLIED, "retention follows it from the next commit"),
}

#: fields that are unset (None) unless given: a resume that leaves one unset keeps the checkpoint's
#: value (nothing changed, so nothing is warned about); the run logs that it kept it. Given as
#: `none` (flag or YAML: `JobConfig.given`), it is a change like any other
KEPT_WHEN_UNSET = {"checkpoint_every", "checkpoint_every_min", "checkpoint_every_max"}

#: fields whose new value the restored optimizer or scheduler must be told about
_OPTIMIZER_FIELDS = {"lr": "lr", "weight_decay": "weight_decay", "momentum": "momentum"}
_SCHEDULE_FIELDS = {"lr", "lr_schedule", "warmup_steps", "lr_step_size", "lr_gamma", "epochs", "max_steps",
                    "batch_size"}


def treatment(key: str) -> tuple[str, str]:
    return POLICY.get(key, (APPLIED, "read from the config as the run goes"))


def changed_fields(cfg: JobConfig, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (checkpoint's value, this run's value)} for the fields that differ."""
    ours = cfg.to_dict()
    changed = {}
    for key, (section, _) in FIELDS.items():
        if section not in saved or key not in saved[section] or section not in ours:
            continue
        theirs, mine = saved[section][key], ours[section].get(key)
        if isinstance(theirs, list):
            theirs = list(theirs)
        if isinstance(mine, tuple):
            mine = list(mine)
        if theirs != mine and not (FIELDS[key][1].metadata.get("secret")):
            changed[key] = (theirs, mine)
    return changed


def reconcile(cfg: JobConfig, manifest: dict[str, Any] | None, optimizer, scheduler, is_rank0: bool) -> list[str]:
    """Apply the policy to what changed since the checkpoint; the log lines said (for tests and callers)."""
    saved = (manifest or {}).get("config")
    if not isinstance(saved, dict):
        return []
    changed = changed_fields(cfg, saved)
    refused = [k for k in changed if treatment(k)[0] == REFUSED]
    if refused:
        key = refused[0]
        theirs, mine = changed[key]
        raise UserError(f"{flag_name(key)} changed on resume: the checkpoint was trained with {theirs!r}, this run "
                        f"has {mine!r}; it cannot continue that way ({treatment(key)[1]}): pass {theirs!r} again, "
                        "or train into a new --run-dir (from this checkpoint with --resume URL: see "
                        "docs/configuration.md)")
    said, kept = [], []
    for key in [k for k in changed if k in KEPT_WHEN_UNSET and changed[k][1] is None and k not in cfg.given]:
        theirs, _ = changed.pop(key)
        setattr(getattr(cfg, FIELDS[key][0]), key, theirs)
        kept.append(f"{flag_name(key)} not given on resume: keeping the checkpoint's {theirs!r} "
                    f"(pass {flag_name(key)} to change it)")
    for key, (theirs, mine) in changed.items():
        kind, why = treatment(key)
        if kind == CHECKPOINT:
            section = FIELDS[key][0]
            setattr(getattr(cfg, section), key, theirs)
            said.append(f"{flag_name(key)} {mine!r} ignored on resume: {why} (kept {theirs!r}; config.yaml says so)")
        elif key in POLICY:
            said.append(f"{flag_name(key)} changed on resume: {theirs!r} -> {mine!r} ({why})")
    if any(k in changed for k in _OPTIMIZER_FIELDS) or any(k in changed for k in _SCHEDULE_FIELDS):
        _apply_optimizer(cfg, optimizer, scheduler, changed)
    if is_rank0:
        for line in kept:
            log.info("%s", line)
        for line in said:
            log.warning("%s", line)
    return kept + said


def _apply_optimizer(cfg: JobConfig, optimizer, scheduler, changed: dict) -> None:
    """The restored param groups and base lrs take the new hyper-parameters; the current lr is the
    new schedule's value at the restored step (what the next step would have set anyway)."""
    for group in optimizer.param_groups:
        for key, name in _OPTIMIZER_FIELDS.items():
            if key in changed and name in group and key != "lr":
                group[name] = getattr(cfg.optim, key)
    if "lr" in changed:
        scheduler.base_lrs = [cfg.optim.lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["initial_lr"] = cfg.optim.lr
    step = scheduler.last_epoch
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
